"""The chunks of lazily read files in typed arrays: about 80 bytes per chunk, no object each.

A file's chunks are consecutive rows, in file order; file k has rows [file_first[k],
file_first[k + 1]). Digests are kept raw (32 bytes of a "sha256:" digest); a chunk without
one (legacy stargz) or with another algorithm has 32 zero bytes there and its text, if any,
in a small dict. A Chunk (unionfs.entry), the interface of the lazy readers and of the TOC
parsers, is made on demand for the rows one read needs.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, overload

from unionfs.entry import Chunk

TypeCode = Literal["I", "Q", "q"]  # of the arrays of numbers kept (array and memoryview share them)
CHUNK_ARRAYS: dict[str, TypeCode] = {
    "file_offset": "Q", "size": "Q", "blob_offset": "Q", "blob_end": "Q", "inner_offset": "Q", "cache_offset": "Q",
}  # fmt: skip
DIGEST_SIZE = 32
NO_DIGEST = bytes(DIGEST_SIZE)
SHA256 = "sha256:"
GATHER_BATCH = 8192  # rows whose digests RowGatherer joins at once
LAST_PLACE = 2**63 - 1  # of a chunk in its layer's cache file (an off_t)
# A column of numbers: an array while it is built, a read-only view of the file's bytes once a
# saved tree is loaded (indexed, sliced and bisected alike, at the same speed).
Column = array | memoryview


class ChunkTable:
    """Rows of chunks, grouped by file; built with add_file, read with file(k) or chunk(i)."""

    def __init__(self, arrays: Mapping[str, Column] | None = None, digests: bytes | bytearray | memoryview = b"",
                 other_digests: dict[int, str] | None = None, file_first: Column | None = None) -> None:  # fmt: skip
        growing = [array(code) for code in CHUNK_ARRAYS.values()] if arrays is None else []
        self.arrays: Mapping[str, Column] = arrays or dict(zip(CHUNK_ARRAYS, growing, strict=True))
        self.digests = digests if arrays is not None else bytearray()
        self.other_digests = other_digests or {}
        first = file_first if file_first is not None else array("Q", [0])
        self.file_first = first
        # The appends of a table being built, bound once (the rows of a TOC); none for a loaded one.
        self._appends = tuple(values.append for values in growing)
        self._end_file = first.append if isinstance(first, array) else None
        a = self.arrays
        self._file_offset, self._size = a["file_offset"], a["size"]
        self._blob_offset, self._blob_end, self._inner = a["blob_offset"], a["blob_end"], a["inner_offset"]
        self._cache_offset = a["cache_offset"]

    @property
    def files(self) -> int:
        return len(self.file_first) - 1

    def __len__(self) -> int:
        return len(self._file_offset)

    def add_file(self, chunks: Iterable[Chunk]) -> int:
        """Appends a file's chunks (in file order); returns its file number."""
        for chunk in chunks:
            self.add_chunk(chunk.file_offset, chunk.size, chunk.blob_offset, chunk.blob_end, chunk.inner_offset,
                           chunk.digest, chunk.cache_offset)  # fmt: skip
        return self.end_file()

    def add_chunk(self, file_offset: int, size: int, blob_offset: int, blob_end: int, inner_offset: int,
                  digest: str, cache_offset: int = 0) -> None:  # fmt: skip
        """Appends one chunk of the file being added; end_file() closes that file. A TOC's
        table gives its chunks their cache offsets at the end (place_in_cache)."""
        assert isinstance(self.digests, bytearray) and self._appends, "a loaded table is read-only"
        row = len(self._file_offset)
        add_file_offset, add_size, add_blob_offset, add_blob_end, add_inner, add_cache_offset = self._appends
        add_file_offset(file_offset)
        add_size(size)
        add_blob_offset(blob_offset)
        add_blob_end(blob_end)
        add_inner(inner_offset)
        add_cache_offset(cache_offset)
        self.digests += _raw(digest, row, self.other_digests)

    def place_in_cache(self) -> None:
        """Gives each chunk of a whole layer's table its place in the layer's cache file: the
        sum of the sizes of the chunks before it in the blob. It depends on the layer alone (not
        on which of its files an image shows), so every image with the layer shares the file."""
        rows: Sequence[int] = range(len(self))
        blob = self._blob_offset
        in_blob_order = all(map(operator.le, blob, itertools.islice(blob, 1, None)))  # as TOCs list files
        if not in_blob_order:
            rows = sorted(rows, key=blob.__getitem__)  # stable: a member's rows keep their order
        sums = itertools.accumulate(map(self._size.__getitem__, rows), initial=0)
        # A layer of more than 8 EiB (a hostile TOC) puts the rest at the end, where no file
        # can hold it: those chunks are never stored, and never read from there (they fail their digest).
        places = array("Q", map(min, sums, itertools.repeat(LAST_PLACE)))
        del places[-1]  # the total
        cache_offset = places
        if not in_blob_order:
            cache_offset = array("Q", bytes(places.itemsize * len(places)))
            for row, place in zip(rows, places, strict=True):
                cache_offset[row] = place
        self.arrays["cache_offset"][:] = cache_offset  # type: ignore[index]

    def end_file(self) -> int:
        """Closes the file whose chunks were added since the last one; returns its number."""
        assert self._end_file is not None, "a loaded table is read-only"
        self._end_file(len(self._file_offset))
        return len(self.file_first) - 2

    def chunk(self, row: int) -> Chunk:
        raw = self.digests[row * DIGEST_SIZE : (row + 1) * DIGEST_SIZE]
        digest = self.other_digests.get(row, "") if raw == NO_DIGEST else SHA256 + raw.hex()
        return Chunk(self._file_offset[row], self._size[row], self._blob_offset[row], self._blob_end[row],
                     self._inner[row], digest, self._cache_offset[row])  # fmt: skip

    def file(self, number: int) -> FileChunks:
        return FileChunks(self, self.file_first[number], self.file_first[number + 1])

    def file_of_offset(self, start: int, end: int, offset: int) -> int:
        """The row among [start, end) (one file's) that holds file byte `offset`."""
        return max(start, bisect.bisect_right(self._file_offset, offset, start, end) - 1)

    def blob_span(self, row: int) -> tuple[int, int]:
        return self._blob_offset[row], self._blob_end[row]

    def check(self) -> None:
        """Raises ValueError if the arrays disagree (a damaged saved tree), before any lookup."""
        rows = len(self._file_offset)
        if any(len(values) != rows for values in self.arrays.values()) or len(self.digests) != rows * DIGEST_SIZE:
            raise ValueError("chunk arrays disagree")
        first = self.file_first
        # map and all run in C: a generator here took 35 ms of a 200,000-file tree's 80 ms load
        if first[0] != 0 or first[-1] != rows or not all(map(operator.le, first, itertools.islice(first, 1, None))):
            raise ValueError("chunk rows out of range")
        if any(row >= rows or row < 0 for row in self.other_digests):
            raise ValueError("chunk digest out of range")


