"""The writable mount against kernel overlayfs, operation by operation (issue 10).

A small image of several layers (files, nested directories, symlinks, a hardlink pair, odd
modes and owners, xattrs, a fifo and a device; a whiteout, an opaque directory and a
replaced file in later layers) is mounted writable, and its merged tree, exported, is the
lower directory of a kernel overlayfs mount: the oracle. A hypothesis state machine applies
each operation to both (create with O_EXCL, O_TRUNC or O_APPEND, write at offsets, fallocate,
truncate, mkdir, rmdir, unlink, rm -rf, rename with and without RENAME_NOREPLACE/RENAME_EXCHANGE,
link, symlink, mkfifo, mknod, chmod, chown, utimensat, set/remove xattrs, and a remount of
both), on names of the image and new names, and after every step asks that both returned the
same errno and that both trees are equal entry by entry.

The reference is fixed by its mount options, whatever the module's defaults:
- redirect_dir=off: a directory that has a lower part cannot be renamed (EXDEV, so `mv`
  copies and deletes), which is what the writable mount promises (README: "Renaming a
  directory that has a lower part is EXDEV"; a redirect needs a marker OCI layers lack).
- index=on: a lower file with two names keeps one inode for both after a copy-up, as the
  issue asks ("a lower file keeps one inode for all its names after copy-up"); with
  index=off kernel overlayfs itself breaks the pair, and the oracle would be the one wrong.
- metacopy=off, xino=off: plain full copy-ups; inode numbers are not compared anyway.
- nodev/nosuid as the mount under test has them, so opening a device answers alike.

What is compared, and what is not, and why:
- Per entry: type and mode, owner, size and bytes of files, symlink targets, device
  numbers, user.* xattrs and security.capability, link counts of non-directories and which
  names share an inode (not the inode numbers themselves).
- Times only where a program or the image set them: a time equal to the image's or one
  given to utimensat must be equal on both; a time the clock set is not compared.
- Not the link count of directories: kernel overlayfs reports 1 for a merged directory
  (a shortcut its source says "pacifies find"), so it says nothing about correctness.
- Lookups as well as readdir: names that a whiteout hides, and `.wh.` names, are stat'ed
  on both sides, so a name that readdir hides but lookup finds is seen.

Where the mount under test answers otherwise on purpose, DEPARTURES names the steps and why
(creating a `.wh.` name: EINVAL). A mismatch found and reported but not fixed yet goes in
KNOWN_MISMATCHES, so the sequences go on past it, with a plain test that shows it.
CRFS_DIFF_EXAMPLES and CRFS_DIFF_STEPS raise the number and length of the random sequences for a
long local run;
CRFS_DIFF_TARGET=fuse-overlayfs runs the same machine against fuse-overlayfs instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from registry.layout_writer import write_layout
from tests.conftest import COMMAND, IN_CI, require, unmount
from tests.tarvocab import MTIME, d, dev, f, fifo, hl, opq, sym, tar_of, wh

TARGET = os.environ.get("CRFS_DIFF_TARGET", "crfs-merge")
EXAMPLES = int(os.environ.get("CRFS_DIFF_EXAMPLES", "30"))
STEPS = int(os.environ.get("CRFS_DIFF_STEPS", "25"))
REMOUNT_TRIES = 50
# What a mount says while the server of the mount just unmounted there has not exited yet.
SERVER_STILL_EXITING = ("another crfs-merge mount is writing to it", "is already mounting or serving it")

# --- the image ------------------------------------------------------------------------------

# A file capability (VFS_CAP_REVISION_2, permitted CAP_NET_RAW), as `setcap cap_net_raw+p` writes.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000000, 1 << 13, 0, 0, 0).decode("latin-1")
BIG = bytes(range(256)) * 800  # 204,800 bytes: writes land in the middle, at the end, past it

BASE = [
    d("etc/"), f("etc/hosts", b"127.0.0.1 localhost\n"), f("etc/motd", b"welcome\n"),
    f("etc/shadow", b"root:*:19000::::::\n", mode=0o640, gid=42),
    sym("etc/hosts.link", "hosts"), sym("etc/dangling", "missing"), sym("etc/localtime", "/usr/share/zoneinfo/UTC"),
    d("usr/"), d("usr/bin/"), f("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
    f("usr/bin/su", b"\x7fELF su", mode=0o4755), f("usr/bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
    f("usr/bin/ping", b"\x7fELF ping", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
    d("usr/share/"), d("usr/share/doc/", xattrs={"user.dir": "doc"}), d("usr/share/doc/pkg/"),
    f("usr/share/doc/pkg/README", b"read me\n"), d("usr/share/doc/pkg/examples/"),
    f("usr/share/doc/pkg/examples/one", b"1\n"), d("usr/share/empty/"),
    d("home/"), d("home/user/", mode=0o700, uid=1000, gid=1000),
    f("home/user/.profile", b"PATH=/bin\n", mode=0o600, uid=1000, gid=1000),
    d("srv/", mode=0o2775, gid=50), f("srv/site", b"<html>", gid=50), d("srv/www/", mode=0o2775, gid=50),
    d("tmp/", mode=0o1777),
    d("data/"), f("data/big", BIG), f("data/a", b"pair"), hl("data/b", "data/a"),
    f("data/x", b"x", xattrs={"user.note": "lower", "user.other": "2"}), f("data/empty"),
    fifo("data/fifo"), dev("data/null", "c", 1, 3),
    d("var/"), d("var/cache/"), f("var/cache/old", b"old"), d("var/cache/sub/"), f("var/cache/sub/deep", b"deep"),
    d("var/empty/"), d("var/log/"), f("var/log/messages", b"log\n"),
    d("var/lib/"), d("var/lib/gone/"), f("var/lib/gone/file", b"gone"),
]  # fmt: skip
LATER = [
    wh("etc/motd"), f("etc/hosts", b"127.0.0.1 localhost changed\n", mode=0o600),
    d("var/cache/"), opq("var/cache/"), f("var/cache/new", b"new"), wh("var/lib/gone"),
    d("usr/share/doc/pkg/", mode=0o750), f("data/late", b"late", mode=0o640, uid=1234, gid=5678),
]  # fmt: skip
LAST = [wh("usr/share/empty"), d("opt/"), d("opt/app/"), f("opt/app/run", b"run", mode=0o700),
        sym("opt/app/current", "run")]  # fmt: skip

# Names the image had that a later layer hides, and names the spec reserves: looked up on both.
HIDDEN_NAMES = ["etc/motd", "etc/.wh.motd", "var/cache/old", "var/cache/.wh..wh..opq", "var/lib/gone",
                "var/lib/.wh.gone", "usr/share/empty", "usr/share/.wh.empty"]  # fmt: skip

# --- what operations draw from --------------------------------------------------------------

MISSING = "missing"  # a name at the top that is mostly absent: draws never come from an empty list
NEW_NAMES = ["new", "n2", "sub", ".hidden", "hosts", "cache", "a"]
SYMLINK_TARGETS = ["hosts", "missing", "sub", ".", "..", "a/b", "../etc/hosts", "/etc/passwd"]
MODES = [0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o1777, 0o7777, 0o640]
OWNERS = [-1, 0, 1000, 1234, 65534]
OFFSETS = [0, 1, 4095, 4096, 70_000, len(BIG) - 1, len(BIG), 300_000]
SIZES = [0, 1, 3, 4096, 100_000, len(BIG), 400_000]
UTIMES_NS = [1_600_000_000_123_456_789, 946_684_800_000_000_000, 0]
EXPLICIT_TIMES_NS = {MTIME * 1_000_000_000, *UTIMES_NS}
XATTR_NAMES = ["user.note", "user.new", "user.other"]
XATTR_VALUES = [b"", b"v", b"x" * 300]
COMPARED_XATTRS = ("user.", "security.capability")
data_bytes = st.one_of(st.binary(max_size=64), st.sampled_from([b"z" * 5000, bytes(70_000)]))

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(source: str, target: str, flags: int) -> None:
    """rename(2) with flags, which Python's os module does not offer."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), source)


