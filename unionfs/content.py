"""Read file bytes: each layer has a reader that knows where its bytes live.

A local layer's bytes are in its uncompressed tar, read with pread (no seek state, so any
number of FUSE worker threads read at once); an eStargz layer's are fetched lazily
(unionfs/estargz/lazy.py). The content reader only dispatches by the entry's layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

from registry.source import FileWindow
from unionfs.entry import Entry


class LayerReader(Protocol):
    """Reads the bytes of regular-file entries of one layer."""

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Returns bytes [offset, offset + size) of `entry`, a span that lies within it."""
        ...


class TarReader:
    """Reads entries out of a layer's uncompressed tar on local disk."""

    def __init__(self, tar: FileWindow) -> None:
        self._tar = tar
        self._fd = os.open(tar.path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, self._tar.offset + entry.offset + offset)
        if len(data) != size:
            raise OSError(f"layer tar {self._tar.path} is shorter than its index says")
        return data

    def span(self, entry: Entry, offset: int, size: int) -> tuple[int, int, int]:
        """Where bytes [offset, offset + size) of `entry` are: (fd, position, size), for a
        reply that sends them straight from the file. The file is checked to still hold them:
        a tar cut short under the mount must read as an error, not as a short file."""
        position = self._tar.offset + entry.offset + offset
        if os.fstat(self._fd).st_size < position + size:
            raise OSError(f"layer tar {self._tar.path} is shorter than its index says")
        return self._fd, position, size

    def close(self) -> None:
        os.close(self._fd)


class ContentReader:
    """Reads any entry of the merged tree through its layer's reader."""

    def __init__(self, layers: Sequence[LayerReader]) -> None:
        self._layers = list(layers)

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Returns up to `size` bytes of `entry` from `offset`; b'' at or past its end."""
        size = _within(entry, offset, size)
        return self._layers[entry.layer].read(entry, offset, size) if size else b""

    def read_then(self, entry: Entry, offset: int, size: int, reply: Callable[[bytes], None],
                  fail: Callable[[BaseException], None]) -> None:  # fmt: skip
        """Answers up to `size` bytes of `entry` from `offset` through `reply` (or an error
        through `fail`): at once, or later from another thread for a layer that must fetch
        them (a lazy layer's read_then), so that the caller does not wait on the network."""
        size = _within(entry, offset, size)
        layer = self._layers[entry.layer]
        read_then = getattr(layer, "read_then", None) if size else None
        if read_then is not None:
            read_then(entry, offset, size, reply, fail)
        else:
            reply(layer.read(entry, offset, size) if size else b"")

    def span(self, entry: Entry, offset: int, size: int) -> tuple[int, int, int] | None:
        """(fd, position, size) of up to `size` bytes of `entry` from `offset` where they lie
        in a local file (see TarReader.span); None where they must be read (lazy layers) or
        there is nothing to read."""
        layer = self._layers[entry.layer]
        size = _within(entry, offset, size)
        return layer.span(entry, offset, size) if size and isinstance(layer, TarReader) else None

    def close(self) -> None:
        for layer in self._layers:
            if isinstance(layer, TarReader):
                layer.close()


def _within(entry: Entry, offset: int, size: int) -> int:
    """How many of `size` bytes from `offset` lie within `entry` (0 at or past its end)."""
    return max(0, min(size, entry.size - offset))
