"""FUSE operations over a frozen merged tree, served by inode through libfuse's low-level API
(unionfs/fuse/lowlevel.py).

What the kernel is allowed to keep, and why it may: the tree never changes while mounted, so
names, missing names, attributes and symlink targets are valid for a day ("forever" for a
debugging mount); file pages and directory listings stay cached across opens. To get the last
two, OPEN and OPENDIR answer ENOSYS: the kernel then stops sending OPEN, OPENDIR, FLUSH and
RELEASE altogether and treats every file as opened with keep_cache and every directory with
cache_readdir (Linux 5.1 and later; an older kernel, which would take ENOSYS for an error, is
answered with those two flags instead, and still opens and releases). A `find` that has run
once then runs from the kernel's caches without a single request, and reading a small file
costs one READ. A large file is read in READs of about 1 MiB (the most libfuse can still
splice from the cached tar, lowlevel.read_size), where the kernel's readahead of 128 KiB would
ask eight times as often: the mount asks for that size in INIT (max_pages, from max_write) and,
as root, raises its readahead to four such READs once INIT is answered.

Caveats (what this filesystem does not do, and why):
- It is read-only: the mount is made with `ro`, so the kernel answers EROFS to writes,
  and none of the writing operations are registered with libfuse.
- Permissions are the kernel's business (`default_permissions`): the owner and mode of
  each file come from the image, so a file the container keeps private stays private.
- atime and ctime are reported as the image's mtime: the image records nothing else.
- Inode numbers are the tree's own, stable from one mount of the same image to the next;
  since no inode is ever dropped, FORGET needs no bookkeeping.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from registry.errors import ImageError
from unionfs.build import MountedImage
from unionfs.commands.usage import UsageError
from unionfs.fuse import lowlevel
from unionfs.fuse.lowlevel import Listed

log = logging.getLogger("crfs-merge")
F = TypeVar("F", bound=Callable[..., None])
BLOCK_SIZE = 4096
NAME_MAX = 255
CACHE_SECONDS = 86400
LAZY_WORKER_THREADS = 16
# For tests: serve as on a kernel that cannot skip OPEN and OPENDIR (Linux before 5.1).
OLD_KERNEL_VARIABLE = "CRFS_MERGE_AS_OLD_KERNEL"
MOUNT_OPTIONS = ["ro", "default_permissions", "fsname=crfs-merge", "subtype=crfs-merge"]
# Options of libfuse's high-level (path) API, which the low-level session refuses.
HIGH_LEVEL_OPTIONS = {"kernel_cache", "auto_cache", "noauto_cache", "direct_io", "use_ino", "readdir_ino",
                      "hard_remove", "entry_timeout", "negative_timeout", "attr_timeout", "ac_attr_timeout",
                      "uid", "gid", "umask", "noforget", "remember", "modules", "intr", "intr_signal"}  # fmt: skip
HIGH_LEVEL_HINT = "an option of libfuse's high-level API; crfs-merge sets caching and ownership itself (README: Design)"


class RepeatedFaults:
    """Says whether a fault is news: the first for a (request, inode) within `window` seconds
    is; its repeats are not. The kernel splits one read() into several requests and asks again
    for a page that failed (which then fails at once, as a fetch that just failed), so one
    failed read would otherwise log a line per request."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window, self._clock = window, clock
        self._last: dict[tuple[str, object], float] = {}
        self._lock = threading.Lock()

    def is_news(self, key: tuple[str, object]) -> bool:
        now = self._clock()
        with self._lock:
            news = now - self._last.get(key, -self._window) >= self._window
            self._last[key] = now  # a steady stream of failures stays one line
            if len(self._last) > 4096:  # forget old kinds rather than grow for ever
                self._last = {k: t for k, t in self._last.items() if now - t < self._window}
            return news


_faults = RepeatedFaults(window=5.0)