# --- the operations, each on one root -------------------------------------------------------

OPEN_FLAGS = {"plain": 0, "excl": os.O_EXCL, "trunc": os.O_TRUNC, "append": os.O_APPEND}


def op_create(root: str, path: str, how: str, mode: int, data: bytes) -> None:
    # O_NONBLOCK: opening a fifo for writing then answers ENXIO instead of waiting for a reader.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | OPEN_FLAGS[how]
    fd = os.open(os.path.join(root, path), flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def op_write_at(root: str, path: str, offset: int, data: bytes) -> None:
    fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def op_truncate(root: str, path: str, size: int) -> None:
    os.truncate(os.path.join(root, path), size)


def op_fallocate(root: str, path: str, offset: int, length: int) -> None:
    fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.posix_fallocate(fd, offset, length)
    finally:
        os.close(fd)


def op_mkdir(root: str, path: str, mode: int) -> None:
    os.mkdir(os.path.join(root, path), mode)


def op_rmdir(root: str, path: str) -> None:
    os.rmdir(os.path.join(root, path))


def op_unlink(root: str, path: str) -> None:
    os.unlink(os.path.join(root, path))


def op_remove_tree(root: str, path: str) -> None:
    """rm -rf: children before their directory; the first error ends it, as on both sides alike."""
    top = os.path.join(root, path)
    if not os.path.isdir(top) or os.path.islink(top):
        os.unlink(top)
        return
    for directory, dirs, files in os.walk(top, topdown=False):  # a subdirectory is empty when its turn comes
        for entry in (os.path.join(directory, name) for name in dirs + files):
            (os.rmdir if stat.S_ISDIR(os.lstat(entry).st_mode) else os.unlink)(entry)
    os.rmdir(top)


def op_rename(root: str, source: str, target: str, flags: int) -> None:
    renameat2(os.path.join(root, source), os.path.join(root, target), flags)


def op_link(root: str, source: str, target: str) -> None:
    os.link(os.path.join(root, source), os.path.join(root, target), follow_symlinks=False)


def op_symlink(root: str, path: str, target: str) -> None:
    os.symlink(target, os.path.join(root, path))


def op_mkfifo(root: str, path: str, mode: int) -> None:
    os.mkfifo(os.path.join(root, path), mode)


def op_mknod_null(root: str, path: str, mode: int) -> None:
    os.mknod(os.path.join(root, path), stat.S_IFCHR | mode, os.makedev(1, 3))


def op_chmod(root: str, path: str, mode: int) -> None:
    os.chmod(os.path.join(root, path), mode)


def op_chown(root: str, path: str, uid: int, gid: int) -> None:
    os.chown(os.path.join(root, path), uid, gid, follow_symlinks=False)


def op_utime(root: str, path: str, atime_ns: int, mtime_ns: int) -> None:
    os.utime(os.path.join(root, path), ns=(atime_ns, mtime_ns), follow_symlinks=False)


def op_setxattr(root: str, path: str, name: str, value: bytes, flags: int) -> None:
    os.setxattr(os.path.join(root, path), name, value, flags, follow_symlinks=False)


def op_removexattr(root: str, path: str, name: str) -> None:
    os.removexattr(os.path.join(root, path), name, follow_symlinks=False)


# Operations that follow a symlink in their last component: run only where both sides
# resolve inside their own root, so that a symlink such as etc/localtime -> /usr/... never
# makes the test write to the host.
FOLLOWS_LAST_SYMLINK = {op_create, op_write_at, op_fallocate, op_truncate, op_chmod}


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as error:
        return error.errno or -1
    return 0


def stays_inside(root: str, path: str, follow: bool) -> bool:
    """Whether `path` (relative) resolves under `root`: its parent, and itself if followed."""
    full = os.path.join(root, path)
    resolved = os.path.realpath(full if follow else os.path.dirname(full))
    return resolved == root or resolved.startswith(root + os.sep)


# --- describing a tree ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """What is compared of one entry (see the module's docstring)."""

    mode: int
    uid: int
    gid: int
    size: int
    content: str
    xattrs: tuple[tuple[str, bytes | str], ...]
    nlink: int
    mtime_ns: int
    names_of_inode: tuple[str, ...] = ()


def _compared_xattrs(path: str) -> tuple[tuple[str, bytes | str], ...]:
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith(COMPARED_XATTRS)]
    return tuple(sorted((n, _xattr_value(path, n)) for n in names))


