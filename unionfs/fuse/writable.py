"""FUSE operations of a writable mount (`--upper DIR`): unionfs/upper/overlay.py decides, this
module speaks the kernel's protocol.

What the kernel may keep: every change goes through this mount, so the kernel's own caches of
names, attributes and pages stay true (it updates them itself after each change it sends) and
are kept as long as on the read-only mount. File data moves between the kernel and the upper
files without passing through Python: reads are answered with a range of a file descriptor,
writes copied into one by libfuse (spliced where it can).

Errors are the errno the operation met, as the kernel's own file systems give them (EXDEV for
a rename of a lower directory: see overlay.py). A fault reading the image's bytes is EIO with one
log line; a bug is EIO with its traceback in the log.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from unionfs.fuse import lowlevel
from unionfs.fuse.ops import BLOCK_SIZE, CACHE_SECONDS, NAME_MAX, replies_on_error
from unionfs.upper.overlay import KEEP_TIME, Node, WritableTree, fail

log = logging.getLogger("crfs-merge")
F = TypeVar("F", bound=Callable[..., None])
MOUNT_OPTIONS = ["default_permissions", "fsname=crfs-merge", "subtype=crfs-merge"]
_OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
_WRITE_OUT = struct.Struct("<II")  # size, padding
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
MAX_WRITE = 1 << 20  # the most libfuse's buffer takes (256 pages): fewer, larger WRITEs
# FUSE_SET_ATTR_* of fuse_lowlevel.h
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
SET_ATIME_NOW, SET_MTIME_NOW = 128, 256
_WRITE_ACCESS = os.O_WRONLY | os.O_RDWR


def _answers_errno(method: F) -> F:
    """The operation's OSError errno as the reply (see replies_on_error), and afterwards, the
    kernel told of what the operation changed behind its back."""
    replying = replies_on_error(errno_of_os_errors=True)(method)

    @functools.wraps(method)
    def wrapper(self: Any, req: int, *args: Any) -> None:
        replying(self, req, *args)
        if self._tree.changed_behind_the_kernel:
            self._tell_the_kernel()

    return wrapper  # type: ignore[return-value]


@dataclass(eq=False)
class _Handle:
    node: Node
    fd: int | None  # None: a lower file read from the image
    listing: list[tuple[bytes, int, int]] | None = None


class WritableFilesystem:
    """Serves a WritableTree; calls `on_ready` once the kernel has the mount."""

    def __init__(self, tree: WritableTree, on_ready: Callable[[], None] = lambda: None,
                 on_destroy: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self._tree = tree
        self._lock = tree.lock
        self._on_ready, self._on_destroy = on_ready, on_destroy
        self._handles: dict[int, _Handle] = {}
        self.forget_attributes: Callable[[int], None] = lambda ino: None  # set once the session exists
        self._next_handle = 1
        self._handle_lock = threading.Lock()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        """The operations libfuse calls. FLUSH is left out on purpose: it has nothing to do
        here (data reach the upper file by WRITE; the kernel writes back and reports write-back
        errors on close before it would send FLUSH), and libfuse's ENOSYS tells the kernel to
        stop sending one on every close."""
        names = ["init", "destroy", "lookup", "forget", "forget_multi", "getattr", "setattr", "readlink", "mknod",
                 "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "open", "read", "write_buf",
                 "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr",
                 "getxattr", "listxattr", "removexattr", "create", "fallocate"]  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def init(self, userdata: int, conn: Any) -> None:
        info = conn.contents
        # No writeback cache: with it the kernel keeps regular files' mtimes itself and sends
        # them back only at times (a file made and written just before an unmount kept the
        # server's time; a truncate to the same size kept the old one), where overlayfs shows
        # the upper file's. Small writes pay for it: each write(2) is a WRITE of its own.
        info.want |= info.capable & (lowlevel.FUSE_CAP_SPLICE_WRITE | FUSE_CAP_ATOMIC_O_TRUNC)
        info.max_write = MAX_WRITE
        self._on_ready()

    def destroy(self, userdata: int) -> None:
        self._on_destroy()

    def _tell_the_kernel(self) -> None:
        with self._lock:
            changed, self._tree.changed_behind_the_kernel = self._tree.changed_behind_the_kernel, []
        for ino in changed:
            self.forget_attributes(ino)

    # ------------------------------------------------------------ replies

    def _reply_entry(self, req: int, node: Node) -> None:
        """Answers with a node the kernel then holds until it FORGETs it (under the lock)."""
        node.lookups += 1
        record = lowlevel.entry_record(self._tree.attributes(node), CACHE_SECONDS)
        lowlevel.reply_buf(req, record, len(record))

    def _reply_attributes(self, req: int, node: Node) -> None:
        record = lowlevel.attr_record(self._tree.attributes(node), CACHE_SECONDS)
        lowlevel.reply_buf(req, record, len(record))

    def _new_handle(self, handle: _Handle) -> int:
        with self._handle_lock:
            number, self._next_handle = self._next_handle, self._next_handle + 1
            self._handles[number] = handle
        return number

    def _handle(self, fi: Any) -> _Handle:
        return self._handles[fi.contents.fh]

    # ------------------------------------------------------------ names

    @_answers_errno
    def lookup(self, req: int, parent: int, name: bytes) -> None:
        with self._lock:
            try:
                node = self._tree.lookup(self._tree.node(parent), name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                record = lowlevel.entry_record(None, CACHE_SECONDS)
                lowlevel.reply_buf(req, record, len(record))
                return
            self._reply_entry(req, node)

    def forget(self, req: int, ino: int, count: int) -> None:
        with self._lock:
            self._tree.forget(ino, count)
        lowlevel.reply_none(req)

    def forget_multi(self, req: int, count: int, forgets: int) -> None:
        pairs = ctypes.cast(forgets, ctypes.POINTER(ctypes.c_uint64 * (2 * count))).contents  # fuse_forget_data
        with self._lock:
            for index in range(count):
                self._tree.forget(pairs[2 * index], pairs[2 * index + 1])
        lowlevel.reply_none(req)

    @_answers_errno
    def getattr(self, req: int, ino: int, fi: int) -> None:
        with self._lock:
            self._reply_attributes(req, self._tree.node(ino))

    @_answers_errno
    def readlink(self, req: int, ino: int) -> None:
        with self._lock:
            target = self._tree.link_target(self._tree.node(ino))
        lowlevel.reply_readlink(req, target)

    @_answers_errno
    def mknod(self, req: int, parent: int, name: bytes, mode: int, rdev: int) -> None:
        owner = lowlevel.request_owner(req)
        with self._lock:
            self._reply_entry(req, self._tree.mknod(self._tree.node(parent), name, mode, rdev, owner))

    @_answers_errno
    def mkdir(self, req: int, parent: int, name: bytes, mode: int) -> None:
        owner = lowlevel.request_owner(req)
        with self._lock:
            self._reply_entry(req, self._tree.mkdir(self._tree.node(parent), name, mode, owner))

    @_answers_errno
    def symlink(self, req: int, target: bytes, parent: int, name: bytes) -> None:
        owner = lowlevel.request_owner(req)
        with self._lock:
            self._reply_entry(req, self._tree.symlink(self._tree.node(parent), name, target, owner))

    @_answers_errno
    def link(self, req: int, ino: int, new_parent: int, new_name: bytes) -> None:
        with self._lock:
            node = self._tree.link(self._tree.node(ino), self._tree.node(new_parent), new_name)
            self._reply_entry(req, node)

    @_answers_errno
    def unlink(self, req: int, parent: int, name: bytes) -> None:
        with self._lock:
            self._tree.unlink(self._tree.node(parent), name)
        lowlevel.reply_err(req, 0)

    @_answers_errno
    def rmdir(self, req: int, parent: int, name: bytes) -> None:
        with self._lock:
            self._tree.rmdir(self._tree.node(parent), name)
        lowlevel.reply_err(req, 0)

    @_answers_errno
    def rename(self, req: int, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        with self._lock:
            tree = self._tree
            tree.rename(tree.node(parent), name, tree.node(new_parent), new_name, flags)
        lowlevel.reply_err(req, 0)

    # ------------------------------------------------------------ metadata

    @_answers_errno
    def setattr(self, req: int, ino: int, attr: Any, to_set: int, fi: Any) -> None:
        values = attr.contents
        fd = self._handle(fi).fd if fi else None
        times = None
        if to_set & (SET_ATIME | SET_MTIME):
            times = (_time(values.st_atimespec, to_set & SET_ATIME, to_set & SET_ATIME_NOW),
                     _time(values.st_mtimespec, to_set & SET_MTIME, to_set & SET_MTIME_NOW))  # fmt: skip
        with self._lock:
            node = self._tree.node(ino)
            self._tree.set_attributes(
                node,
                mode=values.st_mode if to_set & SET_MODE else None,
                uid=values.st_uid if to_set & SET_UID else None,
                gid=values.st_gid if to_set & SET_GID else None,
                size=values.st_size if to_set & SET_SIZE else None,
                times=times,
                fd=fd,
            )
            self._reply_attributes(req, node)

    @_answers_errno
    def getxattr(self, req: int, ino: int, name: bytes, size: int) -> None:
        with self._lock:
            value = self._tree.xattr(self._tree.node(ino), os.fsdecode(name))
        if value is None:
            lowlevel.reply_err(req, errno.ENODATA)
        else:
            lowlevel.reply_sized(req, value, size)

    @_answers_errno
    def listxattr(self, req: int, ino: int, size: int) -> None:
        with self._lock:
            names = b"".join(os.fsencode(n) + b"\0" for n in self._tree.xattrs(self._tree.node(ino)))
        lowlevel.reply_sized(req, names, size)

    @_answers_errno
    def setxattr(self, req: int, ino: int, name: bytes, value: int, size: int, flags: int) -> None:
        data = ctypes.string_at(value, size) if size else b""
        with self._lock:
            self._tree.set_xattr(self._tree.node(ino), os.fsdecode(name), data, flags)
        lowlevel.reply_err(req, 0)

    @_answers_errno
    def removexattr(self, req: int, ino: int, name: bytes) -> None:
        with self._lock:
            self._tree.remove_xattr(self._tree.node(ino), os.fsdecode(name))
        lowlevel.reply_err(req, 0)

    @_answers_errno
    def statfs(self, req: int, ino: int) -> None:
        disk = os.statvfs(self._tree.store.root)
        lowlevel.reply_statfs(req, f_bsize=disk.f_bsize or BLOCK_SIZE, f_frsize=disk.f_frsize or BLOCK_SIZE,
                              f_blocks=disk.f_blocks, f_bfree=disk.f_bfree, f_bavail=disk.f_bavail,
                              f_files=disk.f_files, f_ffree=disk.f_ffree, f_favail=disk.f_favail,
                              f_namemax=NAME_MAX)  # fmt: skip

    # ------------------------------------------------------------ files

    @_answers_errno
    def create(self, req: int, parent: int, name: bytes, mode: int, fi: Any) -> None:
        owner = lowlevel.request_owner(req)
        with self._lock:
            node, fd = self._tree.create(self._tree.node(parent), name, mode, owner, fi.contents.flags)
            self._tree.opened(node)
            node.lookups += 1
            attributes = self._tree.attributes(node)
        number = self._new_handle(_Handle(node, fd))
        record = lowlevel.entry_record(attributes, CACHE_SECONDS) + _OPEN_OUT.pack(number, FOPEN_KEEP_CACHE, 0)
        lowlevel.reply_buf(req, record, len(record))

    @_answers_errno
    def open(self, req: int, ino: int, fi: Any) -> None:
        flags = fi.contents.flags
        with self._lock:
            node = self._tree.node(ino)
            if stat.S_ISDIR(node.kind):
                raise fail(errno.EISDIR)
            fd = self._open_fd(node, flags)
            self._tree.opened(node)
        record = _OPEN_OUT.pack(self._new_handle(_Handle(node, fd)), FOPEN_KEEP_CACHE, 0)
        lowlevel.reply_buf(req, record, len(record))

    def _open_fd(self, node: Node, flags: int) -> int | None:
        if flags & _WRITE_ACCESS or flags & os.O_TRUNC:
            return self._tree.open_upper(node, flags)
        if node.in_upper and not node.metacopy:
            return self._tree.open_upper(node, 0)
        return None  # read from the image (also a metadata-only copy's bytes)

    @_answers_errno
    def read(self, req: int, ino: int, size: int, offset: int, fi: Any) -> None:
        handle = self._handle(fi)
        if handle.fd is None and handle.node.in_upper and not handle.node.metacopy:
            with self._lock:  # copied up since it was opened: read the copy
                if handle.fd is None:
                    handle.fd = self._tree.open_upper(handle.node, 0)
        if handle.fd is not None:
            lowlevel.reply_file_range(req, handle.fd, offset, size)
            return
        found = self._tree.read_lower(handle.node, offset, size)
        if isinstance(found, tuple):
            lowlevel.reply_file_range(req, *found)
        else:
            lowlevel.reply_buf(req, found, len(found))

    @_answers_errno
    def write_buf(self, req: int, ino: int, source: Any, offset: int, fi: Any) -> None:
        fd = self._handle(fi).fd
        if fd is None:
            raise fail(errno.EBADF)
        written = lowlevel.write_into(fd, offset, source)
        if written < 0:
            raise fail(-written)
        record = _WRITE_OUT.pack(written, 0)
        lowlevel.reply_buf(req, record, len(record))

    @_answers_errno
    def release(self, req: int, ino: int, fi: Any) -> None:
        with self._handle_lock:
            handle = self._handles.pop(fi.contents.fh)
        if handle.fd is not None:
            os.close(handle.fd)
        with self._lock:
            self._tree.closed(handle.node)
        lowlevel.reply_err(req, 0)

    @_answers_errno
    def fsync(self, req: int, ino: int, datasync: int, fi: Any) -> None:
        fd = self._handle(fi).fd
        if fd is not None:
            os.fdatasync(fd) if datasync else os.fsync(fd)
            self._sync_names(self._handle(fi).node)
        lowlevel.reply_err(req, 0)

    def _sync_names(self, node: Node) -> None:
        """Makes the name of a file durable too: a copy-up or a create is a new name in its
        directory, which fsync of the file alone does not promise to keep."""
        with self._lock:
            if not node.names:
                return
            parent = node.names[0][0]
            relative = self._tree.path(parent)
        self._tree.store.sync_directory(relative)

    @_answers_errno
    def fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: Any) -> None:
        fd = self._handle(fi).fd
        if fd is None:
            raise fail(errno.EBADF)
        if _libc().fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
            raise fail(ctypes.get_errno())
        lowlevel.reply_err(req, 0)

    # ------------------------------------------------------------ directories

    @_answers_errno
    def opendir(self, req: int, ino: int, fi: Any) -> None:
        with self._lock:
            if not stat.S_ISDIR(self._tree.node(ino).kind):
                raise fail(errno.ENOTDIR)
            node = self._tree.node(ino)
        # The kernel may keep the listing across opens (FOPEN_CACHE_DIR): every change to a
        # directory goes through it, and it drops its copy then; a copy-up changes no listing.
        # The listing itself is made on the first READDIR, so an open served from that cache
        # costs nothing here.
        record = _OPEN_OUT.pack(self._new_handle(_Handle(node, None)), FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, 0)
        lowlevel.reply_buf(req, record, len(record))

    @_answers_errno
    def readdir(self, req: int, ino: int, size: int, offset: int, fi: Any) -> None:
        handle = self._handle(fi)
        if handle.listing is None or offset == 0:
            with self._lock:
                node = handle.node
                parent = node.names[0][0].ino if node.names else node.ino
                handle.listing = [(b".", node.ino, stat.S_IFDIR), (b"..", parent, stat.S_IFDIR),
                                  *self._tree.listing(node)]  # fmt: skip
        items = ((name, number, kind, None) for name, number, kind in handle.listing[offset:])
        buffer = lowlevel.listing_buffer(items, offset, size, False, CACHE_SECONDS)
        lowlevel.reply_buf(req, buffer, len(buffer))

    @_answers_errno
    def releasedir(self, req: int, ino: int, fi: Any) -> None:
        with self._handle_lock:
            self._handles.pop(fi.contents.fh, None)
        lowlevel.reply_err(req, 0)

    @_answers_errno
    def fsyncdir(self, req: int, ino: int, datasync: int, fi: Any) -> None:
        with self._lock:
            node = self._tree.node(ino)
            relative = self._tree.path(node) if node.in_upper else None
        if relative is not None:
            self._tree.store.sync_directory(relative)
        lowlevel.reply_err(req, 0)


def _time(spec: Any, given: int, now: int) -> int | None:
    """A time of SETATTR in nanoseconds; None for "now"; KEEP_TIME where it is not given."""
    if now:
        return None
    if not given:
        return KEEP_TIME
    return int(spec.tv_sec) * 1_000_000_000 + int(spec.tv_nsec)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc


def mount_options(options: dict[str, str | bool]) -> list[str]:
    extra = [key if value is True else f"{key}={value}" for key, value in options.items() if value is not False]
    return MOUNT_OPTIONS + extra


def mount(tree: WritableTree, mountpoint: str, options: dict[str, str | bool], on_ready: Callable[[], None],
          on_destroy: Callable[[], None], threads: int) -> None:  # fmt: skip
    """Serves `tree` read-write at `mountpoint` until unmounted or signalled."""
    from unionfs.commands.usage import UsageError

    filesystem = WritableFilesystem(tree, on_ready, on_destroy)
    try:
        session = lowlevel.Session(filesystem.callbacks(), mount_options(options))
    except lowlevel.SessionError as exc:
        raise UsageError(f"{mountpoint}: FUSE mount failed: {exc} (see the libfuse message above)") from None
    filesystem.forget_attributes = session.forget_attributes
    try:
        session.serve(mountpoint, threads)
    except lowlevel.SessionError as exc:
        raise UsageError(f"{exc} (the line above says why)") from None
    finally:
        session.close()
