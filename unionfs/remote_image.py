"""Registry images: resolve, learn which layers are eStargz or zstd:chunked (read lazily),
fetch the others whole, and build the merged view. Imported only for registry references, since aiohttp and
asyncio cost a local mount a tenth of a second."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from registry.deferred_client import BlobReader, DeferredClient
from registry.digest import Digest
from registry.errors import ImageError, LayerFormatError
from registry.media_types import Compression
from registry.pull import ResolvedManifest, fetch_blobs, resolve_manifest
from registry.remote_reference import RemoteReference
from registry.source import FileWindow, Image, Layer
from unionfs.aio import EventLoopThread
from unionfs.build import MountedImage, Settings, build, indexed_entries, layer_tars, log_resolved, merged_tree
from unionfs.bulk import collector_paused
from unionfs.chunk_table import ChunkTable
from unionfs.commands.progress import terminal_progress
from unionfs.content import ContentReader, LayerReader, TarReader
from unionfs.entry import Chunk, Entry
from unionfs.estargz import lazy as estargz
from unionfs.estargz.lazy import ChunkDecoder, LazyLayer, SmallFiles
from unionfs.estargz.toc import LayerToc, chunk_data
from unionfs.storage import resolutions
from unionfs.storage.cache_admin import image_keys, note_in_use
from unionfs.storage.chunk_cache import ChunkCache
from unionfs.storage.layer_store import LayerStore, RefetchNeeded
from unionfs.tree import MergedTree
from unionfs.zstdchunked import fetch as zstdchunked
from unionfs.zstdchunked.toc import POSITION, PREFIXES
from unionfs.zstdchunked.toc import chunk_data as zstd_chunk_data

if TYPE_CHECKING:  # aiohttp: imported where a client is made, after ready for a mount from the cache
    from registry.remote import RegistryClient

log = logging.getLogger("crfs-merge")
M_MMAP_THRESHOLD = -3  # mallopt parameter, malloc.h
MMAP_THRESHOLD = 1024 * 1024  # see _return_big_buffers_to_the_system
T = TypeVar("T")
# The layers that may be read lazily, and how a chunk of each is decompressed.
CHUNK_DECODERS: dict[Compression, ChunkDecoder] = {Compression.GZIP: chunk_data, Compression.ZSTD: zstd_chunk_data}


def open_remote(reference: RemoteReference, settings: Settings, store: LayerStore) -> MountedImage:
    """Mounts a registry image on an event loop thread of its own."""
    loop = EventLoopThread().__enter__()
    try:
        return _open_remote(reference, settings, store, loop)
    except BaseException:
        loop.__exit__(None, None, None)
        raise


def pull_whole(reference: RemoteReference, settings: Settings, store: LayerStore) -> tuple[Image, list[FileWindow]]:
    """Resolves a registry image (from its record, with --pull missing and every tar cached),
    fetches whatever of it the cache lacks, whole, and returns it with the uncompressed tar of
    each layer."""
    with EventLoopThread() as loop:
        client = DeferredClient(partial(_new_client, reference, settings))
        try:
            image = loop.run(_resolve_whole(client, reference, settings, store))
            return image, refetching(lambda: layer_tars(image, store), partial(_refetch, loop, client))
        finally:
            loop.run(client.close())


def refetching(attempt: Callable[[], T], refetch: Callable[[Layer], None]) -> T:
    """Returns attempt(), fetching again (once per layer) each registry blob that the cache
    found damaged (and removed) or missing: only fresh bytes that fail too are the image's
    error, and that error is raised as it was found."""
    refetched: set[str] = set()
    while True:
        try:
            return attempt()
        except RefetchNeeded as needed:
            if needed.layer.key in refetched:
                raise needed.cause or needed from None
            refetched.add(needed.layer.key)
            refetch(needed.layer)


def _new_client(reference: RemoteReference, settings: Settings) -> RegistryClient:
    from registry.remote import RegistryClient  # aiohttp's import: a tenth of a second

    return RegistryClient(reference, settings.remote, os.environ)


def _refetch(loop: EventLoopThread, client: BlobReader, layer: Layer) -> None:
    loop.run(fetch_blobs(client, [layer], terminal_progress(sys.stderr, "pulling layers")))


async def _resolve_whole(client: DeferredClient, asked: RemoteReference, settings: Settings,
                         store: LayerStore) -> Image:  # fmt: skip
    """The image, every layer fetched whole into the cache: the recorded one (--pull missing)
    if every layer's tar is cached, else resolved anew and recorded."""
    recorded = _recorded_and_cached(asked, settings, lambda image: not any(map(store.needs_blob, image.layers)) or None)
    if recorded is not None:
        return recorded[0]
    registry = await client.client()
    resolved = await resolve_manifest(registry, settings.platform, settings.cache_dir / "blobs")
    image = _recorded(asked, resolved, await registry.small_blob(resolved.config_digest), settings)
    await _fetch_whole(client, image, {}, store)
    return image