def _xattr_value(path: str, name: str) -> bytes | str:
    """The value, or the errno reading it gave: a name listed but unreadable is a difference too."""
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as error:
        return _errno_name(error.errno or 0)


def _content(path: str, info: os.stat_result) -> str:
    if stat.S_ISREG(info.st_mode):
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()[:16]
    if stat.S_ISLNK(info.st_mode):
        return "-> " + os.readlink(path)
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        return f"dev {os.major(info.st_rdev)},{os.minor(info.st_rdev)}"
    return ""


def _row(path: str, info: os.stat_result) -> Row:
    is_dir = stat.S_ISDIR(info.st_mode)
    size = 0 if is_dir or stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode) else info.st_size
    return Row(info.st_mode, info.st_uid, info.st_gid, size, _content(path, info), _compared_xattrs(path),
               0 if is_dir else info.st_nlink, info.st_mtime_ns)  # fmt: skip


def describe(root: str) -> dict[str, Row]:
    """{relative path: Row} of every entry under `root`, with the names sharing each inode."""
    rows: dict[str, Row] = {}
    inode_of: dict[str, int] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            rel = os.path.relpath(full, root)
            rows[rel] = _row(full, info)
            if not stat.S_ISDIR(info.st_mode):
                inode_of[rel] = info.st_ino
    names: dict[int, list[str]] = {}
    for rel, ino in inode_of.items():
        names.setdefault(ino, []).append(rel)
    for rel, ino in inode_of.items():
        if len(names[ino]) > 1:
            rows[rel] = replace(rows[rel], names_of_inode=tuple(sorted(names[ino])))
    return rows


def comparable(row: Row, other: Row) -> tuple[Row, Row]:
    """The two rows with times blanked unless one of them is a time a program or the image set."""
    if row.mtime_ns in EXPLICIT_TIMES_NS or other.mtime_ns in EXPLICIT_TIMES_NS:
        return row, other
    return replace(row, mtime_ns=0), replace(other, mtime_ns=0)


def blind(path: str, row: Row) -> Row:
    """The row less what a known mismatch (below) blinds."""
    for known in known_mismatches():
        row = known.blinds(path, row)
    return row


def tree_differences(reference: dict[str, Row], tested: dict[str, Row]) -> list[str]:
    """One line per path whose entry differs, or that only one tree has."""
    lines = []
    for path in sorted(set(reference) | set(tested)):
        if path not in tested:
            lines.append(f"{path}: only in kernel overlayfs: {reference[path]}")
        elif path not in reference:
            lines.append(f"{path}: only in {TARGET}: {tested[path]}")
        else:
            ours, theirs = comparable(blind(path, reference[path]), blind(path, tested[path]))
            if ours != theirs:
                lines.append(f"{path}: kernel overlayfs {ours}\n    {TARGET} {theirs}")
    return lines


# --- where the mount under test answers otherwise -------------------------------------------


@dataclass(frozen=True)
class Step:
    """One operation with its arguments, and the reference's tree before it."""

    op: Callable[..., None]
    paths: tuple[str, ...]
    args: tuple[object, ...]
    tree: dict[str, Row]

    def kind(self, index: int = 0) -> int | None:
        """The file type of the step's index'th path before the step; None if it does not exist."""
        row = self.tree.get(os.path.normpath(self.paths[index]))
        return None if row is None else stat.S_IFMT(row.mode)

    def row(self, index: int = 0) -> Row:
        return self.tree[os.path.normpath(self.paths[index])]

    def __str__(self) -> str:
        return f"{self.op.__name__}({', '.join(_short(a) for a in (*self.paths, *self.args))})"


@dataclass(frozen=True)
class Departure:
    """Steps where the mount under test answers `errno` on purpose; kernel overlayfs is not asked."""

    name: str
    why: str
    matches: Callable[[Step], bool]
    errno: int


