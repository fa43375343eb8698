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

_totals = ("to_recover", "recovered", "skipped", "failed", "bytes", "surplus", "removed",
           "unverified")


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
        worse(RECOVERING, f"{totals['running']} node(s) recovering: "
                          f"{objects_done_text(totals)}")
    if totals["unverified"]:
        phase = phase or "verifying"
        worse(RECOVERING, f"{totals['unverified']} copies to verify after a restart")
    return {"state": state, "phase": phase, "reasons": reasons, **totals}


def objects_done_text(totals: dict[str, Any]) -> str:
    """How far recovery is: "4/10 objects done", and what that was when some needed no
    copy after all (removed meanwhile, or written here by a client)."""
    done = int(totals["recovered"]) + int(totals.get("skipped", 0))
    text = f"{done}/{totals['to_recover']} objects done"
    if totals.get("skipped"):
        text += f" ({totals['recovered']} copied, {totals['skipped']} needed no copy)"
    return text


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


# A node whose space would run out within this much more than the first: it limits the
# cluster too (listed with the first).
limit_margin = 1.05


def capacity_limits(nodes: list[dict[str, Any]], copies: int) -> dict[str, Any] | None:
    """What limits the cluster's usable space, from NODE_LIST's answers: placement
    gives each node a fixed share of the copies (its weight's), so the cluster is full
    when its first node is, whatever space the others have left.

    {"raw": bytes of every reachable node, "usable": the object data the cluster holds
    when its first node fills (each byte counted once, not per copy), "more": how much
    more it takes from now, "stranded": raw bytes left unused then, "limiting": the
    nodes that fill first, each with its share of the copies and of the space}. None
    without reachable storing nodes."""
    from sheep.node import NodeInfo
    from sheep.ring import Ring

    storing = [(index, node) for index, node in enumerate(nodes)
               if node.get("status") != "unreachable" and int(node.get("weight") or 0) > 0
               and "capacity" in node]
    if not storing or copies < 1:
        return None
    ring = Ring([NodeInfo.from_json(node) for _, node in storing])
    placed = min(copies, ring.zones)
    shares = ring.expected_shares(copies)
    limits = []
    for index, node in storing:
        share = shares.get(str(node["node_id"]), 0.0)
        if share > 0:
            limits.append((int(node["capacity"]) / share, int(node["free"]) / share, index,
                           node, share))
    limits.sort(key=lambda item: item[0])
    raw = sum(int(node["capacity"]) for _, node in storing)
    usable = limits[0][0]
    return {
        "raw": raw, "usable": int(usable), "copies": placed,
        "more": int(min(item[1] for item in limits)),
        "stranded": max(0, int(raw - usable * placed)),
        "limiting": [{"index": index, "node_id": node["node_id"],
                      "copies_share": share / placed,
                      "space_share": int(node["capacity"]) / raw}
                     for full, _, index, node, share in limits
                     if full <= usable * limit_margin]}


def capacity_text(limits: dict[str, Any], format_size: Any) -> list[str]:
    """Lines for dog cluster info."""
    lines = [f"Usable space: {format_size(limits['usable'])} of data at"
             f" {limits['copies']} copies ({format_size(limits['more'])} more can be"
             f" written), from {format_size(limits['raw'])} raw"]
    if limits["stranded"] > limits["raw"] * 0.05:
        names = ", ".join(
            f"node {item['index']} ({100 * item['copies_share']:.1f}% of the copies for"
            f" {100 * item['space_share']:.1f}% of the space)" for item in limits["limiting"])
        lines.append(f"Limited by {names}: {format_size(limits['stranded'])}"
                     f" ({100 * limits['stranded'] / limits['raw']:.0f}%) of the raw space"
                     " stays unused when it is full ('dog node weight' to follow the space)")
    return lines
