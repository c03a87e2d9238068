"""From an IMAGE argument to a frozen merged tree and a reader for its bytes."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from registry.local import resolve_image
from registry.manifest import Platform
from registry.options import RemoteOptions
from registry.reference import REGISTRY, ImageReference
from registry.source import FileWindow, Image
from unionfs.content import ContentReader, TarReader
from unionfs.entry import Entry
from unionfs.storage.cache_admin import DEFAULT_MAX_BYTES, image_keys, note_also_in_use, note_in_use, tidy_in_background
from unionfs.storage.layer_store import LayerStore
from unionfs.tree import MergedTree, freeze
from whiteout.apply import merge_layers

log = logging.getLogger("crfs-merge")


class MountedImage:
    """What the FUSE operations and the exporter serve: the tree and its bytes, plus what
    must run once the mount is ready (prefetch) and when it ends (closing the registry)."""

    def __init__(self, tree: MergedTree, content: ContentReader, prefetch: Callable[[], None] = lambda: None,
                 close: Callable[[], None] = lambda: None, waits_on_network: bool = False,
                 source: Image | None = None, layer_entries: Callable[[], list[list[Entry]]] | None = None,
                 ) -> None:  # fmt: skip
        self.tree, self.content = tree, content
        self.source = source  # the resolved image: its config (history) and layers
        # Each layer's entries again (the tree keeps only what it shows), read from where the
        # tree's were: the layer index cache, or a lazy layer's cached (else fetched) TOC.
        self.layer_entries = layer_entries
        self.image_id = image_id(source) if source is not None else ""  # what an upper directory is bound to
        self._prefetch, self._close = prefetch, close
        self._when_ready: list[Callable[[], None]] = []
        self.waits_on_network = waits_on_network  # some reads block on a registry (lazy layers)

    def start_prefetch(self) -> None:
        self._prefetch()
        for run in self._when_ready:
            run()

    def also_when_ready(self, run: Callable[[], None]) -> None:
        """Adds work to start once the mount is ready (with the prefetch)."""
        self._when_ready.append(run)

    def close(self) -> None:
        self.content.close()
        self._close()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything besides the image name that decides what is mounted and how it is fetched."""

    cache_dir: Path
    platform: Platform
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    prefetch: str = "landmark"  # eStargz: none | landmark (prioritized files) | all (whole layers)
    cache_max_bytes: int = DEFAULT_MAX_BYTES  # pruned to this once a mount is ready (unused files only)
    # Registry images: "missing" mounts what an earlier mount resolved the reference to, if
    # recorded (as docker run and podman run's default); "always" asks the registry each time.
    pull: str = "missing"


def open_image(text: str, settings: Settings) -> MountedImage:
    """Returns the merged view of the image that `text` names, local or in a registry."""
    store = LayerStore(settings.cache_dir, log.warning)
    reference = ImageReference.parse(text)
    if reference.transport != REGISTRY:
        image = resolve_image(reference, settings.platform)
        log_resolved(image)
        note_in_use(settings.cache_dir, image_keys(image))
        mounted = build(image, store)
    else:
        from unionfs.remote_image import open_remote  # aiohttp and asyncio only for registry images

        mounted = open_remote(reference.remote(), settings, store)
    mounted.also_when_ready(lambda: tidy_in_background(settings.cache_dir, settings.cache_max_bytes))
    return mounted


def local_layers(text: str, settings: Settings) -> tuple[Image, list[FileWindow]]:
    """Returns the image that `text` names and the uncompressed tar of each of its layers,
    fetching whole whatever is in a registry and not yet in the cache (for convert)."""
    store = LayerStore(settings.cache_dir, log.warning)
    reference = ImageReference.parse(text)
    if reference.transport == REGISTRY:
        from unionfs.remote_image import pull_whole

        return pull_whole(reference.remote(), settings, store)
    image = resolve_image(reference, settings.platform)
    note_in_use(settings.cache_dir, image_keys(image))
    return image, layer_tars(image, store)


def layer_tars(image: Image, store: LayerStore) -> list[FileWindow]:
    """Returns the uncompressed tar of each layer of `image`, indexed (and so verified)."""
    return [store.open(layer, number).tar for number, layer in enumerate(image.layers)]


def build(image: Image, store: LayerStore) -> MountedImage:
    """Returns the merged view of a local `image`, indexing its layers through `store`; the
    merged tree itself is saved there too, and loaded instead of merged next time.

    A saved tree is named by its tars' stamps, so it is loaded only while every tar is the
    file it was merged from; otherwise each layer is opened, which verifies a changed tar
    again (and makes it anew if it is damaged), and the tree is named by the tars as they
    are then."""
    tars = [store.tar(layer) for layer in image.layers]
    name = store.tree_name(image.layers, tars)
    note_also_in_use([name])
    tree = store.load_tree(name)
    if tree is None:
        indexed = [store.open(layer, number) for number, layer in enumerate(image.layers)]
        tars = [layer.tar for layer in indexed]
        tree = merged_tree([layer.entries for layer in indexed])
        del indexed
        name = store.tree_name(image.layers, tars)  # a tar made anew has a new stamp
        note_also_in_use([name])
        store.save_tree(name, tree)
    else:
        log.info("merged tree loaded from the cache: %d inodes", tree.inode_count)
    return MountedImage(tree, ContentReader([TarReader(tar) for tar in tars]), source=image,
                        layer_entries=lambda: indexed_entries(image, store))  # fmt: skip


def indexed_entries(image: Image, store: LayerStore) -> list[list[Entry]]:
    """Returns the entries of each layer of a local `image`, from the cache's indexes."""
    return [store.open(layer, number).entries for number, layer in enumerate(image.layers)]


def merged_tree(layers: Iterable[list[Entry]]) -> MergedTree:
    """Returns the layers' entries (bottom first) merged, whiteouts applied, and frozen. Given
    an iterator that lets go of each list it yields, only the tree holds the entries, and the
    freeze frees them as it goes."""
    started = time.monotonic()
    count = 0

    def counted() -> Iterator[list[Entry]]:
        nonlocal count
        for layer in layers:
            count += 1
            yield layer

    tree = freeze(merge_layers(counted(), warn=log.warning))
    log.info("merged %d layers: %d inodes in %.2f s", count, tree.inode_count, time.monotonic() - started)
    return tree


def image_id(image: Image) -> str:
    """The image's id: the digest of its config, as `docker images --digests` calls it."""
    return "sha256:" + hashlib.sha256(image.config).hexdigest()


def log_resolved(image: Image) -> None:
    """Logs which image a name resolved to: its id (the config's digest) and its layers."""
    image_id = hashlib.sha256(image.config).hexdigest()
    size = sum(layer.window.size for layer in image.layers)
    log.info("%s: image sha256:%s, %d layers, %.1f MB", image.name, image_id, len(image.layers), size / 1e6)
