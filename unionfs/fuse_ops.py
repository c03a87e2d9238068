"""FUSE operations over a frozen merged tree. The only module that imports mfusepy.

Caveats (what this filesystem does not do, and why):
- It is read-only: the mount is made with `ro`, so the kernel answers EROFS to writes,
  and none of the writing operations are registered with libfuse.
- Permissions are the kernel's business (`default_permissions`): the owner and mode of
  each file come from the image, so a file the container keeps private stays private.
- atime and ctime are reported as the image's mtime: the image records nothing else.
- Paths are served through libfuse's high-level API; inode numbers are the tree's own
  (`use_ino`), stable from one mount of the same image to the next.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import posixpath
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

from registry.errors import ImageError
from unionfs.build import MountedImage
from unionfs.tree import Inode

log = logging.getLogger("crfs-merge")
F = TypeVar("F", bound=Callable[..., Any])
BLOCK_SIZE = 4096
NAME_MAX = 255
# The tree never changes while mounted, so the kernel may cache names and attributes
# for as long as it likes; a day is "forever" for a debugging mount.
CACHE_SECONDS = 86400
LAZY_WORKER_THREADS = 16
FUSE_CAP_READDIRPLUS = 1 << 13  # libfuse 3 fuse_common.h
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14


def _errors_to_errno(method: F) -> F:
    """Maps exceptions to errno: a missing path is ENOENT; a fault reading bytes is EIO
    with one log line. mfusepy would turn anything but OSError into EINVAL."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except KeyError:
            raise mfusepy.FuseOSError(errno.ENOENT) from None
        except mfusepy.FuseOSError:
            raise
        except (OSError, ImageError) as exc:
            log.error("%s%s: %s", method.__name__, args[1:2], exc)
            raise mfusepy.FuseOSError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class MergedOperations(mfusepy.Operations):  # type: ignore[misc]
    """Serves a MountedImage; calls `on_ready` once the kernel has the mount."""

    use_ns = True

    def __init__(self, image: MountedImage, on_ready: Callable[[], None] = lambda: None) -> None:
        self._image = image
        self._tree = image.tree
        self._content = image.content
        self._on_ready = on_ready

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        if conn_info is not None:
            # libfuse's high-level API answers READDIRPLUS by calling getattr for every entry
            # listed, on every listing: a warm `find` then costs a Python call per entry,
            # although the kernel already holds every attribute (attr_timeout). Plain READDIR
            # returns names and types, and lookups are made only for what is looked up.
            conn_info.want &= ~(FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO)
        self._on_ready()
        self._image.start_prefetch()

    def destroy(self, path: str) -> None:
        self._image.close()

    @_errors_to_errno
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return _attributes(self._tree.lookup(path))

    @_errors_to_errno
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # Each name carries its inode number: with use_ino, a bare name would reach the
        # kernel as d_ino 0, and glibc's readdir() drops such entries.
        directory = self._tree.lookup(path)
        if directory.children is None:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        parent = self._tree.lookup(posixpath.dirname(path))
        listing = [(".", directory), ("..", parent), *self._tree.listing(directory)]
        return [(name, {"st_ino": i.ino, "st_mode": i.entry.mode}, 0) for name, i in listing]

    @_errors_to_errno
    def readlink(self, path: str) -> str:
        entry = self._tree.lookup(path).entry
        if not stat.S_ISLNK(entry.mode):
            raise mfusepy.FuseOSError(errno.EINVAL)
        return entry.link

    @_errors_to_errno
    def open(self, path: str, flags: int) -> int:
        inode = self._tree.lookup(path)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise mfusepy.FuseOSError(errno.EROFS)
        return inode.ino

    @_errors_to_errno
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self._content.read(self._tree.lookup(path).entry, offset, size)

    @_errors_to_errno
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        try:
            return self._tree.lookup(path).entry.xattrs[name]
        except KeyError:
            raise mfusepy.FuseOSError(errno.ENODATA) from None

    @_errors_to_errno
    def listxattr(self, path: str) -> list[str]:
        return list(self._tree.lookup(path).entry.xattrs)

    def statfs(self, path: str) -> dict[str, int]:
        blocks = -(-self._tree.total_bytes // BLOCK_SIZE)
        return {
            "f_bsize": BLOCK_SIZE,
            "f_frsize": BLOCK_SIZE,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": self._tree.inode_count,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": NAME_MAX,
        }


def _attributes(inode: Inode) -> dict[str, int]:
    entry = inode.entry
    size = len(entry.link.encode("utf-8", "surrogateescape")) if stat.S_ISLNK(entry.mode) else entry.size
    return {
        "st_ino": inode.ino,
        "st_mode": entry.mode,
        "st_nlink": inode.nlink,
        "st_uid": entry.uid,
        "st_gid": entry.gid,
        "st_size": size,
        "st_blocks": -(-size // 512),
        "st_rdev": entry.rdev,
        "st_mtime": entry.mtime_ns,
        "st_atime": entry.mtime_ns,
        "st_ctime": entry.mtime_ns,
    }


def _worker_threads(image: MountedImage) -> int:
    """Returns how many libfuse worker threads to run. Python holds one lock for all of them,
    so past one per core they mostly contend: with 8 parallel readers on 2 cores, 2 threads
    ran 30 % faster than libfuse's default of 10. Lazy layers wait on the network instead, and
    a read waiting on a registry should not hold up the rest."""
    return LAZY_WORKER_THREADS if image.waits_on_network else max(2, os.cpu_count() or 2)


def mount(image: MountedImage, mountpoint: str, options: dict[str, str | bool], on_ready: Callable[[], None]) -> None:
    """Serves `image` at `mountpoint` in the foreground until unmounted or signalled."""
    fixed: dict[str, Any] = {
        "ro": True,
        "default_permissions": True,
        "use_ino": True,
        "kernel_cache": True,
        "entry_timeout": CACHE_SECONDS,
        "attr_timeout": CACHE_SECONDS,
        "negative_timeout": CACHE_SECONDS,
        "fsname": "crfs-merge",
        "subtype": "crfs-merge",
        "max_idle_threads": 8,  # libfuse 3.14 warns on every mount when this is left unset
        "max_threads": _worker_threads(image),
    }
    served = False

    def ready() -> None:
        nonlocal served
        served = True
        on_ready()

    try:
        mfusepy.FUSE(MergedOperations(image, ready), mountpoint, foreground=True, **(fixed | options))
    except RuntimeError:
        # libfuse's fuse_main reports a loop ended by SIGINT/SIGTERM as an error (8), after it
        # has unmounted. Only a failure before the mount was served is a real one.
        if not served:
            raise ImageError(f"{mountpoint}: FUSE mount failed (see the libfuse message above)") from None
