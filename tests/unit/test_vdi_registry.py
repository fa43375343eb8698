"""VDI metadata in the cluster state machine: validation, snapshots, locks, attributes.

Every op goes through apply(), which runs _check() after each one. Bases and
roots are made-up node oids: the registry only records what the gateway
resolved.
"""

from __future__ import annotations

from typing import Any

import pytest

from sheep import radix
from sheep.constants import GiB, KiB, MiB
from sheep.errors import Result
from sheep.vdi import Root
from sheep.vdi_registry import VdiRegistry, name_max_chars, vdi_size_max

object_size = 4 * MiB


class Registry:
    """A VdiRegistry with the cluster's fixed arguments filled in."""

    def __init__(self) -> None:
        self.registry = VdiRegistry()
        self.time = 1000.0

    def __call__(self, kind: str, **body: Any):
        self.time += 1
        return self.registry.apply(kind, body, self.time, 3, object_size, 3)

    def vdi(self, name: str):
        return self.registry.vdis[name]

    def snapshot(self, name: str, tag: str = "", base: int | None = None):
        vdi = self.vdi(name)
        if base is None:
            base = vdi.root.base
        return self("vdi_snapshot", name=name, tag=tag, generation=vdi.root.generation,
                    base=base)


@pytest.fixture
def r() -> Registry:
    registry = Registry()
    assert registry("vdi_create", name="base", size=1 * GiB).result == Result.SUCCESS
    return registry


def node(generation: int, depth: int = 1) -> int:
    return radix.node_oid(generation, depth, 0)


@pytest.mark.parametrize("name", ["", "x" * (name_max_chars + 1), "a b", "a/b", "é", "a:b",
                                  None, 7])
def test_bad_names_are_refused(r, name):
    outcome = r("vdi_create", name=name, size=MiB)
    assert outcome.result == Result.INVALID_PARMS
    assert outcome.message


def test_good_names():
    r = Registry()
    for name in ["a", "x" * name_max_chars, "vm-1_disk.raw", "0"]:
        assert r("vdi_create", name=name, size=MiB).result == Result.SUCCESS


def test_duplicate_name(r):
    outcome = r("vdi_create", name="base", size=MiB)
    assert outcome.result == Result.EXISTS and "base" in outcome.message


@pytest.mark.parametrize("size", [0, -1, vdi_size_max(object_size) + 1, "1G", 1.5, True, None])
def test_bad_sizes(r, size):
    assert r("vdi_create", name="new", size=size).result == Result.INVALID_PARMS


def test_the_largest_size_is_accepted():
    r = Registry()
    outcome = r("vdi_create", name="huge", size=vdi_size_max(object_size))
    assert outcome.result == Result.SUCCESS
    assert r.vdi("huge").root.depth == radix.DEPTH_MAX


def test_create_sets_depth_and_fresh_generation(r):
    assert r("vdi_create", name="two", size=5 * 1024 * object_size).result == Result.SUCCESS
    base, two = r.vdi("base"), r.vdi("two")
    assert base.root == Root(1, 1, 0)
    assert two.root == Root(2, 2, 0)
    assert r.registry.writable_generations() == {1, 2}


def test_copies(r):
    assert r("vdi_create", name="a", size=MiB, copies=2).result == Result.SUCCESS
    assert r.vdi("a").copies == 2
    assert r.vdi("base").copies == 3
    assert r("vdi_create", name="b", size=MiB, copies=9).result == Result.INVALID_PARMS


def test_unknown_vdi(r):
    for kind, body in [("vdi_delete", {"name": "nope"}),
                       ("vdi_snapshot", {"name": "nope", "generation": 1, "base": 0}),
                       ("vdi_clone", {"source": "nope", "snapshot": "s", "name": "c", "base": 0}),
                       ("vdi_rollback", {"name": "nope", "snapshot": "s", "base": 0}),
                       ("vdi_resize", {"name": "nope", "size": GiB}),
                       ("vdi_lock", {"name": "nope", "session": "s"}),
                       ("vdi_setattr", {"name": "nope", "key": "k", "value": "v"})]:
        outcome = r(kind, **body)
        assert outcome.result == Result.NO_VDI, kind
        assert "nope" in outcome.message


