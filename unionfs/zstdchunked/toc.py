"""zstd:chunked layers, pure parts: annotations, footer, TOC frame, chunk frames. Bytes in,
values out; no I/O. Format as containers/storage writes it (pkg/chunked/compressor and
pkg/chunked/internal/minimal; docs/containers-storage-zstd-chunked.md):

    [frame][frame]...[skippable: compressed TOC][skippable: tar-split]?[skippable: footer]

The blob is a tar+zstd layer that any zstd reader decompresses whole (skippable frames are
skipped). Each tar header goes into a frame with what precedes it; each regular file's
payload, or each chunk of a large one, is a zstd frame of its own. The TOC is eStargz's
JSON (same field names, version 1), compressed into the payload of a zstd skippable frame;
the layer's descriptor names where (`manifest-position`: offset:length:uncompressed
length:type, the offset of the compressed TOC after the frame's 8-byte header) and its
digest (`manifest-checksum`, the sha256 of the compressed TOC). The footer, a skippable
frame at the very end, repeats the position.

Two generations are read: containers/storage before 1.45 (podman 4.x; also stargz-
snapshotter's zstdchunked writer) with `io.containers.` annotations and a 40-byte footer
that follows the TOC frame, and later ones with `io.github.containers.` annotations, a
tar-split frame between TOC and footer, and a 64-byte footer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import zstandard

from registry.errors import LayerFormatError
from registry.source import Layer
from unionfs.entry import Chunk
from unionfs.estargz.toc import (
    MAX_TOC_SIZE,
    LayerToc,
    end_at_end_offsets,
    member_ends,
    read_one_pass,
    toc_entries,
    toc_rows,
)

PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
POSITION, CHECKSUM = "manifest-position", "manifest-checksum"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"  # the first skippable frame magic, the one writers use
SKIPPABLE_HEADER = 8  # magic, then the payload's length (u32 little endian)
MANIFEST_TYPE_CRFS = 1  # the only TOC type: eStargz's JSON
# Footer payloads: offset, compressed length, uncompressed length, type (u64 LE each), then
# (later format) tar-split offset and lengths, then the magic. The magic changed case.
FOOTER_MAGICS = (b"GNUlInUx", b"GnUlInUx")
FOOTER_SIZES = (40, 64)
KIND = "zstd:chunked"


@dataclass(frozen=True, slots=True)
class TocPosition:
    """Where a layer's compressed TOC lies in its blob, and what it must hash to."""

    offset: int  # of the compressed TOC, past its skippable frame's header
    length: int  # compressed
    uncompressed: int
    checksum: str  # digest of the compressed TOC

    @property
    def frame_start(self) -> int:
        return self.offset - SKIPPABLE_HEADER

    @property
    def end(self) -> int:
        return self.offset + self.length


def toc_position(layer: Layer) -> TocPosition | None:
    """Returns the TOC position that a zstd layer's annotations give, None if it has none (a
    plain zstd layer, read whole). Annotations that are there but malformed are an error."""
    for prefix in PREFIXES:
        position, checksum = layer.annotation(prefix + POSITION), layer.annotation(prefix + CHECKSUM)
        if position is None and checksum is None:
            continue
        if position is None or checksum is None:
            raise LayerFormatError(f"layer {layer.digest}: {prefix}{POSITION} and {CHECKSUM} come together")
        return _parsed_position(position, checksum, layer)
    return None


def _parsed_position(position: str, checksum: str, layer: Layer) -> TocPosition:
    what = f"layer {layer.digest}: zstd:chunked manifest-position {position!r}"
    try:
        offset, length, uncompressed, kind = (int(part) for part in position.split(":"))
    except ValueError:
        raise LayerFormatError(f"{what} is not offset:length:length:type") from None
    if kind != MANIFEST_TYPE_CRFS:
        raise LayerFormatError(f"{what}: unknown TOC type {kind}")
    if not (offset >= SKIPPABLE_HEADER and length > 0 and offset + length <= layer.window.size):
        raise LayerFormatError(f"{what} lies outside its {layer.window.size}-byte blob")
    if not 0 < uncompressed <= MAX_TOC_SIZE:
        raise LayerFormatError(f"{what}: a TOC of {uncompressed} bytes")
    return TocPosition(offset, length, uncompressed, checksum)


def footer_follows_toc(position: TocPosition, blob_size: int) -> bool:
    """True if the blob ends with a 40-byte footer frame right after the TOC frame (the
    older format): then one request fetches both."""
    return position.end + SKIPPABLE_HEADER + FOOTER_SIZES[0] == blob_size


def check_footer(tail: bytes, position: TocPosition) -> None:
    """Checks that the blob's last bytes are a footer frame that agrees with the annotation."""
    for size in FOOTER_SIZES:
        frame = tail[-(SKIPPABLE_HEADER + size) :]
        if len(frame) < SKIPPABLE_HEADER + size or frame[:4] != SKIPPABLE_MAGIC:
            continue
        if struct.unpack_from("<I", frame, 4)[0] != size or frame[-8:] not in FOOTER_MAGICS:
            continue
        offset, length, uncompressed, kind = struct.unpack_from("<4Q", frame, SKIPPABLE_HEADER)
        if (offset, length, uncompressed, kind) != (position.offset, position.length, position.uncompressed,
                                                    MANIFEST_TYPE_CRFS):  # fmt: skip
            raise LayerFormatError(f"zstd:chunked footer says the TOC is at {offset}:{length}:{uncompressed}:"
                                   f"{kind}, the annotation {position.offset}:{position.length}:"
                                   f"{position.uncompressed}")  # fmt: skip
        return
    raise LayerFormatError("the blob does not end with a zstd:chunked footer")


