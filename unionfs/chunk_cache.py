"""Decompressed eStargz chunks, kept in memory (an LRU) and on disk (content-addressed).

On disk a chunk is CACHE/chunks/ALGO-HEX, named by its chunkDigest: any mount may write
it, and every mount verifies it when reading, so two mounts can share the directory and a
damaged file is noticed, removed and fetched again. The directory is held under a size
bound: when a write takes it over, the least recently written chunks go first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
from pathlib import Path

from cachetools import LRUCache

from registry.digest import Digest
from registry.errors import ManifestError

log = logging.getLogger("crfs-merge")
# Small on purpose: the kernel keeps the pages of files read (kernel_cache), so this only
# has to hold chunks between fetch and read, and the readahead.
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_DISK_BYTES = 10 * 1024 * 1024 * 1024
EVICT_TO = 0.9  # evict down to this share of the bound, so eviction is not run on every write


class ChunkCache:
    """Thread-safe get/put of verified chunk bytes by key (a chunkDigest, or an opaque key
    for legacy stargz chunks that carry no digest: those are kept in memory only)."""

    def __init__(self, directory: Path, disk_bytes: int = DEFAULT_DISK_BYTES,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:  # fmt: skip
        self._directory = directory
        self._directory.mkdir(parents=True, exist_ok=True)
        self._disk_bytes = disk_bytes
        self._memory: LRUCache[str, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._lock = threading.Lock()
        self._disk_used: int | None = None  # measured on the first write, not at mount time

    def get(self, key: str) -> bytes | None:
        """Returns the chunk, or None if it is in neither cache (or was found damaged)."""
        with self._lock:
            data = self._memory.get(key)
        if data is not None:
            return data
        data = self._read_disk(key)
        if data is not None:
            self._remember(key, data)
        return data

    def get_recent(self, key: str) -> bytes | None:
        """Returns the chunk if it is in the memory cache; never reads the disk (for the event
        loop, which must not wait on files)."""
        with self._lock:
            return self._memory.get(key)

    def contains(self, key: str) -> bool:
        """True if the chunk is probably cached (for prefetch: no read, no hashing)."""
        with self._lock:
            if key in self._memory:
                return True
        return _digest_of(key) is not None and self._path(key).exists()

    def put(self, key: str, data: bytes) -> None:
        """Stores a verified chunk."""
        self._remember(key, data)
        if _digest_of(key) is not None:
            self._write_disk(key, data)

    def _remember(self, key: str, data: bytes) -> None:
        with self._lock, contextlib.suppress(ValueError):  # larger than the whole LRU: disk only
            self._memory[key] = data

    def _path(self, key: str) -> Path:
        return self._directory / key.replace(":", "-")

    def _read_disk(self, key: str) -> bytes | None:
        algorithm_hex = _digest_of(key)
        if algorithm_hex is None:
            return None
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.new(algorithm_hex[0], data).hexdigest() != algorithm_hex[1]:
            log.warning("chunk cache: %s is damaged; removed, it will be fetched again", self._path(key).name)
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
            return None
        return data

    def _write_disk(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if path.exists():
            return
        # A temporary name unique to this process and thread, made without mkstemp's random
        # names and Python file objects: a tree of small files writes a chunk per file, and
        # mkstemp was a quarter of a lazy `tar`.
        temp = os.path.join(self._directory, f".partial-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as exc:  # a full disk costs the cache, never the read
            log.warning("chunk cache: cannot store %s: %s", path.name, exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            return
        with self._lock:
            if self._disk_used is None:
                self._disk_used = sum(p.stat().st_size for p in self._directory.iterdir() if p.is_file())
            self._disk_used += len(data)
            over = self._disk_used > self._disk_bytes
        if over:
            self._evict()

    def _evict(self) -> None:
        files = sorted((p for p in self._directory.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime_ns)  # fmt: skip
        used = sum(p.stat().st_size for p in files)
        for path in files:
            if used <= self._disk_bytes * EVICT_TO:
                break
            size = path.stat().st_size
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                used -= size
        with self._lock:
            self._disk_used = used


def _digest_of(key: str) -> tuple[str, str] | None:
    """Returns (algorithm, hex) if `key` is a chunk digest, None for any other key."""
    try:
        digest = Digest.parse(key)
    except ManifestError:
        return None
    return digest.algorithm, digest.hex
