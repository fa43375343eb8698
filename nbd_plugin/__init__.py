"""The nbdkit Python plugin that exports VDIs over NBD.

It arrives with the NBD issue; it will import only sheep.client and the pure
layer, like dog.
"""
