"""Read file bytes out of the layers' uncompressed tars with pread: no seek state, so any
number of FUSE worker threads can read at once."""

from __future__ import annotations

import os
from collections.abc import Sequence

from registry.source import FileWindow
from unionfs.entry import Entry


class ContentReader:
    """Reads the bytes of regular-file entries; one descriptor per layer tar."""

    def __init__(self, tars: Sequence[FileWindow]) -> None:
        self._tars = list(tars)
        self._fds = [os.open(t.path, os.O_RDONLY | os.O_CLOEXEC) for t in self._tars]

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Returns up to `size` bytes of `entry` from `offset`; b'' at or past its end."""
        size = max(0, min(size, entry.size - offset))
        if size == 0:
            return b""
        tar = self._tars[entry.layer]
        data = os.pread(self._fds[entry.layer], size, tar.offset + entry.offset + offset)
        if len(data) != size:
            raise OSError(f"layer {entry.layer} tar {tar.path} is shorter than its index says")
        return data

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
