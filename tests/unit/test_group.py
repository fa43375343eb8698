"""Group: the copies each object keeps, from the cluster state's VDI registry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sheep import radix
from sheep.cluster_state import ClusterState, Event, EventKind
from sheep.constants import MiB
from sheep.errors import NewNodeVersion, Result
from sheep.group import Group
from sheep.node import NodeInfo
from sheep.oid import ObjectType, make_oid


class Cluster:
    def __init__(self, members: int, copies: int) -> None:
        self.state = ClusterState()
        self.group = Group(self.state)
        for number in range(members):
            node = NodeInfo(node_id=f"n{number}", address="127.0.0.1", port=7000 + number,
                            zone=number, weight=16 << 28)
            self.event(EventKind.JOIN, node=node)
        assert self.op({"type": "format", "copies": copies, "object_size": 4 * MiB}) \
            == Result.SUCCESS

    def event(self, kind: EventKind, **fields: Any) -> Result:
        seq = self.state.seq + 1
        return self.state.apply(Event(seq=seq, kind=kind, time=float(seq), **fields)).result

    def op(self, body: dict[str, Any]) -> Result:
        return self.event(EventKind.OP, op_id=f"op{self.state.seq + 1}", body=body)


def test_a_deleted_snapshots_objects_keep_their_vdis_copies() -> None:
    """A copies=3 VDI in a copies=2 cluster: what it wrote before a snapshot stays in
    the snapshot's generation, which its tree still reaches after the snapshot is
    deleted, so those objects keep 3 copies, not the cluster's 2."""
    cluster = Cluster(members=4, copies=2)
    assert cluster.op({"type": "vdi_create", "name": "k", "size": 32 * MiB,
                       "copies": 3}) == Result.SUCCESS
    frozen = cluster.state.vdis.vdis["k"].root.generation
    before = make_oid(ObjectType.DATA, frozen, 0)
    assert cluster.group.copies_for(before) == 3
    assert cluster.op({"type": "vdi_snapshot", "name": "k", "tag": "s", "generation": frozen,
                       "base": radix.node_oid(frozen, 1, 0)}) == Result.SUCCESS
    writable = cluster.state.vdis.vdis["k"].root.generation
    assert cluster.op({"type": "vdi_delete", "name": "k", "snapshot": "s"}) == Result.SUCCESS
    assert cluster.group.copies_for(before) == 3
    assert cluster.group.copies_for(make_oid(ObjectType.DATA, writable, 2)) == 3
    assert cluster.group.is_frozen(frozen) and not cluster.group.is_frozen(writable)
    assert cluster.group.copies_for(make_oid(ObjectType.RAW, frozen, 0)) == 2
    assert cluster.op({"type": "vdi_delete", "name": "k"}) == Result.SUCCESS
    assert cluster.group.copies_for(before) == 2, "no live tree reaches it any more"


def test_holders_away_are_the_nodes_placed_since_an_epoch_that_cannot_be_asked() -> None:
    """Simulator seed 111's shape: the two holders of an object are lost to the cluster,
    one by a power loss (its copy comes back in doubt, torn), the other cut off and
    declared dead (its copy whole). When the first comes back, the other is the node
    its copy must wait for; a node never placed for the object is not, nor a node
    declared lost, nor one back as a member."""
    cluster = Cluster(members=4, copies=2)
    group, state = cluster.group, cluster.state
    oid = make_oid(ObjectType.DATA, 1, 0)
    written = state.epoch
    torn, whole = (node.node_id for node in group.placement(oid, written))
    bystander = next(node for node in state.nodes if node.node_id not in (torn, whole))
    nodes = {node.node_id: node for node in state.nodes}
    cluster.event(EventKind.LEAVE, node_id=bystander.node_id, reason="dead")
    cluster.event(EventKind.LEAVE, node_id=torn, reason="dead")  # the power loss
    cluster.event(EventKind.LEAVE, node_id=whole, reason="dead")  # cut off, then expired
    cluster.event(EventKind.JOIN, node=nodes[torn])
    assert [node.node_id for node in group.holders_away(oid, written, torn)] == [whole]
    # Only the epochs from since on count; the asker itself is never away.
    assert group.holders_away(oid, state.epoch, torn) == []
    assert [node.node_id for node in group.holders_away(oid, written, "nobody")] == [whole]
    # The operator gives up on the whole copy's node: nothing waits for it any more.
    assert cluster.op({"type": "force_recover", "nodes": [whole]}) == Result.SUCCESS
    assert group.holders_away(oid, written, torn) == []
    # Back as a member, it is asked like any other (and no longer lost).
    cluster.op({"type": "force_recover"})  # the bystander too
    cluster.event(EventKind.JOIN, node=nodes[whole])
    assert group.holders_away(oid, written, torn) == [] and whole not in state.lost
    cluster.event(EventKind.LEAVE, node_id=whole, reason="dead")
    assert [node.node_id for node in group.holders_away(oid, written, torn)] == [whole]


