"""Write a layer as zstd:chunked, streaming, in the format that podman 4 (containers/storage
before 1.45) and stargz-snapshotter write (see unionfs/zstdchunked/toc.py): `io.containers.`
annotations, the TOC frame followed by the 40-byte footer frame.

Tar headers (and the padding of the payload before them) go into one zstd frame up to the
next payload; each chunk of each regular file's payload (at most `chunk_size` bytes) is a
frame of its own. The uncompressed stream is an ordinary tar, so zstd:chunked-agnostic
runtimes read it as tar+zstd.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from unionfs.estargz.writer import BLOCK, DEFAULT_CHUNK_SIZE, _padding, _toc_row
from unionfs.zstdchunked.toc import (
    CHECKSUM,
    FOOTER_MAGICS,
    FOOTER_SIZES,
    MANIFEST_TYPE_CRFS,
    POSITION,
    PREFIXES,
    SKIPPABLE_MAGIC,
)

OLD_PREFIX = PREFIXES[1]  # io.containers.zstd-chunked.: what podman 4 reads
LEVEL = 10  # containers/storage's default
RECORD = 20 * BLOCK  # the tar is padded to a whole record, as tar writes it


@dataclass(frozen=True, slots=True)
class WrittenLayer:
    """What a layer descriptor needs to say about a zstd:chunked blob."""

    digest: str  # of the blob
    size: int
    diff_id: str  # of the uncompressed tar
    annotations: dict[str, str]


class _FrameWriter:
    """Writes zstd frames to `out`, hashing the blob and the uncompressed stream. Bytes are
    held until a frame is cut, so that a tar header and the padding before it share one."""

    def __init__(self, out: IO[bytes], level: int) -> None:
        self._out, self._compressor = out, zstandard.ZstdCompressor(level=level)
        self.blob_hash, self.tar_hash = hashlib.sha256(), hashlib.sha256()
        self.offset = self.uncompressed = 0
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.tar_hash.update(data)
        self.uncompressed += len(data)
        self._pending.append(data)

    def cut(self) -> int:
        """Writes what is held as a frame; returns the blob offset where the next one starts."""
        if self._pending:
            self._emit(self._compressor.compress(b"".join(self._pending)))
            self._pending = []
        return self.offset

    def skippable(self, payload: bytes) -> int:
        """Writes a skippable frame; returns the blob offset of its payload."""
        self.cut()
        self._emit(SKIPPABLE_MAGIC + struct.pack("<I", len(payload)))
        start = self.offset
        self._emit(payload)
        return start

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.blob_hash.update(data)
        self.offset += len(data)


def write_zstd_chunked(source: IO[bytes], out: IO[bytes], chunk_size: int = DEFAULT_CHUNK_SIZE,
                       level: int = LEVEL) -> WrittenLayer:  # fmt: skip
    """Rewrites the uncompressed tar `source` as zstd:chunked into `out`."""
    writer = _FrameWriter(out, level)
    rows: list[dict[str, Any]] = []
    with tarfile.open(fileobj=source, mode="r:") as archive:
        for member in archive:
            reader = archive.extractfile(member) if member.isreg() else None
            rows += _write_entry(writer, member, reader.read() if reader else b"", chunk_size)
    writer.write(bytes(2 * BLOCK))
    writer.write(bytes(-writer.uncompressed % RECORD))
    toc = json.dumps({"version": 1, "entries": rows}, separators=(",", ":")).encode()
    compressed = zstandard.ZstdCompressor(level=level).compress(toc)
    toc_offset = writer.skippable(compressed)
    footer = struct.pack("<4Q", toc_offset, len(compressed), len(toc), MANIFEST_TYPE_CRFS) + FOOTER_MAGICS[1]
    assert len(footer) == FOOTER_SIZES[0]
    writer.skippable(footer)
    annotations = {
        OLD_PREFIX + POSITION: f"{toc_offset}:{len(compressed)}:{len(toc)}:{MANIFEST_TYPE_CRFS}",
        OLD_PREFIX + CHECKSUM: f"sha256:{hashlib.sha256(compressed).hexdigest()}",
    }
    return WrittenLayer(f"sha256:{writer.blob_hash.hexdigest()}", writer.offset,
                        f"sha256:{writer.tar_hash.hexdigest()}", annotations)  # fmt: skip


def _write_entry(writer: _FrameWriter, info: tarfile.TarInfo, data: bytes, chunk_size: int) -> list[dict[str, Any]]:
    """Writes one member; returns its TOC rows as containers/storage writes them: a one-chunk
    file's row has the payload's `digest` and its frame's `offset` and `endOffset`; a file of
    several chunks has a row per chunk (the first is the file's own) with `chunkSize` and
    `chunkDigest`."""
    writer.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    row = _toc_row(info)
    row["mode"] = info.mode & 0o7777  # the tar header's mode, as Go's archive/tar gives it
    if not data:
        return [row]
    pieces = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
    rows = [row] + [{"type": "chunk", "name": row["name"]} for _ in pieces[1:]]
    for number, (chunk, piece) in enumerate(zip(rows, pieces, strict=True)):
        chunk["offset"] = writer.cut()
        writer.write(piece)
        if len(pieces) > 1:
            chunk.update(chunkOffset=number * chunk_size, chunkSize=len(piece),
                         chunkDigest=f"sha256:{hashlib.sha256(piece).hexdigest()}")  # fmt: skip
    row.update(digest=f"sha256:{hashlib.sha256(data).hexdigest()}", endOffset=writer.cut())
    writer.write(_padding(len(data)))
    return rows
