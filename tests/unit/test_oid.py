"""Object ids: type, generation and index packed into 64 bits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheep import constants
from sheep.oid import (
    GENERATION_MAX,
    INDEX_MAX,
    ObjectType,
    format_oid,
    make_oid,
    oid_generation,
    oid_index,
    oid_type,
)

generations = st.integers(0, GENERATION_MAX)
indexes = st.integers(0, INDEX_MAX)


def test_layout_fills_64_bits():
    assert 2**constants.generation_bits - 1 == GENERATION_MAX
    assert 2**constants.index_bits - 1 == INDEX_MAX
    assert max(ObjectType) < 16, "the type has 4 bits"
    assert make_oid(max(ObjectType), GENERATION_MAX, INDEX_MAX) < 2**64


@given(st.sampled_from(ObjectType), generations, indexes)
def test_round_trip(kind, generation, index):
    oid = make_oid(kind, generation, index)
    assert 0 <= oid < 2**64
    assert oid_type(oid) == kind
    assert oid_generation(oid) == generation
    assert oid_index(oid) == index
    assert len(format_oid(oid)) == 16
    assert int(format_oid(oid), 16) == oid


@given(st.integers(0, 2**64 - 1))
def test_every_oid_decomposes(oid):
    assert make_oid(oid_type(oid), oid_generation(oid), oid_index(oid)) == oid


@given(st.sampled_from(ObjectType), generations, indexes, generations, indexes)
def test_distinct_fields_give_distinct_oids(kind, generation, index, other_generation,
                                            other_index):
    same = (generation, index) == (other_generation, other_index)
    assert (make_oid(kind, generation, index) == make_oid(kind, other_generation, other_index)) \
        == same


def test_known_layout():
    assert make_oid(ObjectType.DATA, 1, 2) == 0x1000_0001_0000_0002
    assert format_oid(make_oid(ObjectType.INODE, 0xABC, 7)) == "30000abc00000007"


@pytest.mark.parametrize(("generation", "index"), [
    (-1, 0), (GENERATION_MAX + 1, 0), (0, -1), (0, INDEX_MAX + 1),
])
def test_bounds_are_asserted(generation, index):
    with pytest.raises(AssertionError):
        make_oid(ObjectType.DATA, generation, index)