def test_unknown_snapshot(r):
    for kind, body in [("vdi_delete", {"name": "base", "snapshot": "s"}),
                       ("vdi_clone", {"source": "base", "snapshot": "s", "name": "c", "base": 0}),
                       ("vdi_rollback", {"name": "base", "snapshot": "s", "base": 0}),
                       ("vdi_rollback", {"name": "base", "snapshot": 99, "base": 0})]:
        assert r(kind, **body).result == Result.NO_TAG, (kind, body)


def test_snapshot_freezes_the_generation_and_starts_a_new_one(r):
    outcome = r.snapshot("base", "s1", base=node(1))
    assert outcome.result == Result.SUCCESS
    vdi = r.vdi("base")
    snap = vdi.snapshot("s1")
    assert snap is not None and snap.root == Root(1, 1, 0) and snap.size == GiB
    assert vdi.root == Root(2, 1, node(1))
    assert r.registry.writable_generations() == {2}
    assert r.registry.by_generation(1) is vdi
    assert vdi.snapshot(snap.id) is snap and vdi.snapshot(str(snap.id)) is snap


def test_snapshot_tags(r):
    assert r.snapshot("base", "s1").result == Result.SUCCESS
    assert r.snapshot("base", "s1").result == Result.EXISTS
    assert r.snapshot("base", "123").result == Result.INVALID_PARMS
    assert r.snapshot("base", "bad tag").result == Result.INVALID_PARMS
    assert r.snapshot("base", "").result == Result.SUCCESS, "untagged snapshots are allowed"
    assert r.snapshot("base", "").result == Result.SUCCESS
    assert len(r.vdi("base").snapshots) == 3


def test_snapshot_of_a_stale_generation_is_refused(r):
    outcome = r("vdi_snapshot", name="base", tag="s", generation=99, base=0)
    assert outcome.result == Result.UNAVAILABLE


def test_snapshot_needs_a_tree_node_as_base(r):
    for base in [None, -1, radix.data_oid(1, 0), "x"]:
        outcome = r("vdi_snapshot", name="base", tag="s", generation=1, base=base)
        assert outcome.result == Result.INVALID_PARMS, base


def test_clone(r):
    r.snapshot("base", "s1", base=node(1))
    snap = r.vdi("base").snapshot("s1")
    outcome = r("vdi_clone", source="base", snapshot="s1", name="c", base=node(1))
    assert outcome.result == Result.SUCCESS
    clone = r.vdi("c")
    assert clone.root == Root(3, 1, node(1)) and clone.size == GiB
    assert clone.parent == {"vdi": "base", "vdi_id": r.vdi("base").id, "snapshot": snap.id,
                            "tag": "s1"}
    by_id = r("vdi_clone", source="base", snapshot=snap.id, name="d", base=node(1))
    assert by_id.result == Result.SUCCESS
    assert r("vdi_clone", source="base", snapshot="s1", name="c", base=0).result == Result.EXISTS
    assert r("vdi_clone", source="base", snapshot="s1", name="",
             base=0).result == Result.INVALID_PARMS


def test_rollback(r):
    r.snapshot("base", "s1", base=node(1))
    r("vdi_resize", name="base", size=2 * GiB, root=r.vdi("base").root.to_json())
    outcome = r("vdi_rollback", name="base", snapshot="s1", base=node(1))
    assert outcome.result == Result.SUCCESS
    assert outcome.value["dead"] == [Root(2, 1, node(1)).to_json()]
    vdi = r.vdi("base")
    assert vdi.root == Root(3, 1, node(1)) and vdi.size == GiB
    assert r.registry.writable_generations() == {3}


def test_resize(r):
    root = Root(1, 2, 0)
    big = 2000 * object_size
    assert r("vdi_resize", name="base", size=big, root=root.to_json()).result == Result.SUCCESS
    assert r.vdi("base").size == big and r.vdi("base").root == root
    shrink = r("vdi_resize", name="base", size=GiB, root=root.to_json())
    assert shrink.result == Result.INVALID_PARMS and "grow" in shrink.message
    wrong_depth = r("vdi_resize", name="base", size=big + 1, root=Root(1, 3, 0).to_json())
    assert wrong_depth.result == Result.UNAVAILABLE
    stale = r("vdi_resize", name="base", size=big + 1, root=Root(7, 2, 0).to_json())
    assert stale.result == Result.UNAVAILABLE
    assert r("vdi_resize", name="base", size=0, root=root.to_json()).result == \
        Result.INVALID_PARMS