def _makes_a_reserved_name(step: Step) -> bool:
    last = os.path.basename(step.paths[-1])
    makes = step.op in (op_create, op_mkdir, op_mkfifo, op_mknod_null, op_symlink, op_link, op_rename)
    source_exists = step.op not in (op_link, op_rename) or step.kind(0) is not None  # else ENOENT first
    parent = os.path.dirname(os.path.normpath(step.paths[-1]))
    parent_is_a_directory = not parent or (parent in step.tree and stat.S_ISDIR(step.tree[parent].mode))
    return makes and last.startswith(".wh.") and step.kind(-1) is None and source_exists and parent_is_a_directory


DEPARTURES: dict[str, list[Departure]] = {
    "crfs-merge": [
        Departure(
            name=".wh. names are refused",
            why="the OCI layer spec reserves the prefix for whiteouts, and DIR is a layer: a file .wh.x "
            "made in it would delete x from the committed image",
            matches=_makes_a_reserved_name,
            errno=errno.EINVAL,
        ),
    ],
}


@dataclass(frozen=True)
class KnownMismatch:
    """A difference this test found and reported, not fixed yet. So that the random sequences go
    on past it, the steps it `leaves_out` are done on neither side, and the rows it `blinds` are
    compared without the field it names; `shown_by` is the plain test below that keeps it
    visible (xfail, strict: it fails the day the mismatch is fixed, to remove this entry too)."""

    name: str
    shown_by: str
    leaves_out: Callable[[Step], bool] = lambda step: False
    blinds: Callable[[str, Row], Row] = lambda path, row: row


def _opens_a_file_with_capabilities_for_writing(step: Step) -> bool:
    writes = step.op in (op_create, op_write_at, op_fallocate, op_truncate) or (
        step.op is op_open and isinstance(flags := step.args[0], int) and bool(flags & (os.O_WRONLY | os.O_RDWR))
    )
    return writes and step.kind() == stat.S_IFREG and any(n == "security.capability" for n, _ in step.row().xattrs)


# The seven mismatches this test found before are fixed; their shortest sequences stay below as tests.
KNOWN_MISMATCHES: dict[str, list[KnownMismatch]] = {
    "crfs-merge": [
        KnownMismatch(
            "filling a metadata-only copy loses security.capability",
            "test_opening_for_writing_after_a_chmod_keeps_file_capabilities",
            leaves_out=_opens_a_file_with_capabilities_for_writing,
        ),
    ],
}


def known_mismatches() -> list[KnownMismatch]:
    return KNOWN_MISMATCHES.get(TARGET, [])


# --- the two mounts ---------------------------------------------------------------------------

REFERENCE_OPTIONS = "redirect_dir=off,index=on,metacopy=off,xino=off"


@dataclass
class World:
    """What every sequence shares: the image, its merged tree, the cache, and a scratch dir."""

    image: str
    lower: Path
    cache: Path
    scratch: Path
    sequences: int = 0

    def new_base(self) -> Path:
        self.sequences += 1
        base = self.scratch / f"seq{self.sequences}"
        base.mkdir()
        return base


def mount_under_test(world: World, base: Path) -> Path:
    """Mounts the writable mount being tested over base's upper directory (new, or as an earlier
    mount left it); returns the mountpoint."""
    mountpoint = base / "tested"
    mountpoint.mkdir(exist_ok=True)
    if TARGET == "fuse-overlayfs":
        (base / "fo-upper").mkdir(exist_ok=True)
        (base / "fo-work").mkdir(exist_ok=True)
        options = f"lowerdir={world.lower},upperdir={base / 'fo-upper'},workdir={base / 'fo-work'}"
        command = ["fuse-overlayfs", "-o", options, str(mountpoint)]
    else:
        command = [*COMMAND, "--cache-dir", str(world.cache), "--upper", str(base / "upper"), world.image,
                   str(mountpoint)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    for _ in range(REMOUNT_TRIES):
        if not any(busy in run.stderr for busy in SERVER_STILL_EXITING):
            break
        time.sleep(0.1)  # the previous server exits just after its unmount, releasing its locks
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{TARGET} did not mount: {run.stderr}"
    return mountpoint


def mount_flags(mountpoint: Path) -> list[str]:
    """The nodev/nosuid flags the kernel applies to the mount at `mountpoint`."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return [flag for flag in fields[5].split(",") if flag in ("nodev", "nosuid")]
    raise AssertionError(f"{mountpoint} is not mounted")


def mount_reference(world: World, base: Path, flags: list[str]) -> Path:
    """Mounts kernel overlayfs over the image's merged tree, with fixed options; returns it."""
    mountpoint, upper, work = base / "reference", base / "ref-upper", base / "ref-work"
    for directory in (mountpoint, upper, work):
        directory.mkdir(exist_ok=True)
    options = ",".join([f"lowerdir={world.lower},upperdir={upper},workdir={work}", REFERENCE_OPTIONS, *flags])
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    return mountpoint


def unmount_reference(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint) and subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
        subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, fuse_works: None) -> World:
    require(os.geteuid() == 0, "mounting kernel overlayfs, the reference, needs root")
    require("overlay" in Path("/proc/filesystems").read_text() or _load_overlay(), "kernel overlayfs is missing")
    if TARGET == "fuse-overlayfs":
        require(
            shutil.which("fuse-overlayfs") is not None, "fuse-overlayfs is missing (apt-get install fuse-overlayfs)"
        )
    root = tmp_path_factory.mktemp("differential")
    write_layout(root / "image", [tar_of(*BASE), tar_of(*LATER), tar_of(*LAST)])
    world = World(f"oci:{root / 'image'}:latest", root / "lower", root / "cache", root / "scratch")
    world.scratch.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(world.cache), "--export", str(world.lower), world.image],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return world


