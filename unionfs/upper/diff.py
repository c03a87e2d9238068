"""Read an upper directory in OCI diff form as the tar members of one layer.

An upper directory holds new and changed files as files, deletions as empty `.wh.NAME`
files, and a directory that replaces a lower one marked opaque by an empty `.wh..wh..opq`
inside it (the OCI image spec's layer.md). What an unprivileged user cannot set on disk
(another owner, a device node, setuid bits on a file owned by someone else) is kept in the
`user.containers.override_stat` xattr, the convention of rootless podman's storage that
fuse-overlayfs reads (see parse_override_stat).

The walk is pure reading: it yields members in a sorted, deterministic order and never
follows a symlink, so nothing outside the directory is read.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from unionfs.storage.tar_index import XATTR_PAX_PREFIX
from whiteout.markers import OPAQUE_MARKER, WHITEOUT_PREFIX

OVERRIDE_STAT_XATTR = "user.containers.override_stat"
METACOPY_XATTR = "user.crfs-merge.metacopy"  # see unionfs/upper/store.py
IMAGE_XATTR = "user.crfs-merge.image"  # see unionfs/upper/binding.py
_OWN_XATTRS = frozenset({OVERRIDE_STAT_XATTR, METACOPY_XATTR, IMAGE_XATTR})
# The fourth field of an override, the file's real type, for those a regular file on disk
# stands in for; "file", "dir" and "symlink" must agree with what is on disk.
_STAND_IN_TYPES = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "pipe": tarfile.FIFOTYPE}
_DISK_TYPES = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
               "block": stat.S_IFBLK, "pipe": stat.S_IFIFO, "socket": stat.S_IFSOCK}  # fmt: skip


class UpperDirError(ValueError):
    """An upper directory that is not a valid diff; the message names the entry."""


@dataclass(frozen=True, slots=True)
class OverrideStat:
    """What `user.containers.override_stat` says a file really is."""

    uid: int
    gid: int
    mode: int  # permission bits with setuid/setgid/sticky, no type bits
    kind: str | None = None  # file, dir, symlink, pipe, socket, char, block; None: as on disk
    major: int = 0
    minor: int = 0


def parse_override_stat(text: str) -> OverrideStat:
    """Returns the override that `text` spells; raises ValueError if it is malformed.

    The format is fuse-overlayfs's (utils.c, override_mode(): it scans "%d:%d:%o", so uid
    and gid in decimal and the mode in octal) with the optional fourth field that
    containers/storage writes for rootless storage and newer fuse-overlayfs reads: the
    type, one of file, dir, symlink, pipe, socket, block-MAJOR-MINOR, char-MAJOR-MINOR.
    """
    fields = text.strip().rstrip("\0").split(":")
    if len(fields) not in (3, 4):
        raise ValueError(f"override_stat {text!r}: want uid:gid:mode[:type]")
    try:
        uid, gid, mode = int(fields[0], 10), int(fields[1], 10), int(fields[2], 8)
    except ValueError:
        raise ValueError(f"override_stat {text!r}: uid and gid are decimal, mode octal") from None
    if uid < 0 or gid < 0 or mode & ~0o7777:
        raise ValueError(f"override_stat {text!r}: owner or mode out of range")
    if len(fields) == 3:
        return OverrideStat(uid, gid, mode)
    kind, major, minor = _parse_kind(fields[3], text)
    return OverrideStat(uid, gid, mode, kind, major, minor)


def _parse_kind(field: str, text: str) -> tuple[str, int, int]:
    name, _, numbers = field.partition("-")
    if name in ("char", "block"):
        major, dash, minor = numbers.partition("-")
        if dash and major.isdigit() and minor.isdigit():
            return name, int(major), int(minor)
    elif name in ("file", "dir", "symlink", "pipe", "socket") and not numbers:
        return name, 0, 0
    raise ValueError(f"override_stat {text!r}: unknown type {field!r}")


@dataclass(frozen=True, slots=True)
class LayerMember:
    """One tar member of the layer, and the file its data comes from (regular files): a file
    of the upper directory, or for a metadata-only copy the image's file at `image_path`."""

    info: tarfile.TarInfo
    source: str | None = None
    image_path: str | None = None


