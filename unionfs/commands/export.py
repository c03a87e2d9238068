"""Write the merged tree to a tar stream or a directory, for machines with no FUSE.

The same tree and content reader as the mount serve the export, so both show one view.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import stat
import sys
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

import zstandard

from registry.media_types import Compression
from unionfs.build import MountedImage
from unionfs.commands.progress import Progress
from unionfs.entry import Entry
from unionfs.storage.tar_index import XATTR_PAX_PREFIX
from unionfs.tree import Inode

log = logging.getLogger("crfs-merge")
COPY_BLOCK = 1 << 20
_TAR_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
}


# What a file name asks for; .tgz and .tzst as tar(1) and GNU tar's --auto-compress read them.
ARCHIVE_SUFFIXES = {
    ".tar": Compression.NONE,
    ".tar.gz": Compression.GZIP,
    ".tgz": Compression.GZIP,
    ".tar.zst": Compression.ZSTD,
    ".tzst": Compression.ZSTD,
}


def archive_compression(dest: str) -> Compression | None:
    """Returns how a tar written to `dest` is compressed, by its name; None for a directory
    (or '-', a plain tar on stdout)."""
    return next((c for suffix, c in ARCHIVE_SUFFIXES.items() if dest.endswith(suffix)), None)


def export(image: MountedImage, dest: str, start_progress: Callable[[int], Progress] | None = None) -> None:
    """Writes the tree to `dest`: '-' is a tar on stdout, '*.tar' a tar file, '*.tar.gz' and
    '*.tar.zst' compressed ones, else a directory. A tar file is created, never overwritten,
    and removed again if the export fails half-way."""
    progress = start_progress(image.tree.total_bytes) if start_progress else None
    compression = archive_compression(dest)
    if dest == "-":
        export_tar(image, sys.stdout.buffer, progress)
    elif compression is not None:
        _export_archive(image, dest, compression, progress)
    else:
        export_directory(image, dest, progress)


def _export_archive(image: MountedImage, dest: str, compression: Compression, progress: Progress | None) -> None:
    with open(dest, "xb") as out:
        try:
            with _compressing(out, compression) as stream:
                export_tar(image, stream, progress)
        except BaseException:
            os.unlink(dest)  # a half-written archive would pass for a whole one
            raise


def _compressing(out: BinaryIO, compression: Compression) -> contextlib.AbstractContextManager[BinaryIO]:
    """Returns a writer that compresses into `out` and ends its stream on exit (leaving `out` open)."""
    if compression is Compression.GZIP:
        return gzip.GzipFile(fileobj=out, mode="wb", mtime=0)  # type: ignore[return-value]
    if compression is Compression.ZSTD:
        return zstandard.ZstdCompressor().stream_writer(out, closefd=False)  # type: ignore[return-value]
    return contextlib.nullcontext(out)


def _members(image: MountedImage) -> Iterator[tuple[str, Inode, str | None]]:
    """Yields (relative path, inode, path of an earlier hardlink of it or None), parents first."""
    first_path: dict[int, str] = {}
    for name, inode in image.tree.items():
        if not name:
            continue  # the root
        earlier = first_path.setdefault(inode.ino, name)
        yield name, inode, earlier if earlier != name else None


def export_tar(image: MountedImage, out: BinaryIO, progress: Progress | None = None) -> None:
    """Writes the merged tree as a PAX tar stream to `out`, reporting file bytes to `progress`."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for name, inode, hardlink_of in _members(image):
            info = _tar_info(name, inode.entry, hardlink_of)
            data = _Content(image, inode.entry, progress) if info.isreg() else None
            archive.addfile(info, data)  # type: ignore[arg-type]


def _tar_info(name: str, entry: Entry, hardlink_of: str | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(entry.mode)
    info.uid, info.gid = entry.uid, entry.gid
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.pax_headers = {XATTR_PAX_PREFIX + k: v.decode("utf-8", "surrogateescape") for k, v in entry.xattrs.items()}
    if entry.mtime_ns % 1_000_000_000:
        info.pax_headers["mtime"] = f"{entry.mtime_ns // 1_000_000_000}.{entry.mtime_ns % 1_000_000_000:09d}"
    if hardlink_of is not None:
        info.type, info.linkname = tarfile.LNKTYPE, hardlink_of
        return info
    info.type = _TAR_TYPES[stat.S_IFMT(entry.mode)]
    info.size = entry.size if info.type == tarfile.REGTYPE else 0
    info.linkname = entry.link if stat.S_ISLNK(entry.mode) else ""
    info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
    return info


class _Content(io.RawIOBase):
    """A file object over one entry's bytes, read through the content reader."""

    def __init__(self, image: MountedImage, entry: Entry, progress: Progress | None) -> None:
        self._image, self._entry, self._pos, self._progress = image, entry, 0, progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._entry.size - self._pos if size < 0 else size
        data = self._image.content.read(self._entry, self._pos, size)
        self._pos += len(data)
        if self._progress:
            self._progress(len(data))
        return data


def export_directory(image: MountedImage, dest: str, progress: Progress | None = None) -> None:
    """Writes the merged tree under `dest` (absent or empty). Ownership is kept when run as
    root; devices need root and are skipped with a warning otherwise."""
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise FileExistsError(f"{dest}: export directory is not empty")
    directories: list[tuple[str, Entry]] = [(dest, image.tree.lookup("/").entry)]
    for name, inode, hardlink_of in _members(image):
        path = os.path.join(dest, name)
        if hardlink_of is not None:
            os.link(os.path.join(dest, hardlink_of), path)
        elif not _create(image, path, inode.entry, progress):
            continue
        elif stat.S_ISDIR(inode.entry.mode):
            directories.append((path, inode.entry))
        else:
            _finish(path, inode.entry)
    for path, entry in reversed(directories):  # children change a directory's mtime
        _finish(path, entry)


def _create(image: MountedImage, path: str, entry: Entry, progress: Progress | None) -> bool:
    kind = stat.S_IFMT(entry.mode)
    if kind == stat.S_IFDIR:
        os.mkdir(path, 0o700)
    elif kind == stat.S_IFLNK:
        os.symlink(entry.link, path)
    elif kind == stat.S_IFREG:
        _write_file(image, path, entry, progress)
    elif kind == stat.S_IFIFO:
        os.mkfifo(path, 0o600)
    elif os.geteuid() == 0:
        os.mknod(path, kind | 0o600, entry.rdev)
    else:
        log.warning("%s: device node skipped (creating devices needs root)", path)
        return False
    return True


def _write_file(image: MountedImage, path: str, entry: Entry, progress: Progress | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for offset in range(0, entry.size, COPY_BLOCK):
            data = image.content.read(entry, offset, COPY_BLOCK)
            out.write(data)
            if progress:
                progress(len(data))


def _finish(path: str, entry: Entry) -> None:
    """Applies ownership, xattrs, mode and mtime, in the order that keeps setuid bits."""
    if os.geteuid() == 0:
        os.lchown(path, entry.uid, entry.gid)
    for key, value in entry.xattrs.items():
        try:
            os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as exc:
            log.warning("%s: xattr %s not set: %s", path, key, exc.strerror)
    if not stat.S_ISLNK(entry.mode):
        os.chmod(path, stat.S_IMODE(entry.mode))
    with contextlib.suppress(NotImplementedError):
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
