"""RowGatherer (how the freeze builds a tree's chunk table out of the TOCs' tables) against
ChunkTable.add_file, the row-by-row way: the same table for files picked from several tables,
files of several chunks, digests of other algorithms, and chunks given as Chunk objects."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from unionfs import chunk_table
from unionfs.chunk_table import ChunkTable, RowGatherer
from unionfs.entry import Chunk


def _digest(n: int) -> str:
    return f"sha256:{hashlib.sha256(str(n).encode()).hexdigest()}"


def _table(first: int, files: Sequence[int]) -> ChunkTable:
    """A table whose k-th file has files[k] chunks; every third chunk has a sha512 digest."""
    table, n = ChunkTable(), first
    for count in files:
        for k in range(count):
            digest = f"sha512:{n:0128x}" if n % 3 == 0 else _digest(n)
            table.add_chunk(k * 10, 10, n * 100, n * 100 + 50, k, digest)
            n += 1
        table.end_file()
    return table


def _rows(table: ChunkTable) -> list[tuple[Chunk, ...]]:
    return [tuple(table.file(k)) for k in range(table.files)]


@pytest.mark.parametrize("batch", [2, chunk_table.GATHER_BATCH])
def test_gathered_rows_are_the_rows_added_one_by_one(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_table, "GATHER_BATCH", batch)
    first, second = _table(1, [1, 3, 1, 2]), _table(1000, [2, 1, 1])
    loose = (Chunk(0, 5, 7, 9, 0, _digest(5)), Chunk(5, 5, 9, 11, 0, ""))
    picks: list[Sequence[Chunk]] = [second.file(1), first.file(1), loose, first.file(3), second.file(0),
                                    first.file(0), (), second.file(2)]  # fmt: skip
    gatherer, expected = RowGatherer(), ChunkTable()
    for chunks in picks:
        assert gatherer.add_file(chunks) == expected.add_file(tuple(chunks))
    gathered = gatherer.table()
    gathered.check()
    assert _rows(gathered) == _rows(expected)
    assert bytes(gathered.digests) == bytes(expected.digests) and gathered.other_digests == expected.other_digests
    assert list(gathered.file_first) == list(expected.file_first)


@pytest.mark.parametrize("swap", [0, 1, 2])
def test_file_rows_out_of_order_are_refused(swap: int) -> None:
    """A damaged saved tree whose files' first rows go backwards anywhere would hand a file
    another's chunks: check() refuses it, wherever the fault is."""
    table = _table(1, [1, 3, 1, 2])
    table.check()
    first = table.file_first
    first[swap + 1], first[swap + 2] = first[swap + 2], first[swap + 1]
    with pytest.raises(ValueError, match="chunk rows out of range"):
        table.check()
