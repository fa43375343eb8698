"""Placement: weighted rendezvous hashing (straw2) over two levels of failure domains,
sans-IO.

Every node that stores copies has a weight (bytes, by default its capacity). For an
object, each node draws a key ln(u) / a, u uniform in (0, 1] from mmh3 of the oid and
the node's salt, a the node's weight (compensated, below). Sorted by key, the nodes
are the object's preference list; copies go to the first nodes of that list whose
failure domain holds no copy yet:

- with at least as many racks as copies, one copy per rack;
- with fewer racks, one copy in every rack, then the others on hosts that hold none,
  so the copies are on distinct hosts spread over every rack.

A node's rack and host come from ``sheep -z RACK/HOST``; a plain ``-z HOST`` (or none:
the node is its own host) makes the host its own rack.

Why this shape (docs/design.md, "Placement"):
- Shares follow weights exactly, at any weight: the first key is node i's with
  probability w_i / W, for 10 GiB next to 100 TiB, with no vnode cap or count to round.
- A membership or weight change moves only the copies that must move: the keys of the
  nodes that did not change are the same, so an object's list changes only where the
  changed node enters or leaves it.
- It is a pure function of (node list, oid, copies): hashes are mmh3 over fixed
  bytes, the order nodes come in never matters, ties go to the smaller node id.
- Many copies on distinct domains favour the light domains: the heavy ones are
  skipped for the second copy when they already hold the first (the "multi-pick
  anomaly" of successive sampling). Domain weights are therefore compensated once per
  node list and number of copies (``compensate``), so that each domain's share of the
  copies is its share of the weight; a domain heavier than 1/copies of the cluster
  gets a copy of every object.

Cost: a lookup draws one key per storing node (about 0.25 us each), so it grows with the
cluster; placements are cached per ring (placement_cache_entries_max), and the ring
itself is only the node table, built in microseconds per node.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import mmh3

from sheep import constants
from sheep.node import NodeInfo

# Placements remembered per ring: each entry is a few hundred bytes, and a busy
# gateway touches a working set of objects far smaller than this.
placement_cache_entries_max = 65_536

_oid_max = 2**64 - 1
_ln_2_53 = 53 * math.log(2)


def object_point(oid: int) -> int:
    """The object's hash: mmh3 x64 of the oid as 8 little-endian bytes."""
    assert 0 <= oid <= _oid_max, oid
    return mmh3.hash64(oid.to_bytes(8, "little"), signed=False)[0]


def node_salt(node_id: str) -> bytes:
    """The 8 bytes a node appends to an oid for its draws: mmh3 x64 of its id."""
    return mmh3.hash64(node_id.encode(), signed=False)[0].to_bytes(8, "little")


def draw(oid: int, salt: bytes) -> float:
    """ln(u), u in (0, 1] uniform from the oid and a node's salt: mmh3 x64 of the oid's 8
    little-endian bytes followed by the salt, its top 53 bits."""
    value = mmh3.hash64(oid.to_bytes(8, "little") + salt, signed=False)[0]
    return math.log((value >> 11) + 1) - _ln_2_53


def rack_key(node: NodeInfo) -> tuple[str, int]:
    """The node's rack; a node without one is in a rack of its host alone."""
    return ("rack", node.rack) if node.rack is not None else ("host", node.zone)


# --- compensation for many copies -------------------------------------------------

# Composite Gauss-Legendre on u in (0, 1), t = -ln(1 - u) / lambda: panels shrink
# geometrically towards both ends, where the integrands of very light and very heavy
# domains live.
_gauss_nodes = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563,
                0.8611363115940526)
_gauss_weights = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461,
                  0.3478548451374538)


@functools.cache
def _quadrature() -> tuple[tuple[float, float], ...]:
    """(u, weight) points on (0, 1)."""
    edges = sorted({0.0, 1.0, *(4.0 ** -j for j in range(1, 9)),
                    *(1 - 4.0 ** -j for j in range(1, 9))})
    points: list[tuple[float, float]] = []
    for low, high in zip(edges, edges[1:], strict=False):
        half, middle = (high - low) / 2, (high + low) / 2
        points.extend((middle + half * x, half * w)
                      for x, w in zip(_gauss_nodes, _gauss_weights, strict=True))
    return tuple(points)