def test_a_1000_node_cluster_in_40_racks_plans_the_recovery_of_a_lost_node() -> None:
    """Placement and recovery planning at scale: 1,000 sheep of mixed weights (10 GiB
    to 16 TiB) in 40 racks; one dies. Every object keeps the copies on the survivors,
    gets one new holder where the dead node held a copy and none elsewhere, and its
    copies stay in 3 distinct racks."""
    import random

    rng = random.Random(19)
    state = ClusterState()
    group = Group(state)
    seq = 0
    for number in range(1000):
        seq += 1
        weight = int(10 * 2**30 * 1600 ** rng.random())
        node = NodeInfo(node_id=f"10.0.{number // 250}.{number % 250}:7000/{number:04x}",
                        address="10.0.0.1", port=7000, zone=number, rack=number % 40,
                        weight=weight, base_weight=weight)
        state.apply(Event(seq=seq, kind=EventKind.JOIN, time=float(seq), node=node))
    seq += 1
    state.apply(Event(seq=seq, kind=EventKind.OP, time=float(seq), op_id="f",
                      body={"type": "format", "copies": 3, "object_size": 4 * MiB}))
    before = group.epoch
    dead = state.nodes[rng.randrange(1000)]
    seq += 1
    state.apply(Event(seq=seq, kind=EventKind.LEAVE, time=float(seq), node_id=dead.node_id))
    after = group.epoch
    assert after == before + 1
    lost = 0
    for index in range(3000):
        oid = make_oid(ObjectType.RAW, 0, index)
        old = {node.node_id for node in group.placement(oid, before)}
        placed = group.placement(oid, after)
        new = {node.node_id for node in placed}
        assert len({node.rack for node in placed}) == 3
        assert old - {dead.node_id} <= new  # no survivor's copy moves
        assert len(new - old) == (1 if dead.node_id in old else 0)
        lost += dead.node_id in old
    assert lost > 0, "the sample holds copies of the dead node"


def test_an_epoch_recorded_before_weights_is_placed_as_it_was_then() -> None:
    """Epoch logs from before weights name vnodes: such an epoch is placed by the vnode
    ring (sheep/legacy_ring.py), so recovery and reads of past epochs look where the
    data was put; an epoch of records with weights only, by rendezvous."""
    from sheep.legacy_ring import VnodeRing, vnode_point
    from sheep.ring import Ring

    # The old ring's pinned hash: the same points as before.
    assert vnode_point("127.0.0.1:7000/ab", 0) == 0x5F895AC773085E36
    old = [NodeInfo.from_json({"node_id": f"n{i}", "address": "127.0.0.1", "port": 7000 + i,
                               "zone": i, "vnodes": 320}) for i in range(4)]
    assert all(node.vnodes == 320 and node.weight == 320 << 28 for node in old)
    assert NodeInfo.from_json(old[0].to_json()) == old[0]  # the mark survives the log
    state = ClusterState()
    group = Group(state)
    seq = 0
    for node in old:
        seq += 1
        state.apply(Event(seq=seq, kind=EventKind.JOIN, time=float(seq), node=node))
    legacy_epoch = state.epoch
    assert isinstance(group.ring(legacy_epoch), VnodeRing)
    reference = VnodeRing(old)
    for oid in range(300):
        assert group.placement(oid, legacy_epoch, 2) == reference.placement(oid, 2)
    # Every member joins again with the new software: rendezvous from then on.
    for node in old:
        fresh = NodeInfo(node_id=node.node_id, address=node.address, port=node.port,
                         zone=node.zone, weight=node.weight, base_weight=node.weight)
        seq += 1
        state.apply(Event(seq=seq, kind=EventKind.JOIN, time=float(seq), node=fresh))
    assert isinstance(group.ring(), Ring)
    assert isinstance(group.ring(legacy_epoch), VnodeRing)  # the past stays as it was
    assert "vnodes" not in state.nodes[0].to_json()


def test_a_list_for_a_newer_epoch_waits_for_it_and_an_older_one_does_not() -> None:
    """wait_epoch_reached: what a peer's LIST waits for (a list for a joiner's epoch,
    served before this sheep applied it, missed the copies the old placement made
    next: simulator seed 702)."""
    cluster = Cluster(3, 2)
    group = cluster.group
    now = group.epoch

    async def run() -> None:
        await group.wait_epoch_reached(now - 1, 0.01)  # older: at once
        await group.wait_epoch_reached(now, 0.01)
        with pytest.raises(NewNodeVersion):
            await group.wait_epoch_reached(now + 1, 0.05)
        waiting = asyncio.ensure_future(group.wait_epoch_reached(now + 1, 5))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        node = NodeInfo(node_id="n9", address="127.0.0.1", port=7009, zone=9, weight=16 << 28)
        cluster.event(EventKind.JOIN, node=node)
        group.notify_epoch()
        await asyncio.wait_for(waiting, 1)
        assert group.epoch == now + 1

    asyncio.run(run())
