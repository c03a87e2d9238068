"""One crfs-merge server per mountpoint, and a clear word about a mountpoint that cannot be used.

Two commands started at once onto one directory would both pass the "already mounted?" check
and stack two mounts. So the command takes an flock on a lock file named after the
mountpoint's real path before it checks, and its server holds that lock for the life of its
mount (the descriptor is inherited across fork or passed to the spawned server): a second
command finds the lock taken and names the pid written in the file. The lock files live in
$XDG_STATE_HOME/crfs-merge/mounts/ (~/.local/state/crfs-merge/mounts/), one small file per
mountpoint ever used; the kernel drops the lock when the server exits, however it exits.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import time
from pathlib import Path

from unionfs.commands.server_log import default_log_path

log = logging.getLogger("crfs-merge")

CRFS_MERGE_TYPE = "fuse.crfs-merge"  # our mounts in /proc/self/mountinfo (subtype=crfs-merge)


class MountpointError(Exception):
    """The mountpoint cannot be used now; the message says why and what to do."""


def lock_dir() -> Path:
    """Returns the directory of the mountpoint lock files, next to the default log."""
    return default_log_path().parent / "mounts"


def check_directory(mountpoint: str) -> None:
    """Raises MountpointError unless `mountpoint` is a directory (or a dead FUSE mount, named
    as such, with how to clear it)."""
    try:
        info = os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountpointError(_dead_mount_message(mountpoint)) from None
        raise MountpointError(f"{mountpoint}: mountpoint is not an existing directory") from None
    if not stat.S_ISDIR(info.st_mode):
        raise MountpointError(f"{mountpoint}: mountpoint is not an existing directory")


def check_mountpoint(mountpoint: str) -> None:
    """Raises MountpointError unless `mountpoint` is a directory with nothing mounted on it,
    telling a dead crfs-merge mount (its server killed) from a live mount."""
    check_directory(mountpoint)
    if not os.path.ismount(mountpoint):
        return
    # The kernel answers stat from attributes it keeps for a day, even once the server is
    # gone; statfs always asks the server. Only ours is asked: another FUSE server might hang.
    if mount_type(os.path.realpath(mountpoint)) == CRFS_MERGE_TYPE and _disconnected(mountpoint):
        raise MountpointError(_dead_mount_message(mountpoint))
    raise MountpointError(f"{mountpoint}: something is already mounted there")


def _disconnected(mountpoint: str) -> bool:
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _dead_mount_message(mountpoint: str) -> str:
    kind = mount_type(os.path.realpath(mountpoint))
    owner = "the crfs-merge server" if kind == CRFS_MERGE_TYPE else f"the server of this {kind or 'FUSE'} mount"
    return (f"{mountpoint}: {owner} for this directory is gone (transport endpoint is not connected); "
            f"`fusermount3 -u {mountpoint}` clears it")  # fmt: skip


def mount_type(path: str) -> str | None:
    """Returns the file system type (`fuse.crfs-merge`, ...) of the last mount at `path`."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == path and "-" in fields:
                    found = fields[fields.index("-") + 1]
    except OSError:
        return None
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field


def lock_mountpoint(mountpoint: str) -> int | None:
    """Returns a descriptor holding the mountpoint's lock (close-on-exec; it goes to the
    server by fork or pass_fds), or raises MountpointError naming the server that holds it.
    Where no lock file can be written (a read-only home), warns and returns None: the mount
    then goes ahead with the "already mounted" check alone."""
    real = os.path.realpath(mountpoint)
    path = lock_dir() / (hashlib.sha256(os.fsencode(real)).hexdigest()[:32] + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("%s: cannot lock (%s); not guarded against a second mount at once", path, exc.strerror)
        return None
    try:
        if not flock_within(fd, EXIT_GRACE_SECONDS):
            holder = os.pread(fd, 64, 0).split()
            pid = holder[0].decode(errors="replace") if holder else "?"
            raise MountpointError(f"{mountpoint}: crfs-merge server {pid} is already mounting or serving it")
    except BaseException:
        os.close(fd)
        raise
    record_owner(fd, os.getpid())
    return fd


EXIT_GRACE_SECONDS = 2.0


def flock_within(fd: int, seconds: float) -> bool:
    """Takes an exclusive flock on `fd`, waiting up to `seconds` for its holder to let go.
    Right after `fusermount3 -u` the old server still holds its locks for the moment it
    takes to exit, and a script that mounts again at once must not be refused for that."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def record_owner(fd: int, pid: int) -> None:
    """Writes `pid` as the holder of the lock `fd`, for the message a second command gives."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