def inclusion(weights: Sequence[float], picks: int) -> list[float]:
    """The probability that each item is among the first ``picks`` of an exponential
    race (item i's time Exp(weights[i])): what taking the ``picks`` best straw2 keys
    gives each item. Numerical: 68 points, within about 2e-5 of the exact value."""
    total = math.fsum(weights)
    a = [weight / total for weight in weights]
    count = len(a)
    if picks >= count:
        return [1.0] * count
    if picks == 1:
        return a
    top = heapq.nlargest(picks - 1, a)
    rate = max(1.0 - math.fsum(top), 1e-12)  # the slowest the integrands decay
    trust = 10.0 ** (-10 / picks)  # deconvolution is used where q_i is above this
    result = [0.0] * count
    for u, weight in _quadrature():
        t = -math.log1p(-u) / rate
        jacobian = weight / (rate * (1 - u))
        q = [math.exp(-x * t) for x in a]
        # P[j]: the probability that exactly j items (of all) have finished by t.
        p_all = _poisson_binomial(q, picks)
        for i in range(count):
            qi = q[i]
            if qi >= trust:
                # Leave item i out by deconvolution: stable while q_i is not small.
                below = 0.0
                previous = 0.0
                for j in range(picks):
                    previous = (p_all[j] - (1 - qi) * previous) / qi
                    below += previous
            else:
                below = math.fsum(_poisson_binomial(q[:i] + q[i + 1:], picks))
            result[i] += jacobian * a[i] * qi * below
    return result


def _poisson_binomial(q: Sequence[float], terms: int) -> list[float]:
    """P(exactly j of the items finished), j < terms, item i unfinished with prob q[i]."""
    p = [1.0] + [0.0] * (terms - 1)
    for qi in q:
        pi = 1 - qi
        for j in range(terms - 1, 0, -1):
            p[j] = p[j] * qi + p[j - 1] * pi
        p[0] *= qi
    return p


_saturated = 1e-3
_rounds = 14  # compensation rounds at most (11 was the most measured)
_tolerance = 1e-5  # chances within this of their targets: done


def _always(weights: Sequence[float], copies: int) -> set[int]:
    """The domains picked for every object: too heavy for a share in proportion (one
    copy of each object at most), then again among the rest, and so on."""
    always: set[int] = set()
    while True:
        left = copies - len(always)
        rest = math.fsum(w for i, w in enumerate(weights) if i not in always)
        # Within _saturated of a copy of every object is as good as every object: the
        # chances there cannot be solved for (a weight near infinity).
        grown = {i for i, w in enumerate(weights)
                 if i not in always and left > 0 and left * w >= rest * (1 - _saturated)}
        if not grown:
            return always
        always |= grown


def targets(weights: Sequence[float], copies: int) -> list[float]:
    """Each domain's chance to hold a copy of an object, ``copies`` going to distinct
    domains: copies * weight / total, but at most 1 (see _always)."""
    always = _always(weights, copies)
    left = copies - len(always)
    rest = math.fsum(w for i, w in enumerate(weights) if i not in always)
    return [1.0 if i in always else (left * w / rest if rest else 0.0)
            for i, w in enumerate(weights)]


@dataclass(frozen=True)
class Compensation:
    factors: tuple[float, ...]  # multiply each domain's weight by this
    always: frozenset[int]  # domains that get a copy of every object


def compensate(weights: Sequence[float], copies: int) -> Compensation:
    """Weights for ``copies`` picks of distinct domains such that each domain's chance
    to be picked is copies * weight / total (its share of the weight): the domains
    heavier than that allows (more than 1/copies of the total, or within _saturated of
    it) are picked always, and the rest share the remaining copies in proportion to
    their weights. Never raises: if the numbers go wrong (they should not), the
    weights are taken as they are."""
    count = len(weights)
    always = _always(weights, copies)
    others = [i for i in range(count) if i not in always]
    picks = copies - len(always)
    factors = [1.0] * count
    if picks <= 1 or picks >= len(others) or len({weights[i] for i in others}) == 1:
        # One pick, every domain picked, or equal weights: the shares are exact as is.
        return Compensation(tuple(factors), frozenset(always))
    base = [weights[i] for i in others]
    total = math.fsum(base)
    target = [picks * w / total for w in base]
    adjusted = [w / total for w in base]
    try:
        for _ in range(_rounds):
            got = inclusion(adjusted, picks)
            scale = picks / math.fsum(got)  # the quadrature's own error is not the weights'
            got = [min(max(g * scale, 1e-12), 1 - 1e-12) for g in got]
            # Two processes whose exp() differ in the last bit stop at different rounds
            # only if the error falls within that bit of the tolerance (about 1e-12 of
            # cases); the factors then still round alike unless within 1e-5 of a
            # 6-digit boundary.
            if max(abs(g / t - 1) for g, t in zip(got, target, strict=True)) < _tolerance:
                break
            # By the odds, not the chances, and a shorter step the nearer the target is
            # to 1 (the power 1 - t/2): a domain near a copy of every object needs a
            # far larger weight for a little more, which a t / g step approaches only
            # slowly (30 rounds still 0.3% off), and the full odds step overshoots.
            # Measured on random mixes over four orders of magnitude: within 1e-4 in 11
            # rounds at most.
            adjusted = [x * ((t * (1 - g)) / (g * (1 - t))) ** (1 - t / 2)
                        for x, t, g in zip(adjusted, target, got, strict=True)]
            norm = math.fsum(adjusted)
            adjusted = [x / norm for x in adjusted]
        solved = [x * total / w for x, w in zip(adjusted, base, strict=True)]
    except (ArithmeticError, ValueError, TypeError):
        return Compensation(tuple(factors), frozenset(always))
    if not all(isinstance(f, float) and math.isfinite(f) and f > 0 for f in solved):
        return Compensation(tuple(factors), frozenset(always))
    for i, factor in zip(others, solved, strict=True):
        # Rounded to 6 digits: what every process computes alike, whatever the last
        # bits of its exp() and log() (C libraries may differ by an ulp).
        factors[i] = float(f"{factor:.6g}")
    return Compensation(tuple(factors), frozenset(always))