async def _fetch(
    client: BlobReader, image: Image, settings: Settings, store: LayerStore, lazy: bool
) -> dict[int, LayerToc]:
    """With `lazy`, learns which layers are eStargz (their TOCs); fetches every other layer
    that the cache lacks whole; returns the TOCs."""
    tocs = await _tocs(client, image, store, settings.cache_dir / "toc") if lazy else {}
    await _fetch_whole(client, image, tocs, store)
    return tocs


async def _resolve_for_mount(
    client: DeferredClient, asked: RemoteReference, settings: Settings, store: LayerStore
) -> tuple[Image, tuple[MergedTree, dict[int, FileWindow]] | None, dict[int, LayerToc]]:
    """_resolve_lazily's answer; with --pull missing, the image an earlier mount recorded, if
    the cache holds all the mount needs before it is ready (the merged tree, or each layer's
    tar or TOC): then the registry is asked nothing."""
    def cached(image: Image) -> tuple[tuple[MergedTree, dict[int, FileWindow]] | None] | None:
        saved = _saved_lazy_tree(image, store)
        return (saved,) if saved is not None or _all_cached(image, store, settings.cache_dir / "toc") else None

    recorded = _recorded_and_cached(asked, settings, cached)
    if recorded is None:
        return await _resolve_lazily(await client.client(), asked, settings, store)
    image, (saved,) = recorded
    return image, saved, {} if saved is not None else await _fetch(client, image, settings, store, lazy=True)


def _recorded_and_cached(asked: RemoteReference, settings: Settings,
                         cached: Callable[[Image], T | None]) -> tuple[Image, T] | None:  # fmt: skip
    """With --pull missing, the image an earlier mount recorded for `asked`, with what `cached`
    finds of it in the cache, if that is all the caller needs (not None); else None, to
    resolve `asked` anew, as podman's "missing" pulls an image that is not all there (its tag
    may have moved, and the old blobs be gone)."""
    recorded = resolutions.load(settings.cache_dir, asked, settings.platform) if settings.pull == "missing" else None
    if recorded is None:
        return None
    image, age = recorded
    note_in_use(settings.cache_dir, image_keys(image))  # before any cache file is looked for
    found = cached(image)
    if found is None:
        log.info("%s: recorded, but not all in the cache: asking the registry", asked)
        return None
    log.info("%s: taken from the cache, as resolved %s ago (--pull always asks the registry again)", asked, age)
    log_resolved(image)
    return image, found


def _all_cached(image: Image, store: LayerStore, toc_dir: Path) -> bool:
    """True if each layer's tar, or its TOC (a lazy layer), is in the cache."""
    return all(not store.needs_blob(layer) or _cached_toc(layer, toc_dir).exists() for layer in image.layers)


def _cached_toc(layer: Layer, toc_dir: Path) -> Path:
    if layer.compression is Compression.ZSTD:
        return zstdchunked.cached_toc_path(layer, toc_dir)
    return estargz.cached_toc_path(layer, toc_dir)


