"""Decompressed chunks of lazily read layers, kept in memory (an LRU) and on disk.

On disk, each layer has one sparse file, CACHE/chunks/v2/ALGO-HEX.chunks (named by the layer's
blob digest), and each chunk its own place in it: its `cache_offset`, where the sizes of the
layer's chunks before it in the blob add up to (unionfs.chunk_table.ChunkTable.place_in_cache),
the same in every image that has the layer. A chunk file per chunk cost an open of a cold file
per small file read (46% of a lazy server's time under 8 parallel readers, a quarter of the
machine waiting on the disk); a layer file is opened once per mount, and a tree read in blob
order reads it in order, with the kernel's readahead.

A chunk is written with one pwrite, by one writer thread after it is served (put_behind; close
waits for them), and read back with one pread, then verified against its chunkDigest: a hole
(never written), a chunk half written by a killed mount, a damaged block or a chunk another
mount is writing at that moment all fail it, and are fetched again (which writes them anew).
So any mount may write a layer file at any time: each writes the same bytes at the same places.
Chunks without a digest (legacy stargz) are kept in memory only. The directory is held under a
size bound (bytes allocated): when a write takes it over, the least recently written layer files
are emptied first. A full disk is logged once, and reads go on without the disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

from cachetools import LRUCache

from registry.digest import Digest
from registry.errors import ManifestError
from unionfs.entry import Chunk

log = logging.getLogger("crfs-merge")
LAYOUT = "v2"  # CACHE/chunks/v2/: layer files (v1 was a file per chunk, CACHE/chunks/ALGO-HEX)
SUFFIX = ".chunks"
# Small on purpose: the kernel keeps the pages of files read (kernel_cache), so this only
# has to hold chunks between fetch and read, and the readahead.
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_DISK_BYTES = 10 * 1024 * 1024 * 1024
# Chunks waiting for the writer thread, in bytes: past this, put_behind writes in the caller's
# thread, so a disk slower than the network holds back fetching rather than filling memory.
PENDING_BYTES = 64 * 1024 * 1024
EVICT_TO = 0.9  # evict down to this share of the bound, so eviction is not run on every write


class ChunkCache:
    """A mount's chunks, all layers: the memory LRU, the open layer files, the writer thread and
    the disk bound. Lazy layers use it through `layer(blob)`. Thread-safe."""

    def __init__(self, directory: Path, disk_bytes: int = DEFAULT_DISK_BYTES,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:  # fmt: skip
        self._directory = directory / LAYOUT
        self._directory.mkdir(parents=True, exist_ok=True)
        self._disk_bytes = disk_bytes
        self._memory: LRUCache[str, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}  # layer file name -> its descriptor, opened on first use
        self._unwritable: dict[str, OSError] = {}  # layer files opened for reading only, and why
        self._disk_used: int | None = None  # measured on the first write, not at mount time
        self._store_failed = False  # a write failed (a full disk): logged once
        self._pending: dict[str, bytes] = {}  # handed to the writer thread, not yet on disk
        self._pending_bytes = 0
        self._writer: ThreadPoolExecutor | None = None  # made on the first put_behind
        # Chunks being read from disk and verified: a reader of one waits for that load rather
        # than reading and hashing it again (the kernel sends several READs of a chunk at once).
        self._loading: dict[str, Future[bytes | None]] = {}

    def layer(self, blob: Digest) -> LayerChunks:
        """The chunks of the layer whose blob is `blob`."""
        return LayerChunks(self, blob)

    def close(self) -> None:
        """Waits until the chunks handed to the writer thread are on disk, then closes the files."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        with self._lock:
            files, self._files = self._files, {}
            self._unwritable.clear()
        for fd in files.values():
            os.close(fd)

    # ------------------------------------------------------------ what LayerChunks asks

    def get(self, name: str, chunk: Chunk, key: str) -> bytes | None:
        with self._lock:
            data = self._held(key)
            if data is not None:
                return data
            loading = self._loading.get(key)
            mine = loading is None
            if loading is None:
                loading = self._loading[key] = Future()
        if mine:
            self._load(name, chunk, key, loading)
        return loading.result()

    def get_recent(self, key: str) -> bytes | None:
        with self._lock:
            return self._held(key)

    def contains(self, name: str, chunk: Chunk, key: str) -> bool:
        with self._lock:
            if key in self._memory or key in self._pending:
                return True
        return bool(chunk.digest) and self._on_disk(name, chunk)

    def load_ahead(self, name: str, chunk: Chunk, key: str, pool: Executor) -> bool:
        """Starts loading `chunk` from disk on `pool` if it is there and not in memory; False
        if it is in neither (to be fetched)."""
        with self._lock:
            if key in self._memory or key in self._pending or key in self._loading:
                return True
        if not chunk.digest or not self._on_disk(name, chunk):
            return False
        with self._lock:
            if key in self._loading:
                return True
            loading = self._loading[key] = Future()
        pool.submit(self._load, name, chunk, key, loading)
        return True

    def put(self, name: str, chunk: Chunk, key: str, data: bytes) -> None:
        self._remember(key, data)
        if chunk.digest:
            self._write_disk(name, chunk, data)

    def put_behind(self, name: str, chunk: Chunk, key: str, data: bytes) -> None:
        self._remember(key, data)
        if not chunk.digest:
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
            writer.submit(self._write_pending, name, chunk, key, data)
        else:
            self._write_disk(name, chunk, data)

    # ------------------------------------------------------------ by key (memory)

    def _held(self, key: str) -> bytes | None:
        """The chunk if memory holds it (the LRU, or waiting for the writer); the lock is held."""
        data = self._memory.get(key)
        return self._pending.get(key) if data is None else data

    def _remember(self, key: str, data: bytes) -> None:
        with self._lock, contextlib.suppress(ValueError):  # larger than the whole LRU: disk only
            self._memory[key] = data

    # ------------------------------------------------------------ layer files (disk)

    def _fd(self, name: str, create: bool) -> int | None:
        """The open layer file `name` (made if `create`, else None if there is none). A cache
        that cannot be written (read-only, another user's) is opened for reading: its chunks are
        served, and the first write that fails is logged."""
        with self._lock:
            fd = self._files.get(name)
        if fd is not None:
            return fd
        path = self._directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            if create or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            with self._lock:
                self._unwritable[name] = exc  # what a write to it says, rather than EBADF
        with self._lock:
            kept = self._files.setdefault(name, fd)
        if kept != fd:  # another thread opened it meanwhile
            os.close(fd)
        return kept

    def _on_disk(self, name: str, chunk: Chunk) -> bool:
        """True if the layer file may hold `chunk` (no read, no hash)."""
        fd = self._fd(name, create=False)
        return fd is not None and _has_data(fd, chunk)

    def _read_disk(self, name: str, chunk: Chunk) -> bytes | None:
        """The chunk out of its layer file, if it is there and verifies; None otherwise."""
        algorithm_hex = _digest_of(chunk.digest)
        fd = self._fd(name, create=False) if algorithm_hex is not None else None
        if algorithm_hex is None or fd is None or not _has_data(fd, chunk):
            return None
        try:
            data = os.pread(fd, chunk.size, chunk.cache_offset)
        except OSError as exc:  # a disk that fails a read costs the cache, never the read
            log.warning("chunk cache: cannot read %s: %s; fetching the chunk", self._directory / name, exc.strerror)
            return None
        if len(data) != chunk.size or hashlib.new(algorithm_hex[0], data).hexdigest() != algorithm_hex[1]:
            # A hole, a chunk half written, or damage: fetched again, which writes it anew.
            log.debug("chunk cache: %s at %d of %s does not verify", chunk.digest, chunk.cache_offset, name)
            return None
        return data

    def _load(self, name: str, chunk: Chunk, key: str, loading: Future[bytes | None]) -> None:
        """Reads and verifies `chunk` from disk into memory, and tells its waiters."""
        try:
            data = self._read_disk(name, chunk)
            if data is not None:
                self._remember(key, data)
            loading.set_result(data)
        except BaseException as exc:
            loading.set_exception(exc)
        finally:
            with self._lock:
                del self._loading[key]

    def _write_pending(self, name: str, chunk: Chunk, key: str, data: bytes) -> None:
        try:
            self._write_disk(name, chunk, data)
        except Exception:  # a bug here must not pass silently in a thread nobody waits for
            log.exception("chunk cache: writing %s", key)
        finally:
            with self._lock:
                del self._pending[key]
                self._pending_bytes -= len(data)

    def _write_disk(self, name: str, chunk: Chunk, data: bytes) -> None:
        try:
            fd = self._fd(name, create=True)
            assert fd is not None
            with self._lock:
                unwritable = self._unwritable.get(name)
            if unwritable is not None:
                raise unwritable
            os.pwrite(fd, data, chunk.cache_offset)
        except OSError as exc:  # a full disk costs the cache, never the read
            self._cannot_store(exc)
            return
        with self._lock:
            measured = self._disk_used is not None
        if not measured:
            used = sum(size for _, size, _ in _layer_files(self._directory))  # outside the lock
            with self._lock:
                self._disk_used = used if self._disk_used is None else self._disk_used
        with self._lock:
            assert self._disk_used is not None
            self._disk_used += len(data)
            over = self._disk_used > self._disk_bytes
        if over:
            self._evict()

    def _cannot_store(self, exc: OSError) -> None:
        """Logs a failed write once per cache: a full disk fails every chunk after the first,
        and each would log a line of its own."""
        with self._lock:
            first, self._store_failed = not self._store_failed, True
        if first:
            log.warning("chunk cache: cannot store chunks in %s (%s); reads go on from memory and the "
                        "registry, and further failures are not logged", self._directory, exc.strerror)  # fmt: skip
        else:
            log.debug("chunk cache: cannot store a chunk: %s", exc)

    def _evict(self) -> None:
        """Empties the least recently written layer files until the directory is under the
        bound; a file this mount has open is emptied but kept, so its descriptor stays the file."""
        files = sorted(_layer_files(self._directory), key=lambda f: f[2])
        used = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if used <= self._disk_bytes * EVICT_TO:
                break
            with self._lock:
                held = os.path.basename(path) in self._files
            try:
                os.truncate(path, 0)
                if not held:
                    os.unlink(path)
            except OSError as exc:  # gone already, or not ours to empty: the next one, then
                log.debug("chunk cache: cannot evict %s: %s", path, exc)
                continue
            used -= size
        with self._lock:
            self._disk_used = used


