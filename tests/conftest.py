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


@pytest.fixture
def make_nbd(tmp_path):
    """Start nbdkit with our plugin against sheep ports; stopped by PID at teardown."""
    from sheep.testing.nbd import NbdServer

    servers = []

    def make(sheep_ports, **options) -> NbdServer:
        server = NbdServer(list(sheep_ports), str(tmp_path / f"nbdkit{len(servers)}.log"),
                           **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()

