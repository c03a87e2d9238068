"""The upper directory on disk: paths, whiteouts, opaque markers, ownership that may not be
settable, and atomic creation of copied-up files.

Everything here is plain file system work on paths inside the upper directory; the decisions
(which layer shows, when to copy up) are in unionfs/upper/overlay.py.

Why ownership falls back to an xattr: an unprivileged user (or root in a user namespace with
one id mapped) cannot chown to another owner or make a device node. What it cannot set is
kept in `user.containers.override_stat`, the convention rootless podman's storage and
fuse-overlayfs use (unionfs/upper/diff.py parses it for commit); the mount shows it, so a
program sees what it set. Where the disk can hold the truth (root), it holds it, and the upper
directory is then also a plain directory any tool can read.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from dataclasses import dataclass

from unionfs.upper.diff import IMAGE_XATTR, METACOPY_XATTR, OVERRIDE_STAT_XATTR, OverrideStat, parse_override_stat
from whiteout.markers import OPAQUE_MARKER, WHITEOUT_PREFIX

WHITEOUT = WHITEOUT_PREFIX.encode()
OPAQUE = OPAQUE_MARKER.encode()
# Our own xattrs on upper files; never shown through the mount, never settable through it.
# METACOPY_XATTR marks a metadata-only copy: a sparse upper file whose bytes are still those of
# the image's file at the path it holds (overlay.py copy_up; commit reads them from there).
RESERVED_XATTRS = frozenset({OVERRIDE_STAT_XATTR, METACOPY_XATTR, IMAGE_XATTR})
_KIND_NAMES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "pipe",
               stat.S_IFSOCK: "socket", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}  # fmt: skip
_KIND_BITS = {name: bits for bits, name in _KIND_NAMES.items()}
# What the server itself needs on its own files whatever mode the program set: to read and
# write a file, to list and create in a directory (the kernel checks the shown mode).
_OWNER_ACCESS = {stat.S_IFREG: 0o600, stat.S_IFDIR: 0o700}


@dataclass(frozen=True, slots=True)
class Shown:
    """The type, permission bits, owner and device number a file shows through the mount."""

    mode: int  # with the type bits
    uid: int
    gid: int
    rdev: int = 0


def whiteout_name(name: bytes) -> bytes:
    return WHITEOUT + name


class UpperStore:
    """The upper directory at `root` (bytes path); `relative` paths have no leading slash."""

    def __init__(self, root: bytes) -> None:
        self.root = root.rstrip(b"/") or b"/"
        self._tmpfile_works = True

    def path(self, relative: bytes) -> bytes:
        return self.root + b"/" + relative if relative else self.root

    def lstat(self, relative: bytes) -> os.stat_result | None:
        try:
            return os.lstat(self.path(relative))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def exists(self, relative: bytes) -> bool:
        return self.lstat(relative) is not None

    # ------------------------------------------------------------ markers

    def has_whiteout(self, directory: bytes, name: bytes) -> bool:
        return self.exists(join(directory, whiteout_name(name)))

    def is_opaque(self, directory: bytes) -> bool:
        return self.exists(join(directory, OPAQUE))

    def add_whiteout(self, directory: bytes, name: bytes) -> None:
        _touch(self.path(join(directory, whiteout_name(name))))

    def drop_whiteout(self, directory: bytes, name: bytes) -> None:
        with _ignoring(errno.ENOENT):
            os.unlink(self.path(join(directory, whiteout_name(name))))

    def make_opaque(self, directory: bytes) -> None:
        _touch(self.path(join(directory, OPAQUE)))

    def listing(self, directory: bytes) -> tuple[dict[bytes, int], set[bytes], bool]:
        """Returns the upper directory's visible names (with their type bits), the names it
        whites out, and whether it is opaque; all empty if there is no such directory."""
        names: dict[bytes, int] = {}
        whiteouts: set[bytes] = set()
        opaque = False
        try:
            scanner = os.scandir(self.path(directory))
        except (FileNotFoundError, NotADirectoryError):
            return names, whiteouts, opaque
        with scanner:
            for item in scanner:
                name = os.fsencode(item.name)
                if name == OPAQUE:
                    opaque = True
                elif name.startswith(WHITEOUT):
                    whiteouts.add(name[len(WHITEOUT) :])
                else:
                    names[name] = stat.S_IFMT(item.stat(follow_symlinks=False).st_mode)
        return names, whiteouts, opaque

    def clear_markers(self, directory: bytes) -> None:
        """Removes the whiteouts and opaque marker a directory about to be removed still has
        (the merged view found it empty, so nothing else is left in it)."""
        for name in os.listdir(self.path(directory)):
            if name.startswith(WHITEOUT):
                os.unlink(self.path(join(directory, name)))

    # ------------------------------------------------------------ what a file shows

    def shown(self, relative: bytes, info: os.stat_result, may_have_override: bool = True) -> Shown:
        """Returns what the upper file shows: its override_stat where it has one, else the disk."""
        override = self.override(relative, info) if may_have_override else None
        if override is None:
            return Shown(info.st_mode, info.st_uid, info.st_gid, info.st_rdev)
        kind = _KIND_BITS[override.kind] if override.kind else stat.S_IFMT(info.st_mode)
        rdev = os.makedev(override.major, override.minor) if override.kind in ("char", "block") else info.st_rdev
        return Shown(kind | override.mode, override.uid, override.gid, rdev)

    def override(self, relative: bytes, info: os.stat_result) -> OverrideStat | None:
        if stat.S_ISLNK(info.st_mode):
            return None  # Linux keeps no user xattrs on symlinks
        try:
            value = os.getxattr(self.path(relative), OVERRIDE_STAT_XATTR, follow_symlinks=False)
        except OSError:
            return None
        try:
            return parse_override_stat(value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None  # a damaged override: the disk's own metadata is the safe answer

    def set_shown(self, relative: bytes, wanted: Shown, may_have_override: bool = True) -> bool:
        """Makes the file show `wanted`: on disk where the server may set it, the rest in
        override_stat (and an override dropped when the disk says it all; a new file has none,
        `may_have_override` False). Returns whether the file keeps an override. Touches the
        disk only where it differs: a create as its own owner costs one lstat."""
        path = self.path(relative)
        info = os.lstat(path)
        kind = stat.S_IFMT(wanted.mode)
        owner_set = (info.st_uid, info.st_gid) == (wanted.uid, wanted.gid)
        chowned = False
        if not owner_set:
            try:
                os.chown(path, wanted.uid, wanted.gid, follow_symlinks=False)
                owner_set = chowned = True
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EINVAL):
                    raise
        if kind == stat.S_IFLNK:
            return False  # no mode to set, and no xattr to keep the rest in
        disk_mode = disk_permissions(wanted.mode)
        if chowned or stat.S_IMODE(info.st_mode) != disk_mode:  # a chown drops setuid bits: set them again
            os.chmod(path, disk_mode, follow_symlinks=False)
        disk_kind_matches = stat.S_IFMT(info.st_mode) == kind and (
            kind not in (stat.S_IFCHR, stat.S_IFBLK) or info.st_rdev == wanted.rdev)
        if owner_set and disk_mode == stat.S_IMODE(wanted.mode) and disk_kind_matches:
            if may_have_override:
                # EPERM: FIFOs and device nodes take no user xattrs, so they have none to remove
                with _ignoring(errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    os.removexattr(path, OVERRIDE_STAT_XATTR, follow_symlinks=False)
            return False
        os.setxattr(path, OVERRIDE_STAT_XATTR, override_text(wanted, stat.S_IFMT(info.st_mode)),
                    follow_symlinks=False)  # fmt: skip
        return True

    def metacopy_source(self, relative: bytes) -> bytes | None:
        """The image path whose bytes a metadata-only copy shows; None for an ordinary file."""
        try:
            return os.getxattr(self.path(relative), METACOPY_XATTR, follow_symlinks=False)
        except OSError:
            return None

    # ------------------------------------------------------------ making entries

    def make_node(self, relative: bytes, mode: int, rdev: int) -> None:
        """Makes a FIFO, socket or device node; a regular file stands in for what the server
        may not make (a device node, unprivileged), its type then kept in override_stat."""
        path = self.path(relative)
        try:
            os.mknod(path, mode | 0o600, rdev)
        except PermissionError:
            if stat.S_IFMT(mode) not in (stat.S_IFCHR, stat.S_IFBLK):
                raise
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))

    def new_file_fd(self, directory: bytes) -> tuple[int, bytes | None]:
        """Returns a descriptor of a new, nameless file in `directory` (O_TMPFILE) for a copy
        to fill before it gets its name: a crash leaves nothing visible. Where the file system
        has no O_TMPFILE, a file named as no merged name can be (a `.wh..wh.` bookkeeping name,
        which the merge never shows), and that name."""
        if self._tmpfile_works:
            try:
                return os.open(self.path(directory), os.O_TMPFILE | os.O_RDWR, 0o600), None
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile_works = False
        temporary = join(directory, b".wh..wh.crfs-copy-" + os.urandom(6).hex().encode())
        return os.open(self.path(temporary), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), temporary

    def give_name(self, fd: int, temporary: bytes | None, relative: bytes) -> None:
        """Names a file made by new_file_fd: atomically, and never over an existing name."""
        if temporary is None:
            _link_following(f"/proc/self/fd/{fd}".encode(), self.path(relative))
        else:
            os.link(self.path(temporary), self.path(relative))
            os.unlink(self.path(temporary))

    def sync_directory(self, relative: bytes) -> None:
        fd = os.open(self.path(relative), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_permissions(mode: int) -> int:
    """The permission bits a file shown with `mode` gets on disk: the same, except that a
    server without root keeps the access it needs to its own files."""
    return stat.S_IMODE(mode) | (0 if _is_root() else _OWNER_ACCESS.get(stat.S_IFMT(mode), 0o600))


def override_text(wanted: Shown, disk_kind: int) -> bytes:
    """The override_stat value for `wanted`, with the type field where the disk's differs."""
    text = f"{wanted.uid}:{wanted.gid}:{stat.S_IMODE(wanted.mode):o}"
    kind = stat.S_IFMT(wanted.mode)
    if kind != disk_kind:
        name = _KIND_NAMES[kind]
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            name += f"-{os.major(wanted.rdev)}-{os.minor(wanted.rdev)}"
        text += f":{name}"
    return text.encode()


def _link_following(source: bytes, destination: bytes) -> None:
    """linkat(AT_SYMLINK_FOLLOW): what names an O_TMPFILE file through /proc without
    CAP_DAC_READ_SEARCH. (Python's os.link calls link(2) on Linux, which links the /proc
    symlink itself and fails with EXDEV.)"""
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc().linkat(at_fdcwd, source, at_fdcwd, destination, at_symlink_follow) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), destination)


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


def _touch(path: bytes) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))


def _is_root() -> bool:
    return os.geteuid() == 0


class _ignoring:
    """Suppresses OSErrors with the given errno values."""

    def __init__(self, *numbers: int) -> None:
        self._numbers = numbers

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        return isinstance(exc, OSError) and exc.errno in self._numbers
