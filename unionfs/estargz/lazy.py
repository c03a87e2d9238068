"""Lazily read eStargz layers: fetch the footer and TOC at mount time, then, per read, only
the chunks that hold the bytes asked for, verified against their chunkDigest.

All fetching runs on the one event loop thread, so misses for the same chunk coalesce
without locks: the first reader starts the fetch, later ones await the same future. Inflating,
verifying and storing chunks run in a small pool of worker threads (zlib, zstd and hashlib let
go of the GIL), a batch of chunks per task, so that the chunks of one read-ahead are inflated on
all cores at once while the loop goes on receiving.

A read has a deadline (registry.options: twice --timeout): its fetch gives up there, and the
FUSE thread stops waiting there (then EIO), cancelling what it started. A fetch that fails
or is abandoned leaves nothing behind: the cache holds only verified chunks, and its chunks
stop being in flight at once (a bad chunk) or a second later (no registry: see
FAILURE_MEMORY), after which a read of them fetches afresh.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from registry.cache_files import write_atomically
from registry.deferred_client import BlobReader
from registry.digest import Digest
from registry.errors import DigestMismatchError, ImageError, LayerFormatError, RegistryError
from registry.media_types import TOC_DIGEST_ANNOTATION
from registry.retry import Patience
from registry.source import Layer
from unionfs.aio import EventLoopThread
from unionfs.chunk_table import ChunkTable, small_file_rows
from unionfs.entry import Chunk, Entry
from unionfs.estargz.toc import (
    FOOTER_SIZE,
    Fetch,
    LayerToc,
    chunk_data,
    chunks_after,
    chunks_for,
    parse_footer,
    parse_toc,
    plan_fetches,
    read_toc_member,
)
from unionfs.storage.chunk_cache import ChunkCache, LayerChunks
from unionfs.storage.sealed import DamagedCacheFile, drop_damaged, seal_parts, unseal

log = logging.getLogger("crfs-merge")
READAHEAD_CHUNKS = 4  # on a miss, also start fetching this many following chunks of the file,
READAHEAD_BYTES = 4 * 1024 * 1024  # or more, up to this many file bytes (zstd:chunked's are ~64 KiB),
READAHEAD_MAX_CHUNKS = 64  # but no more chunks than this
# (A read that enters a chunk, a sequential reader moving on, starts the read-ahead too: the
# reader then finds each chunk inflated, while the pool inflates the next ones.)
READAHEAD_SPAN = 1024 * 1024  # read-ahead asks for ranges this large at most (a bigger chunk alone)
INFLATE_BATCH = 256 * 1024  # compressed bytes one inflate task takes at least (small files go together)
INFLATE_WORKERS = min(8, max(2, os.cpu_count() or 2))
# Once a read reaches the end of a file, the small files that follow it in the blob (within
# this many compressed bytes) are fetched too, in one request: a tar, a copy or a build reads
# a tree in about the order it was written, and a request per small file would bound it.
# "Small" reaches up to 1 MiB compressed: with 64 KiB, each file between 64 KiB and a chunk
# was a request of its own, and so was the run of small files after it (236 of a lazy `tar`'s
# 247 requests on the Debian image); a registry spends about as much CPU on a 4 KiB range as
# on a 1 MiB one (docker-registry 6-8 ms on loopback), and its CPU was a third of the `tar`'s.
SMALL_FILE_SPAN = 2 * 1024 * 1024
SMALL_FILE_MAX = 1024 * 1024  # compressed size of a file that counts as small
MERGE_GAP = 64 * 1024  # fetch across gaps this small rather than make another request
PREFETCH_SPAN = 16 * 1024 * 1024  # the largest range one prefetch request asks for
# How long past its deadline a FUSE thread still waits for a fetch that is ending by itself
# (it gives up at the deadline too), before cancelling it.
DEADLINE_GRACE = 0.5
# How long a fetch that found no registry (it gave up, or its reader's deadline passed) keeps
# failing the reads that join it. The kernel asks again for the page of a read that failed
# right away; without this, one read() would wait out two deadlines.
FAILURE_MEMORY = 1.0
TOC_FORMAT = 2  # CACHE/toc/v2/ALGO-HEX.toc: sealed "offset\nTOC JSON"
# Bytes asked for at the end of a gzip layer whose descriptor names its TOC (so it is eStargz):
# its footer, and the TOC member of a layer of up to about 1,000 files, in one request (the
# footer alone, then the TOC, took two round trips). A layer that does not say so may be plain
# gzip, fetched whole anyway: only its footer is asked for, so the probe wastes no 64 KiB.
TAIL_GUESS = 64 * 1024
ChunkDecoder = Callable[[bytes | memoryview, int, Chunk], bytes]  # (fetched range, its blob offset, chunk)
# A read under way: its chunks, those the cache had (None for the others), their fetch if any.
Started = tuple[list[Chunk], dict[Chunk, bytes | None], Future[dict[Chunk, bytes]] | None]


def cached_toc_path(layer: Layer, toc_dir: Path) -> Path:
    return toc_dir / f"v{TOC_FORMAT}" / f"{layer.key}.toc"


async def fetch_toc(client: BlobReader, layer: Layer, number: int, toc_dir: Path) -> LayerToc | None:
    """Returns the layer's TOC if it is (e)stargz, else None (it is then read whole).

    One closed-range request for the blob's tail, footer and TOC (a second one for the rest of
    a large TOC), unless an earlier mount left the TOC in `toc_dir`. A TOC that does not match
    the layer's toc.digest annotation is an error, not a fallback: the layer is not what its
    manifest says. A cached TOC is sealed
    (unionfs/storage/sealed.py) and checked against the annotation too: one that fails is removed,
    with a warning, and fetched again."""
    digest, size = layer.digest, layer.window.size
    if digest is None or size < FOOTER_SIZE:
        return None
    cached = cached_toc_path(layer, toc_dir)
    toc = _load_cached_toc(cached, layer, number)
    if toc is not None:
        return toc
    found = await _fetch_toc_json(client, digest, size, tail_size(layer))
    if found is None:
        return None
    toc_json, toc_offset = found
    _check_toc_digest(layer, toc_json)
    toc = parse_toc(toc_json, number, toc_offset)
    _write_cached_toc(cached, layer, toc_json, toc_offset)
    return toc


def tail_size(layer: Layer) -> int:
    """How many bytes at the end of `layer` the first request for its footer asks for."""
    return TAIL_GUESS if layer.toc_digest is not None else FOOTER_SIZE


async def _fetch_toc_json(client: BlobReader, digest: Digest, size: int, tail: int) -> tuple[bytes, int] | None:
    """The TOC JSON and its offset: the blob's last `tail` bytes hold the footer and, for
    most eStargz layers, the whole TOC member (one request); the rest of the TOC is a second."""
    tail_start = max(0, size - tail)
    ending = await client.read_range(digest, tail_start, size - 1)
    footer = parse_footer(ending)
    if footer is None or not 0 < footer.toc_offset < size - footer.size:
        return None
    in_tail = ending[max(0, footer.toc_offset - tail_start) : size - footer.size - tail_start]
    if footer.toc_offset >= tail_start:
        return read_toc_member(in_tail), footer.toc_offset
    head = await client.read_range(digest, footer.toc_offset, tail_start - 1)
    return read_toc_member(head + in_tail), footer.toc_offset


def _check_toc_digest(layer: Layer, toc_json: bytes) -> None:
    if layer.toc_digest is not None:
        what = f"TOC of layer {layer.digest} ({TOC_DIGEST_ANNOTATION})"
        Digest.parse(layer.toc_digest).check_bytes(toc_json, what)


def _load_cached_toc(path: Path, layer: Layer, number: int) -> LayerToc | None:
    """Returns the TOC an earlier mount saved at `path`, or None if there is none, or it is
    damaged (then removed with a warning): its seal, its annotation and its parse must hold."""
    try:
        payload = unseal(layer.key, path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, DamagedCacheFile) as exc:
        drop_damaged(path, exc, "fetching the TOC again", log.warning)
        return None
    offset_line, _, toc_json = bytes(payload).partition(b"\n")
    try:
        _check_toc_digest(layer, toc_json)
        return parse_toc(toc_json, number, int(offset_line))
    except (ValueError, ImageError) as exc:
        drop_damaged(path, exc, "fetching the TOC again", log.warning)
        return None


def _write_cached_toc(path: Path, layer: Layer, toc_json: bytes, toc_offset: int) -> None:
    # Written only once verified (or with nothing to verify against): "offset\nTOC JSON", sealed.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pieces = seal_parts(layer.key, [b"%d\n" % toc_offset, toc_json])  # no copy of a TOC of 10s of MB
        write_atomically(path, pieces, f"the TOC of layer {layer.digest}")
    except OSError as exc:  # a full or read-only cache costs the next mount two requests
        log.warning("cannot save the TOC of layer %s to %s: %s", layer.digest, path, exc.strerror)


class LazyLayer:
    """Reads file bytes of one eStargz layer through the registry and the chunk cache."""

    def __init__(self, loop: EventLoopThread, client: BlobReader, blob: Digest, cache: ChunkCache,
                 deadline: float, files: SmallFiles | None = None,
                 decode: ChunkDecoder = chunk_data) -> None:  # fmt: skip
        self._loop, self._client, self._blob = loop, client, blob
        self._cache: LayerChunks = cache.layer(blob)
        self._decode = decode  # a chunk's bytes out of its fetched range: gzip, or zstd:chunked's zstd
        self._deadline = deadline  # seconds a read may take, fetching included
        self._inflight: dict[Chunk, asyncio.Future[bytes]] = {}
        self._small_files = files or SmallFiles(ChunkTable(), array("Q"))

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Returns bytes [offset, offset + size) of `entry` (export, cat, the writable mount's copy-up)."""
        wanted, pieces, fetching = self._start(entry, offset, size, backstop=False)
        if fetching is not None:
            pieces.update(self._wait_by_deadline(fetching))
        return _joined(wanted, pieces, offset, size)

    def read_then(self, entry: Entry, offset: int, size: int, reply: Callable[[bytes], None],
                  fail: Callable[[BaseException], None]) -> None:  # fmt: skip
        """Answers bytes [offset, offset + size) of `entry` through `reply`, or an OSError
        through `fail`: in this thread if the chunks are cached, else on the event loop once
        they are fetched (or the read's deadline has passed). The FUSE thread that calls this
        never waits on the network, so a lazy mount runs as few threads as a local one: a
        thread per core. (With 16, each waiting on a fetch of its own, 8 parallel readers of
        small files already on disk spent most of the server's CPU handing the interpreter
        lock from thread to thread: 19 s of CPU for 40,000 files, 10 s with 2 threads.)"""
        wanted, pieces, fetching = self._start(entry, offset, size, backstop=True)
        if fetching is None:
            reply(_joined(wanted, pieces, offset, size))
            return

        def fetched(done: Future[dict[Chunk, bytes]]) -> None:
            try:
                pieces.update(done.result())
                data = _joined(wanted, pieces, offset, size)
            except BaseException as exc:  # every request gets one answer, whatever happened
                fail(self._failure(exc))
                return
            reply(data)

        fetching.add_done_callback(fetched)  # last: once added, only `fetched` answers

    def _start(self, entry: Entry, offset: int, size: int, backstop: bool) -> Started:
        """The chunks of a read, those the cache has, and the fetch of the others (None if
        none is missing); starts the read-ahead and the small neighbours' fetch too."""
        wanted = chunks_for(entry, offset, size)
        pieces = {c: self._cache.get(c) for c in wanted}
        missing = [c for c, data in pieces.items() if data is None]
        if not missing:
            if any(offset <= c.file_offset for c in wanted):
                self._readahead(entry, wanted[-1])  # a sequential reader entered a chunk: stay ahead of it
            return wanted, pieces, None
        fetching = self._submit(missing, backstop)  # first, so that what is waited for is asked for first
        self._readahead(entry, wanted[-1])
        if wanted[-1] == entry.chunks[-1]:
            self._read_neighbours(wanted[-1])
        return wanted, pieces, fetching

    def _submit(self, missing: list[Chunk], backstop: bool = False) -> Future[dict[Chunk, bytes]]:
        """Starts fetching the missing chunks of a read, within the read's deadline. With
        `backstop`, the loop itself cancels the fetch DEADLINE_GRACE past the deadline (no
        thread waits for it to do so: see read_then)."""
        deadline = time.monotonic() + self._deadline
        fetch = self._get(missing, Patience(self._deadline, deadline))
        if backstop:
            fetch = asyncio.wait_for(fetch, self._deadline + DEADLINE_GRACE)
        return self._loop.submit(fetch)

    def _failure(self, exc: BaseException) -> OSError:
        """The error a read answers for a fetch that failed, was cancelled or timed out."""
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            return OSError(f"layer {self._blob}: no answer from the registry within {self._deadline:g}s")
        return exc if isinstance(exc, OSError) else OSError(f"layer {self._blob}: {exc or type(exc).__name__}")

    def _wait_by_deadline(self, fetching: Future[dict[Chunk, bytes]]) -> dict[Chunk, bytes]:
        """Returns the chunks `fetching` gets, or raises OSError once the read's deadline has passed."""
        try:
            return self._loop.wait(fetching, self._deadline + DEADLINE_GRACE)
        except TimeoutError:
            raise OSError(f"layer {self._blob}: no answer from the registry within {self._deadline:g}s") from None

    def prefetch(self, chunks: Iterable[Chunk]) -> Future[None]:
        """Starts fetching `chunks` in the background, one bounded range at a time so that
        reads, which run concurrently, are not queued behind it."""
        wanted = [c for c in chunks if not self._cache.contains(c)]
        return self._loop.submit(self._prefetch(wanted))

    async def _prefetch(self, chunks: list[Chunk]) -> None:
        for fetch in plan_fetches(chunks, MERGE_GAP, PREFETCH_SPAN):
            try:
                # No deadline: nobody waits for it (a reader that joins it waits until its
                # own); it gives up after the same span of failures in a row.
                await self._get(list(fetch.chunks), Patience(self._deadline))
            except Exception as exc:  # a failed prefetch costs only time: reads try again
                log.info("prefetch of %s failed: %s", self._blob, exc)
                return

    def _readahead(self, entry: Entry, last: Chunk) -> None:
        reach = last.file_offset + last.size + READAHEAD_BYTES
        following = chunks_after(entry, last, READAHEAD_MAX_CHUNKS)
        after = [c for n, c in enumerate(following) if n < READAHEAD_CHUNKS or c.file_offset + c.size <= reach]
        # Chunks on disk are read and verified on the worker pool meanwhile, as fetched ones are
        # inflated there: the reader then finds them in memory.
        wanted = self._cache.load_ahead(after, _inflate_pool())
        if wanted:
            self._loop.submit(self._readahead_fetch(wanted))

    async def _readahead_fetch(self, chunks: list[Chunk]) -> None:
        """Fetches `chunks` a range each (or a few small ones together), all at once: each is
        inflated as it arrives, where one range for all would wait for the last byte."""
        fetches = plan_fetches(chunks, MERGE_GAP, READAHEAD_SPAN)
        results = await asyncio.gather(*(self._get(list(f.chunks), Patience(self._deadline)) for f in fetches),
                                       return_exceptions=True)  # fmt: skip
        for result in results:
            if isinstance(result, Exception):  # costs only time: the read will try again
                log.info("read-ahead of %s failed: %s", self._blob, result)
                return

    def _read_neighbours(self, last: Chunk) -> None:
        after = self._small_files.following(last, SMALL_FILE_SPAN)
        if after:
            self.prefetch(after)

    async def _get(self, chunks: list[Chunk], patience: Patience) -> dict[Chunk, bytes]:
        loop = asyncio.get_running_loop()
        waiting = {c: self._inflight[c] for c in chunks if c in self._inflight}
        # A fetch (a readahead) may have finished since the reader missed the cache; it left
        # its chunks in memory, and this runs on the loop, which must not read files.
        recent = self._cache.get_recent
        cached = {c: data for c in chunks if c not in waiting and (data := recent(c)) is not None}
        mine = [c for c in chunks if c not in waiting and c not in cached]
        for chunk in mine:
            self._inflight[chunk] = loop.create_future()
        try:
            parts = await asyncio.gather(*(self._fetch(f, patience) for f in plan_fetches(mine, MERGE_GAP)))
        except BaseException as exc:  # failed, or cancelled by a reader whose deadline passed
            self._fail(mine, exc, remember=isinstance(exc, (RegistryError, asyncio.CancelledError)))
            raise
        got = cached | {chunk: data for part in parts for chunk, data in part.items()}
        for chunk in mine:
            self._inflight.pop(chunk).set_result(got[chunk])
        for chunk, future in waiting.items():
            # Shielded: a reader that stops waiting must not cancel a fetch others share.
            got[chunk] = await asyncio.shield(future)
        return got

    def _fail(self, chunks: list[Chunk], exc: BaseException, remember: bool) -> None:
        """Fails the in-flight futures of `chunks`; drops them now, or after FAILURE_MEMORY."""
        loop = asyncio.get_running_loop()
        for chunk in chunks:
            future = self._inflight[chunk]
            future.set_exception(OSError(f"layer {self._blob}: fetch failed: {exc or type(exc).__name__}"))
            future.exception()  # retrieved: readers that shared it have their own error
            if remember:
                loop.call_later(FAILURE_MEMORY, self._forget, chunk, future)
            else:
                del self._inflight[chunk]

    def _forget(self, chunk: Chunk, future: asyncio.Future[bytes]) -> None:
        if self._inflight.get(chunk) is future:
            del self._inflight[chunk]

    async def _fetch(self, fetch: Fetch, patience: Patience) -> dict[Chunk, bytes]:
        compressed = await self._client.read_range(self._blob, fetch.start, fetch.end - 1, patience)
        # Decompressing, hashing and writing the disk cache take longer than the transfer;
        # zlib, zstd and hashlib let go of the GIL, so worker threads inflate batches of the
        # range on every core while the loop stays free for I/O.
        loop = asyncio.get_running_loop()
        view = memoryview(compressed)  # each chunk's member is a slice of it, not a copy
        batches = [loop.run_in_executor(_inflate_pool(), self._unpack, view, fetch.start, batch)
                   for batch in _batches(fetch.chunks)]  # fmt: skip
        got: dict[Chunk, bytes] = {}
        for part in await asyncio.gather(*batches):
            got.update(part)
        return got

    def _unpack(self, compressed: memoryview, start: int, chunks: tuple[Chunk, ...]) -> dict[Chunk, bytes]:
        """Inflates, verifies and caches (to disk soon after) `chunks` out of the compressed range at `start`."""
        got = {}
        for chunk in chunks:
            data = self._decode(compressed, start, chunk)
            if chunk.digest and _hex(chunk.digest, data) != chunk.digest.partition(":")[2]:
                raise DigestMismatchError(f"layer {self._blob}: chunk at {chunk.blob_offset} fails its chunkDigest")
            self._cache.put_behind(chunk, data)  # on disk soon: the reader need not wait
            got[chunk] = data
        return got


