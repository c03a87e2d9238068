"""OCI image layouts (image-spec image-layout.md): a directory, or the same inside a tar."""

from __future__ import annotations

from registry.errors import BlobNotFoundError, ManifestError
from registry.manifest import Descriptor, Index, Manifest, Platform, decode, diff_ids, select_platform
from registry.media_types import OCI_INDEX, layer_compression
from registry.source import Files, FileWindow, Image, Layer

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # what `docker save` adds beside REF_NAME


def resolve_layout(files: Files, name: str, tag: str | None, platform: Platform) -> Image:
    """Returns the image tagged `tag` (or the only one) in the layout that `files` holds."""
    index = decode(files.window("index.json").read_all(), OCI_INDEX)
    if not isinstance(index, Index):
        raise ManifestError(f"{name}: index.json is not an image index")
    descriptor = _pick_tag(index, tag, name)
    manifest = manifest_for(files, descriptor, platform)
    config = read_blob(files, manifest.config)
    return Image(name, tuple(layers_of(files, manifest, config)), config)


def blob_window(files: Files, descriptor: Descriptor) -> FileWindow:
    """Returns the window of a blob, checked against the size that its descriptor gives."""
    digest = descriptor.digest
    try:
        window = files.window(f"blobs/{digest.algorithm}/{digest.hex}")
    except BlobNotFoundError:
        raise BlobNotFoundError(f"blob {digest} ({descriptor.media_type}) is missing from the image") from None
    if window.size != descriptor.size:
        raise ManifestError(f"blob {digest} has {window.size} bytes, its descriptor says {descriptor.size}")
    return window


def read_blob(files: Files, descriptor: Descriptor) -> bytes:
    """Returns a small blob (manifest, config) after verifying its digest."""
    return descriptor.digest.check_bytes(blob_window(files, descriptor).read_all(), f"blob {descriptor.digest}")


def _pick_tag(index: Index, tag: str | None, name: str) -> Descriptor:
    if tag is not None:
        found = [d for d in index.manifests if tag in _names(d)]
        if found:
            return found[0]
        raise ManifestError(f"{name}: no image tagged {tag!r} (tags: {_tag_list(index)})")
    if len(index.manifests) == 1:
        return index.manifests[0]
    latest = [d for d in index.manifests if "latest" in _names(d)]
    if latest:
        return latest[0]
    raise ManifestError(f"{name}: {len(index.manifests)} images and no tag given (tags: {_tag_list(index)})")


def _names(descriptor: Descriptor) -> set[str]:
    names = {descriptor.annotation(REF_NAME) or ""}
    full = descriptor.annotation(CONTAINERD_NAME) or ""
    names |= {full, full.rpartition(":")[2]} if full else set()
    return names - {""}


def _tag_list(index: Index) -> str:
    return ", ".join(sorted({n for d in index.manifests for n in _names(d)})) or "none"


def manifest_for(files: Files, descriptor: Descriptor, platform: Platform) -> Manifest:
    """Returns the image manifest that `descriptor` leads to, through indexes, for `platform`."""
    for _ in range(4):  # an index may point at an index; more nesting than this is a loop
        document = decode(read_blob(files, descriptor), descriptor.media_type)
        if isinstance(document, Manifest):
            return document
        descriptor = select_platform(document, platform)
    raise ManifestError(f"image index nesting too deep at {descriptor.digest}")


def layers_of(files: Files, manifest: Manifest, config: bytes) -> list[Layer]:
    """Returns the layers of `manifest`, bottom first, each with its diff_id from `config`."""
    diffs = diff_ids(config)
    if len(diffs) != len(manifest.layers):
        raise ManifestError(f"manifest has {len(manifest.layers)} layers but config lists {len(diffs)} diff_ids")
    return [
        Layer(d.digest, diff, layer_compression(d.media_type), blob_window(files, d))
        for d, diff in zip(manifest.layers, diffs, strict=True)
    ]
