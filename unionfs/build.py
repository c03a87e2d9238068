"""From a resolved image to a frozen merged tree and a reader for its bytes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from registry.source import Image
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


def build(image: Image, store: LayerStore) -> MountedImage:
    """Returns the merged view of `image`, indexing its layers through `store`."""
    indexed = [store.open(layer, number) for number, layer in enumerate(image.layers)]
    root = merge_layers((layer.entries for layer in indexed), warn=log.warning)
    return MountedImage(freeze(root), ContentReader([layer.tar for layer in indexed]))
