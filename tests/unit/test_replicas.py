"""Replica truth (sheep/replicas.py) against simple models: the newest copy is the
maximum of an explicitly written key over a brute-force list, whatever the order
the holders answered in; stale and good copies split the placement; a surplus copy
goes only when every holder has a verified, durable copy at least as new; copy
health follows its events and keeps its invariants."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheep.errors import BadRequest, NetworkError, NoObject
from sheep.replicas import (
    Answer,
    Copy,
    CopyHealth,
    CopyStatus,
    Verdict,
    keeps_own,
    may_drop_surplus,
    newest,
    rank,
    stale,
    stale_holders,
    superseded,
    verdict,
    vouches,
    waits_for_sync,
)

# Few distinct versions and digests, so that ties (the interesting cases) are common.
versions = st.integers(min_value=0, max_value=4)
digests = st.one_of(st.none(), st.integers(min_value=0, max_value=2))

statuses = st.builds(
    CopyStatus, version=versions, deleted=st.booleans(), missing=st.booleans(),
    doubtful=st.booleans(), unverified=st.booleans(), damaged=st.booleans(), durable=st.booleans(),
    synced=st.booleans(), digest=digests, since=st.one_of(st.none(), st.integers(0, 9)),
    size=st.one_of(st.none(), st.integers(0, 2**22)),
    allocated=st.one_of(st.none(), st.integers(0, 2**22)))
answers: st.SearchStrategy[Answer] = st.one_of(
    statuses, statuses, statuses, st.none(), st.just(NetworkError("unreachable")))


@st.composite
def holders(draw: Any, min_size: int = 0) -> list[tuple[str, Answer]]:
    found = draw(st.lists(answers, min_size=min_size, max_size=6))
    return [(f"node{index}", answer) for index, answer in enumerate(found)]


# --- the models ------------------------------------------------------------------


def model_key(status: CopyStatus) -> tuple[Any, ...]:
    """Written out on its own: version, then a present copy over a tombstone, one not
    in doubt over one in doubt, a verified copy over an unverified one, a durable
    over a fresh one, then the digest (a known one over none, then the higher)."""
    return (status.version, 0 if status.deleted else 1, 0 if status.doubtful else 1,
            0 if status.unverified else 1, 1 if status.durable else 0,
            -1 if status.digest is None else status.digest)


def model_newest(pairs: list[tuple[str, Answer]], verified_only: bool) -> tuple[str, CopyStatus] | None:
    eligible = [(node, answer) for node, answer in pairs if isinstance(answer, CopyStatus)
                and not answer.missing and not (verified_only and answer.unverified)]
    if not eligible:
        return None
    top = max(model_key(status) for _, status in eligible)
    return next((node, status) for node, status in eligible if model_key(status) == top)


def legacy_key(status: CopyStatus) -> tuple[int, bool, bool]:
    """The order newest_copy (gateway.py) used before: the new one refines it."""
    return (status.version, not status.deleted, not status.unverified)


def model_verifier_stale(mine: CopyStatus, best: Copy[str] | None) -> bool:
    """Verifier.verify's rule as it was written before, for an undamaged copy, plus:
    an unverified copy as new that ranks higher (the one reads take) wins too, and a
    copy in doubt gives way to a verified one as new."""
    return best is not None and (best.version > mine.version or (
        best.version == mine.version and not best.removed and not best.status.unverified
        and (mine.doubtful or best.status.digest not in (None, mine.digest))) or (
        best.version == mine.version and not best.removed and best.status.unverified
        and rank(best.status) > rank(mine)))


# --- newest ----------------------------------------------------------------------


@given(holders(), st.booleans())
def test_newest_is_the_maximum_of_the_model_key(pairs: list[tuple[str, Answer]],
                                                verified_only: bool) -> None:
    found = newest(pairs, verified_only)
    expected = model_newest(pairs, verified_only)
    if expected is None:
        assert found is None
    else:
        assert found is not None and (found.node, found.status) == expected


@given(holders(), st.booleans(), st.randoms(use_true_random=False))
def test_newest_does_not_depend_on_the_order_of_answers(
        pairs: list[tuple[str, Answer]], verified_only: bool, random: Any) -> None:
    shuffled = list(pairs)
    random.shuffle(shuffled)
    first, second = newest(pairs, verified_only), newest(shuffled, verified_only)
    assert (first is None) == (second is None)
    if first is not None and second is not None:
        # Copies that rank equal have the same version, state and contents.
        assert model_key(first.status) == model_key(second.status)


@given(holders(), st.booleans())
def test_newest_refines_the_old_rule(pairs: list[tuple[str, Answer]], verified_only: bool) -> None:
    found = newest(pairs, verified_only)
    eligible = [a for _, a in pairs if isinstance(a, CopyStatus) and not a.missing
                and not (verified_only and a.unverified)]
    if found is not None and not any(a.doubtful for a in eligible):
        assert legacy_key(found.status) == max(map(legacy_key, eligible))
    elif found is not None:  # doubt (added since) ranks before verification
        assert legacy_key(found.status)[:2] == max(legacy_key(a)[:2] for a in eligible)


@given(holders(), st.booleans())
def test_verified_only_never_picks_an_unverified_or_lost_copy(
        pairs: list[tuple[str, Answer]], verified_only: bool) -> None:
    found = newest(pairs, verified_only)
    if found is not None:
        assert not found.status.missing
        assert not (verified_only and found.status.unverified)
        assert (found.node, found.status) in pairs


@given(holders(), versions, st.booleans())
def test_a_tombstone_newer_than_every_copy_wins(pairs: list[tuple[str, Answer]], extra: int,
                                                verified_only: bool) -> None:
    top = max([a.version for _, a in pairs if isinstance(a, CopyStatus)], default=0)
    tombstone = CopyStatus(version=top + 1 + extra, deleted=True)
    found = newest([*pairs, ("removed", tombstone)], verified_only)
    assert found is not None and found.node == "removed" and found.removed


def test_at_an_equal_version_a_copy_beats_a_tombstone_and_verified_beats_unverified() -> None:
    tombstone = CopyStatus(version=5, deleted=True)
    unverified = CopyStatus(version=5, unverified=True, digest=1)
    good = CopyStatus(version=5, digest=1)
    assert newest([("a", tombstone), ("b", unverified)], False) == Copy("b", unverified)
    assert newest([("b", unverified), ("c", good)], False) == Copy("c", good)
    assert newest([("a", tombstone), ("b", unverified)], True) == Copy("a", tombstone)
    fresh = CopyStatus(version=5, durable=False, digest=2)
    assert newest([("d", fresh), ("c", good)], True) == Copy("c", good)
    higher_digest = CopyStatus(version=5, digest=2)
    assert newest([("e", higher_digest), ("c", good)], True) == Copy("e", higher_digest)
    assert newest([("a", None), ("b", NoObject()), ("c", CopyStatus(9, missing=True))],
                  False) is None


# --- stale and good copies -----------------------------------------------------------


@given(holders(min_size=1), holders(), st.booleans())
def test_stale_and_good_split_the_placement(placement: list[tuple[str, Answer]],
                                            others: list[tuple[str, Answer]],
                                            compare_digests: bool) -> None:
    best = newest(placement, True) or newest(
        [(f"other{node}", a) for node, a in others], True)
    if best is None or best.removed:
        return
    repair = stale_holders(placement, best.status, compare_digests)
    good = [node for node, _ in placement if node not in repair]
    assert sorted(repair + good) == sorted(node for node, _ in placement)
    for node, answer in placement:
        if node in good:  # a whole verified copy as new as the newest, same contents,
            # or an unverified one that is the newest's twin (its verifier keeps it)
            assert isinstance(answer, CopyStatus) and answer.whole
            if answer.unverified:
                assert not answer.damaged and not answer.doubtful
                assert (answer.version, answer.digest) == (best.version, best.status.digest)
                assert answer.digest is not None
                assert not superseded(answer, best)
            assert answer.version >= best.version
            if compare_digests and None not in (answer.digest, best.status.digest):
                assert answer.digest == best.status.digest
        else:
            assert stale(answer, best.status, compare_digests)


@given(holders(min_size=1), st.booleans())
def test_the_newest_copy_itself_is_never_stale(placement: list[tuple[str, Answer]],
                                               compare_digests: bool) -> None:
    best = newest(placement, verified_only=True)
    if best is not None and best.status.whole:
        assert best.node not in stale_holders(placement, best.status, compare_digests)


def test_an_unverified_twin_of_the_newest_copy_is_not_repaired() -> None:
    """Right after a restart every copy is unverified: a check then must not copy the
    newest copy over its own twin (same version and digest), only over copies that
    differ, are damaged, in doubt or older."""
    best = CopyStatus(version=7, digest=1)
    twin = CopyStatus(version=7, digest=1, unverified=True)
    assert not stale(twin, best, compare_digests=False)
    for other in (CopyStatus(version=7, digest=2, unverified=True),
                  CopyStatus(version=7, digest=None, unverified=True),
                  CopyStatus(version=6, digest=1, unverified=True),
                  CopyStatus(version=7, digest=1, unverified=True, damaged=True),
                  CopyStatus(version=7, digest=1, unverified=True, doubtful=True)):
        assert stale(other, best, compare_digests=False), other


def test_a_copy_in_doubt_gives_way_to_one_as_new_that_is_not() -> None:
    """A power loss took back a write on one holder whose intent promised its version:
    that copy claims the version without the data. Another holder has the data at
    the same version, and both are suspect (it was declared dead meanwhile): the one
    not in doubt wins on both sides, whatever the digests (simulator seed 14)."""
    torn = CopyStatus(version=7, digest=2, unverified=True, doubtful=True)
    whole = CopyStatus(version=7, digest=1, unverified=True)
    assert newest([("a", torn), ("b", whole)], False) == Copy("b", whole)
    assert newest([("b", whole), ("a", torn)], False) == Copy("b", whole)
    assert superseded(torn, Copy("b", whole))
    assert not superseded(whole, Copy("a", torn))
    # Verified, without digests to compare: the copy in doubt still gives way.
    assert superseded(CopyStatus(version=7, unverified=True, doubtful=True),
                      Copy("b", CopyStatus(version=7)))
    # Newer wins over older whatever the doubt.
    newer = newest([("a", CopyStatus(version=8, doubtful=True)), ("b", whole)], False)
    assert newer is not None and newer.node == "a"
    # Placement checks: a copy in doubt is stale beside one that is not; it never
    # lets a surplus copy go.
    assert stale(CopyStatus(version=7, digest=1, doubtful=True), CopyStatus(version=7), False)
    assert not may_drop_surplus(7, [CopyStatus(version=7, doubtful=True)])


def test_digests_are_compared_only_when_asked_and_both_known() -> None:
    source = CopyStatus(version=3, digest=7)
    assert not stale(CopyStatus(version=3, digest=8), source, compare_digests=False)
    assert stale(CopyStatus(version=3, digest=8), source, compare_digests=True)
    assert not stale(CopyStatus(version=3), source, compare_digests=True)
    assert not stale(CopyStatus(version=3, digest=8), CopyStatus(version=3), True)
    assert stale(CopyStatus(version=2, digest=7), source, compare_digests=False)
    assert stale(CopyStatus(version=3, digest=7, unverified=True, damaged=True), source, False)
    assert stale(CopyStatus(version=4, deleted=True), source, False)


# --- the verifier's rule -----------------------------------------------------------------


@given(versions, digests, st.booleans(), holders())
def test_superseded_keeps_the_verifiers_old_rule_for_undamaged_copies(
        version: int, digest: int | None, doubtful: bool,
        others: list[tuple[str, Answer]]) -> None:
    mine = CopyStatus(version=version, digest=digest, unverified=True, doubtful=doubtful)
    best = newest(others, verified_only=False)
    assert superseded(mine, best) == model_verifier_stale(mine, best)


@given(versions, digests, statuses)
def test_a_damaged_copy_gives_way_to_a_verified_copy_as_new(
        version: int, digest: int | None, other: CopyStatus) -> None:
    mine = CopyStatus(version=version, digest=digest, unverified=True, damaged=True)
    expected = other.version > version or (other.version == version and not other.deleted)
    assert superseded(mine, Copy("other", other)) == expected
    assert not superseded(mine, None)


def test_a_copy_in_doubt_waits_for_a_holder_away_unless_a_verified_copy_vouches() -> None:
    """Simulator seed 111: a power loss took an acknowledged, unflushed write from one
    holder (its copy comes back in doubt at the version the write promised); the other
    holder, cut off and declared dead, kept it. With no member holding the object,
    keeping the torn copy (and writing on) lost the write for good when the other came
    back. While a node placed since the copy's epoch is away, the copy waits."""
    torn = CopyStatus(version=7, digest=2, unverified=True, doubtful=True, since=3)
    assert verdict(torn, None, holders_away=True) is Verdict.WAIT
    assert verdict(torn, None, holders_away=False) is Verdict.KEEP  # nobody else ever had it
    # An older verified copy, or a newer unverified one, vouches for nothing.
    older = Copy("b", CopyStatus(version=6, digest=1))
    assert verdict(torn, older, holders_away=True) is Verdict.WAIT
    assert verdict(torn, older, holders_away=False) is Verdict.KEEP
    newer_unverified = Copy("b", CopyStatus(version=8, digest=1, unverified=True, since=2))
    assert verdict(torn, newer_unverified, holders_away=True) is Verdict.WAIT
    assert verdict(torn, newer_unverified, holders_away=False) is Verdict.REPLACE
    # A verified copy at least as new settles it, whoever is away.
    for best in (Copy("b", CopyStatus(version=7, digest=1)), Copy("b", CopyStatus(version=9))):
        assert vouches(best, torn.version)
        assert verdict(torn, best, holders_away=True) is Verdict.REPLACE
    whole = CopyStatus(version=7, digest=1, unverified=True, since=3)
    assert verdict(whole, Copy("b", CopyStatus(version=7, digest=1)), True) is Verdict.KEEP
    # Not an unverified copy, nor one in doubt (a partial copy), nor a removal older.
    assert not vouches(Copy("b", CopyStatus(version=7, unverified=True)), 7)
    assert not vouches(Copy("b", CopyStatus(version=7, doubtful=True)), 7)
    assert not vouches(Copy("b", CopyStatus(version=6, deleted=True)), 7)
    assert vouches(Copy("b", CopyStatus(version=8, deleted=True)), 7)
    assert not vouches(None, 0)


