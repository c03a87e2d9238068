"""Write OCI image layouts: the example image, test images, and (later) converted ones."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zstandard

from registry.manifest import Platform
from registry.media_types import OCI_INDEX, OCI_MANIFEST, Compression

LAYER_MEDIA_TYPES = {
    Compression.NONE: "application/vnd.oci.image.layer.v1.tar",
    Compression.GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    Compression.ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"


def compress(tar: bytes, compression: Compression) -> bytes:
    """Returns `tar` compressed reproducibly (gzip with mtime 0)."""
    if compression is Compression.GZIP:
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if compression is Compression.ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


def write_layout(
    root: Path,
    layer_tars: Sequence[bytes],
    compression: Compression = Compression.GZIP,
    tag: str = "latest",
    platform: Platform | None = None,
    history: Sequence[dict[str, object]] | None = None,
) -> str:
    """Writes an image of `layer_tars` (bottom first) as an OCI layout at `root`, for
    `platform` (default: this machine's); returns the manifest digest. An existing layout
    gains the tag beside its others. `history` is the config's history (one entry per
    layer, plus any marked empty_layer), as a Dockerfile build writes it."""
    platform = platform or Platform.host()
    blobs = blob_dir(root)
    layers = [_put(blobs, compress(t, compression), LAYER_MEDIA_TYPES[compression]) for t in layer_tars]
    config = {
        "architecture": platform.architecture,
        "os": platform.os,
        **({"variant": platform.variant} if platform.variant else {}),
        "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in layer_tars]},
        "config": {},
        **({"history": list(history)} if history is not None else {}),
    }
    return write_manifest(root, layers, _json(config), tag, platform)


def blob_dir(root: Path) -> Path:
    """Returns (creating it) the directory of a layout's sha256 blobs."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    return blobs


def write_manifest(root: Path, layers: Sequence[dict[str, object]], config: bytes, tag: str, platform: Platform) -> str:
    """Writes the config and a manifest of `layers` (descriptors of blobs already in the
    layout), tags it, and returns its digest."""
    blobs = blob_dir(root)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _put(blobs, config, CONFIG_MEDIA_TYPE),
        "layers": list(layers),
    }
    descriptor = _put(blobs, _json(manifest), OCI_MANIFEST)
    descriptor["platform"] = {"os": platform.os, "architecture": platform.architecture,
                              **({"variant": platform.variant} if platform.variant else {})}  # fmt: skip
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    _add_to_index(root, descriptor)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return str(descriptor["digest"])


def write_index(root: Path, member_tags: Sequence[str], tag: str) -> str:
    """Adds to the layout at `root` an image index of the images tagged `member_tags`
    (a multi-platform image), tagged `tag`; returns the index digest."""
    blobs = blob_dir(root)
    members = [m for m in json.loads((root / "index.json").read_text())["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") in member_tags]  # fmt: skip
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{k: v for k, v in m.items() if k != "annotations"} for m in members]}  # fmt: skip
    descriptor = _put(blobs, _json(index), OCI_INDEX)
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    _add_to_index(root, descriptor)
    return str(descriptor["digest"])


def _add_to_index(root: Path, descriptor: dict[str, object]) -> None:
    path = root / "index.json"
    index: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"schemaVersion": 2, "mediaType": OCI_INDEX}
    )
    index["manifests"] = [m for m in index.get("manifests", []) if m.get("annotations") != descriptor["annotations"]]
    index["manifests"].append(descriptor)
    path.write_bytes(_json(index))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _put(blobs: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = _digest(data)
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}
