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
import ctypes.util
import signal
import struct
from collections.abc import Callable, Iterable
from typing import Any

import mfusepy

from unionfs.entry import Attributes

if mfusepy.fuse_version_major != 3:
    raise ImportError(f"crfs-merge needs libfuse 3; mfusepy found {mfusepy.fuse_version_major}")

_lib = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")

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


def _attr_fields(a: Attributes) -> tuple[int, ...]:
    seconds, nanoseconds = divmod(a.mtime_ns, 1_000_000_000)
    blocks = -(-a.size // 512)
    return (a.ino, a.size, blocks, seconds, seconds, seconds, nanoseconds, nanoseconds, nanoseconds,
            a.mode, a.nlink, a.uid, a.gid, a.rdev & 0xFFFFFFFF, 0, 0)  # fmt: skip


def entry_record(a: Attributes | None, timeout: int) -> bytes:
    """A LOOKUP answer (fuse_entry_out); for None, the negative entry the kernel may keep for
    `timeout` seconds, so the same missing name is not asked for again."""
    if a is None:
        return _ENTRY_OUT.pack(0, 0, timeout, 0, 0, 0, *([0] * 16))
    return _ENTRY_OUT.pack(a.ino, 0, timeout, timeout, 0, 0, *_attr_fields(a))


def attr_record(a: Attributes, timeout: int) -> bytes:
    """A GETATTR answer (fuse_attr_out)."""
    return _ATTR_OUT.pack(timeout, 0, 0, *_attr_fields(a))


Listed = tuple[bytes, int, int, Attributes | None]
"""One name of a directory listing: name, inode number, mode, and the attributes for a
READDIRPLUS (None for '.' and '..', which the kernel links itself)."""

_NO_ENTRY = bytes(_ENTRY_OUT.size)  # a zero nodeid: the kernel links nothing for the name
_PADDING = [b"\0" * n for n in range(8)]


def listing_buffer(items: Iterable[Listed], first_offset: int, size: int, plus: bool, timeout: int) -> bytes:
    """Packs a READDIR (or READDIRPLUS) answer of at most `size` bytes: the items from the one
    at `first_offset`, each carrying the offset of the next so that the kernel resumes there."""
    records: list[bytes] = []
    room = size
    pack = _DIRENT.pack
    for offset, (name, ino, mode, attributes) in enumerate(items, start=first_offset + 1):
        record = pack(ino, offset, len(name), (mode >> 12) & 0o17) + name + _PADDING[-len(name) % 8]
        if plus:
            record = (_NO_ENTRY if attributes is None else entry_record(attributes, timeout)) + record
        room -= len(record)
        if room < 0:
            break
        records.append(record)
    return b"".join(records)


# ---------------------------------------------------------------- the C side

_req = ctypes.c_void_p
_ino = ctypes.c_uint64
_fi = ctypes.c_void_p
_CALLBACKS: dict[str, Any] = {
    "init": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(mfusepy.fuse_conn_info)),
    "destroy": ctypes.CFUNCTYPE(None, ctypes.c_void_p),
    "lookup": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_char_p),
    "forget": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_uint64),
    "getattr": ctypes.CFUNCTYPE(None, _req, _ino, _fi),
    "readlink": ctypes.CFUNCTYPE(None, _req, _ino),
    "open": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.POINTER(mfusepy.fuse_file_info)),
    "read": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t, ctypes.c_int64, _fi),
    "opendir": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.POINTER(mfusepy.fuse_file_info)),
    "readdir": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t, ctypes.c_int64, _fi),
    "statfs": ctypes.CFUNCTYPE(None, _req, _ino),
    "getxattr": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_char_p, ctypes.c_size_t),
    "listxattr": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t),
    "forget_multi": ctypes.CFUNCTYPE(None, _req, ctypes.c_size_t, ctypes.c_void_p),
    "readdirplus": ctypes.CFUNCTYPE(None, _req, _ino, ctypes.c_size_t, ctypes.c_int64, _fi),
}
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


class _Operations(ctypes.Structure):
    _fields_ = [(name, _CALLBACKS.get(name, ctypes.c_void_p)) for name in _OPS_ORDER]


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


class _Buf(ctypes.Structure):  # struct fuse_buf
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p), ("fd", ctypes.c_int),
                ("pos", ctypes.c_int64)]  # fmt: skip


class _BufVec(ctypes.Structure):  # struct fuse_bufvec, with its one inline buffer
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t), ("buf", _Buf * 1)]


_FILE_RANGE = 1 << 1 | 1 << 2 | 1 << 3  # FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY


class _LoopConfigV1(ctypes.Structure):  # libfuse 3.2 - 3.11
    _fields_ = [("clone_fd", ctypes.c_int), ("max_idle_threads", ctypes.c_uint)]


def _declare(name: str, restype: Any, *argtypes: Any) -> None:
    function = getattr(_lib, name, None)
    if function is not None:
        function.restype = restype
        function.argtypes = argtypes


_declare("fuse_session_new", ctypes.c_void_p, ctypes.POINTER(_Args), ctypes.POINTER(_Operations),
         ctypes.c_size_t, ctypes.c_void_p)  # fmt: skip
