"""What the tests share: a cluster of real sheep processes on loopback."""
