"""A replica's sync (sheep/peer.py Peer._sync): a flush reaches every member, most of
which have changed nothing since their last sync."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sheep.cluster_state import ClusterState
from sheep.group import Group
from sheep.peer import Peer
from sheep.store.store import Store


def test_a_flush_with_nothing_changed_takes_no_trip_through_a_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to sync, nothing to commit: the flush answers without handing anything
    to a worker thread (two such trips cost 0.3 ms a flush on each member). One that
    follows a change syncs and commits it, and a flush that comes while a sync is under
    way still waits for it (that sync may hold writes acknowledged before the flush)."""
    store = Store(str(tmp_path / "store"))
    store.open()
    store.set_object_size(1 << 20)
    calls: list[str] = []
    sync_files, commit = store.sync_files, store.commit
    gate = asyncio.Event()

    def recording_sync_files(job: object) -> None:
        calls.append("files")
        sync_files(job)  # type: ignore[arg-type]

    def recording_commit(job: object) -> None:
        calls.append("commit")
        commit(job)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "sync_files", recording_sync_files)
    monkeypatch.setattr(store, "commit", recording_commit)

    async def scenario() -> None:
        peer = Peer(store, Group(ClusterState()))
        await peer.sync_all()
        assert calls == []
        store.create_and_write(1, 0, b"a")
        await peer.sync_all()
        assert calls == ["files", "commit"]
        calls.clear()
        await peer.sync_all()  # the intent its change no longer needs: deleted now
        assert calls == ["commit"]
        calls.clear()
        await peer.sync_all()
        assert calls == []
        # A sync under way (held at its commit): an empty flush waits for it.
        store.write(1, 0, b"b")
        loop = asyncio.get_running_loop()

        def held_commit(job: object) -> None:
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
            recording_commit(job)

        monkeypatch.setattr(store, "commit", held_commit)
        first = asyncio.ensure_future(peer.sync_all())
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(peer.sync_all())
        await asyncio.sleep(0.05)
        assert not second.done()
        gate.set()
        await asyncio.gather(first, second)
        # The first's sync and commit, then the second's commit of the intent the
        # first no longer needed.
        assert calls == ["files", "commit", "commit"]
        monkeypatch.setattr(store, "commit", commit)

    try:
        asyncio.run(scenario())
    finally:
        store.close()
