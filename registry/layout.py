"""OCI image layouts (image-spec image-layout.md): a directory, or the same inside a tar."""

from __future__ import annotations

from registry.errors import BlobNotFoundError, ManifestError
from registry.manifest import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    check_platform,
    decode,
    diff_ids,
    select_platform,
)
from registry.media_types import OCI_INDEX, layer_compression
from registry.source import Files, FileWindow, Image, Layer

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # what `docker save` adds beside REF_NAME


def resolve_layout(files: Files, name: str, tag: str | None, platform: Platform) -> Image:
    """Returns the image tagged `tag` (or the only one) in the layout that `files` holds."""
    index_name = f"{name.rstrip('/')}/index.json"
    index = decode(files.window("index.json").read_all(), OCI_INDEX, index_name)
    if not isinstance(index, Index):
        raise ManifestError(f"{index_name}: not an image index")
    descriptor = _pick_tag(index, tag, name)
    manifest, by_platform = manifest_for(files, descriptor, platform, name)
    return image_from(files, name, manifest, platform, by_platform)


def image_from(files: Files, name: str, manifest: Manifest, platform: Platform, by_platform: bool) -> Image:
    """Returns the image of `manifest` in `files`; unless an index chose it `by_platform`,
    its config must not name another platform than `platform` (docker's rule)."""
    config = read_blob(files, manifest.config, name)
    if not by_platform:
        check_platform(config, platform, name)
    return Image(name, tuple(layers_of(files, manifest, config, name)), config)


def blob_window(files: Files, descriptor: Descriptor, name: str) -> FileWindow:
    """Returns the window of a blob, checked against the size that its descriptor gives;
    errors start with `name`, the layout or archive."""
    digest = descriptor.digest
    try:
        window = files.window(f"blobs/{digest.algorithm}/{digest.hex}")
    except BlobNotFoundError:
        raise BlobNotFoundError(f"{name}: blob {digest} ({descriptor.media_type}) is missing from the image") from None
    if window.size != descriptor.size:
        raise ManifestError(f"{name}: blob {digest} has {window.size} bytes, its descriptor says {descriptor.size}")
    return window


def read_blob(files: Files, descriptor: Descriptor, name: str) -> bytes:
    """Returns a small blob (manifest, config) of layout `name` after verifying its digest."""
    data = blob_window(files, descriptor, name).read_all()
    return descriptor.digest.check_bytes(data, f"{name}: blob {descriptor.digest}")


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


def manifest_for(files: Files, descriptor: Descriptor, platform: Platform, name: str) -> tuple[Manifest, bool]:
    """Returns the manifest that `descriptor` leads to for `platform`, and whether an image
    index chose it by platform."""
    for depth in range(4):  # an index may point at an index; more nesting than this is a loop
        document = decode(read_blob(files, descriptor, name), descriptor.media_type, f"{name}: {descriptor.digest}")
        if isinstance(document, Manifest):
            return document, depth > 0
        descriptor = select_platform(document, platform, name)
    raise ManifestError(f"{name}: image index nesting too deep at {descriptor.digest}")


def layers_of(files: Files, manifest: Manifest, config: bytes, name: str) -> list[Layer]:
    """Returns the layers of `manifest`, bottom first, each with its diff_id from `config`."""
    diffs = diff_ids(config, f"{name}: config {manifest.config.digest}")
    if len(diffs) != len(manifest.layers):
        raise ManifestError(
            f"{name}: manifest has {len(manifest.layers)} layers but config lists {len(diffs)} diff_ids"
        )
    return [
        Layer(d.digest, diff, layer_compression(d.media_type, f"{name}: layer {d.digest}"), blob_window(files, d, name))
        for d, diff in zip(manifest.layers, diffs, strict=True)
    ]
