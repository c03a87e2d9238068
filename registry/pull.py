"""Resolve a registry image and fetch the layer blobs that the cache does not hold yet.

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
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from registry.errors import ManifestError
from registry.manifest import Descriptor, Manifest, Platform, decode, diff_ids, select_platform
from registry.media_types import layer_compression
from registry.remote import Progress, RegistryClient, RemoteOptions
from registry.remote_reference import RemoteReference
from registry.source import FileWindow, Image, Layer

LOCK_POLL_SECONDS = 0.1
MAX_INDEX_DEPTH = 4  # an index may point at an index; deeper than this is a loop


async def pull_image(
    reference: RemoteReference,
    platform: Platform,
    options: RemoteOptions,
    env: Mapping[str, str],
    blob_dir: Path,
    needs_blob: Callable[[Layer], bool],
    start_progress: Callable[[int], Progress] | None = None,
) -> Image:
    """Returns `reference` resolved for `platform`, with every blob that `needs_blob` asks
    for present and verified under `blob_dir`."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    async with RegistryClient(reference, options, env) as client:
        manifest = await _manifest(client, reference, platform)
        config = await client.small_blob(manifest.config.digest)
        diffs = diff_ids(config)
        if len(diffs) != len(manifest.layers):
            raise ManifestError(f"{reference}: {len(manifest.layers)} layers but config lists {len(diffs)} diff_ids")
        layers = [
            Layer(d.digest, diff, layer_compression(d.media_type), FileWindow(str(_blob_path(blob_dir, d)), 0, d.size))
            for d, diff in zip(manifest.layers, diffs, strict=True)
        ]
        missing = [d for d, layer in zip(manifest.layers, layers, strict=True) if needs_blob(layer)]
        progress = start_progress(sum(d.size for d in missing)) if start_progress and missing else None
        await asyncio.gather(*(_fetch(client, d, _blob_path(blob_dir, d), progress) for d in missing))
    return Image(str(reference), tuple(layers))


def _blob_path(blob_dir: Path, descriptor: Descriptor) -> Path:
    return blob_dir / f"{descriptor.digest.algorithm}-{descriptor.digest.hex}"


async def _manifest(client: RegistryClient, reference: RemoteReference, platform: Platform) -> Manifest:
    data, content_type = await client.manifest(reference.version)
    if reference.digest is not None:
        reference.digest.check_bytes(data, f"manifest of {reference}")
    document = decode(data, _bare_media_type(content_type))
    for _ in range(MAX_INDEX_DEPTH):
        if isinstance(document, Manifest):
            return document
        chosen = select_platform(document, platform)
        data, _ = await client.manifest(str(chosen.digest))
        document = decode(chosen.digest.check_bytes(data, f"manifest {chosen.digest}"), chosen.media_type)
    raise ManifestError(f"{reference}: image index nesting too deep")


def _bare_media_type(content_type: str | None) -> str | None:
    media_type = (content_type or "").split(";")[0].strip()
    return media_type if media_type and media_type not in ("application/json", "text/plain") else None


async def _fetch(client: RegistryClient, descriptor: Descriptor, path: Path, progress: Progress | None) -> None:
    if path.exists():
        return  # written only after verification, under its digest
    async with _exclusive(path.with_name(path.name + ".lock")):
        if path.exists():
            return  # another mount fetched it while we waited
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        os.close(fd)
        try:
            await client.download(descriptor.digest, descriptor.size, Path(temp), progress)
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