async def _resolve_lazily(
    client: RegistryClient, asked: RemoteReference, settings: Settings, store: LayerStore
) -> tuple[Image, tuple[MergedTree, dict[int, FileWindow]] | None, dict[int, LayerToc]]:
    """Resolves the image for a lazy mount, and returns it with the tree an earlier mount
    saved, or else the TOCs of its lazy layers (the others fetched whole). When every layer
    may be read lazily, neither the saved tree nor the TOCs need more than the manifest: they
    are loaded or fetched beside the config, one round trip less before the mount is ready."""
    resolved = await resolve_manifest(client, settings.platform, settings.cache_dir / "blobs")
    if not all(_may_be_lazy(layer, store) for layer in resolved.layers):  # tars to name: the config's diff_ids first
        image = _recorded(asked, resolved, await client.small_blob(resolved.config_digest), settings)
        saved = _saved_lazy_tree(image, store)
        return image, saved, {} if saved is not None else await _fetch(client, image, settings, store, lazy=True)
    early = Image(str(resolved.reference), resolved.layers, b"")  # the layers, all but their diff_ids
    note_in_use(settings.cache_dir, image_keys(early))  # before any cache file is looked for
    config = asyncio.ensure_future(client.small_blob(resolved.config_digest))
    found = asyncio.ensure_future(_saved_tree_or_tocs(client, early, store, settings.cache_dir / "toc"))
    try:
        await asyncio.gather(config, found)
    finally:  # one failed: the other stops
        for task in (config, found):
            task.cancel()
        await asyncio.gather(config, found, return_exceptions=True)
    image = _recorded(asked, resolved, config.result(), settings)
    saved, tocs = found.result()
    if saved is None:
        await _fetch_whole(client, image, tocs, store)  # gzip layers that are not eStargz after all
    return image, saved, tocs


async def _saved_tree_or_tocs(
    client: BlobReader, image: Image, store: LayerStore, toc_dir: Path
) -> tuple[tuple[MergedTree, dict[int, FileWindow]] | None, dict[int, LayerToc]]:
    """The tree saved for `image` (loaded on a worker thread: a big one takes a tenth of a
    second), or else its layers' TOCs; `image` may lack its config (every layer is lazy)."""
    # Where none is saved (a first mount), straight to the TOCs: a worker thread's start costs
    # about as much as the config's round trip, which the TOCs are to overlap.
    saved = None
    if store.has_tree(store.lazy_tree_name(image.layers, {})):  # every layer lazy: no tar to name
        saved = await asyncio.to_thread(_saved_lazy_tree, image, store)
    return (saved, {}) if saved is not None else (None, await _tocs(client, image, store, toc_dir))


def _recorded(asked: RemoteReference, resolved: ResolvedManifest, config: bytes, settings: Settings) -> Image:
    """The image `resolved` with its `config`, recorded as what `asked` resolves to."""
    image = _resolved(resolved.image(config), settings)
    resolutions.save(settings.cache_dir, asked, resolved, config)
    return image


def _resolved(image: Image, settings: Settings) -> Image:
    log_resolved(image)
    note_in_use(settings.cache_dir, image_keys(image))  # before any cache file is looked for
    return image


async def _fetch_whole(client: BlobReader, image: Image, tocs: dict[int, LayerToc], store: LayerStore) -> None:
    """Fetches whole each layer with no TOC that the cache lacks."""
    whole = [layer for n, layer in enumerate(image.layers) if n not in tocs and store.needs_blob(layer)]
    _log_layer_plan(image, tocs, whole)
    started = time.monotonic()
    await fetch_blobs(client, whole, terminal_progress(sys.stderr, "pulling layers"), store.needs_blob)
    if whole:
        size = sum(layer.window.size for layer in whole)
        log.info("fetched %d layers, %.1f MB, in %.2f s", len(whole), size / 1e6, time.monotonic() - started)


