"""Freeze a merged tree into a compact, read-only index: typed arrays, not an object per file.

The children of a directory occupy consecutive slots, sorted by their names' bytes, so a
lookup is a binary search and a listing a range. Each slot names an inode; hardlinks are
slots that name the same inode. Per inode, the attributes live in typed arrays; what few
entries have (symlink targets, device numbers, xattrs) lives in dicts by inode number, and
the chunks of lazily read files in a ChunkTable (unionfs/chunk_table.py: arrays too, about 80
bytes per chunk), whose file number (plus one) such a file keeps in its `offset`. That is
about 70 bytes per entry plus its name, where an Entry object, an inode object and a dict slot
by path took about 600; and the arrays save and load as raw bytes (`to_bytes`/`from_bytes`),
so a mount of an image already seen skips the merge entirely, lazy or not.

Being immutable, the tree is shared by libfuse's worker threads without locks.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import operator
import os
import stat
import struct
import sys
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from operator import itemgetter
from types import MappingProxyType

from unionfs.chunk_table import CHUNK_ARRAYS, DIGEST_SIZE, ChunkTable, Column, RowGatherer, TypeCode
from unionfs.entry import IMPLIED_DIRECTORY, NO_XATTRS, Attributes, AttributeValues, Entry
from whiteout.apply import Node

ROOT = 1
FORMAT = b"crfs-merge tree 3\n"
# Per inode (index ino - 1). first_slot and slot_count describe a directory's children.
INODE_ARRAYS: dict[str, TypeCode] = {
    "mode": "I", "uid": "I", "gid": "I", "size": "Q", "mtime_ns": "q", "nlink": "I", "layer": "I",
    "offset": "Q", "first_slot": "I", "slot_count": "I", "parent": "I",
}  # fmt: skip
SLOT_ARRAYS: dict[str, TypeCode] = {"slot_ino": "I", "name_end": "Q"}  # per slot; slot 0 is the root, with no name
PLUS_RECORD = 152  # fuse_entry_out and fuse_dirent: what a READDIRPLUS sends ahead of each name
LISTING_BUFFERS = (32 * 1024, 1 << 20)  # glibc's smallest and largest opendir buffer


def listing_block_size(names: int, name_bytes: int) -> int:
    """st_blksize of a directory of `names` names of `name_bytes` bytes in all: glibc lists a
    directory in buffers of st_blksize (from 32 KiB to 1 MiB) and the kernel asks FUSE for a
    listing of the buffer's size, so a directory whose READDIRPLUS listing outgrows 32 KiB
    says how large it is: it is then listed in one request (not one READDIRPLUS and several
    plain READDIRs), and every name in it is linked, so that lstat and open need no LOOKUP.
    0 (the kernel's page) for the rest: a larger buffer would only cost a larger allocation."""
    size = (names + 2) * (PLUS_RECORD + 7) + name_bytes  # with '.' and '..', names padded to 8
    smallest, largest = LISTING_BUFFERS
    return 0 if size <= smallest else min(largest, 1 << (size - 1).bit_length())


class CorruptTreeError(ValueError):
    """Bytes that from_bytes cannot take for a tree."""


@dataclass(frozen=True, slots=True)
class Inode:
    """A view of one inode, made on demand (export, tests); FUSE reads the arrays directly."""

    ino: int
    entry: Entry
    nlink: int

    @property
    def is_dir(self) -> bool:
        return self.entry.is_dir


class MergedTree:
    """The merged image, addressed by inode number (the root is 1) and by path."""

    def __init__(self, arrays: Mapping[str, Column], names: bytes, rare: dict[str, dict[int, object]],
                 chunks: ChunkTable | None = None, lazy_layers: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self._a = arrays
        # The arrays FUSE reads on every request, as attributes: one lookup less each.
        self._mode, self._slot_ino, self._name_end = arrays["mode"], arrays["slot_ino"], arrays["name_end"]
        self._nlink, self._uid, self._gid = arrays["nlink"], arrays["uid"], arrays["gid"]
        self._size, self._mtime_ns = arrays["size"], arrays["mtime_ns"]
        self._first_slot, self._slot_count = arrays["first_slot"], arrays["slot_count"]
        self._names = names
        self._links: dict[int, str] = rare.get("links", {})  # type: ignore[assignment]
        self._rdevs: dict[int, int] = rare.get("rdevs", {})  # type: ignore[assignment]
        self._xattrs: dict[int, Mapping[str, bytes]] = rare.get("xattrs", {})  # type: ignore[assignment]
        self.chunk_table = chunks or ChunkTable()
        self.lazy_layers = lazy_layers  # layers whose files' bytes are chunks (offset: file number + 1)
        self.prefetch_ends: dict[int, int] = {}  # per lazy layer: where its prioritized files end
        self.inode_count = len(self._mode)

    @functools.cached_property
    def total_bytes(self) -> int:
        """The regular files' bytes (statfs, export's progress): counted when first asked for,
        not at load, where it was 15-30 ms of a 200,000-file mount's start."""
        sizes, modes = self._size, self._mode
        return sum(sizes[i] for i in range(self.inode_count) if stat.S_ISREG(modes[i]))

    # ------------------------------------------------------------ by inode number (FUSE)

    def _index(self, ino: int) -> int:
        if not 0 < ino <= self.inode_count:
            raise KeyError(ino)
        return ino - 1

    def is_dir(self, ino: int) -> bool:
        return stat.S_ISDIR(self._mode[self._index(ino)])

    def attributes(self, ino: int) -> Attributes:
        i = self._index(ino)
        mode = self._mode[i]
        size = len(os.fsencode(self._links[ino])) if mode & 0o170000 == stat.S_IFLNK else self._size[i]
        rdev = self._rdevs.get(ino, 0) if self._rdevs else 0
        blksize = self._block_size(i) if mode & 0o170000 == stat.S_IFDIR else 0
        return Attributes(ino, mode, self._nlink[i], self._uid[i], self._gid[i], size, rdev, self._mtime_ns[i],
                          blksize)  # fmt: skip

    def _block_size(self, i: int) -> int:
        """listing_block_size of the directory at index `i`: its names are consecutive bytes."""
        first, count = self._first_slot[i], self._slot_count[i]
        name_bytes = self._name_end[first + count - 1] - self._name_end[first - 1] if count else 0
        return listing_block_size(count, name_bytes)

    def mode(self, ino: int) -> int:
        return self._mode[self._index(ino)]

    def child(self, directory: int, name: bytes) -> int | None:
        """Returns the inode number called `name` in `directory`, or None."""
        i = self._index(directory)
        if name == b".":
            return directory
        if name == b"..":
            return self._a["parent"][i]
        first = self._first_slot[i]
        end = first + self._slot_count[i]
        slot = bisect.bisect_left(range(first, end), name, key=self._name)
        return self._slot_ino[first + slot] if first + slot < end and self._name(first + slot) == name else None

    def children(self, directory: int, start: int = 0) -> Iterator[tuple[bytes, int]]:
        """Yields (name, inode number) of the children of `directory` from the `start`-th."""
        i = self._index(directory)
        first = self._first_slot[i]
        names, ends, slot_ino = self._names, self._name_end, self._slot_ino
        for slot in range(first + start, first + self._slot_count[i]):
            yield names[ends[slot - 1] : ends[slot]], slot_ino[slot]

    def listed_children(self, directory: int, start: int = 0) -> Iterator[tuple[bytes, int, int, AttributeValues]]:
        """Yields (name, inode number, mode, attributes) of the children of `directory` from the
        `start`-th, the attributes as a plain tuple in the order of Attributes: a READDIRPLUS
        lists hundreds of names, and building an Attributes for each cost more than the rest of
        the reply."""
        i = self._index(directory)
        first = self._first_slot[i]
        names, ends, slot_ino, modes = self._names, self._name_end, self._slot_ino, self._mode
        nlinks, uids, gids, sizes, mtimes = self._nlink, self._uid, self._gid, self._size, self._mtime_ns
        links, rdevs = self._links, self._rdevs
        for slot in range(first + start, first + self._slot_count[i]):
            ino = slot_ino[slot]
            j = ino - 1
            mode = modes[j]
            size = len(os.fsencode(links[ino])) if mode & 0o170000 == stat.S_IFLNK else sizes[j]
            rdev = rdevs.get(ino, 0) if rdevs else 0
            blksize = self._block_size(j) if mode & 0o170000 == stat.S_IFDIR else 0
            yield names[ends[slot - 1] : ends[slot]], ino, mode, (ino, mode, nlinks[j], uids[j], gids[j], size, rdev,
                                                                  mtimes[j], blksize)  # fmt: skip

    def parent(self, directory: int) -> int:
        return self._a["parent"][self._index(directory)]

    def link(self, ino: int) -> str:
        return self._links.get(ino, "")

    def xattrs(self, ino: int) -> Mapping[str, bytes]:
        return self._xattrs.get(ino, NO_XATTRS)

    def mark_lazy(self, layers: frozenset[int], prefetch_ends: dict[int, int]) -> None:
        """Records which layers are read lazily (also those with no file bytes, which the
        freeze cannot tell) and their prefetch landmarks; before the tree is served or saved."""
        self.lazy_layers = self.lazy_layers | layers
        self.prefetch_ends = dict(prefetch_ends)

    def chunk_files(self, layer: int) -> array:
        """The chunk table's file numbers of the files of the tree whose bytes are in lazily
        read layer `layer`."""
        layers, offsets = self._a["layer"], self._a["offset"]
        if layer not in self.lazy_layers:
            return array("Q")
        return array("Q", (offset - 1 for at, offset in zip(layers, offsets, strict=True) if at == layer and offset))

    def entry(self, ino: int, path: str = "") -> Entry:
        """Returns inode `ino` as an Entry (what the content readers take)."""
        i, a = self._index(ino), self._a
        layer, offset = a["layer"][i], a["offset"][i]
        chunks = self.chunk_table.file(offset - 1) if offset and layer in self.lazy_layers else ()
        return Entry(path, a["mode"][i], a["uid"][i], a["gid"][i], a["size"][i], a["mtime_ns"][i],
                     self._links.get(ino, ""), False, self._rdevs.get(ino, 0), self.xattrs(ino), layer,
                     0 if chunks else offset, chunks)  # fmt: skip

    def _name(self, slot: int) -> bytes:
        return self._names[self._name_end[slot - 1] : self._name_end[slot]]

    # ------------------------------------------------------------ by path (export, tests)

    def inode(self, ino: int, path: str = "") -> Inode:
        return Inode(ino, self.entry(ino, path), self._a["nlink"][self._index(ino)])

    def lookup(self, path: str) -> Inode:
        """Returns the inode at `path` ('/', '/etc/hosts'); KeyError if none."""
        ino: int | None = ROOT
        for part in (p for p in path.split("/") if p):
            if ino is None or not self.is_dir(ino):
                raise KeyError(path)
            ino = self.child(ino, os.fsencode(part))
        if ino is None:
            raise KeyError(path)
        return self.inode(ino, path.strip("/"))

    def items(self) -> Iterator[tuple[str, Inode]]:
        """Yields (clean path, inode) of every path, the root ('') first, depth first by name."""
        stack = [("", ROOT)]
        while stack:
            path, ino = stack.pop()
            yield path, self.inode(ino, path)
            if self.is_dir(ino):
                prefix = path + "/" if path else ""
                kids = [(prefix + os.fsdecode(name), child) for name, child in self.children(ino)]
                stack.extend(reversed(kids))

    # ------------------------------------------------------------ as bytes (the cache)

    def to_bytes(self) -> bytes:
        """The tree as one byte string: a JSON header (lengths, the rare fields), then the raw arrays."""
        return b"".join(self.to_parts())

    def to_parts(self) -> list[bytes | memoryview]:
        """to_bytes's pieces, the arrays as views of themselves: saved with no copy of the
        whole tree (two copies were a fifth of a big lazy mount's peak memory)."""
        table = self.chunk_table
        header = {
            "byteorder": sys.byteorder,
            "arrays": {name: len(values) for name, values in self._a.items()},
            "names": len(self._names),
            "links": self._links,
            "rdevs": self._rdevs,
            "xattrs": {ino: {k: v.decode("latin-1") for k, v in x.items()} for ino, x in self._xattrs.items()},
            "lazy_layers": sorted(self.lazy_layers),
            "prefetch_ends": self.prefetch_ends,
            "chunks": len(table),
            "chunk_files": table.files,
            "other_digests": table.other_digests,
        }
        encoded = json.dumps(header).encode()
        parts: list[bytes | memoryview] = [FORMAT, len(encoded).to_bytes(8, "little"), encoded]
        parts += [_raw_view(self._a[name]) for name in (*INODE_ARRAYS, *SLOT_ARRAYS)]
        parts += [_raw_view(table.arrays[name]) for name in CHUNK_ARRAYS]
        parts += [_raw_view(table.file_first), memoryview(table.digests), self._names]
        return parts

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> MergedTree:
        """The inverse of to_bytes; CorruptTreeError for anything it did not write whose
        shape is wrong (the cache also seals the bytes with a digest: unionfs/storage/sealed.py).
        The tree reads its arrays in place in `data`: bytes that can change are copied first."""
        view = memoryview(data)
        try:
            return cls._parse(view if view.readonly else memoryview(bytes(view)))
        except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
            raise CorruptTreeError(f"not a saved tree: {exc}") from None

    @classmethod
    def _parse(cls, data: memoryview) -> MergedTree:
        if bytes(data[: len(FORMAT)]) != FORMAT:
            raise ValueError("unknown format")
        at = len(FORMAT) + 8
        length = int.from_bytes(data[at - 8 : at], "little")
        header = json.loads(bytes(data[at : at + length]))
        at += length
        if header["byteorder"] != sys.byteorder:
            raise ValueError("saved on a machine of the other byte order")
        arrays: dict[str, Column] = {}
        for name, typecode in (*INODE_ARRAYS.items(), *SLOT_ARRAYS.items()):
            arrays[name], at = _read_array(data, at, typecode, header["arrays"][name])
        chunk_arrays: dict[str, Column] = {}
        for name, typecode in CHUNK_ARRAYS.items():
            chunk_arrays[name], at = _read_array(data, at, typecode, header["chunks"])
        file_first, at = _read_array(data, at, "Q", header["chunk_files"] + 1)
        digests_end = at + header["chunks"] * DIGEST_SIZE
        table = ChunkTable(chunk_arrays, data[at:digests_end],
                           {int(k): str(v) for k, v in header["other_digests"].items()}, file_first)  # fmt: skip
        names = bytes(data[digests_end:])
        _check_shape(arrays, len(names), header["names"])
        lazy_layers = frozenset(int(n) for n in header["lazy_layers"])
        _check_chunks(arrays, table, lazy_layers)
        rare: dict[str, dict[int, object]] = {
            "links": {int(k): str(v) for k, v in header["links"].items()},
            "rdevs": {int(k): int(v) for k, v in header["rdevs"].items()},
            "xattrs": {
                int(k): MappingProxyType({n: v.encode("latin-1") for n, v in x.items()})
                for k, x in header["xattrs"].items()
            },
        }
        tree = cls(arrays, names, rare, table, lazy_layers)
        tree.prefetch_ends = {int(k): int(v) for k, v in header["prefetch_ends"].items()}
        return tree


def _raw_view(values: Column) -> memoryview:
    return memoryview(values).cast("B")


def _read_array(data: memoryview, at: int, typecode: TypeCode, count: int) -> tuple[Column, int]:
    """The `count` values of `typecode` at `at`, as a view of `data`, not a copy: a loaded
    tree's arrays and the file's bytes were both in memory, which was half a warm mount's
    peak (30 MB each for the 200,000-file image)."""
    end = at + count * struct.calcsize(typecode)
    if count < 0 or end > len(data):
        raise ValueError("an array runs past the end")
    return data[at:end].cast(typecode), end


def _check_chunks(arrays: Mapping[str, Column], table: ChunkTable, lazy_layers: frozenset[int]) -> None:
    """Refuses chunk rows that disagree, and lazily read files whose file number is not in the table."""
    table.check()
    layers, offsets = arrays["layer"], arrays["offset"]
    if lazy_layers.issuperset(set(layers)):  # every inode's bytes are chunks (an all-eStargz image): max() in C
        largest = max(offsets, default=0)
    else:
        lazy_offsets = (offset for layer, offset in zip(layers, offsets, strict=True) if layer in lazy_layers)
        largest = max(lazy_offsets, default=0)
    if largest > table.files:
        raise ValueError("chunk file out of range")


def _check_shape(arrays: Mapping[str, Column], names_length: int, expected_names: int) -> None:
    """Refuses arrays that would send a lookup out of bounds: a damaged file is rebuilt, not
    served."""
    inodes = len(arrays["mode"])
    slots = len(arrays["slot_ino"])
    if names_length != expected_names or inodes == 0 or slots == 0 or len(arrays["name_end"]) != slots:
        raise ValueError("lengths disagree")
    if any(len(arrays[name]) != inodes for name in INODE_ARRAYS):
        raise ValueError("inode arrays disagree")
    if max(arrays["slot_ino"]) > inodes or min(arrays["slot_ino"]) < 1 or max(arrays["parent"]) > inodes:
        raise ValueError("inode number out of range")
    slot_ends = map(operator.add, arrays["first_slot"], arrays["slot_count"])  # in C: a 200,000-inode tree
    if arrays["name_end"][-1] != names_length or max(slot_ends) > slots:
        raise ValueError("slot out of range")


class _Builder:
    """Appends inodes and slots; freeze() drives it."""

    def __init__(self) -> None:
        self.arrays = {name: array(typecode) for name, typecode in (*INODE_ARRAYS.items(), *SLOT_ARRAYS.items())}
        self.names = bytearray()
        self.rare: dict[str, dict[int, object]] = {"links": {}, "rdevs": {}, "xattrs": {}}
        self.chunks = RowGatherer()
        self.lazy_layers: set[int] = set()
        self._append = tuple(self.arrays[name].append for name in INODE_ARRAYS)
        self.inodes = 0

    def add_inode(self, entry: Entry, nlink: int, parent: int) -> int:
        ino = self.inodes = self.inodes + 1
        offset = entry.offset
        if entry.chunks:  # a lazily read file: its chunks go to the table, `offset` names them
            offset = self.chunks.add_file(entry.chunks) + 1
            self.lazy_layers.add(entry.layer)
        mode = entry.mode
        # Each inode array's append, bound once, in INODE_ARRAYS' order, called in turn: a
        # loop over them cost more than the appends (200k inodes).
        a_mode, a_uid, a_gid, a_size, a_mtime, a_nlink, a_layer, a_offset, a_first, a_count, a_parent = self._append
        a_mode(mode)
        a_uid(entry.uid)
        a_gid(entry.gid)
        a_size(entry.size)
        a_mtime(entry.mtime_ns)
        a_nlink(nlink)
        a_layer(entry.layer)
        a_offset(offset)
        a_first(0)
        a_count(0)
        a_parent(parent)
        if mode & 0o170000 == stat.S_IFLNK:
            self.rare["links"][ino] = entry.link
        if entry.rdev:
            self.rare["rdevs"][ino] = entry.rdev
        if entry.xattrs:
            self.rare["xattrs"][ino] = entry.xattrs
        return ino

    def add_slots(self, names: list[bytes], inos: array) -> None:
        """Appends a directory's slots: its children's names, in order, and their inodes."""
        running = itertools.accumulate(map(len, names), initial=len(self.names))
        next(running)  # the start: the end of the slot before
        self.arrays["name_end"].extend(running)
        self.names += b"".join(names)
        self.arrays["slot_ino"].extend(inos)


def freeze(root: Node[Entry]) -> MergedTree:
    """Returns the merged tree with inode numbers assigned breadth first, children by name, so
    they are the same on every mount of the same image.

    It consumes the node tree: a directory's nodes are let go as soon as its children have
    slots, so that nodes and arrays never both hold the whole image."""
    links = _link_counts(root)
    builder = _Builder()
    builder.add_inode(root.entry or IMPLIED_DIRECTORY, 2, ROOT)
    builder.add_slots([b""], array("I", [ROOT]))
    by_entry: dict[int, int] = {}  # the inode of each entry that has several names
    queue: deque[tuple[int, Node[Entry]]] = deque([(ROOT, root)])
    # os.fsencode, less a Python call per name (a tenth of a 200k-entry freeze)
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    first_slot, slot_count, nlinks = builder.arrays["first_slot"], builder.arrays["slot_count"], builder.arrays["nlink"]
    add_inode, enqueue = builder.add_inode, queue.append
    while queue:
        ino, node = queue.popleft()
        assert node.children is not None
        children = sorted([(name.encode(encoding, errors), child) for name, child in node.children.items()],
                          key=itemgetter(0))  # names are unique: no tuple comparison needed
        node.children = None
        first_slot[ino - 1] = len(builder.arrays["slot_ino"])
        slot_count[ino - 1] = len(children)
        inos = array("I")
        slot = inos.append
        for _, child in children:
            entry = child.entry
            if child.children is not None:
                child_ino = add_inode(entry or IMPLIED_DIRECTORY, 2, ino)
                enqueue((child_ino, child))
                nlinks[ino - 1] += 1
                slot(child_ino)
                continue
            assert entry is not None
            if not links or (nlink := links.get(id(entry), 1)) == 1:
                child_ino = add_inode(entry, 1, 0)
            else:  # a hardlink: its other names share the inode numbered first
                known = by_entry.get(id(entry))
                child_ino = known or add_inode(entry, nlink, 0)
                by_entry[id(entry)] = child_ino
            slot(child_ino)
        builder.add_slots([name for name, _ in children], inos)
    return MergedTree(builder.arrays, bytes(builder.names), builder.rare, builder.chunks.table(),
                      frozenset(builder.lazy_layers))  # fmt: skip


def _link_counts(root: Node[Entry]) -> dict[int, int]:
    """Returns, for each entry that more than one path holds (hardlinks), how many do."""
    seen: set[int] = set()
    counts: Counter[int] = Counter()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.children is not None:
            stack.extend(node.children.values())
        elif id(node.entry) in seen:
            counts[id(node.entry)] += 1
        else:
            seen.add(id(node.entry))
    return {entry: count + 1 for entry, count in counts.items()}