def test_delete_snapshot_and_vdi(r):
    r.snapshot("base", "s1", base=node(1))
    r.snapshot("base", "s2", base=node(2))
    outcome = r("vdi_delete", name="base", snapshot="s1")
    assert outcome.result == Result.SUCCESS
    assert outcome.value["dead"] == [Root(1, 1, 0).to_json()]
    assert [s.tag for s in r.vdi("base").snapshots] == ["s2"]
    outcome = r("vdi_delete", name="base")
    assert outcome.result == Result.SUCCESS
    assert outcome.value["dead"] == [Root(3, 1, node(2)).to_json(), Root(2, 1, node(1)).to_json()]
    assert r.registry.vdis == {}
    assert r("vdi_delete", name="base").result == Result.NO_VDI


def test_deleting_the_source_of_a_clone_keeps_the_clone(r):
    r.snapshot("base", "s1", base=node(1))
    r("vdi_clone", source="base", snapshot="s1", name="c", base=node(1))
    assert r("vdi_delete", name="base").result == Result.SUCCESS
    assert r.vdi("c").root.base == node(1)
    assert r.registry.writable_generations() == {r.vdi("c").root.generation}


def test_a_deleted_snapshots_generation_keeps_the_copies_of_the_vdi_sharing_it(r):
    """The VDI's tree started from the snapshot's: it still reaches that generation's
    objects after the snapshot is gone, so they keep the VDI's copies."""
    r("vdi_create", name="k", size=GiB, copies=2)
    frozen = r.vdi("k").root.generation
    r.snapshot("k", "s", base=node(frozen))
    assert r("vdi_delete", name="k", snapshot="s").result == Result.SUCCESS
    assert r.vdi("k").lineage == [frozen]
    assert r.registry.copies_by_generation()[frozen] == 2


def test_lineage_follows_snapshots_clones_and_rollbacks(r):
    r.snapshot("base", "s1", base=node(1))  # generation 1 frozen, 2 writable
    r.snapshot("base", "s2", base=node(2))  # 2 frozen, 3 writable
    assert r.vdi("base").lineage == [2, 1]
    assert r.vdi("base").snapshot("s2").lineage == [1]
    r("vdi_clone", source="base", snapshot="s2", name="c", base=node(2))
    assert r.vdi("c").lineage == [2, 1]
    r("vdi_rollback", name="base", snapshot="s1", base=node(1))
    assert r.vdi("base").lineage == [1]
    assert r.vdi("base").generations() == {1, 2, 5}  # its own, s1's, s2's


def test_a_generation_shared_by_vdis_with_different_copies_keeps_the_most(r):
    r.snapshot("base", "s1", base=node(1))
    r("vdi_clone", source="base", snapshot="s1", name="c", base=node(1))
    r.vdi("c").copies = 2  # clones take their source's copies today; this one differs
    r("vdi_delete", name="base")  # the clone alone reaches generation 1 now
    assert r.registry.copies_by_generation()[1] == 2
    r.vdi("c").copies = 1
    r.snapshot("c", "t", base=node(r.vdi("c").root.generation))
    r("vdi_clone", source="c", snapshot="t", name="d", base=node(1))
    r.vdi("d").copies = 3
    copies = r.registry.copies_by_generation()
    assert copies[1] == 3, "reached by c (1 copy) and d (3 copies)"
    assert copies[r.vdi("c").root.generation] == 1


def test_ids_and_generations_are_never_reused(r):
    r("vdi_delete", name="base")
    r("vdi_create", name="base", size=MiB)
    assert r.vdi("base").id == 2 and r.vdi("base").root.generation == 2


def test_lock(r):
    assert r("vdi_lock", name="base", node_id="n1", session="s1",
             owner="qemu on host1").result == Result.SUCCESS
    other = r("vdi_lock", name="base", node_id="n2", session="s2")
    assert other.result == Result.VDI_LOCKED
    assert "qemu on host1" in other.message
    assert r("vdi_lock", name="base", node_id="n1", session="s1").result == Result.SUCCESS
    assert r("vdi_delete", name="base", session="s2").result == Result.VDI_LOCKED
    assert r("vdi_rollback", name="base", snapshot="x", base=0).result == Result.NO_TAG


def test_lock_message_names_the_node_without_an_owner(r):
    r("vdi_lock", name="base", node_id="127.0.0.1:7001", session="s1")
    outcome = r("vdi_lock", name="base", node_id="n2", session="s2")
    assert outcome.result == Result.VDI_LOCKED and "127.0.0.1:7001" in outcome.message


