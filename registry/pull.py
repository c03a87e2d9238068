"""Resolve a registry image, and fetch the layer blobs that are to be read whole.

The result has the same shape as a local image: layers are windows on blob files under
`blob_dir`, named by digest, written once (verified, renamed into place) and shared by every
mount that uses the same cache directory. A download goes to a stable temporary name, so
one that was cut short is continued by the next fetch of the blob, not begun again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from registry.cache_files import NoSpaceError, remove_if_abandoned, resumable_partial, space_errors_named
from registry.deferred_client import BlobReader
from registry.digest import Digest
from registry.errors import DigestMismatchError, ManifestError
from registry.manifest import Descriptor, Manifest, Platform, check_platform, decode, diff_ids, select_platform
from registry.media_types import TOC_DIGEST_ANNOTATION, layer_compression
from registry.remote_reference import RemoteReference
from registry.source import FileWindow, Image, Layer

if TYPE_CHECKING:  # aiohttp is imported only where a client is made: a mount from the cache needs none
    from registry.remote import Progress, RegistryClient

log = logging.getLogger("crfs-merge")
LOCK_POLL_SECONDS = 0.1
MAX_INDEX_DEPTH = 4  # an index may point at an index; deeper than this is a loop


@dataclass(frozen=True)
class ResolvedManifest:
    """A registry image's manifest for a platform, before its config is fetched: `layers`
    already say where each blob is and how to read it, all but what it uncompresses to
    (diff_id None), which is what the config adds."""

    reference: RemoteReference  # the one that served the manifest (a short name's candidate)
    manifest: Manifest
    by_platform: bool  # an image index chose it by platform
    platform: Platform
    layers: tuple[Layer, ...]
    data: bytes  # the manifest as served, kept with the config for the next mount (--pull missing)
    media_type: str | None

    @property
    def config_digest(self) -> Digest:
        return self.manifest.config.digest

    def image(self, config: bytes) -> Image:
        """The image, given its config (checked against the platform and the layer count)."""
        if not self.by_platform:  # no index chose it by platform: its config must say
            check_platform(config, self.platform, str(self.reference))
        diffs = diff_ids(config, f"{self.reference}: config {self.config_digest}")
        if len(diffs) != len(self.layers):
            raise ManifestError(f"{self.reference}: {len(self.layers)} layers but config lists {len(diffs)} diff_ids")
        layers = tuple(replace(layer, diff_id=diff) for layer, diff in zip(self.layers, diffs, strict=True))
        return Image(str(self.reference), layers, config)


async def resolve_manifest(client: RegistryClient, platform: Platform, blob_dir: Path) -> ResolvedManifest:
    """Returns the client's manifest for `platform`, its layers windows on (not yet fetched)
    blob files under `blob_dir`."""
    manifest, by_platform, data, media_type = await _manifest(client, client.reference, platform)
    reference = client.reference  # a short name's candidate is known once one served the manifest
    return resolved_from(reference, manifest, by_platform, platform, blob_dir, data, media_type)


def resolved_from(reference: RemoteReference, manifest: Manifest, by_platform: bool, platform: Platform,
                  blob_dir: Path, data: bytes, media_type: str | None) -> ResolvedManifest:  # fmt: skip
    """The resolution of `manifest` (served as `data`), its layers windows on blob files under `blob_dir`."""
    layers = tuple(_layer(d, None, blob_dir, str(reference)) for d in manifest.layers)
    return ResolvedManifest(reference, manifest, by_platform, platform, layers, data, media_type)


def _layer(descriptor: Descriptor, diff_id: Digest | None, blob_dir: Path, image: str) -> Layer:
    window = FileWindow(str(_blob_path(blob_dir, descriptor)), 0, descriptor.size)
    compression = layer_compression(descriptor.media_type, f"{image}: layer {descriptor.digest}")
    return Layer(descriptor.digest, diff_id, compression, window, descriptor.annotation(TOC_DIGEST_ANNOTATION),
                 descriptor.annotations)


async def fetch_blobs(
    client: BlobReader, layers: list[Layer], start_progress: Callable[[int], Progress] | None = None,
    needed: Callable[[Layer], bool] = lambda layer: True,
) -> None:
    """Downloads the blobs of `layers` into their windows' files (verified, shared), except
    those no longer `needed` once their lock is held (another mount made the layer's tar from
    its blob, and deleted the blob, while this one waited)."""
    if not layers:
        return
    Path(layers[0].window.path).parent.mkdir(parents=True, exist_ok=True)
    progress = start_progress(sum(layer.window.size for layer in layers)) if start_progress else None
    tasks = [asyncio.ensure_future(_fetch(client, layer, progress, needed)) for layer in layers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # one failed, or the pull was cancelled: the others stop, their downloads kept
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    failed = next((t.exception() for t in tasks if not t.cancelled() and t.exception()), None)
    if isinstance(failed, NoSpaceError):
        for layer in layers:  # ... unless the disk is full: then they hold space that is needed
            remove_if_abandoned(resumable_partial(Path(layer.window.path)), grace=0)
    if failed is not None:
        raise failed


def _blob_path(blob_dir: Path, descriptor: Descriptor) -> Path:
    return blob_dir / f"{descriptor.digest.algorithm}-{descriptor.digest.hex}"


async def _manifest(
    client: RegistryClient, reference: RemoteReference, platform: Platform
) -> tuple[Manifest, bool, bytes, str | None]:
    """Returns the manifest of `reference` for `platform`, whether an image index chose it by
    platform, and the manifest's bytes and media type as served."""
    data, content_type = await client.manifest(reference.version)
    reference = client.reference  # the candidate that answered, for a short name
    if reference.digest is not None:
        reference.digest.check_bytes(data, f"manifest of {reference}")
    media_type = _bare_media_type(content_type)
    document = decode(data, media_type, f"{reference}: manifest")
    for depth in range(MAX_INDEX_DEPTH):
        if isinstance(document, Manifest):
            log.info("%s: manifest sha256:%s", reference, hashlib.sha256(data).hexdigest())
            return document, depth > 0, data, media_type
        chosen = select_platform(document, platform, str(reference))
        data, _ = await client.manifest(str(chosen.digest))
        where = f"{reference}: manifest {chosen.digest}"
        media_type = chosen.media_type
        document = decode(chosen.digest.check_bytes(data, where), media_type, where)
    raise ManifestError(f"{reference}: image index nesting too deep")


