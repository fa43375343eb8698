"""The cluster's health, in one place: what dog cluster info, dog node recovery,
dog cluster check and dog object stat all show (pure: from the answers of
CLUSTER_INFO and NODE_LIST, and an object's STAT).

States, the worst that applies:

- unavailable: the cluster serves no I/O (not formatted, or waiting after a
  shutdown for the last epoch's nodes);
- degraded: some objects cannot have all their copies now: fewer zones (or
  nodes) than copies, or a member that cannot be reached. Nothing heals it but
  a node coming (back);
- recovering: copies are being fetched, surplus ones removed, or (after a
  restart) verified against the other replicas: it heals by itself. Its phase
  says which ("recovering" or "verifying");
- healthy: every member reachable, done recovering, with zones for every copy.
"""

from __future__ import annotations

from typing import Any

HEALTHY = "healthy"
RECOVERING = "recovering"
DEGRADED = "degraded"
UNAVAILABLE = "unavailable"
_rank = {HEALTHY: 0, RECOVERING: 1, DEGRADED: 2, UNAVAILABLE: 3}

_totals = ("to_recover", "recovered", "failed", "bytes", "surplus", "removed", "unverified")


def recovery_totals(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Recovery added up over the members (NODE_LIST), and how many are recovering
    or unreachable."""
    totals: dict[str, Any] = {key: 0 for key in _totals}
    rate = 0.0
    running = unreachable = 0
    for info in nodes:
        if info.get("status") == "unreachable":
            unreachable += 1
            continue
        recovery = info.get("recovery") or {}
        for key in _totals:
            totals[key] += int(recovery.get(key, 0))
        if recovery.get("running"):
            running += 1
            rate += float(recovery.get("rate", 0.0))
    return {**totals, "running": running, "unreachable": unreachable, "rate": rate}


def cluster_health(info: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """{"state", "phase", "reasons": [text], and the recovery totals}."""
    totals = recovery_totals(nodes)
    reasons: list[str] = []
    state = HEALTHY
    phase = ""

    def worse(candidate: str, reason: str) -> None:
        nonlocal state
        reasons.append(reason)
        if _rank[candidate] > _rank[state]:
            state = candidate

    status = info.get("status")
    if status == "wait_for_format":
        worse(UNAVAILABLE, "not formatted ('dog cluster format')")
    elif status == "shutdown":
        worse(UNAVAILABLE, "waiting for the last epoch's nodes to come back after a shutdown")
    copies = int(info.get("copies_max") or info.get("copies") or 0)
    zones = int(info.get("zones") or 0)
    if status == "ok" and zones < copies:
        worse(DEGRADED, f"only {zones} zone(s) for {copies} copies")
    if totals["unreachable"]:
        worse(DEGRADED, f"{totals['unreachable']} node(s) unreachable")
    if totals["running"]:
        phase = "recovering"
        worse(RECOVERING, f"{totals['running']} node(s) recovering: {totals['recovered']}/"
                          f"{totals['to_recover']} objects fetched")
    if totals["unverified"]:
        phase = phase or "verifying"
        worse(RECOVERING, f"{totals['unverified']} copies to verify after a restart")
    return {"state": state, "phase": phase, "reasons": reasons, **totals}


def health_text(health: dict[str, Any]) -> str:
    """One line: the state, then why."""
    if health["state"] == HEALTHY:
        return "healthy: every node reachable, done recovering, a zone for every copy"
    return f"{health['state']}: " + "; ".join(health["reasons"])


def object_health(stat: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """An object's own state from its STAT (the copies it wants, its placement's
    holders and what each answered) within the cluster's health."""
    wanted = int(stat.get("copies") or 0)
    held = sum(1 for replica in stat.get("replicas", []) if "error" not in replica)
    if held >= wanted:
        state = HEALTHY
    elif cluster["state"] == RECOVERING:
        state = RECOVERING
    else:
        state = DEGRADED if held else UNAVAILABLE
    return {"state": state, "copies": wanted, "held": held}