def _load_overlay() -> bool:
    return subprocess.run(["modprobe", "overlay"], capture_output=True).returncode == 0


# --- descriptors held open ---------------------------------------------------------------------

MAX_HANDLES = 3


@dataclass(frozen=True)
class Handle:
    """One file opened alike on both mounts (the reference's descriptor first)."""

    path: str
    writable: bool
    fds: tuple[int, int]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def __str__(self) -> str:
        return f"descriptor of {self.path} ({'rw' if self.writable else 'ro'})"


def op_open(root: str, path: str, flags: int) -> None:
    os.close(os.open(os.path.join(root, path), flags))


def _open(path: str, flags: int) -> int:
    """A descriptor, or minus the errno."""
    try:
        return os.open(path, flags)
    except OSError as error:
        return -(error.errno or 1)


def describe_open_file(fd: int) -> Row:
    """What fstat and pread show through a descriptor, as a Row (with neither xattrs nor times)."""
    info = os.fstat(fd)
    content = ""
    if stat.S_ISREG(info.st_mode):
        content = hashlib.sha256(os.pread(fd, info.st_size + 1, 0)).hexdigest()[:16]
    link_count = 0 if stat.S_ISDIR(info.st_mode) else info.st_nlink
    size = info.st_size if stat.S_ISREG(info.st_mode) else 0
    return Row(info.st_mode, info.st_uid, info.st_gid, size, content, (), link_count, 0)


# --- the state machine ------------------------------------------------------------------------


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(value) if isinstance(value, bytes) else '?'})"


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number)) if number else "success"


def assert_same_errno(what: str, expected: int, got: int, source: str = "kernel overlayfs") -> None:
    assert got == expected, f"{what}: {source} {_errno_name(expected)}, {TARGET} {_errno_name(got)}"