def _log_layer_plan(image: Image, tocs: dict[int, LayerToc], whole: list[Layer]) -> None:
    """Logs, per layer, whether it is read lazily, fetched whole now, or already cached."""
    for number, layer in enumerate(image.layers):
        if number in tocs:
            kind = "zstd:chunked" if layer.compression is Compression.ZSTD else "eStargz"
            how = f"{kind}, read lazily ({len(tocs[number].entries)} entries in its TOC)"
        elif layer in whole:
            how = "fetching whole"
        else:
            how = "in the cache"
        log.info("layer %d (%s, %.1f MB): %s", number, layer.key, layer.window.size / 1e6, how)


def _open_remote(
    reference: RemoteReference, settings: Settings, store: LayerStore, loop: EventLoopThread
) -> MountedImage:
    """Mounts a registry image: eStargz layers lazily (footer and TOC now, chunks on read),
    others fetched whole into the cache and read as local tars."""
    client = DeferredClient(partial(_new_client, reference, settings))
    also_on_close: list[Callable[[], None]] = []

    def close() -> None:
        loop.cancel_pending()  # the read-ahead of lazy layers, before the session it uses goes
        loop.run(client.close())
        loop.__exit__(None, None, None)
        for run in also_on_close:
            run()

    refetch = partial(_refetch, loop, client)
    try:
        with collector_paused():  # the TOCs are parsed within (a saved tree's load is not hurt by it)
            image, saved, tocs = loop.run(_resolve_for_mount(client, reference, settings, store))
        if saved is None and not tocs:  # every layer is now a local tar: the local path, with its saved trees
            whole = refetching(lambda: build(image, store), refetch)
            entries = partial(refetching, partial(indexed_entries, image, store), refetch)
            return MountedImage(whole.tree, whole.content, close=close, source=image, layer_entries=entries)
        factory = LazyLayerFactory(loop, client, settings)
        also_on_close.append(factory.close)
        if saved is not None:
            tree, readers, lazy = _lazy_readers(image, *saved, factory)
        else:
            with collector_paused():
                tree, readers, lazy = refetching(lambda: _remote_layers(image, tocs, store, factory), refetch)
    except BaseException:
        loop.run(client.close())
        raise
    prefetch = partial(_prefetch, lazy, settings.prefetch)
    entries = partial(_entries_again, loop, client, image, set(tree.lazy_layers), store, settings.cache_dir / "toc",
                      refetch)  # fmt: skip
    return MountedImage(tree, ContentReader(readers), prefetch, close, waits_on_network=bool(lazy),
                        source=image, layer_entries=entries)  # fmt: skip


class LazyLayerFactory:
    """Makes the lazy readers of one mount: they share its loop, client and chunk cache."""

    def __init__(self, loop: EventLoopThread, client: BlobReader, settings: Settings) -> None:
        self._loop, self._client = loop, client
        self.prefetch_mode = settings.prefetch
        _return_big_buffers_to_the_system()
        self._cache = ChunkCache(settings.cache_dir / "chunks")
        # A read gets its bytes within this, or EIO; its fetch stops trying there too.
        self._read_deadline = settings.remote.read_deadline

    def close(self) -> None:
        """Waits for the chunks read to be on disk (written behind the reads)."""
        self._cache.close()

    def __call__(self, blob: Digest, files: SmallFiles, compression: Compression) -> LazyLayer:
        decode = CHUNK_DECODERS[compression]
        return LazyLayer(self._loop, self._client, blob, self._cache, self._read_deadline, files, decode)


