"""The gauges read from a sheep's state when scraped (sheep/metrics.py)."""

from __future__ import annotations

from typing import Any

from sheep.metrics import _StateCollector


def remaining(recovery: dict[str, Any]) -> float:
    state = {"up": True, "recovery": recovery}
    for family in _StateCollector(lambda: state).collect():
        if family.name == "sheepdog_recovery_objects_remaining":
            return family.samples[0].value
    raise AssertionError("no sheepdog_recovery_objects_remaining")


def test_objects_remaining_counts_what_the_running_pass_has_left():
    assert remaining({"running": True, "to_recover": 23, "recovered": 2, "skipped": 5,
                      "failed": 1}) == 15


def test_a_pass_that_ended_leaves_nothing_remaining_but_copies_to_verify():
    """Objects it found nothing to copy for (removed meanwhile) are not left over: the
    gauge read 21 for good after a pass that copied 2 of 23."""
    assert remaining({"running": False, "to_recover": 23, "recovered": 2, "skipped": 21}) == 0
    assert remaining({"running": False, "to_recover": 23, "recovered": 2, "unverified": 4}) == 4
