"""skopeo's `dir:` transport (containers/image directory/): an image as plain files.

`skopeo copy ... dir:PATH` and `podman save --format docker-dir` write a directory holding
`manifest.json` (the image manifest as the source served it: OCI or docker schema 2, or,
with `--all`, an index whose instances sit beside it as `HEX.manifest.json`), a `version`
file ("Directory Transport Version: 1.1"), and every blob, config and layers alike, named
by the hex of its sha256 digest with no prefix and no extension.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from registry.errors import BlobNotFoundError, ImageError
from registry.layout import image_from, manifest_for
from registry.manifest import Manifest, Platform, decode, select_platform
from registry.source import DirectoryFiles, FileWindow, Image

MANIFEST = "manifest.json"
VERSION = "version"
VERSION_PREFIX = b"Directory Transport Version: "


def is_dir_transport(path: str) -> bool:
    """Returns whether `path` is a directory that skopeo's dir: transport wrote: its
    version file and manifest.json, and no index.json (which makes it an OCI layout)."""
    try:
        with open(os.path.join(path, VERSION), "rb") as version:
            stamped = version.read(len(VERSION_PREFIX)) == VERSION_PREFIX
    except OSError:
        return False
    return stamped and os.path.isfile(os.path.join(path, MANIFEST)) and not os.path.exists(
        os.path.join(path, "index.json")
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DirTransportFiles:
    """The files of a dir: image, under the names an OCI layout gives them
    (`blobs/ALG/HEX`), so the layout's manifest and layer code reads them unchanged."""

    root: str

    def window(self, name: str) -> FileWindow:
        """Returns the window of `name`: a blob `blobs/sha256/HEX` is the file HEX, or,
        for an instance manifest of an index, HEX.manifest.json."""
        files = DirectoryFiles(self.root)
        _, algorithm, hex_digest = name.split("/", 2) if name.startswith("blobs/") else ("", "", "")
        if not hex_digest:
            return files.window(name)
        if algorithm != "sha256":
            raise BlobNotFoundError(f"{self.root}: the dir: transport stores sha256 blobs only, not {name}")
        try:
            return files.window(hex_digest)
        except BlobNotFoundError:
            return files.window(f"{hex_digest}.manifest.json")


def resolve_dir(path: str, platform: Platform) -> Image:
    """Returns the image in a dir: transport directory (for `platform`, if it holds an index)."""
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise ImageError(f"{path}: not a dir: transport image (no {MANIFEST})")
    files = DirTransportFiles(path)
    document = decode(files.window(MANIFEST).read_all(), None, os.path.join(path, MANIFEST))
    if isinstance(document, Manifest):
        return image_from(files, path, document, platform, by_platform=False)
    manifest, _ = manifest_for(files, select_platform(document, platform, path), platform, path)
    return image_from(files, path, manifest, platform, by_platform=True)