class Differential(RuleBasedStateMachine):
    """Each sequence: fresh mounts over fresh upper directories, the same steps on both."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world, self.base = world, world.new_base()
        self.tested_root = self.reference_root = ""
        self.mount_both()
        self.reference_tree = describe(self.reference_root)
        self.step_paths: list[str] = []
        self.handles: list[Handle] = []

    def mount_both(self) -> None:
        try:
            tested = mount_under_test(self.world, self.base)
            self.tested_root = str(tested)
            self.reference_root = str(mount_reference(self.world, self.base, mount_flags(tested)))
        except BaseException:
            self.teardown()
            raise

    def unmount_both(self) -> None:
        if self.reference_root:
            unmount_reference(Path(self.reference_root))
        if self.tested_root:
            unmount(Path(self.tested_root))

    def teardown(self) -> None:
        self.close_handles()
        self.unmount_both()
        shutil.rmtree(self.base, ignore_errors=True)

    @rule()
    def remount(self) -> None:
        """Both unmounted and mounted again over their upper directories: what a mount shows must
        be what its upper directory holds, not only what its server or the kernel remember."""
        self.close_handles()  # an open file keeps a mount busy
        self.unmount_both()
        self.mount_both()

    # -- descriptors held across steps: a copy-up, rename or unlink under an open file

    @rule(data=st.data(), writable=st.booleans())
    def open_handle(self, data: st.DataObject, writable: bool) -> None:
        path = self.existing(data)
        roots = (self.reference_root, self.tested_root)
        if not all(stays_inside(root, path, follow=True) for root in roots):
            return
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
        if any(known.leaves_out(Step(op_open, (path,), (flags,), self.reference_tree)) for known in known_mismatches()):
            return
        opened = [_open(os.path.join(root, path), flags) for root in roots]
        if all(fd >= 0 for fd in opened):
            self.handles.append(Handle(path, writable, (opened[0], opened[1])))
            if len(self.handles) > MAX_HANDLES:
                self.handles.pop(0).close()
            return
        for fd in (fd for fd in opened if fd >= 0):
            os.close(fd)
        expected, got = (-fd if fd < 0 else 0 for fd in opened)
        assert_same_errno(f"open({path}, {flags:#o})", expected, got)

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), content=data_bytes)
    def write_to_handle(self, data: st.DataObject, offset: int, content: bytes) -> None:
        handle = data.draw(st.sampled_from(self.handles), label="handle")
        expected, got = (errno_of(functools.partial(os.pwrite, fd, content, offset)) for fd in handle.fds)
        assert_same_errno(f"pwrite({handle}, {_short(content)}, {offset})", expected, got)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close_handle(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.handles), label="handle")
        self.handles.remove(handle)
        handle.close()

    def close_handles(self) -> None:
        while self.handles:
            self.handles.pop().close()

    # -- drawing paths: names of the tree as it is now, and new names in its directories

    def existing(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from([*sorted(self.reference_tree), MISSING]), label="path")

    def anywhere(self, data: st.DataObject) -> str:
        kind = data.draw(st.sampled_from(["existing", "new", "below a non-directory"]), label="kind")
        if kind == "existing":
            return self.existing(data)
        if kind == "new":
            parent = data.draw(st.sampled_from(["", *self._directories()]), label="parent")
            return os.path.join(parent, data.draw(st.sampled_from(NEW_NAMES), label="name"))
        return os.path.join(data.draw(st.sampled_from(self._non_directories()), label="parent"), "x")

    def _directories(self) -> list[str]:
        """The tree's directories, and a name that is none (rm -rf may leave no directory at all)."""
        return [*sorted(p for p, row in self.reference_tree.items() if stat.S_ISDIR(row.mode)), MISSING]

    def _non_directories(self) -> list[str]:
        return [*sorted(p for p, row in self.reference_tree.items() if not stat.S_ISDIR(row.mode)), MISSING]

    # -- one step on both sides

    def apply(
        self, op: Callable[..., None], paths: tuple[str, ...], *args: object, leave_out_known: bool = True
    ) -> None:
        follow = op in FOLLOWS_LAST_SYMLINK
        roots = (self.reference_root, self.tested_root)
        if not all(stays_inside(root, path, follow) for root in roots for path in paths):
            return  # through a symlink out of the tree: not done on either side
        step = Step(op, paths, args, self.reference_tree)
        if any(known.leaves_out(step) for known in known_mismatches()):
            return  # reported, and shown by its own xfail test: left out so the sequence goes on
        self.step_paths = list(paths)
        departure = next((d for d in DEPARTURES.get(TARGET, []) if d.matches(step)), None)
        expected = departure.errno if departure else errno_of(lambda: op(self.reference_root, *paths, *args))
        got = errno_of(lambda: op(self.tested_root, *paths, *args))
        assert_same_errno(
            str(step), expected, got, f"departure {departure.name!r}" if departure else "kernel overlayfs"
        )

    @rule(data=st.data(), how=st.sampled_from(list(OPEN_FLAGS)), mode=st.sampled_from(MODES), content=data_bytes)
    def create(self, data: st.DataObject, how: str, mode: int, content: bytes) -> None:
        self.apply(op_create, (self.anywhere(data),), how, mode, content)

    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), content=data_bytes)
    def write_at(self, data: st.DataObject, offset: int, content: bytes) -> None:
        self.apply(op_write_at, (self.existing(data),), offset, content)

    @rule(data=st.data(), size=st.sampled_from(SIZES))
    def truncate(self, data: st.DataObject, size: int) -> None:
        self.apply(op_truncate, (self.existing(data),), size)

    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), length=st.sampled_from([1, 4096, 100_000]))
    def fallocate(self, data: st.DataObject, offset: int, length: int) -> None:
        self.apply(op_fallocate, (self.existing(data),), offset, length)

    @rule(data=st.data(), mode=st.sampled_from([0o755, 0o700, 0o2775, 0o1777]))
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        self.apply(op_mkdir, (self.anywhere(data),), mode)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        self.apply(op_rmdir, (self.existing(data),))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        self.apply(op_unlink, (self.existing(data),))

    @rule(data=st.data())
    def remove_tree(self, data: st.DataObject) -> None:
        directory = data.draw(st.sampled_from(self._directories()), label="directory")
        self.apply(op_remove_tree, (directory,))

    @rule(data=st.data(), flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data: st.DataObject, flags: int) -> None:
        self.apply(op_rename, (self.existing(data), self.anywhere(data)), flags)

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        self.apply(op_link, (self.existing(data), self.anywhere(data)))

    @rule(data=st.data(), pointing_to=st.sampled_from(SYMLINK_TARGETS))
    def symlink(self, data: st.DataObject, pointing_to: str) -> None:
        self.apply(op_symlink, (self.anywhere(data),), pointing_to)

    @rule(data=st.data(), op=st.sampled_from([op_mkfifo, op_mknod_null]), mode=st.sampled_from([0o644, 0o600]))
    def mknod(self, data: st.DataObject, op: Callable[..., None], mode: int) -> None:
        self.apply(op, (self.anywhere(data),), mode)

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        self.apply(op_chmod, (self.existing(data),), mode)

    @rule(data=st.data(), uid=st.sampled_from(OWNERS), gid=st.sampled_from(OWNERS))
    def chown(self, data: st.DataObject, uid: int, gid: int) -> None:
        self.apply(op_chown, (self.existing(data),), uid, gid)

    @rule(data=st.data(), atime=st.sampled_from(UTIMES_NS), mtime=st.sampled_from(UTIMES_NS))
    def utime(self, data: st.DataObject, atime: int, mtime: int) -> None:
        self.apply(op_utime, (self.existing(data),), atime, mtime)

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES), value=st.sampled_from(XATTR_VALUES),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))  # fmt: skip
    def setxattr(self, data: st.DataObject, name: str, value: bytes, flags: int) -> None:
        self.apply(op_setxattr, (self.existing(data),), name, value, flags)

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, data: st.DataObject, name: str) -> None:
        self.apply(op_removexattr, (self.existing(data),), name)

    @rule(data=st.data(), op=st.sampled_from(["create", "mkdir", "mknod", "symlink", "link", "rename"]))
    def create_a_reserved_name(self, data: st.DataObject, op: str) -> None:
        parent = data.draw(st.sampled_from(["", *self._directories()]), label="parent")
        path = os.path.join(parent, data.draw(st.sampled_from([".wh.new", ".wh..wh..opq"]), label="name"))
        if op in ("link", "rename"):  # of an existing file: the name is the only thing refused
            source = data.draw(st.sampled_from(self._non_directories()), label="source")
            self.apply(op_link if op == "link" else op_rename, (source, path), *(() if op == "link" else (0,)))
        else:
            make: dict[str, tuple[Callable[..., None], tuple[object, ...]]] = {
                "create": (op_create, ("excl", 0o644, b"x")), "mkdir": (op_mkdir, (0o755,)),
                "mknod": (op_mkfifo, (0o644,)), "symlink": (op_symlink, ("hosts",)),
            }  # fmt: skip
            self.apply(make[op][0], (path,), *make[op][1])

    # -- after every step

    @invariant()
    def trees_are_equal(self) -> None:
        self.reference_tree = describe(self.reference_root)
        differences = tree_differences(self.reference_tree, describe(self.tested_root))
        assert not differences, "the trees differ:\n" + "\n".join(differences)

    @invariant()
    def lookups_agree(self) -> None:
        for path in [*HIDDEN_NAMES, *self.step_paths]:
            expected, got = (errno_of(functools.partial(os.lstat, os.path.join(root, path)))
                             for root in (self.reference_root, self.tested_root))  # fmt: skip
            assert_same_errno(f"lstat({path})", expected, got)

    @invariant()
    def handles_agree(self) -> None:
        """What a program holding a descriptor sees: the file's metadata and bytes, even once it was
        copied up, renamed or unlinked since."""
        for handle in self.handles:
            expected, got = (blind(handle.path, describe_open_file(fd)) for fd in handle.fds)
            assert got == expected, f"{handle}: kernel overlayfs {expected}\n    {TARGET} {got}"


