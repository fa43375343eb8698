"""Repair: bring an object back to N good copies under the current placement.

The gateway fans requests out; this is the other half of what it does with
replicas: when copies disagree or one is damaged, the newest verified copy
(sheep/replicas.py decides which) is copied over the others. It runs for
``dog cluster check`` and ``dog cluster scrub`` (CHECK_OBJS), for a VDI whose
previous writer died mid-write (VdiService._settle), and in the background
after a read or a write met a damaged copy (repair_soon, also the scrubber's).

Copies are made as recovery makes them (FLAG_DIRECT, with the source's
version), so a client's write racing with a repair is never undone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sheep import proto, replicas
from sheep.background import PerKey
from sheep.errors import InvalidParameters, SheepError
from sheep.net import Reply
from sheep.proto import Header, Op
from sheep.replicas import CopyStatus

if TYPE_CHECKING:
    from sheep.gateway import Gateway
    from sheep.node import NodeInfo

log = logging.getLogger(__name__)

check_batch_max = 1024
check_concurrency = 8


class Repairer:
    """The repair side of a gateway: it reads, stats and writes copies through it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.group = gateway.group
        self._repairs = PerKey()

    async def check(self, header: Header, payload: bytes) -> Reply:
        """Bring each listed object back to N good copies under the current placement."""
        body = proto.decode_json(payload)
        oids = body.get("oids") if isinstance(body, dict) else None
        if (not isinstance(oids, list) or len(oids) > check_batch_max
                or not all(isinstance(oid, int) and 0 <= oid < 2**64 for oid in oids)):
            raise InvalidParameters(f"check takes {{\"oids\": [up to {check_batch_max} object ids]}}")
        scrub = bool(body.get("scrub"))
        semaphore = asyncio.Semaphore(check_concurrency)

        async def one(oid: int) -> dict[str, Any]:
            async with semaphore:
                try:
                    return await self.check_object(oid, scrub)
                except SheepError as error:
                    return {"oid": oid, "state": "error", "error": str(error)}

        return proto.encode_json({"objects": await asyncio.gather(*map(one, oids))}), {}

    async def check_object(self, oid: int, scrub: bool = False,
                           also: Sequence[NodeInfo] = ()) -> dict[str, Any]:
        """One object: find its newest verified copy (in the placement or on the nodes
        also named, else anywhere in the cluster) and copy it to every holder of the
        placement that lacks it, holds an unverified, damaged or older copy, or one
        whose contents differ (digests). With scrub, every holder first verifies every
        block of its copy. The copies are made as recovery makes them, so a client's
        write racing with the repair is never undone."""
        epoch = self.group.epoch
        nodes = self.group.placement(oid, epoch)
        result: dict[str, Any] = {"oid": oid, "copies": self.group.copies_for(oid),
                                  "placed": len(nodes), "good": 0, "repaired": []}
        extra = [node for node in also if node not in nodes]
        stats = await self.gateway.stats(oid, nodes + extra, epoch, tolerant=True, scrub=scrub)
        candidates = list(zip(nodes, stats[:len(nodes)], strict=True))
        result["damaged"] = [node.node_id for node, stat in candidates
                             if isinstance(stat, CopyStatus) and stat.damaged]
        best = replicas.newest(zip(nodes + extra, stats, strict=True), verified_only=True)
        if best is None:  # not in the placement: where earlier epochs or a drain left it
            others = [node for node in self.group.state.nodes if node not in nodes]
            more = await self.gateway.stats(oid, others, epoch, tolerant=True)
            best = replicas.newest(zip(others, more, strict=True), verified_only=True)
            stats = [*stats, *more]
        if best is None:
            # Only copies not verified yet (a restart): their verifiers decide, a repair
            # cannot. Lost only if no copy is left to verify.
            result["state"] = "verifying" if replicas.verifiable(stats) else "lost"
            return result
        if best.removed:
            result["state"] = "removed"
            return result
        version, source = best.version, best.node
        # With scrub, copies as new as the source but with other contents are stale too.
        stale = replicas.stale_holders(candidates, best.status, compare_digests=scrub)
        unreachable = [node for node, stat in candidates if isinstance(stat, BaseException)]
        result["good"] = len(nodes) - len(stale)
        repairable = [node for node in stale if node not in unreachable]
        if repairable:
            _, data, read_version = await self.gateway.read_extents(source, oid, epoch)
            # FLAG_DIRECT: a repair replaces a copy as new as the source (damaged, or
            # with other contents), though never one a write has made newer since.
            # FLAG_FUA: a repaired copy is durable when it is counted as good (a surplus
            # copy waiting for it may go at once: Recoverer._held_elsewhere).
            # FLAG_SPARSE: the copy goes as the source's extents; holes stay holes.
            create = Header(opcode=Op.CREATE_AND_WRITE_OBJ, oid=oid,
                            count=self.group.state.object_size,
                            arg0=read_version or version,
                            flags=proto.FLAG_DIRECT | proto.FLAG_FUA | proto.FLAG_SPARSE)
            await asyncio.gather(*(self.gateway.call(node, create, bytes(data), epoch)
                                   for node in repairable))
            result["repaired"] = [node.node_id for node in repairable]
            result["good"] += len(repairable)
            log.info("check: object %016x copied to %s", oid,
                     ", ".join(node.node_id for node in repairable))
        result["unreachable"] = [node.node_id for node in unreachable]
        result["state"] = ("ok" if not stale else "repaired" if not unreachable else "degraded")
        if result["good"] < result["copies"] and result["state"] == "ok":
            result["state"] = "degraded"  # fewer zones than copies: placement is short
        return result

    def repair_soon(self, oid: int, what: str = "damaged copy") -> None:
        """A read met a damaged copy and found a good one (or copies that must agree
        do not: ``what``): copy the newest over, in the background."""

        async def repair() -> None:
            try:
                result = await self.check_object(oid)
                log.warning("object %016x: %s repaired on %s", oid, what,
                            ", ".join(result["repaired"]) or "no node (it was gone)")
            except SheepError as error:
                log.error("object %016x: cannot repair the %s: %s", oid, what, error)

        self._repairs.start(oid, repair)