def toc_payload(frame: bytes, position: TocPosition) -> bytes:
    """Returns the compressed TOC out of its skippable frame (header included)."""
    header, payload = frame[:SKIPPABLE_HEADER], frame[SKIPPABLE_HEADER:]
    if header[:4] != SKIPPABLE_MAGIC or struct.unpack_from("<I", header, 4)[0] != position.length:
        raise LayerFormatError("no zstd skippable frame of the annotated length at the TOC's position")
    if len(payload) != position.length:
        raise LayerFormatError(f"TOC frame holds {len(payload)} of {position.length} bytes")
    return payload


def decompress_toc(compressed: bytes, position: TocPosition) -> bytes:
    """Returns the TOC JSON (verify `compressed` against the annotation's checksum first)."""
    try:
        toc_json = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=position.uncompressed)
    except zstandard.ZstdError as exc:
        raise LayerFormatError(f"TOC is not valid zstd: {exc}") from exc
    if len(toc_json) != position.uncompressed:
        raise LayerFormatError(f"TOC is {len(toc_json)} bytes, its annotation says {position.uncompressed}")
    return toc_json


def parse_toc(toc_json: bytes, layer: int, position: TocPosition) -> LayerToc:
    """Returns the entries of a zstd:chunked TOC, each regular file with its chunks (one
    zstd frame each), every chunk with the digest it is verified by. Read one row at a time
    where it can be, as eStargz's are (unionfs.estargz.toc.parse_toc); a TOC that reader
    leaves is read again whole, as the same entries or the error that says what is wrong."""
    one_pass = read_one_pass(toc_json, layer, position.frame_start, _with_chunk_digest, end_offsets=True)
    if one_pass is not None:
        return one_pass
    rows = [_with_chunk_digest(row) for row in toc_rows(toc_json, KIND)]
    return toc_entries(rows, layer, lambda: _frame_ends(rows, position.frame_start), KIND)


def _with_chunk_digest(row: dict[str, Any]) -> dict[str, Any]:
    """A one-chunk file's row carries its payload's digest as `digest`, not `chunkDigest`:
    the chunk is the payload, so that digest is the chunk's. A chunk with neither cannot be
    verified, and is refused."""
    if not isinstance(row, dict):
        raise LayerFormatError(f"malformed {KIND} TOC: an entry is {type(row).__name__}, not an object")
    if row.get("type") not in ("reg", "chunk") or not (row.get("size") or row.get("chunkSize")):
        return row
    if not row.get("chunkDigest"):
        if not row.get("digest") or row.get("chunkSize"):
            raise LayerFormatError(f"zstd:chunked TOC: a chunk of {row.get('name')!r} has no digest")
        row["chunkDigest"] = row["digest"]  # in place: the row is this reader's own
    return row


def _frame_ends(rows: list[dict[str, Any]], toc_frame_start: int) -> dict[int, int]:
    """Maps each chunk's frame start to its end: the next payload frame's start (eStargz's
    rule; what follows a chunk's frame holds only tar headers), but the file's `endOffset`
    for its last chunk where the writer gives it (containers/storage), so that a read does
    not fetch the next file's headers."""
    last_start: dict[str, int] = {}
    for row in rows:
        if row["type"] in ("reg", "chunk") and row.get("offset"):
            last_start[row["name"]] = max(last_start.get(row["name"], 0), int(row["offset"]))
    last_chunks = []
    for row in rows:
        end = int(row.get("endOffset") or 0)
        start = last_start.get(row["name"]) if row["type"] == "reg" else None
        if start is not None:
            last_chunks.append((start, end))
    return end_at_end_offsets(member_ends(rows, toc_frame_start), last_chunks)


def chunk_data(compressed: bytes | memoryview, fetch_start: int, chunk: Chunk) -> bytes:
    """Returns a chunk's bytes out of the compressed range that starts at `fetch_start`: its
    zstd frame, decompressed only as far as the chunk reaches."""
    frame = compressed[chunk.blob_offset - fetch_start : chunk.blob_end - fetch_start]
    wanted = chunk.inner_offset + chunk.size
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as reader:
            pieces, got = [], 0
            while got < wanted and (piece := reader.read(wanted - got)):
                pieces.append(piece)
                got += len(piece)
    except zstandard.ZstdError as exc:
        raise LayerFormatError(f"chunk at blob offset {chunk.blob_offset} is not valid zstd: {exc}") from exc
    data = b"".join(pieces)[chunk.inner_offset :]
    if len(data) != chunk.size:
        raise LayerFormatError(f"chunk at blob offset {chunk.blob_offset} holds {len(data)} of {chunk.size} bytes")
    return data