def test_writable_mount_matches_kernel_overlayfs(world: World) -> None:
    run_state_machine_as_test(
        lambda: Differential(world),
        # Under CI the same sequences every run (a fixed seed), so that what lands does not hang
        # on a draw; elsewhere new ones each run, which is how the mismatches were found.
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=IN_CI,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )  # fmt: skip


@contextlib.contextmanager
def both_mounts(world: World) -> Iterator[Differential]:
    """The machine's two fresh mounts, for a plain sequence of steps."""
    machine = Differential(world)
    try:
        yield machine
    finally:
        machine.teardown()


def op_remount(root: str) -> None:
    """Stands for a remount of both in run_steps' sequences (Differential.remount does it)."""


REMOUNT: tuple[Callable[..., None], tuple[str, ...], tuple[object, ...]] = (op_remount, (), ())


def run_steps(world: World, *steps: tuple[Callable[..., None], tuple[str, ...], tuple[object, ...]]) -> None:
    """Applies each step to both mounts and compares errnos and trees after each, as the machine does,
    without leaving out or blinding what a known mismatch would."""
    with both_mounts(world) as both, no_known_mismatches():
        for op, paths, args in steps:
            if op is op_remount:
                both.remount()
            else:
                both.apply(op, paths, *args)
            both.trees_are_equal()
            both.lookups_agree()


@contextlib.contextmanager
def no_known_mismatches() -> Iterator[None]:
    saved = KNOWN_MISMATCHES.pop(TARGET, [])
    try:
        yield
    finally:
        KNOWN_MISMATCHES[TARGET] = saved


# --- the mismatches the machine found, each as its shortest sequence ----------------------------


def test_a_lower_directory_renamed_over_a_non_empty_one_is_exdev(world: World) -> None:
    run_steps(world, (op_rename, ("data", "home"), (0,)))


def test_a_truncate_to_the_same_size_sets_mtime(world: World) -> None:
    run_steps(world, (op_truncate, ("data/x",), (1,)))


def test_copying_up_a_hardlinked_file_keeps_its_directory_mtime(world: World) -> None:
    # All the file's names are linked into DIR at its copy-up, which touched their directory on disk: the
    # running mount hid it until the kernel forgot the directory's inode; a remount shows DIR's.
    run_steps(world, (op_chmod, ("data/a",), (0o600,)), REMOUNT)


def test_unlinking_one_name_of_a_lower_hardlink_pair_leaves_one_link(world: World) -> None:
    run_steps(world, (op_unlink, ("data/a",), ()))


def test_a_directory_removed_while_open_still_answers_fstat_and_readdir(world: World) -> None:
    """`rm -rf` of a shell's working directory, then `ls` there: overlayfs shows an empty directory."""
    with both_mounts(world) as both:
        roots = (both.reference_root, both.tested_root)
        held = [os.open(os.path.join(root, "usr/share/doc/pkg/examples"), os.O_RDONLY) for root in roots]
        try:
            for root in roots:
                op_remove_tree(root, "usr/share/doc")
            expected, got = ((errno_of(functools.partial(os.fstat, fd)), errno_of(functools.partial(os.listdir, fd)))
                             for fd in held)  # fmt: skip
            assert got == expected  # (0, 0): kernel overlayfs shows the empty directory
        finally:
            for fd in held:
                os.close(fd)
        both.trees_are_equal()


def test_an_image_hardlink_pair_with_one_name_removed_keeps_one_link_after_a_remount(world: World) -> None:
    """Found by a long run (CRFS_DIFF_EXAMPLES=150): the link count came back as the image's
    after a remount, where overlayfs still counts the names that show."""
    run_steps(world, (op_unlink, ("data/a",), ()), REMOUNT)


