"""An image's merged tree without a mount: what `crfs-merge ls/cat/stat`, fsspec and Python
programs read, from the same engine that the FUSE mount serves.

Paths are relative to the image root, with or without a leading '/'. They are resolved as the
kernel resolves them in a mount, except that nothing can lead out of the image: '..' stops at
the root and a symlink's target, absolute or relative, is followed inside the image
(whiteout.resolve, containerd's rule). Errors are the OSError a mount would give: ENOENT,
ENOTDIR, EISDIR, ELOOP, EINVAL for readlink of what is no link.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unionfs.build import MountedImage, Settings
from unionfs.build import open_image as open_mounted
from unionfs.entry import Entry
from unionfs.tree import ROOT, MergedTree
from whiteout.resolve import TooManySymlinks, resolve_in_root

if TYPE_CHECKING:
    from unionfs.provenance.report import Explanation, LayersReport

READ_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileStat:
    """What lstat (or stat) shows for one path of the merged tree, as the mount shows it."""

    path: str  # clean, relative to the root ('' for the root)
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0
    link_target: str | None = None  # a symlink's target

    @property
    def kind(self) -> str:
        """'file', 'directory', 'symlink', 'char', 'block', 'fifo' or 'socket'."""
        return _KINDS.get(stat.S_IFMT(self.mode), "unknown")

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def to_dict(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        return {**fields, "kind": self.kind, "permissions": stat.filemode(self.mode)}


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}  # fmt: skip


class ImageView:
    """The merged tree of one image, readable without FUSE. Close it (or use `with`) to let
    go of its files and registry session."""

    def __init__(self, mounted: MountedImage, reference: str) -> None:
        self._mounted = mounted
        self._tree: MergedTree = mounted.tree
        self.reference = reference

    # ------------------------------------------------------------ the image

    @property
    def id(self) -> str:
        """sha256:... of the image config, as `docker images` names an image."""
        return self._mounted.image_id

    @property
    def config(self) -> dict[str, Any]:
        """The image config (os, architecture, history, config.Env, ...); {} where the source has none."""
        source = self._mounted.source
        return json.loads(source.config) if source is not None and source.config else {}

    @property
    def mounted(self) -> MountedImage:
        """The engine's view (tree, content reader, resolved source) for commands of this package."""
        return self._mounted

    def close(self) -> None:
        self._mounted.close()

    def __enter__(self) -> ImageView:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------ metadata

    def stat(self, path: str, follow_symlinks: bool = False) -> FileStat:
        """lstat of `path` (stat with follow_symlinks)."""
        clean, ino = self._resolve(path, follow_symlinks)
        return self._stat(clean, ino)

    def exists(self, path: str) -> bool:
        try:
            self._resolve(path, follow_last=False)
        except OSError:
            return False
        return True

    def readlink(self, path: str) -> str:
        ino = self._resolve(path, follow_last=False)[1]
        if not stat.S_ISLNK(self._tree.mode(ino)):
            raise _error(errno.EINVAL, path)
        return self._tree.link(ino)

    def xattrs(self, path: str) -> Mapping[str, bytes]:
        """The extended attributes of `path` itself (not followed)."""
        return self._tree.xattrs(self._resolve(path, follow_last=False)[1])

    def scandir(self, path: str = "") -> list[FileStat]:
        """The entries of directory `path` (symlinks to directories followed), sorted by name."""
        clean, ino = self._resolve(path, follow_last=True)
        if not self._tree.is_dir(ino):
            raise _error(errno.ENOTDIR, path)
        prefix = clean + "/" if clean else ""
        return [self._stat(prefix + os.fsdecode(name), child) for name, child in self._tree.children(ino)]

    def listdir(self, path: str = "") -> list[str]:
        return [entry.path.rpartition("/")[2] for entry in self.scandir(path)]

    def walk(self, top: str = "") -> Iterator[tuple[str, list[FileStat], list[FileStat]]]:
        """Like os.walk, top-down and never into symlinks: (directory, its subdirectories,
        its other entries), directories as clean relative paths ('' is the root)."""
        stack = [self.stat(top, follow_symlinks=True)]
        if not stack[0].is_dir:
            raise _error(errno.ENOTDIR, top)
        while stack:
            directory = stack.pop()
            entries = self.scandir(directory.path)
            subdirectories = [e for e in entries if e.is_dir]
            yield directory.path, subdirectories, [e for e in entries if not e.is_dir]
            stack.extend(reversed(subdirectories))

    # ------------------------------------------------------------ bytes

    def read(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        """The bytes of the file at `path` (symlinks followed) from `offset`, `size` of them
        (-1: to the end)."""
        return self._read_entry(self._file_entry(path), offset, size)

    def open(self, path: str) -> io.BufferedReader:
        """A seekable binary reader of the file at `path` (symlinks followed); only the
        blocks read are fetched from a lazily read layer."""
        entry = self._file_entry(path)
        return io.BufferedReader(_FileReader(entry, self._read_entry), buffer_size=READ_BLOCK)

    def copy_to(self, path: str, sink: io.RawIOBase | io.BufferedIOBase | Any) -> int:
        """Writes the bytes of the file at `path` to `sink` block by block; returns how many."""
        with self.open(path) as reader:
            copied = 0
            while block := reader.read(READ_BLOCK):
                sink.write(block)
                copied += len(block)
        return copied

    # ------------------------------------------------------------ provenance

    def explain(self, path: str) -> Explanation:
        """Why `path` is what it is in the merged tree, or why it is not there: the layer that
        made it, what each layer did to it (whiteouts, opaque directories, replacements) and
        its hardlink group. Reads each layer's entry list again (index cache, or TOC)."""
        from unionfs.provenance.report import explain

        return explain(self, path)

    def layers(self) -> LayersReport:
        """Per layer: digest, size, history line, paths added/changed/removed, file bytes it
        stores that the merged tree does not show; and the image's efficiency."""
        from unionfs.provenance.report import layers

        return layers(self)

    # ------------------------------------------------------------ paths

    def resolve(self, path: str, follow_symlinks: bool = True) -> str:
        """The clean path that `path` names inside the image, its symlinks followed (the last
        one too with `follow_symlinks`), as realpath does: what it leads to need not exist."""
        parent, _, name = path.strip("/").rpartition("/")
        if not follow_symlinks and name not in ("", ".", ".."):
            return "/".join(p for p in (self.resolve(parent), name) if p)
        return self._followed(path.strip("/"), path)

    def _resolve(self, path: str, follow_last: bool) -> tuple[str, int]:
        """(clean path, inode) of `path`, every parent's symlinks followed inside the image,
        the last component's too with `follow_last`."""
        parts = [p for p in path.split("/") if p and p != "."]
        if not parts:
            return "", ROOT
        parent = self._followed("/".join(parts[:-1]), path)
        name = parts[-1]
        if name == "..":
            return self._resolve(parent.rpartition("/")[0], follow_last=False)
        clean = f"{parent}/{name}" if parent else name
        ino = self._inode_at(clean, path)
        if follow_last and stat.S_ISLNK(self._tree.mode(ino)):
            clean = self._followed(clean, path)
            ino = self._inode_at(clean, path) if clean else ROOT
        return clean, ino

    def _followed(self, relative: str, asked: str) -> str:
        """`relative` with every symlink in it followed inside the image; ELOOP on a loop."""
        try:
            return resolve_in_root(relative, self._link_at)[0] if relative else ""
        except TooManySymlinks:
            raise _error(errno.ELOOP, asked) from None

    def _inode_at(self, clean: str, asked: str) -> int:
        ino: int | None = ROOT
        for part in clean.split("/") if clean else ():
            assert ino is not None
            if not self._tree.is_dir(ino):
                raise _error(errno.ENOTDIR, asked)
            ino = self._tree.child(ino, os.fsencode(part))
            if ino is None:
                raise _error(errno.ENOENT, asked)
        assert ino is not None
        return ino

    def _link_at(self, clean: str) -> str | None:
        """resolve_in_root's question: the target of the symlink at `clean`, or None."""
        try:
            ino = self._inode_at(clean, clean)
        except OSError:
            return None
        return self._tree.link(ino) if stat.S_ISLNK(self._tree.mode(ino)) else None

    def _stat(self, clean: str, ino: int) -> FileStat:
        a = self._tree.attributes(ino)
        target = self._tree.link(ino) if stat.S_ISLNK(a.mode) else None
        return FileStat(clean, ino, a.mode, a.nlink, a.uid, a.gid, a.size, a.mtime_ns, a.rdev, target)

    def _file_entry(self, path: str) -> Entry:
        clean, ino = self._resolve(path, follow_last=True)
        self._check_file(ino, path)
        return self._tree.entry(ino, clean)

    def _read_entry(self, entry: Entry, offset: int, size: int) -> bytes:
        if offset < 0:
            raise _error(errno.EINVAL, entry.path)
        end = entry.size if size < 0 else min(entry.size, offset + size)
        parts = []
        while offset < end:
            data = self._mounted.content.read(entry, offset, min(READ_BLOCK, end - offset))
            if not data:
                raise _error(errno.EIO, entry.path)
            parts.append(data)
            offset += len(data)
        return b"".join(parts)

    def _check_file(self, ino: int, path: str) -> None:
        mode = self._tree.mode(ino)
        if stat.S_ISDIR(mode):
            raise _error(errno.EISDIR, path)
        if not stat.S_ISREG(mode):
            raise _error(errno.EINVAL, path)  # a device or fifo of an image has no bytes to give


class _FileReader(io.RawIOBase):
    """One file of the image as a raw stream, for io.BufferedReader."""

    def __init__(self, entry: Entry, read: Callable[[Entry, int, int], bytes]) -> None:
        self._entry, self._read = entry, read
        self.name = entry.path
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._entry.size}[whence]
        if base + offset < 0:
            raise _error(errno.EINVAL, self._entry.path)
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        data = self._read(self._entry, self._position, len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _error(number: int, path: str) -> OSError:
    return OSError(number, os.strerror(number), path)


def open_image(image: str, *, cache_dir: str | os.PathLike[str] | None = None, platform: str | None = None,
               creds: str | None = None, tls_verify: bool = True, timeout: float = 30.0,
               prefetch: str = "none", registries_conf: str | os.PathLike[str] | None = None,
               pull: str = "missing") -> ImageView:  # fmt: skip
    """Opens `image` (`oci:PATH[:TAG]`, `docker-archive:FILE`, a skopeo `dir:`, a path, or
    `[docker://]REGISTRY/REPO[:TAG][@DIGEST]`) as a merged tree, with no mount.

    eStargz layers in a registry are read lazily: their TOCs now, the bytes of a file when it
    is read. Other layers are fetched whole into the cache (`cache_dir`, default
    ~/.cache/crfs-merge) and indexed, as a mount does; the next open reuses them. Registries,
    mirrors and short names follow podman's registries.conf files, or `registries_conf` alone.
    `pull="missing"` opens what the reference resolved to when last opened with this cache, if
    that was recorded (no registry asked before the tree is there, when it is cached too);
    "always" resolves it anew."""
    chosen = settings(cache_dir, platform, creds, tls_verify, timeout, prefetch, registries_conf, pull)
    return ImageView(open_mounted(image, chosen), image)


def settings(cache_dir: str | os.PathLike[str] | None = None, platform: str | None = None, creds: str | None = None,
             tls_verify: bool = True, timeout: float = 30.0, prefetch: str = "none",
             registries_conf: str | os.PathLike[str] | None = None, pull: str = "missing") -> Settings:  # fmt: skip
    """The engine's Settings from open_image's keywords."""
    from registry.auth import Credentials
    from registry.manifest import Platform
    from registry.options import RemoteOptions
    from unionfs.storage import default_cache_dir

    if pull not in ("missing", "always"):
        raise ValueError(f"pull={pull!r}: expected 'missing' or 'always'")
    return Settings(
        cache_dir=Path(cache_dir).absolute() if cache_dir is not None else default_cache_dir(),
        platform=Platform.parse(platform) if platform else Platform.host(),
        remote=RemoteOptions(Credentials.parse(creds) if creds else None, tls_verify, timeout,
                             registries_conf=Path(registries_conf).absolute() if registries_conf else None),
        prefetch=prefetch,
        pull=pull,
    )
