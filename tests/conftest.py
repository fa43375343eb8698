import itertools
import os

import pytest

from sheep.testing.cluster import LocalCluster

# The tests of these modules run on both cluster drivers: the local one and ZooKeeper.
# They are the ones whose outcome hangs on membership, deaths and the ordered log
# (joins and rejoins, restarts, returning holders). VDI and recovery logic sees the
# driver only through those events, so test_vdi, test_recovery and
# test_recovery_control run on the local driver alone (within the suite's time
# budget), and the ZooKeeper driver's own behaviour has test_zookeeper*.py.
BOTH_DRIVERS = {"test_cluster", "test_stale_copies", "test_restart"}
_prefixes = itertools.count()
ZOOKEEPER_SESSION_TIMEOUT_S = 2.0  # how long a SIGKILLed sheep stays a member on ZooKeeper


@pytest.fixture(scope="session", autouse=True)
def _no_keyrings_of_the_user(tmp_path_factory):
    """dog and the client library look for keyrings in ~/.config and the runtime
    directory, and 'dog cluster format' writes one there: in tests, both are private."""
    home = tmp_path_factory.mktemp("xdg")
    saved = {name: os.environ.get(name) for name in
             ("XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "DOG_KEYRING", "DOG_NAME")}
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    os.environ["XDG_RUNTIME_DIR"] = str(home / "run")
    os.makedirs(home / "run", mode=0o700)
    os.environ.pop("DOG_KEYRING", None)
    os.environ.pop("DOG_NAME", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "make_cluster" in metafunc.fixturenames and module in BOTH_DRIVERS:
        metafunc.parametrize("cluster_driver", ["local", "zookeeper"], indirect=True)


@pytest.fixture
def cluster_driver(request):
    """Which cluster driver make_cluster uses: 'local' unless parametrized."""
    return getattr(request, "param", "local")


def _require_zookeeper() -> None:
    """Skip where ZooKeeper cannot run, except in CI, where scripts/test installs it."""
    from sheep.testing import zookeeper

    why = zookeeper.missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"CI lacks ZooKeeper: {why}; scripts/test installs it")
        pytest.skip(why)


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory):
    """One private ZooKeeper for the whole run (each cluster gets its own prefix)."""
    from sheep.testing import zookeeper

    _require_zookeeper()
    server = zookeeper.ZooKeeperServer(str(tmp_path_factory.mktemp("zookeeper")))
    yield server
    server.stop()


@pytest.fixture
def make_zookeeper_ensemble(tmp_path):
    """Build private ZooKeeper ensembles (3 servers on 127.0.0.1 unless told); every
    server is stopped by PID at teardown."""
    from sheep.testing import zookeeper

    _require_zookeeper()
    ensembles: list[zookeeper.ZooKeeperEnsemble] = []

    def make(servers: int = 3, tick_ms: int = zookeeper.tick_ms_default):
        ensemble = zookeeper.ZooKeeperEnsemble(str(tmp_path / f"ensemble{len(ensembles)}"),
                                               servers, tick_ms)
        ensembles.append(ensemble)
        return ensemble

    yield make
    for ensemble in ensembles:
        ensemble.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so a fixture's teardown knows whether the
    test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _log_tails(clusters, lines: int = 40) -> None:
    """After a failed test, print the end of each sheep's log: pytest shows it with the
    failure, so a CI run explains itself."""
    for cluster in clusters:
        for index, node in enumerate(cluster.sheep):
            path = os.path.join(node.directory, "stderr.log")
            try:
                with open(path, errors="replace") as file:
                    text = file.read().splitlines()
            except OSError:
                continue
            code = node.process.poll() if node.process is not None else None
            print(f"--- sheep {index} (exit code {code}): the end of {path}")
            print("\n".join(text[-lines:]))


@pytest.fixture
def make_cluster(tmp_path, request, cluster_driver):
    """Build clusters of real sheep processes; every one is killed at teardown."""
    clusters = []
    driver = None
    if cluster_driver == "zookeeper":
        server = request.getfixturevalue("zookeeper_server")
        driver = f"zookeeper:{server.hosts}/test{os.getpid()}-{next(_prefixes)}"

    def make(nodes: int = 3, zones=None, start: bool = True) -> LocalCluster:
        cluster = LocalCluster(str(tmp_path / f"cluster{len(clusters)}"), nodes, zones,
                               driver=driver and f"{driver}-{len(clusters)}"
                               f"?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}")
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        _log_tails(clusters)
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

