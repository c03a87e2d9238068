"""The chunk cache: bounded on disk, oldest first out, damage noticed, shareable."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

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