def test_a_fifo_removed_with_its_directory_while_open_still_answers_fstat(world: World) -> None:
    """Found by a CI run's random sequences: a FIFO made in the mount, held open read-write,
    then `rm -rf` of its directory: fstat was ESTALE (the kernel opens a FIFO without asking
    the server, so no open count held it), where overlayfs shows it with no link."""
    with both_mounts(world) as both:
        roots = (both.reference_root, both.tested_root)
        for root in roots:
            op_mkfifo(root, "var/empty/new", 0o644)
        held = [os.open(os.path.join(root, "var/empty/new"), os.O_RDWR) for root in roots]
        try:
            for root in roots:
                op_remove_tree(root, "var")
            expected, got = (blind("var/empty/new", describe_open_file(fd)) for fd in held)
            assert got == expected
        finally:
            for fd in held:
                os.close(fd)
        both.trees_are_equal()


def test_an_image_file_removed_while_open_keeps_its_link_count_on_the_descriptor(world: World) -> None:
    """Found by a long run (CRFS_DIFF_EXAMPLES=100, seed 7): fstat of a read-only descriptor of an
    image file whose directory was removed showed no links, where overlayfs shows the image
    file's own count."""
    with both_mounts(world) as both:
        roots = (both.reference_root, both.tested_root)
        held = [os.open(os.path.join(root, "var/log/messages"), os.O_RDONLY) for root in roots]
        try:
            for root in roots:
                op_remove_tree(root, "var")
            expected, got = (os.fstat(fd).st_nlink for fd in held)
            assert got == expected
        finally:
            for fd in held:
                os.close(fd)
        both.trees_are_equal()


def test_opening_for_writing_after_a_chmod_keeps_file_capabilities(world: World) -> None:
    # chmod: a metadata-only copy; an open for writing (no write): the copy is filled with the bytes.
    run_steps(world, (op_chmod, ("usr/bin/ping",), (0o755,)), (op_open, ("usr/bin/ping",), (os.O_RDWR,)))


# --- inode numbers across a copy-up -------------------------------------------------------------

# Each case: (path whose number is watched, what copies it up, the names that must then carry that number).
COPY_UPS: dict[str, tuple[str, Callable[[str], None], tuple[str, ...]]] = {
    "write at the end of a file": ("data/big", lambda r: op_write_at(r, "data/big", len(BIG), b"!"), ("data/big",)),
    "truncate": ("var/log/messages", lambda r: op_truncate(r, "var/log/messages", 0), ("var/log/messages",)),
    "open with O_TRUNC": (
        "usr/share/doc/pkg/README",
        lambda r: op_create(r, "usr/share/doc/pkg/README", "trunc", 0o644, b"new"),
        ("usr/share/doc/pkg/README",),
    ),
    "chmod": ("etc/shadow", lambda r: op_chmod(r, "etc/shadow", 0o600), ("etc/shadow",)),
    "chown of a setuid file": ("usr/bin/su", lambda r: op_chown(r, "usr/bin/su", 1000, 1000), ("usr/bin/su",)),
    "utimensat": ("srv/site", lambda r: op_utime(r, "srv/site", 0, 0), ("srv/site",)),
    "setxattr": ("data/x", lambda r: op_setxattr(r, "data/x", "user.new", b"v", 0), ("data/x",)),
    "link": ("usr/bin/tool", lambda r: op_link(r, "usr/bin/tool", "usr/bin/tool2"), ("usr/bin/tool", "usr/bin/tool2")),
    "rename": ("opt/app/run", lambda r: op_rename(r, "opt/app/run", "opt/app/run2", 0), ("opt/app/run2",)),
    "chown of a symlink": ("etc/hosts.link", lambda r: op_chown(r, "etc/hosts.link", 7, 7), ("etc/hosts.link",)),
    "chmod of a fifo": ("data/fifo", lambda r: op_chmod(r, "data/fifo", 0o640), ("data/fifo",)),
    "chown of a device": ("data/null", lambda r: op_chown(r, "data/null", 7, 7), ("data/null",)),
    "chmod of a directory": (
        "usr/share/doc/pkg/examples",
        lambda r: op_chmod(r, "usr/share/doc/pkg/examples", 0o700),
        ("usr/share/doc/pkg/examples",),
    ),
    "a new entry in a lower directory": (
        "var/log",
        lambda r: op_create(r, "var/log/new", "excl", 0o644, b""),
        ("var/log",),
    ),
    "write to one name of a hardlink pair": (
        "data/a",
        lambda r: op_write_at(r, "data/a", 0, b"P"),
        ("data/a", "data/b"),
    ),
}


def test_copy_up_keeps_inode_numbers(world: World) -> None:
    """Programs (tar, rsync, find -inum, git's index) take an inode number for the file's
    identity: the number an image entry had stays on every name of it after its copy-up. Kernel
    overlayfs (xino=off, upper and lower on one file system) keeps them too, and is checked alike."""
    with both_mounts(world) as both:
        for root in (both.reference_root, both.tested_root):
            before = {case: os.lstat(os.path.join(root, path)).st_ino for case, (path, _, _) in COPY_UPS.items()}
            held = os.open(os.path.join(root, "etc/hosts"), os.O_RDONLY)  # open across its own copy-up
            try:
                held_before = os.fstat(held).st_ino
                for _, copy_up, _ in COPY_UPS.values():
                    copy_up(root)
                op_chmod(root, "etc/hosts", 0o600)
                assert os.fstat(held).st_ino == os.lstat(os.path.join(root, "etc/hosts")).st_ino == held_before
            finally:
                os.close(held)
            after = {case: {os.lstat(os.path.join(root, n)).st_ino for n in names}
                     for case, (_, _, names) in COPY_UPS.items()}  # fmt: skip
            assert {case: {number} for case, number in before.items()} == after, root
        both.trees_are_equal()