def replies_on_error(errno_of_os_errors: bool = False) -> Callable[[F], F]:
    """Every request must get exactly one reply, or the process that made it hangs: an
    exception before the reply becomes one. A missing inode or name is ENOENT; a fault reading
    the image's bytes is EIO with one log line (not one per repeat of the same fault); anything
    else is a bug, logged with its traceback. An OSError is EIO with its line too, unless
    `errno_of_os_errors` (the writable mount: its upper directory's errno is the answer)."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Any, req: int, *args: Any) -> None:
            try:
                method(self, req, *args)
            except KeyError:
                lowlevel.reply_err(req, errno.ENOENT)
            except OSError as exc:
                if errno_of_os_errors and exc.errno and exc.errno > 0:
                    lowlevel.reply_err(req, exc.errno)
                else:
                    _fault(req, method.__name__, args, exc)
            except ImageError as exc:
                _fault(req, method.__name__, args, exc)
            except BaseException:
                log.exception("%s%s", method.__name__, args[:1])
                lowlevel.reply_err(req, errno.EIO)

        return wrapper  # type: ignore[return-value]

    return decorate


def _fault(req: int, operation: str, args: tuple[Any, ...], exc: Exception) -> None:
    level = logging.ERROR if _faults.is_news((operation, args[:1])) else logging.DEBUG
    log.log(level, "%s%s: %s", operation, args[:1], exc)
    lowlevel.reply_err(req, errno.EIO)


_replies_on_error = replies_on_error()


def _reply_data(req: int, data: bytes) -> None:
    lowlevel.reply_buf(req, data, len(data))


def _read_failed(req: int, ino: int, exc: BaseException) -> None:
    """The answer to a read whose fetch failed (on the event loop): EIO and one log line, as
    replies_on_error gives a read that failed in its own thread."""
    if isinstance(exc, (OSError, ImageError)):
        _fault(req, "read", (ino,), exc)
    else:
        log.error("read(%d,): %s", ino, exc)
        lowlevel.reply_err(req, errno.EIO)


class MergedFilesystem:
    """Serves a MountedImage; calls `on_ready` once the kernel has the mount."""

    def __init__(self, image: MountedImage, on_ready: Callable[[], None] = lambda: None) -> None:
        self._image = image
        self._tree = image.tree
        self._content = image.content
        self._on_ready = on_ready
        self._skip_open = self._skip_opendir = False  # what the kernel can do without: see init

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "init": self.init, "destroy": self.destroy, "lookup": self.lookup, "forget": self.forget,
            "forget_multi": self.forget_multi, "getattr": self.getattr, "readlink": self.readlink,
            "open": self.open, "read": self.read, "opendir": self.opendir, "readdir": self.readdir,
            "readdirplus": self.readdirplus, "statfs": self.statfs, "getxattr": self.getxattr,
            "listxattr": self.listxattr,
        }  # fmt: skip

    def init(self, userdata: int, conn: Any) -> None:
        info = conn.contents
        # Plain READDIR where the kernel thinks no one will stat what is listed (`find`), and
        # READDIRPLUS, with every attribute, where it expects `ls -l`: both from one packer.
        info.want |= lowlevel.FUSE_CAP_READDIRPLUS | lowlevel.FUSE_CAP_READDIRPLUS_AUTO
        info.want |= info.capable & (lowlevel.FUSE_CAP_CACHE_SYMLINKS | lowlevel.FUSE_CAP_SPLICE_WRITE)
        info.want &= ~lowlevel.FUSE_CAP_AUTO_INVAL_DATA  # nothing to invalidate: bytes never change
        # A READ as large as can be spliced: libfuse asks the kernel for max_pages from max_write.
        info.max_write = min(info.max_write, lowlevel.read_size())
        # Kernels before 5.1 take ENOSYS from OPENDIR for an error: those get an OPENDIR answer
        # that asks them to keep the listing (and likewise for OPEN, on much older ones).
        emulate = os.environ.get(OLD_KERNEL_VARIABLE) == "1"
        self._skip_open = bool(info.capable & lowlevel.FUSE_CAP_NO_OPEN_SUPPORT) and not emulate
        self._skip_opendir = bool(info.capable & lowlevel.FUSE_CAP_NO_OPENDIR_SUPPORT) and not emulate
        self._on_ready()
        self._image.start_prefetch()

    def destroy(self, userdata: int) -> None:
        self._image.close()

    @_replies_on_error
    def lookup(self, req: int, parent: int, name: bytes) -> None:
        if not self._tree.is_dir(parent):
            lowlevel.reply_err(req, errno.ENOTDIR)
            return
        if len(name) > NAME_MAX:  # the kernel passes up to 1024 bytes; ext4, tmpfs, ... refuse them
            lowlevel.reply_err(req, errno.ENAMETOOLONG)
            return
        found = self._tree.child(parent, name)
        # A missing name is a negative entry, cached like the positive ones.
        record = lowlevel.entry_record(None if found is None else self._tree.attributes(found), CACHE_SECONDS)
        lowlevel.reply_buf(req, record, len(record))

    def forget(self, req: int, ino: int, count: int) -> None:
        lowlevel.reply_none(req)

    def forget_multi(self, req: int, count: int, forgets: int) -> None:
        lowlevel.reply_none(req)

    @_replies_on_error
    def getattr(self, req: int, ino: int, fi: int) -> None:
        record = lowlevel.attr_record(self._tree.attributes(ino), CACHE_SECONDS)
        lowlevel.reply_buf(req, record, len(record))

    @_replies_on_error
    def readlink(self, req: int, ino: int) -> None:
        if not stat.S_ISLNK(self._tree.attributes(ino).mode):
            lowlevel.reply_err(req, errno.EINVAL)
            return
        lowlevel.reply_readlink(req, os.fsencode(self._tree.link(ino)))

    @_replies_on_error
    def open(self, req: int, ino: int, fi: Any) -> None:
        if self._skip_open:
            lowlevel.reply_err(req, errno.ENOSYS)  # see the module's docstring
        else:
            lowlevel.reply_open_cached(req, fi)

    @_replies_on_error
    def opendir(self, req: int, ino: int, fi: Any) -> None:
        if self._skip_opendir:
            lowlevel.reply_err(req, errno.ENOSYS)
        else:
            lowlevel.reply_open_cached(req, fi)

    @_replies_on_error
    def read(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        entry = self._tree.entry(ino)
        if entry.is_dir:
            lowlevel.reply_err(req, errno.EISDIR)
            return
        span = self._content.span(entry, offset, size)
        if span is not None:
            lowlevel.reply_file_range(req, *span)
            return
        # A lazy layer answers a read that must fetch from its event loop, once fetched:
        # this thread goes on to the next request (see worker_threads).
        self._content.read_then(entry, offset, size, functools.partial(_reply_data, req),
                                functools.partial(_read_failed, req, ino))  # fmt: skip

    @_replies_on_error
    def readdir(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        self._reply_listing(req, ino, size, offset, plus=False)

    @_replies_on_error
    def readdirplus(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        self._reply_listing(req, ino, size, offset, plus=True)

    def _reply_listing(self, req: int, ino: int, size: int, offset: int, plus: bool) -> None:
        if not self._tree.is_dir(ino):
            lowlevel.reply_err(req, errno.ENOTDIR)
            return
        buffer = lowlevel.listing_buffer(self._listing(ino, offset, plus), offset, size, plus, CACHE_SECONDS)
        lowlevel.reply_buf(req, buffer, len(buffer))

    def _listing(self, directory: int, offset: int, plus: bool) -> Iterator[Listed]:
        """Yields '.', '..' and the children, sorted by name, from the `offset`-th."""
        tree = self._tree
        if offset <= 0:
            yield b".", directory, stat.S_IFDIR, None
        if offset <= 1:
            yield b"..", tree.parent(directory), stat.S_IFDIR, None
        start = max(0, offset - 2)
        if plus:
            yield from tree.listed_children(directory, start)
        else:
            for name, child in tree.children(directory, start):
                yield name, child, tree.mode(child), None

    @_replies_on_error
    def statfs(self, req: int, ino: int) -> None:
        blocks = -(-self._tree.total_bytes // BLOCK_SIZE)
        lowlevel.reply_statfs(req, f_bsize=BLOCK_SIZE, f_frsize=BLOCK_SIZE, f_blocks=blocks,
                              f_files=self._tree.inode_count, f_namemax=NAME_MAX)  # fmt: skip

    @_replies_on_error
    def getxattr(self, req: int, ino: int, name: bytes, size: int) -> None:
        value = self._tree.xattrs(ino).get(os.fsdecode(name))
        if value is None:
            lowlevel.reply_err(req, errno.ENODATA)
        else:
            lowlevel.reply_sized(req, value, size)

    @_replies_on_error
    def listxattr(self, req: int, ino: int, size: int) -> None:
        names = b"".join(os.fsencode(name) + b"\0" for name in self._tree.xattrs(ino))
        lowlevel.reply_sized(req, names, size)


def worker_threads(image: MountedImage, reads_deferred: bool = False) -> int:
    """Returns how many libfuse worker threads to run. Python holds one lock for all of them,
    so past one per core they mostly contend: with 8 parallel readers on 2 cores, 2 threads
    ran 30 % faster than libfuse's default of 10 (and a lazy mount's, 16, took 1.7 times the
    CPU of 2 reading 40,000 small files from the disk chunk cache). A read of a lazy layer
    may wait on the network, and should not hold up the rest: the read-only mount answers it
    from the event loop once fetched (`reads_deferred`, MergedFilesystem.read); the writable
    mount's copy-up waits in its thread, so it runs LAZY_WORKER_THREADS."""
    return LAZY_WORKER_THREADS if image.waits_on_network and not reads_deferred else max(2, os.cpu_count() or 2)


