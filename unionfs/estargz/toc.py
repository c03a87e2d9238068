"""eStargz (and legacy stargz) layers, pure parts: footer, TOC, and which compressed bytes
hold which file bytes (stargz-snapshotter docs/estargz.md). Bytes in, values out; no I/O.

A layer is a concatenation of gzip members. Each non-empty regular file's payload (or each
chunk of a large one) starts a new member; the TOC (`stargz.index.json`, a JSON list of
entries with the blob offset of each member) is the last tar entry, in a member of its own;
a fixed-size footer, an empty gzip member, gives the TOC's offset in its Extra field.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import gzip
import io
import itertools
import json
import os
import re
import stat
import struct
import tarfile
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from registry.errors import LayerFormatError
from unionfs.chunk_table import ChunkTable, FileChunks
from unionfs.entry import NO_XATTRS, Chunk, Entry, sharer
from whiteout.paths import clean_path

# 10 gzip header + 2 XLEN + 4 subfield header ('S','G', LEN=22) + 22 "%016xSTARGZ" + 5 empty
# stored deflate block + 8 gzip trailer (CRC32, ISIZE).
FOOTER_SIZE = 51
# Legacy stargz (google/crfs): the same without the 4-byte RFC 1952 subfield header.
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
ARTIFACTS = {TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK}  # never shown, at the layer root
MAX_TOC_SIZE = 256 * 1024 * 1024  # a TOC this large is an attack, not an image
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_FRACTION = re.compile(r"\.(\d*)")  # of a second, in an RFC 3339 time

_TYPES = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "hardlink": stat.S_IFREG,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class Footer:
    """Where the TOC member starts, and how long the footer is."""

    toc_offset: int
    size: int


def parse_footer(tail: bytes) -> Footer | None:
    """Returns the footer at the end of `tail` (the blob's last bytes), or None if the blob
    is not (e)stargz. Tries the eStargz footer, then the legacy stargz one."""
    for size, subfield in ((FOOTER_SIZE, True), (LEGACY_FOOTER_SIZE, False)):
        if len(tail) < size:
            continue
        offset = _footer_offset(tail[-size:], subfield)
        if offset is not None:
            return Footer(offset, size)
    return None


def _footer_offset(footer: bytes, subfield: bool) -> int | None:
    extra_length = 26 if subfield else 22
    magic, method, flags = footer[:2], footer[2], footer[3]
    if magic != b"\x1f\x8b" or method != 8 or not flags & 0x04:  # FEXTRA
        return None
    (xlen,) = struct.unpack_from("<H", footer, 10)
    extra = footer[12 : 12 + xlen]
    if xlen != extra_length or len(extra) != xlen:
        return None
    if subfield:
        if extra[:2] != b"SG" or struct.unpack_from("<H", extra, 2)[0] != 22:
            return None
        extra = extra[4:]
    if not extra.endswith(b"STARGZ"):
        return None
    try:
        return int(extra[:16], 16)
    except ValueError:
        return None


def read_toc_member(member: bytes) -> bytes:
    """Returns the TOC JSON out of the TOC's gzip member (a tar holding stargz.index.json)."""
    try:
        data = gzip.decompress(member)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            info = archive.next()
            if info is None or info.name != TOC_NAME or info.size > MAX_TOC_SIZE:
                raise LayerFormatError(f"eStargz TOC member does not start with {TOC_NAME}")
            reader = archive.extractfile(info)
            assert reader is not None
            return reader.read()
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise LayerFormatError(f"eStargz TOC member is malformed: {exc}") from exc


@dataclass(frozen=True, slots=True)
class LayerToc:
    """A layer's entries as its TOC gives them, and the end of its prioritized files."""

    entries: list[Entry]
    prefetch_end: int | None  # blob offset where the prioritized files end, if marked


def parse_toc(toc_json: bytes, layer: int, toc_offset: int) -> LayerToc:
    """Returns the entries of a TOC (landmarks dropped), each regular file with its chunks.

    Read one row at a time where it can be (see _OnePass); a TOC it leaves, being unusual or
    malformed, is read again whole, as the same entries or the error that says what is wrong."""
    one_pass = read_one_pass(toc_json, layer, toc_offset)
    if one_pass is not None:
        return one_pass
    rows = toc_rows(toc_json, "eStargz")
    return toc_entries(rows, layer, lambda: member_ends(rows, toc_offset), "eStargz")


RowHook = Callable[[dict[str, Any]], dict[str, Any]]  # a format's change to each row, before it is read


def read_one_pass(toc_json: bytes, layer: int, toc_end: int, row_hook: RowHook | None = None,
                  end_offsets: bool = False) -> LayerToc | None:  # fmt: skip
    """_one_pass's entries, or None for a TOC it leaves to the whole-document reader. For
    zstd:chunked, `row_hook` is applied to each row first, and `end_offsets` ends each file's
    last chunk as end_at_end_offsets does."""
    try:
        return _one_pass(toc_json, layer, toc_end, row_hook, end_offsets)
    except (_NotOnePass, StopIteration, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError,
            RecursionError, LayerFormatError):  # fmt: skip
        return None


class _NotOnePass(Exception):
    """A TOC that _one_pass leaves to the whole-document reader."""


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def _one_pass(toc_json: bytes, layer: int, toc_offset: int,
              row_hook: RowHook | None = None, end_offsets: bool = False) -> LayerToc:  # fmt: skip
    """parse_toc's result, with each row's dict let go once its entry is built: json.loads of
    the whole document held 74 MiB of dicts for a 100k-entry layer (27 MiB of JSON)."""
    text = toc_json.decode("utf-8", "surrogatepass")  # as json.loads decodes bytes
    at, version, reader = _skip(text, 0), None, None
    if text[at] != "{":
        raise _NotOnePass
    at = _skip(text, at + 1)
    while text[at] != "}":  # the document's members: "version", "entries", any others
        key, at = json.decoder.scanstring(text, at + 1) if text[at] == '"' else ("", -1)  # type: ignore[attr-defined]
        at = _skip(text, at)
        if at < 0 or text[at] != ":" or (key == "entries" and reader is not None):
            raise _NotOnePass
        at = _skip(text, at + 1)
        if key == "entries":
            reader = _OnePass(layer, row_hook, end_offsets)
            at = reader.read_rows(text, at)
        else:
            value, at = _DECODER.raw_decode(text, at)
            version = value if key == "version" else version
        at = _skip(text, at)
        if text[at] == ",":
            at = _skip(text, at + 1)
            if text[at] != '"':  # a member must follow
                raise _NotOnePass
        elif text[at] != "}":
            raise _NotOnePass
    if reader is None or version != 1 or _skip(text, at + 1) != len(text):
        raise _NotOnePass
    return reader.finish(toc_offset)


def _skip(text: str, at: int) -> int:
    """The index of the first non-blank character of `text` from `at` (Go writes none)."""
    return at if at >= len(text) or text[at] not in " \t\n\r" else _SPACE.match(text, at).end()  # type: ignore[union-attr]


class _EndsLater(dict[int, int]):
    """Member ends before they are known: 0 for every start, filled in by _OnePass.finish."""

    def __missing__(self, key: int) -> int:
        return 0


_ENDS_LATER = _EndsLater()


class _OnePass:
    """Builds a layer's entries from its rows in one pass, each as soon as its "chunk" rows
    (which follow its own) are in. Gives up (_NotOnePass) where _entries, which matches chunk
    rows to files by name over the whole layer, could differ: a "chunk" row that does not
    follow its file, or a name kept twice. With `end_offsets` (zstd:chunked), where the
    whole-document reader pairs rows by their names as written: also a "chunk" row whose
    name is not written as its file's, a name that escapes the root or is not a string, or
    an artifact's name twice."""

    def __init__(self, layer: int, row_hook: RowHook | None = None, end_offsets: bool = False) -> None:
        self.layer, self.attributes, self.table = layer, RowAttributes(), ChunkTable()
        self.row_hook, self.end_offsets = row_hook, end_offsets
        self.entries: list[Entry] = []
        self.names: set[str] = set()
        self.starts = array("Q")  # of every member, for member_ends
        # (start of a file's last chunk, the file's endOffset), for end_at_end_offsets
        self.last_starts, self.last_ends = array("Q"), array("Q")
        self.pending: list[Any] | None = None  # [row, name, its chunk rows] of the file being read
        self.prefetch_end: int | None = None

    def read_rows(self, text: str, at: int) -> int:
        """Reads the entries array at `at`; returns where it ends."""
        if text[at] != "[":
            raise _NotOnePass
        at = _skip(text, at + 1)
        if text[at] == "]":
            return at + 1
        scan = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner raw_decode wraps
        add = self.add
        while True:
            row, at = scan(text, at)
            add(row)
            if text[at] == ",":  # what Go writes between rows: no blank to skip
                at += 1
                if text[at] in " \t\n\r":
                    at = _skip(text, at)
                continue
            at = _skip(text, at)
            if text[at] == "]":
                return at + 1
            if text[at] != ",":
                raise _NotOnePass
            at = _skip(text, at + 1)

    def add(self, row: dict[str, Any]) -> None:
        if self.row_hook is not None:
            row = self.row_hook(row)
        kind = row["type"]
        if row.get("offset") and kind in ("reg", "chunk"):
            self.starts.append(int(row["offset"]))
        if self.end_offsets and (int(row.get("endOffset") or 0) < 0 or not isinstance(row["name"], str)):
            raise _NotOnePass  # _frame_ends reads every row's endOffset, and keys rows by their names
        name = clean_path(str(row["name"]))
        if name is None:
            if self.end_offsets:
                raise _NotOnePass
            return  # escapes the root: skipped, as the tar path skips it
        pending = self.pending
        if kind == "chunk":
            if pending is None or pending[1] != name or pending[2] is None:
                raise _NotOnePass
            if self.end_offsets and row["name"] != pending[0]["name"]:
                raise _NotOnePass
            pending[2] = [pending[2], row] if isinstance(pending[2], dict) else [*pending[2], row]
            return
        self._flush()
        if name in ARTIFACTS:
            self._artifact(row, name)
            return
        if name in self.names:
            raise _NotOnePass
        self.names.add(name)
        self.pending = [row, name, row if kind == "reg" and int(row.get("size", 0)) else None]

    def _artifact(self, row: dict[str, Any], name: str) -> None:
        self.prefetch_end = int(row.get("offset", 0)) if name == PREFETCH_LANDMARK else self.prefetch_end
        if self.end_offsets:
            if name in self.names:
                raise _NotOnePass
            self.names.add(name)  # no file takes it: artifacts are never kept
            self._last_chunk(row, None)

    def _last_chunk(self, row: dict[str, Any], chunk_rows: list[dict[str, Any]] | None) -> None:
        """Notes where the last chunk of the file of `row` starts (the last of `chunk_rows`,
        its "reg" row then its "chunk" rows, if it has several), and the file's endOffset,
        for end_at_end_offsets."""
        end = int(row.get("endOffset") or 0)
        if end and row["type"] == "reg":
            if chunk_rows is None:  # most files: the one row
                start = int(row["offset"]) if row.get("offset") else None
            else:
                start = max((int(r["offset"]) for r in chunk_rows if r.get("offset")), default=None)
            if start is not None:
                self.last_starts.append(start)
                self.last_ends.append(end)

    def _flush(self) -> None:
        if self.pending is not None:
            row, name, chunk_rows = self.pending
            self.pending = None
            chunks: Sequence[Chunk] | None = _one_chunk(row, self.table) if chunk_rows is row else None
            if chunks is None:
                chunks = _tiled(name, row, chunk_rows, _ENDS_LATER, self.table)
            self.entries.append(_entry(row, name, self.layer, self.attributes, chunks))
            if self.end_offsets:
                self._last_chunk(row, chunk_rows if isinstance(chunk_rows, list) else None)

    def finish(self, toc_offset: int) -> LayerToc:
        """The entries, their chunks' member ends filled in (member_ends' rule, then
        end_at_end_offsets' where asked)."""
        self._flush()
        starts = sorted(set(self.starts))
        ends = dict(zip(starts, [*starts[1:], toc_offset], strict=True))
        end_at_end_offsets(ends, zip(self.last_starts, self.last_ends, strict=True))
        self.table.arrays["blob_end"][:] = array("Q", map(ends.__getitem__, self.table.arrays["blob_offset"]))
        self.table.place_in_cache()
        return LayerToc(self.entries, self.prefetch_end)


def toc_rows(toc_json: bytes, kind: str) -> list[dict[str, Any]]:
    """Returns the entry rows of a version 1 TOC (eStargz's, or zstd:chunked's, which has
    the same fields)."""
    try:
        document = json.loads(toc_json)
        rows = document["entries"]
        if document.get("version") != 1 or not isinstance(rows, list):
            raise LayerFormatError(f"unsupported {kind} TOC version {document.get('version')!r}")
        return rows
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # nested past the parser's depth
        raise LayerFormatError(f"malformed {kind} TOC: {exc!r}") from exc


def toc_entries(rows: list[dict[str, Any]], layer: int, ends: Callable[[], dict[int, int]], kind: str) -> LayerToc:
    """Returns the entries of TOC rows; `ends()` maps each compressed member's (or zstd
    frame's) start to the end of the bytes to fetch for it."""
    try:
        return _entries(rows, layer, ends())
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:  # a number no array holds
        raise LayerFormatError(f"malformed {kind} TOC: {exc!r}") from exc


def _entries(rows: list[dict[str, Any]], layer: int, ends: dict[int, int]) -> LayerToc:
    attributes = RowAttributes()
    kept: list[tuple[dict[str, Any], str]] = []
    # Per file name, the rows of its chunks: one row (most files) or a list of them. Chunks go
    # straight into the layer's ChunkTable as its entries are built (no Chunk object each).
    chunks: dict[str, dict[str, Any] | list[dict[str, Any]]] = {}
    prefetch_end = None
    for row in rows:  # first the chunks of every file (a file's "chunk" rows follow its own)
        name = clean_path(str(row["name"]))
        if name is None:
            continue  # escapes the root: skipped, as the tar path skips it
        if row["type"] == "chunk":
            known = chunks.get(name)
            if known is None:
                chunks[name] = [row]
            elif isinstance(known, list):
                known.append(row)
            else:
                chunks[name] = [known, row]
        elif name in ARTIFACTS:
            prefetch_end = int(row.get("offset", 0)) if name == PREFETCH_LANDMARK else prefetch_end
        else:
            if row["type"] == "reg" and int(row.get("size", 0)):
                chunks[name] = row
            kept.append((row, name))
    # then each entry, built once with its chunks
    table = ChunkTable()
    entries = [_entry(row, name, layer, attributes, _tiled(name, row, chunks.get(name), ends, table))
               for row, name in kept]  # fmt: skip
    table.place_in_cache()
    return LayerToc(entries, prefetch_end)


def member_ends(rows: list[dict[str, Any]], toc_offset: int) -> dict[int, int]:
    """Maps each member's start offset to the start of the next member (or the TOC)."""
    starts = sorted({int(r["offset"]) for r in rows if r.get("offset") and r["type"] in ("reg", "chunk")})
    return dict(zip(starts, [*starts[1:], toc_offset], strict=True))


def end_at_end_offsets(ends: dict[int, int], last_chunks: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Ends each file's last chunk at the file's endOffset where that lies within what `ends`
    gives it (zstd:chunked: see its _frame_ends). `last_chunks`: (the start of a file's last
    chunk, the file's endOffset), in the order of the files' rows."""
    for start, end in last_chunks:
        if start < end <= ends[start]:
            ends[start] = end
    return ends


def _tiled(path: str, row: dict[str, Any], chunk_rows: dict[str, Any] | list[dict[str, Any]] | None,
           ends: Mapping[int, int], table: ChunkTable) -> Sequence[Chunk]:  # fmt: skip
    """The chunks of the file of `row` (none unless `chunk_rows` name some), added
    to `table` in file order, each with its size: a chunk without a chunkSize runs to the
    next chunk (to the end of the file for the last). Refuses chunks that leave a gap,
    overlap, or do not add up to the file. `chunk_rows` are its rows: its "reg" row (the
    first chunk), then its "chunk" rows, or one row alone."""
    if chunk_rows is None:
        return ()
    size = int(row.get("size", 0)) if row["type"] == "reg" else 0
    if isinstance(chunk_rows, dict):
        spans = [_span(chunk_rows, ends, size)]
    else:
        spans = [_span(r, ends, size if r["type"] == "reg" else 0) for r in chunk_rows]
    if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] in (0, size):  # most files: no sorting, no pairing
        table.add_chunk(0, size, *spans[0][2:])
        return table.file(table.end_file())
    spans.sort(key=lambda span: span[0])
    sized = [span if span[1] else (span[0], size - span[0], *span[2:]) for span in spans]
    covered = sum(span[1] for span in sized)
    gapless = all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(sized))
    if covered != size or not gapless or sized[0][0] != 0:
        raise LayerFormatError(f"eStargz TOC: chunks of {path!r} do not tile its {size} bytes")
    for span in sized:
        table.add_chunk(*span)
    return table.file(table.end_file())


def _one_chunk(row: dict[str, Any], table: ChunkTable) -> FileChunks | None:
    """_tiled of a "reg" row that is its file's only chunk (most files) with its member's end
    left for _OnePass.finish, in fewer steps; None if the row is not that simple case."""
    size = int(row.get("size", 0))
    file_offset = row.get("chunkOffset", 0)
    chunk_size = int(row.get("chunkSize", 0))
    if file_offset != 0 or chunk_size not in (0, size):
        return None
    table.add_chunk(0, size, int(row["offset"]), 0, int(row.get("innerOffset", 0)), str(row.get("chunkDigest", "")))
    return table.file(table.end_file())


Span = tuple[int, int, int, int, int, str]  # a Chunk's fields, in its order, before it is a table row


def _span(row: dict[str, Any], ends: Mapping[int, int], file_size: int = 0) -> Span:
    """A chunk row, or the first chunk of a "reg" row (`file_size` known: a chunk without a
    chunkSize runs to the end of the file; for "chunk" rows that is fixed in _tiled)."""
    offset = int(row["offset"])
    file_offset = int(row.get("chunkOffset", 0))
    size = int(row.get("chunkSize", 0)) or max(0, file_size - file_offset)
    return (file_offset, size, offset, ends[offset], int(row.get("innerOffset", 0)),
            str(row.get("chunkDigest", "")))  # fmt: skip


class RowAttributes(dict[tuple[Any, ...], tuple[int, int, int, int]]):
    """(st_mode, uid, gid, mtime_ns) per distinct (type, mode, uid, gid, modtime) of a layer's
    rows, as they are in the JSON: most rows repeat a few, so a row costs one lookup, not three
    int()s, a time parse and four sharings. Keys equal as numbers give equal int()s; a modtime
    that is no string fails to parse, so no two equal keys can mean different attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.share = sharer()

    def __missing__(self, key: tuple[Any, ...]) -> tuple[int, int, int, int]:
        kind, mode, uid, gid, modtime = key
        share = self.share
        found = (share(_TYPES[kind] | (int(mode) & 0o7777)), share(int(uid)), share(int(gid)),
                 share(_modtime_ns(str(modtime))))  # fmt: skip
        self[key] = found
        return found


def _entry(row: dict[str, Any], name: str, layer: int, attributes: RowAttributes, chunks: Sequence[Chunk]) -> Entry:
    kind = row["type"]
    if kind not in _TYPES:
        raise LayerFormatError(f"eStargz TOC: {name!r} has unknown type {kind!r}")
    get = row.get
    mode, uid, gid, mtime_ns = attributes[kind, get("mode", 0), get("uid", 0), get("gid", 0), get("modtime", "")]
    hardlink = kind == "hardlink"
    link = str(get("linkName", ""))
    if hardlink:
        link = clean_path(link) or ""
    return Entry(
        name,
        mode,
        uid,
        gid,
        int(get("size", 0)) if kind == "reg" else 0,
        mtime_ns,
        link,
        hardlink,
        _rdev(row) if kind in ("char", "block") else 0,
        {k: _xattr(v) for k, v in xattrs.items()} if (xattrs := get("xattrs")) else NO_XATTRS,
        layer,
        0,
        chunks,
    )  # by position: the fields of Entry, in order (a third faster than by keyword, per file)


def _rdev(row: dict[str, Any]) -> int:
    return os.makedev(int(row.get("devMajor", 0)), int(row.get("devMinor", 0)))


def _xattr(value: str) -> bytes:
    # Go encodes map[string][]byte values as base64 strings.
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise LayerFormatError(f"eStargz TOC: xattr value {value!r} is not base64") from None


@functools.lru_cache(maxsize=4096)  # an image repeats a few modtimes over thousands of files
def _modtime_ns(text: str) -> int:
    if not text:
        return 0
    # The fraction of a second is read here: Go writes 1 to 9 digits, Python 3.10's
    # fromisoformat takes only 3 or 6, and no Python version keeps more than microseconds.
    fraction = _FRACTION.search(text)
    digits = fraction.group(1) if fraction else ""
    rest = text[: fraction.start()] + text[fraction.end() :] if fraction else text
    try:
        if fraction is not None and not 1 <= len(digits) <= 9:
            raise ValueError(text)
        moment = datetime.datetime.fromisoformat(rest.replace("Z", "+00:00"))
    except ValueError:
        raise LayerFormatError(f"eStargz TOC: modtime {text!r} is not RFC 3339") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    delta = moment - _EPOCH  # exact integer arithmetic: float timestamps would round
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + int(digits.ljust(9, "0"))


@dataclass(frozen=True, slots=True)
class Fetch:
    """One request: compressed bytes [start, end) of a blob, holding `chunks`."""

    start: int
    end: int
    chunks: tuple[Chunk, ...]


def chunks_for(entry: Entry, offset: int, size: int) -> list[Chunk]:
    """Returns the chunks of `entry` that hold bytes [offset, offset + size)."""
    end = min(offset + size, entry.size)
    if isinstance(entry.chunks, FileChunks):  # a tree's table: bisect, and make only those Chunks
        return entry.chunks.covering(offset, end)
    return [c for c in entry.chunks if c.file_offset < end and c.file_offset + c.size > offset]


def chunks_after(entry: Entry, last: Chunk, count: int) -> list[Chunk]:
    """Returns up to `count` chunks of `entry` that follow `last` in the file."""
    if isinstance(entry.chunks, FileChunks):
        return entry.chunks.following(last, count)
    return [c for c in entry.chunks if c.file_offset > last.file_offset][:count]


def plan_fetches(chunks: Sequence[Chunk], max_gap: int = 0, max_span: int | None = None) -> list[Fetch]:
    """Returns the fewest requests that cover `chunks`: members that touch (or lie within
    `max_gap` bytes of each other) are fetched with one closed range, up to `max_span` bytes."""
    fetches: list[Fetch] = []
    for chunk in sorted(set(chunks), key=lambda c: (c.blob_offset, c.inner_offset)):
        last = fetches[-1] if fetches else None
        fits = max_span is None or (last is not None and chunk.blob_end - last.start <= max_span)
        if last is not None and chunk.blob_offset <= last.end + max_gap and fits:
            fetches[-1] = Fetch(last.start, max(last.end, chunk.blob_end), (*last.chunks, chunk))
        else:
            fetches.append(Fetch(chunk.blob_offset, chunk.blob_end, (chunk,)))
    return fetches


def chunk_data(compressed: bytes | memoryview, fetch_start: int, chunk: Chunk) -> bytes:
    """Returns a chunk's bytes out of the compressed range that starts at `fetch_start`."""
    member = compressed[chunk.blob_offset - fetch_start : chunk.blob_end - fetch_start]
    wanted = chunk.inner_offset + chunk.size
    try:
        # The whole member in one call, into a buffer of the chunk's size: zlib then lets go of
        # the GIL once per chunk, where a decompressobj with max_length takes it back for each
        # of the blocks its output grows by (and joins them holding it), so that inflating on
        # two threads ran no faster than on one. A member holds one chunk, at most a tar header
        # or padding after it (the buffer then grows once); a buffer larger than its output
        # would be shrunk, which costs a second page fault per page.
        data = zlib.decompress(member, wbits=31, bufsize=wanted)
    except zlib.error as exc:
        raise LayerFormatError(f"chunk at blob offset {chunk.blob_offset} is not valid gzip: {exc}") from exc
    piece = data if chunk.inner_offset == 0 and len(data) == chunk.size else data[chunk.inner_offset : wanted]
    if len(piece) != chunk.size:
        raise LayerFormatError(f"chunk at blob offset {chunk.blob_offset} holds {len(piece)} of {chunk.size} bytes")
    return piece