def test_locked_vdi_refuses_rollback_and_delete_unless_forced_or_same_session(r):
    r.snapshot("base", "s1")
    r("vdi_lock", name="base", node_id="n1", session="s1")
    assert r("vdi_rollback", name="base", snapshot="s1", base=0,
             session="s2").result == Result.VDI_LOCKED
    assert r("vdi_rollback", name="base", snapshot="s1", base=0,
             session="s1").result == Result.SUCCESS
    assert r("vdi_delete", name="base").result == Result.VDI_LOCKED
    assert r("vdi_delete", name="base", force=True).result == Result.SUCCESS


def test_unlock(r):
    r("vdi_lock", name="base", node_id="n1", session="s1")
    r("vdi_unlock", name="base", session="s2")
    assert r.vdi("base").lock is not None, "only the holder's session unlocks"
    r("vdi_unlock", name="base", session="s1")
    assert r.vdi("base").lock is None
    r("vdi_lock", name="base", node_id="n1", session="s1")
    r("vdi_unlock", name="base")  # force-unlock
    assert r.vdi("base").lock is None


def test_release_node_drops_its_locks(r):
    r("vdi_create", name="other", size=MiB)
    r("vdi_lock", name="base", node_id="n1", session="s1")
    r("vdi_lock", name="other", node_id="n2", session="s2")
    assert r.registry.release_node("n1") == ["base"]
    assert r.vdi("base").lock is None and r.vdi("other").lock is not None
    assert r("vdi_lock", name="base", node_id="n3", session="s3").result == Result.SUCCESS


def test_a_settle_without_the_lock_clears_only_the_unsettling_it_began_after(r):
    """A reader settles with no lock: its vdi_settled names the release it saw. A writer
    that locked, died and so unsettled the VDI again meanwhile is not cleared by it."""
    r("vdi_lock", name="base", node_id="n1", session="s1")
    r.registry.release_node("n1")
    seen = r.vdi("base").releases
    assert r.vdi("base").unsettled and seen == 1
    r("vdi_lock", name="base", node_id="n2", session="s2")
    assert r("vdi_settled", name="base", session=None, releases=seen).result == Result.SUCCESS
    assert r.vdi("base").unsettled, "the lock is held: only its holder settles"
    r.registry.release_node("n2")
    r("vdi_settled", name="base", session=None, releases=seen)
    assert r.vdi("base").unsettled, "unsettled anew by a later release"
    r("vdi_settled", name="base", session=None, releases=r.vdi("base").releases)
    assert not r.vdi("base").unsettled


def test_setattr_and_delete_attr(r):
    assert r("vdi_setattr", name="base", key="k", value="v").result == Result.SUCCESS
    assert r.vdi("base").attrs == {"k": "v"}
    assert r("vdi_setattr", name="base", key="k", value="w").result == Result.SUCCESS
    assert r("vdi_setattr", name="base", key="k", value="x",
             exclusive=True).result == Result.EXISTS
    assert r.vdi("base").attrs == {"k": "w"}
    assert r("vdi_setattr", name="base", key="k").result == Result.SUCCESS
    assert r.vdi("base").attrs == {}
    assert r("vdi_setattr", name="base", key="k").result == Result.NO_OBJ
    assert r("vdi_setattr", name="base", key="", value="v").result == Result.INVALID_PARMS
    assert r("vdi_setattr", name="base", key="k",
             value="x" * (64 * KiB + 1)).result == Result.INVALID_PARMS


def test_to_json_round_trip(r):
    r.snapshot("base", "s1", base=node(1))
    r("vdi_clone", source="base", snapshot="s1", name="c", base=node(1))
    r("vdi_setattr", name="c", key="k", value="v")
    r("vdi_lock", name="base", node_id="n2", session="s2")
    r.registry.release_node("n2")
    r("vdi_lock", name="c", node_id="n1", session="s1", owner="me")
    r.snapshot("c", "t", base=node(1))
    value = r.registry.to_json()
    again = VdiRegistry.from_json(value)
    assert again.to_json() == value
    assert again.vdis == r.registry.vdis
    assert again.next_id == r.registry.next_id
    assert again.next_generation == r.registry.next_generation


