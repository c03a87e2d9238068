"""Registry images: resolve, learn which layers are eStargz (read lazily), fetch the others
whole, and build the merged view. Imported only for registry references, since aiohttp and
asyncio cost a local mount a tenth of a second."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from registry.digest import Digest
from registry.errors import LayerFormatError
from registry.media_types import Compression
from registry.pull import fetch_blobs, resolve_remote
from registry.remote import RegistryClient
from registry.remote_reference import RemoteReference
from registry.source import FileWindow, Image, Layer
from unionfs.aio import EventLoopThread
from unionfs.build import MountedImage, Settings, build, indexed_entries, layer_tars, log_resolved, merged_tree
from unionfs.commands.progress import terminal_progress
from unionfs.content import ContentReader, LayerReader, TarReader
from unionfs.entry import Chunk, Entry
from unionfs.estargz import lazy as estargz
from unionfs.estargz.lazy import ChunkDecoder, LazyLayer
from unionfs.estargz.toc import LayerToc, chunk_data
from unionfs.storage.cache_admin import image_keys, note_in_use
from unionfs.storage.chunk_cache import ChunkCache
from unionfs.storage.layer_store import LayerStore, RefetchNeeded
from unionfs.tree import MergedTree
from unionfs.zstdchunked import fetch as zstdchunked
from unionfs.zstdchunked.toc import chunk_data as zstd_chunk_data

log = logging.getLogger("crfs-merge")
M_MMAP_THRESHOLD = -3  # mallopt parameter, malloc.h
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
    """Resolves a registry image, fetches whatever of it the cache lacks, whole, and returns
    it with the uncompressed tar of each layer."""
    with EventLoopThread() as loop:
        client = RegistryClient(reference, settings.remote, os.environ)
        loop.run(client.__aenter__())
        try:
            image, _ = loop.run(_resolve_and_fetch(client, settings, store, lazy=False))
            return image, refetching(lambda: layer_tars(image, store), partial(_refetch, loop, client))
        finally:
            loop.run(client.__aexit__(None, None, None))


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


def _refetch(loop: EventLoopThread, client: RegistryClient, layer: Layer) -> None:
    loop.run(fetch_blobs(client, [layer], terminal_progress(sys.stderr, "pulling layers")))


async def _resolve_and_fetch(
    client: RegistryClient, settings: Settings, store: LayerStore, lazy: bool
) -> tuple[Image, dict[int, LayerToc]]:
    """Resolves the client's image; with `lazy`, learns which layers are eStargz (their TOCs);
    fetches every other layer that the cache lacks whole."""
    image = await resolve_remote(client, settings.platform, settings.cache_dir / "blobs")
    log_resolved(image)
    note_in_use(settings.cache_dir, image_keys(image))  # before any cache file is looked for
    tocs = await _tocs(client, image, store, settings.cache_dir / "toc") if lazy else {}
    whole = [layer for n, layer in enumerate(image.layers) if n not in tocs and store.needs_blob(layer)]
    _log_layer_plan(image, tocs, whole)
    started = time.monotonic()
    await fetch_blobs(client, whole, terminal_progress(sys.stderr, "pulling layers"), store.needs_blob)
    if whole:
        size = sum(layer.window.size for layer in whole)
        log.info("fetched %d layers, %.1f MB, in %.2f s", len(whole), size / 1e6, time.monotonic() - started)
    return image, tocs


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
    client = RegistryClient(reference, settings.remote, os.environ)
    loop.run(client.__aenter__())

    def close() -> None:
        loop.cancel_pending()  # the read-ahead of lazy layers, before the session it uses goes
        loop.run(client.__aexit__(None, None, None))
        loop.__exit__(None, None, None)

    refetch = partial(_refetch, loop, client)
    try:
        image, tocs = loop.run(_resolve_and_fetch(client, settings, store, lazy=True))
        if not tocs:  # every layer is now a local tar: the local path, with its saved trees
            whole = refetching(lambda: build(image, store), refetch)
            entries = partial(refetching, partial(indexed_entries, image, store), refetch)
            return MountedImage(whole.tree, whole.content, close=close, source=image, layer_entries=entries)
        factory = LazyLayerFactory(loop, client, settings)
        tree, readers, lazy = refetching(lambda: _remote_layers(image, tocs, store, factory), refetch)
    except BaseException:
        loop.run(client.__aexit__(None, None, None))
        raise
    prefetch = partial(_prefetch, lazy)
    entries = partial(_entries_again, loop, client, image, set(tocs), store, settings.cache_dir / "toc", refetch)
    return MountedImage(tree, ContentReader(readers), prefetch, close, waits_on_network=bool(lazy),
                        source=image, layer_entries=entries)  # fmt: skip


class LazyLayerFactory:
    """Makes the lazy readers of one mount: they share its loop, client and chunk cache."""

    def __init__(self, loop: EventLoopThread, client: RegistryClient, settings: Settings) -> None:
        self._loop, self._client = loop, client
        self.prefetch_mode = settings.prefetch
        _return_big_buffers_to_the_system()
        self._cache = ChunkCache(settings.cache_dir / "chunks")
        # A read gets its bytes within this, or EIO; its fetch stops trying there too.
        self._read_deadline = settings.remote.read_deadline

    def __call__(self, blob: Digest, files: list[tuple[Chunk, ...]], compression: Compression) -> LazyLayer:
        decode = CHUNK_DECODERS[compression]
        return LazyLayer(self._loop, self._client, blob, self._cache, self._read_deadline, files, decode)


def _return_big_buffers_to_the_system() -> None:
    """Lazy reads come and go in buffers of up to 16 MiB (ranges, chunks). glibc raises its
    mmap threshold each time such a buffer is freed, after which they come from the heap and
    stay there: a lazy `tar` of the Debian image peaked at 190 MiB, 146 MiB with the threshold
    held at 128 KiB."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _remote_layers(
    image: Image, tocs: dict[int, LayerToc], store: LayerStore, lazy_layer: LazyLayerFactory
) -> tuple[MergedTree, list[LayerReader], list[tuple[LazyLayer, list[Chunk]]]]:
    """Returns the tree, a reader per layer (lazy where a TOC was found, a local tar else), and
    the lazy readers with the chunks their prefetch mode asks for. The TOCs' entries are let
    go once the tree holds what it needs of them (an Entry per file is most of a lazy
    mount's memory otherwise)."""
    entries: list[list[Entry]] = []
    windows: dict[int, FileWindow] = {}
    for number, layer in enumerate(image.layers):
        if number in tocs and layer.digest is not None:
            entries.append(tocs[number].entries)
        else:
            indexed = store.open(layer, number)  # may ask for a blob again: open no file before
            windows[number] = indexed.tar
            entries.append(indexed.entries)
    tree = merged_tree(entries)
    del entries
    tars = {number: TarReader(window) for number, window in windows.items()}
    readers: list[LayerReader] = []
    lazy: list[tuple[LazyLayer, list[Chunk]]] = []
    for number, layer in enumerate(image.layers):
        if number in tars or layer.digest is None:
            readers.append(tars[number])
            continue
        files = tree.file_chunks(number)
        reader = lazy_layer(layer.digest, files, layer.compression)
        readers.append(reader)
        lazy.append((reader, _prefetched(files, tocs[number].prefetch_end, lazy_layer.prefetch_mode)))
    return tree, readers, lazy