@given(versions, digests, st.booleans(), st.booleans(), holders(), st.booleans())
def test_the_verdict_is_the_old_rule_unless_a_holder_away_may_hold_newer(
        version: int, digest: int | None, doubtful: bool, damaged: bool,
        others: list[tuple[str, Answer]], away: bool) -> None:
    """Nobody away (or a verified copy as new among the members): superseded() decides,
    as before. Someone away and no such copy: nothing is decided."""
    mine = CopyStatus(version=version, digest=digest, unverified=True, doubtful=doubtful,
                      damaged=damaged, since=0)
    best = newest(others, verified_only=False)
    decided = Verdict.REPLACE if superseded(mine, best) else Verdict.KEEP
    if not away or (best is not None and not best.status.unverified
                    and not best.status.doubtful and best.version >= version):
        assert verdict(mine, best, away) is decided
    else:
        assert verdict(mine, best, away) is Verdict.WAIT
    if verdict(mine, best, away) is not Verdict.WAIT and away:
        assert vouches(best, version)


# --- surplus removal ---------------------------------------------------------------------


def model_holds(mine: int, answer: Answer) -> bool:
    return (isinstance(answer, CopyStatus) and not answer.unverified and not answer.missing
            and not answer.doubtful
            and (answer.durable or answer.deleted) and answer.version >= mine)


