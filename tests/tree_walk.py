"""Describe a directory tree entry by entry, so a mount and an unpack can be compared."""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from pathlib import Path


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def _content(path: str, info: os.stat_result) -> str:
    if stat.S_ISREG(info.st_mode):
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    if stat.S_ISLNK(info.st_mode):
        return "-> " + os.readlink(path)
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        return f"dev {os.major(info.st_rdev)},{os.minor(info.st_rdev)}"
    return ""


def describe_tree(root: Path, skip_dir_mtime: bool = False) -> dict[str, tuple[object, ...]]:
    """Returns {relative path: (mode, uid, gid, size, mtime, content, xattrs, hardlink group)}.

    The hardlink group is the sorted list of paths sharing the entry's inode, for files
    with more than one link, so groups compare across trees whatever the inode numbers.
    """
    rows: dict[str, list[object]] = {}
    by_inode: dict[int, list[str]] = defaultdict(list)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            rel = os.path.relpath(full, root)
            size = info.st_size if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode) else 0
            mtime = None if skip_dir_mtime and stat.S_ISDIR(info.st_mode) else info.st_mtime_ns
            rows[rel] = [info.st_mode, info.st_uid, info.st_gid, size, mtime, _content(full, info), _xattrs(full)]
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                by_inode[info.st_ino].append(rel)
    groups = {p: tuple(sorted(ps)) for ps in by_inode.values() for p in ps}
    return {p: (*row, groups.get(p, ())) for p, row in rows.items()}
