"""A sheep's local store: object files plus LMDB metadata."""

from sheep.store.store import ObjectMeta, Store

__all__ = ["ObjectMeta", "Store"]