@given(versions, st.lists(answers, max_size=5))
def test_a_surplus_copy_goes_only_when_every_holder_has_one_as_new(
        mine: int, placement: list[Answer]) -> None:
    allowed = may_drop_surplus(mine, placement)
    assert allowed == (bool(placement) and all(model_holds(mine, a) for a in placement))
    if allowed:  # never while some holder lacks it, is unverified, older or fresh
        for answer in placement:
            assert isinstance(answer, CopyStatus)
            assert not answer.missing and not answer.unverified
            assert answer.version >= mine and (answer.durable or answer.deleted)


@given(versions, st.lists(answers, min_size=1, max_size=4), st.sampled_from(
    [None, NetworkError("cut"), CopyStatus(0), CopyStatus(9, unverified=True),
     CopyStatus(9, missing=True), CopyStatus(9, durable=False)]))
def test_one_bad_holder_keeps_the_surplus_copy(mine: int, placement: list[Answer],
                                               bad: Answer) -> None:
    if isinstance(bad, CopyStatus) and bad.version == 0:
        bad = CopyStatus(version=mine - 1) if mine else CopyStatus(0, unverified=True)
    assert not may_drop_surplus(mine, [*placement, bad])
    assert not may_drop_surplus(mine, [])


# --- recovery copies arriving at a verified copy --------------------------------------------


