"""The compact tree and its saved form in the cache: a second build loads what the first
merged, a damaged file is merged again (never served), and lookups hold up at the edges."""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path

import pytest

from registry.local import resolve_image
from registry.manifest import Platform
from registry.reference import ImageReference
from tests.merge_helpers import merge_tars
from tests.tarvocab import d, dev, f, hl, sym, wh
from tests.test_sources import oci_layout
from unionfs import build as build_module
from unionfs.build import build
from unionfs.storage.layer_store import LayerStore
from unionfs.storage.sealed import DamagedCacheFile, seal, unsealed
from unionfs.tree import FORMAT, INODE_ARRAYS, ROOT, CorruptTreeError, MergedTree, listing_block_size

RICH = [d("etc"), f("etc/hosts", b"h"), sym("etc/mtab", "/proc/mounts"), dev("dev/null", "c", 1, 3),
        f("bin/a", b"a", xattrs={"user.x": "\xff\x00v"}), hl("bin/b", "bin/a"), f("caf\xe9", b"latin")]  # fmt: skip


def tree_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "cache" / "trees").rglob("*.tree"))


def snapshot(tree: MergedTree) -> dict[str, tuple[object, ...]]:
    return {p: (i.ino, i.nlink, i.entry.mode, i.entry.size, i.entry.link, i.entry.rdev, dict(i.entry.xattrs),
                i.entry.layer, i.entry.offset) for p, i in tree.items()}  # fmt: skip


def test_a_second_build_loads_the_saved_tree_and_merges_nothing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    image = resolve_image(ImageReference.parse(oci_layout(tmp_path)), Platform.host())
    first = build(image, LayerStore(tmp_path / "cache", print))
    assert len(tree_files(tmp_path)) == 1

    def no_merge(*args: object) -> None:
        raise AssertionError("merged again although the tree was saved")

    monkeypatch.setattr(build_module, "merged_tree", no_merge)
    second = build(image, LayerStore(tmp_path / "cache", print))
    assert snapshot(second.tree) == snapshot(first.tree)
    entry = second.tree.lookup("/var/log").entry
    assert second.content.read(entry, 0, entry.size) == first.content.read(entry, 0, entry.size)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "last-byte-flipped"])
def test_a_damaged_saved_tree_is_merged_again_with_a_warning(tmp_path: Path, damage: str) -> None:
    image = resolve_image(ImageReference.parse(oci_layout(tmp_path)), Platform.host())
    first = build(image, LayerStore(tmp_path / "cache", print))
    saved = tree_files(tmp_path)[0]
    data = saved.read_bytes()
    flipped = data[:-1] + bytes([data[-1] ^ 0x01])  # in the names: the tree still parses, its digest fails
    saved.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b"",
                       "last-byte-flipped": flipped}[damage])  # fmt: skip
    warnings: list[str] = []
    again = build(image, LayerStore(tmp_path / "cache", warnings.append))
    assert snapshot(again.tree) == snapshot(first.tree)
    assert any("merging again" in w for w in warnings)
    assert saved.read_bytes() == data  # and saved whole again


def test_unsealed_throws_away_what_was_made_of_a_damaged_payload() -> None:
    """The digest is computed beside the parse: a payload that fails it is refused whether
    the parse of it succeeded or failed; an intact one's parse error is the parse's."""
    sealed = seal("tree x", b"payload bytes")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 0x01])

    def fails(_: memoryview) -> bytes:
        raise ValueError("cannot parse")

    assert unsealed("tree x", sealed, bytes) == b"payload bytes"
    for use in (bytes, fails):
        with pytest.raises(DamagedCacheFile, match="digest"):
            unsealed("tree x", flipped, use)
    with pytest.raises(ValueError, match="cannot parse"):
        unsealed("tree x", sealed, fails)
    with pytest.raises(DamagedCacheFile, match="not the file of tree y"):
        unsealed("tree y", sealed, bytes)


def test_out_of_range_numbers_in_saved_bytes_are_refused() -> None:
    data = merge_tars(RICH)[0].to_bytes()
    header_end = len(FORMAT) + 8 + int.from_bytes(data[len(FORMAT) : len(FORMAT) + 8], "little")
    header = json.loads(data[len(FORMAT) + 8 : header_end])
    slots_at = header_end + sum(header["arrays"][n] * array(t).itemsize for n, t in INODE_ARRAYS.items())
    bad = bytearray(data)
    bad[slots_at : slots_at + 4] = (10**6).to_bytes(4, sys.byteorder)  # slot 0 names inode 10**6
    for damaged in (bytes(bad), data[:-3], FORMAT + (10**6).to_bytes(8, "little") + b"{}", b"x" + data[1:]):
        with pytest.raises(CorruptTreeError):
            MergedTree.from_bytes(damaged)


