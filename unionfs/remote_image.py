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
from functools import partial
from pathlib import Path

from registry.digest import Digest
from registry.media_types import Compression
from registry.pull import fetch_blobs, resolve_remote
from registry.remote import RegistryClient
from registry.remote_reference import RemoteReference
from registry.source import Image
from unionfs.aio import EventLoopThread
from unionfs.build import MountedImage, Settings, build, merged_tree
from unionfs.chunk_cache import ChunkCache
from unionfs.content import ContentReader, LayerReader, TarReader
from unionfs.entry import Chunk, Entry
from unionfs.estargz import LayerToc
from unionfs.layer_store import LayerStore
from unionfs.lazy import LazyLayer, fetch_toc
from unionfs.progress import terminal_progress
from unionfs.tree import MergedTree

log = logging.getLogger("crfs-merge")
M_MMAP_THRESHOLD = -3  # mallopt parameter, malloc.h


def open_remote(reference: RemoteReference, settings: Settings, store: LayerStore) -> MountedImage:
    """Mounts a registry image on an event loop thread of its own."""
    loop = EventLoopThread().__enter__()
    try:
        return _open_remote(reference, settings, store, loop)
    except BaseException:
        loop.__exit__(None, None, None)
        raise


def pull_whole(reference: RemoteReference, settings: Settings, store: LayerStore) -> Image:
    """Resolves a registry image and fetches whatever of it the cache lacks, whole."""
    with EventLoopThread() as loop:
        return loop.run(_pull_whole(reference, settings, store))


async def _pull_whole(reference: RemoteReference, settings: Settings, store: LayerStore) -> Image:
    async with RegistryClient(reference, settings.remote, os.environ) as client:
        image, _ = await _resolve_and_fetch(client, settings, store, lazy=False)
    return image


async def _resolve_and_fetch(
    client: RegistryClient, settings: Settings, store: LayerStore, lazy: bool
) -> tuple[Image, dict[int, LayerToc]]:
    """Resolves the client's image; with `lazy`, learns which layers are eStargz (their TOCs);
    fetches every other layer that the cache lacks whole."""
    image = await resolve_remote(client, settings.platform, settings.cache_dir / "blobs")
    tocs = await _tocs(client, image, store, settings.cache_dir / "toc") if lazy else {}
    whole = [layer for n, layer in enumerate(image.layers) if n not in tocs and store.needs_blob(layer)]
    await fetch_blobs(client, whole, terminal_progress(sys.stderr, "pulling layers"))
    return image, tocs


def _open_remote(
    reference: RemoteReference, settings: Settings, store: LayerStore, loop: EventLoopThread
) -> MountedImage:
    """Mounts a registry image: eStargz layers lazily (footer and TOC now, chunks on read),
    others fetched whole into the cache and read as local tars."""
    client = RegistryClient(reference, settings.remote, os.environ)
    loop.run(client.__aenter__())

    def close() -> None:
        loop.run(client.__aexit__(None, None, None))
        loop.__exit__(None, None, None)

    try:
        image, tocs = loop.run(_resolve_and_fetch(client, settings, store, lazy=True))
        if not tocs:  # every layer is now a local tar: the local path, with its saved trees
            whole = build(image, store)
            return MountedImage(whole.tree, whole.content, close=close)
        tree, readers, lazy = _remote_layers(image, tocs, store, LazyLayerFactory(loop, client, settings))
    except BaseException:
        loop.run(client.__aexit__(None, None, None))
        raise
    prefetch = partial(_prefetch, lazy)
    return MountedImage(tree, ContentReader(readers), prefetch, close, waits_on_network=bool(lazy))


class LazyLayerFactory:
    """Makes the lazy readers of one mount: they share its loop, client and chunk cache."""

    def __init__(self, loop: EventLoopThread, client: RegistryClient, settings: Settings) -> None:
        self._loop, self._client = loop, client
        self.prefetch_mode = settings.prefetch
        _return_big_buffers_to_the_system()
        self._cache = ChunkCache(settings.cache_dir / "chunks")
        # A read waits for every try of its fetch, and a little more, before it reports EIO.
        self._timeout = settings.remote.timeout * (settings.remote.retries + 1) * 2

    def __call__(self, blob: Digest, files: list[tuple[Chunk, ...]]) -> LazyLayer:
        return LazyLayer(self._loop, self._client, blob, self._cache, self._timeout, files)


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
    tars: dict[int, TarReader] = {}
    for number, layer in enumerate(image.layers):
        if number in tocs and layer.digest is not None:
            entries.append(tocs[number].entries)
        else:
            indexed = store.open(layer, number)
            tars[number] = TarReader(indexed.tar)
            entries.append(indexed.entries)
    tree = merged_tree(entries)
    del entries
    readers: list[LayerReader] = []
    lazy: list[tuple[LazyLayer, list[Chunk]]] = []
    for number, layer in enumerate(image.layers):
        if number in tars or layer.digest is None:
            readers.append(tars[number])
            continue
        files = tree.file_chunks(number)
        reader = lazy_layer(layer.digest, files)
        readers.append(reader)
        lazy.append((reader, _prefetched(files, tocs[number].prefetch_end, lazy_layer.prefetch_mode)))
    return tree, readers, lazy


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
    """Returns the TOCs of the layers to read lazily: gzip layers not yet in the cache whole."""
    wanted = [(n, layer) for n, layer in enumerate(image.layers)
              if layer.compression is Compression.GZIP and store.needs_blob(layer)]  # fmt: skip
    found = await asyncio.gather(*(fetch_toc(client, layer, n, toc_dir) for n, layer in wanted))
    return {n: toc for (n, _), toc in zip(wanted, found, strict=True) if toc is not None}


def _prefetch(lazy: list[tuple[LazyLayer, list[Chunk]]]) -> None:
    for reader, chunks in lazy:
        if chunks:
            reader.prefetch(chunks)