class FileChunks(Sequence[Chunk]):
    """One file's chunks, a view of its rows: Chunks are made as they are asked for."""

    __slots__ = ("_end", "_start", "_table")

    def __init__(self, table: ChunkTable, start: int, end: int) -> None:
        self._table, self._start, self._end = table, start, end

    def __len__(self) -> int:
        return self._end - self._start

    @overload
    def __getitem__(self, index: int) -> Chunk: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Chunk]: ...

    def __getitem__(self, index: int | slice) -> Chunk | Sequence[Chunk]:
        if isinstance(index, slice):
            return [self._table.chunk(self._start + i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._table.chunk(self._start + index)

    def __iter__(self) -> Iterator[Chunk]:
        return (self._table.chunk(row) for row in range(self._start, self._end))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def covering(self, offset: int, end: int) -> list[Chunk]:
        """The chunks that hold file bytes [offset, end), found by bisection."""
        if end <= offset or self._start == self._end:
            return []
        table = self._table
        first = table.file_of_offset(self._start, self._end, offset)
        last = table.file_of_offset(self._start, self._end, end - 1)
        return [table.chunk(row) for row in range(first, last + 1)]

    def following(self, chunk: Chunk, count: int) -> list[Chunk]:
        """Up to `count` chunks after `chunk` (one of this file's) in file order."""
        row = self._table.file_of_offset(self._start, self._end, chunk.file_offset) + 1
        return [self._table.chunk(r) for r in range(row, min(row + count, self._end))]


class RowGatherer:
    """Builds one table out of files' chunks picked from other tables (a TOC's, layer by layer):
    each file is two numbers per row while picking, and the rows are copied in bulk at the end
    (a copy of each field per file took half of the freeze of a 200k-file lazy image)."""

    def __init__(self) -> None:
        self._numbers: dict[int, int] = {}  # id of a source table: its number
        self._tables: list[ChunkTable] = []  # the sources, kept alive while their ids are used
        self._loose = ChunkTable()  # chunks given as Chunk objects
        self._source, self._row = array("I"), array("Q")  # per row picked: its table and row there
        self._file_first = array("Q", [0])

    def add_file(self, chunks: Sequence[Chunk]) -> int:
        """Picks a file's chunks (in file order); returns its file number in the table."""
        if isinstance(chunks, FileChunks):
            table, start, end = chunks._table, chunks._start, chunks._end
        else:
            table = self._loose
            number = table.add_file(chunks)
            start, end = table.file_first[number], table.file_first[number + 1]
        source = self._numbers.get(id(table))
        if source is None:
            source = self._numbers[id(table)] = len(self._tables)
            self._tables.append(table)
        if end - start == 1:
            self._source.append(source)
            self._row.append(start)
        else:
            self._source.extend(array("I", [source]) * (end - start))
            self._row.extend(range(start, end))
        self._file_first.append(len(self._row))
        return len(self._file_first) - 2

    def table(self) -> ChunkTable:
        """The picked rows as one table, files numbered in the order they were added."""
        bases = array("Q", [0])
        for table in self._tables:
            bases.append(bases[-1] + len(table))
        rows = array("Q", map(operator.add, map(bases.__getitem__, self._source), self._row))
        arrays = {}
        for name, code in CHUNK_ARRAYS.items():
            joined = array(code)
            for table in self._tables:
                joined.extend(table.arrays[name])
            arrays[name] = array(code, map(joined.__getitem__, rows))
        every = b"".join(bytes(table.digests) for table in self._tables)
        digests = bytearray()
        for at in range(0, len(rows), GATHER_BATCH):  # join makes a list of its pieces: a batch at a time
            starts = array("Q", map(operator.mul, rows[at : at + GATHER_BATCH], itertools.repeat(DIGEST_SIZE)))
            ends = map(operator.add, starts, itertools.repeat(DIGEST_SIZE))
            digests += b"".join(map(every.__getitem__, map(slice, starts, ends)))
        texts = {bases[n] + row: text for n, table in enumerate(self._tables)
                 for row, text in table.other_digests.items()}  # fmt: skip
        other = {new: texts[old] for new, old in enumerate(rows) if old in texts} if texts else {}
        return ChunkTable(arrays, digests, other, self._file_first)


def small_file_rows(table: ChunkTable, files: Iterable[int], max_compressed: int) -> array:
    """The rows of the files among `files` whose chunks take at most `max_compressed`
    compressed bytes in all, in blob order (most have one chunk; zstd:chunked cuts files by
    content into chunks of ~64 KiB before compression, so a small file may have several)."""
    first, offsets, ends = table.file_first, table.arrays["blob_offset"], table.arrays["blob_end"]
    small: list[int] = []
    for k in files:
        start, end = first[k], first[k + 1]
        if end - start == 1:  # most files: no slicing
            if ends[start] - offsets[start] <= max_compressed:
                small.append(start)
        elif sum(ends[start:end]) - sum(offsets[start:end]) <= max_compressed:
            small.extend(range(start, end))
    small.sort(key=offsets.__getitem__)
    return array("Q", small)


def _raw(digest: str, row: int, other: dict[int, str]) -> bytes:
    if digest.startswith(SHA256) and len(digest) == len(SHA256) + 2 * DIGEST_SIZE:
        text = digest[len(SHA256) :]
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = NO_DIGEST
        # Only 64 lower-case hex digits (no blanks, which fromhex skips) round-trip through raw.hex().
        if raw != NO_DIGEST and len(raw) == DIGEST_SIZE and text == text.lower():
            return raw
    if digest:
        other[row] = digest
    return NO_DIGEST
