"""Resolve a registry image, and fetch the layer blobs that are to be read whole.

The result has the same shape as a local image: layers are windows on blob files under
`blob_dir`, named by digest, written once (verified, renamed into place) and shared by every
mount that uses the same cache directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from registry.digest import Digest
from registry.errors import ManifestError
from registry.manifest import Descriptor, Manifest, Platform, check_platform, decode, diff_ids, select_platform
from registry.media_types import TOC_DIGEST_ANNOTATION, layer_compression
from registry.remote import Progress, RegistryClient
from registry.remote_reference import RemoteReference
from registry.source import FileWindow, Image, Layer

LOCK_POLL_SECONDS = 0.1
MAX_INDEX_DEPTH = 4  # an index may point at an index; deeper than this is a loop


async def resolve_remote(client: RegistryClient, platform: Platform, blob_dir: Path) -> Image:
    """Returns the client's image for `platform`, its layers windows on (not yet fetched)
    blob files under `blob_dir`."""
    reference = client.reference
    manifest, by_platform = await _manifest(client, reference, platform)
    config = await client.small_blob(manifest.config.digest)
    if not by_platform:  # no index chose it by platform: its config must say
        check_platform(config, platform, str(reference))
    diffs = diff_ids(config, f"{reference}: config {manifest.config.digest}")
    if len(diffs) != len(manifest.layers):
        raise ManifestError(f"{reference}: {len(manifest.layers)} layers but config lists {len(diffs)} diff_ids")
    layers = [_layer(d, diff, blob_dir, str(reference)) for d, diff in zip(manifest.layers, diffs, strict=True)]
    return Image(str(reference), tuple(layers), config)


def _layer(descriptor: Descriptor, diff_id: Digest, blob_dir: Path, image: str) -> Layer:
    window = FileWindow(str(_blob_path(blob_dir, descriptor)), 0, descriptor.size)
    compression = layer_compression(descriptor.media_type, f"{image}: layer {descriptor.digest}")
    return Layer(descriptor.digest, diff_id, compression, window, descriptor.annotation(TOC_DIGEST_ANNOTATION))


async def fetch_blobs(
    client: RegistryClient, layers: list[Layer], start_progress: Callable[[int], Progress] | None = None
) -> None:
    """Downloads the blobs of `layers` into their windows' files (verified, shared)."""
    if not layers:
        return
    Path(layers[0].window.path).parent.mkdir(parents=True, exist_ok=True)
    progress = start_progress(sum(layer.window.size for layer in layers)) if start_progress else None
    await asyncio.gather(*(_fetch(client, layer, progress) for layer in layers))


def _blob_path(blob_dir: Path, descriptor: Descriptor) -> Path:
    return blob_dir / f"{descriptor.digest.algorithm}-{descriptor.digest.hex}"


async def _manifest(client: RegistryClient, reference: RemoteReference, platform: Platform) -> tuple[Manifest, bool]:
    """Returns the manifest of `reference` for `platform`, and whether an image index chose it
    by platform."""
    data, content_type = await client.manifest(reference.version)
    if reference.digest is not None:
        reference.digest.check_bytes(data, f"manifest of {reference}")
    document = decode(data, _bare_media_type(content_type), f"{reference}: manifest")
    for depth in range(MAX_INDEX_DEPTH):
        if isinstance(document, Manifest):
            return document, depth > 0
        chosen = select_platform(document, platform, str(reference))
        data, _ = await client.manifest(str(chosen.digest))
        where = f"{reference}: manifest {chosen.digest}"
        document = decode(chosen.digest.check_bytes(data, where), chosen.media_type, where)
    raise ManifestError(f"{reference}: image index nesting too deep")


def _bare_media_type(content_type: str | None) -> str | None:
    media_type = (content_type or "").split(";")[0].strip()
    return media_type if media_type and media_type not in ("application/json", "text/plain") else None


async def _fetch(client: RegistryClient, layer: Layer, progress: Progress | None) -> None:
    path = Path(layer.window.path)
    if path.exists():
        return  # written only after verification, under its digest
    async with _exclusive(path.with_name(path.name + ".lock")):
        if path.exists():
            return  # another mount fetched it while we waited
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        os.close(fd)
        try:
            assert layer.digest is not None
            await client.download(layer.digest, layer.window.size, Path(temp), progress)
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


@contextlib.asynccontextmanager
async def _exclusive(lock_path: Path) -> AsyncIterator[None]:
    """Holds an flock on `lock_path`, waiting without blocking the event loop."""
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)
