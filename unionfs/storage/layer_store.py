"""Turn layer blobs into indexed, randomly readable tars, once, in a cache directory.

Cache layout (content-addressed, safe to share between concurrent mounts):
    CACHE/blobs/ALGO-HEX         a registry layer blob, kept only until its tar is made
    CACHE/tars/ALGO-HEX.tar      uncompressed tar of a compressed layer blob ALGO:HEX
    CACHE/index/v2/ALGO-HEX.json the layer's entries, so a second mount skips the scan
    CACHE/trees/v4/HEX.tree      the merged tree of a stack of layers (unionfs/tree.py's bytes),
                                 named by a hash of the layers' names and their tars' stamps (a
                                 lazily read layer: its blob and TOC digests), so a mount of an
                                 image already seen loads arrays and merges (or parses) nothing
Index and tree files are sealed (unionfs/storage/sealed.py): any change to their bytes is noticed
on load, and the file is dropped and made again. A tar is verified against its diff_id when
it is made, and again whenever its stamp (size, mtime, inode) differs from the one its index
was written for. Files are written under a temporary name and renamed into place, and a
per-layer lock keeps two mounts from decompressing the same layer at once. An uncompressed
layer is read in place from its blob, never copied; a blob this cache fetched from a
registry is deleted once its tar is made and verified (one copy per layer), and one found
damaged is deleted and fetched again (RefetchNeeded), while the blobs of a local image are
never touched.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard

from registry.cache_files import atomic_file, write_atomically
from registry.digest import Digest
from registry.errors import DigestMismatchError, ImageError, LayerFormatError
from registry.media_types import Compression
from registry.source import FileWindow, Layer
from unionfs.entry import NO_XATTRS, Entry, sharer
from unionfs.storage.sealed import DamagedCacheFile, drop_damaged, seal, seal_parts, unseal, unsealed
from unionfs.storage.tar_index import index_tar
from unionfs.tree import CorruptTreeError, MergedTree

log = logging.getLogger("crfs-merge")

INDEX_FORMAT = 2
TREE_FORMAT = 4
COPY_BLOCK = 1 << 20
TAR_BLOCK = 512
TAR_RECORD_BLOCKS = 20  # tar's default blocking factor: a record of 10240 bytes
# A cache directory we may read but not write: mount from what it holds, without locks.
READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass(frozen=True, slots=True)
class IndexedLayer:
    """A layer's entries and the window holding its uncompressed tar."""

    entries: list[Entry]
    tar: FileWindow


class RefetchNeeded(ImageError):
    """A registry blob that the cache needs is missing or was found damaged (and removed):
    fetch it again and retry. `cause` is the damage found, None if the blob is just gone."""

    def __init__(self, layer: Layer, cause: ImageError | None) -> None:
        super().__init__(f"layer {layer.digest}: {cause or 'its blob is not in the cache'}")
        self.layer, self.cause = layer, cause


