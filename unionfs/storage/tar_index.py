"""Index an uncompressed layer tar: one Entry per member, with the offset of its data."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO

from registry.errors import LayerFormatError
from unionfs.entry import NO_XATTRS, Entry, sharer
from unionfs.estargz.toc import ARTIFACTS, TOC_NAME
from whiteout.paths import clean_path

XATTR_PAX_PREFIX = "SCHILY.xattr."
_TYPE_BITS = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}
_REGULAR_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.LNKTYPE}
MAX_ID = 2**32 - 1  # uid, gid, device numbers: 32 bits in the kernel and in the saved tree
MIN_MTIME_NS, MAX_MTIME_NS = -(2**63), 2**63 - 1  # a timespec in nanoseconds, as the tree stores it


def index_tar(fileobj: BinaryIO, length: int, layer: int, warn: Callable[[str], None]) -> list[Entry]:
    """Returns the entries of the tar in `fileobj` (seekable, `length` bytes), in tar order.

    Raises LayerFormatError for a tar that is malformed or whose data runs past its end.
    Members with a path outside the root are skipped with a warning.
    """
    try:
        with tarfile.open(fileobj=fileobj, mode="r:", errorlevel=2) as archive:
            share = sharer()
            entries = [e for m in _members(archive) if (e := _entry(m, length, layer, warn, share))]
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as exc:
        # tarfile's own parsing of odd PAX records (GNU.sparse.*, numbers) raises plain
        # ValueError; UnicodeError is one too.
        raise LayerFormatError(f"layer {layer}: malformed tar: {exc}") from exc
    return without_estargz_artifacts(entries)


def without_estargz_artifacts(entries: list[Entry]) -> list[Entry]:
    """Drops the TOC and landmark files of an eStargz layer read as plain tar+gzip.

    A layer is eStargz when its last entry is the TOC; only then are these names format
    artifacts (stargz-snapshotter hides them too), not files of the image."""
    if not entries or entries[-1].path != TOC_NAME:
        return entries
    return [e for e in entries if e.path not in ARTIFACTS]


def _members(archive: tarfile.TarFile):  # type: ignore[no-untyped-def]
    # Iterate with next() rather than getmembers(): it yields while reading and keeps
    # tarfile from building a second name index we do not need.
    while (member := archive.next()) is not None:
        yield member


def _entry(
    member: tarfile.TarInfo, length: int, layer: int, warn: Callable[[str], None], share: Callable[[Any], Any]
) -> Entry | None:
    _check_values(member, layer)  # first: tarfile has already moved on by a negative size
    path = clean_path(member.name)
    if path is None:
        warn(f"layer {layer}: {member.name!r} escapes the image root, entry skipped")
        return None
    if member.issparse():
        raise LayerFormatError(f"layer {layer}: {member.name!r} is a GNU sparse file, not supported")
    mode = _file_type(member) | (member.mode & 0o7777)
    link = _link(member, layer, warn)
    if link is None:
        return None
    size = member.size if member.isreg() else 0
    if member.offset_data + size > length:
        raise LayerFormatError(f"layer {layer}: {member.name!r} runs past the end of the tar (truncated)")
    xattrs = _xattrs(member)
    if any(not key or "\0" in key for key in xattrs):
        raise LayerFormatError(f"layer {layer}: {member.name!r}: empty or NUL in an xattr name")
    return Entry(
        path=path,
        mode=share(mode),
        uid=share(member.uid),
        gid=share(member.gid),
        size=size,
        mtime_ns=share(_mtime_ns(member, layer, warn)),
        link=link,
        hardlink=member.islnk(),
        rdev=os.makedev(member.devmajor, member.devminor) if member.ischr() or member.isblk() else 0,
        xattrs=xattrs,
        layer=layer,
        offset=member.offset_data if size else 0,
    )


def _file_type(member: tarfile.TarInfo) -> int:
    if member.type in _REGULAR_TYPES:
        return stat.S_IFREG
    if member.type in _TYPE_BITS:
        return _TYPE_BITS[member.type]
    raise LayerFormatError(f"{member.name!r}: unsupported tar entry type {member.type!r}")


def _link(member: tarfile.TarInfo, layer: int, warn: Callable[[str], None]) -> str | None:
    """Returns the symlink target as written, the hardlink target as a clean path, or ''."""
    if member.issym():
        return member.linkname
    if not member.islnk():
        return ""
    target = clean_path(member.linkname)
    if not target:
        warn(f"layer {layer}: hardlink {member.name!r} -> {member.linkname!r} leaves the root, skipped")
        return None
    return target


def _check_values(member: tarfile.TarInfo, layer: int) -> None:
    """Refuses header values that no file can have, in one line naming layer and member.

    tarfile reads them as they are: base-256 numbers (GNU) may be negative or huge, and PAX
    records may say anything."""
    about = f"layer {layer}: {member.name!r}"
    if member.size < 0:
        raise LayerFormatError(f"{about}: negative size {member.size}")
    for field in ("uid", "gid", "devmajor", "devminor"):
        value = getattr(member, field)
        if not 0 <= value <= MAX_ID:
            raise LayerFormatError(f"{about}: {field} {value} out of range")
    if "\0" in member.name or "\0" in member.linkname:
        raise LayerFormatError(f"{about}: NUL byte in a name or link target")


def _mtime_ns(member: tarfile.TarInfo, layer: int, warn: Callable[[str], None]) -> int:
    """Returns the mtime in nanoseconds, clamped (with a warning) to what a file system can
    store; a PAX mtime that is no number falls back to the header's."""
    try:
        # PAX mtimes carry sub-second digits; going through float would round them.
        nanoseconds = int(Decimal(member.pax_headers["mtime"]).scaleb(9))
    except (KeyError, InvalidOperation, ValueError, OverflowError):
        try:
            nanoseconds = int(Decimal(member.mtime).scaleb(9))
        except (InvalidOperation, ValueError, OverflowError):
            raise LayerFormatError(f"layer {layer}: {member.name!r}: mtime {member.mtime!r} is not a number") from None
    clamped = min(max(nanoseconds, MIN_MTIME_NS), MAX_MTIME_NS)
    if clamped != nanoseconds:
        warn(f"layer {layer}: {member.name!r}: mtime out of range, clamped to {clamped // 1_000_000_000} s")
    return clamped


def _xattrs(member: tarfile.TarInfo) -> Mapping[str, bytes]:
    # tarfile decodes PAX values as UTF-8 with surrogateescape; encoding back that way
    # restores binary values such as security.capability byte for byte.
    found = {
        key[len(XATTR_PAX_PREFIX) :]: value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(XATTR_PAX_PREFIX)
    }
    return found or NO_XATTRS