@given(versions, versions, st.booleans())
def test_a_copy_made_from_a_source_never_replaces_a_newer_one(current: int, source: int,
                                                              repair: bool) -> None:
    kept = keeps_own(current, source, repair)
    assert kept == (current > source or (current == source and not repair))


# --- the wire form ----------------------------------------------------------------------


@given(statuses)
def test_a_status_survives_the_wire(status: CopyStatus) -> None:
    assert CopyStatus.from_json(status.to_json()) == status


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**65) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=9), inner,
                                                                max_size=4), max_leaves=8)


@given(st.one_of(json_values, st.fixed_dictionaries(
    {"version": st.integers(-1, 2**65) | st.booleans()},
    optional={name: json_values for name in ("deleted", "unverified", "durable", "digest",
                                             "since", "size")})))
def test_a_malformed_reply_is_an_error_never_a_crash(value: Any) -> None:
    try:
        status = CopyStatus.from_json(value)
    except BadRequest:
        return
    assert 0 <= status.version < 2**64 and isinstance(status.deleted, bool)


def test_the_stores_stat_parses() -> None:
    status = CopyStatus.from_json({"oid": 5, "version": 3, "size": 4096, "allocated": 4096,
                                   "synced": False, "durable": True, "digest": 12})
    assert status == CopyStatus(version=3, synced=False, digest=12, size=4096, allocated=4096)
    assert CopyStatus.from_json({"oid": 5, "version": 3, "deleted": True}).deleted
    with pytest.raises(BadRequest):
        CopyStatus.from_json({"version": "3"})
    with pytest.raises(BadRequest):
        CopyStatus.from_json({"version": 3, "unverified": 1})