_declare("fuse_session_mount", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
_declare("fuse_session_unmount", None, ctypes.c_void_p)
_declare("fuse_session_destroy", None, ctypes.c_void_p)
_declare("fuse_set_signal_handlers", ctypes.c_int, ctypes.c_void_p)
_declare("fuse_remove_signal_handlers", None, ctypes.c_void_p)
_declare("fuse_loop_cfg_create", ctypes.c_void_p)
_declare("fuse_loop_cfg_destroy", None, ctypes.c_void_p)
_declare("fuse_loop_cfg_set_max_threads", None, ctypes.c_void_p, ctypes.c_uint)
_declare("fuse_loop_cfg_set_idle_threads", None, ctypes.c_void_p, ctypes.c_uint)
_declare("fuse_session_loop_mt_312", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_declare("fuse_session_loop_mt_32", ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_LoopConfigV1))
_declare("fuse_reply_err", ctypes.c_int, _req, ctypes.c_int)
_declare("fuse_reply_none", None, _req)
_declare("fuse_reply_buf", ctypes.c_int, _req, ctypes.c_char_p, ctypes.c_size_t)
_declare("fuse_reply_readlink", ctypes.c_int, _req, ctypes.c_char_p)
_declare("fuse_reply_open", ctypes.c_int, _req, ctypes.POINTER(mfusepy.fuse_file_info))
_declare("fuse_reply_data", ctypes.c_int, _req, ctypes.POINTER(_BufVec), ctypes.c_int)
_declare("fuse_reply_xattr", ctypes.c_int, _req, ctypes.c_size_t)
_declare("fuse_reply_statfs", ctypes.c_int, _req, ctypes.POINTER(mfusepy.c_statvfs))

reply_err: Callable[[int, int], int] = _lib.fuse_reply_err
reply_none: Callable[[int], None] = _lib.fuse_reply_none
reply_buf: Callable[[int, bytes, int], int] = _lib.fuse_reply_buf
reply_readlink: Callable[[int, bytes], int] = _lib.fuse_reply_readlink
reply_xattr: Callable[[int, int], int] = _lib.fuse_reply_xattr


def reply_open_cached(req: int, fi: Any) -> int:
    """Answers OPEN or OPENDIR with the kernel told to keep what it caches of the file (its
    pages, or its listing) across opens: for kernels that cannot skip OPEN altogether."""
    fi.contents.keep_cache = 1
    fi.contents.cache_readdir = 1
    return int(_lib.fuse_reply_open(req, fi))


def reply_file_range(req: int, fd: int, position: int, size: int) -> int:
    """Answers a READ with `size` bytes of file `fd` from `position`, without passing them
    through Python: libfuse splices them from the file to the kernel where the connection
    allows (FUSE_CAP_SPLICE_WRITE), else copies them in C."""
    vector = _BufVec(1, 0, 0)
    vector.buf[0] = _Buf(size, _FILE_RANGE, None, fd, position)
    return int(_lib.fuse_reply_data(req, ctypes.byref(vector), 0))


def reply_statfs(req: int, **fields: int) -> int:
    return int(_lib.fuse_reply_statfs(req, ctypes.byref(mfusepy.c_statvfs(**fields))))


class SessionError(Exception):
    """libfuse refused the options or the mount; it has said why on stderr."""


class Session:
    """One FUSE session: `callbacks` maps _CALLBACKS names to Python functions, each of which
    must reply to its request exactly once (except init and destroy, which have none)."""

    def __init__(self, callbacks: dict[str, Callable[..., None]], options: list[str]) -> None:
        # The CFUNCTYPE objects must outlive the session: libfuse holds bare pointers to them.
        self._ops = _Operations(**{name: _CALLBACKS[name](function) for name, function in callbacks.items()})
        argv = [b"crfs-merge", b"-o", ",".join(options).encode()]
        self._argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        args = _Args(len(argv), self._argv, 0)
        self._se = _lib.fuse_session_new(ctypes.byref(args), ctypes.byref(self._ops), ctypes.sizeof(self._ops), None)
        if not self._se:
            raise SessionError("libfuse refused the mount options")

    def serve(self, mountpoint: str, threads: int) -> None:
        """Mounts and serves until unmounted (fusermount3 -u) or sent SIGINT/SIGTERM/SIGHUP."""
        # The handlers go in first: a signal that arrives once the mount is visible must end
        # the loop, not wait for Python code that the loop never returns to. libfuse takes only
        # signals left at their default, and Python has one of its own for SIGINT.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if _lib.fuse_set_signal_handlers(self._se) != 0:
            raise SessionError("cannot install the signal handlers")
        try:
            if _lib.fuse_session_mount(self._se, mountpoint.encode()) != 0:
                raise SessionError(f"{mountpoint}: the mount failed")
            try:
                self._loop(threads)
            finally:
                _lib.fuse_session_unmount(self._se)
        finally:
            _lib.fuse_remove_signal_handlers(self._se)

    def _loop(self, threads: int) -> None:
        if hasattr(_lib, "fuse_loop_cfg_create"):
            config = _lib.fuse_loop_cfg_create()
            _lib.fuse_loop_cfg_set_max_threads(config, threads)
            _lib.fuse_loop_cfg_set_idle_threads(config, threads)
            try:
                _lib.fuse_session_loop_mt_312(self._se, config)
            finally:
                _lib.fuse_loop_cfg_destroy(config)
        else:
            _lib.fuse_session_loop_mt_32(self._se, ctypes.byref(_LoopConfigV1(0, threads)))

    def close(self) -> None:
        """Destroys the session (libfuse calls `destroy` then)."""
        if self._se:
            _lib.fuse_session_destroy(self._se)
            self._se = None
