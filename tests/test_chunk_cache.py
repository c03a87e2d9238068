"""The chunk cache: bounded on disk, oldest first out, damage noticed, shareable."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from unionfs.storage import chunk_cache
from unionfs.storage.chunk_cache import ChunkCache


def _chunk(number: int) -> tuple[str, bytes]:
    data = os.urandom(1000) + bytes([number])
    return f"sha256:{hashlib.sha256(data).hexdigest()}", data


def test_disk_is_bounded_and_oldest_chunks_go_first(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, disk_bytes=3500, memory_bytes=0)
    chunks = [_chunk(n) for n in range(6)]
    for key, data in chunks:
        cache.put(key, data)
        time.sleep(0.01)  # distinct mtimes
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk <= 3500
    fresh = ChunkCache(tmp_path, disk_bytes=3500, memory_bytes=0)  # another mount, disk only
    assert fresh.get(chunks[0][0]) is None and not fresh.contains(chunks[0][0])
    assert fresh.get(chunks[-1][0]) == chunks[-1][1] and fresh.contains(chunks[-1][0])


def test_a_damaged_chunk_is_noticed_and_removed(tmp_path: Path) -> None:
    key, data = _chunk(1)
    ChunkCache(tmp_path).put(key, data)
    (tmp_path / key.replace(":", "-")).write_bytes(b"x" * len(data))
    reader = ChunkCache(tmp_path, memory_bytes=0)
    assert reader.get(key) is None
    assert not (tmp_path / key.replace(":", "-")).exists()


def test_undigested_chunks_stay_in_memory_only(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path)
    cache.put("sha256:blob@10+0", b"legacy stargz chunk")
    assert cache.get("sha256:blob@10+0") == b"legacy stargz chunk"
    assert list(tmp_path.iterdir()) == []


def test_chunks_put_behind_are_served_at_once_and_on_disk_after_close(tmp_path: Path) -> None:
    chunks = [_chunk(n) for n in range(50)]
    cache = ChunkCache(tmp_path, memory_bytes=0)  # no LRU: only the writer's queue or the disk has them
    for key, data in chunks:
        cache.put_behind(key, data)
        assert cache.get(key) == data and cache.contains(key)
    cache.close()
    fresh = ChunkCache(tmp_path, memory_bytes=0)  # the next mount
    assert all(fresh.get(key) == data for key, data in chunks)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(key.replace(":", "-") for key, _ in chunks)


def test_put_behind_writes_in_the_callers_thread_once_the_writer_is_behind(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("unionfs.storage.chunk_cache.PENDING_BYTES", 0)  # the writer is always too far behind
    key, data = _chunk(1)
    ChunkCache(tmp_path, memory_bytes=0).put_behind(key, data)  # not closed: nothing waits for a writer
    assert (tmp_path / key.replace(":", "-")).read_bytes() == data


def test_concurrent_readers_of_a_chunk_on_disk_read_and_verify_it_once(tmp_path: Path, monkeypatch) -> None:
    # The kernel sends several READs of one chunk at once: each used to read and hash the
    # whole chunk file (about 4 times per chunk on a cold sequential read).
    key, data = _chunk(1)
    ChunkCache(tmp_path).put(key, data)
    reads: list[str] = []
    read_file = chunk_cache._read_file

    def slow_counted_read(path: Path) -> bytes:
        reads.append(path.name)
        time.sleep(0.2)  # long enough for every reader below to arrive while it is under way
        return read_file(path)

    monkeypatch.setattr(chunk_cache, "_read_file", slow_counted_read)
    cache = ChunkCache(tmp_path)  # a new mount: the chunk is on disk only
    with ThreadPoolExecutor(8) as readers:
        got = list(readers.map(lambda _: cache.get(key), range(8)))
    assert got == [data] * 8
    assert reads == [key.replace(":", "-")]


def test_load_ahead_brings_chunks_on_disk_into_memory_verified(tmp_path: Path) -> None:
    on_disk, damaged, absent = _chunk(1), _chunk(2), _chunk(3)
    writer = ChunkCache(tmp_path)
    writer.put(*on_disk)
    writer.put(*damaged)
    damaged_path = tmp_path / damaged[0].replace(":", "-")
    damaged_path.write_bytes(b"x" * len(damaged[1]))
    cache = ChunkCache(tmp_path)  # a new mount
    with ThreadPoolExecutor(2) as pool:
        assert cache.load_ahead([on_disk[0], damaged[0], absent[0]], pool) == [absent[0]]
    (tmp_path / on_disk[0].replace(":", "-")).unlink()
    assert cache.get(on_disk[0]) == on_disk[1]  # loaded into memory ahead of the reader
    assert cache.get(damaged[0]) is None and not damaged_path.exists()  # noticed and removed, to be fetched again