# --- the ring ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """What a lookup of ``copies`` copies walks: per storing node, its salt, 1/weight
    (compensated), rack and host index; and the racks picked always."""
    salts: tuple[bytes, ...]
    inverse: tuple[float, ...]
    racks: tuple[int, ...]
    hosts: tuple[int, ...]
    always: frozenset[int]  # rack indexes
    placed: int  # copies placed: at most one per host
    by_rack: bool  # one copy per rack (enough racks); else every rack, then hosts


class Ring:
    """The placement of every object for one node list (one epoch)."""

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self.nodes: tuple[NodeInfo, ...] = tuple(nodes)
        node_ids = [node.node_id for node in self.nodes]
        assert len(set(node_ids)) == len(node_ids), f"duplicate node ids in {node_ids}"
        assert len(self.nodes) <= constants.node_ids_per_cluster_max, len(self.nodes)
        for node in self.nodes:
            assert 0 <= node.weight <= constants.weight_max_bytes, node
        # A node without weight (drained, or a gateway only) stores nothing, so its
        # host or rack cannot take a copy unless another node there has weight.
        self._holders = tuple(sorted((node for node in self.nodes if node.weight > 0),
                                     key=lambda node: node.node_id))
        self._salts = tuple(node_salt(node.node_id) for node in self._holders)
        rack_ids = sorted({rack_key(node) for node in self._holders})
        host_ids = sorted({node.zone for node in self._holders})
        self._rack_of = tuple(bisect.bisect_left(rack_ids, rack_key(node))
                              for node in self._holders)
        self._host_of = tuple(bisect.bisect_left(host_ids, node.zone)
                              for node in self._holders)
        self._zones = len(host_ids)
        self._racks = len(rack_ids)
        self._tables: dict[int, _Table] = {}
        self._placement_cached = functools.lru_cache(maxsize=placement_cache_entries_max)(
            self._placement_uncached)

    @property
    def zones(self) -> int:
        """The number of distinct hosts (zones) that can hold copies."""
        return self._zones

    @property
    def racks(self) -> int:
        """The number of distinct racks that can hold copies."""
        return self._racks

    def table(self, copies: int) -> _Table:
        """The lookup table for ``copies`` copies (built once per ring and count)."""
        table = self._tables.get(copies)
        if table is None:
            table = self._tables[copies] = self._build(copies)
        return table

    def _build(self, copies: int) -> _Table:
        placed = min(copies, self._zones)
        by_rack = self._racks >= placed
        weights = [float(node.weight) for node in self._holders]
        factors = [1.0] * self._racks
        always: frozenset[int] = frozenset()
        if by_rack and placed > 1:
            compensation = compensate(self._rack_weights(), placed)
            factors, always = list(compensation.factors), compensation.always
        inverse = tuple(1.0 / (weight * factors[rack])
                        for weight, rack in zip(weights, self._rack_of, strict=True))
        return _Table(self._salts, inverse, self._rack_of, self._host_of, always, placed,
                      by_rack)

    def _rack_weights(self) -> list[float]:
        """Each rack's weight: its storing nodes' together."""
        rack_weights = [0.0] * self._racks
        for rack, node in zip(self._rack_of, self._holders, strict=True):
            rack_weights[rack] += node.weight
        return rack_weights

    def expected_shares(self, copies: int) -> dict[str, float]:
        """Each storing node's chance to hold a copy of an object (they add up to the
        copies placed): its rack's target, split over the rack by weight. With fewer
        racks than copies, approximate: a rack's copy split by weight, and the copies
        beyond one per rack spread by weight over the cluster."""
        placed = min(copies, self._zones)
        weights = [float(node.weight) for node in self._holders]
        rack_weights = self._rack_weights()
        total = math.fsum(weights)
        if self._racks >= placed:
            chances = targets(rack_weights, placed)
            return {node.node_id: chances[rack] * weight / rack_weights[rack]
                    for node, rack, weight in zip(self._holders, self._rack_of, weights,
                                                  strict=True)}
        extra = placed - self._racks
        return {node.node_id: min(1.0, weight / rack_weights[rack] + extra * weight / total)
                for node, rack, weight in zip(self._holders, self._rack_of, weights,
                                              strict=True)}

    def placement(self, oid: int, copies: int) -> list[NodeInfo]:
        """The nodes holding the object's copies, primary first.

        One node per host: fewer than ``copies`` nodes when there are fewer hosts than
        copies (the caller decides whether that is an error).
        """
        return list(self._placement_cached(oid, copies))

    def _placement_uncached(self, oid: int, copies: int) -> tuple[NodeInfo, ...]:
        assert 1 <= copies <= constants.copies_max, copies
        assert 0 <= oid <= _oid_max, oid
        if not self._holders:
            return ()
        table = self.table(copies)
        key = oid.to_bytes(8, "little")
        hash64, log = mmh3.hash64, math.log
        keys = [(log((hash64(key + salt, signed=False)[0] >> 11) + 1) - _ln_2_53) * inverse
                for salt, inverse in zip(table.salts, table.inverse, strict=True)]
        chosen = self._choose(table, keys)
        chosen.sort(key=lambda index: (-keys[index], index))
        return tuple(self._holders[index] for index in chosen)

    def _choose(self, table: _Table, keys: list[float]) -> list[int]:
        count = len(keys)
        wanted = min(count, 2 * table.placed + 8)
        order = heapq.nlargest(wanted, range(count), key=keys.__getitem__)
        chosen = self._walk(table, order, table.by_rack)
        if chosen is None:  # the short list was not enough: walk them all
            order = sorted(range(count), key=keys.__getitem__, reverse=True)
            chosen = self._walk(table, order, table.by_rack)
        if chosen is None:
            # The racks cannot be kept apart with distinct hosts (a host number under
            # two racks): distinct hosts, which there always are enough of.
            chosen = self._walk(table, order, by_rack=False, racks_first=False)
            assert chosen is not None
        return chosen

    def _walk(self, table: _Table, order: list[int], by_rack: bool,
              racks_first: bool = True) -> list[int] | None:
        """The copies from the preference list ``order``, or None if it is too short or
        the domains cannot be kept apart that way. Hosts are always distinct."""
        racks, hosts = table.racks, table.hosts
        chosen: list[int] = []
        used_racks: set[int] = set()
        used_hosts: set[int] = set()
        if by_rack:
            for rack in table.always:  # the best node of each rack picked always
                best = next((index for index in order if racks[index] == rack
                             and hosts[index] not in used_hosts), None)
                if best is None:
                    return None
                chosen.append(best)
                used_racks.add(rack)
                used_hosts.add(hosts[best])
            for index in order:
                if len(chosen) == table.placed:
                    return chosen
                if racks[index] not in used_racks and hosts[index] not in used_hosts:
                    used_racks.add(racks[index])
                    used_hosts.add(hosts[index])
                    chosen.append(index)
            return chosen if len(chosen) == table.placed else None
        if racks_first:
            # Fewer racks than copies: one copy in every rack, then distinct hosts.
            for index in order:
                if len(used_racks) == self._racks:
                    break
                if racks[index] not in used_racks and hosts[index] not in used_hosts:
                    used_racks.add(racks[index])
                    used_hosts.add(hosts[index])
                    chosen.append(index)
            if len(used_racks) < self._racks:
                return None
        for index in order:
            if len(chosen) == table.placed:
                return chosen
            if hosts[index] not in used_hosts:
                used_hosts.add(hosts[index])
                chosen.append(index)
        return chosen if len(chosen) == table.placed else None

    def _check(self) -> None:
        """Assert the ring's invariants; tests call it on every ring they build."""
        node_ids = [node.node_id for node in self.nodes]
        assert len(set(node_ids)) == len(node_ids)
        assert set(self._holders) == {node for node in self.nodes if node.weight > 0}
        assert self._zones == len({node.zone for node in self._holders})
        assert self._racks == len({rack_key(node) for node in self._holders})
        assert list(self._holders) == sorted(self._holders, key=lambda node: node.node_id)
