"""Write a layer as eStargz (stargz-snapshotter docs/estargz.md), streaming.

Layout written: [prioritized entries, .prefetch.landmark | .no.prefetch.landmark, the rest],
each non-empty regular file's payload in gzip members of at most `chunk_size` bytes, then the
TOC member (tar header of stargz.index.json, the JSON, end-of-archive) and the 51-byte footer.
The uncompressed stream is an ordinary tar, so eStargz-agnostic runtimes read it as tar+gzip.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import stat
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from unionfs.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from unionfs.storage.tar_index import XATTR_PAX_PREFIX
from whiteout.paths import clean_path

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024  # upstream's default
LANDMARK_CONTENT = b"\x0f"  # docs/estargz.md: "a regular file entry with 4 bits contents 0xf"
BLOCK = 512
_KINDS = {
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True, slots=True)
class WrittenLayer:
    """What a layer descriptor needs to say about an eStargz blob."""

    digest: str  # of the blob
    size: int
    diff_id: str  # of the uncompressed tar
    uncompressed_size: int
    toc_digest: str


class _MemberWriter:
    """Writes gzip members to `out`, hashing the blob and the uncompressed stream."""

    def __init__(self, out: IO[bytes], level: int) -> None:
        self._out, self._level = out, level
        self.blob_hash, self.tar_hash = hashlib.sha256(), hashlib.sha256()
        self.offset = self.uncompressed = 0
        self._member: Any = None

    def start_member(self) -> int:
        """Closes the current gzip member, opens a new one; returns the blob offset it starts at."""
        self.end_member()
        self._member = zlib.compressobj(self._level, zlib.DEFLATED, 31)
        return self.offset

    def end_member(self) -> None:
        if self._member is not None:
            self._emit(self._member.flush(zlib.Z_FINISH))
            self._member = None

    def write(self, data: bytes) -> None:
        if self._member is None:
            self.start_member()
        self.tar_hash.update(data)
        self.uncompressed += len(data)
        self._emit(self._member.compress(data))

    def raw(self, data: bytes) -> None:
        self.end_member()
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.blob_hash.update(data)
        self.offset += len(data)


def write_estargz(
    source: IO[bytes], out: IO[bytes], chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: list[str] | None = None, level: int = 9,
) -> WrittenLayer:  # fmt: skip
    """Rewrites the uncompressed tar `source` as eStargz into `out`."""
    writer = _MemberWriter(out, level)
    rows: list[dict[str, Any]] = []
    with tarfile.open(fileobj=source, mode="r:") as archive:
        for info, data in _ordered(archive, prioritized or []):
            rows += _write_entry(writer, info, data, chunk_size)
    toc = json.dumps({"version": 1, "entries": rows}, separators=(",", ":")).encode()
    toc_offset = writer.start_member()
    writer.write(_header(TOC_NAME, len(toc)) + toc + _padding(len(toc)) + b"\0" * (2 * BLOCK))
    writer.raw(footer(toc_offset))
    return WrittenLayer(
        digest=f"sha256:{writer.blob_hash.hexdigest()}",
        size=writer.offset,
        diff_id=f"sha256:{writer.tar_hash.hexdigest()}",
        uncompressed_size=writer.uncompressed,
        toc_digest=f"sha256:{hashlib.sha256(toc).hexdigest()}",
    )


def footer(toc_offset: int) -> bytes:
    """Returns the 51-byte eStargz footer: an empty gzip member whose Extra field holds
    the TOC offset as 16 hex digits and 'STARGZ', in an RFC 1952 subfield 'SG'."""
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + b"\0" * 8  # empty final stored block; CRC32 0, ISIZE 0


def _ordered(archive: tarfile.TarFile, prioritized: list[str]) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Yields the members with their data: prioritized ones first, then the landmark, then
    the rest in tar order (data of deferred members is read again by offset)."""
    members = archive.getmembers()
    wanted = {clean_path(p) for p in prioritized}
    first = [m for m in members if clean_path(m.name) in wanted]
    first.sort(key=lambda m: prioritized.index(next(p for p in prioritized if clean_path(p) == clean_path(m.name))))
    for member in first:
        yield member, _data(archive, member)
    landmark = tarfile.TarInfo(PREFETCH_LANDMARK if first else NO_PREFETCH_LANDMARK)
    landmark.size, landmark.mode = len(LANDMARK_CONTENT), 0o644
    yield landmark, LANDMARK_CONTENT
    for member in members:
        if member not in first:
            yield member, _data(archive, member)


def _data(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    reader = archive.extractfile(member) if member.isreg() else None
    return reader.read() if reader is not None else None


def _write_entry(
    writer: _MemberWriter, info: tarfile.TarInfo, data: bytes | None, chunk_size: int
) -> list[dict[str, Any]]:
    writer.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    row = _toc_row(info)
    if not data:
        return [row]
    rows = []
    for start in range(0, len(data), chunk_size):
        piece = data[start : start + chunk_size]
        chunk = row if start == 0 else {"name": row["name"], "type": "chunk", "chunkOffset": start}
        chunk["offset"] = writer.start_member()
        chunk["chunkDigest"] = f"sha256:{hashlib.sha256(piece).hexdigest()}"
        if start + chunk_size < len(data):
            chunk["chunkSize"] = len(piece)  # the last chunk leaves it out, as the spec says
        writer.write(piece)
        rows.append(chunk)
    row["digest"] = f"sha256:{hashlib.sha256(data).hexdigest()}"
    writer.write(_padding(len(data)))
    return rows


def _toc_row(info: tarfile.TarInfo) -> dict[str, Any]:
    kind = "reg" if info.isreg() else _KINDS[info.type]
    row: dict[str, Any] = {"name": info.name + ("/" if info.isdir() else ""), "type": kind,
                           "mode": _type_bits(kind) | (info.mode & 0o7777)}  # fmt: skip
    optional = {
        "size": info.size if info.isreg() else 0,
        "modtime": _rfc3339(info.mtime),
        "linkName": info.linkname,
        "uid": info.uid,
        "gid": info.gid,
        "userName": info.uname,
        "groupName": info.gname,
        "devMajor": info.devmajor if info.ischr() or info.isblk() else 0,
        "devMinor": info.devminor if info.ischr() or info.isblk() else 0,
        "xattrs": {
            k[len(XATTR_PAX_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
            for k, v in info.pax_headers.items()
            if k.startswith(XATTR_PAX_PREFIX)
        },
    }
    row.update({k: v for k, v in optional.items() if v})  # upstream omits empty fields
    return row


def _xattrs(info: tarfile.TarInfo) -> dict[str, str]:
    # The TOC is Go's map[string][]byte: values as base64.
    return {
        key[len(XATTR_PAX_PREFIX) :]: base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
        for key, value in info.pax_headers.items()
        if key.startswith(XATTR_PAX_PREFIX)
    }


def _type_bits(kind: str) -> int:
    bits = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR, "block": stat.S_IFBLK,
            "fifo": stat.S_IFIFO}  # fmt: skip
    return bits.get(kind, stat.S_IFREG)


def _rfc3339(mtime: float) -> str:
    moment = datetime.datetime.fromtimestamp(int(mtime), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)
