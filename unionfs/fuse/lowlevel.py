"""libfuse 3's low-level (inode-addressed) API through ctypes: the session, its table of
callbacks, the replies, and the kernel's wire records for entries, attributes and listings.

Why not libfuse's high-level (path) API, which mfusepy wraps: it resolves every request to a
path string, keeps its own node table, answers READDIRPLUS with a getattr call per listed name,
and drops the `cache_readdir` flag an opendir sets, so the kernel can never keep a listing. An
immutable image is best served by inode: the kernel may then keep names, attributes, listings
and pages for as long as the mount lives. mfusepy still supplies the ABI structures that differ
between libfuse versions (stat, statvfs, fuse_conn_info).

Entries, attributes and listings are packed here in the kernel's layout (include/uapi/linux/
fuse.h, protocol 7.9 and later) and sent with fuse_reply_buf: one struct.pack per record
instead of filling a ctypes `struct stat` field by field.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from unionfs.entry import Attributes, AttributeValues
from unionfs.fuse import libfuse
from unionfs.fuse.libfuse import Layout, Libfuse

FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_NO_OPEN_SUPPORT = 1 << 17
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
FUSE_CAP_NO_OPENDIR_SUPPORT = 1 << 24

# struct fuse_attr: ino size blocks atime mtime ctime, the three nsecs, mode nlink uid gid
# rdev blksize flags.
_ATTR = "QQQQQQIIIIIIIIII"
_ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)  # nodeid generation entry_valid attr_valid + nsecs
_ATTR_OUT = struct.Struct("<QII" + _ATTR)  # attr_valid attr_valid_nsec dummy
_DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8 bytes


_U64 = (1 << 64) - 1  # the kernel reads the seconds as signed: a time before 1970 goes as its two's complement


def _attr_fields(a: Attributes) -> tuple[int, ...]:
    seconds, nanoseconds = divmod(a.mtime_ns, 1_000_000_000)
    seconds &= _U64
    blocks = -(-a.size // 512)
    return (a.ino, a.size, blocks, seconds, seconds, seconds, nanoseconds, nanoseconds, nanoseconds,
            a.mode, a.nlink, a.uid, a.gid, a.rdev & 0xFFFFFFFF, a.blksize, 0)  # fmt: skip


def entry_record(a: Attributes | None, timeout: int) -> bytes:
    """A LOOKUP answer (fuse_entry_out); for None, the negative entry the kernel may keep for
    `timeout` seconds, so the same missing name is not asked for again."""
    if a is None:
        return _ENTRY_OUT.pack(0, 0, timeout, 0, 0, 0, *([0] * 16))
    return _ENTRY_OUT.pack(a.ino, 0, timeout, timeout, 0, 0, *_attr_fields(a))


def attr_record(a: Attributes, timeout: int) -> bytes:
    """A GETATTR answer (fuse_attr_out)."""
    return _ATTR_OUT.pack(timeout, 0, 0, *_attr_fields(a))


Listed = tuple[bytes, int, int, AttributeValues | None]
"""One name of a directory listing: name, inode number, mode, and for a READDIRPLUS the
attributes (an Attributes, or the same fields as a plain tuple); None for '.' and '..', which
the kernel links itself."""

# fuse_direntplus: a fuse_entry_out, then the fuse_dirent, in one pack per listed name.
_DIRENTPLUS = struct.Struct("<QQQQII" + _ATTR + "QQII")
_NO_ENTRY = bytes(_ENTRY_OUT.size)  # a zero nodeid: the kernel links nothing for the name
_PADDING = [b"\0" * n for n in range(8)]


def listing_buffer(items: Iterable[Listed], first_offset: int, size: int, plus: bool, timeout: int) -> bytes:
    """Packs a READDIR (or READDIRPLUS) answer of at most `size` bytes: the items from the one
    at `first_offset`, each carrying the offset of the next so that the kernel resumes there."""
    records: list[bytes] = []
    room = size
    head = (_DIRENTPLUS if plus else _DIRENT).size
    pack, pack_plus = _DIRENT.pack, _DIRENTPLUS.pack
    for offset, (name, ino, mode, values) in enumerate(items, start=first_offset + 1):
        length = len(name)
        room -= head + length + (-length % 8)
        if room < 0:
            break
        kind = (mode >> 12) & 0o17
        if not plus:
            records.append(pack(ino, offset, length, kind))
        elif values is None:
            records.append(_NO_ENTRY + pack(ino, offset, length, kind))
        else:  # the fields of entry_record, inline: this runs for every listed name
            _, _, nlink, uid, gid, file_size, rdev, mtime_ns, blksize = values
            seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
            seconds &= _U64
            records.append(pack_plus(ino, 0, timeout, timeout, 0, 0, ino, file_size, -(-file_size // 512), seconds,
                                     seconds, seconds, nanoseconds, nanoseconds, nanoseconds, mode, nlink, uid, gid,
                                     rdev & 0xFFFFFFFF, blksize, 0, ino, offset, length, kind))  # fmt: skip
        records.append(name + _PADDING[-length % 8])
    return b"".join(records)


# ---------------------------------------------------------------- the C side
# Bound on first use (a Session, or a reply), not at import: the records above, and the tests
# and `--export` that use only them, need no libfuse. unionfs/fuse/libfuse.py chooses the library.

_req = ctypes.c_void_p
_ino = ctypes.c_uint64
_fi = ctypes.c_void_p
# struct fuse_lowlevel_ops, in its order up to readdirplus; the writing operations stay NULL,
# which libfuse answers with ENOSYS.
_OPS_ORDER = [
    "init",
    "destroy",
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "getlk",
    "setlk",
    "bmap",
    "ioctl",
    "poll",
    "write_buf",
    "retrieve_reply",
    "forget_multi",
    "flock",
    "fallocate",
    "readdirplus",
]


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


class _RequestContext(ctypes.Structure):  # struct fuse_ctx
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32), ("umask", ctypes.c_uint32)]


class _LoopConfigV1(ctypes.Structure):  # libfuse 3.2 - 3.11
    _fields_ = [("clone_fd", ctypes.c_int), ("max_idle_threads", ctypes.c_uint)]


class _LibfuseVersion(ctypes.Structure):  # struct libfuse_version, 3.17 and later
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("hotfix", ctypes.c_uint32),
                ("padding", ctypes.c_uint32)]  # fmt: skip


_FILE_RANGE = 1 << 1 | 1 << 2 | 1 << 3  # FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY


def file_info_type(layout: Layout) -> type[ctypes.Structure]:
    """Returns struct fuse_file_info of `layout` up to `fh`, which is all that is read or
    written here (always through libfuse's pointer, so the rest need not be declared).
    ctypes places the bits as the C compiler does, first declared first."""
    bits = [(name, ctypes.c_uint32, 1) for name in layout.file_info_bits]
    padding = ("padding", ctypes.c_uint32, 32 - len(bits))
    # Then one more 32-bit word of padding (two from 3.17 on, which the alignment of `fh`
    # absorbs): `fh` is at offset 16 in every 3.x.
    handle = [("padding2", ctypes.c_uint32), ("fh", ctypes.c_uint64)]
    return type("fuse_file_info", (ctypes.Structure,), {"_fields_": [("flags", ctypes.c_int32), *bits, padding,
                                                                      *handle]})  # fmt: skip


def buf_type(layout: Layout) -> type[ctypes.Structure]:
    """Returns struct fuse_buf of `layout` (3.17 appended `size_t mem_size`)."""
    fields = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p), ("fd", ctypes.c_int),
              ("pos", ctypes.c_int64)]  # fmt: skip
    if layout.buf_has_mem_size:
        fields.append(("mem_size", ctypes.c_size_t))
    return type("fuse_buf", (ctypes.Structure,), {"_fields_": fields})


class _Bindings:
    """libfuse's functions with their C signatures, and the structures whose layout depends on
    the version of the library that was loaded."""

    def __init__(self, fuse: Libfuse) -> None:
        self.fuse = fuse
        self.lib = fuse.lib
        self.file_info = file_info_type(fuse.layout)
        self.buf = buf_type(fuse.layout)
        self.bufvec = type("fuse_bufvec", (ctypes.Structure,), {"_fields_": [  # with its one inline buffer
            ("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t), ("buf", self.buf * 1)]})
        file_info_p = ctypes.POINTER(self.file_info)
        self.callbacks: dict[str, Any] = {
            "init": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(fuse.mfusepy.fuse_conn_info)),
            "destroy": ctypes.CFUNCTYPE(None, ctypes.c_void_p),
            "lookup": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_char_p),
            "forget": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_uint64),
            "getattr": ctypes.CFUNCTYPE(None, _req, _ino, _fi),
            "readlink": ctypes.CFUNCTYPE(None, _req, _ino),
            "open": ctypes.CFUNCTYPE(None, _req, _ino, file_info_p),
            "read": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t, ctypes.c_int64, file_info_p),
            "opendir": ctypes.CFUNCTYPE(None, _req, _ino, file_info_p),
            "readdir": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t, ctypes.c_int64, file_info_p),
            "statfs": ctypes.CFUNCTYPE(None, _req, _ino),
            "getxattr": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_char_p, ctypes.c_size_t),
            "listxattr": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t),
            "forget_multi": ctypes.CFUNCTYPE(None, _req, ctypes.c_size_t, ctypes.c_void_p),
            "readdirplus": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t, ctypes.c_int64, file_info_p),
            **self._writing_callbacks(fuse, file_info_p),
        }
        self.operations = type("fuse_lowlevel_ops", (ctypes.Structure,), {
            "_fields_": [(name, self.callbacks.get(name, ctypes.c_void_p)) for name in _OPS_ORDER]})
        self._declare_functions(fuse)

    def _writing_callbacks(self, fuse: Libfuse, file_info_p: Any) -> dict[str, Any]:
        """The signatures of the operations only a writable mount registers."""
        name, mode, dev = ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint64
        with_file = ctypes.CFUNCTYPE(None, _req, _ino, file_info_p)
        entry_op = ctypes.CFUNCTYPE(None, _req, _ino, name)
        return {
            "setattr": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.POINTER(fuse.mfusepy.c_stat), ctypes.c_int,
                                        file_info_p),
            "mknod": ctypes.CFUNCTYPE(None, _req, _ino, name, mode, dev),
            "mkdir": ctypes.CFUNCTYPE(None, _req, _ino, name, mode),
            "unlink": entry_op,
            "rmdir": entry_op,
            "symlink": ctypes.CFUNCTYPE(None, _req, name, _ino, name),
            "rename": ctypes.CFUNCTYPE(None, _req, _ino, name, _ino, name, ctypes.c_uint),
            "link": ctypes.CFUNCTYPE(None, _req, _ino, _ino, name),
            "create": ctypes.CFUNCTYPE(None, _req, _ino, name, mode, file_info_p),
            "write_buf": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.POINTER(self.bufvec), ctypes.c_int64,
                                          file_info_p),
            "flush": with_file,
            "release": with_file,
            "releasedir": with_file,
            "fsync": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_int, file_info_p),
            "fsyncdir": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_int, file_info_p),
            "setxattr": ctypes.CFUNCTYPE(None, _req, _ino, name, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int),
            "removexattr": entry_op,
            "fallocate": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                          file_info_p),
        }  # fmt: skip

    def _declare(self, name: str, restype: Any, *argtypes: Any) -> None:
        function = getattr(self.lib, name, None)
        if function is not None:
            function.restype = restype
            function.argtypes = argtypes

    def _declare_functions(self, fuse: Libfuse) -> None:
        declare = self._declare
        declare("fuse_session_new", ctypes.c_void_p, ctypes.POINTER(_Args), ctypes.POINTER(self.operations),
                ctypes.c_size_t, ctypes.c_void_p)  # fmt: skip
        declare("fuse_session_new_versioned", ctypes.c_void_p, ctypes.POINTER(_Args),
                ctypes.POINTER(self.operations), ctypes.c_size_t, ctypes.POINTER(_LibfuseVersion), ctypes.c_void_p)
        declare("fuse_session_mount", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
        declare("fuse_session_unmount", None, ctypes.c_void_p)
        declare("fuse_session_destroy", None, ctypes.c_void_p)
        declare("fuse_set_signal_handlers", ctypes.c_int, ctypes.c_void_p)
        declare("fuse_remove_signal_handlers", None, ctypes.c_void_p)
        declare("fuse_loop_cfg_create", ctypes.c_void_p)
        declare("fuse_loop_cfg_destroy", None, ctypes.c_void_p)
        declare("fuse_loop_cfg_set_max_threads", None, ctypes.c_void_p, ctypes.c_uint)
        declare("fuse_loop_cfg_set_idle_threads", None, ctypes.c_void_p, ctypes.c_uint)
        declare("fuse_session_loop_mt_312", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        declare("fuse_session_loop_mt_32", ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_LoopConfigV1))
        declare("fuse_reply_err", ctypes.c_int, _req, ctypes.c_int)
        declare("fuse_reply_none", None, _req)
        declare("fuse_reply_buf", ctypes.c_int, _req, ctypes.c_char_p, ctypes.c_size_t)
        declare("fuse_reply_readlink", ctypes.c_int, _req, ctypes.c_char_p)
        declare("fuse_reply_open", ctypes.c_int, _req, ctypes.POINTER(self.file_info))
        declare("fuse_reply_data", ctypes.c_int, _req, ctypes.POINTER(self.bufvec), ctypes.c_int)
        declare("fuse_reply_xattr", ctypes.c_int, _req, ctypes.c_size_t)
        declare("fuse_reply_statfs", ctypes.c_int, _req, ctypes.POINTER(fuse.mfusepy.c_statvfs))
        declare("fuse_req_ctx", ctypes.POINTER(_RequestContext), _req)
        declare("fuse_lowlevel_notify_inval_inode", ctypes.c_int, ctypes.c_void_p, _ino, ctypes.c_int64,
                ctypes.c_int64)  # fmt: skip
        declare("fuse_buf_size", ctypes.c_size_t, ctypes.POINTER(self.bufvec))
        declare("fuse_buf_copy", ctypes.c_ssize_t, ctypes.POINTER(self.bufvec), ctypes.POINTER(self.bufvec),
                ctypes.c_int)  # fmt: skip

    def new_session(self, args: _Args, operations: ctypes.Structure) -> int | None:
        """Returns libfuse's fuse_session_new(...), telling 3.17 and later which ABI we speak
        (the loaded library's own: every layout here was chosen from its version)."""
        size = ctypes.sizeof(operations)
        if hasattr(self.lib, "fuse_session_new_versioned"):
            version = _LibfuseVersion(*self.fuse.version, 0)
            se = self.lib.fuse_session_new_versioned(ctypes.byref(args), ctypes.byref(operations), size,
                                                     ctypes.byref(version), None)  # fmt: skip
        else:
            se = self.lib.fuse_session_new(ctypes.byref(args), ctypes.byref(operations), size, None)
        return int(se) if se else None


def _unbound(*args: Any) -> Any:
    raise RuntimeError("no FUSE session: replies exist only inside a Session's callbacks")


# Replaced by libfuse's own functions when the library is bound: the hot paths call them
# without a Python function in between.
reply_err: Callable[[int, int], int] = _unbound
reply_none: Callable[[int], None] = _unbound
reply_buf: Callable[[int, bytes, int], int] = _unbound
reply_readlink: Callable[[int, bytes], int] = _unbound
reply_xattr: Callable[[int, int], int] = _unbound
_bound: _Bindings | None = None


def bindings() -> _Bindings:
    """Returns the bound libfuse (loading it on the first call; raises LibfuseMissing if there
    is no libfuse 3)."""
    global _bound, reply_err, reply_none, reply_buf, reply_readlink, reply_xattr
    if _bound is None:
        bound = _Bindings(libfuse.load())
        reply_err, reply_none, reply_buf = bound.lib.fuse_reply_err, bound.lib.fuse_reply_none, bound.lib.fuse_reply_buf
        reply_readlink, reply_xattr = bound.lib.fuse_reply_readlink, bound.lib.fuse_reply_xattr
        _bound = bound
    return _bound


def reply_sized(req: int, value: bytes, size: int) -> None:
    """Answers GETXATTR or LISTXATTR by the xattr convention: size 0 asks how long the value
    is; too small a size is ERANGE."""
    if size == 0:
        reply_xattr(req, len(value))
    elif size < len(value):
        reply_err(req, errno.ERANGE)
    else:
        reply_buf(req, value, len(value))


def reply_open_cached(req: int, fi: Any) -> int:
    """Answers OPEN or OPENDIR with the kernel told to keep what it caches of the file (its
    pages, or its listing) across opens: for kernels that cannot skip OPEN altogether."""
    fi.contents.keep_cache = 1
    fi.contents.cache_readdir = 1
    return int(bindings().lib.fuse_reply_open(req, fi))


def reply_file_range(req: int, fd: int, position: int, size: int) -> int:
    """Answers a READ with `size` bytes of file `fd` from `position`, without passing them
    through Python: libfuse splices them from the file to the kernel where the connection
    allows (FUSE_CAP_SPLICE_WRITE), else copies them in C."""
    bound = bindings()
    vector = bound.bufvec(1, 0, 0)
    vector.buf[0] = bound.buf(size, _FILE_RANGE, None, fd, position)
    return int(bound.lib.fuse_reply_data(req, ctypes.byref(vector), 0))


def request_owner(req: int) -> tuple[int, int]:
    """The uid and gid of the process that made request `req` (the owner of what it creates)."""
    context = bindings().lib.fuse_req_ctx(req).contents
    return int(context.uid), int(context.gid)


def write_into(fd: int, position: int, source: Any) -> int:
    """Copies the data of a WRITE (libfuse's fuse_bufvec) into file `fd` at `position` without
    passing it through Python (spliced where the kernel and libfuse can); returns the bytes
    written or a negative errno."""
    bound = bindings()
    size = bound.lib.fuse_buf_size(source)
    destination = bound.bufvec(1, 0, 0)
    destination.buf[0] = bound.buf(size, _FILE_RANGE, None, fd, position)
    return int(bound.lib.fuse_buf_copy(ctypes.byref(destination), source, 0))


def reply_statfs(req: int, **fields: int) -> int:
    """Answers STATFS with `fields` of struct statvfs (f_bsize=..., f_blocks=..., ...)."""
    bound = bindings()
    return int(bound.lib.fuse_reply_statfs(req, ctypes.byref(bound.fuse.mfusepy.c_statvfs(**fields))))


MAX_PAGES = 256  # FUSE_MAX_MAX_PAGES: the most a READ can carry, and libfuse's default
_PIPE_SLACK_PAGES = 3  # what fuse_send_data_iov wants free in the pipe beyond the reply
_OUT_HEADER = 16  # struct fuse_out_header


def spliceable_pages(pipe_max_size: int, page_size: int) -> int:
    """The most pages one READ answer can carry and still be spliced from the cached tar:
    libfuse moves an answer through a pipe only if the pipe can grow to hold it, its header
    and three pages of slack, and else copies it through a buffer it maps for each answer
    (1 MiB answers and the default pipe-max-size of 1 MiB take that second road)."""
    fitting = (pipe_max_size - _PIPE_SLACK_PAGES * page_size - _OUT_HEADER) // page_size
    return max(1, min(MAX_PAGES, fitting))


@functools.cache
def read_size() -> int:
    """The size of the READs to ask the kernel for: as many pages as can be spliced under this
    machine's /proc/sys/fs/pipe-max-size (1008 KiB under the default 1 MiB)."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    try:
        pipe_max_size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        pipe_max_size = 1 << 20
    return spliceable_pages(pipe_max_size, page_size) * page_size


READS_IN_FLIGHT = 4
"""How many READs of read_size() the readahead asks for ahead of a sequential reader: the
worker threads splice one while the disk fills the next (a cold read of a 200 MiB file ran
about 10 % faster with 4 than with 1; the kernel's readahead for the disk here is 8 MiB)."""


def readahead_size() -> int:
    """The readahead to give a mount (as root): READS_IN_FLIGHT reads of read_size()."""
    return READS_IN_FLIGHT * read_size()


def widen_readahead(mountpoint: str, size: int) -> bool:
    """Raises the readahead of the FUSE mount at `mountpoint` to `size` bytes (from the 128
    KiB the kernel starts a mount with), through its backing device's read_ahead_kb in sysfs
    (only root may write it); returns whether the readahead is now at least that. Run it once
    the kernel has INIT's answer, which caps the readahead at the kernel's default and would
    undo an earlier raise: a stat of the mountpoint waits for that answer."""
    if os.geteuid() != 0:
        return False
    kib = -(-size // 1024)
    try:
        device = os.stat(mountpoint).st_dev
        setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        if int(setting.read_text()) < kib:
            setting.write_text(f"{kib}\n")
        return int(setting.read_text()) >= kib
    except (OSError, ValueError):  # no sysfs, a user namespace's root, a mount gone already
        return False


_kept = threading.local()


def _in_a_kept_thread_state(function: Callable[..., None]) -> Callable[..., None]:
    """Returns `function` for a ctypes callback that keeps its Python thread state. ctypes
    calls a callback from a thread Python did not start in a thread state made for that one
    call and deleted after it (PyGILState_Ensure, then Release), which costs every request a
    16 KiB mmap and munmap and the making of a thread state. One Ensure never released keeps
    the thread's state for as long as the thread lives. libfuse 3.12 and later keep at most
    `threads` workers for the whole loop (Session._loop); with 3.2 to 3.11, a worker started
    past `threads` in a burst leaves its few KiB of thread state behind when it ends."""
    kept, ensure = _kept, ctypes.pythonapi.PyGILState_Ensure

    def call(*args: Any) -> None:
        if not getattr(kept, "state", False):  # the thread-local dict lives in the thread state
            ensure()
            kept.state = True
        function(*args)

    return call


class SessionError(Exception):
    """libfuse refused the options or the mount; it has said why on stderr."""


class Session:
    """One FUSE session: `callbacks` maps operation names (init, lookup, ... readdirplus) to
    Python functions, each of which must reply to its request exactly once (except init and
    destroy, which have none). Raises LibfuseMissing if there is no libfuse 3."""

    def __init__(self, callbacks: dict[str, Callable[..., None]], options: list[str]) -> None:
        bound = bindings()
        self._lib = bound.lib
        # The CFUNCTYPE objects must outlive the session: libfuse holds bare pointers to them.
        self._ops = bound.operations(**{name: bound.callbacks[name](_in_a_kept_thread_state(function))
                                        for name, function in callbacks.items()})  # fmt: skip
        argv = [b"crfs-merge", b"-o", ",".join(options).encode()]
        self._argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        self._se = bound.new_session(_Args(len(argv), self._argv, 0), self._ops)
        if not self._se:
            raise SessionError("libfuse refused the mount options")

    def serve(self, mountpoint: str, threads: int) -> None:
        """Mounts and serves until unmounted (fusermount3 -u) or sent SIGINT/SIGTERM/SIGHUP."""
        # The handlers go in first: a signal that arrives once the mount is visible must end
        # the loop, not wait for Python code that the loop never returns to. libfuse takes only
        # signals left at their default, and Python has one of its own for SIGINT.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._lib.fuse_set_signal_handlers(self._se) != 0:
            raise SessionError("cannot install the signal handlers")
        try:
            if self._lib.fuse_session_mount(self._se, mountpoint.encode()) != 0:
                raise SessionError(f"{mountpoint}: the mount failed")
            try:
                self._loop(threads)
            finally:
                self._lib.fuse_session_unmount(self._se)
        finally:
            self._lib.fuse_remove_signal_handlers(self._se)

    def _loop(self, threads: int) -> None:
        if hasattr(self._lib, "fuse_loop_cfg_create"):
            config = self._lib.fuse_loop_cfg_create()
            self._lib.fuse_loop_cfg_set_max_threads(config, threads)
            self._lib.fuse_loop_cfg_set_idle_threads(config, threads)
            try:
                self._lib.fuse_session_loop_mt_312(self._se, config)
            finally:
                self._lib.fuse_loop_cfg_destroy(config)
        else:
            self._lib.fuse_session_loop_mt_32(self._se, ctypes.byref(_LoopConfigV1(0, threads)))

    def forget_attributes(self, ino: int) -> None:
        """Tells the kernel to drop what it caches of inode `ino`'s attributes (not its pages),
        after they changed other than by a request that carried the new ones back."""
        if self._se:
            self._lib.fuse_lowlevel_notify_inval_inode(self._se, ino, -1, 0)

    def close(self) -> None:
        """Destroys the session (libfuse calls `destroy` then)."""
        if self._se:
            self._lib.fuse_session_destroy(self._se)
            self._se = None
