import pytest

from sheep.testing.cluster import LocalCluster


@pytest.fixture
def make_cluster(tmp_path):
    """Build clusters of real sheep processes; every one is killed at teardown."""
    clusters = []

    def make(nodes: int = 3, zones=None, start: bool = True) -> LocalCluster:
        cluster = LocalCluster(str(tmp_path / f"cluster{len(clusters)}"), nodes, zones)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()
