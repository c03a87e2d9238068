"""Where an image's bytes live: byte windows on local files, and the resolved image.

A local source (OCI layout directory, docker-save tarball) resolves to an `Image`: an
ordered list of `Layer`s, each a window on a local file plus the digests to verify it by.
A registry source will fit the same shape by fetching a blob into the cache first.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Protocol

from registry.digest import Digest
from registry.errors import BlobNotFoundError, ManifestError
from registry.media_types import Compression

MAX_DOCUMENT_SIZE = 4 * 1024 * 1024  # distribution spec: registries may refuse larger manifests


@dataclass(frozen=True, slots=True)
class FileWindow:
    """`size` bytes at `offset` of the file at `path`."""

    path: str
    offset: int
    size: int

    def open(self) -> io.BufferedReader:
        """Returns a seekable reader that sees only the window, positioned at its start."""
        return io.BufferedReader(_WindowReader(self), buffer_size=1 << 20)

    def read_all(self, limit: int = MAX_DOCUMENT_SIZE) -> bytes:
        """Returns the whole window; refuses windows over `limit` bytes (JSON documents)."""
        if self.size > limit:
            raise ManifestError(f"{self.path}: document of {self.size} bytes is larger than {limit}")
        with self.open() as reader:
            return reader.read()


class _WindowReader(io.RawIOBase):
    def __init__(self, window: FileWindow) -> None:
        self._window = window
        self._fd = os.open(window.path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        want = min(len(buffer), self._window.size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._window.offset + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._window.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer blob: where it is, how it is compressed, and what it must hash to.

    `digest` is the digest of the blob as stored (None where the source does not say,
    as in legacy docker-save archives); `diff_id` that of the uncompressed tar.
    """

    digest: Digest | None
    diff_id: Digest | None
    compression: Compression
    window: FileWindow
    toc_digest: str | None = None  # eStargz TOC digest, from the descriptor's annotation
    annotations: tuple[tuple[str, str], ...] = ()  # the descriptor's (a registry layer's: zstd:chunked's)

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    @property
    def key(self) -> str:
        """Returns the content address that names this layer in the cache."""
        digest = self.digest or self.diff_id
        assert digest is not None, "a layer needs a digest or a diff_id"
        return f"{digest.algorithm}-{digest.hex}"


@dataclass(frozen=True, slots=True)
class Image:
    """A resolved image: a name for messages, its layers bottom first, and its config."""

    name: str
    layers: tuple[Layer, ...]
    config: bytes = b""  # the image config JSON, as stored


class Files(Protocol):
    """Named files of an image store: a directory, or the members of a tarball."""

    def window(self, name: str) -> FileWindow:
        """Returns the window of file `name`; raises BlobNotFoundError if absent."""
        ...


@dataclass(frozen=True, slots=True)
class DirectoryFiles:
    """Files under a directory."""

    root: str

    def window(self, name: str) -> FileWindow:
        path = os.path.join(self.root, name)
        try:
            return FileWindow(path, 0, os.stat(path).st_size)
        except OSError as exc:
            raise BlobNotFoundError(f"{path}: {exc.strerror}") from None
