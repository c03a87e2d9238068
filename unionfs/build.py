"""From an IMAGE argument to a frozen merged tree and a reader for its bytes."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from registry.local import resolve_image
from registry.manifest import Platform
from registry.pull import pull_image
from registry.reference import REGISTRY, ImageReference
from registry.remote import Progress, RemoteOptions
from registry.remote_reference import RemoteReference
from registry.source import Image
from unionfs.aio import EventLoopThread
from unionfs.content import ContentReader
from unionfs.layer_store import LayerStore
from unionfs.tree import MergedTree, freeze
from whiteout.apply import merge_layers

log = logging.getLogger("crfs-merge")


@dataclass(frozen=True, slots=True)
class MountedImage:
    """What the FUSE operations and the exporter serve: the tree and its bytes."""

    tree: MergedTree
    content: ContentReader


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything besides the image name that decides what is mounted and how it is fetched."""

    cache_dir: Path
    platform: Platform
    remote: RemoteOptions = field(default_factory=RemoteOptions)


def open_image(text: str, settings: Settings) -> MountedImage:
    """Returns the merged view of the image that `text` names, local or in a registry."""
    store = LayerStore(settings.cache_dir, log.warning)
    reference = ImageReference.parse(text)
    if reference.transport != REGISTRY:
        return build(resolve_image(reference, settings.platform), store)
    remote = RemoteReference.parse(reference.path)
    pull = pull_image(remote, settings.platform, settings.remote, os.environ, settings.cache_dir / "blobs",
                      store.needs_blob, _terminal_progress(sys.stderr))  # fmt: skip
    with EventLoopThread() as loop:
        return build(loop.run(pull), store)


def build(image: Image, store: LayerStore) -> MountedImage:
    """Returns the merged view of `image`, indexing its layers through `store`."""
    indexed = [store.open(layer, number) for number, layer in enumerate(image.layers)]
    root = merge_layers((layer.entries for layer in indexed), warn=log.warning)
    return MountedImage(freeze(root), ContentReader([layer.tar for layer in indexed]))


def _terminal_progress(stream: TextIO) -> Callable[[int], Progress] | None:
    """Returns a progress-line factory for a terminal, or None when nobody is watching."""
    if not stream.isatty():
        return None

    def start(total: int) -> Progress:
        done, shown = 0, 0.0

        def advance(count: int) -> None:
            nonlocal done, shown
            done += count
            if time.monotonic() - shown > 0.2 or done >= total:
                shown = time.monotonic()
                end = "\n" if done >= total else ""
                stream.write(f"\rcrfs-merge: pulling layers {done / 1e6:8.1f} / {total / 1e6:.1f} MB{end}")
                stream.flush()

        return advance

    return start