def test_a_tree_loaded_from_bytes_that_can_change_does_not_change_with_them() -> None:
    """A loaded tree reads its arrays in place in the saved bytes (no second copy of them in
    memory): from a bytearray, which can change after, it must read a copy instead."""
    tree = merge_tars(RICH)[0]
    buffer = bytearray(tree.to_bytes())
    loaded = MergedTree.from_bytes(buffer)
    before = snapshot(loaded)
    buffer[len(FORMAT) :] = bytes(len(buffer) - len(FORMAT))  # every array and name zeroed
    assert snapshot(loaded) == before == snapshot(tree)
    in_place = MergedTree.from_bytes(tree.to_bytes())
    assert snapshot(in_place) == before
    assert in_place.to_bytes() == tree.to_bytes()  # its views save as the arrays did


@pytest.mark.parametrize("lazy", [{0}, {0, 1}])
def test_a_saved_tree_whose_lazy_files_are_not_in_its_chunk_table_is_refused(lazy: set[int]) -> None:
    """Marked lazy, the layers' files name chunk-table files by their offsets (tar offsets
    here, the table empty): refused whether every inode is in a lazy layer or only some."""
    tree, _ = merge_tars(RICH, [f("usr/extra", b"x" * 100)])
    tree.mark_lazy(frozenset(lazy), {})
    with pytest.raises(CorruptTreeError, match="chunk file out of range"):
        MergedTree.from_bytes(tree.to_bytes())


def test_a_saved_tree_whose_directory_slots_run_past_the_end_is_refused() -> None:
    data = merge_tars(RICH)[0].to_bytes()
    header_end = len(FORMAT) + 8 + int.from_bytes(data[len(FORMAT) : len(FORMAT) + 8], "little")
    header = json.loads(data[len(FORMAT) + 8 : header_end])
    before = list(INODE_ARRAYS)[: list(INODE_ARRAYS).index("first_slot")]  # the arrays saved ahead of it
    first_slot_at = header_end + sum(header["arrays"][n] * array(INODE_ARRAYS[n]).itemsize for n in before)
    bad = bytearray(data)
    bad[first_slot_at : first_slot_at + 4] = (10**6).to_bytes(4, sys.byteorder)  # the root's names start past the end
    with pytest.raises(CorruptTreeError, match="slot out of range"):
        MergedTree.from_bytes(bytes(bad))


def test_lookups_at_the_edges() -> None:
    tree, _ = merge_tars(RICH, [wh("etc/hosts")])
    etc = tree.child(ROOT, b"etc")
    assert etc is not None
    assert tree.child(etc, b"hosts") is None  # whited out
    assert tree.child(etc, b"mtab") is not None and tree.link(tree.child(etc, b"mtab") or 0) == "/proc/mounts"
    assert tree.child(etc, b"..") == ROOT and tree.child(etc, b".") == etc and tree.parent(ROOT) == ROOT
    assert tree.child(etc, b"") is None and tree.child(etc, b"zzzz") is None and tree.child(etc, b"a") is None
    assert tree.child(ROOT, "café".encode()) is not None and tree.child(ROOT, "café".encode("latin-1")) is None
    assert [name for name, _ in tree.children(ROOT)] == sorted(name for name, _ in tree.children(ROOT))
    a, b = tree.child(tree.child(ROOT, b"bin") or 0, b"a"), tree.child(tree.child(ROOT, b"bin") or 0, b"b")
    assert a == b and tree.attributes(a or 0).nlink == 2
    assert tree.xattrs(a or 0) == {"user.x": "\xff\x00v".encode()}
    null = tree.attributes(tree.child(tree.child(ROOT, b"dev") or 0, b"null") or 0)
    assert (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
    for ino in (0, -1, tree.inode_count + 1):
        with pytest.raises(KeyError):
            tree.attributes(ino)


def test_a_listing_with_attributes_says_what_each_child_alone_would() -> None:
    tree, _ = merge_tars(RICH, [wh("etc/hosts")])
    for directory in (ino for ino in range(1, tree.inode_count + 1) if tree.is_dir(ino)):
        for start in (0, 1):
            expected = [(name, child, tree.mode(child), tuple(tree.attributes(child)))
                        for name, child in list(tree.children(directory))[start:]]  # fmt: skip
            assert list(tree.listed_children(directory, start)) == expected
    with pytest.raises(KeyError):
        next(tree.listed_children(tree.inode_count + 1))


def test_a_directory_whose_listing_outgrows_32_kib_says_how_large_it_is() -> None:
    names = [f"name-{i:04d}".encode() for i in range(600)]  # 600 * (152 + 16) bytes of READDIRPLUS
    tree, _ = merge_tars([d("big"), *(f(f"big/{n.decode()}", b"") for n in names), d("small"), f("small/a", b"")])
    big, small = tree.child(ROOT, b"big") or 0, tree.child(ROOT, b"small") or 0
    assert tree.attributes(big).blksize == 128 * 1024  # the power of two that holds ~100 KiB
    assert tree.attributes(small).blksize == 0 and tree.attributes(tree.child(small, b"a") or 0).blksize == 0
    assert {name: values[8] for name, _, _, values in tree.listed_children(ROOT)} == {b"big": 128 * 1024,
                                                                                      b"small": 0}  # fmt: skip
    assert listing_block_size(0, 0) == 0 and listing_block_size(10**6, 10**7) == 1 << 20  # glibc's cap
