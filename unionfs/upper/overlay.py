"""The writable merged tree: the image's frozen tree below, an upper directory in OCI diff form
above, and the rules that join them, with no FUSE in sight (unionfs/fuse/writable.py serves it).

The rules are kernel overlayfs's, in OCI's vocabulary:
- A name shows the upper entry if there is one; else, unless the upper directory whites it out
  (`.wh.NAME`) or is opaque (`.wh..wh..opq`), the lower one. A directory in both merges them.
- A change to a lower entry first copies it up: its parent directories, then the entry with its
  metadata; a file's bytes go to a nameless file that gets its name only when complete, so no
  crash shows half a copy. Truncating to zero copies no bytes at all.
- A lower file with several names (a hardlink group) is copied up once, every visible name then
  linked to the copy, so it stays one inode.
- Removing a name the lower layers have leaves a whiteout; a directory made where a lower one was
  removed is opaque.
- A directory that has a lower part is not renamed: EXDEV, as kernel overlayfs answers without
  redirect_dir, so `mv` copies and deletes instead. (A redirect would need a marker OCI layers
  cannot carry.) Directories made in the upper rename as on any file system.
- Names starting `.wh.` are the spec's: creating one is EINVAL, looking one up finds nothing.

Inode numbers: a lower entry keeps its tree inode number, also once copied up; an upper-only
entry gets a number above the tree's, one per upper inode (its hardlinks share it). Numbers are
stable for the life of the mount.

All namespace work holds one lock: it is short, it runs in Python (which runs one thread at a
time anyway), and it makes every check-then-change step atomic. File data is read and written
through descriptors outside the lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from unionfs.content import ContentReader
from unionfs.entry import Attributes
from unionfs.tree import ROOT, MergedTree
from unionfs.upper.store import (
    METACOPY_XATTR,
    OPAQUE,
    ORIGIN_XATTR,
    RESERVED_XATTRS,
    WHITEOUT,
    Shown,
    UpperStore,
    disk_permissions,
    join,
    libc,
)

COPY_CHUNK = 1 << 20
META, FULL, EMPTY = "meta", "full", "empty"  # what copy_up copies of a regular file's bytes
CAPABILITY_XATTR = "security.capability"
KEEP_TIME = -1  # in set_attributes' times: leave this one as it is
NAME_MAX = 255


def fail(number: int) -> OSError:
    return OSError(number, os.strerror(number))


@dataclass(eq=False)
class Node:
    """One inode of the merged view. `names` are the (directory node, name) pairs it is known
    by, the first being the one its upper path is made from; `lower` is the tree inode whose
    bytes or children it shows (None: upper only, or a directory that hides the lower one);
    `in_upper` says an upper entry exists for it."""

    ino: int
    names: list[tuple[Node, bytes]]
    lower: int | None
    in_upper: bool
    kind: int  # S_IFMT bits
    metacopy: bool = False  # an upper file whose bytes are still the lower ones (copy_up)
    override: bool | None = None  # whether its upper file has an override_stat (None: not known)
    upper_key: tuple[int, int] | None = None  # (st_dev, st_ino) of its upper entry
    last_seen: Attributes | None = None  # a removed non-file's attributes, link count 0 (_keep_reachable)
    lookups: int = 0  # the kernel's references: it may ask about the node until it FORGETs them
    orphan_fd: int | None = None  # an upper file unlinked while open: where its metadata is
    open_count: int = 0
    aliases_known: bool = field(default=False, repr=False)


class WritableTree:
    """The merged view of `tree` (bytes from `content`) with changes in `store`."""

    def __init__(self, tree: MergedTree, content: ContentReader, store: UpperStore, show_root: bool = False) -> None:
        """`show_root`: give the upper directory the image's root owner and mode (a new one)."""
        self._tree, self._content, self.store = tree, content, store
        self.lock = threading.RLock()
        self._nodes: dict[int, Node] = {}
        self._by_upper: dict[tuple[int, int], Node] = {}
        self._next_ino = 1 << 63  # numbers for the rare node whose own is taken (see _upper_ino)
        self._hardlink_names: dict[int, list[bytes]] | None = None
        # Inodes whose attributes changed in a way the kernel did not ask for and may have
        # cached: a directory copied up as the parent of a parent now shows DIR's size and a
        # merged directory's link count. The FUSE layer tells the kernel to forget them.
        self.changed_behind_the_kernel: list[int] = []
        info = store.lstat(b"")
        if info is None or not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "the upper directory is missing", store.root.decode())
        root = Node(ROOT, [], ROOT if not store.is_opaque(b"") else None, True, stat.S_IFDIR)
        self._nodes[ROOT] = root
        self._by_upper[(info.st_dev, info.st_ino)] = root
        if show_root:
            a = tree.attributes(ROOT)
            store.set_shown(b"", Shown(a.mode, a.uid, a.gid))

    # ------------------------------------------------------------ paths and nodes

    def node(self, ino: int) -> Node:
        found = self._nodes.get(ino)
        if found is None:
            raise KeyError(ino)
        return found

    def path(self, node: Node) -> bytes:
        """The node's path in DIR (b"" for the root); ENOENT for a file unlinked while open,
        which has no path (its metadata goes through its descriptor: see _target)."""
        if not node.names and node.ino != ROOT:
            raise fail(errno.ENOENT)
        parts: list[bytes] = []
        while node.names:
            parent, name = node.names[0]
            parts.append(name)
            node = parent
        return b"/".join(reversed(parts))

    def _lower_child(self, directory: Node, name: bytes) -> int | None:
        """The tree inode the lower layers show at `name` in `directory`, if any shows through."""
        if directory.lower is None:
            return None
        return self._tree.child(directory.lower, name)

    def lookup(self, parent: Node, name: bytes) -> Node:
        """Returns the node at `name` in `parent`; raises ENOENT, ENOTDIR, ENAMETOOLONG."""
        if not stat.S_ISDIR(parent.kind):
            raise fail(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if name.startswith(WHITEOUT):
            raise fail(errno.ENOENT)
        directory = self.path(parent)
        if parent.in_upper:
            relative = join(directory, name)
            info = self.store.lstat(relative)
            if info is not None:
                return self._upper_node(parent, name, relative, info)
        lower = self._lower_child(parent, name)
        if lower is None or (parent.in_upper and self.store.has_whiteout(directory, name)):
            raise fail(errno.ENOENT)
        return self._lower_node(parent, name, lower)

    def _upper_node(self, parent: Node, name: bytes, relative: bytes, info: os.stat_result) -> Node:
        key = (info.st_dev, info.st_ino)
        node = self._by_upper.get(key)
        if node is None:
            kind = stat.S_IFMT(self.store.shown(relative, info).mode)
            lower = origin = None
            if kind == stat.S_IFDIR and not self.store.is_opaque(relative):
                below = self._lower_child(parent, name)
                lower = origin = below if below is not None and self._tree.is_dir(below) else None
            copied_from = self.store.metacopy_source(relative) if kind == stat.S_IFREG else None
            if copied_from is not None:
                lower = origin = self._tree_inode(copied_from, relative)
            elif kind == stat.S_IFREG:
                origin = self._origin(relative)
            node = self._new_node(lower, True, kind, info, origin)
            node.metacopy = copied_from is not None
        self._know_name(node, parent, name)
        return node

    def _origin(self, relative: bytes) -> int | None:
        """The tree inode a file was copied up from, so that it keeps its number after a
        remount too; None for a file made in DIR, or an origin the image lacks."""
        path = self.store.origin_source(relative)
        if path is None:
            return None
        try:
            return self._tree.lookup(os.fsdecode(path)).ino
        except KeyError:
            return None

    def _tree_inode(self, path: bytes, relative: bytes) -> int:
        """The image's regular file at `path`, whose bytes a metadata-only copy still shows."""
        try:
            inode = self._tree.lookup(os.fsdecode(path))
        except KeyError:
            inode = None
        if inode is None or not inode.entry.is_regular:
            raise OSError(errno.EIO, f"{relative.decode(errors='replace')}: its bytes are to come from "
                          f"{path.decode(errors='replace')} of the image, which has no such file")  # fmt: skip
        return inode.ino

    def _lower_node(self, parent: Node, name: bytes, lower: int) -> Node:
        node = self._nodes.get(lower)
        if node is None:
            node = Node(lower, [], lower, False, stat.S_IFMT(self._tree.mode(lower)))
            self._nodes[lower] = node
        self._know_name(node, parent, name)
        return node

    def _new_node(self, lower: int | None, in_upper: bool, kind: int, info: os.stat_result,
                  origin: int | None = None) -> Node:  # fmt: skip
        """A node for the upper entry `info`. Its number, stable from one mount to the next:
        the tree inode it was copied up from, else one above the tree's numbers made from the
        upper inode's (git's index, for one, keeps inode numbers)."""
        ino = origin if origin is not None and origin not in self._nodes else self._upper_ino(info)
        node = Node(ino, [], lower, in_upper, kind, upper_key=(info.st_dev, info.st_ino))
        self._nodes[ino] = node
        self._by_upper[(info.st_dev, info.st_ino)] = node
        return node

    def _upper_ino(self, info: os.stat_result) -> int:
        ino = self._tree.inode_count + info.st_ino
        if ino in self._nodes or ino >= 1 << 63:  # an upper inode number reused while the old one is open
            ino, self._next_ino = self._next_ino, self._next_ino + 1
        return ino

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped `count` of its references to inode `ino`."""
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups -= count
            self._drop_if_gone(node)

    def _drop_if_gone(self, node: Node) -> None:
        """Forgets an upper node whose last name went and that no one has open, so that a new
        file that gets its upper inode number is a new node."""
        if node.names or node.open_count or node.lookups > 0 or node.orphan_fd is not None or node.upper_key is None:
            return
        if self._by_upper.get(node.upper_key) is node:
            del self._by_upper[node.upper_key]
        if self._nodes.get(node.ino) is node and node.lower is None:
            del self._nodes[node.ino]

    @staticmethod
    def _know_name(node: Node, parent: Node, name: bytes) -> None:
        if (parent, name) not in node.names:
            node.names.append((parent, name))

    @staticmethod
    def _forget_name(node: Node, parent: Node, name: bytes) -> None:
        if (parent, name) in node.names:
            node.names.remove((parent, name))

    # ------------------------------------------------------------ attributes

    def attributes(self, node: Node) -> Attributes:
        if not node.in_upper:
            assert node.lower is not None
            a = self._tree.attributes(node.lower)
            return a._replace(ino=node.ino, nlink=self._lower_link_count(node, a))
        if not node.names and node.ino != ROOT:
            if node.orphan_fd is None:
                if node.last_seen is None:
                    raise fail(errno.ESTALE)
                return node.last_seen  # removed while held open: what fstat still shows
            info = os.fstat(node.orphan_fd)
            return self._upper_attributes(node, b"", info, Shown(info.st_mode, info.st_uid, info.st_gid))
        relative = self.path(node)
        info = os.lstat(self.store.path(relative))
        shown = self.store.shown(relative, info, may_have_override=node.override is not False)
        if node.override is None:
            node.override = (shown.mode, shown.uid, shown.gid) != (info.st_mode, info.st_uid, info.st_gid)
        return self._upper_attributes(node, relative, info, shown)

    def _lower_link_count(self, node: Node, a: Attributes) -> int:
        """An image file's link count as overlayfs shows it: for a hardlink group, its names
        that still show (one whited out in this mount or an earlier one counts no more); else
        the image's own."""
        if stat.S_ISDIR(a.mode):
            return a.nlink
        if a.nlink == 1:
            return 1  # also once removed while open: overlayfs shows the image file's own count
        assert node.lower is not None
        return sum(1 for _ in self._visible_names(node.lower))

    def _upper_attributes(self, node: Node, relative: bytes, info: os.stat_result, shown: Shown) -> Attributes:
        size = info.st_size
        if stat.S_ISCHR(shown.mode) or stat.S_ISBLK(shown.mode):
            size = 0
        nlink = info.st_nlink
        if stat.S_ISDIR(shown.mode) and node.lower is not None:
            nlink = 1  # a merged directory: its subdirectories cannot be counted cheaply (as overlayfs)
        return Attributes(node.ino, shown.mode, nlink, shown.uid, shown.gid, size, shown.rdev, info.st_mtime_ns)

    def link_target(self, node: Node) -> bytes:
        if not stat.S_ISLNK(node.kind):
            raise fail(errno.EINVAL)
        if node.in_upper:
            return os.readlink(self.store.path(self.path(node)))
        assert node.lower is not None
        return os.fsencode(self._tree.link(node.lower))

    # ------------------------------------------------------------ listing

    def listing(self, directory: Node) -> list[tuple[bytes, int, int]]:
        """Returns (name, inode number, type bits) of every child, sorted by name."""
        if not stat.S_ISDIR(directory.kind):
            raise fail(errno.ENOTDIR)
        relative = self.path(directory)
        upper, whiteouts, opaque = self.store.listing(relative) if directory.in_upper else ({}, set(), False)
        children: dict[bytes, tuple[int, int]] = {}
        if directory.lower is not None and not opaque:
            for name, lower in self._tree.children(directory.lower):
                if name not in whiteouts and name not in upper:
                    node = self._nodes.get(lower)
                    children[name] = (node.ino if node else lower, self._tree.mode(lower))
        for name in upper:
            node = self.lookup(directory, name)
            children[name] = (node.ino, node.kind)
        return [(name, ino, kind) for name, (ino, kind) in sorted(children.items())]

    def _is_empty(self, directory: Node) -> bool:
        relative = self.path(directory)
        upper, whiteouts, opaque = self.store.listing(relative) if directory.in_upper else ({}, set(), False)
        if upper:
            return False
        if directory.lower is None or opaque:
            return True
        return all(name in whiteouts for name, _ in self._tree.children(directory.lower))

    # ------------------------------------------------------------ copy-up

    def copy_up(self, node: Node, data: str = META) -> None:
        """Gives `node` an upper entry (its parents first). For a regular file, `data` says
        what of its bytes: META copies none and keeps reading the lower ones (a chmod, chown,
        utime, xattr, link or rename: a `chown -R` copies no file's bytes), FULL all of them,
        EMPTY none because they are about to go (an O_TRUNC open, a truncate to zero). A
        metadata-only copy gets its bytes when first opened for writing (fill_data)."""
        if node.in_upper:
            if data != META and node.metacopy:
                self._fill_data(node, data)
            return
        if not node.names or node.lower is None:
            raise fail(errno.ENOENT)  # a lower file unlinked while open: nothing to copy it to
        parent, name = node.names[0]
        self.copy_up(parent)
        if stat.S_ISREG(node.kind) and self._tree.attributes(node.lower).nlink > 1:
            self._copy_up_group(node, data)
            return
        self._copy_up_one(node, parent, name, data)

    def _copy_up_one(self, node: Node, parent: Node, name: bytes, data: str) -> None:
        """Copies one entry up, leaving its parent's times as they were: a copy-up is no
        change a program made (kernel overlayfs does the same)."""
        with self._times_kept(parent):
            self._copy_entry(node, parent, name, data)

    def _copy_entry(self, node: Node, parent: Node, name: bytes, data: str) -> None:
        assert node.lower is not None
        relative = join(self.path(parent), name)
        a = self._tree.attributes(node.lower)
        if stat.S_ISDIR(a.mode):
            os.mkdir(self.store.path(relative), 0o700)
        elif stat.S_ISLNK(a.mode):
            os.symlink(self._tree.link(node.lower), self.store.path(relative))
        elif stat.S_ISREG(a.mode):
            self._copy_file(node.lower, relative, data)
            node.metacopy = data == META
        else:
            self.store.make_node(relative, stat.S_IFMT(a.mode), a.rdev)
        self._finish_copy(node, relative, a)

    def _finish_copy(self, node: Node, relative: bytes, a: Attributes) -> None:
        assert node.lower is not None
        path = self.store.path(relative)
        if not stat.S_ISLNK(a.mode):
            for key, value in self._tree.xattrs(node.lower).items():
                os.setxattr(path, key, value, follow_symlinks=False)
        node.override = self.store.set_shown(relative, Shown(a.mode, a.uid, a.gid, a.rdev), may_have_override=False)
        os.utime(path, ns=(a.mtime_ns, a.mtime_ns), follow_symlinks=False)
        info = os.lstat(path)
        node.in_upper = True
        node.upper_key = (info.st_dev, info.st_ino)
        self._by_upper[node.upper_key] = node
        if stat.S_ISDIR(a.mode):
            self.changed_behind_the_kernel.append(node.ino)

    def _copy_file(self, lower: int, relative: bytes, data: str) -> None:
        directory = relative.rpartition(b"/")[0]
        fd, temporary = self.store.new_file_fd(directory)
        try:
            if data == FULL:
                self._copy_bytes(lower, fd)
            elif data == META:
                os.ftruncate(fd, self._tree.attributes(lower).size)  # sparse: the size shows right
                os.setxattr(fd, METACOPY_XATTR, relative)
            os.setxattr(fd, ORIGIN_XATTR, relative)
            self.store.give_name(fd, temporary, relative)
        finally:
            os.close(fd)

    def _fill_data(self, node: Node, data: str) -> None:
        """Gives a metadata-only copy its bytes (none for EMPTY), then drops its mark: a crash
        before that leaves the mark, and the lower bytes keep showing, which are the same."""
        assert node.lower is not None
        path = self._upper_path(node)
        times = os.lstat(path)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            capabilities = _xattr_or_none(fd, CAPABILITY_XATTR)
            if data == FULL:
                self._copy_bytes(node.lower, fd)
            if capabilities is not None:  # the kernel drops file capabilities on any write
                os.setxattr(fd, CAPABILITY_XATTR, capabilities)
            os.removexattr(fd, METACOPY_XATTR)
        finally:
            os.close(fd)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        node.metacopy = False

    def _copy_bytes(self, lower: int, fd: int) -> None:
        entry = self._tree.entry(lower)
        position = 0
        while position < entry.size:
            size = min(COPY_CHUNK, entry.size - position)
            span = self._content.span(entry, position, size)
            if span is not None:
                copied = _copy_range(*span, fd, position)
            else:
                data = self._content.read(entry, position, size)
                if not data:
                    raise fail(errno.EIO)
                copied = os.pwrite(fd, data, position)
            position += copied

    def _copy_up_group(self, node: Node, data: str) -> None:
        """Copies up a lower file with several names once, and links each visible name to it."""
        assert node.lower is not None
        names = [(parent, name) for parent, name in self._visible_names(node.lower)]
        first_parent, first_name = node.names[0]
        self._copy_up_one(node, first_parent, first_name, data)
        source = self.store.path(self.path(node))
        for parent, name in names:
            if (parent, name) == (first_parent, first_name):
                continue
            self.copy_up(parent)
            with self._times_kept(parent):
                os.link(source, self.store.path(join(self.path(parent), name)))
            self._know_name(node, parent, name)

    @contextlib.contextmanager
    def _times_kept(self, directory: Node) -> Iterator[None]:
        """Restores a directory's times after a change that is part of a copy-up, which is no
        change a program made (kernel overlayfs does the same)."""
        path = self.store.path(self.path(directory))
        times = os.lstat(path)
        yield
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns), follow_symlinks=False)

    def _visible_names(self, lower: int) -> Iterator[tuple[Node, bytes]]:
        """The (directory node, name) pairs that show lower inode `lower` now."""
        if self._hardlink_names is None:
            self._hardlink_names = {}
            for text, inode in self._tree.items():
                if inode.nlink > 1 and not inode.is_dir:
                    self._hardlink_names.setdefault(inode.ino, []).append(os.fsencode(text))
        for path in self._hardlink_names.get(lower, []):
            found = self._resolve(path)
            if found is not None and found[2] is self._nodes.get(lower) and not found[2].in_upper:
                yield found[0], found[1]

    def _resolve(self, path: bytes) -> tuple[Node, bytes, Node] | None:
        directory = self._nodes[ROOT]
        parts = [part for part in path.split(b"/") if part]
        try:
            for part in parts[:-1]:
                directory = self.lookup(directory, part)
            return directory, parts[-1], self.lookup(directory, parts[-1])
        except OSError:
            return None

    # ------------------------------------------------------------ making names

    def _check_new_name(self, parent: Node, name: bytes) -> None:
        if name.startswith(WHITEOUT):
            raise fail(errno.EINVAL)  # the OCI spec reserves the prefix
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        try:
            self.lookup(parent, name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        raise fail(errno.EEXIST)

    def _prepare_name(self, parent: Node, name: bytes) -> tuple[bytes, bool]:
        """Copies the parent up; returns the new entry's upper path and whether a lower entry
        was removed there (a whiteout to drop, and a directory made there must be opaque)."""
        self.copy_up(parent)
        directory = self.path(parent)
        # Whiteouts are made only over lower entries, so where none shows there is none.
        hidden = self._lower_child(parent, name) is not None and self.store.has_whiteout(directory, name)
        return join(directory, name), hidden

    def _lower_dir_at(self, parent: Node, name: bytes) -> bool:
        lower = self._lower_child(parent, name)
        return lower is not None and self._tree.is_dir(lower)

    def _finish_new(self, parent: Node, name: bytes, relative: bytes, owner: tuple[int, int], mode: int,
                    hidden: bool, rdev: int = 0) -> Node:  # fmt: skip
        """Gives a new upper entry its owner and mode, drops the whiteout it replaces (after:
        a crash between shows the new entry, never the old lower one), returns its node."""
        override = self.store.set_shown(relative, Shown(mode, *owner, rdev), may_have_override=False)
        if hidden:
            self.store.drop_whiteout(self.path(parent), name)
        info = os.lstat(self.store.path(relative))
        node = self._new_node(None, True, stat.S_IFMT(mode), info)
        node.override = override
        self._know_name(node, parent, name)
        return node

    def _new_owner(self, parent: Node, owner: tuple[int, int]) -> tuple[int, int]:
        """The owner of a new entry: the caller's, with the group of a setgid directory."""
        parent_attributes = self.attributes(parent)
        if parent_attributes.mode & stat.S_ISGID:
            return owner[0], parent_attributes.gid
        return owner

    def _sgid_dir(self, parent: Node, mode: int) -> int:
        return mode | stat.S_ISGID if self.attributes(parent).mode & stat.S_ISGID else mode

    def create(self, parent: Node, name: bytes, mode: int, owner: tuple[int, int], flags: int) -> tuple[Node, int]:
        """Makes a regular file; returns its node and a descriptor opened with `flags`."""
        self._check_new_name(parent, name)
        relative, hidden = self._prepare_name(parent, name)
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        fd = os.open(self.store.path(relative), os.O_CREAT | os.O_EXCL | os.O_RDWR | (flags & os.O_CLOEXEC),
                     disk_permissions(mode))  # fmt: skip
        try:
            node = self._finish_new(parent, name, relative, self._new_owner(parent, owner), mode, hidden)
        except BaseException:
            os.close(fd)
            raise
        return node, fd

    def mkdir(self, parent: Node, name: bytes, mode: int, owner: tuple[int, int]) -> Node:
        self._check_new_name(parent, name)
        relative, hidden = self._prepare_name(parent, name)
        mode = self._sgid_dir(parent, stat.S_IFDIR | (mode & 0o7777))
        os.mkdir(self.store.path(relative), disk_permissions(mode))
        if self._lower_dir_at(parent, name):
            self.store.make_opaque(relative)
        return self._finish_new(parent, name, relative, self._new_owner(parent, owner), mode, hidden)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, owner: tuple[int, int]) -> Node:
        self._check_new_name(parent, name)
        relative, hidden = self._prepare_name(parent, name)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind == stat.S_IFREG:
            os.close(os.open(self.store.path(relative), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        else:
            self.store.make_node(relative, kind, rdev)
        return self._finish_new(parent, name, relative, self._new_owner(parent, owner), kind | (mode & 0o7777), hidden,
                                rdev)  # fmt: skip

    def symlink(self, parent: Node, name: bytes, target: bytes, owner: tuple[int, int]) -> Node:
        self._check_new_name(parent, name)
        relative, hidden = self._prepare_name(parent, name)
        os.symlink(target, self.store.path(relative))
        return self._finish_new(parent, name, relative, self._new_owner(parent, owner), stat.S_IFLNK | 0o777, hidden)

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if stat.S_ISDIR(node.kind):
            raise fail(errno.EPERM)
        self._check_new_name(parent, name)
        self.copy_up(node)
        relative, _ = self._prepare_name(parent, name)
        os.link(self._upper_path(node), self.store.path(relative))
        self.store.drop_whiteout(self.path(parent), name)
        self._know_name(node, parent, name)
        return node

    def _upper_path(self, node: Node) -> bytes:
        if not node.names and node.ino != ROOT:
            raise fail(errno.ENOENT)
        return self.store.path(self.path(node))

    # ------------------------------------------------------------ removing names

    def unlink(self, parent: Node, name: bytes) -> None:
        node = self.lookup(parent, name)
        if stat.S_ISDIR(node.kind):
            raise fail(errno.EISDIR)
        self._remove(parent, name, node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        node = self.lookup(parent, name)
        if not stat.S_ISDIR(node.kind):
            raise fail(errno.ENOTDIR)
        if not self._is_empty(node):
            raise fail(errno.ENOTEMPTY)
        self._remove(parent, name, node)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        """Removes `name`: a whiteout first where a lower entry would show (so a crash
        between the two steps still shows the name, not an older lower one), then the upper
        entry."""
        directory = self.path(parent)
        if self._lower_child(parent, name) is not None:
            self.copy_up(parent)
            self.store.add_whiteout(directory, name)
        relative = join(directory, name)
        self._keep_reachable(node, relative)
        if self.store.exists(relative):
            if stat.S_ISDIR(node.kind):
                self.store.clear_markers(relative)
                os.rmdir(self.store.path(relative))
            else:
                os.unlink(self.store.path(relative))
        self._forget_name(node, parent, name)
        self._drop_if_gone(node)

    def _keep_reachable(self, node: Node, relative: bytes) -> None:
        """What a descriptor still reaches of an entry about to lose its last name: an open
        upper file keeps its metadata behind a descriptor of ours (fstat, fchmod, fchown,
        futimens, fsetxattr: what a program may still do to it); anything else keeps its last
        attributes with no link, for fstat (a removed directory; a FIFO or device, which the
        kernel opens without asking us, so no open count tells they are held)."""
        if len(node.names) != 1:
            return
        if not stat.S_ISREG(node.kind):
            node.last_seen = self.attributes(node)._replace(nlink=0)
        elif node.open_count and node.orphan_fd is None and node.in_upper and self.store.exists(relative):
            node.orphan_fd = os.open(self.store.path(relative), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _target(self, node: Node) -> tuple[bytes | int, bool]:
        """Where the node's upper xattrs are: its path (never followed, so a symlink in DIR
        cannot lead outside it), or for a file unlinked while open, its descriptor; and the
        follow_symlinks that goes with it (a descriptor takes only True)."""
        if not node.names and node.ino != ROOT and node.orphan_fd is not None:
            return node.orphan_fd, True
        return self._upper_path(node), False

    # ------------------------------------------------------------ rename

    def rename(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        """rename(2) with renameat2's RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2)."""
        if new_name.startswith(WHITEOUT):
            raise fail(errno.EINVAL)
        if len(new_name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        node = self.lookup(parent, name)
        target = self._maybe_lookup(new_parent, new_name)
        if flags & 2:
            self._exchange(parent, name, node, new_parent, new_name, target)
            return
        if target is not None and flags & 1:
            raise fail(errno.EEXIST)
        if target is node:
            return
        # The order of overlayfs: the types (the VFS), then a lower directory (EXDEV), then
        # whether the directory replaced is empty.
        if target is not None:
            _check_types(node, target)
        if stat.S_ISDIR(node.kind) and self._has_lower(node):
            raise fail(errno.EXDEV)
        if target is not None and stat.S_ISDIR(target.kind) and not self._is_empty(target):
            raise fail(errno.ENOTEMPTY)
        self._move(parent, name, node, new_parent, new_name, target)

    def _maybe_lookup(self, parent: Node, name: bytes) -> Node | None:
        try:
            return self.lookup(parent, name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _has_lower(self, node: Node) -> bool:
        """A directory whose lower part shows (merged) or that overlays one (not pure upper)."""
        return node.lower is not None

    def _move(self, parent: Node, name: bytes, node: Node, new_parent: Node, new_name: bytes,
              target: Node | None) -> None:  # fmt: skip
        self.copy_up(node)
        self.copy_up(new_parent)
        source, destination = join(self.path(parent), name), join(self.path(new_parent), new_name)
        if target is not None and stat.S_ISDIR(target.kind) and self.store.exists(destination):
            self.store.clear_markers(destination)
        if stat.S_ISDIR(node.kind) and self._lower_dir_at(new_parent, new_name):
            self.store.make_opaque(source)  # the lower directory at the new name must stay hidden
        if self._lower_child(parent, name) is not None:
            self.store.add_whiteout(self.path(parent), name)
        if target is not None and not target.in_upper:
            pass  # a lower-only target: the rename below puts the upper entry over it
        elif target is not None:
            self._keep_reachable(target, destination)
        os.rename(self.store.path(source), self.store.path(destination))
        self.store.drop_whiteout(self.path(new_parent), new_name)
        if target is not None:
            self._forget_name(target, new_parent, new_name)
            self._drop_if_gone(target)
        self._rename_name(node, parent, name, new_parent, new_name)

    @staticmethod
    def _rename_name(node: Node, parent: Node, name: bytes, new_parent: Node, new_name: bytes) -> None:
        index = node.names.index((parent, name)) if (parent, name) in node.names else None
        if index is None:
            node.names.insert(0, (new_parent, new_name))
        else:
            node.names[index] = (new_parent, new_name)

    def _exchange(self, parent: Node, name: bytes, node: Node, new_parent: Node, new_name: bytes,
                  target: Node | None) -> None:  # fmt: skip
        if target is None:
            raise fail(errno.ENOENT)
        if target is node:
            return
        for one in (node, target):
            if stat.S_ISDIR(one.kind) and self._has_lower(one):
                raise fail(errno.EXDEV)
        self.copy_up(node)
        self.copy_up(target)
        source, destination = join(self.path(parent), name), join(self.path(new_parent), new_name)
        _exchange_paths(self.store.path(source), self.store.path(destination))
        self._rename_name(node, parent, name, new_parent, new_name)
        self._rename_name(target, new_parent, new_name, parent, name)

    # ------------------------------------------------------------ metadata

    def set_attributes(self, node: Node, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                       size: int | None = None, times: tuple[int | None, int | None] | None = None,
                       fd: int | None = None) -> None:  # fmt: skip
        """chmod, chown, truncate and utimensat (None: unchanged; in `times`, None: now and
        KEEP_TIME: unchanged)."""
        if not node.names and node.ino != ROOT:
            self._set_orphan_attributes(node, mode, uid, gid, size, times, fd)
            return
        if size is not None:
            if stat.S_ISDIR(node.kind):
                raise fail(errno.EISDIR)
            self.copy_up(node, EMPTY if size == 0 else FULL)
            if fd is not None:
                os.ftruncate(fd, size)
            else:
                os.truncate(self._upper_path(node), size)
        if mode is not None or uid is not None or gid is not None:
            self._set_shown(node, mode, uid, gid)
        if times is not None:
            self._set_times(node, times)

    def _set_orphan_attributes(self, node: Node, mode: int | None, uid: int | None, gid: int | None,
                               size: int | None, times: tuple[int | None, int | None] | None,
                               fd: int | None) -> None:  # fmt: skip
        """The same changes to a file unlinked while open, through its descriptor (it is
        gone from DIR, so no override_stat is kept for it)."""
        target = fd if fd is not None else node.orphan_fd
        if target is None and mode is None and uid is None and gid is None and size is None:
            return  # the times of an image file unlinked while open (the kernel's atime): nowhere to keep them
        if target is None:
            raise fail(errno.ENOENT)
        if size is not None:
            os.ftruncate(target, size)
        if uid is not None or gid is not None:
            os.fchown(target, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.fchmod(target, stat.S_IMODE(mode))
        if times is not None:
            info, now = os.fstat(target), time.time_ns()
            atime, mtime = (now if t is None else t for t in times)
            os.utime(target, ns=(info.st_atime_ns if atime == KEEP_TIME else atime,
                                 info.st_mtime_ns if mtime == KEEP_TIME else mtime))  # fmt: skip

    def _set_shown(self, node: Node, mode: int | None, uid: int | None, gid: int | None) -> None:
        self.copy_up(node)
        a = self.attributes(node)
        new_mode = stat.S_IFMT(a.mode) | (stat.S_IMODE(mode) if mode is not None else stat.S_IMODE(a.mode))
        wanted = Shown(new_mode, a.uid if uid is None else uid, a.gid if gid is None else gid, a.rdev)
        node.override = self.store.set_shown(self.path(node), wanted, may_have_override=node.override is not False)

    def _set_times(self, node: Node, times: tuple[int | None, int | None]) -> None:
        """Sets atime and mtime: each in nanoseconds, None for now, or KEEP_TIME."""
        self.copy_up(node)
        path = self._upper_path(node)
        info = os.lstat(path)
        now = time.time_ns()
        atime, mtime = (now if t is None else t for t in times)
        os.utime(path, ns=(info.st_atime_ns if atime == KEEP_TIME else atime,
                           info.st_mtime_ns if mtime == KEEP_TIME else mtime), follow_symlinks=False)  # fmt: skip

    def xattrs(self, node: Node) -> dict[str, bytes]:
        if not node.in_upper:
            assert node.lower is not None
            return dict(self._tree.xattrs(node.lower))
        if stat.S_ISLNK(node.kind):
            return {}
        target, follow = self._target(node)
        return {name: os.getxattr(target, name, follow_symlinks=follow)
                for name in os.listxattr(target, follow_symlinks=follow) if name not in RESERVED_XATTRS}  # fmt: skip

    def xattr(self, node: Node, name: str) -> bytes | None:
        """One xattr's value, or None: asked on every write(2) for security.capability, so
        it reads just that one."""
        if not node.in_upper:
            assert node.lower is not None
            return self._tree.xattrs(node.lower).get(name)
        if name in RESERVED_XATTRS or stat.S_ISLNK(node.kind):
            return None
        try:
            target, follow = self._target(node)
            return os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    def set_xattr(self, node: Node, name: str, value: bytes, flags: int) -> None:
        if name in RESERVED_XATTRS:
            raise fail(errno.EPERM)
        exists = name in self.xattrs(node)
        if flags & os.XATTR_CREATE and exists:
            raise fail(errno.EEXIST)
        if flags & os.XATTR_REPLACE and not exists:
            raise fail(errno.ENODATA)
        self.copy_up(node)
        target, follow = self._target(node)
        os.setxattr(target, name, value, flags, follow_symlinks=follow)

    def remove_xattr(self, node: Node, name: str) -> None:
        if name in RESERVED_XATTRS or name not in self.xattrs(node):
            raise fail(errno.ENODATA)
        self.copy_up(node)
        target, follow = self._target(node)
        os.removexattr(target, name, follow_symlinks=follow)

    # ------------------------------------------------------------ data

    def open_upper(self, node: Node, flags: int) -> int:
        """Returns a descriptor of the node's upper file, copying it up first when the open
        writes (O_TRUNC copies no bytes)."""
        if node.orphan_fd is not None and not node.names:
            return os.open(f"/proc/self/fd/{node.orphan_fd}", os.O_RDWR)
        self.copy_up(node, EMPTY if flags & os.O_TRUNC else FULL)
        fd = os.open(self._upper_path(node), os.O_RDWR | os.O_NOFOLLOW)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
        return fd

    def read_lower(self, node: Node, offset: int, size: int) -> tuple[int, int, int] | bytes:
        """The lower bytes of a node not copied up: (fd, position, size) where they lie in a
        local file, else the bytes."""
        assert node.lower is not None
        entry = self._tree.entry(node.lower)
        span = self._content.span(entry, offset, size)
        return span if span is not None else self._content.read(entry, offset, size)

    def opened(self, node: Node) -> None:
        node.open_count += 1

    def closed(self, node: Node) -> None:
        node.open_count -= 1
        if node.open_count <= 0 and node.orphan_fd is not None and not node.names:
            os.close(node.orphan_fd)
            node.orphan_fd = None
            self._drop_if_gone(node)


def _check_types(node: Node, target: Node) -> None:
    """rename(2)'s rule on what may replace what."""
    if stat.S_ISDIR(node.kind) and not stat.S_ISDIR(target.kind):
        raise fail(errno.ENOTDIR)
    if not stat.S_ISDIR(node.kind) and stat.S_ISDIR(target.kind):
        raise fail(errno.EISDIR)


def _copy_range(source: int, at: int, length: int, fd: int, position: int) -> int:
    """Copies bytes between files in the kernel where it can (copy_file_range: a reflink on
    file systems that share extents), else through a buffer (across file systems)."""
    try:
        copied = os.copy_file_range(source, fd, length, at, position)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        copied = os.pwrite(fd, os.pread(source, length, at), position)
    if copied <= 0:
        raise fail(errno.EIO)  # the cached tar is shorter than its index says
    return copied


def _xattr_or_none(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _exchange_paths(first: bytes, second: bytes) -> None:
    at_fdcwd, rename_exchange = -100, 2
    if libc().renameat2(at_fdcwd, first, at_fdcwd, second, rename_exchange) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


__all__ = ["OPAQUE", "Node", "WritableTree", "fail"]