def test_a_made_root_is_recorded_for_its_generation_and_tree_only(r):
    """vdi_root_made records that the writable generation's own root node exists; a
    snapshot keeps the record with the frozen root, the new generation starts without
    one, and a late record for an older generation or tree changes nothing."""
    assert r.vdi("base").root.made is False
    assert r("vdi_root_made", name="base", generation=1, depth=1).result == Result.SUCCESS
    assert r.vdi("base").root == Root(1, 1, 0, made=True)
    assert r.snapshot("base", "s1", base=node(1)).result == Result.SUCCESS
    vdi = r.vdi("base")
    assert vdi.snapshot("s1").root.made is True and vdi.root.made is False
    r("vdi_root_made", name="base", generation=1, depth=1)  # late: changes nothing
    r("vdi_root_made", name="base", generation=2, depth=2)  # another tree: nothing
    assert r.vdi("base").root == Root(2, 1, node(1), made=False)
    assert Root.from_json({"generation": 2, "depth": 1, "base": 0}).made is None  # old state
    assert Root.from_json(r.vdi("base").root.to_json()) == r.vdi("base").root


@pytest.mark.parametrize("ref", ["²", "9" * 5000, "1" * 21, "١"])
def test_a_snapshot_ref_that_is_no_id_finds_nothing_and_raises_nothing(r, ref):
    assert r.snapshot("base", "t").result == Result.SUCCESS
    assert r.vdi("base").snapshot(ref) is None
    outcome = r("vdi_delete", name="base", snapshot=ref)
    assert outcome.result == Result.NO_TAG



def test_change_maps_are_untracked_when_a_writer_could_not_save_them():
    r = Registry()
    registry = r.registry
    r("vdi_create", name="v", size=GiB)
    generation = r.vdi("v").root.generation
    assert registry.tracked(generation)
    r("vdi_lock", name="v", node_id="n1", session="s1")
    registry.release_node("n1")  # the holder's sheep died before it saved them
    assert not registry.tracked(generation)
    assert r.snapshot("v", "a").result == Result.SUCCESS
    fresh = r.vdi("v").root.generation
    assert registry.tracked(fresh)
    r("vdi_lock", name="v", node_id="n2", session="s2")
    r("vdi_unlock", name="v")  # forced: the holder's unsaved masks are lost
    assert not registry.tracked(fresh)
    r.snapshot("v", "b")
    third = r.vdi("v").root.generation
    r("vdi_lock", name="v", node_id="n2", session="s3")
    r("vdi_unlock", name="v", session="s3", untracked=True)  # its save failed
    assert not registry.tracked(third)
    r.snapshot("v", "c")
    fourth = r.vdi("v").root.generation
    r("vdi_lock", name="v", node_id="n2", session="s4")
    r("vdi_unlock", name="v", session="s4")  # a clean close saved them
    assert registry.tracked(fourth)
    # A state from before change maps: none of its generations has them.
    old = registry.to_json()
    del old["tracked_from"], old["untracked"]
    loaded = VdiRegistry.from_json(old)
    assert not any(loaded.tracked(g) for g in range(1, loaded.next_generation))
    loaded.apply("vdi_create", {"name": "w", "size": GiB}, 2000.0, 3, object_size, 3)
    assert loaded.tracked(loaded.vdis["w"].root.generation)


def test_trash_and_alter_copy():
    r = Registry()
    r("vdi_create", name="v", size=GiB)
    r("vdi_trash", name="v", expires_in=60)
    trash = r.vdi("v").trash
    assert trash is not None and trash["expires"] == trash["time"] + 60
    assert r.snapshot("v", "a").result == Result.NO_VDI
    assert r("vdi_create", name="v", size=MiB).result == Result.EXISTS
    assert r("vdi_delete", name="v").result == Result.NO_VDI
    # Purged only as it was trashed: not after it went back in with another expiry.
    assert r("vdi_delete", name="v", purge=True, expires=1.0).result == Result.INVALID_PARMS
    r("vdi_untrash", name="v")
    assert r("vdi_delete", name="v", purge=True).result == Result.INVALID_PARMS
    assert r("vdi_alter_copy", name="v", copies=4).result == Result.TOO_FEW_ZONES
    assert r("vdi_alter_copy", name="v", copies=0).result == Result.INVALID_PARMS
    r("vdi_alter_copy", name="v", copies=2)
    assert r.vdi("v").copies == 2 and r.vdi("v").own_copies
    r("vdi_create", name="w", size=GiB)
    r("vdi_create", name="x", size=GiB, copies=3)
    assert r.registry.follow_cluster_copies(3, 1) == ["w"]  # v and x have their own
    r("vdi_trash", name="v")
    assert r("vdi_delete", name="v", purge=True).result == Result.SUCCESS
    assert "v" not in r.registry.vdis


