"""A gateway's work in flight when its sheep is fenced (Gateway._fenceable): given
up at once, answered as unavailable, in the requests' own tasks."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from sheep.cluster_state import ClusterState
from sheep.errors import NetworkError, Unavailable
from sheep.gateway import Gateway, PeerPool
from sheep.group import Group
from sheep.node import NodeInfo
from sheep.peer import Peer
from sheep.proto import Header, Op
from sheep.store.store import Store


def _gateway(tmp_path: Path) -> tuple[Gateway, Store, dict[str, bool]]:
    store = Store(str(tmp_path / "store"))
    store.open()
    group = Group(ClusterState())
    gateway = Gateway(group, Peer(store, group), "n1", PeerPool())
    state = {"fenced": False}
    gateway.fenced = asyncio.Event()

    def fence_check() -> bool:  # as Sheep._fenced_now: the event follows the driver
        assert gateway.fenced is not None
        if state["fenced"] and not gateway.fenced.is_set():
            gateway.fenced.set()
            gateway.fence_in_flight()
        return state["fenced"]

    gateway.fence_check = fence_check
    return gateway, store, state


def test_work_in_flight_gives_up_the_moment_the_fence_comes(tmp_path: Path) -> None:
    """Two requests wait on a replica that never answers; the fence comes (noticed by
    a third party, as the daemon's watcher does): both fail as unavailable at once,
    their work cancelled, and their tasks are not left cancelled (the reply still goes
    out). A request that noticed the fence itself gives up by that answer, and a
    cancellation from elsewhere stays a cancellation."""
    gateway, store, state = _gateway(tmp_path)
    cancelled: list[str] = []

    async def stuck(name: str) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def request(name: str) -> str:
        try:
            await gateway._fenceable(stuck(name))
        except Unavailable as error:
            await asyncio.sleep(0)  # not cancelled any more: an answer can be sent
            return f"{name}: {error.message}"
        return f"{name}: done"

    async def noticing() -> Any:
        await asyncio.sleep(0.01)
        state["fenced"] = True
        if gateway.fence_check():  # as Peer._refuse_if_fenced inside the work
            raise Unavailable("fenced (noticed here)")
        return b"", {}

    async def scenario() -> None:
        first = asyncio.ensure_future(request("a"))
        second = asyncio.ensure_future(request("b"))
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()
        state["fenced"] = True
        assert gateway.fence_check()  # the watcher notices
        answers = await asyncio.wait_for(asyncio.gather(first, second), 1)
        assert sorted(cancelled) == ["a", "b"]
        assert all("fenced" in answer for answer in answers), answers
        assert not gateway._fenceable_tasks and not gateway._fenced_out
        # Fenced already: refused before any work starts.
        with pytest.raises(Unavailable):
            await gateway._fenceable(stuck("never"))
        assert "never" not in cancelled
        # The task that notices the fence inside its work gives up by that answer.
        state["fenced"] = False
        assert gateway.fenced is not None
        gateway.fenced.clear()
        with pytest.raises(Unavailable, match="noticed here"):
            await gateway._fenceable(noticing())
        await asyncio.sleep(0)  # and its task is not cancelled afterwards
        # Another's cancellation is not turned into an answer.
        state["fenced"] = False
        gateway.fenced.clear()
        third = asyncio.ensure_future(gateway._fenceable(stuck("c")))
        await asyncio.sleep(0.01)
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        assert not gateway._fenceable_tasks and not gateway._fenced_out
        # The fence and a stop cancel the same task in one turn: the stop's stands.
        fourth = asyncio.ensure_future(gateway._fenceable(stuck("d")))
        await asyncio.sleep(0.01)
        state["fenced"] = True
        assert gateway.fence_check()
        fourth.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fourth
        assert not gateway._fenceable_tasks and not gateway._fenced_out

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_replies_failed_before_a_cancel_are_retrieved(tmp_path: Path) -> None:
    """A write sent to a remote replica whose connection is lost at once, while the
    local copy's write is still under way, then cancelled (the fence, a stop): the
    failed reply is retrieved, not logged later as 'Future exception was never
    retrieved' (the simulator printed it, seed 36 with --migrations --lifecycle)."""
    gateway, store, _ = _gateway(tmp_path)
    local = NodeInfo("n1", "127.0.0.1", 7000, zone=1, weight=1)
    remote = NodeInfo("n2", "127.0.0.2", 7000, zone=2, weight=1)
    unretrieved: list[str] = []

    class Lost:
        def send(self, header: Header, payload: bytes) -> asyncio.Future[Any]:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(NetworkError("connection to 127.0.0.2:7000 lost"))
            return future

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
        gateway.pool.ready = lambda node: Lost() if node is remote else None  # type: ignore[method-assign]

        async def local_write(*_: Any) -> Any:
            await asyncio.Event().wait()  # the local copy's write, under way

        gateway.call = local_write  # type: ignore[method-assign]
        header = Header(opcode=Op.WRITE_OBJ, oid=1, count=1)
        task = loop.create_task(gateway.call_all([remote, local], header, b"x", 1))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    store.close()
    assert not [m for m in unretrieved if "never retrieved" in m], unretrieved
