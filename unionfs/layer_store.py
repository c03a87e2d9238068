"""Turn layer blobs into indexed, randomly readable tars, once, in a cache directory.

Cache layout (content-addressed, safe to share between concurrent mounts):
    CACHE/tars/ALGO-HEX.tar      uncompressed tar of a compressed layer blob ALGO:HEX
    CACHE/index/v1/ALGO-HEX.json the layer's entries, so a second mount skips the scan
    CACHE/trees/v1/HEX.tree      the merged tree of a stack of layers (unionfs/tree.py's bytes),
                                 named by a hash of the layers' names and their tars' stamps, so
                                 a mount of an image already seen loads arrays and merges nothing
Files are written under a temporary name and renamed into place, and a per-layer lock
keeps two mounts from decompressing the same layer at once. An uncompressed layer is
read in place from its blob, never copied.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard

from registry.cache_files import atomic_file
from registry.digest import Digest
from registry.errors import LayerFormatError
from registry.media_types import Compression
from registry.source import FileWindow, Layer
from unionfs.entry import NO_XATTRS, Entry, sharer
from unionfs.tar_index import index_tar
from unionfs.tree import CorruptTreeError, MergedTree

INDEX_FORMAT = 1
TREE_FORMAT = 1
COPY_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class IndexedLayer:
    """A layer's entries and the window holding its uncompressed tar."""

    entries: list[Entry]
    tar: FileWindow


def default_cache_dir() -> Path:
    """Returns $XDG_CACHE_HOME/crfs-merge, or ~/.cache/crfs-merge."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crfs-merge"


class LayerStore:
    """Indexes layers into a cache directory and hands back IndexedLayers."""

    def __init__(self, cache_dir: Path, warn: Callable[[str], None]) -> None:
        self._tars = cache_dir / "tars"
        self._indexes = cache_dir / "index" / f"v{INDEX_FORMAT}"
        self._trees = cache_dir / "trees" / f"v{TREE_FORMAT}"
        self._warn = warn
        for directory in (self._tars, self._indexes, self._trees):
            directory.mkdir(parents=True, exist_ok=True)

    def open(self, layer: Layer, number: int) -> IndexedLayer:
        """Returns layer `number` indexed, verifying and decompressing it on first use."""
        index_path = self._indexes / f"{layer.key}.json"
        with _locked(self._indexes / f"{layer.key}.lock"):
            tar = self._tar_window(layer)
            stamp = _stamp(tar)
            cached = _load_index(index_path, stamp, number)
            if cached is not None:
                return IndexedLayer(cached, tar)
            if layer.compression is Compression.NONE:
                _verify_plain(layer)
            with tar.open() as reader:
                entries = index_tar(reader, tar.size, number, self._warn)
            _save_index(index_path, stamp, entries)
            return IndexedLayer(entries, tar)

    def tar(self, layer: Layer) -> FileWindow:
        """Returns the window of the layer's uncompressed tar, decompressing it on first use."""
        with _locked(self._indexes / f"{layer.key}.lock"):
            return self._tar_window(layer)

    def tree_name(self, layers: Sequence[Layer], tars: Sequence[FileWindow]) -> str:
        """Names the merged tree of `layers` (bottom first), whose tars are `tars`."""
        stamps = [[layer.key, _stamp(tar)] for layer, tar in zip(layers, tars, strict=True)]
        return hashlib.sha256(json.dumps([TREE_FORMAT, stamps]).encode()).hexdigest()

    def load_tree(self, name: str) -> MergedTree | None:
        """Returns the saved tree `name`, or None if there is none (or it is damaged)."""
        try:
            return MergedTree.from_bytes((self._trees / f"{name}.tree").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, CorruptTreeError) as exc:
            self._warn(f"merged tree {name} in the cache is unreadable, merging again: {exc}")
            return None

    def save_tree(self, name: str, tree: MergedTree) -> None:
        with atomic_file(self._trees / f"{name}.tree", "the merged tree of the image") as out:
            out.write(tree.to_bytes())

    def needs_blob(self, layer: Layer) -> bool:
        """True if indexing `layer` will read its blob: it is the tar itself, or its
        uncompressed tar is not in the cache yet."""
        if layer.compression is Compression.NONE:
            return not os.path.exists(layer.window.path)
        return not (self._tars / f"{layer.key}.tar").exists()

    def _tar_window(self, layer: Layer) -> FileWindow:
        if layer.compression is Compression.NONE:
            return layer.window
        path = self._tars / f"{layer.key}.tar"
        if not path.exists():
            _decompress_verified(layer, path)
        return FileWindow(str(path), 0, path.stat().st_size)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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
        _check(blob_hash | tar_hash, layer)


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


def _save_index(path: Path, stamp: list[object], entries: list[Entry]) -> None:
    document = {"format": INDEX_FORMAT, "stamp": stamp, "entries": [_encode(e) for e in entries]}
    with atomic_file(path, f"the index of layer {path.stem}", text=True) as out:
        json.dump(document, out, separators=(",", ":"))


def _load_index(path: Path, stamp: list[object], number: int) -> list[Entry] | None:
    try:
        document = json.loads(path.read_text())
        if document.get("format") != INDEX_FORMAT or document.get("stamp") != stamp:
            return None
        share = sharer()
        return [_decode(row, number, share) for row in document["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: scan again


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
