"""Radix-tree geometry and node format: depth, paths, node names, encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sheep import radix
from sheep.oid import GENERATION_MAX, INDEX_MAX

indexes = st.integers(0, INDEX_MAX)
generations = st.integers(0, GENERATION_MAX)
levels = st.integers(1, radix.DEPTH_MAX)


def test_node_is_8_kib_of_1024_entries():
    assert radix.FANOUT == 1024
    assert radix.NODE_BYTES == 8192
    assert radix.capacity(radix.DEPTH_MAX) == INDEX_MAX + 1


@pytest.mark.parametrize(("objects", "depth"), [
    (0, 1), (1, 1), (1024, 1), (1025, 2), (1024**2, 2), (1024**2 + 1, 3),
    (1024**3, 3), (1024**3 + 1, 4), (INDEX_MAX + 1, 4),
])
def test_depth_for(objects, depth):
    assert radix.depth_for(objects) == depth


@given(st.integers(0, INDEX_MAX + 1))
def test_depth_is_the_fewest_levels_that_cover(objects):
    depth = radix.depth_for(objects)
    assert radix.capacity(depth) >= objects
    if depth > 1:
        assert radix.capacity(depth - 1) < objects


def test_depth_for_refuses_past_the_index_space():
    with pytest.raises(AssertionError):
        radix.depth_for(INDEX_MAX + 2)


@given(indexes)
def test_path_positions_and_slots_agree_at_every_level(index):
    depth = radix.depth_for(index + 1)
    assert radix.position(index, depth) == 0, "the root is position 0"
    for level in range(depth, 1, -1):
        parent = radix.position(index, level)
        entry = radix.slot(index, level)
        assert 0 <= entry < radix.FANOUT
        assert radix.child_position(parent, entry) == radix.position(index, level - 1)
    assert radix.position(index, 0) == index
    assert radix.child_position(radix.position(index, 1), radix.slot(index, 1)) == index


@given(indexes, indexes)
def test_indexes_share_a_leaf_exactly_when_they_share_its_1024_block(a, b):
    assert (radix.position(a, 1) == radix.position(b, 1)) == (a // 1024 == b // 1024)


@given(generations, levels, indexes)
def test_node_oid_round_trip(generation, level, index):
    position = radix.position(index, level)
    oid = radix.node_oid(generation, level, position)
    assert radix.is_tree(oid) and not radix.is_data(oid)
    assert radix.generation_of(oid) == generation
    assert radix.node_level(oid) == level
    assert radix.node_position(oid) == position


@given(generations, indexes)
def test_data_oid(generation, index):
    oid = radix.data_oid(generation, index)
    assert radix.is_data(oid) and not radix.is_tree(oid)
    assert radix.generation_of(oid) == generation
    assert oid != radix.node_oid(generation, 1, radix.position(index, 1))


def test_node_oid_refuses_bad_levels_and_positions():
    for level, position in [(0, 0), (radix.DEPTH_MAX + 1, 0), (1, radix.POSITION_MAX + 1)]:
        with pytest.raises(AssertionError):
            radix.node_oid(1, level, position)


@settings(max_examples=20)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=radix.FANOUT, max_size=radix.FANOUT))
def test_encode_decode_node(entries):
    data = radix.encode_node(entries)
    assert len(data) == radix.NODE_BYTES
    assert radix.decode_node(data) == entries
    assert radix.decode_node(memoryview(data)) == entries


def test_decode_pads_short_reads_with_zeros():
    assert radix.decode_node(b"") == [0] * radix.FANOUT
    assert radix.decode_node(radix.entry_bytes(7)) == [7] + [0] * (radix.FANOUT - 1)


def test_encode_refuses_a_wrong_entry_count():
    with pytest.raises(AssertionError):
        radix.encode_node([0] * (radix.FANOUT - 1))


def test_entry_bytes_is_little_endian_u64():
    assert radix.entry_bytes(1) == b"\x01" + bytes(7)
    oid = radix.node_oid(5, 2, 3)
    data = radix.encode_node([0, oid] + [0] * (radix.FANOUT - 2))
    assert data[8:16] == radix.entry_bytes(oid)


def test_check_entry():
    data = radix.data_oid(3, 9)
    leaf = radix.node_oid(3, 1, 0)
    middle = radix.node_oid(3, 2, 0)
    for level in range(1, radix.DEPTH_MAX + 1):
        radix.check_entry(level, 0)
    radix.check_entry(1, data)
    radix.check_entry(2, leaf)
    radix.check_entry(3, middle)
    for level, child in [(1, leaf), (2, data), (2, middle), (3, leaf), (4, middle)]:
        with pytest.raises(AssertionError):
            radix.check_entry(level, child)
