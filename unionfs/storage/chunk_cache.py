"""Decompressed eStargz chunks, kept in memory (an LRU) and on disk (content-addressed).

On disk a chunk is CACHE/chunks/ALGO-HEX, named by its chunkDigest: any mount may write
it, and every mount verifies it when reading, so two mounts can share the directory and a
damaged file is noticed, removed and fetched again. The directory is held under a size
bound: when a write takes it over, the least recently written chunks go first. A lazy read
does not wait for the disk: its chunks are written by one writer thread after they are served
(put_behind; close waits for them), as creating a file per chunk costs 20-750 us of CPU on
ext4 and was a quarter of a lazy `tar`'s server time. A chunk is written through a temporary
file that its writer locks (registry/cache_files.py), so one that a killed mount left is
swept; a full disk is logged once, and reads go on without the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

from cachetools import LRUCache

from registry.cache_files import write_atomically
from registry.digest import Digest
from registry.errors import ManifestError
from unionfs.storage.sealed import DamagedCacheFile, drop_damaged

log = logging.getLogger("crfs-merge")
# Small on purpose: the kernel keeps the pages of files read (kernel_cache), so this only
# has to hold chunks between fetch and read, and the readahead.
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_DISK_BYTES = 10 * 1024 * 1024 * 1024
# Chunks waiting for the writer thread, in bytes: past this, put_behind writes in the caller's
# thread, so a disk slower than the network holds back fetching rather than filling memory.
PENDING_BYTES = 64 * 1024 * 1024
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
        self._store_failed = False  # a write failed (a full disk): logged once
        self._pending: dict[str, bytes] = {}  # handed to the writer thread, not yet on disk
        self._pending_bytes = 0
        self._writer: ThreadPoolExecutor | None = None  # made on the first put_behind
        # Chunks being read from disk and verified: a reader of one waits for that load rather
        # than reading and hashing the file again (the kernel sends several READs of a chunk at
        # once: each read every chunk file about 4 times).
        self._loading: dict[str, Future[bytes | None]] = {}

    def get(self, key: str) -> bytes | None:
        """Returns the chunk, or None if it is in neither cache (or was found damaged)."""
        with self._lock:
            data = self._held(key)
            if data is not None:
                return data
            loading = self._loading.get(key)
            mine = loading is None
            if loading is None:
                loading = self._loading[key] = Future()
        if mine:
            self._load(key, loading)
        return loading.result()

    def load_ahead(self, keys: list[str], pool: Executor) -> list[str]:
        """Starts reading and verifying, on `pool`, those of `keys` that are on disk but not
        in memory, so that a sequential reader finds them there; returns the keys that are
        in neither (to be fetched)."""
        absent = []
        for key in keys:
            with self._lock:
                if key in self._memory or key in self._pending or key in self._loading:
                    continue
            if _digest_of(key) is None or not self._path(key).exists():
                absent.append(key)
                continue
            with self._lock:
                if key in self._loading:
                    continue
                loading = self._loading[key] = Future()
            pool.submit(self._load, key, loading)
        return absent

    def _load(self, key: str, loading: Future[bytes | None]) -> None:
        """Reads and verifies `key` from disk into memory, and tells its waiters."""
        try:
            data = self._read_disk(key)
            if data is not None:
                self._remember(key, data)
            loading.set_result(data)
        except BaseException as exc:
            loading.set_exception(exc)
        finally:
            with self._lock:
                del self._loading[key]

    def get_recent(self, key: str) -> bytes | None:
        """Returns the chunk if it is in the memory cache; never reads the disk (for the event
        loop, which must not wait on files)."""
        with self._lock:
            return self._held(key)

    def _held(self, key: str) -> bytes | None:
        """The chunk if memory holds it (the LRU, or waiting for the writer); the lock is held."""
        data = self._memory.get(key)
        return self._pending.get(key) if data is None else data

    def contains(self, key: str) -> bool:
        """True if the chunk is probably cached (for prefetch: no read, no hashing)."""
        with self._lock:
            if key in self._memory or key in self._pending:
                return True
        return _digest_of(key) is not None and self._path(key).exists()

    def put(self, key: str, data: bytes) -> None:
        """Stores a verified chunk."""
        self._remember(key, data)
        if _digest_of(key) is not None:
            self._write_disk(key, data)

    def put_behind(self, key: str, data: bytes) -> None:
        """Stores a verified chunk: in memory now, on disk soon, by the writer thread (at once,
        in this thread, when PENDING_BYTES are already waiting)."""
        self._remember(key, data)
        if _digest_of(key) is None:
            return
        with self._lock:
            if key in self._pending:
                return  # two readers fetched the same chunk: it is on its way to disk already
            behind = self._pending_bytes + len(data) <= PENDING_BYTES
            if behind:
                self._pending[key] = data
                self._pending_bytes += len(data)
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="crfs-chunk-writer")
                writer = self._writer
        if behind:
            writer.submit(self._write_pending, key, data)
        else:
            self._write_disk(key, data)

    def close(self) -> None:
        """Waits until the chunks handed to the writer thread are on disk."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _write_pending(self, key: str, data: bytes) -> None:
        try:
            self._write_disk(key, data)
        except Exception:  # a bug here must not pass silently in a thread nobody waits for
            log.exception("chunk cache: writing %s", key)
        finally:
            with self._lock:
                del self._pending[key]
                self._pending_bytes -= len(data)

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
            data = _read_file(self._path(key))
        except FileNotFoundError:
            return None
        if hashlib.new(algorithm_hex[0], data).hexdigest() != algorithm_hex[1]:
            damage = DamagedCacheFile("its digest does not match its contents")
            drop_damaged(self._path(key), damage, "fetching it again", log.warning)
            return None
        return data

    def _write_disk(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if path.exists():
            return
        try:
            write_atomically(path, data, "a chunk of an eStargz layer")
        except OSError as exc:  # a full disk costs the cache, never the read
            self._cannot_store(path, exc)
            return
        with self._lock:
            measured = self._disk_used is not None
        if not measured:
            used = _bytes_under(self._directory)  # outside the lock: a big directory takes a while
            with self._lock:
                self._disk_used = used if self._disk_used is None else self._disk_used
        with self._lock:
            assert self._disk_used is not None
            self._disk_used += len(data)
            over = self._disk_used > self._disk_bytes
        if over:
            self._evict()

    def _cannot_store(self, path: Path, exc: OSError) -> None:
        """Logs a failed write once per cache: a full disk fails every chunk after the first,
        and each would log a line of its own."""
        with self._lock:
            first, self._store_failed = not self._store_failed, True
        if first:
            log.warning("chunk cache: cannot store chunks in %s (%s); reads go on from memory and the "
                        "registry, and further failures are not logged", self._directory, exc.strerror)  # fmt: skip
        else:
            log.debug("chunk cache: cannot store %s: %s", path.name, exc)

    def _evict(self) -> None:
        files = sorted(_finished_files(self._directory), key=lambda f: f[2])
        used = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if used <= self._disk_bytes * EVICT_TO:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                used -= size
        with self._lock:
            self._disk_used = used


def _read_file(path: Path) -> bytes:
    """The bytes of the file at `path`, in four system calls (open, fstat, read, close), where
    Path.read_bytes makes nine (a tty check, a second fstat, two lseeks, a read past the end).
    Each lets go of the interpreter lock, which the server's other threads then contend for:
    8 threads reading 20,000 cold chunk files took 280 us of CPU per chunk, 210 with this."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size and (more := os.read(fd, size - len(data))):
            data += more
        return data
    finally:
        os.close(fd)


def _finished_files(directory: Path) -> list[tuple[str, int, int]]:
    """Returns (path, size, mtime_ns) of each chunk file; a file that goes between the listing
    and its stat (another mount evicts, or a writer renames its temporary file) is skipped."""
    found = []
    for entry in os.scandir(directory):
        if entry.name.startswith("."):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        found.append((entry.path, info.st_size, info.st_mtime_ns))
    return found


def _bytes_under(directory: Path) -> int:
    """Returns the size of the chunk files of `directory` (see _finished_files)."""
    return sum(size for _, size, _ in _finished_files(directory))


def _digest_of(key: str) -> tuple[str, str] | None:
    """Returns (algorithm, hex) if `key` is a chunk digest, None for any other key."""
    try:
        digest = Digest.parse(key)
    except ManifestError:
        return None
    return digest.algorithm, digest.hex