def _return_big_buffers_to_the_system() -> None:
    """Lazy reads come and go in buffers of up to 16 MiB (ranges, chunks). glibc raises its
    mmap threshold each time such a buffer is freed, after which they come from the heap and
    stay there: a lazy `tar` of the Debian image peaked at 190 MiB, 146 MiB with the threshold
    held at 128 KiB. Held that low, though, every 128 KiB FUSE reply and every piece of a range
    received was a fresh mapping whose pages all faulted in, and the kernel's time was half of
    a cold sequential read's CPU. At 1 MiB those come from the heap, while chunks and ranges
    still go back to the system when freed: the cold read of a 477 MiB file took 0.5-0.8 s less
    kernel time; the Debian image's lazy workload peaked at 179 MiB (158 at 128 KiB, 215 at 8 MiB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _saved_lazy_tree(image: Image, store: LayerStore) -> tuple[MergedTree, dict[int, FileWindow]] | None:
    """Returns the tree an earlier mount saved for this image with the same layers read
    lazily (gzip layers not in the cache whole), and the tars of the others; None if there is
    none (then the TOCs are fetched or loaded, and the tree made and saved)."""
    candidates = {n for n, layer in enumerate(image.layers) if _may_be_lazy(layer, store)}
    if not candidates:
        return None
    try:
        tars = {n: store.tar(layer) for n, layer in enumerate(image.layers) if n not in candidates}
    except ImageError:  # a layer to fetch again: the ordinary path does that
        return None
    tree = store.load_tree(store.lazy_tree_name(image.layers, tars))
    if tree is None or tree.lazy_layers != frozenset(candidates):
        return None
    log.info("merged tree loaded from the cache: %d inodes, %d chunks", tree.inode_count, len(tree.chunk_table))
    return tree, tars


def _may_be_lazy(layer: Layer, store: LayerStore) -> bool:
    return _lazy_format(layer) and layer.digest is not None and store.needs_blob(layer)


def _lazy_format(layer: Layer) -> bool:
    """True for gzip layers (eStargz if the blob ends in its footer) and for zstd layers with
    zstd:chunked's TOC annotation."""
    if layer.compression is Compression.ZSTD:
        return any(layer.annotation(prefix + POSITION) for prefix in PREFIXES)
    return layer.compression is Compression.GZIP


def _remote_layers(
    image: Image, tocs: dict[int, LayerToc], store: LayerStore, lazy_layer: LazyLayerFactory
) -> tuple[MergedTree, list[LayerReader], list[LazyWork]]:
    """Returns the tree (saved in `store`), a reader per layer (lazy where a TOC was found, a
    local tar else), and the lazy readers with the chunks their prefetch mode asks for. The
    TOCs' entries are let go as the freeze takes them (an Entry per file is most of a lazy
    mount's memory otherwise): `tocs` is emptied."""
    entries: list[list[Entry]] = []
    windows: dict[int, FileWindow] = {}
    for number, layer in enumerate(image.layers):
        if number in tocs and layer.digest is not None:
            entries.append(tocs[number].entries)
        else:
            indexed = store.open(layer, number)  # may ask for a blob again: open no file before
            windows[number] = indexed.tar
            entries.append(indexed.entries)
    landmarks = {n: toc.prefetch_end for n, toc in tocs.items() if toc.prefetch_end is not None}
    lazy_layers = frozenset(n for n in tocs if n not in windows)
    tocs.clear()  # nothing can ask for a blob again from here: the entries are the merge's alone
    tree = merged_tree(_handed_over(entries))
    tree.mark_lazy(lazy_layers, landmarks)
    store.save_tree(store.lazy_tree_name(image.layers, windows), tree)
    return _lazy_readers(image, tree, windows, lazy_layer)


def _handed_over(lists: list[list[Entry]]) -> Iterator[list[Entry]]:
    """Yields each of `lists`, leaving an empty list in its place."""
    for number, taken in enumerate(lists):
        lists[number] = []
        yield taken


def _lazy_readers(
    image: Image, tree: MergedTree, windows: dict[int, FileWindow], lazy_layer: LazyLayerFactory
) -> tuple[MergedTree, list[LayerReader], list[LazyWork]]:
    """A reader per layer of `tree`: a lazy one for its lazy layers, one of its tar else."""
    readers: list[LayerReader] = []
    lazy: list[LazyWork] = []
    table = tree.chunk_table
    for number, layer in enumerate(image.layers):
        if number in windows or layer.digest is None:
            readers.append(TarReader(windows[number]))
            continue
        # A layer's files are listed (a pass over every inode) once the mount is ready, by its
        # prefetch, and by the first read that wants its small files, each for itself (kept,
        # the list would cost 8 bytes a file): a second mount of a 200,000-file image is ready
        # in the time it takes to load its tree.
        files = partial(tree.chunk_files, number)
        reader = lazy_layer(layer.digest, SmallFiles.of(table, files), layer.compression)
        readers.append(reader)
        landmark = tree.prefetch_ends.get(number)
        prefetched = partial(_prefetched, table, files, landmark, lazy_layer.prefetch_mode)
        lazy.append(LazyWork(reader, prefetched))
    return tree, readers, lazy


