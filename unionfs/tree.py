"""Freeze a merged tree into inodes, addressed by path and by inode number: built once, then
read-only.

Being immutable, the tree is shared by libfuse's worker threads without locks.
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
    by_ino: list[Inode]  # by inode number less one: the root is 1
    directory_paths: dict[int, str]  # clean path of each directory, by inode number
    total_bytes: int

    @property
    def inode_count(self) -> int:
        return len(self.by_ino)

    def inode(self, ino: int) -> Inode:
        """Returns inode number `ino`; KeyError if there is none."""
        if not 0 < ino <= len(self.by_ino):
            raise KeyError(ino)
        return self.by_ino[ino - 1]

    def child(self, directory: int, name: str) -> Inode:
        """Returns the inode called `name` in directory inode `directory`; KeyError if none."""
        path = self.directory_paths[directory]
        if name == "..":
            return self.by_path[path.rpartition("/")[0]]
        if name == ".":
            return self.by_path[path]
        return self.by_path[f"{path}/{name}" if path else name]

    def parent(self, directory: int) -> Inode:
        """Returns the directory holding directory inode `directory` (the root's is itself)."""
        return self.child(directory, "..")

    def lookup(self, path: str) -> Inode:
        """Returns the inode at FUSE path `path` ('/', '/etc/hosts'); KeyError if none."""
        return self.by_path[path[1:]]

    def listing(self, directory: Inode) -> Iterator[tuple[str, Inode]]:
        """Yields (name, inode) of each child of `directory`, sorted by name."""
        for path in directory.children or ():
            yield path.rpartition("/")[2], self.by_path[path]


def freeze(root: Node[Entry]) -> MergedTree:
    """Returns the merged tree with inode numbers assigned in sorted depth-first order,
    so they are the same on every mount of the same image.

    It consumes the node tree: a directory's nodes are let go as soon as its inode exists, so
    that nodes and inodes never both hold the whole image (the peak of a mount's memory)."""
    links = _link_counts(root)
    by_path: dict[str, Inode] = {}
    by_ino: list[Inode] = []
    directory_paths: dict[int, str] = {}
    by_entry: dict[int, Inode] = {}
    stack: list[tuple[str, Node[Entry]]] = [("", root)]
    while stack:
        key, node = stack.pop()
        ino = len(by_ino) + 1
        if node.children is not None:
            children = _child_keys(key, node.children)
            subdirectories = sum(1 for _, child in children if child.is_dir)
            entry = node.entry or IMPLIED_DIRECTORY
            inode = Inode(ino, entry, 2 + subdirectories, tuple(k for k, _ in children))
            by_ino.append(inode)
            by_path[key] = inode
            directory_paths[ino] = key
            node.children = None
            stack.extend(reversed(children))
            continue
        assert node.entry is not None
        known = by_entry.get(id(node.entry))  # another name of an inode already numbered
        if known is None:
            known = by_entry[id(node.entry)] = Inode(ino, node.entry, links.get(id(node.entry), 1), None)
            by_ino.append(known)
        by_path[key] = known
    total = sum(i.entry.size for i in by_entry.values())
    return MergedTree(by_path, by_ino, directory_paths, total)


def _child_keys(key: str, children: dict[str, Node[Entry]]) -> list[tuple[str, Node[Entry]]]:
    """Returns (path, node) of each child, sorted by name. A child's path is its entry's own
    path string where that is the same text: one string per path, not two."""
    prefix = key + "/" if key else ""
    keyed = []
    for name in sorted(children):
        child = children[name]
        path = prefix + name
        keyed.append((child.entry.path if child.entry is not None and child.entry.path == path else path, child))
    return keyed


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
