"""Freeze a merged tree into inodes addressed by FUSE path: built once, then read-only.

Being immutable, the tree is shared by mfusepy's worker threads without locks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from unionfs.entry import IMPLIED_DIRECTORY, Entry
from whiteout.apply import Node


@dataclass(frozen=True, slots=True, eq=False)
class Inode:
    """A file of the mount. Hardlinked paths share one Inode object."""

    ino: int
    entry: Entry
    nlink: int
    children: tuple[str, ...] | None  # the children's paths, sorted by name; None for non-directories


@dataclass(frozen=True, slots=True)
class MergedTree:
    """The merged image: an inode for every path."""

    by_path: dict[str, Inode]  # by clean path: '' is the root, 'etc/hosts' a file
    inode_count: int
    total_bytes: int

    def lookup(self, path: str) -> Inode:
        """Returns the inode at FUSE path `path` ('/', '/etc/hosts'); KeyError if none."""
        return self.by_path[path[1:]]

    def listing(self, directory: Inode) -> Iterator[tuple[str, Inode]]:
        """Yields (name, inode) of each child of `directory`, sorted by name."""
        for path in directory.children or ():
            yield path.rpartition("/")[2], self.by_path[path]


def freeze(root: Node[Entry]) -> MergedTree:
    """Returns the merged tree with inode numbers assigned in sorted depth-first order,
    so they are the same on every mount of the same image."""
    walk = list(_walk(root))
    keys = {id(node): _key(path, node) for path, node in walk}
    links = Counter(id(node.entry) for _, node in walk if not node.is_dir)
    by_path: dict[str, Inode] = {}
    by_entry: dict[int, Inode] = {}
    inodes = 0
    for _, node in walk:
        key = keys[id(node)]
        if node.children is not None:
            inodes += 1
            children = tuple(keys[id(node.children[name])] for name in sorted(node.children))
            subdirectories = sum(1 for child in node.children.values() if child.is_dir)
            by_path[key] = Inode(inodes, node.entry or IMPLIED_DIRECTORY, 2 + subdirectories, children)
            continue
        assert node.entry is not None
        inode = by_entry.get(id(node.entry))
        if inode is None:
            inodes += 1
            inode = by_entry[id(node.entry)] = Inode(inodes, node.entry, links[id(node.entry)], None)
        by_path[key] = inode
    total = sum(i.entry.size for i in by_entry.values())
    return MergedTree(by_path, inodes, total)


def _key(path: str, node: Node[Entry]) -> str:
    # The entry's own path string where it is the same text: one string per path, not two.
    return node.entry.path if node.entry is not None and node.entry.path == path else path


def _walk(root: Node[Entry]) -> Iterator[tuple[str, Node[Entry]]]:
    stack: list[tuple[str, Node[Entry]]] = [("", root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.children:
            prefix = path + "/" if path else ""
            stack.extend((prefix + name, node.children[name]) for name in sorted(node.children, reverse=True))