def _entries_again(loop: EventLoopThread, client: BlobReader, image: Image, lazy: set[int], store: LayerStore,
                   toc_dir: Path, refetch: Callable[[Layer], None]) -> list[list[Entry]]:  # fmt: skip
    """Returns each layer's entries as _remote_layers had them (which let them go): a lazy
    layer's from its TOC (the copy the mount saved in `toc_dir`, else fetched again), the
    others' from the layer index cache."""

    def attempt() -> list[list[Entry]]:
        entries = []
        for number, layer in enumerate(image.layers):
            if number in lazy:
                toc = loop.run(fetch_toc(client, layer, number, toc_dir))
                if toc is None:
                    raise LayerFormatError(f"layer {layer.digest}: its TOC is gone from the registry")
                entries.append(toc.entries)
            else:
                entries.append(store.open(layer, number).entries)
        return entries

    return refetching(attempt, refetch)


def _prefetched(table: ChunkTable, files: Callable[[], Iterable[int]], landmark_end: int | None,
                mode: str) -> list[Chunk]:  # fmt: skip
    """The chunks a prefetch mode fetches in the background: all of them, those before the
    landmark (the image's prioritized files), or none."""
    if mode == "all":
        return [c for k in files() for c in table.file(k)]
    if mode == "landmark" and landmark_end is not None:
        first = table.file_first
        rows = (row for k in files() for row in range(first[k], first[k + 1]))
        return [table.chunk(row) for row in rows if table.blob_span(row)[0] < landmark_end]
    return []


async def _tocs(client: BlobReader, image: Image, store: LayerStore, toc_dir: Path) -> dict[int, LayerToc]:
    """Returns the TOCs of the layers to read lazily: eStargz and zstd:chunked layers not yet
    in the cache whole."""
    wanted = [(n, layer) for n, layer in enumerate(image.layers)
              if _lazy_format(layer) and store.needs_blob(layer)]  # fmt: skip
    found = await asyncio.gather(*(fetch_toc(client, layer, n, toc_dir) for n, layer in wanted))
    return {n: toc for (n, _), toc in zip(wanted, found, strict=True) if toc is not None}


async def fetch_toc(client: BlobReader, layer: Layer, number: int, toc_dir: Path) -> LayerToc | None:
    """Returns the TOC of a gzip layer that is eStargz, or of a zstd layer that is
    zstd:chunked; None for the others (read whole)."""
    if layer.compression is Compression.ZSTD:
        return await zstdchunked.fetch_toc(client, layer, number, toc_dir)
    return await estargz.fetch_toc(client, layer, number, toc_dir)


class LazyWork(NamedTuple):
    """A lazy layer's reader, and the chunks its prefetch mode asks for once the mount is ready."""

    reader: LazyLayer
    prefetched: Callable[[], list[Chunk]]


def _prefetch(lazy: list[LazyWork], mode: str) -> None:
    """Starts the prefetch of the lazy layers. Listing the chunks means a pass over the tree
    (a tenth of a second for 200,000 files), so it runs on a thread of its own: this is called
    while the kernel waits for the answer to INIT. (A layer's small files are listed by the
    first read that wants its neighbours, not here: every CPU-second spent right after ready
    holds back the first requests, and a mount that is stat'ed and unmounted at once found
    itself busy.)"""

    def work() -> None:
        for layer in lazy:
            if chunks := layer.prefetched():
                layer.reader.prefetch(chunks)

    if lazy and mode != "none":
        threading.Thread(target=work, name="crfs-merge-prefetch", daemon=True).start()