# --- copy health ------------------------------------------------------------------------

oids = st.integers(min_value=0, max_value=5)
epochs = st.integers(min_value=0, max_value=6)
events = st.one_of(
    st.tuples(st.just("start_unverified"),
              st.tuples(st.lists(oids, max_size=4), epochs, st.dictionaries(oids, epochs))),
    st.tuples(st.sampled_from(["verified", "replaced", "forget"]), oids),
    st.tuples(st.sampled_from(["found_damaged", "change_failed"]), st.tuples(oids, epochs)),
    st.tuples(st.just("suspect"), st.tuples(st.lists(oids, max_size=3), epochs)),
    st.tuples(st.just("scrubbed"), st.tuples(oids, st.booleans(), epochs)))


class HealthModel:
    def __init__(self) -> None:
        self.unverified: set[int] = set()
        self.damaged: set[int] = set()
        self.repaired = 0
        self.scrubbed = 0
        # Every unverified copy's epoch from which it may lack changes: the earliest of
        # those it was made unverified with since it was last verified.
        self.since: dict[int, int] = {}

    def unverify(self, oid: int, since: int) -> None:
        self.since[oid] = min(since, self.since.get(oid, since))
        self.unverified.add(oid)

    def settle(self, oid: int) -> None:
        self.unverified.discard(oid)
        self.since.pop(oid, None)


def apply(health: CopyHealth, model: HealthModel, event: str, arg: Any) -> Any:
    if event == "start_unverified":
        held, since, earlier = arg
        before = dict(model.since)
        model.unverified = set(held) | model.damaged
        model.since = {oid: min([since] + [e for e in (before.get(oid), earlier.get(oid))
                                            if e is not None])
                       for oid in model.unverified}
        return health.start_unverified(held, since, earlier)
    if event == "suspect":
        for oid in arg[0]:
            model.unverify(oid, arg[1])
        return health.suspect(*arg)
    if event == "change_failed":
        model.unverify(*arg)
        return health.change_failed(arg[0], 0.0, arg[1])
    if event == "verified":
        if arg in model.damaged:
            with pytest.raises(AssertionError):
                health.verified(arg)
            return None
        model.settle(arg)
        return health.verified(arg)
    if event == "found_damaged":
        oid, since = arg
        new = oid not in model.damaged
        model.damaged.add(oid)
        model.unverify(oid, since)
        assert health.found_damaged(oid, since) == new
        return None
    if event == "scrubbed":
        oid, bad, since = arg
        model.scrubbed += 1
        new = bad and oid not in model.damaged
        if bad:
            model.damaged.add(oid)
            model.unverify(oid, since)
        assert health.scrubbed(oid, bad, since) == new
        return None
    if event == "replaced":
        was = arg in model.damaged
        model.repaired += was
        model.damaged.discard(arg)
        model.settle(arg)
        assert health.replaced(arg) == was
        return None
    assert event == "forget"
    model.damaged.discard(arg)
    model.settle(arg)
    return health.forget(arg)


