"""Replica truth: which copy of an object is newest, which copies are stale, which
surplus copy may go, and the health of this sheep's own copies.

Every holder answers STAT_PEER with the state of its copy. CopyStatus is that
answer parsed and checked where it arrives (Gateway.stats), so a malformed reply
is an error in that holder's place and nothing past the boundary reads untyped
dicts. The rules that compare copies live here and nowhere else: reads, the
verifier, recovery, `dog cluster check`, scrub repair and surplus removal all
ask this module, so they cannot drift apart. Pure: no I/O, no clock, no asyncio.

The newest copy is the one with the highest version. At an equal version a
present copy beats a tombstone (a removal always bumps the version, so a
"tombstone" at the copies' own version is a file lost from a store), then a
copy not in doubt beats one in doubt (recovered after a crash at the version a
change promised, whose writes may not all have landed: sheep/store/store.py),
then a verified copy beats an unverified one, a durable one a fresh one, and
last the digest decides: which copy wins does not depend on the order holders
answered in.

Members can only compare the copies they hold. An unverified copy may lack changes
made since an epoch of its own (its ``since``: it was away from then, or a power
loss took its unsynced writes made from then); a node that the placement named in
any epoch since then and that is not a member now (nor declared lost) may hold the
only copy with those changes. Unless a member's verified copy at least as new
vouches for the answer, nothing is decided about such a copy while that node is
away (verdict, vouches): the object waits, as Ceph's "down" placement groups do.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sheep.errors import BadRequest

N = TypeVar("N")  # a holder: NodeInfo in the daemon, anything in tests

oid_limit = 2**64  # object ids and versions are 64-bit on the wire and in the store
version_limit = 2**64
digest_limit = 2**64
epoch_limit = 2**63

_flags = ("deleted", "missing", "doubtful", "unverified", "damaged", "durable", "synced")
_sizes = ("size", "allocated")


@dataclass(frozen=True, slots=True)
class CopyStatus:
    """One holder's copy as its STAT_PEER describes it."""

    version: int
    deleted: bool = False  # a removal's tombstone
    missing: bool = False  # the metadata says the copy is here, its file is gone
    # Recovered after a crash at a version a change promised: its writes may not all
    # have landed, so its contents may be older than its version says.
    doubtful: bool = False
    unverified: bool = False  # not compared with the other replicas yet (sheep/recovery.py)
    damaged: bool = False  # a read or a scrub met damage; waits for a good copy
    # Synced at least once since it was made: a power loss can take back its latest
    # writes, never the copy itself. Tombstones and lost files do not say: durable.
    durable: bool = True
    synced: bool = True  # no change waits for a sync
    digest: int | None = None  # of the checksum table: equal contents, equal digests
    # An unverified copy's epoch from which it may lack changes (CopyHealth.since): the
    # nodes placed since then may hold newer copies.
    since: int | None = None
    size: int | None = None
    allocated: int | None = None

    @classmethod
    def from_json(cls, value: Any) -> CopyStatus:
        """Parse a STAT reply; a malformed one raises BadRequest (the holder's error)."""
        reason = _invalid(value)
        if reason is not None:
            raise BadRequest(f"malformed copy status: {reason}")
        known = {name: value[name] for name in (*_flags, "digest", "since", *_sizes)
                 if name in value}
        return cls(version=value["version"], **known)

    def to_json(self) -> dict[str, Any]:
        """The wire form: flags only when they differ from the default."""
        value: dict[str, Any] = {"version": self.version}
        for name in _flags:
            default = name in ("durable", "synced")
            if getattr(self, name) is not default:
                value[name] = getattr(self, name)
        for name in ("digest", "since", *_sizes):
            if getattr(self, name) is not None:
                value[name] = getattr(self, name)
        return value

    @property
    def whole(self) -> bool:
        """A copy one can read: not a tombstone, its file not lost."""
        return not self.deleted and not self.missing


