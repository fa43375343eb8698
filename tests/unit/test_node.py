"""Node identity helpers: whether a connection comes from a member's host."""

from __future__ import annotations

import pytest

from sheep.node import NodeInfo, from_member

members = [NodeInfo("10.0.0.1:7000/aa", "10.0.0.1", 7000, 1, 16),
           NodeInfo("[fd00::2]:7000/bb", "fd00::2", 7000, 2, 16)]


@pytest.mark.parametrize("peer", [("10.0.0.1", 51000), ("::ffff:10.0.0.1", 51000, 0, 0),
                                  ("fd00::2", 51000, 0, 0), ("fd00:0::2", 1, 0, 0)])
def test_a_members_address_from_any_port(peer):
    assert from_member(peer, members)


@pytest.mark.parametrize("peer", [("10.0.0.9", 7000), ("fd00::3", 7000, 0, 0), "", None, (),
                                  "/run/sheep.sock", (b"10.0.0.1", 7000)])
def test_other_addresses_and_unix_sockets_are_not_members(peer):
    assert not from_member(peer, members)


def test_no_members_no_member():
    assert not from_member(("10.0.0.1", 7000), [])