@given(st.lists(events, max_size=30))
def test_copy_health_follows_its_events(script: list[tuple[str, Any]]) -> None:
    health, model = CopyHealth(), HealthModel()
    for event, arg in script:
        apply(health, model, event, arg)
        health._check()
        assert health.unverified_oids() == sorted(model.unverified)
        assert health.unverified_count == len(model.unverified)
        assert health.damaged_count == len(model.damaged)
        assert all(health.is_damaged(oid) == (oid in model.damaged) for oid in range(6))
        assert all(health.is_unverified(oid) == (oid in model.unverified) for oid in range(6))
        assert {oid: health.since(oid) for oid in model.unverified} == model.since
        assert health.oldest_since() == min(model.since.values(), default=None)
        assert health.repaired == model.repaired
        assert health.scrubbed_count == model.scrubbed


def test_a_damaged_copy_stays_unverified_until_replaced() -> None:
    health = CopyHealth()
    health.start_unverified([1, 2], 3)
    health.verified(1)
    assert health.found_damaged(1, 4) and not health.found_damaged(1, 5)
    assert health.is_unverified(1) and health.is_damaged(1)
    health.start_unverified([2], 6)  # declared dead: the damaged copy stays suspect
    assert health.unverified_oids() == [1, 2]
    assert health.replaced(1) and health.repaired == 1
    assert not health.is_unverified(1) and not health.replaced(1)
    health.forget(2)
    assert health.unverified_count == 0 and health.damaged_count == 0


def test_behind_names_only_verified_holders_older_than_the_surplus_copy():
    from sheep.replicas import behind

    assert behind(5, [CopyStatus(version=4), CopyStatus(version=5)])
    assert behind(5, [CopyStatus(version=3, deleted=True)])  # an older removal
    assert not behind(5, [CopyStatus(version=5), CopyStatus(version=6)])
    # Verification settles an unverified copy, and a lost file is damage, repaired apart.
    assert not behind(5, [CopyStatus(version=4, unverified=True),
                          CopyStatus(version=4, missing=True), NetworkError("no answer")])
    # No copy at all: its recovery pass may have listed the others before a write of the
    # epoch before made the object there; nothing else would bring it one.
    assert behind(5, [None, CopyStatus(version=5)])


def test_recovery_waits_only_for_copies_that_may_yet_be_verified() -> None:
    """A holder whose copy is unverified (back from a restart, or waiting for a node
    away) may soon have the copy recovery wants; a damaged or lost one never will."""
    from sheep.replicas import verifiable

    assert verifiable([None, CopyStatus(version=3, unverified=True)])
    assert verifiable([CopyStatus(version=3, deleted=True, unverified=True)])
    assert not verifiable([None, NetworkError("no answer"), CopyStatus(version=3)])
    assert not verifiable([CopyStatus(version=3, unverified=True, damaged=True),
                           CopyStatus(version=3, unverified=True, missing=True)])


def test_a_surplus_drop_waiting_only_for_a_sync_names_the_holders_to_sync():
    """Recovery or verification just made the holders' copies: verified and as new, but
    not durable until their next writeback. Those are synced at once (a surplus copy
    waited 30 s for the writeback before)."""
    fresh = CopyStatus(version=7, durable=False)
    assert not may_drop_surplus(7, [CopyStatus(version=7), fresh])
    assert waits_for_sync(7, [CopyStatus(version=7), fresh]) == [1]
    assert waits_for_sync(7, [CopyStatus(version=7), CopyStatus(version=8)]) == []
    # Anything else wrong with a holder: a sync would not make the drop safe.
    for other in (CopyStatus(version=6, durable=False), CopyStatus(version=7, unverified=True),
                  CopyStatus(version=7, doubtful=True), None):
        assert waits_for_sync(7, [other, fresh]) == []
