"""Where crfs-merge logs: the terminal while the command runs, and a log file for the
background server, whose terminal is gone once the mount is ready.

The log file is shared by every server of a user (one line per record, each naming its server's
pid and mountpoint). It is kept small without a rotation daemon: a record that finds the file
at MAX_LOG_BYTES or more first renames it to `NAME.1` (replacing the previous one), so the log
takes at most about twice that. Each record opens the file anew, so several servers, and a
rename by any of them, never leave one writing into a file nobody reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

LOG_NAME = "crfs-merge"
MAX_LOG_BYTES = 1 << 20
log = logging.getLogger(LOG_NAME)


def default_log_path() -> Path:
    """Returns $XDG_STATE_HOME/crfs-merge/crfs-merge.log, or under ~/.local/state."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "crfs-merge" / "crfs-merge.log"


def configure_terminal(verbose: bool) -> None:
    """Sends our records to stderr: every step with `verbose`, else warnings and errors.
    Other libraries' (asyncio, mfusepy) stay at warnings."""
    logging.basicConfig(format="crfs-merge: %(message)s", level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # INFO at least, for the log file; the terminal's handler filters what it shows.
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


class BoundedFileHandler(logging.Handler):
    """Appends each record to `path` as one line, moving a full file to `path.1` first."""

    def __init__(self, path: Path, mountpoint: str, max_bytes: int = MAX_LOG_BYTES) -> None:
        super().__init__(logging.DEBUG)
        self.path, self._max_bytes = path, max_bytes
        fields = f"%(asctime)s crfs-merge[%(process)d] {mountpoint}: %(levelname)s %(message)s"
        self.setFormatter(logging.Formatter(fields, "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record).replace("\n", "\n    ") + "\n").encode(errors="replace")
            fd = open_log(self.path, self._max_bytes)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except Exception:  # a log that cannot be written must not break a read
            self.handleError(record)


def open_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> int:
    """Returns a descriptor appending to `path` (and its directory created), after moving
    the file to `path.1` if it has reached `max_bytes`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size < max_bytes:
        return fd
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # another server moved it first
        os.replace(path, path.with_name(path.name + ".1"))
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def attach_log_file(path: Path, mountpoint: str) -> BoundedFileHandler:
    """Adds `path` as a destination of our records (INFO and up, DEBUG with -v) and of other
    libraries' warnings (asyncio's, say); returns the handler."""
    handler = BoundedFileHandler(path, mountpoint)
    logging.getLogger().addHandler(handler)
    return handler


def leave_the_terminal(path: Path | None) -> None:
    """Once the caller has returned: points stderr (libfuse's messages, anything Python prints)
    at the log file (or /dev/null) and stops copying our records to the terminal, which may
    be gone."""
    fd = os.open(os.devnull, os.O_WRONLY) if path is None else open_log(path)
    os.dup2(fd, 2)
    os.close(fd)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, BoundedFileHandler):
            handler.setLevel(logging.CRITICAL + 1)
