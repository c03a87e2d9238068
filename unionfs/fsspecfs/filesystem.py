"""An image's merged tree as a read-only fsspec file system, protocol `crfs`.

    import fsspec
    fs = fsspec.filesystem("crfs", image="oci:/srv/layout:tag")
    fs.cat("etc/os-release")
    with fsspec.open("crfs://localhost:5000/app:1!/srv/data.csv", "rt") as f: ...

Entries are described as `ls -l` (lstat) describes them, with fsspec's keys: `name` (relative
to the image root, as the zip and tar file systems name members), `size`, `type` ('file',
'directory', 'link' for a symlink, 'other' for a device, fifo or socket), and `mode`, `uid`,
`gid`, `mtime` (seconds, a float), `ino`, `nlink`, `islink`, `destination` (a link's target,
as LocalFileSystem gives it), `rdev`. Opening or reading a link follows it, inside the image,
as open(2) on a mount does; `walk` and `find` never descend into a link, as `find` does not.
"""

from __future__ import annotations

import datetime
import errno
import io
import os
from typing import Any, NoReturn

from fsspec import AbstractFileSystem
from fsspec.utils import tokenize

from unionfs.api.image import READ_BLOCK, FileStat, ImageView, open_image
from unionfs.fsspecfs.urls import PROTOCOL, make_url, split_url

_TYPES = {"file": "file", "directory": "directory", "symlink": "link"}


class CrfsFileSystem(AbstractFileSystem):
    """The merged tree of one container image, read-only, without a mount.

    `image` is what `crfs-merge` mounts; the other arguments are the mount's options
    (--cache-dir, --platform, --creds USER:PASSWORD, --tls-verify, --timeout). The image is
    opened once, when the file system is made; fsspec keeps one instance per arguments and
    thread."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, image: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 platform: str | None = None, creds: str | None = None, tls_verify: bool = True,
                 timeout: float = 30.0, **storage_options: Any) -> None:  # fmt: skip
        super().__init__(**storage_options)
        if not image:
            raise ValueError("crfs: no image: fsspec.filesystem('crfs', image='oci:/path/layout:tag'), "
                             "or a URL crfs://IMAGE!/PATH")  # fmt: skip
        self.image = image
        self._view = open_image(image, cache_dir=cache_dir, platform=platform, creds=creds, tls_verify=tls_verify,
                                timeout=timeout)  # fmt: skip

    @property
    def view(self) -> ImageView:
        """The image as unionfs.api gives it (config, xattrs, readlink, ...)."""
        return self._view

    @property
    def fsid(self) -> str:
        return f"{PROTOCOL}-{self._view.id}"

    def close(self) -> None:
        """Lets go of the image's files and registry session; the instance is unusable after."""
        self._view.close()

    # ------------------------------------------------------------ URLs and paths

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return split_url(os.fspath(path) if isinstance(path, os.PathLike) else str(path))[1]

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, str]:
        image = split_url(path)[0]
        return {"image": image} if image else {}

    def unstrip_protocol(self, name: str) -> str:
        """The URL of `name` that carries the image, so that fsspec.open(it) opens this image."""
        return make_url(self.image, self._strip_protocol(name))

    # ------------------------------------------------------------ metadata

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        name = self._strip_protocol(path)
        return describe(name, self._view.stat(name))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The entries of directory `path` (a link to a directory is followed, as `ls` does);
        for anything else, `path` itself."""
        name = self._strip_protocol(path)
        if self._leads_to_directory(name):
            prefix = f"{name}/" if name else ""
            listing = [describe(prefix + basename(entry), entry) for entry in self._view.scandir(name)]
        else:
            listing = [self.info(name)]
        return listing if detail else [entry["name"] for entry in listing]

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:  # fmt: skip
        """Every entry below directory `path`; for anything else (a link too), `path` itself,
        as `find PATH` answers."""
        name = self._strip_protocol(path)
        top = self.info(name)
        if top["type"] != "directory":
            return {name: top} if detail else [name]
        return super().find(name, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self._view.exists(self._strip_protocol(path))

    def lexists(self, path: str, **kwargs: Any) -> bool:
        return self.exists(path)

    def ukey(self, path: str) -> str:
        # An image never changes under its id: the id and the entry name an entry's bytes.
        name = self.info(path)["name"]  # FileNotFoundError for what is not there
        return str(tokenize(self._view.id, self._view.resolve(name, follow_symlinks=False)))

    def modified(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.timezone.utc)

    def created(self, path: str) -> datetime.datetime:
        """A layer records no creation time: the modification time, as fsspec's sftp and tar give."""
        return self.modified(path)

    def _leads_to_directory(self, name: str) -> bool:
        try:
            return self._view.stat(name, follow_symlinks=True).is_dir
        except OSError:
            return False  # missing, or a dangling link: info() tells which

    # ------------------------------------------------------------ bytes

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> ImageFile:  # fmt: skip
        """A seekable reader of the file at `path` (links followed) that fetches only the blocks
        read from a lazily read layer."""
        name = self._strip_protocol(path)
        if mode != "rb":
            read_only(name)
        reader = self._view.open(name)
        return ImageFile(reader, name, self._view.stat(name, follow_symlinks=True).size)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Bytes [start, end) of the file at `path`; negative positions count from its end, as
        fsspec's file systems take them."""
        name = self._strip_protocol(path)
        size = self._view.stat(name, follow_symlinks=True).size
        first, last = byte_range(size, start, end)
        return self._view.read(name, first, last - first)

    # ------------------------------------------------------------ no writes

    def _open_for_write(self, path: str, *args: Any, **kwargs: Any) -> NoReturn:
        read_only(self._strip_protocol(path))

    mkdir = makedirs = rmdir = rm_file = _rm = rm = touch = pipe_file = _open_for_write

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> NoReturn:
        read_only(self._strip_protocol(path2))

    def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> NoReturn:
        read_only(self._strip_protocol(rpath))

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> NoReturn:
        read_only(self._strip_protocol(path1))


class ImageFile(io.BufferedReader):
    """ImageView.open's reader with the `name` and `size` that fsspec's consumers look for."""

    def __init__(self, reader: io.BufferedReader, name: str, size: int) -> None:
        super().__init__(reader.detach(), buffer_size=READ_BLOCK)
        self._name, self.size = name, size

    @property
    def name(self) -> str:
        return self._name


def describe(name: str, entry: FileStat) -> dict[str, Any]:
    """fsspec's info dict of one entry, named `name`."""
    info = {"name": name, "size": entry.size, "type": _TYPES.get(entry.kind, "other"), "mode": entry.mode,
            "uid": entry.uid, "gid": entry.gid, "mtime": entry.mtime_ns / 1e9, "ino": entry.ino,
            "nlink": entry.nlink, "islink": entry.is_symlink, "rdev": entry.rdev}  # fmt: skip
    if entry.link_target is not None:
        info["destination"] = entry.link_target
    return info


def basename(entry: FileStat) -> str:
    return entry.path.rpartition("/")[2]


def byte_range(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """[first, last) of a file of `size` bytes from fsspec's start and end: those of a Python
    slice (None: the file's start or end; negative: from the end; clipped to the file)."""
    first, last, _ = slice(start, end).indices(size)
    return first, max(first, last)


def read_only(name: object) -> NoReturn:
    """The error of every write: an image is read-only, as its mount is (EROFS)."""
    raise PermissionError(errno.EROFS, f"{PROTOCOL}: an image is read-only", str(name))