ImageBytes = Callable[[str, int], Iterator[bytes]]
"""Yields the bytes of the image's file at a path, which must be of the given size."""


Warn = Callable[[str], None]


def upper_members(root: str, warn: Warn) -> Iterator[LayerMember]:
    """Yields the members of the layer that the upper directory `root` is, parents before
    children and names in byte order; raises UpperDirError for what no layer can say."""
    if not os.path.isdir(root):
        raise UpperDirError(f"{root}: the upper directory is missing or not a directory")
    first_names: dict[tuple[int, int], str] = {}  # (dev, inode) -> the name a hardlink points to
    yield from _walk(root, "", first_names, warn)


def _walk(root: str, relative: str, first_names: dict[tuple[int, int], str], warn: Warn) -> Iterator[LayerMember]:
    directory = os.path.join(root, relative) if relative else root
    names = sorted(os.listdir(directory), key=os.fsencode)
    present = set(names)
    for name in names:
        path, arcname = os.path.join(directory, name), f"{relative}{name}"
        info = os.lstat(path)
        if name.startswith(WHITEOUT_PREFIX):
            yield LayerMember(_marker(path, arcname, info, present))
            continue
        member = _member(path, arcname, info, first_names, warn)
        if member is None:
            continue
        yield member
        if member.info.isdir():
            yield from _walk(root, arcname + "/", first_names, warn)


def _marker(path: str, arcname: str, info: os.stat_result, present: set[str]) -> tarfile.TarInfo:
    """Returns the spec's empty regular file for a whiteout or an opaque marker."""
    if not stat.S_ISREG(info.st_mode) or info.st_size:
        raise UpperDirError(f"{path}: a whiteout must be an empty regular file")
    name = os.path.basename(arcname)
    hidden = name.removeprefix(WHITEOUT_PREFIX)
    if name != OPAQUE_MARKER and hidden in present:
        raise UpperDirError(f"{path}: whites out {hidden!r}, which the upper directory also holds")
    if name != OPAQUE_MARKER and (not hidden or hidden.startswith(WHITEOUT_PREFIX)):
        raise UpperDirError(f"{path}: not a whiteout the OCI spec knows")
    marker = tarfile.TarInfo(arcname)
    marker.mode, marker.mtime = 0o644, int(info.st_mtime)
    return marker


def _member(path: str, arcname: str, info: os.stat_result, first_names: dict[tuple[int, int], str],
            warn: Warn) -> LayerMember | None:  # fmt: skip
    if stat.S_ISSOCK(info.st_mode):
        warn(f"{path}: a socket, which a layer cannot hold; skipped")
        return None
    override = _override(path, info)
    tar = tarfile.TarInfo(arcname)
    tar.uid, tar.gid = (override.uid, override.gid) if override else (info.st_uid, info.st_gid)
    tar.mode = override.mode if override else stat.S_IMODE(info.st_mode)
    tar.pax_headers = _xattrs(path, info)
    _set_mtime(tar, info.st_mtime_ns)
    if override and override.kind == "socket":
        warn(f"{path}: a socket, which a layer cannot hold; skipped")
        return None
    if override and override.kind in _STAND_IN_TYPES:
        tar.type = _STAND_IN_TYPES[override.kind]
        tar.devmajor, tar.devminor = override.major, override.minor
        return LayerMember(tar)
    key = (info.st_dev, info.st_ino)
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1 and key in first_names:
        tar.type, tar.linkname = tarfile.LNKTYPE, first_names[key]
        return LayerMember(tar)
    if stat.S_ISREG(info.st_mode):
        first_names[key] = arcname
        tar.size = info.st_size
        image_path = _metacopy_source(path)
        return LayerMember(tar, None, image_path) if image_path is not None else LayerMember(tar, path)
    _set_type(tar, path, info)
    return LayerMember(tar)


