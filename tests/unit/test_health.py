"""One notion of health (sheep/health.py): each situation, and the worst state wins."""

from __future__ import annotations

from typing import Any

from sheep.health import capacity_limits, capacity_text, cluster_health, health_text, object_health


def member(**recovery: object) -> dict:
    return {"status": "ok", "recovery": {"running": False, **recovery}}


def info(status: str = "ok", copies: int = 3, zones: int = 3, copies_max: int = 0) -> dict:
    return {"status": status, "copies": copies, "zones": zones, "copies_max": copies_max}


def test_healthy():
    health = cluster_health(info(), [member(), member(), member()])
    assert health["state"] == "healthy" and health["phase"] == "" and health["reasons"] == []
    assert health_text(health).startswith("healthy: ")


def test_a_node_killed_leaves_the_cluster_recovering_while_zones_suffice():
    health = cluster_health(info(zones=3), [member(running=True, to_recover=10, recovered=4),
                                            member(), member()])
    assert (health["state"], health["phase"]) == ("recovering", "recovering")
    assert health_text(health) == "recovering: 1 node(s) recovering: 4/10 objects done"


def test_objects_that_needed_no_copy_count_as_done_and_are_told_apart():
    """A pass wanted 23 objects, copied 2 and found nothing to copy for 21 (removed
    meanwhile, or written here by a client): 23/23 done, not "2/23 recovered"."""
    nodes = [member(running=True, to_recover=23, recovered=2, skipped=21), member(), member()]
    health = cluster_health(info(zones=3), nodes)
    assert health_text(health) == ("recovering: 1 node(s) recovering: 23/23 objects done"
                                   " (2 copied, 21 needed no copy)")


def test_too_few_zones_is_degraded_even_while_recovering():
    health = cluster_health(info(zones=2), [member(running=True), member()])
    assert (health["state"], health["phase"]) == ("degraded", "recovering")
    assert health["reasons"][0] == "only 2 zone(s) for 3 copies"


def test_a_vdi_with_more_copies_than_zones_degrades_the_cluster():
    assert cluster_health(info(copies=2, zones=2, copies_max=3),
                          [member(), member()])["state"] == "degraded"


def test_an_unreachable_member_is_degraded():
    health = cluster_health(info(), [member(), member(), {"status": "unreachable"}])
    assert health["state"] == "degraded" and health["unreachable"] == 1


def test_after_a_restart_copies_being_verified_read_as_verifying():
    health = cluster_health(info(), [member(unverified=5), member(), member()])
    assert (health["state"], health["phase"]) == ("recovering", "verifying")
    assert "5 copies to verify after a restart" in health_text(health)


def test_waiting_after_a_shutdown_or_for_a_format_is_unavailable():
    for status in ("shutdown", "wait_for_format"):
        assert cluster_health(info(status=status), [])["state"] == "unavailable"


def test_an_object_short_of_copies_follows_the_cluster():
    stat = {"copies": 3, "replicas": [{"version": 1}, {"version": 1}]}
    recovering = cluster_health(info(), [member(running=True)])
    degraded = cluster_health(info(zones=2), [member(), member()])
    assert object_health(stat, recovering) == {"state": "recovering", "copies": 3, "held": 2}
    assert object_health(stat, degraded)["state"] == "degraded"
    stat["replicas"].append({"version": 1})
    assert object_health(stat, degraded)["state"] == "healthy"
    assert object_health({"copies": 2, "replicas": [{"error": "x"}, {"error": "y"}]},
                         degraded)["state"] == "unavailable"


def _storing(index: int, weight: int, capacity: int, used: int = 0, **more: Any) -> dict:
    return {"node_id": f"10.0.0.{index}:7000/{index:04x}", "address": f"10.0.0.{index}",
            "port": 7000, "zone": index, "weight": weight, "capacity": capacity,
            "used": used, "free": capacity - used, "status": "ok", **more}


def test_capacity_limits_name_the_node_that_fills_first_and_what_is_stranded():
    T = 1 << 40
    # Weights 1, 1, 2 on disks of 1, 1, 1: the third has half the copies (one copy)
    # for a third of the space, so it fills when the data is 2T.
    nodes = [_storing(0, T, T), _storing(1, T, T), _storing(2, 2 * T, T, used=T // 2)]
    limits = capacity_limits(nodes, 1)
    assert limits is not None
    assert limits["usable"] == 2 * T and limits["raw"] == 3 * T and limits["stranded"] == T
    assert limits["more"] == T  # its free half holds half the new data
    assert [item["index"] for item in limits["limiting"]] == [2]
    assert limits["limiting"][0]["copies_share"] == 0.5
    text = capacity_text(limits, lambda size: f"{size / T:g}T")
    assert text[0] == "Usable space: 2T of data at 1 copies (1T more can be written), from 3T raw"
    assert "Limited by node 2 (50.0% of the copies for 33.3% of the space)" in text[1]
    # Weights that follow the space strand nothing, and say nothing more.
    even = capacity_limits([_storing(i, T, T) for i in range(3)], 3)
    assert even is not None and even["stranded"] == 0 and len(capacity_text(even, str)) == 1
    assert even["usable"] == T  # 3 copies of every object, one per node
    # Unreachable and weightless nodes count for nothing; none left: no answer.
    assert capacity_limits([{**_storing(0, T, T), "status": "unreachable"},
                            _storing(1, 0, T)], 1) is None


def test_dogs_recovery_line_says_how_far_once():
    """'dog node recovery' (and --watch) add the totals to the health text only when it
    does not give them already (no pass running)."""
    from dog.node import _summary_text

    running = cluster_health(info(), [member(running=True, to_recover=2, recovered=1),
                                      member(), member()])
    assert _summary_text(running).count("objects done") == 1, _summary_text(running)
    idle = cluster_health(info(), [member(to_recover=30, recovered=2, skipped=28), member()])
    assert _summary_text(idle).endswith(" (30/30 objects done (2 copied, 28 needed no copy))")