def _entries_again(loop: EventLoopThread, client: RegistryClient, image: Image, lazy: set[int], store: LayerStore,
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


def _prefetched(files: list[tuple[Chunk, ...]], landmark_end: int | None, mode: str) -> list[Chunk]:
    """The chunks a prefetch mode fetches in the background: all of them, those before the
    landmark (the image's prioritized files), or none."""
    chunks = [c for chunks in files for c in chunks]
    if mode == "all":
        return chunks
    if mode == "landmark" and landmark_end is not None:
        return [c for c in chunks if c.blob_offset < landmark_end]
    return []


async def _tocs(client: RegistryClient, image: Image, store: LayerStore, toc_dir: Path) -> dict[int, LayerToc]:
    """Returns the TOCs of the layers to read lazily: eStargz and zstd:chunked layers not yet
    in the cache whole."""
    wanted = [(n, layer) for n, layer in enumerate(image.layers)
              if layer.compression in CHUNK_DECODERS and store.needs_blob(layer)]  # fmt: skip
    found = await asyncio.gather(*(fetch_toc(client, layer, n, toc_dir) for n, layer in wanted))
    return {n: toc for (n, _), toc in zip(wanted, found, strict=True) if toc is not None}


async def fetch_toc(client: RegistryClient, layer: Layer, number: int, toc_dir: Path) -> LayerToc | None:
    """Returns the TOC of a gzip layer that is eStargz, or of a zstd layer that is
    zstd:chunked; None for the others (read whole)."""
    if layer.compression is Compression.ZSTD:
        return await zstdchunked.fetch_toc(client, layer, number, toc_dir)
    return await estargz.fetch_toc(client, layer, number, toc_dir)


def _prefetch(lazy: list[tuple[LazyLayer, list[Chunk]]]) -> None:
    for reader, chunks in lazy:
        if chunks:
            reader.prefetch(chunks)