def _is_int(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _invalid(value: Any) -> str | None:
    """Why value is not a copy status, or None if it is one."""
    if not isinstance(value, dict):
        return f"{type(value).__name__}, not an object"
    if not _is_int(value.get("version"), version_limit):
        return f"version {value.get('version')!r}"
    for name in _flags:
        if name in value and not isinstance(value[name], bool):
            return f"{name} {value[name]!r}"
    if value.get("digest") is not None and not _is_int(value["digest"], digest_limit):
        return f"digest {value['digest']!r}"
    if value.get("since") is not None and not _is_int(value["since"], epoch_limit):
        return f"since {value['since']!r}"
    for name in _sizes:
        if value.get(name) is not None and not _is_int(value[name], 2**63):
            return f"{name} {value[name]!r}"
    return None


# A holder's answer to STAT: its copy, None (no copy), or the failure to ask it.
Answer = CopyStatus | None | BaseException


@dataclass(frozen=True, slots=True)
class Copy(Generic[N]):
    """A holder and its copy: the winner of newest()."""

    node: N
    status: CopyStatus

    @property
    def version(self) -> int:
        return self.status.version

    @property
    def removed(self) -> bool:
        return self.status.deleted


def rank(status: CopyStatus) -> tuple[int, bool, bool, bool, bool, bool, int]:
    """The newest-copy order (see the module comment); higher is newer."""
    return (status.version, not status.deleted, not status.doubtful, not status.unverified,
            status.durable, status.digest is not None, status.digest or 0)


def candidate(answer: Answer, verified_only: bool) -> bool:
    """Whether an answer can be the newest copy: a copy or a tombstone, its file not
    lost, and verified if asked."""
    return (isinstance(answer, CopyStatus) and not answer.missing
            and not (verified_only and answer.unverified))


def newest(answers: Iterable[tuple[N, Answer]], verified_only: bool) -> Copy[N] | None:
    """The newest copy among (holder, answer) pairs, a removal's tombstone counting as
    a copy that says 'removed'; None if none has one. Among copies that rank equal
    (same version, state and digest) the first wins: the caller's order of preference."""
    best: Copy[N] | None = None
    for node, answer in answers:
        if not candidate(answer, verified_only):
            continue
        assert isinstance(answer, CopyStatus)
        if best is None or rank(answer) > rank(best.status):
            best = Copy(node, answer)
    return best


def stale(answer: Answer, newest_status: CopyStatus, compare_digests: bool) -> bool:
    """Whether a placement holder's copy must be replaced by the newest copy: it has
    none, could not be asked, holds a tombstone or a lost file, an unverified (or
    damaged) copy other than the newest one's twin (same version and digest), an
    older one, one in doubt where the newest is not, or, when digests are compared
    (scrub), one whose contents differ. A digest that either side does not report
    never differs."""
    if not isinstance(answer, CopyStatus) or not answer.whole:
        return True
    if answer.unverified and not (
            # Not verified yet (a restart), yet the newest copy as it is: its
            # verification keeps it (superseded), so a copy over it changes nothing.
            not answer.damaged and not answer.doubtful
            and answer.version == newest_status.version and answer.digest is not None
            and answer.digest == newest_status.digest):
        return True
    if answer.version < newest_status.version or (answer.doubtful and not newest_status.doubtful):
        return True
    return (compare_digests and newest_status.digest is not None
            and answer.digest is not None and answer.digest != newest_status.digest)


def stale_holders(answers: Iterable[tuple[N, Answer]], newest_status: CopyStatus,
                  compare_digests: bool) -> list[N]:
    """The holders whose copies must be replaced by the newest (see stale())."""
    return [node for node, answer in answers if stale(answer, newest_status, compare_digests)]


def superseded(mine: CopyStatus, best: Copy[Any] | None) -> bool:
    """Whether an unverified copy here must give way to the newest copy elsewhere:
    that one is newer, or as new, present, verified and with other contents (its
    digest known and not ours) or ours is damaged or in doubt. Otherwise ours is
    current."""
    if best is None or best.version < mine.version:
        return False
    if best.version > mine.version:
        return True
    if best.removed:
        return False
    if best.status.unverified:
        # Two suspect copies at one version, with other contents (a power loss took
        # different unsynced writes from each): the one that ranks higher wins on
        # every sheep, the copy reads take meanwhile (newest), so what a reader saw
        # stays (found by the simulator).
        return mine.damaged or rank(best.status) > rank(mine)
    return mine.damaged or mine.doubtful or best.status.digest not in (None, mine.digest)


class Verdict(enum.Enum):
    """What the verifier does with its unverified copy."""

    KEEP = "keep"  # ours is current: verified as it is
    REPLACE = "replace"  # the newest copy elsewhere replaces ours
    WAIT = "wait"  # a node that may hold a newer copy is away: decide later


def vouches(best: Copy[Any] | None, version: int) -> bool:
    """Whether the newest copy among the members settles what is current for a copy
    at version: a verified copy, not in doubt, at least as new. It took every change
    made since it was verified, so no copy elsewhere can be newer than it by a change
    it lacks."""
    return (best is not None and not best.status.unverified and not best.status.doubtful
            and best.version >= version)


def verdict(mine: CopyStatus, best: Copy[Any] | None, holders_away: bool) -> Verdict:
    """The verifier's decision for its unverified copy, given the newest copy among the
    members (newest()) and whether a node that may hold a newer copy is away: placed
    since our copy's ``since`` epoch, not a member, not declared lost
    (Group.holders_away).

    A member's verified copy at least as new vouches for the comparison, and the
    members' copies decide (superseded). Without one, keeping ours, or taking another
    unverified copy, would rest on copies that may lack exactly the changes the away
    node holds: a power loss took a holder's unflushed writes while the other holder,
    cut off and declared dead, kept them; keeping the torn copy and writing on would
    lose an acknowledged write for good when the other came back (simulator seed
    111). So the copy waits for that node, or for the operator to declare it lost."""
    if holders_away and not vouches(best, mine.version):
        return Verdict.WAIT
    return Verdict.REPLACE if superseded(mine, best) else Verdict.KEEP


def verifiable(answers: Iterable[Answer]) -> bool:
    """Whether some holder's copy is unverified yet may be found current: not damaged,
    its file not lost (recovery waits for such a copy rather than take the object as
    absent)."""
    return any(isinstance(answer, CopyStatus) and answer.unverified and not answer.damaged
               and not answer.missing for answer in answers)


def may_drop_surplus(mine_version: int, placement: Sequence[Answer]) -> bool:
    """Whether a copy held outside the placement may go: every holder of the placement
    has a verified copy at least as new (or a removal at least as new), durable (a
    power loss cannot take back the copy the drop relies on, only unflushed writes)."""
    return bool(placement) and all(
        isinstance(answer, CopyStatus) and not answer.unverified and not answer.missing
        and not answer.doubtful
        and (answer.durable or answer.deleted) and answer.version >= mine_version
        for answer in placement)


def waits_for_sync(mine_version: int, placement: Sequence[Answer]) -> list[int]:
    """The holders (indexes in placement) whose copy is all a surplus drop needs but
    durable: verified, at least as new, only not synced since it was made (recovery
    or verification just brought it). Syncing them lets the drop go now, rather than
    at their next writeback (30 s)."""
    def ready(answer: Answer) -> bool:
        return (isinstance(answer, CopyStatus) and not answer.unverified
                and not answer.missing and not answer.doubtful
                and answer.version >= mine_version)

    if not placement or not all(ready(answer) for answer in placement):
        return []
    return [index for index, answer in enumerate(placement)
            if isinstance(answer, CopyStatus) and not (answer.durable or answer.deleted)]


def behind(mine_version: int, placement: Sequence[Answer]) -> bool:
    """Whether some holder of the placement has a verified copy (or removal) older than
    a surplus copy at mine_version, or no copy at all: one that neither recovery nor
    verification would bring up to date (see Recoverer._held_elsewhere). No copy: the
    object was made by a write of the epoch before, which reached its replicas only
    after the new holder's recovery pass had listed them (the simulator found a
    surplus copy waiting for ever)."""
    return any(answer is None or (isinstance(answer, CopyStatus) and not answer.unverified
                                  and not answer.missing and answer.version < mine_version)
               for answer in placement)


def keeps_own(current_version: int, source_version: int, repair: bool) -> bool:
    """Whether a verified copy here stays when a copy made from a source at
    source_version arrives (recovery, repair): a recovery copy never replaces one at
    least as new (a client's write may have recovered and changed it meanwhile); a
    repair replaces one as new (damaged, or with other contents), never a newer one."""
    return current_version > source_version or (current_version == source_version
                                                 and not repair)


@dataclass(slots=True)
class CopyHealth:
    """The health of this sheep's own copies: which are unverified (may be stale: the
    sheep was away, or a copy was found damaged), which are damaged (a read or a scrub
    met damage; nothing serves them until a good copy replaces them), and counts.
    Only the domain events below change it; a damaged copy is always unverified too."""

    _unverified: set[int] = field(default_factory=set)
    _damaged: set[int] = field(default_factory=set)
    _repaired: int = 0  # damaged copies replaced by good ones
    _found: int = 0  # copies found damaged (each time one was not known damaged)
    _scrubbed: int = 0  # copies scrubbed, block by block
    # Copies made suspect by a change that failed here, and when: the same change may
    # still be on its way to the other replicas, so they are compared only later.
    _failed_at: dict[int, float] = field(default_factory=dict)
    # The epoch from which an unverified copy may lack changes (since()): the one given
    # to start_unverified for most, an earlier or later one of their own for the rest.
    _since_start: int = 0
    _since: dict[int, int] = field(default_factory=dict)

    def start_unverified(self, oids: Iterable[int], since: int,
                         earlier: Mapping[int, int] | None = None) -> None:
        """Every copy held is suspect (a restart, or declared dead while alive): each may
        lack changes made from epoch ``since`` on, or from its own earlier epoch in
        ``earlier`` (a power loss took writes made from then: store doubts). The
        damaged ones stay so until replaced, and copies unverified before keep their
        own epoch if it is earlier."""
        assert 0 <= since < epoch_limit
        before = {oid: self.since(oid) for oid in self._unverified}
        self._unverified = set(oids) | self._damaged
        assert all(0 <= oid < oid_limit for oid in self._unverified)
        self._since_start, self._since = since, {}
        for oid, epoch in [*before.items(), *(earlier or {}).items()]:
            if oid in self._unverified and epoch < self.since(oid):
                self._since[oid] = epoch
        self._check()

    def suspect(self, oids: Iterable[int], since: int) -> None:
        """These copies may have missed changes made from epoch ``since`` on (kept
        outside the placement while it was elsewhere): unverified until compared."""
        for oid in oids:
            assert 0 <= oid < oid_limit
            self._unverify(oid, since)
        self._check()

    def change_failed(self, oid: int, now: float, since: int) -> None:
        """A change failed halfway (EIO, ENOSPC) in epoch ``since``: the copy holds some
        of it, and the other replicas may hold all of it. A later change would give
        every replica the same version and hide the difference, so the copy is suspect
        until compared, which waits until the change is surely over elsewhere
        (ready_to_verify)."""
        assert 0 <= oid < oid_limit
        self._unverify(oid, since)
        self._failed_at[oid] = now
        self._check(oid)

    def _unverify(self, oid: int, since: int) -> None:
        assert 0 <= since < epoch_limit
        if oid in self._unverified:
            since = min(since, self.since(oid))
        self._unverified.add(oid)
        self._since[oid] = since

    def since(self, oid: int) -> int:
        """The epoch from which an unverified copy may lack changes: the nodes that the
        placement named since then may hold newer copies (verdict)."""
        return self._since.get(oid, self._since_start)

    def oldest_since(self) -> int | None:
        """The earliest epoch any unverified copy may lack changes from (None if every
        copy is verified): what a restart must still look back to."""
        if not self._unverified:
            return None
        values = list(self._since.values())
        if len(self._since) < len(self._unverified):
            values.append(self._since_start)
        return min(values)

    def ready_to_verify(self, oid: int, now: float, settle_s: float) -> bool:
        """Whether the copy may be compared with the others now: not if a change failed
        here less than settle_s ago (the others may not have applied it yet, and
        comparing now could keep this copy as the newest)."""
        failed = self._failed_at.get(oid)
        return failed is None or now - failed >= settle_s

    def verified(self, oid: int) -> None:
        """Compared with the other replicas and found current."""
        assert oid not in self._damaged, f"a damaged copy of {oid:016x} cannot be current"
        self._unverified.discard(oid)
        self._failed_at.pop(oid, None)
        self._since.pop(oid, None)
        self._check(oid)

    def found_damaged(self, oid: int, since: int) -> bool:
        """A read met damage in the copy in epoch ``since`` (it was current until then);
        True if it was not known damaged before."""
        new = oid not in self._damaged
        self._found += new
        self._damaged.add(oid)
        self._unverify(oid, since)
        self._check(oid)
        return new

    def scrubbed(self, oid: int, damaged: bool, since: int) -> bool:
        """A scrub verified every block of the copy in epoch ``since``; True if it found
        new damage."""
        self._scrubbed += 1
        return self.found_damaged(oid, since) if damaged else False

    def found_sound(self, oid: int) -> None:
        """A copy marked damaged was verified block by block again and every block
        matched its checksum: what failed was the disk, for a moment (an EIO on a read),
        not the data. It stays unverified, to be compared like any other."""
        self._damaged.discard(oid)
        self._check(oid)

    def replaced(self, oid: int) -> bool:
        """A whole new copy was written here: current by definition. True if it
        replaced a damaged one (counted as repaired)."""
        self._unverified.discard(oid)
        self._failed_at.pop(oid, None)
        self._since.pop(oid, None)
        repaired = oid in self._damaged
        if repaired:
            self._damaged.discard(oid)
            self._repaired += 1
        self._check(oid)
        return repaired

    def forget(self, oid: int) -> None:
        """The copy is gone (removed, or dropped as surplus): nothing to verify or repair."""
        self._unverified.discard(oid)
        self._failed_at.pop(oid, None)
        self._since.pop(oid, None)
        self._damaged.discard(oid)
        self._check(oid)

    def is_unverified(self, oid: int) -> bool:
        return oid in self._unverified

    def is_damaged(self, oid: int) -> bool:
        return oid in self._damaged

    def unverified_oids(self) -> list[int]:
        return sorted(self._unverified)

    @property
    def unverified_count(self) -> int:
        return len(self._unverified)

    @property
    def damaged_count(self) -> int:
        return len(self._damaged)

    @property
    def repaired(self) -> int:
        return self._repaired

    @property
    def found_count(self) -> int:
        return self._found

    @property
    def scrubbed_count(self) -> int:
        return self._scrubbed

    def _check(self, oid: int | None = None) -> None:
        # Cheap enough for every event: the damaged set is small, the unverified one
        # may hold every copy of the store and is not walked.
        assert oid is None or 0 <= oid < oid_limit, f"oid {oid}"
        assert self._damaged <= self._unverified, "a damaged copy is never served"
        assert oid is None or oid not in self._failed_at or oid in self._unverified
        assert oid is None or oid not in self._since or oid in self._unverified
        assert self._repaired >= 0 and self._scrubbed >= 0 and self._found >= self._repaired