class LayerChunks:
    """get/put of one layer's verified chunks by Chunk (its digest names it in memory; legacy
    stargz chunks, which carry none, are named by their place in the blob)."""

    def __init__(self, cache: ChunkCache, blob: Digest) -> None:
        self._cache, self._blob = cache, blob
        self._name = f"{blob.algorithm}-{blob.hex}{SUFFIX}"

    def key(self, chunk: Chunk) -> str:
        return chunk.digest or f"{self._blob}@{chunk.blob_offset}+{chunk.inner_offset}"

    def get(self, chunk: Chunk) -> bytes | None:
        """Returns the chunk, or None if it is in neither cache (or does not verify on disk)."""
        return self._cache.get(self._name, chunk, self.key(chunk))

    def get_recent(self, chunk: Chunk) -> bytes | None:
        """Returns the chunk if the memory cache has it; never reads the disk (for the event
        loop, which must not wait on files)."""
        return self._cache.get_recent(self.key(chunk))

    def contains(self, chunk: Chunk) -> bool:
        """True if the chunk is probably cached (for prefetch: no read, no hashing)."""
        return self._cache.contains(self._name, chunk, self.key(chunk))

    def load_ahead(self, chunks: list[Chunk], pool: Executor) -> list[Chunk]:
        """Starts reading and verifying, on `pool`, those of `chunks` that are on disk but not
        in memory, so that a sequential reader finds them there; returns the chunks that are
        in neither (to be fetched)."""
        return [c for c in chunks if not self._cache.load_ahead(self._name, c, self.key(c), pool)]

    def put(self, chunk: Chunk, data: bytes) -> None:
        """Stores a verified chunk."""
        self._cache.put(self._name, chunk, self.key(chunk), data)

    def put_behind(self, chunk: Chunk, data: bytes) -> None:
        """Stores a verified chunk: in memory now, on disk soon, by the writer thread (at once,
        in this thread, when PENDING_BYTES are already waiting)."""
        self._cache.put_behind(self._name, chunk, self.key(chunk), data)


def _has_data(fd: int, chunk: Chunk) -> bool:
    """False if `chunk`'s span of the layer file `fd` is all hole (never written)."""
    try:
        return os.lseek(fd, chunk.cache_offset, os.SEEK_DATA) < chunk.cache_offset + max(1, chunk.size)
    except OSError:  # ENXIO: no data from there on
        return False


def _layer_files(directory: Path) -> list[tuple[str, int, int]]:
    """Returns (path, bytes allocated, mtime_ns) of each layer file (sparse: its size says
    little); a file that goes between the listing and its stat (another mount evicts) is skipped."""
    found = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(SUFFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        found.append((entry.path, info.st_blocks * 512, info.st_mtime_ns))
    return found


def _digest_of(key: str) -> tuple[str, str] | None:
    """Returns (algorithm, hex) if `key` is a chunk digest, None for any other key."""
    if not key:
        return None
    try:
        digest = Digest.parse(key)
    except ManifestError:
        return None
    return digest.algorithm, digest.hex