def _set_mtime(tar: tarfile.TarInfo, nanoseconds: int) -> None:
    """The mtime to the nanosecond: a PAX record where there is a fraction of a second (as
    containerd writes them), so that the committed image shows the times the mount showed."""
    seconds, fraction = divmod(nanoseconds, 1_000_000_000)
    tar.mtime = seconds
    if fraction:
        tar.pax_headers = {**tar.pax_headers, "mtime": f"{seconds}.{fraction:09d}"}


def _set_type(tar: tarfile.TarInfo, path: str, info: os.stat_result) -> None:
    kind = stat.S_IFMT(info.st_mode)
    if kind == stat.S_IFDIR:
        tar.type = tarfile.DIRTYPE
    elif kind == stat.S_IFLNK:
        tar.type, tar.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif kind == stat.S_IFIFO:
        tar.type = tarfile.FIFOTYPE
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        tar.type = tarfile.CHRTYPE if kind == stat.S_IFCHR else tarfile.BLKTYPE
        tar.devmajor, tar.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
    else:
        raise UpperDirError(f"{path}: a file type a layer cannot hold")


def _override(path: str, info: os.stat_result) -> OverrideStat | None:
    """Returns the file's override_stat, checked against what is on disk, or None."""
    if stat.S_ISLNK(info.st_mode):
        return None  # Linux allows no user.* xattrs on symlinks
    try:
        value = os.getxattr(path, OVERRIDE_STAT_XATTR, follow_symlinks=False)
    except OSError:
        return None  # ENODATA, or a file system without user xattrs
    try:
        override = parse_override_stat(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UpperDirError(f"{path}: {exc}") from None
    on_disk = stat.S_IFMT(info.st_mode)
    stand_in = override.kind in (*_STAND_IN_TYPES, "socket") and on_disk == stat.S_IFREG
    if override.kind and not stand_in and _DISK_TYPES[override.kind] != on_disk:
        raise UpperDirError(f"{path}: override_stat says {override.kind}, the disk has another type")
    return override


def _metacopy_source(path: str) -> str | None:
    try:
        return os.fsdecode(os.getxattr(path, METACOPY_XATTR, follow_symlinks=False))
    except OSError:
        return None


def _xattrs(path: str, info: os.stat_result) -> dict[str, str]:
    """Returns the file's xattrs but override_stat as PAX SCHILY.xattr records; a value
    that is not UTF-8 keeps its bytes (tarfile then writes the records as binary)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        XATTR_PAX_PREFIX + name: os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
        for name in sorted(names)
        if name not in _OWN_XATTRS
    }


def write_layer_tar(root: str, out: IO[bytes], warn: Warn, image_bytes: ImageBytes | None = None) -> None:
    """Writes the upper directory `root` to `out` as an uncompressed PAX tar layer; the bytes
    of metadata-only copies come from `image_bytes` (UpperDirError if there are some and no
    image to read them from)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for member in upper_members(root, warn):
            member.info.uname = member.info.gname = ""
            if member.image_path is not None:
                if image_bytes is None:
                    raise UpperDirError(f"{member.info.name}: a metadata-only copy, and no image to read from")
                archive.addfile(member.info, _ChunkReader(image_bytes(member.image_path, member.info.size)))
            elif member.source is None:
                archive.addfile(member.info)
            else:
                with open(member.source, "rb") as data:
                    archive.addfile(member.info, data)


class _ChunkReader:
    """A file-like view of an iterator of byte strings (what tarfile.addfile reads from)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._pending = chunks, b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._pending) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        if size < 0:
            size = len(self._pending)
        data, self._pending = self._pending[:size], self._pending[size:]
        return data
