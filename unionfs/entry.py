"""The one entry model: a tar header's metadata plus where the entry's bytes live."""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})
"""The xattrs of the (many) entries that have none: one shared object, not a dict each."""


def sharer() -> Callable[[Any], Any]:
    """Returns a function that hands back one object per distinct value it is given.

    An image's entries repeat a few modes, owners and mtimes; ints above 256 are new objects
    each time, 32 bytes apiece. Use one sharer per layer scan, so that the table goes with it.
    """
    table: dict[Any, Any] = {}
    return lambda value: table.setdefault(value, value)


@dataclass(frozen=True, slots=True)
class Chunk:
    """`size` bytes of a file, from `file_offset`, stored compressed in a lazily read layer:
    the gzip member at blob bytes [blob_offset, blob_end) decompresses to them from
    `inner_offset`. `digest` is their eStargz chunkDigest ('' in legacy stargz). The disk
    cache keeps them at `cache_offset` of the layer's file (unionfs/storage/chunk_cache.py)."""

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int = 0
    digest: str = ""
    cache_offset: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """One member of one layer.

    `mode` holds the file-type bits as well as the permission bits (st_mode). A hardlink
    keeps the S_IFREG type and names its target in `link`. The bytes of a regular file are
    `size` bytes at `offset` of layer `layer`'s uncompressed tar, or, for a layer read
    lazily, the `chunks` of its compressed blob.
    """

    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    link: str = ""
    hardlink: bool = False
    rdev: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: NO_XATTRS)
    layer: int = 0
    offset: int = 0
    chunks: Sequence[Chunk] = ()  # a tuple from a TOC parser, a view of a tree's chunk table

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def hardlink_to(self) -> str | None:
        return self.link if self.hardlink else None

    @property
    def symlink_to(self) -> str | None:
        return self.link if stat.S_ISLNK(self.mode) else None


IMPLIED_DIRECTORY = Entry(path="", mode=stat.S_IFDIR | 0o755)
"""Metadata of a directory that no layer has a header for (containerd uses 0755, root)."""


AttributeValues = tuple[int, int, int, int, int, int, int, int, int]
"""The fields of Attributes in its order, as a plain tuple (cheaper to build, where many are)."""


class Attributes(NamedTuple):
    """What the kernel is told about one inode (a tuple: made for every LOOKUP and listed name,
    where a frozen dataclass costs twice as much to build)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int
    blksize: int = 0  # st_blksize; 0 leaves it to the kernel (a page); see tree.listing_block_size