class LayerStore:
    """Indexes layers into a cache directory and hands back IndexedLayers."""

    def __init__(self, cache_dir: Path, warn: Callable[[str], None]) -> None:
        self._blobs = cache_dir / "blobs"
        self._tars = cache_dir / "tars"
        self._indexes = cache_dir / "index" / f"v{INDEX_FORMAT}"
        self._trees = cache_dir / "trees" / f"v{TREE_FORMAT}"
        self._warn = warn
        self._verified: set[str] = set()  # stamps of tars this process made or verified
        for directory in (self._tars, self._indexes, self._trees):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only cache: read what it holds, save nothing
                if exc.errno not in READ_ONLY_ERRORS:
                    raise

    def open(self, layer: Layer, number: int) -> IndexedLayer:
        """Returns layer `number` indexed, verifying and decompressing it on first use, and
        verifying its tar again if it changed since it was indexed."""
        index_path = self._indexes / f"{layer.key}.json"
        with _locked(self._indexes / f"{layer.key}.lock"):
            tar = self._tar_window(layer)
            cached = self._load_index(index_path, layer.key, _stamp(tar), number)
            if cached is not None:
                log.debug("layer %d (%s): index loaded from the cache, %d entries", number, layer.key, len(cached))
                return IndexedLayer(cached, tar)
            started = time.monotonic()
            if json.dumps(_stamp(tar)) not in self._verified:
                tar = self._verify_again(layer, tar)
            with tar.open() as reader:
                entries = index_tar(reader, tar.size, number, self._warn)
            self._save_index(index_path, layer.key, _stamp(tar), entries)
            log.info("layer %d (%s): indexed %d entries of %.1f MB in %.2f s", number, layer.key, len(entries),
                     tar.size / 1e6, time.monotonic() - started)  # fmt: skip
            return IndexedLayer(entries, tar)

    def tar(self, layer: Layer) -> FileWindow:
        """Returns the window of the layer's uncompressed tar, decompressing it on first use."""
        with _locked(self._indexes / f"{layer.key}.lock"):
            return self._tar_window(layer)

    def tree_name(self, layers: Sequence[Layer], tars: Sequence[FileWindow]) -> str:
        """Names the merged tree of `layers` (bottom first), whose tars are `tars`."""
        stamps = [[layer.key, _stamp(tar)] for layer, tar in zip(layers, tars, strict=True)]
        return hashlib.sha256(json.dumps([TREE_FORMAT, stamps]).encode()).hexdigest()

    def lazy_tree_name(self, layers: Sequence[Layer], tars: Mapping[int, FileWindow]) -> str:
        """Names the merged tree of `layers` (bottom first) where layer n's tar is tars[n], and
        the layers without one are read lazily: those are named by their content, the blob's
        digest and its TOC's (the blob holds the TOC, so the digest alone would do; the TOC
        digest keeps two TOC formats of one blob apart)."""
        parts = [[layer.key, _stamp(tars[n])] if n in tars else [layer.key, "lazy", layer.toc_digest]
                 for n, layer in enumerate(layers)]  # fmt: skip
        return hashlib.sha256(json.dumps([TREE_FORMAT, parts]).encode()).hexdigest()

    def has_tree(self, name: str) -> bool:
        """True if a tree `name` is saved (it may still turn out damaged when loaded)."""
        return (self._trees / f"{name}.tree").exists()

    def load_tree(self, name: str) -> MergedTree | None:
        """Returns the saved tree `name`, or None if there is none (or it is damaged: then
        it is removed, with a warning)."""
        path = self._trees / f"{name}.tree"
        try:
            return unsealed(name, path.read_bytes(), MergedTree.from_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn(f"cannot read the merged tree {path}: {exc.strerror}; merging again")
            return None
        except (DamagedCacheFile, CorruptTreeError) as exc:
            self._drop(path, exc, "merging again")
            return None

    def save_tree(self, name: str, tree: MergedTree) -> None:
        """Saves `tree` as `name`; a cache that cannot take it (full, read-only) costs the
        next mount a merge, not this one its mount: one warning."""
        path = self._trees / f"{name}.tree"
        try:
            write_atomically(path, seal_parts(name, tree.to_parts()), "the merged tree of the image")
        except OSError as exc:
            self._warn(f"cannot save the merged tree to {path}: {exc.strerror}; mounting without it")

    def needs_blob(self, layer: Layer) -> bool:
        """True if indexing `layer` will read its blob: it is the tar itself, or its
        uncompressed tar is not in the cache yet."""
        if layer.compression is Compression.NONE:
            return not os.path.exists(layer.window.path)
        return not (self._tars / f"{layer.key}.tar").exists()

    def _tar_window(self, layer: Layer) -> FileWindow:
        if layer.compression is Compression.NONE:
            if self._owns(layer) and not os.path.exists(layer.window.path):
                raise RefetchNeeded(layer, None)
            return layer.window
        path = self._tars / f"{layer.key}.tar"
        if not path.exists():
            started = time.monotonic()
            self._decompress(layer, path)
            log.info("layer %s: %.1f MB blob verified and decompressed to %.1f MB in %.2f s", layer.key,
                     layer.window.size / 1e6, path.stat().st_size / 1e6, time.monotonic() - started)  # fmt: skip
        return FileWindow(str(path), 0, path.stat().st_size)

    def _decompress(self, layer: Layer, path: Path) -> None:
        """Makes the layer's tar from its blob; a registry blob is then deleted (the tar is
        the one copy kept), or, if damaged, deleted so that it is fetched again."""
        try:
            _decompress_verified(layer, path)
        except FileNotFoundError as exc:
            if exc.filename == layer.window.path and self._owns(layer):
                raise RefetchNeeded(layer, None) from None
            raise
        except (DigestMismatchError, LayerFormatError) as exc:
            if not self._owns(layer) or _intact(layer):
                raise  # the image's own blob, or bytes that are what the registry serves: its fault
            self._drop(Path(layer.window.path), exc, "fetching it again", must_go=True)
            raise RefetchNeeded(layer, exc) from None
        self._verified.add(json.dumps(_stamp(FileWindow(str(path), 0, path.stat().st_size))))
        if self._owns(layer):
            with contextlib.suppress(OSError):  # a read-only cache keeps both
                os.unlink(layer.window.path)

    def _verify_again(self, layer: Layer, tar: FileWindow) -> FileWindow:
        """Returns the layer's tar once verified: `tar` (whose stamp changed since it was
        indexed, or whose index is gone) if it still hashes right, else one made again
        from the blob. A damaged blob of a local image is that image's error."""
        if layer.compression is Compression.NONE:
            try:
                _verify_plain(layer)
            except DigestMismatchError as exc:
                if not self._owns(layer) or _intact(layer):
                    raise
                self._drop(Path(tar.path), exc, "fetching it again", must_go=True)
                raise RefetchNeeded(layer, exc) from None
        elif layer.diff_id is None:  # nothing to check it against: make it again from the blob
            os.unlink(tar.path)
            return self._tar_window(layer)
        else:
            try:
                _verify_file(tar, layer.diff_id)
            except DigestMismatchError as exc:
                self._drop(Path(tar.path), exc, "making it again from its blob", must_go=True)
                return self._tar_window(layer)
        self._verified.add(json.dumps(_stamp(tar)))
        return tar

    def _owns(self, layer: Layer) -> bool:
        """True if the layer's blob is one this cache fetched (from a registry)."""
        return os.path.dirname(os.path.abspath(layer.window.path)) == os.path.abspath(self._blobs)

    def _drop(self, path: Path, damage: Exception, then: str, must_go: bool = False) -> None:
        drop_damaged(path, damage, then, self._warn, must_go)

    def _load_index(self, path: Path, key: str, stamp: list[object], number: int) -> list[Entry] | None:
        """Returns the entries of the saved index if it is whole and describes the tar as it
        is now (`stamp`); None if absent, stale or damaged (then removed, with a warning)."""
        try:
            document = json.loads(bytes(unseal(key, path.read_bytes())))
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn(f"cannot read the index {path}: {exc.strerror}; indexing again")
            return None
        except ValueError as exc:  # DamagedCacheFile is a ValueError, as is bad JSON
            self._drop(path, exc, "indexing again")
            return None
        try:
            if document["format"] != INDEX_FORMAT or document["stamp"] != stamp:
                return None  # the tar changed since: verified and indexed again
            share = sharer()
            return [_decode(row, number, share) for row in document["entries"]]
        except (ValueError, KeyError, TypeError) as exc:
            self._drop(path, exc, "indexing again")
            return None

    def _save_index(self, path: Path, key: str, stamp: list[object], entries: list[Entry]) -> None:
        document = {"format": INDEX_FORMAT, "stamp": stamp, "entries": [_encode(e) for e in entries]}
        try:
            data = seal(key, json.dumps(document, separators=(",", ":")).encode())
            write_atomically(path, data, f"the index of layer {key}")
        except OSError as exc:
            self._warn(f"cannot save the index of layer {key} to {path}: {exc.strerror}; mounting without it")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive flock on `path`. In a cache this process cannot write, it takes
    the lock if the file is there and goes without otherwise: nothing can be written there
    anyway, and reading needs no lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRORS:
            raise
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _stamp(tar: FileWindow) -> list[object]:
    # An index stays valid while the tar it describes is the same file, unchanged.
    info = os.stat(tar.path)
    return [tar.path, tar.offset, tar.size, info.st_size, info.st_mtime_ns, info.st_ino]


def _verify_plain(layer: Layer) -> None:
    hashers = _hashers(layer.digest, layer.diff_id)
    with layer.window.open() as reader:
        while block := reader.read(COPY_BLOCK):
            for hashed in hashers.values():
                hashed.update(block)
    _check(hashers, layer)


def _intact(layer: Layer) -> bool:
    """True if the layer's blob hashes to its digest (or has none to hash to): then what is
    wrong with it is the image's doing, and fetching it again would bring the same bytes."""
    if layer.digest is None:
        return True
    try:
        _verify_file(layer.window, layer.digest)
    except (DigestMismatchError, OSError):
        return False
    return True


def _verify_file(tar: FileWindow, digest: Digest) -> None:
    hashed = digest.hasher()
    with tar.open() as reader:
        while block := reader.read(COPY_BLOCK):
            hashed.update(block)
    digest.verify(hashed, "diff_id check")


def _hashers(*digests: Digest | None) -> dict[Digest, hashlib._Hash]:
    return {d: d.hasher() for d in digests if d is not None}


def _check(hashers: dict[Digest, hashlib._Hash], layer: Layer) -> None:
    for digest, hashed in hashers.items():
        digest.verify(hashed, f"layer {layer.digest or layer.diff_id}")


def _decompress_verified(layer: Layer, final: Path) -> None:
    """Writes the layer's uncompressed tar to `final`, or raises and leaves nothing."""
    blob_hash = _hashers(layer.digest)
    tar_hash = _hashers(layer.diff_id)
    purpose = f"the uncompressed tar of layer {layer.digest or layer.diff_id}"
    with atomic_file(final, purpose) as out, layer.window.open() as raw:
        hashing = _HashingReader(raw, list(blob_hash.values()))
        for block in _decompressed_blocks(layer.compression, hashing):
            out.write(block)
            for hashed in tar_hash.values():
                hashed.update(block)
        hashing.drain()
        if layer.compression is Compression.ZSTD and layer.diff_id is not None:
            padding = missing_tar_padding(tar_hash[layer.diff_id], layer.diff_id)
            if padding:
                log.info("layer %s: restored the %d bytes of zero padding its zstd stream left out",
                         layer.key, padding)  # fmt: skip
                out.write(bytes(padding))
                tar_hash[layer.diff_id].update(bytes(padding))
        _check(blob_hash | tar_hash, layer)


def missing_tar_padding(hashed: hashlib._Hash, diff_id: Digest) -> int:
    """Returns how many zero bytes, appended to what `hashed` has seen, make it hash to
    `diff_id`: 0 if it already does or if no padding does.

    containers/storage's zstd:chunked writer (podman 4.3, Debian 12) stopped copying the tar
    after its end-of-archive blocks, so the blob decompresses to the tar that the config's
    diff_id names minus the zeros that pad it to a whole record (tar writes records of 20
    blocks of 512 bytes). Padding is tried a block at a time, up to one record: the result is
    accepted only if it hashes to the diff_id, so the tar kept is byte for byte the one the
    image names."""
    if hashed.hexdigest() == diff_id.hex:
        return 0
    padded = hashed.copy()
    for blocks in range(1, TAR_RECORD_BLOCKS + 1):
        padded.update(bytes(TAR_BLOCK))
        if padded.hexdigest() == diff_id.hex:
            return blocks * TAR_BLOCK
    return 0


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _decompressed_blocks(compression: Compression, raw: Readable) -> Iterator[bytes]:
    source = cast(IO[bytes], raw)  # both decompressors only ever call read() on it
    stream: IO[bytes]
    try:
        if compression is Compression.GZIP:
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=source, mode="rb"))
        else:
            stream = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        with stream:
            while block := stream.read(COPY_BLOCK):
                yield block
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise LayerFormatError(f"layer is not valid {compression.value}: {exc or 'truncated'}") from exc


class _HashingReader:
    """Feeds every byte read through it to the given hashes."""

    def __init__(self, raw: Readable, hashers: list[hashlib._Hash]) -> None:
        self._raw = raw
        self._hashers = hashers

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        for hashed in self._hashers:
            hashed.update(data)
        return data

    def drain(self) -> None:
        """Reads what the decompressor left, so the digest covers the whole blob."""
        while self.read(COPY_BLOCK):
            pass


def _encode(entry: Entry) -> list[object]:
    xattrs = {k: base64.b64encode(v).decode() for k, v in entry.xattrs.items()}
    return [entry.path, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime_ns,
            entry.link, entry.hardlink, entry.rdev, xattrs, entry.offset]  # fmt: skip


def _decode(row: list[Any], number: int, share: Callable[[Any], Any]) -> Entry:
    # Columns as _encode writes them, which is Entry's field order.
    path, mode, uid, gid, size, mtime_ns, link, hardlink, rdev, xattrs, offset = row
    decoded = {k: base64.b64decode(v) for k, v in xattrs.items()} or NO_XATTRS
    return Entry(path, share(mode), share(uid), share(gid), size, share(mtime_ns), link, hardlink, rdev,
                 decoded, number, offset)  # fmt: skip
