"""A sheep that comes back with old copies never serves them as current."""

from __future__ import annotations

import asyncio
import time

import pytest

from sheep.testing.cluster import LocalCluster


def _write_vdi(client, name: str, offset: int, data: bytes) -> None:
    handle = client.vdi_open(name, writable=True)["handle"]
    client.vdi_write(handle, offset, data)
    client.vdi_close(handle)


def test_a_returning_sheep_serves_no_stale_copy(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    with cluster.client(0) as client:
        client.create_and_write(42, b"old!")  # changed (removed, re-created) while away
        client.create_and_write(43, b"same")  # unchanged while away
        client.create_and_write(44, b"gone")  # removed while away
        client.vdi_create("disk", 16 << 20)
        _write_vdi(client, "disk", 0, b"OLD-DATA")
    holders = cluster.object_files(42)
    victim = next(index for index in holders if index != 0)
    cluster.kill(victim)
    cluster.wait_epoch(0, 3)
    with cluster.client(0) as client:
        client.remove(42)
        client.create_and_write(42, b"new!")
        client.remove(44)
        _write_vdi(client, "disk", 0, b"NEW-DATA")
    cluster.start(victim)
    # At once, and through every sheep (the victim's local copies included):
    for index in range(4):
        with cluster.client(index) as client:
            assert client.read(42, 0, 4) == b"new!", index
            assert client.read(43, 0, 4) == b"same", index
            assert client.vdi_read(client.vdi_open("disk")["handle"], 0, 8) == b"NEW-DATA"
    # The victim's verifier brings its copies up to date in the background.
    with cluster.client(victim) as client:
        deadline = time.monotonic() + 15
        while True:
            replicas = client.stat(42)["replicas"]
            if all("unverified" not in r and "error" not in r for r in replicas):
                break
            assert time.monotonic() < deadline, replicas
            time.sleep(0.1)
        assert len({r["version"] for r in replicas}) == 1
    # Each copy is verified in turn (each one a request in the scheduler): 44 may
    # come after 42.
    while victim in cluster.object_files(44):
        assert time.monotonic() < deadline, "the removal reached the victim's copy"
        time.sleep(0.1)


def test_after_a_full_restart_every_copy_is_unverified_and_still_readable(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    with cluster.client(0) as client:
        client.vdi_create("disk", 16 << 20)
        _write_vdi(client, "disk", 0, b"BEFORE")
        client.shutdown()
    for sheep in cluster.sheep:
        assert sheep.process is not None and sheep.process.wait(timeout=20) == 0
    cluster.start()
    with cluster.client(1) as client:
        assert client.vdi_read(client.vdi_open("disk")["handle"], 0, 6) == b"BEFORE"
        _write_vdi(client, "disk", 6, b"+AFTER")
        assert client.vdi_read(client.vdi_open("disk")["handle"], 0, 12) == b"BEFORE+AFTER"


def test_both_returning_holders_never_outvote_the_copy_written_while_they_were_away(
        make_cluster):
    """An object's two holders die one after the other; it is rewritten on the third
    sheep alone; then both come back, and placement gives the object to them again.
    Their old copies agree with each other, but the newest copy is elsewhere: every
    read returns the new data, they take it, and it survives the removal of the
    third sheep's surplus copy."""
    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    with cluster.client(0) as client:
        ports = {sheep.port: sheep.index for sheep in cluster.sheep}
        oid = next(oid for oid in range(1, 500) if sorted(
            ports[int(r["endpoint"].rsplit(":", 1)[1])]
            for r in client.stat(oid)["replicas"]) == [0, 1])
        client.create_and_write(oid, b"old!" * 1024)
    cluster.kill(0)
    cluster.wait_epoch(2, 2, timeout_s=15)
    cluster.wait_recovered(30)  # the object gets its second copy on sheep 2
    cluster.kill(1)
    cluster.wait_epoch(2, 1, timeout_s=15)
    with cluster.client(2) as client:
        client.write(oid, b"new!" * 1024)
    cluster.start(0)
    cluster.start(1)
    for index in range(3):
        with cluster.client(index) as client:
            assert client.read(oid, 0, 8) == b"new!new!", index
    cluster.wait_recovered(60)
    for index in range(3):
        with cluster.client(index) as client:
            assert client.read(oid, 0, 8) == b"new!new!", index
            replicas = client.stat(oid)["replicas"]
            assert {r["version"] for r in replicas} == {max(r["version"] for r in replicas)}
    for index in (0, 1):
        with open(cluster.object_path(index, oid), "rb") as file:
            assert file.read(8) == b"new!new!"


def test_a_copy_whose_newer_version_may_be_on_a_node_away_waits_until_it_is_declared_lost(
        tmp_path, monkeypatch):
    """Simulator seed 111's shape, with real sheep in one process: one holder's copy is
    unverified (as after a power loss), the other holder dies. Its node may hold a
    newer copy, so the object waits: the verifier does not take the unverified copy
    as current, reads fail with a retryable error naming the node, and recovery
    fetches nothing. Everything else is served. Once the operator declares the node
    lost (dog cluster recover force), the copy among the members is current."""
    from sheep import constants
    from sheep.errors import Unavailable
    from sheep.testing.inprocess import InProcessCluster

    monkeypatch.setattr(constants, "gateway_retry_total_ms", 1500)  # fail fast
    oid, other = 0x51, 0x52
    with InProcessCluster(str(tmp_path), nodes=3) as cluster:
        with cluster.client(0) as client:
            client.format(2, 4 << 20)
            client.create_and_write(oid, b"v1")
            client.create_and_write(other, b"ok")
        torn, away = (index for index, sheep in enumerate(cluster.sheep)
                      if sheep.store.exists(oid))
        third = 3 - torn - away
        torn_sheep = cluster.sheep[torn]
        away_id = cluster.sheep[away].node.node_id

        async def unverify() -> None:
            assert torn_sheep.peer is not None
            torn_sheep.peer.health.start_unverified([oid], torn_sheep.group.epoch)

        cluster.run(unverify())
        cluster.crash(away)
        with cluster.client(third) as client:
            with pytest.raises(Unavailable, match=f"newest copy may be on {away_id}"):
                client.read(oid, 0, 2)
            assert client.read(other, 0, 2) == b"ok"  # only that object waits

        async def start_verifier() -> dict:
            torn_sheep._start_verifier()
            await asyncio.sleep(1.5)
            return torn_sheep.local_node_info()["recovery"]

        recovery = cluster.run(start_verifier())
        assert recovery["waiting"] == 1 and recovery["waiting_for"] == [away_id]
        assert torn_sheep.peer.health.is_unverified(oid)
        assert not cluster.sheep[third].store.exists(oid)  # nothing verified to fetch
        with cluster.client(third) as client:
            assert client.force_recover([away_id]) == {"given_up": [], "lost": [away_id]}
            deadline = time.monotonic() + 15
            while torn_sheep.peer.health.is_unverified(oid):
                assert time.monotonic() < deadline, "still waiting after the node was lost"
                time.sleep(0.1)
            assert client.read(oid, 0, 2) == b"v1"
