"""`crfs-merge commit --upper DIR IMAGE DEST`: IMAGE plus one layer made from DIR.

DIR is an upper directory in OCI diff form (unionfs/upper/diff.py says what it may hold).
The new image keeps IMAGE's layer blobs as they are (copied, digests checked), adds DIR's
layer (tar+gzip, tar+zstd or eStargz), and extends the config's rootfs.diff_ids and history.
DEST is an OCI layout (oci:PATH[:TAG]) or a registry reference, as for convert (whose
deliver() this shares).
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from registry.errors import DigestMismatchError
from registry.layout_writer import LAYER_MEDIA_TYPES, blob_dir
from registry.media_types import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, Compression
from registry.pull import fetch_blobs
from registry.reference import REGISTRY, ImageReference
from registry.remote import RegistryClient
from registry.remote_reference import RemoteReference
from registry.source import FileWindow, Layer
from unionfs.aio import EventLoopThread
from unionfs.build import MountedImage, Settings, image_id, local_layers, open_image
from unionfs.commands.convert import deliver, estargz_descriptor, write_estargz_blob, write_image
from unionfs.commands.mount_lock import EXIT_GRACE_SECONDS, flock_within
from unionfs.upper.diff import IMAGE_XATTR, ImageBytes, UpperDirError, write_layer_tar

log = logging.getLogger("crfs-merge")
COMPRESSIONS = ("gzip", "zstd", "estargz")
CREATED_BY = "crfs-merge commit"
_COPY_BLOCK = 1 << 20


def commit(upper: str, source: str, dest: str, settings: Settings, compression: str = "gzip",
           message: str | None = None) -> str:  # fmt: skip
    """Writes IMAGE `source` plus the layer of upper directory `upper` to `dest`; returns
    the new manifest digest. Raises UpperDirError for a DIR that is not a valid diff."""
    if not os.path.isdir(upper):
        raise UpperDirError(f"{upper}: the upper directory is missing or not a directory")
    with _unused_upper(upper):
        return deliver(dest, settings, "commit", lambda root, tag: _commit_to_layout(
            upper, source, root, tag, settings, compression, message))  # fmt: skip


@contextlib.contextmanager
def _unused_upper(upper: str) -> Iterator[None]:
    """Holds the upper directory's lock while committing: a writable mount of it could change
    it half-way, and the commit would catch half a change."""
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not flock_within(fd, EXIT_GRACE_SECONDS):
            raise UpperDirError(f"{upper}: a writable mount is using it; unmount it first")
        yield
    finally:
        os.close(fd)


def _commit_to_layout(upper: str, source: str, root: Path, tag: str, settings: Settings, compression: str,
                      message: str | None) -> str:  # fmt: skip
    image, tars = local_layers(source, settings)
    _check_binding(upper, image_id(image), source)
    # The upper layer before the old ones: a DIR that is no valid diff is refused before any
    # blob is copied.
    with _ImageFiles(source, settings) as files:
        new_layer, new_diff_id = _write_upper_layer(root, upper, compression, files.bytes_of)
    refetched = _fetch_dropped_blobs(source, list(image.layers), settings)
    try:
        descriptors = [_copy_layer(root, layer, tar) for layer, tar in zip(image.layers, tars, strict=True)]
    finally:
        for layer in refetched:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layer.window.path)
    config = extended_config(json.loads(image.config), new_diff_id, message, _now())
    return write_image(root, [*descriptors, new_layer], config, tag)


def extended_config(config: dict[str, Any], diff_id: str, message: str | None, created: str) -> dict[str, Any]:
    """Returns `config` with one more layer, `diff_id`, in rootfs and in history."""
    rootfs = config.get("rootfs") or {"type": "layers", "diff_ids": []}
    old_ids = list(rootfs.get("diff_ids", []))
    # A config without history gets an empty entry per old layer, so entries and layers
    # stay one to one as the spec asks.
    history = list(config.get("history") or [{} for _ in old_ids])
    entry = {"created": created, "created_by": CREATED_BY, **({"comment": message} if message else {})}
    return {**config, "created": created, "rootfs": {**rootfs, "diff_ids": [*old_ids, diff_id]},
            "history": [*history, entry]}  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fetch_dropped_blobs(source: str, layers: list[Layer], settings: Settings) -> list[Layer]:
    """Returns the layers whose blobs were fetched again from the registry `source` names:
    the cache keeps a registry layer as its verified tar, not its blob, and the new image
    must hold IMAGE's blobs as they are. The caller removes them once copied."""
    reference = ImageReference.parse(source)
    dropped = [layer for layer in layers if layer.digest and not os.path.exists(layer.window.path)]
    if reference.transport != REGISTRY or not dropped:
        return []

    async def fetch() -> None:
        async with RegistryClient(RemoteReference.parse(reference.path), settings.remote, os.environ) as client:
            await fetch_blobs(client, dropped)

    with EventLoopThread() as loop:
        loop.run(fetch())
    return dropped