def _joined(wanted: list[Chunk], pieces: dict[Chunk, bytes | None], offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of the file out of its chunks `wanted`. Each chunk is
    sliced to the span asked for before joining: a FUSE read is 128 KiB, a chunk 4 MiB, and
    joining whole chunks first would copy 32 times what is returned."""
    end = offset + size
    return b"".join(
        memoryview(pieces[c] or b"")[max(0, offset - c.file_offset) : min(c.size, end - c.file_offset)] for c in wanted
    )


def _batches(chunks: tuple[Chunk, ...]) -> Iterator[tuple[Chunk, ...]]:
    """Splits a fetch's chunks, in order, into runs of at least INFLATE_BATCH compressed bytes
    (the last may be smaller): one inflate task each."""
    start = 0
    size = 0
    for index, chunk in enumerate(chunks):
        size += chunk.blob_end - chunk.blob_offset
        if size >= INFLATE_BATCH:
            yield chunks[start : index + 1]
            start, size = index + 1, 0
    if start < len(chunks):
        yield chunks[start:]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _inflate_pool() -> ThreadPoolExecutor:
    """The process's inflate workers, made on first use (in the server, after its fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(INFLATE_WORKERS, thread_name_prefix="crfs-inflate")
        return _pool


class SmallFiles:
    """The chunks of the layer's small files, as rows of the tree's chunk table in blob order
    (an array, not a Chunk each: a layer may have hundreds of thousands). Found when first
    needed (a read's neighbours, or the work a mount starts once ready), not while the mount
    waits: on a 200,000-file image, listing them took longer than loading the tree."""

    def __init__(self, table: ChunkTable, rows: array | Callable[[], array]) -> None:
        self._table = table
        self._rows: array | None = rows if isinstance(rows, array) else None
        self._find: Callable[[], array] | None = None if isinstance(rows, array) else rows
        self._finding = threading.Lock()

    @classmethod
    def of(cls, table: ChunkTable, files: Callable[[], Iterable[int]]) -> SmallFiles:
        """Those among files() (file numbers in `table`) that are small."""
        return cls(table, lambda: small_file_rows(table, files(), SMALL_FILE_MAX))

    def rows(self) -> array:
        """The rows, found on the first call (one thread finds them, the others wait)."""
        if self._rows is None:
            with self._finding:
                if self._rows is None and self._find is not None:
                    self._rows = self._find()
        assert self._rows is not None
        return self._rows

    def following(self, last: Chunk, span: int) -> list[Chunk]:
        """The small files after `last` in the blob whose members end within `span` bytes of its end."""
        table, rows = self._table, self.rows()
        start = bisect.bisect_right(rows, last.blob_offset, key=lambda row: table.blob_span(row)[0])
        after = []
        for row in rows[start:]:
            if table.blob_span(row)[1] - last.blob_end > span:
                break
            after.append(table.chunk(row))
        return after


def _hex(digest: str, data: bytes) -> str:
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise LayerFormatError(f"unsupported chunkDigest algorithm {algorithm!r}")
    return hashlib.new(algorithm, data).hexdigest()