def _bare_media_type(content_type: str | None) -> str | None:
    media_type = (content_type or "").split(";")[0].strip()
    return media_type if media_type and media_type not in ("application/json", "text/plain") else None


async def _fetch(client: BlobReader, layer: Layer, progress: Progress | None,
                 needed: Callable[[Layer], bool]) -> None:  # fmt: skip
    path = Path(layer.window.path)
    if path.exists():
        return  # written only after verification, under its digest
    async with _exclusive(path.with_name(path.name + ".lock")):
        if path.exists() or not needed(layer):
            return  # another mount fetched it while we waited
        assert layer.digest is not None
        # A stable name, so that a download cut short (Ctrl-C, SIGKILL, a lost network) is
        # continued by the next fetch of the blob rather than left behind.
        partial = resumable_partial(path)
        purpose = f"downloading layer {layer.digest}, {layer.window.size / 1e6:.1f} MB"
        async with _locked_partial(partial):
            try:
                with space_errors_named(path, purpose):
                    await client.download(layer.digest, layer.window.size, partial, progress)
            except (NoSpaceError, DigestMismatchError):
                # Nothing worth keeping: a full disk needs the space back, wrong bytes a new start.
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                raise
            os.replace(partial, path)


@contextlib.asynccontextmanager
async def _locked_partial(partial: Path) -> AsyncIterator[None]:
    """Holds the download's own lock (so that no sweep takes it), on the file that is
    under its name: a prune may have removed the one opened, before it was locked."""
    while True:
        async with _exclusive(partial) as fd:
            try:
                same = os.fstat(fd).st_ino == os.stat(partial).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return


@contextlib.asynccontextmanager
async def _exclusive(lock_path: Path) -> AsyncIterator[int]:
    """Holds an flock on `lock_path`, waiting without blocking the event loop; yields its fd."""
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL_SECONDS)
        yield fd
    finally:
        os.close(fd)
