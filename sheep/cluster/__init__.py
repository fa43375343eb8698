"""Cluster drivers: membership and a totally ordered broadcast."""

from sheep.cluster.driver import ClusterDriver, make_driver

__all__ = ["ClusterDriver", "make_driver"]
