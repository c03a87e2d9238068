"""The writable mount under test, and kernel overlayfs beside it, behind one interface.

`writable_mount(kind, ...)` is the single switch: "crfs-merge" mounts `crfs-merge --upper DIR
IMAGE MNT`; "overlayfs" mounts kernel overlayfs over the image unpacked by `crfs-merge
--export`, the reference the same programs can be run against (CRFS_WRITABLE_MOUNT=overlayfs).
Either gives, for `crfs-merge commit`, its changes as an upper directory in OCI diff form:
crfs-merge's DIR is one already; overlayfs's upper directory is copied and its kernel
whiteouts (0/0 character devices) and opaque xattrs turned into the spec's `.wh.` files.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Protocol

from benchmarks.measure import unmount as unmount_crfs_merge
from tests.conftest import COMMAND, MOUNT_TIMEOUT
from whiteout.markers import OPAQUE_MARKER, WHITEOUT_PREFIX

OVERLAY_XATTR_PREFIX = "trusted.overlay."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"


class WritableMount(Protocol):
    image: str
    mountpoint: Path

    def mount(self) -> None: ...

    def unmount(self) -> None: ...

    def oci_diff(self, scratch: Path) -> Path:
        """The changes as an upper directory in OCI diff form (unmounted first)."""
        ...


class CrfsMergeWritable:
    """`crfs-merge --upper DIR IMAGE MNT`; unmounted with fusermount3, waiting for the server
    to exit so that DIR is free for the next mount or a commit."""

    def __init__(self, image: str, work: Path) -> None:
        self.image, self.upper, self.cache = image, work / "upper", work / "cache"
        self.mountpoint = work / "mnt"
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        run = subprocess.run([*COMMAND, "--cache-dir", str(self.cache), "--upper", str(self.upper), self.image,
                              str(self.mountpoint)], capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip
        assert run.returncode == 0, f"crfs-merge --upper failed: {run.stderr}"
        assert file_system_type(self.mountpoint) == "fuse.crfs-merge"

    def unmount(self) -> None:
        unmount_crfs_merge(self.mountpoint)

    def oci_diff(self, scratch: Path) -> Path:
        self.unmount()
        return self.upper


class KernelOverlay:
    """Kernel overlayfs over the unpacked image, without redirect_dir (a lower directory's
    rename is EXDEV, as the writable mount's contract says), index or metacopy (so every
    copied-up file holds its data)."""

    def __init__(self, image: str, work: Path) -> None:
        self.image = image
        self.lower, self.upper, self.workdir = work / "lower", work / "upper", work / "work"
        self.mountpoint = work / "mnt"
        for path in (self.upper, self.workdir, self.mountpoint):
            path.mkdir(parents=True, exist_ok=True)
        if not self.lower.exists():
            export = subprocess.run([*COMMAND, "--cache-dir", str(work / "cache"), "--export", str(self.lower), image],
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            assert export.returncode == 0, f"crfs-merge --export failed: {export.stderr}"

    def mount(self) -> None:
        options = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.workdir}"
        options += ",redirect_dir=off,index=off,metacopy=off"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.mountpoint)], check=True)
        assert file_system_type(self.mountpoint) == "overlay"

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", str(self.mountpoint)], check=True)

    def oci_diff(self, scratch: Path) -> Path:
        self.unmount()
        diff = scratch / "oci-diff"
        shutil.rmtree(diff, ignore_errors=True)
        subprocess.run(["cp", "-a", "--", str(self.upper), str(diff)], check=True)
        overlay_upper_to_oci_diff(self.upper, diff)
        return diff


def file_system_type(mountpoint: Path) -> str | None:
    """The type /proc/self/mountinfo gives the mount at `mountpoint` (the last one mounted there)."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            found = fields[fields.index("-") + 1]
    return found


def writable_mount(kind: str, image: str, work: Path) -> WritableMount:
    if kind == "crfs-merge":
        return CrfsMergeWritable(image, work)
    if kind == "overlayfs":
        return KernelOverlay(image, work)
    raise ValueError(f"unknown writable mount {kind!r}: crfs-merge or overlayfs")


def overlay_upper_to_oci_diff(upper: Path, copy: Path) -> None:
    """Rewrites `copy` (a copy of the overlayfs upper directory `upper`) in OCI diff form:
    read from `upper`, whose xattrs are known to hold what overlayfs wrote."""
    for directory, dirs, files in os.walk(upper):
        rel = os.path.relpath(directory, upper)
        target = copy / rel
        if _has_xattr(directory, OVERLAY_OPAQUE_XATTR):
            (target / OPAQUE_MARKER).touch()
        _strip_overlay_xattrs(target)
        for name in dirs + files:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                os.unlink(target / name)
                (target / f"{WHITEOUT_PREFIX}{name}").touch()
            else:
                _strip_overlay_xattrs(target / name)
        source = os.lstat(directory)  # the markers made above changed the copy's times
        os.utime(target, ns=(source.st_atime_ns, source.st_mtime_ns))


def _has_xattr(path: str, name: str) -> bool:
    try:
        return name in os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False


def _strip_overlay_xattrs(path: Path) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name.startswith(OVERLAY_XATTR_PREFIX):
            os.removexattr(path, name, follow_symlinks=False)