def test_rename_takes_the_snapshots_along_and_clones_follow(r):
    r.snapshot("base", "s1", base=node(1))
    r("vdi_clone", source="base", snapshot="s1", name="c", base=node(1))
    before = r.vdi("base")
    outcome = r("vdi_rename", name="base", new_name="renamed")
    assert outcome.result == Result.SUCCESS, outcome.message
    assert "base" not in r.registry.vdis
    vdi = r.vdi("renamed")
    assert vdi is before and vdi.name == "renamed" and [s.tag for s in vdi.snapshots] == ["s1"]
    assert r.vdi("c").parent == {"vdi": "renamed", "vdi_id": vdi.id,
                                 "snapshot": vdi.snapshot("s1").id, "tag": "s1"}
    assert r("vdi_create", name="base", size=MiB).result == Result.SUCCESS, "the old name is free"
    again = VdiRegistry.from_json(r.registry.to_json())
    assert again.to_json() == r.registry.to_json()


def test_rename_refusals(r):
    r("vdi_create", name="other", size=MiB)
    r("vdi_create", name="binned", size=MiB)
    r("vdi_trash", name="binned")
    cases = [({"name": "base", "new_name": "other"}, Result.EXISTS, "already exists"),
             ({"name": "base", "new_name": "binned"}, Result.EXISTS, "in the trash"),
             ({"name": "base", "new_name": "base"}, Result.EXISTS, "already exists"),
             ({"name": "base", "new_name": "a b"}, Result.INVALID_PARMS, "new VDI name"),
             ({"name": "base", "new_name": "x" * (name_max_chars + 1)}, Result.INVALID_PARMS,
              "longer than"),
             ({"name": "base", "new_name": None}, Result.INVALID_PARMS, "must not be empty"),
             ({"name": "base", "new_name": "base@s"}, Result.INVALID_PARMS, "may hold only"),
             ({"name": "nope", "new_name": "new"}, Result.NO_VDI, "no VDI named"),
             ({"name": "binned", "new_name": "new"}, Result.NO_VDI, "in the trash")]
    for body, result, words in cases:
        outcome = r("vdi_rename", **body)
        assert outcome.result == result and words in outcome.message, (body, outcome)
    r("vdi_lock", name="base", node_id="n1", session="s1", owner="qemu on host1")
    locked = r("vdi_rename", name="base", new_name="new")
    assert locked.result == Result.VDI_LOCKED and "in use by qemu on host1" in locked.message
    assert set(r.registry.vdis) == {"base", "other", "binned"}


def test_shrink_takes_the_flag_and_the_lock_and_keeps_the_depth(r):
    big = 2000 * object_size
    r("vdi_resize", name="base", size=big, root=Root(1, 2, 0).to_json())
    r.snapshot("base", "s1", base=node(1, 2))
    root = r.vdi("base").root
    assert r("vdi_resize", name="base", size=GiB, root=root.to_json(),
             session="s1").result == Result.INVALID_PARMS, "no shrink without asking"
    unlocked = r("vdi_resize", name="base", size=GiB, root=root.to_json(), shrink=True)
    assert unlocked.result == Result.UNAVAILABLE and "writer" in unlocked.message
    r("vdi_lock", name="base", node_id="n1", session="s1")
    assert r("vdi_resize", name="base", size=GiB, root=root.to_json(), shrink=True,
             session="s2").result == Result.VDI_LOCKED
    outcome = r("vdi_resize", name="base", size=GiB, root=root.to_json(), shrink=True,
                session="s1")
    assert outcome.result == Result.SUCCESS, outcome.message
    vdi = r.vdi("base")
    assert vdi.size == GiB and vdi.root == root and vdi.root.depth == 2, "the depth stays"
    assert vdi.snapshot("s1").size == big, "a snapshot keeps its size"
    # Growing again reuses the depth: a tree of depth 1 is no longer what it needs.
    assert r("vdi_resize", name="base", size=2 * GiB, root=Root(root.generation, 1,
             0).to_json(), session="s1").result == Result.UNAVAILABLE
    assert r("vdi_resize", name="base", size=2 * GiB, root=root.to_json(),
             session="s1").result == Result.SUCCESS
