"""Resolve a parsed reference to an Image held on local disk."""

from __future__ import annotations

import os

from registry.archive import resolve_archive
from registry.dir_transport import resolve_dir
from registry.errors import ImageError, InvalidReferenceError
from registry.layout import resolve_layout
from registry.manifest import Platform
from registry.reference import DIR, DOCKER_ARCHIVE, OCI, ImageReference
from registry.source import DirectoryFiles, Image


def resolve_image(reference: ImageReference, platform: Platform) -> Image:
    """Returns the image that `reference` names; raises an ImageError saying why not."""
    if reference.transport == OCI:
        if not os.path.isfile(os.path.join(reference.path, "index.json")):
            raise ImageError(f"{reference.path}: not an OCI image layout (no index.json)")
        return resolve_layout(DirectoryFiles(reference.path), reference.path, reference.tag, platform)
    if reference.transport == DOCKER_ARCHIVE:
        if not os.path.isfile(reference.path):
            raise ImageError(f"{reference.path}: no such file")
        return resolve_archive(reference.path, reference.tag, platform)
    if reference.transport == DIR:
        return resolve_dir(reference.path, platform)
    raise InvalidReferenceError(f"{reference}: not a local image (registry images go through registry.pull)")