def _copy_layer(root: Path, layer: Layer, tar: FileWindow) -> dict[str, object]:
    """Returns the descriptor of `layer` after copying its blob into the layout; a layer
    whose source names no blob digest (a legacy docker-save archive) goes in as its tar."""
    if layer.digest is None:
        digest, size = _copy_blob(root, tar, None)
        return {"mediaType": LAYER_MEDIA_TYPES[Compression.NONE], "digest": digest, "size": size}
    digest, size = _copy_blob(root, layer.window, str(layer.digest))
    descriptor: dict[str, object] = {"mediaType": LAYER_MEDIA_TYPES[layer.compression], "digest": digest,
                                     "size": size}  # fmt: skip
    if layer.toc_digest:
        descriptor["annotations"] = {TOC_DIGEST_ANNOTATION: layer.toc_digest,
                                     UNCOMPRESSED_SIZE_ANNOTATION: str(tar.size)}  # fmt: skip
    return descriptor


def _copy_blob(root: Path, window: FileWindow, expected: str | None) -> tuple[str, int]:
    """Returns (digest, size) of `window` copied into the layout; checks `expected`."""
    blobs = blob_dir(root)
    if expected and (blobs / expected.partition(":")[2]).is_file():
        return expected, window.size  # content-addressed: already there (DEST holds IMAGE)
    with _partial(blobs) as (out, temp):
        sink = _Hashing(out)
        with window.open() as reader:
            while block := reader.read(_COPY_BLOCK):
                sink.write(block)
        digest = sink.digest()
        if expected and digest != expected:
            raise DigestMismatchError(f"layer {expected}: the blob hashes to {digest}")
        out.close()
        os.replace(temp, blobs / digest.partition(":")[2])
    return digest, sink.size


def _check_binding(upper: str, wanted: str, source: str) -> None:
    """Refuses an upper directory a writable mount made over another image."""
    try:
        bound = os.getxattr(upper, IMAGE_XATTR).decode(errors="replace")
    except OSError:
        return  # made by hand, or on a file system without xattrs: nothing to check against
    if bound != wanted:
        raise UpperDirError(f"{upper}: holds changes to image {bound}, not to {source} ({wanted})")


class _ImageFiles:
    """The merged files of an image, opened on first use: the bytes of metadata-only copies."""

    def __init__(self, source: str, settings: Settings) -> None:
        self._source, self._settings = source, settings
        self._image: MountedImage | None = None

    def __enter__(self) -> _ImageFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._image is not None:
            self._image.close()

    def bytes_of(self, path: str, size: int) -> Iterator[bytes]:
        if self._image is None:
            self._image = open_image(self._source, self._settings)
        try:
            inode = self._image.tree.lookup(path)
        except KeyError:
            inode = None
        if inode is None or not inode.entry.is_regular or inode.entry.size != size:
            raise UpperDirError(f"{path}: a metadata-only copy of a file the image does not have")
        for offset in range(0, size, _COPY_BLOCK):
            yield self._image.content.read(inode.entry, offset, min(_COPY_BLOCK, size - offset))


def _write_upper_layer(root: Path, upper: str, compression: str,
                       image_bytes: ImageBytes) -> tuple[dict[str, object], str]:  # fmt: skip
    """Returns the descriptor and the diff_id of the layer made from `upper`, written into the layout."""
    blobs = blob_dir(root)
    with tempfile.TemporaryFile(dir=blobs, prefix=".tar-") as tar:
        write_layer_tar(upper, tar, log.warning, image_bytes)  # type: ignore[arg-type]
        tar.seek(0)
        if compression == "estargz":
            written = write_estargz_blob(root, tar)
            return estargz_descriptor(written), written.diff_id
        kind = Compression.ZSTD if compression == "zstd" else Compression.GZIP
        return _compressed_blob(blobs, tar, kind)  # type: ignore[arg-type]


def _compressed_blob(blobs: Path, tar: IO[bytes], kind: Compression) -> tuple[dict[str, object], str]:
    """Compresses `tar` into a blob as layout_writer.compress() does (gzip level 6 with
    mtime 0, zstd level 3), streaming; returns its descriptor and the tar's diff_id."""
    diff_id = hashlib.sha256()
    with _partial(blobs) as (out, temp):
        sink = _Hashing(out)
        writable = cast(IO[bytes], sink)
        compressor: Any = (gzip.GzipFile(fileobj=writable, mode="wb", compresslevel=6, mtime=0)
                           if kind is Compression.GZIP
                           else zstandard.ZstdCompressor(level=3).stream_writer(writable, closefd=False))  # fmt: skip
        with compressor:
            while block := tar.read(_COPY_BLOCK):
                diff_id.update(block)
                compressor.write(block)
        digest = sink.digest()
        out.close()
        os.replace(temp, blobs / digest.partition(":")[2])
    descriptor: dict[str, object] = {"mediaType": LAYER_MEDIA_TYPES[kind], "digest": digest, "size": sink.size}
    return descriptor, f"sha256:{diff_id.hexdigest()}"


@contextlib.contextmanager
def _partial(blobs: Path) -> Any:
    """Yields (file, path) of a new partial blob, removed unless it was renamed into place."""
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, temp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


class _Hashing:
    """A writable that hashes and counts what it passes on to `out`."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out, self._hash, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._out.flush()

    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"
