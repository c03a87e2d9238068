"""Files of the cache written whole or not at all, and the sweep of those a dead writer left.

Every file of the cache is written under a temporary name, `.partial-...`, beside its final
name and renamed into place once complete. The writer holds an exclusive flock on the
temporary file for its whole life, so a temporary file whose lock can be taken belongs to a
writer that is gone (killed, crashed, out of disk): `sweep_partials` removes those. The one
kind kept is a resumable download (`resumable_partial`), which the next fetch of the same
blob continues instead of starting over.

A full disk while writing raises `NoSpaceError`, whose message names the file and what
needed the space; the temporary file is removed first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

PARTIAL_PREFIX = ".partial-"
RESUMABLE_PREFIX = PARTIAL_PREFIX + "resume-"
# A writer creates its temporary file, then locks it: a sweep leaves alone any unlocked one
# younger than this, so that it never takes the file of a writer between those two calls.
SWEEP_GRACE_SECONDS = 5.0
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)
_serial = itertools.count()


class NoSpaceError(OSError):
    """A cache file could not be written for lack of space: names the file and its purpose."""

    def __init__(self, path: Path | str, purpose: str, code: int = errno.ENOSPC) -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.purpose = purpose

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror} ({self.purpose})"


def is_partial(name: str) -> bool:
    """True for the name of a temporary cache file (finished files never start so)."""
    return name.startswith(PARTIAL_PREFIX)


def is_resumable(name: str) -> bool:
    """True for the name of a download that a later fetch of the same blob continues."""
    return name.startswith(RESUMABLE_PREFIX)


def resumable_partial(final: Path) -> Path:
    """Returns the stable temporary name of a download of `final` (the same on every try)."""
    return final.with_name(RESUMABLE_PREFIX + final.name)


def lock_partial(fd: int) -> None:
    """Marks a temporary file as having a live writer (held until `fd` is closed)."""
    fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def space_errors_named(path: Path | str, purpose: str) -> Iterator[None]:
    """Turns a full disk (ENOSPC, EDQUOT) inside the block into a NoSpaceError naming `path`."""
    try:
        yield
    except NoSpaceError:
        raise
    except OSError as exc:
        if exc.errno in SPACE_ERRORS:
            raise NoSpaceError(path, purpose, exc.errno) from None
        raise


def _create_locked(directory: str) -> tuple[int, str]:
    """Creates and locks a new temporary file in `directory`; returns (fd, path). The name
    is unique without mkstemp's random choice (it shows in profiles of many small writes)."""
    while True:
        temp = f"{directory}/{PARTIAL_PREFIX}{os.getpid()}-{threading.get_ident()}-{next(_serial)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue  # left by a dead process that had our pid: a sweep removes it
        lock_partial(fd)
        return fd, temp


@contextlib.contextmanager
def atomic_file(final: Path, purpose: str, text: bool = False) -> Iterator[IO[Any]]:
    """Yields a file to write `final` through (a text one with `text`): it appears under its
    name only complete, when the block ends without error; otherwise nothing is left."""
    with space_errors_named(final, purpose):
        fd, temp = _create_locked(str(final.parent))
        raw = os.fdopen(fd, "wb")  # owns `fd`, and so the lock, until closed after the rename
        out = io.TextIOWrapper(raw, encoding="utf-8") if text else raw
        try:
            with out:
                yield out
                out.flush()
                os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


def write_atomically(final: Path | str, data: bytes | Sequence[bytes | memoryview], purpose: str) -> None:
    """Writes `data` (bytes, or pieces of bytes written one after the other) as file
    `final`, whole or not at all (for many small files: no Python file object, no context
    manager, one buffer)."""
    fd, temp = -1, ""
    try:
        fd, temp = _create_locked(os.path.dirname(final))
        for piece in [data] if isinstance(data, bytes) else data:
            if os.write(fd, piece) != len(piece):  # pieces are bytes, or views cast to bytes
                raise OSError(errno.ENOSPC, "short write")
        os.replace(temp, final)
        os.close(fd)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if isinstance(exc, OSError) and exc.errno in SPACE_ERRORS:
            raise NoSpaceError(final, purpose, exc.errno) from None
        raise


def has_live_writer(path: Path | str) -> bool:
    """True if the temporary file `path` is locked by the process writing it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_if_abandoned(path: Path | str, grace: float = SWEEP_GRACE_SECONDS) -> bool:
    """Removes the temporary file `path` if its writer is gone (its lock can be taken and
    it is older than `grace` seconds); returns whether it did. The lock is held while the
    name is removed, so a writer that opens the file meanwhile finds it gone once it locks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_mtime > time.time() - grace:
            return False
        os.unlink(path)
        return True
    except OSError:  # in use (the lock is held), gone already, or not ours to remove
        return False
    finally:
        os.close(fd)


def sweep_partials(directory: Path, keep: Callable[[str], bool] = is_resumable) -> list[tuple[str, int]]:
    """Removes the abandoned temporary files of `directory` (not those `keep` names);
    returns the (name, size) of each removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not is_partial(entry.name) or keep(entry.name):
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        if remove_if_abandoned(entry.path):
            removed.append((entry.name, size))
    return removed
