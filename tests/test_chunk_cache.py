"""The chunk cache: a sparse file per layer, each chunk at its place, verified on every read;
bounded on disk (least recently written layers out first), damage and holes never served."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from registry.digest import Digest
from tests.conftest import require
from unionfs.chunk_table import LAST_PLACE, ChunkTable
from unionfs.entry import Chunk
from unionfs.storage.chunk_cache import LAYOUT, ChunkCache

KB = 1024


def _layer(number: int) -> Digest:
    return Digest.parse(f"sha256:{hashlib.sha256(b'layer %d' % number).hexdigest()}")


def _chunks(count: int, size: int = 1000) -> list[tuple[Chunk, bytes]]:
    """`count` chunks of one layer, one after the other in its blob and in its cache file."""
    made = []
    for number in range(count):
        data = os.urandom(size - 1) + bytes([number % 256])
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        made.append((Chunk(0, size, number * 100, number * 100 + 100, 0, digest, number * size), data))
    return made


def _layer_file(directory: Path, blob: Digest) -> Path:
    return directory / LAYOUT / f"sha256-{blob.hex}.chunks"


def test_a_chunk_is_kept_at_its_place_in_its_layers_file_and_read_back_by_another_mount(tmp_path: Path) -> None:
    chunks = _chunks(3)
    writer = ChunkCache(tmp_path).layer(_layer(1))
    for chunk, data in chunks[::2]:  # the middle one never read: a hole
        writer.put(chunk, data)
    content = _layer_file(tmp_path, _layer(1)).read_bytes()
    assert content[:1000] == chunks[0][1] and content[2000:3000] == chunks[2][1] and content[1000:2000] == bytes(1000)
    reader = ChunkCache(tmp_path, memory_bytes=0).layer(_layer(1))  # another mount, disk only
    assert reader.get(chunks[0][0]) == chunks[0][1] and reader.get(chunks[2][0]) == chunks[2][1]
    assert reader.get(chunks[1][0]) is None  # the hole reads as zeros, which fail its digest
    assert ChunkCache(tmp_path).layer(_layer(2)).get(chunks[0][0]) is None  # another layer's file
    assert not _layer_file(tmp_path, _layer(2)).exists()  # a read makes no file


def test_disk_is_bounded_and_the_least_recently_written_layers_go_first(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, disk_bytes=100 * KB, memory_bytes=0)
    layers = [_layer(n) for n in range(4)]
    written = {}
    for blob in layers:  # 40 KB each: the fourth takes the directory past 100 KB
        written[blob] = _chunks(2, 20 * KB)
        for chunk, data in written[blob]:
            cache.layer(blob).put(chunk, data)
        time.sleep(0.02)  # distinct mtimes
    allocated = sum(p.stat().st_blocks * 512 for p in (tmp_path / LAYOUT).iterdir())
    assert allocated <= 100 * KB
    fresh = ChunkCache(tmp_path, disk_bytes=100 * KB, memory_bytes=0)  # another mount, disk only
    oldest, newest = written[layers[0]][0], written[layers[-1]][0]
    assert fresh.layer(layers[0]).get(oldest[0]) is None and not fresh.layer(layers[0]).contains(oldest[0])
    assert fresh.layer(layers[-1]).get(newest[0]) == newest[1] and fresh.layer(layers[-1]).contains(newest[0])


def test_a_damaged_chunk_is_not_served_and_its_fetch_writes_it_anew(tmp_path: Path) -> None:
    (chunk, data), (neighbour, neighbour_data) = _chunks(2)
    ChunkCache(tmp_path).layer(_layer(1)).put(chunk, data)
    ChunkCache(tmp_path).layer(_layer(1)).put(neighbour, neighbour_data)
    path = _layer_file(tmp_path, _layer(1))
    with path.open("r+b") as damaged:
        damaged.seek(chunk.cache_offset + 10)
        damaged.write(bytes([data[10] ^ 0xFF]))  # a byte that differs, whatever the random data
    reader = ChunkCache(tmp_path, memory_bytes=0).layer(_layer(1))
    assert reader.get(chunk) is None
    assert reader.get(neighbour) == neighbour_data  # the rest of the layer's file is still served
    reader.put(chunk, data)  # what a fetch does with what it got
    assert ChunkCache(tmp_path, memory_bytes=0).layer(_layer(1)).get(chunk) == data


def test_a_chunk_cut_short_by_a_truncated_file_is_not_served(tmp_path: Path) -> None:
    (chunk, data), (last, last_data) = _chunks(2)
    for c, d in ((chunk, data), (last, last_data)):
        ChunkCache(tmp_path).layer(_layer(1)).put(c, d)
    os.truncate(_layer_file(tmp_path, _layer(1)), last.cache_offset + 10)
    reader = ChunkCache(tmp_path, memory_bytes=0).layer(_layer(1))
    assert reader.get(chunk) == data and reader.get(last) is None


def test_undigested_chunks_stay_in_memory_only(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path).layer(_layer(1))
    legacy = Chunk(0, 19, 10, 40)
    cache.put(legacy, b"legacy stargz chunk")
    assert cache.get(legacy) == b"legacy stargz chunk"
    assert list((tmp_path / LAYOUT).iterdir()) == []


def test_chunks_put_behind_are_served_at_once_and_on_disk_after_close(tmp_path: Path) -> None:
    chunks = _chunks(50)
    cache = ChunkCache(tmp_path, memory_bytes=0)  # no LRU: only the writer's queue or the disk has them
    layer = cache.layer(_layer(1))
    for chunk, data in chunks:
        layer.put_behind(chunk, data)
        assert layer.get(chunk) == data and layer.contains(chunk)
    cache.close()
    fresh = ChunkCache(tmp_path, memory_bytes=0).layer(_layer(1))  # the next mount
    assert all(fresh.get(chunk) == data for chunk, data in chunks)
    assert [p.name for p in (tmp_path / LAYOUT).iterdir()] == [f"sha256-{_layer(1).hex}.chunks"]


def test_put_behind_writes_in_the_callers_thread_once_the_writer_is_behind(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("unionfs.storage.chunk_cache.PENDING_BYTES", 0)  # the writer is always too far behind
    [(chunk, data)] = _chunks(1)
    ChunkCache(tmp_path, memory_bytes=0).layer(_layer(1)).put_behind(chunk, data)  # not closed: no writer waits
    assert _layer_file(tmp_path, _layer(1)).read_bytes() == data


def test_concurrent_readers_of_a_chunk_on_disk_read_and_verify_it_once(tmp_path: Path, monkeypatch) -> None:
    # The kernel sends several READs of one chunk at once: each used to read and hash the
    # whole chunk (about 4 times per chunk on a cold sequential read).
    [(chunk, data)] = _chunks(1)
    ChunkCache(tmp_path).layer(_layer(1)).put(chunk, data)
    reads: list[int] = []
    read_disk = ChunkCache._read_disk

    def slow_counted_read(self: ChunkCache, name: str, chunk: Chunk) -> bytes | None:
        reads.append(chunk.cache_offset)
        time.sleep(0.2)  # long enough for every reader below to arrive while it is under way
        return read_disk(self, name, chunk)

    monkeypatch.setattr(ChunkCache, "_read_disk", slow_counted_read)
    layer = ChunkCache(tmp_path).layer(_layer(1))  # a new mount: the chunk is on disk only
    with ThreadPoolExecutor(8) as readers:
        got = list(readers.map(lambda _: layer.get(chunk), range(8)))
    assert got == [data] * 8
    assert reads == [chunk.cache_offset]


def test_load_ahead_brings_chunks_on_disk_into_memory_verified(tmp_path: Path) -> None:
    (on_disk, data), (damaged, damaged_data), (absent, _) = _chunks(3, 8 * KB)  # a block each, at least
    writer = ChunkCache(tmp_path).layer(_layer(1))
    writer.put(on_disk, data)
    writer.put(damaged, damaged_data)
    path = _layer_file(tmp_path, _layer(1))
    with path.open("r+b") as file:
        file.seek(damaged.cache_offset)
        file.write(b"x" * damaged.size)
    layer = ChunkCache(tmp_path).layer(_layer(1))  # a new mount
    with ThreadPoolExecutor(2) as pool:
        assert layer.load_ahead([on_disk, damaged, absent], pool) == [absent]  # a hole: no read
    os.truncate(path, 0)  # the disk no longer has them: what get() returns now came from memory
    assert layer.get(on_disk) == data  # loaded into memory ahead of the reader
    assert layer.get(damaged) is None  # read ahead, failed its digest: to be fetched again


@pytest.mark.parametrize("order", ["blob order", "shuffled"])
def test_a_layers_chunks_take_their_places_by_blob_order_whatever_the_rows_order(order: str) -> None:
    """The place of a chunk in its layer's file depends on the layer alone: the sizes of the
    chunks before it in the blob, however the TOC lists them."""
    sizes = {0: 500, 1000: 7, 2000: 4096, 3000: 1}  # blob offset: size
    offsets = sorted(sizes) if order == "blob order" else [2000, 0, 3000, 1000]
    table = ChunkTable()
    for offset in offsets:
        table.add_chunk(0, sizes[offset], offset, offset + 100, 0, "")
        table.end_file()
    table.place_in_cache()
    places = {table.chunk(row).blob_offset: table.chunk(row).cache_offset for row in range(len(table))}
    assert places == {0: 0, 1000: 500, 2000: 507, 3000: 4603}


def test_a_read_only_cache_serves_its_chunks_and_logs_once_that_it_stores_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require(os.geteuid() == 0, "a read-only bind mount needs root (who may write anywhere else)")
    (kept, data), (new, new_data) = _chunks(2)
    ChunkCache(tmp_path).layer(_layer(1)).put(kept, data)
    directory = tmp_path / LAYOUT
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    cache = ChunkCache(tmp_path, memory_bytes=0)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        layer = cache.layer(_layer(1))
        with caplog.at_level(logging.WARNING, logger="crfs-merge"):
            assert layer.get(kept) == data
            layer.put(new, new_data)
            layer.put(new, new_data)
        assert layer.get(new) is None  # neither kept in memory (none) nor on disk
        [line] = [r.getMessage() for r in caplog.records]
        assert "cannot store chunks" in line and "Read-only file system" in line, line
    finally:
        cache.close()  # its layer file, open, would keep the mount busy
        subprocess.run(["umount", str(directory)], check=True)


def test_a_layer_past_what_a_file_can_hold_puts_the_rest_at_the_end_not_a_crash() -> None:
    """A hostile TOC whose chunks add up past 2**63: places stop at the last one a file can
    have (where nothing is stored, and what is read fails its digest)."""
    table = ChunkTable()
    for number in range(3):
        table.add_chunk(0, 2**63 - 1, number * 10, number * 10 + 10, 0, "")
        table.end_file()
    table.place_in_cache()
    assert [table.chunk(row).cache_offset for row in range(3)] == [0, LAST_PLACE, LAST_PLACE]
