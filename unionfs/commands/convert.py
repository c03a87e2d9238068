"""`crfs-merge convert SRC DST`: rewrite every layer of an image as eStargz (or, with
--format zstd:chunked, as zstd:chunked: unionfs/zstdchunked/writer.py).

SRC is anything crfs-merge mounts (layout, archive, registry). Each layer is written as
eStargz with chunk digests, a TOC, a landmark, and the toc.digest and uncompressed-size
annotations on its descriptor; the config gets the new diff_ids (the TOC and the landmark
are tar entries too). DST is an OCI layout (oci:PATH[:TAG]), or a registry reference, to which
the image is pushed (written to a layout in the cache directory first, then uploaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from registry.errors import InvalidReferenceError
from registry.layout_writer import LAYER_MEDIA_TYPES, blob_dir, write_manifest
from registry.manifest import Platform
from registry.media_types import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, Compression
from registry.push import push_layout
from registry.reference import OCI, REGISTRY, ImageReference
from registry.remote import RegistryClient
from registry.remote_reference import RemoteReference
from unionfs.aio import EventLoopThread
from unionfs.build import Settings, local_layers
from unionfs.commands.progress import Progress, WatchedReader, terminal_progress
from unionfs.estargz.writer import DEFAULT_CHUNK_SIZE, WrittenLayer, write_estargz
from unionfs.zstdchunked.writer import write_zstd_chunked

ESTARGZ, ZSTD_CHUNKED = "estargz", "zstd:chunked"  # convert's --format


def convert(source: str, dest: str, settings: Settings, chunk_size: int = DEFAULT_CHUNK_SIZE,
            prioritized: list[str] | None = None, layer_format: str = ESTARGZ) -> str:  # fmt: skip
    """Writes SRC as an eStargz (or zstd:chunked) image to `dest`, an OCI layout
    (oci:PATH[:TAG]) or a registry reference; returns the manifest digest."""
    if layer_format == ZSTD_CHUNKED:
        if prioritized:
            raise ValueError("--prefetch-files orders eStargz layers; zstd:chunked has no prefetch landmark")
        write_layer: Callable[[Path, object], tuple[dict[str, object], str]] = partial(_zstd_chunked_layer,
                                                                                        chunk_size=chunk_size)
    else:
        write_layer = partial(_estargz_layer, chunk_size=chunk_size, prioritized=prioritized or [])
    return deliver(dest, settings, "convert", lambda root, tag: _convert_to_layout(
        source, root, tag, settings, write_layer))  # fmt: skip


def deliver(dest: str, settings: Settings, command: str, write: Callable[[Path, str], str]) -> str:
    """Returns the manifest digest of the image that write(layout root, tag) writes, into
    `dest`: an OCI layout (oci:PATH[:TAG], created or gaining the tag) written in place, or
    a registry reference, pushed from a staging layout in the cache directory."""
    target = ImageReference.parse(dest)
    if target.transport == OCI:
        return write(Path(target.path), target.tag or "latest")
    if target.transport != REGISTRY:
        raise InvalidReferenceError(f"{dest}: {command} writes an OCI layout (oci:PATH[:TAG]) or to a registry")
    staging = Path(tempfile.mkdtemp(prefix=f"{command}-", dir=_ensure(settings.cache_dir)))
    try:
        write(staging, "push")
        return _push(RemoteReference.parse(target.path), staging, settings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _push(reference: RemoteReference, staging: Path, settings: Settings) -> str:
    async def push() -> str:
        async with RegistryClient(reference, settings.remote, os.environ) as client:
            return await push_layout(client, staging, "push")

    with EventLoopThread() as loop:
        return loop.run(push())


def _convert_to_layout(source: str, root: Path, tag: str, settings: Settings,
                       write_layer: Callable[[Path, object], tuple[dict[str, object], str]]) -> str:  # fmt: skip
    image, tars = local_layers(source, settings)
    descriptors, diff_ids = [], []
    progress = _progress(sum(tar.size for tar in tars))
    for tar in tars:
        with tar.open() as reader:
            watched = WatchedReader(reader, tar.size, progress)
            descriptor, diff_id = write_layer(root, watched)
            watched.finish()
        descriptors.append(descriptor)
        diff_ids.append(diff_id)
    config = json.loads(image.config)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return write_image(root, descriptors, config, tag)


def _estargz_layer(root: Path, reader: object, chunk_size: int,
                   prioritized: list[str]) -> tuple[dict[str, object], str]:  # fmt: skip
    written = write_estargz_blob(root, reader, chunk_size, prioritized)
    return estargz_descriptor(written), written.diff_id


def _zstd_chunked_layer(root: Path, reader: object, chunk_size: int) -> tuple[dict[str, object], str]:
    """Writes the tar `reader` as a zstd:chunked blob of the layout at `root`; returns its
    descriptor (with the TOC's position and checksum annotations) and diff_id."""
    blobs = blob_dir(root)
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            written = write_zstd_chunked(reader, out, chunk_size)  # type: ignore[arg-type]
        os.replace(temp, blobs / written.digest.removeprefix("sha256:"))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    descriptor = {"mediaType": LAYER_MEDIA_TYPES[Compression.ZSTD], "digest": written.digest, "size": written.size,
                  "annotations": written.annotations}  # fmt: skip
    return descriptor, written.diff_id


def write_image(root: Path, descriptors: list[dict[str, object]], config: dict[str, Any], tag: str) -> str:
    """Writes `config` and a manifest of `descriptors` (blobs already in the layout at
    `root`) for the config's platform, tagged `tag`; returns the manifest digest."""
    platform = Platform(config.get("os", "linux"), config.get("architecture", ""), config.get("variant", ""))
    data = json.dumps(config, separators=(",", ":")).encode()
    return write_manifest(root, descriptors, data, tag, platform)


def _progress(total: int) -> Progress:
    """Returns where to report converted bytes: a line on stderr if it is a terminal."""
    start = terminal_progress(sys.stderr, "converting layers")
    return start(total) if start else lambda count: None


def write_estargz_blob(root: Path, reader: object, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       prioritized: list[str] | None = None) -> WrittenLayer:  # fmt: skip
    """Returns what was written: the uncompressed tar `reader` as an eStargz blob of the layout at `root`."""
    blobs = blob_dir(root)
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            written = write_estargz(reader, out, chunk_size, prioritized)  # type: ignore[arg-type]
        os.replace(temp, blobs / written.digest.removeprefix("sha256:"))
        return written
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def estargz_descriptor(written: WrittenLayer) -> dict[str, object]:
    """Returns the layer descriptor of an eStargz blob, with its TOC digest and size annotations."""
    return {
        "mediaType": LAYER_MEDIA_TYPES[Compression.GZIP],
        "digest": written.digest,
        "size": written.size,
        "annotations": {
            TOC_DIGEST_ANNOTATION: written.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(written.uncompressed_size),
        },
    }
