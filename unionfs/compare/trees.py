"""What differs between two merged trees, path by path: pure logic over the records of both
trees, with no image, file or registry in sight.

A path only in the first tree is removed ('D'), only in the second added ('A'), in both but
unlike modified ('M', with the fields that differ). Fields compare what lstat and a read show
through a mount: type, permission bits, owner, size (of files and symlinks, as lstat gives it),
mtime, the bytes of a regular file, a symlink's target, a device's numbers, the xattrs and the
hardlink group (the sorted paths that share the inode). Whether two files hold the same bytes is
the caller's question to answer (`SameContent`): it may know without reading any.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from unionfs.api.image import FileStat

ADDED, REMOVED, MODIFIED = "A", "D", "M"
# The fields a change can name, in the order they are reported.
FIELDS = ("type", "mode", "uid", "gid", "size", "content", "target", "device", "xattrs", "hardlinks", "mtime")


@dataclass(frozen=True, slots=True)
class Record:
    """One path of a tree: its lstat, xattrs and hardlink group."""

    stat: FileStat
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    hardlinks: tuple[str, ...] = ()  # every path of the inode, for a file with more than one


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether two regular files of the same size hold the same bytes, and how that was found:
    'location' (the same bytes of the same layer), 'chunk digests' (eStargz), 'sha256' (both
    read and hashed). The digests are 'sha256:...' where the bytes were hashed, else None."""

    equal: bool
    how: str
    old_digest: str | None = None
    new_digest: str | None = None


SameContent = Callable[[FileStat, FileStat], Verdict]


@dataclass(frozen=True, slots=True)
class FieldChange:
    name: str  # one of FIELDS
    old: object
    new: object


@dataclass(frozen=True, slots=True)
class Change:
    path: str  # clean, relative to the root ('' is the root)
    status: str  # ADDED, REMOVED or MODIFIED
    kind: str  # the entry's kind: the new one, or the old one of a removed path
    fields: tuple[FieldChange, ...] = ()


def compare(old: Mapping[str, Record], new: Mapping[str, Record], same_content: SameContent,
            ignore_mtime: bool = False) -> Iterator[Change]:  # fmt: skip
    """The changes from tree `old` to tree `new` (path -> record), in path order."""
    for path in sorted(old.keys() | new.keys(), key=_path_order):
        before, after = old.get(path), new.get(path)
        if before is None:
            assert after is not None
            yield Change(path, ADDED, after.stat.kind)
        elif after is None:
            yield Change(path, REMOVED, before.stat.kind)
        else:
            fields = tuple(field_changes(before, after, same_content, ignore_mtime))
            if fields:
                yield Change(path, MODIFIED, after.stat.kind, fields)


def _path_order(path: str) -> list[str]:
    """Sorts a directory's entries right after it ('a', 'a/b', 'a-b'), as `find` lists them."""
    return path.split("/")


def field_changes(before: Record, after: Record, same_content: SameContent,
                  ignore_mtime: bool = False) -> Iterator[FieldChange]:  # fmt: skip
    """The fields of one path that differ, in FIELDS order."""
    a, b = before.stat, after.stat
    same_kind = a.kind == b.kind
    if not same_kind:
        yield FieldChange("type", a.kind, b.kind)
    yield from _differ("mode", stat.S_IMODE(a.mode), stat.S_IMODE(b.mode))
    yield from _differ("uid", a.uid, b.uid)
    yield from _differ("gid", a.gid, b.gid)
    if same_kind:
        yield from _same_kind_changes(a, b, same_content)
    if before.xattrs != after.xattrs:
        yield FieldChange("xattrs", dict(before.xattrs), dict(after.xattrs))
    yield from _differ("hardlinks", before.hardlinks, after.hardlinks)
    if not ignore_mtime:
        yield from _differ("mtime", a.mtime_ns, b.mtime_ns)


def _same_kind_changes(a: FileStat, b: FileStat, same_content: SameContent) -> Iterator[FieldChange]:
    """Size, bytes, target or device numbers of two entries of one kind."""
    if a.is_file or a.is_symlink:
        yield from _differ("size", a.size, b.size)
    if a.is_file:
        if a.size != b.size:
            yield FieldChange("content", None, None)  # different without reading a byte
        else:
            verdict = same_content(a, b)
            if not verdict.equal:
                yield FieldChange("content", verdict.old_digest, verdict.new_digest)
    elif a.is_symlink:
        yield from _differ("target", a.link_target, b.link_target)
    elif a.kind in ("char", "block"):
        yield from _differ("device", _device(a.rdev), _device(b.rdev))


def _differ(name: str, old: object, new: object) -> Iterator[FieldChange]:
    if old != new:
        yield FieldChange(name, old, new)


def _device(rdev: int) -> str:
    return f"{os.major(rdev)},{os.minor(rdev)}"


def hardlink_groups(stats: Mapping[str, FileStat]) -> dict[str, tuple[str, ...]]:
    """path -> the sorted paths sharing its inode, for regular files with more than one path."""
    by_inode: dict[int, list[str]] = {}
    for path, entry in stats.items():
        if entry.is_file and entry.nlink > 1:
            by_inode.setdefault(entry.ino, []).append(path)
    return {path: tuple(sorted(paths)) for paths in by_inode.values() if len(paths) > 1 for path in paths}
