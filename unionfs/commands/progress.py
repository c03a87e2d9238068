"""One progress line on a terminal, shared by pulls, exports and conversions; nothing at all
when stderr is a pipe or a file (a log must not fill with carriage returns)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, TextIO

Progress = Callable[[int], None]  # called with each count of bytes done
SHOW_EVERY_SECONDS = 0.2


def terminal_progress(stream: TextIO, doing: str) -> Callable[[int], Progress] | None:
    """Returns a factory of progress lines ('crfs-merge: DOING done / total MB') for a
    terminal, given the total byte count; None when nobody is watching `stream`."""
    if not stream.isatty():
        return None

    def start(total: int) -> Progress:
        done, shown = 0, 0.0

        def advance(count: int) -> None:
            nonlocal done, shown
            done += count
            if time.monotonic() - shown > SHOW_EVERY_SECONDS or done >= total:
                shown = time.monotonic()
                end = "\n" if done >= total else ""
                stream.write(f"\rcrfs-merge: {doing} {done / 1e6:8.1f} / {total / 1e6:.1f} MB{end}")
                stream.flush()

        return advance

    return start


class WatchedReader:
    """A seekable binary reader that reports how far into its `size` bytes reading has got
    (the furthest point read, so a seek back is not counted twice)."""

    def __init__(self, reader: IO[bytes], size: int, progress: Progress) -> None:
        self._reader, self._size, self._progress = reader, size, progress
        self._reported = 0

    def read(self, size: int = -1) -> bytes:
        data = self._reader.read(size)
        self._report(self._reader.tell())
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._reader.seek(offset, whence)

    def tell(self) -> int:
        return self._reader.tell()

    def finish(self) -> None:
        """Reports the rest as done: what was skipped (end-of-archive blocks) was not needed."""
        self._report(self._size)

    def _report(self, position: int) -> None:
        position = min(position, self._size)
        if position > self._reported:
            self._progress(position - self._reported)
            self._reported = position
