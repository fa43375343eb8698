"""The cluster state machine: membership and epochs, format, ops, persistence, determinism.

Every test feeds events by hand (no driver, no clock) and calls _check() after
each step; the hypothesis tests compare two fresh states, a persisted-and-
reloaded one, and a simple model (a set of members and a count of changes).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sheep import constants
from sheep.cluster_state import (
    ApplyResult,
    ClusterState,
    EpochEntry,
    Event,
    EventKind,
    Status,
    format_problem,
)
from sheep.constants import MiB
from sheep.errors import Result
from sheep.node import NodeInfo


def make_node(number: int, zone: int | None = None) -> NodeInfo:
    return NodeInfo(node_id=f"127.0.0.1:{7000 + number}/{number:08x}", address="127.0.0.1",
                    port=7000 + number, zone=number if zone is None else zone, weight=16 << 28,
                    base_weight=16 << 28)


class Feeder:
    """Hands out events with increasing seqs and times, and checks the state after each."""

    def __init__(self, state: ClusterState | None = None) -> None:
        self.state = state if state is not None else ClusterState()
        self.seq = self.state.seq

    def apply(self, event: Event) -> ApplyResult:
        result = self.state.apply(event)
        self.state._check()
        return result

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def join(self, node: NodeInfo) -> ApplyResult:
        seq = self.next_seq()
        return self.apply(Event(seq=seq, kind=EventKind.JOIN, time=float(seq), node=node))

    def leave(self, node_id: str, reason: str = "leave") -> ApplyResult:
        seq = self.next_seq()
        return self.apply(Event(seq=seq, kind=EventKind.LEAVE, time=float(seq), node_id=node_id,
                                reason=reason))

    def op(self, body: dict[str, Any], node_id: str = "") -> ApplyResult:
        seq = self.next_seq()
        return self.apply(Event(seq=seq, kind=EventKind.OP, time=float(seq), node_id=node_id,
                                op_id=f"op{seq}", body=body))

    def format(self, copies: Any = 3, object_size: Any = 4 * MiB, **extra: Any) -> ApplyResult:
        return self.op({"type": "format", "copies": copies, "object_size": object_size, **extra})


def cluster_of(count: int) -> Feeder:
    feeder = Feeder()
    for number in range(count):
        feeder.join(make_node(number))
    return feeder


def reload(state: ClusterState) -> ClusterState:
    """What a sheep restarted on its store sees: the state and epoch log through JSON."""
    value = json.loads(json.dumps(state.to_json()))
    epochs = json.loads(json.dumps([entry.to_json() for entry in state.epochs]))
    return ClusterState.from_json(value, epochs)


# --- membership and epochs ------------------------------------------------------


def test_fresh_state() -> None:
    state = ClusterState()
    state._check()
    assert (state.seq, state.epoch, state.nodes, state.epochs) == (0, 0, [], [])
    assert state.status is Status.WAIT_FOR_FORMAT
    assert state.zones == 0
    assert state.epoch_nodes(0) is None and state.epoch_nodes(1) is None


def test_joins_bump_the_epoch_and_log_it() -> None:
    feeder = Feeder()
    nodes = [make_node(number) for number in (2, 0, 1)]
    for count, node in enumerate(nodes, start=1):
        result = feeder.join(node)
        assert result.epoch_changed and result.result is Result.SUCCESS
        assert feeder.state.epoch == count
        assert feeder.state.seq == count
    state = feeder.state
    assert state.nodes == sorted(nodes, key=lambda node: node.node_id)
    assert [entry.epoch for entry in state.epochs] == [1, 2, 3]
    assert [entry.time for entry in state.epochs] == [1.0, 2.0, 3.0]
    assert state.epoch_nodes(1) == [nodes[0]]
    assert state.epoch_nodes(2) == sorted(nodes[:2], key=lambda node: node.node_id)
    assert state.epoch_nodes(3) == state.nodes
    assert state.epoch_nodes(4) is None and state.epoch_nodes(0) is None
    assert state.zones == 3


def test_leave_bumps_the_epoch_and_log_it() -> None:
    feeder = cluster_of(3)
    result = feeder.leave(make_node(1).node_id, reason="dead")
    assert result.epoch_changed
    assert feeder.state.epoch == 4
    assert feeder.state.nodes == [make_node(0), make_node(2)]
    assert feeder.state.epoch_nodes(4) == [make_node(0), make_node(2)]
    assert feeder.state.epoch_nodes(3) == [make_node(0), make_node(1), make_node(2)]
    feeder.leave(make_node(0).node_id)
    feeder.leave(make_node(2).node_id)
    assert feeder.state.epoch == 6 and feeder.state.nodes == []
    assert feeder.state.epoch_nodes(6) == []


def test_duplicate_join_is_a_no_op() -> None:
    feeder = cluster_of(2)
    before = feeder.state.to_json()
    result = feeder.join(make_node(1))
    assert result == ApplyResult()
    assert not result.epoch_changed
    after = feeder.state.to_json()
    assert after.pop("seq") == before.pop("seq") + 1  # the event is consumed all the same
    assert after == before
    assert len(feeder.state.epochs) == 2


def test_rejoin_with_new_details_is_a_membership_change() -> None:
    feeder = cluster_of(2)
    moved = NodeInfo(node_id=make_node(1).node_id, address="127.0.0.2", port=7001, zone=1,
                     weight=32 << 28)
    result = feeder.join(moved)
    assert result.epoch_changed
    assert feeder.state.epoch == 3
    assert feeder.state.members[moved.node_id] == moved
    assert feeder.state.epoch_nodes(3) == [make_node(0), moved]


def test_leave_of_a_non_member_is_a_no_op() -> None:
    feeder = cluster_of(2)
    before = feeder.state.to_json()
    result = feeder.leave("127.0.0.1:9999/deadbeef", reason="dead")
    assert result == ApplyResult()
    assert feeder.state.epoch == 2 and len(feeder.state.epochs) == 2
    after = feeder.state.to_json()
    assert after.pop("seq") == before.pop("seq") + 1
    assert after == before


def test_zones_count_distinct_zones() -> None:
    feeder = Feeder()
    for number, zone in enumerate([5, 5, 7]):
        feeder.join(make_node(number, zone=zone))
    assert feeder.state.zones == 2


# --- format ---------------------------------------------------------------------


def test_format_sets_parameters_and_wipes() -> None:
    feeder = cluster_of(3)
    result = feeder.format(copies=2, object_size=8 * MiB)
    assert result.result is Result.SUCCESS
    assert result.wipe_store and not result.shutdown and not result.epoch_changed
    assert result.value == {"copies": 2, "object_size": 8 * MiB}
    state = feeder.state
    assert state.status is Status.OK
    assert (state.copies, state.object_size) == (2, 8 * MiB)
    assert state.format_time == float(state.seq)
    assert state.format_epoch == 3
    assert state.epoch == 3  # formatting is not a membership change


@pytest.mark.parametrize("copies", [0, -1, constants.copies_max + 1, None, "3", 2.0])
def test_format_refuses_bad_copies(copies: Any) -> None:
    feeder = cluster_of(constants.copies_max + 2)
    result = feeder.format(copies=copies)
    assert result.result is Result.INVALID_PARMS
    assert "copies" in result.message
    assert not result.wipe_store
    assert feeder.state.status is Status.WAIT_FOR_FORMAT
    assert (feeder.state.copies, feeder.state.object_size) == (0, 0)


@pytest.mark.parametrize("object_size", [
    0, -MiB, 3 * MiB, 4 * MiB + 4096, constants.object_size_min_bytes // 2,
    constants.object_size_max_bytes * 2, None, "4194304", float(4 * MiB)])
def test_format_refuses_bad_object_size(object_size: Any) -> None:
    feeder = cluster_of(3)
    result = feeder.format(copies=1, object_size=object_size)
    assert result.result is Result.INVALID_PARMS
    assert "object size" in result.message
    assert feeder.state.status is Status.WAIT_FOR_FORMAT


@pytest.mark.parametrize("object_size", [
    constants.object_size_min_bytes, constants.object_size_default_bytes,
    constants.object_size_max_bytes])
def test_format_accepts_object_sizes_at_the_limits(object_size: int) -> None:
    feeder = cluster_of(1)
    assert feeder.format(copies=1, object_size=object_size).result is Result.SUCCESS
    assert feeder.state.object_size == object_size


def test_format_refuses_more_copies_than_zones() -> None:
    feeder = Feeder()
    for number in range(4):
        feeder.join(make_node(number, zone=number % 2))
    result = feeder.format(copies=3)
    assert result.result is Result.TOO_FEW_ZONES
    assert "2 hosts" in result.message
    assert feeder.state.status is Status.WAIT_FOR_FORMAT
    assert feeder.format(copies=2).result is Result.SUCCESS


def test_format_with_no_members_has_too_few_zones() -> None:
    result = Feeder().format(copies=1)
    assert result.result is Result.TOO_FEW_ZONES
    assert "0 hosts" in result.message


def test_format_problem_reports_one_zone_in_the_singular() -> None:
    problem = format_problem(2, 4 * MiB, 1)
    assert problem is not None and problem[0] is Result.TOO_FEW_ZONES
    assert "1 host:" in problem[1]
    assert format_problem(1, 4 * MiB, 1) is None


def test_format_again_needs_force() -> None:
    feeder = cluster_of(3)
    assert feeder.format(copies=3).result is Result.SUCCESS
    result = feeder.format(copies=2, object_size=8 * MiB)
    assert result.result is Result.ALREADY_FORMATTED
    assert not result.wipe_store
    assert (feeder.state.copies, feeder.state.object_size) == (3, 4 * MiB)

    feeder.join(make_node(3))
    result = feeder.format(copies=2, object_size=8 * MiB, force=True)
    assert result.result is Result.SUCCESS and result.wipe_store
    state = feeder.state
    assert (state.copies, state.object_size, state.format_epoch) == (2, 8 * MiB, 4)
    assert state.format_time == float(state.seq)


def test_forced_format_with_bad_parameters_keeps_the_old_format() -> None:
    feeder = cluster_of(2)
    feeder.format(copies=2)
    result = feeder.format(copies=3, force=True)
    assert result.result is Result.TOO_FEW_ZONES and not result.wipe_store
    assert feeder.state.copies == 2


def test_format_survives_members_leaving() -> None:
    feeder = cluster_of(3)
    feeder.format(copies=3)
    feeder.leave(make_node(0).node_id, reason="dead")
    feeder.leave(make_node(1).node_id, reason="dead")
    assert feeder.state.status is Status.OK and feeder.state.copies == 3


# --- other ops ----------------------------------------------------------------------


def test_shutdown_is_an_effect_and_waits_for_the_last_epochs_nodes() -> None:
    feeder = cluster_of(2)
    feeder.format(copies=2)
    before = feeder.state.to_json()
    result = feeder.op({"type": "shutdown"})
    assert result.result is Result.SUCCESS and result.shutdown
    assert not result.wipe_store and not result.epoch_changed
    after = feeder.state.to_json()
    assert after.pop("seq") == before.pop("seq") + 1
    assert after.pop("status") == "shutdown" and before.pop("status") == "ok"
    assert after.pop("waiting_for") == sorted(feeder.state.members)
    before.pop("waiting_for")
    assert after == before


@pytest.mark.parametrize("body", [{"type": "frobnicate"}, {}, {"type": None}, {"type": 7}])
def test_unknown_op_is_a_result_not_an_exception(body: dict[str, Any]) -> None:
    feeder = cluster_of(1)
    before = feeder.state.to_json()
    result = feeder.op(body)
    assert result.result is Result.UNKNOWN_OP
    assert "unknown cluster op" in result.message
    assert not (result.wipe_store or result.shutdown or result.epoch_changed)
    assert feeder.state.seq == before["seq"] + 1
    # The machine carries on after it.
    assert feeder.format(copies=1).result is Result.SUCCESS


def test_event_replayed_or_out_of_order_trips_an_assertion() -> None:
    feeder = cluster_of(2)
    state = feeder.state
    with pytest.raises(AssertionError):
        state.apply(Event(seq=state.seq, kind=EventKind.JOIN, time=0.0, node=make_node(5)))
    with pytest.raises(AssertionError):
        state.apply(Event(seq=1, kind=EventKind.OP, time=0.0, body={"type": "shutdown"}))
    with pytest.raises(AssertionError):
        ClusterState().apply(Event(seq=0, kind=EventKind.OP, time=0.0, body={"type": "x"}))
    assert state.seq == 2 and state.nodes == [make_node(0), make_node(1)]


def test_seqs_may_skip() -> None:
    state = ClusterState()
    state.apply(Event(seq=10, kind=EventKind.JOIN, time=1.0, node=make_node(0)))
    state.apply(Event(seq=12, kind=EventKind.JOIN, time=2.0, node=make_node(1)))
    assert state.seq == 12 and state.epoch == 2


# --- persistence ----------------------------------------------------------------------


def test_event_json_round_trip() -> None:
    events = [
        Event(seq=1, kind=EventKind.JOIN, time=1.5, node=make_node(0)),
        Event(seq=2, kind=EventKind.LEAVE, time=2.5, node_id=make_node(0).node_id, reason="dead"),
        Event(seq=3, kind=EventKind.OP, time=3.25, node_id="n", op_id="n#1#ab",
              body={"type": "format", "copies": 1, "object_size": 4 * MiB}),
    ]
    for event in events:
        assert Event.from_json(json.loads(json.dumps(event.to_json()))) == event
    assert events[0].to_json() == {"seq": 1, "kind": "join", "time": 1.5,
                                   "node": make_node(0).to_json()}


def test_epoch_entry_json_round_trip() -> None:
    entry = EpochEntry(3, 1.25, [make_node(0), make_node(1)])
    assert EpochEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry


def test_state_json_round_trip_with_epochs() -> None:
    feeder = cluster_of(4)
    feeder.leave(make_node(2).node_id, reason="dead")
    feeder.format(copies=2, object_size=16 * MiB)
    feeder.join(make_node(7, zone=1))
    state = feeder.state
    loaded = reload(state)
    assert loaded.to_json() == state.to_json()
    assert [entry.to_json() for entry in loaded.epochs] == [e.to_json() for e in state.epochs]
    assert loaded.nodes == state.nodes
    assert loaded.status is Status.OK and loaded.format_epoch == 5
    for epoch in range(0, state.epoch + 2):
        assert loaded.epoch_nodes(epoch) == state.epoch_nodes(epoch)


def test_from_json_sorts_the_epoch_log() -> None:
    state = cluster_of(3).state
    epochs = [entry.to_json() for entry in reversed(state.epochs)]
    loaded = ClusterState.from_json(state.to_json(), epochs)
    assert [entry.epoch for entry in loaded.epochs] == [1, 2, 3]


def test_from_json_refuses_an_epoch_log_that_disagrees() -> None:
    state = cluster_of(3).state
    with pytest.raises(AssertionError):
        ClusterState.from_json(state.to_json(), [e.to_json() for e in state.epochs[:-1]])


def test_fresh_state_round_trip() -> None:
    state = ClusterState()
    assert reload(state).to_json() == state.to_json()


# --- determinism (hypothesis) --------------------------------------------------------

node_pool = [make_node(number, zone=number % 3) for number in range(6)]
# Same ids, other details: a rejoin after a restart on another port.
moved_pool = [NodeInfo(node_id=node.node_id, address="127.0.0.9", port=node.port + 100,
                       zone=node.zone, weight=32 << 28) for node in node_pool]

op_bodies = st.one_of(
    st.fixed_dictionaries({
        "type": st.just("format"),
        "copies": st.one_of(st.integers(-1, constants.copies_max + 1), st.none()),
        "object_size": st.sampled_from([0, MiB, 3 * MiB, 4 * MiB, 64 * MiB, 128 * MiB]),
        "force": st.booleans()}),
    st.just({"type": "shutdown"}),
    st.fixed_dictionaries({"type": st.sampled_from(["nonsense", "vdi_create"])}),
)

steps = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(node_pool + moved_pool)),
    st.tuples(st.just("leave"), st.sampled_from([node.node_id for node in node_pool] + ["x"]),
              st.sampled_from(["leave", "dead"])),
    st.tuples(st.just("op"), op_bodies),
)


@st.composite
def event_sequences(draw: st.DrawFn) -> list[Event]:
    events = []
    seq = 0
    time = 1_700_000_000.0
    step: Any
    for step in draw(st.lists(steps, max_size=40)):
        seq += draw(st.integers(1, 3))
        time += draw(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False))
        if step[0] == "join":
            events.append(Event(seq=seq, kind=EventKind.JOIN, time=time, node=step[1]))
        elif step[0] == "leave":
            events.append(Event(seq=seq, kind=EventKind.LEAVE, time=time, node_id=step[1],
                                reason=step[2]))
        else:
            events.append(Event(seq=seq, kind=EventKind.OP, time=time, op_id=f"op{seq}",
                                body=step[1]))
    return events


def run(state: ClusterState, events: list[Event]) -> list[ApplyResult]:
    results = []
    for event in events:
        results.append(state.apply(event))
        state._check()
    return results


def snapshot(state: ClusterState) -> tuple[Any, Any]:
    return state.to_json(), [entry.to_json() for entry in state.epochs]


@settings(max_examples=200, deadline=None)
@given(event_sequences())
def test_same_events_same_state(events: list[Event]) -> None:
    first, second = ClusterState(), ClusterState()
    first_results = run(first, events)
    # The second sheep sees the events as they come off the log: through JSON.
    second_results = run(second, [Event.from_json(json.loads(json.dumps(event.to_json())))
                                  for event in events])
    assert first_results == second_results
    assert json.dumps(snapshot(first)) == json.dumps(snapshot(second))


@settings(max_examples=200, deadline=None)
@given(event_sequences(), st.data())
def test_persist_and_reload_midway_changes_nothing(
        events: list[Event], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(events)))
    straight = ClusterState()
    straight_results = run(straight, events)

    restarted = ClusterState()
    results = run(restarted, events[:cut])
    restarted = reload(restarted)
    results += run(restarted, events[cut:])
    assert results == straight_results
    assert snapshot(restarted) == snapshot(straight)


@settings(max_examples=200, deadline=None)
@given(event_sequences())
def test_against_a_model(events: list[Event]) -> None:
    state = ClusterState()
    members: dict[str, NodeInfo] = {}
    changes = 0
    formatted: tuple[int, int] | None = None
    waiting: set[str] | None = None  # after a shutdown: the nodes the cluster waits for
    run_start: set[str] | None = None  # members before the current run of leaves
    for event in events:
        if event.kind is not EventKind.LEAVE:
            run_start = None
        result = state.apply(event)
        state._check()
        if event.kind is EventKind.JOIN:
            assert event.node is not None
            changed = members.get(event.node.node_id) != event.node
            members[event.node.node_id] = event.node
            if changed and waiting is not None and waiting <= set(members):
                waiting = None
        elif event.kind is EventKind.LEAVE:
            if event.node_id in members and run_start is None:
                run_start = set(members)
            changed = members.pop(event.node_id, None) is not None
            if changed and not members and formatted and waiting is None:
                waiting = run_start  # every sheep is gone: wait for the last ones
        else:
            changed = False
            body = event.body
            if body.get("type") == "format" and result.result is Result.SUCCESS:
                assert formatted is None or body["force"]
                formatted = (body["copies"], body["object_size"])
                waiting = None
            if body.get("type") == "shutdown" and formatted and waiting is None:
                waiting = set(members)
            if body.get("type") == "format" and result.result is Result.TOO_FEW_ZONES:
                assert body["copies"] > len({node.zone for node in members.values()})
        changes += changed
        assert result.epoch_changed == changed
        assert state.epoch == changes == len(state.epochs)
        assert state.nodes == sorted(members.values(), key=lambda node: node.node_id)
        assert state.epoch_nodes(state.epoch) == (state.nodes if changes else None)
        expected = Status.WAIT_FOR_FORMAT if not formatted else (
            Status.SHUTDOWN if waiting is not None else Status.OK)
        assert state.status is expected
        if formatted:
            assert (state.copies, state.object_size) == formatted


def test_after_a_shutdown_the_cluster_serves_once_every_node_is_back() -> None:
    feeder = cluster_of(3)
    feeder.format(copies=2)
    nodes = feeder.state.nodes
    feeder.op({"type": "shutdown"})
    for node in nodes:
        feeder.leave(node.node_id)
    assert feeder.state.status is Status.SHUTDOWN
    feeder.join(nodes[2])
    feeder.join(nodes[0])
    assert feeder.state.status is Status.SHUTDOWN
    assert nodes[1].node_id in feeder.state.waiting_message()
    assert feeder.op({"type": "vdi_create", "name": "a", "size": 1 << 20}).result \
        is Result.UNAVAILABLE
    feeder.join(nodes[1])
    assert feeder.state.status is Status.OK and feeder.state.waiting_for == []


def test_force_recover_gives_up_on_missing_nodes() -> None:
    feeder = cluster_of(2)
    feeder.format(copies=1)
    nodes = feeder.state.nodes
    assert feeder.op({"type": "force_recover"}).result is Result.INVALID_PARMS
    feeder.op({"type": "shutdown"})
    for node in nodes:
        feeder.leave(node.node_id)
    feeder.join(nodes[0])
    result = feeder.op({"type": "force_recover"})
    assert result.result is Result.SUCCESS
    assert result.value == {"given_up": [nodes[1].node_id], "lost": [nodes[1].node_id]}
    assert feeder.state.status is Status.OK
    assert feeder.state.lost == {nodes[1].node_id}


def test_force_recover_declares_missing_nodes_lost_until_they_join_again() -> None:
    """Objects whose newest copy may be on a node that is away wait for it
    (sheep/replicas.py: verdict); the operator gives up on it with the same op, for
    every missing node or the ones named, and a node that joins again is not lost."""
    feeder = cluster_of(4)
    feeder.format(copies=2)
    nodes = feeder.state.nodes
    feeder.leave(nodes[2].node_id, "dead")
    feeder.leave(nodes[3].node_id, "dead")
    assert feeder.state.missing() == [nodes[2].node_id, nodes[3].node_id]
    for bad in ({"nodes": "x"}, {"nodes": [nodes[0].node_id]}, {"nodes": ["nobody"]},
                {"nodes": [3]}):
        result = feeder.op({"type": "force_recover", **bad})
        assert result.result is Result.INVALID_PARMS and not feeder.state.lost, bad
    result = feeder.op({"type": "force_recover", "nodes": [nodes[3].node_id]})
    assert result.value == {"given_up": [], "lost": [nodes[3].node_id]}
    assert feeder.state.lost == {nodes[3].node_id}
    assert reload(feeder.state).lost == {nodes[3].node_id}
    assert feeder.state.missing() == [nodes[2].node_id]
    result = feeder.op({"type": "force_recover"})
    assert result.value == {"given_up": [], "lost": [nodes[2].node_id]}
    assert feeder.op({"type": "force_recover"}).result is Result.INVALID_PARMS  # none left
    feeder.join(nodes[3])
    assert feeder.state.lost == {nodes[2].node_id} and feeder.state.missing() == []


def test_force_recover_takes_a_bounded_list_and_names_a_few_unknown_ids() -> None:
    feeder = cluster_of(2)
    feeder.format(copies=2)
    feeder.leave(feeder.state.nodes[1].node_id, "dead")
    too_many = [f"node{number}" for number in range(constants.node_ids_per_cluster_max + 1)]
    result = feeder.op({"type": "force_recover", "nodes": too_many})
    assert result.result is Result.INVALID_PARMS
    assert f"at most {constants.node_ids_per_cluster_max}" in result.message
    result = feeder.op({"type": "force_recover", "nodes": ["x" * 10_000] * 9})
    assert result.result is Result.INVALID_PARMS and "and 4 more" in result.message
    assert len(result.message) < 600 and not feeder.state.lost


def test_when_every_sheep_dies_the_restart_waits_for_the_last_members() -> None:
    feeder = cluster_of(3)
    feeder.format(copies=2)
    nodes = feeder.state.nodes
    feeder.leave(nodes[0].node_id, "dead")  # seen dead by the others: they go on
    assert feeder.state.status is Status.OK
    feeder.op({"type": "vdi_create", "name": "a", "size": 1 << 20})
    # The last two die together; the first to come back logs their leaves, then joins.
    feeder.leave(nodes[1].node_id, "dead")
    feeder.leave(nodes[2].node_id, "dead")
    assert feeder.state.status is Status.SHUTDOWN
    assert feeder.state.waiting_for == [nodes[1].node_id, nodes[2].node_id]
    feeder.join(nodes[0])
    assert feeder.state.status is Status.SHUTDOWN  # node 0 missed writes: not enough
    feeder.join(nodes[2])
    assert feeder.state.status is Status.SHUTDOWN
    feeder.join(nodes[1])
    assert feeder.state.status is Status.OK
    assert reload(feeder.state).to_json() == feeder.state.to_json()


def test_a_lone_sheep_that_dies_serves_again_when_it_returns() -> None:
    feeder = cluster_of(1)
    feeder.format(copies=1)
    node = feeder.state.nodes[0]
    feeder.leave(node.node_id, "dead")
    assert feeder.state.waiting_for == [node.node_id]
    feeder.join(node)
    assert feeder.state.status is Status.OK


def test_recovery_rate_is_a_cluster_setting() -> None:
    feeder = cluster_of(2)
    assert feeder.op({"type": "recovery", "max_rate": 100 << 20}).value == {"max_rate": 100 << 20}
    assert feeder.state.recovery_max_rate == 100 << 20
    assert reload(feeder.state).recovery_max_rate == 100 << 20
    for bad in (-1, "100M", None, True, 1.5):
        result = feeder.op({"type": "recovery", "max_rate": bad})
        assert result.result is Result.INVALID_PARMS and "max_rate" in result.message
    assert feeder.state.recovery_max_rate == 100 << 20


def test_reweight_to_zero_drains_a_node_in_a_new_epoch() -> None:
    feeder = cluster_of(4)
    feeder.format(copies=3)
    node = feeder.state.nodes[3]
    epoch = feeder.state.epoch
    result = feeder.op({"type": "reweight", "node_id": node.node_id, "weight": 0})
    assert result.result is Result.SUCCESS and result.epoch_changed
    assert feeder.state.epoch == epoch + 1
    assert feeder.state.members[node.node_id].weight == 0
    assert feeder.state.zones == 3  # a node without weight holds no copies
    again = feeder.op({"type": "reweight", "node_id": node.node_id, "weight": 0})
    assert again.result is Result.SUCCESS and not again.epoch_changed
    # A second drain would leave 2 zones for 3 copies: refused, nothing changes.
    other = feeder.state.nodes[0]
    refused = feeder.op({"type": "reweight", "node_id": other.node_id, "weight": 0})
    assert refused.result is Result.TOO_FEW_ZONES and "fewer than the 3 copies" in refused.message
    assert feeder.state.members[other.node_id].weight == 16 << 28
    assert feeder.state.epoch == epoch + 1


def test_a_weight_set_by_reweight_outlives_a_restart_until_reset() -> None:
    feeder = cluster_of(3)
    feeder.format(copies=2)
    node = feeder.state.nodes[1]
    result = feeder.op({"type": "reweight", "node_id": node.node_id, "weight": 7 << 40})
    assert result.result is Result.SUCCESS and result.epoch_changed
    assert result.value == {"node_id": node.node_id, "weight": 7 << 40, "before": 16 << 28}
    # The node restarts (it leaves and joins with the weight it started with): the
    # weight set by the operator stays, in the state and in a reloaded state.
    feeder.leave(node.node_id)
    feeder.join(node)
    assert feeder.state.members[node.node_id].weight == 7 << 40
    assert reload(feeder.state).weights == {node.node_id: 7 << 40}
    # None: back to the weight the node started with, and forgotten.
    reset = feeder.op({"type": "reweight", "node_id": node.node_id, "weight": None})
    assert reset.result is Result.SUCCESS and reset.value["weight"] == 16 << 28
    assert feeder.state.members[node.node_id].weight == 16 << 28
    assert feeder.state.weights == {}


@pytest.mark.parametrize("body", [
    {"node_id": "nobody", "weight": 0},
    {"node_id": "127.0.0.1:7000/00000000", "weight": -1},
    {"node_id": "127.0.0.1:7000/00000000", "weight": constants.weight_max_bytes + 1},
    {"node_id": "127.0.0.1:7000/00000000", "weight": "0"},
    {"node_id": "127.0.0.1:7000/00000000", "vnodes": 0},  # an older dog's drain
])
def test_reweight_refuses_bad_input(body: dict[str, Any]) -> None:
    feeder = cluster_of(2)
    result = feeder.op({"type": "reweight", **body})
    assert result.result is Result.INVALID_PARMS and not result.epoch_changed


def test_vdi_copies_count_for_drains_too() -> None:
    feeder = cluster_of(3)
    feeder.format(copies=1)
    assert feeder.op({"type": "vdi_create", "name": "a", "size": 1 << 20,
                      "copies": 3}).result is Result.SUCCESS
    node = feeder.state.nodes[0]
    result = feeder.op({"type": "reweight", "node_id": node.node_id, "weight": 0})
    assert result.result is Result.TOO_FEW_ZONES