def mount_options(options: dict[str, str | bool]) -> list[str]:
    """The `-o` list for libfuse: ours, then the user's (`allow_other`, `debug`, ...)."""
    extra = [key if value is True else f"{key}={value}" for key, value in options.items() if value is not False]
    return MOUNT_OPTIONS + extra


def check_options(options: dict[str, str | bool]) -> None:
    """Raises UsageError naming the first `-o` option that libfuse refuses, asking libfuse
    itself (a session made and dropped, no mount), so a typo costs no image build."""
    for option in mount_options(options)[len(MOUNT_OPTIONS) :]:
        try:
            with _quiet_stderr():  # libfuse says "unknown option(s)"; our line says which and why
                lowlevel.Session({}, [*MOUNT_OPTIONS, option]).close()
        except lowlevel.SessionError:
            key = option.partition("=")[0]
            why = HIGH_LEVEL_HINT if key in HIGH_LEVEL_OPTIONS else "libfuse does not accept it"
            raise UsageError(f"-o {option}: {why}") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null for a moment (no other thread writes to it yet)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _ready(mountpoint: str, on_ready: Callable[[], None]) -> None:
    """In INIT: widens the readahead from another thread, which waits for INIT's answer (see
    lowlevel.widen_readahead), then says the mount is ready."""

    def widen() -> None:
        widened = lowlevel.widen_readahead(mountpoint, lowlevel.readahead_size())
        log.debug("readahead of %d bytes: %s", lowlevel.readahead_size(), "set" if widened else "left at the kernel's")

    threading.Thread(target=widen, name="readahead", daemon=True).start()
    on_ready()


def mount(image: MountedImage, mountpoint: str, options: dict[str, str | bool], on_ready: Callable[[], None]) -> None:
    """Serves `image` at `mountpoint` in the foreground until unmounted or signalled. Options
    libfuse refuses, or a mount it cannot make (fusermount3 says why), raise UsageError."""
    filesystem = MergedFilesystem(image, lambda: _ready(mountpoint, on_ready))
    try:
        session = lowlevel.Session(filesystem.callbacks(), mount_options(options))
    except lowlevel.SessionError as exc:
        raise UsageError(f"{mountpoint}: FUSE mount failed: {exc} (see the libfuse message above)") from None
    try:
        session.serve(mountpoint, worker_threads(image, reads_deferred=True))
    except lowlevel.SessionError as exc:
        raise UsageError(f"{exc} (the line above says why)") from None
    finally:
        session.close()
