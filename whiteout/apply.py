"""Apply image layers bottom to top into one tree, following image-spec layer.md.

Rules, and where they come from:
- layer.md "Whiteouts": `.wh.NAME` hides NAME (and its whole subtree) of the layers below;
  `.wh..wh..opq` hides every lower child of its directory. Both apply to lower layers only:
  entries of the same layer are kept whatever their order in the tar. So each layer is
  applied in two passes: its whiteouts on the lower view, then its entries in tar order.
- layer.md "Changesets": an entry replaces what the lower view has at its path. A
  directory over a directory keeps the lower children and takes the upper metadata; any
  other replacement drops the lower subtree (containerd removes it before extracting).
- A parent with no header of its own is created as an implied directory, for every entry
  including whiteouts (containerd's `mkparent` runs before it looks at the name, so a
  whiteout in a directory that no lower layer has leaves that directory, empty). A
  non-directory in the way of an ordinary entry is replaced by a directory; a marker
  below a non-directory has nothing to hide and changes nothing (umoci keeps the file;
  containerd refuses the layer with ENOTDIR).
- A symlink among an entry's parents is followed inside the root (whiteout.resolve, as
  containerd's applyNaive and umoci's SecureJoin do): `p/c` over `p -> real` lands in
  `real/` and `p` stays a link. The same holds for the parent of a whiteout, the directory
  of an opaque marker (both against the lower layers' view, as markers only act on lower
  layers) and the parent of a hardlink's target. The last component is never followed:
  an entry at a symlink's own path replaces it. A parent that cannot be resolved to a
  directory (a symlink loop, or a link to a file) is an error in containerd and umoci:
  the entry is skipped with a warning. (containerd's overlayfs snapshotter applies a layer
  to an empty upper directory and never sees the lower link: there, `p` becomes a
  directory that hides it.)
- A hardlink whose target is missing or a directory is skipped whole, with a warning.
- The same path twice in one layer: the later entry wins, as tar extraction does.
- A hardlink is resolved when its layer is applied, against the view at that point
  (extraction calls link(2) on what is on disk): the link node shares the target's
  entry object, so later whiteouts or replacements of either path leave the other intact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from whiteout.markers import WHITEOUT_PREFIX, Marker, classify
from whiteout.paths import parent_and_name
from whiteout.resolve import MAX_SYMLINKS, TooManySymlinks, resolve_in_root


class LayerEntry(Protocol):
    """What the merge needs to know of an entry: its clean path, and its kind."""

    @property
    def path(self) -> str: ...

    @property
    def is_dir(self) -> bool: ...

    @property
    def hardlink_to(self) -> str | None: ...

    @property
    def symlink_to(self) -> str | None: ...


E = TypeVar("E", bound=LayerEntry)
Warn = Callable[[str], None]


@dataclass(slots=True, eq=False)
class Node(Generic[E]):
    """One path of the merged tree.

    `entry` is None for a directory implied by its children. `children` is None for
    anything that is not a directory. Two nodes holding the same entry object are
    hardlinks of one file.
    """

    entry: E | None
    children: dict[str, Node[E]] | None

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def symlink_to(self) -> str | None:
        """Returns the target if this node is a symlink, else None."""
        return self.entry.symlink_to if self.entry is not None and self.children is None else None


LayerObserver = Callable[[int, Node[E], list[E]], None]
"""Called with (layer number, the tree the layers below made, the layer's entries) before the
layer is applied: how whiteout.history learns what each layer changed without merging again.
The tree is the live one: look, don't change it, and copy what must outlive the call."""


class Unresolvable(Exception):
    """A path's parents lead through symlinks to something that is no directory, or loop."""


def merge_layers(layers: Iterable[Iterable[E]], warn: Warn = lambda _msg: None,
                 observe: LayerObserver[E] | None = None) -> Node[E]:  # fmt: skip
    """Returns the root of the tree that layers, applied bottom to top, produce.

    Entry paths must already be clean (see whiteout.paths.clean_path). The entries are
    shared, never changed; the nodes are new. `observe`, if given, sees each layer's lower
    tree before the layer is applied (the returned root is the tree after the last one).
    """
    root: Node[E] = Node(None, {})
    for number, layer in enumerate(layers):
        entries = list(layer)
        if observe is not None:
            observe(number, root, entries)
        root = _apply_layer(root, entries, _prefixed(warn, f"layer {number}: "))
    return root


def _prefixed(warn: Warn, prefix: str) -> Warn:
    return lambda message: warn(prefix + message)


def _apply_layer(root: Node[E], entries: list[E], warn: Warn) -> Node[E]:
    ordinary: list[E] = []
    for entry in entries:
        if WHITEOUT_PREFIX not in entry.path:  # classify's own first test, less a call per entry
            ordinary.append(entry)
            continue
        marker, target = classify(entry.path)
        try:
            if marker is Marker.WHITEOUT:
                _remove(root, target)
            elif marker is Marker.OPAQUE:
                root = _make_opaque(root, target)
        except Unresolvable as error:
            warn(f"{entry.path!r}: {error}, marker ignored")
        if marker is Marker.NONE:
            ordinary.append(entry)
    for entry in ordinary:
        root = _add(root, entry, warn)
    return root


def lookup(root: Node[E], path: str) -> Node[E] | None:
    """Returns the node at a clean path, or None."""
    node = root
    for name in path.split("/") if path else ():
        if node.children is None:
            return None
        found = node.children.get(name)
        if found is None:
            return None
        node = found
    return node


def _remove(root: Node[E], path: str) -> None:
    parent_path, name = parent_and_name(path)
    parent = _ensure_directory(root, parent_path, replace=False)
    if parent is not None:
        parent.children.pop(name, None)  # type: ignore[union-attr]


def _make_opaque(root: Node[E], path: str) -> Node[E]:
    path = _resolved(root, path)
    if not path:
        return Node(root.entry, {})
    parent_path, name = parent_and_name(path)
    parent = _ensure_directory(root, parent_path, replace=False)
    if parent is None or parent.children is None:
        return root
    existing = parent.children.get(name)
    if existing is None or existing.is_dir:
        parent.children[name] = Node(existing.entry if existing is not None else None, {})
    return root


def _resolved(root: Node[E], path: str) -> str:
    """Returns `path` with its symlinks followed in the tree; raises Unresolvable on a loop."""
    try:
        return resolve_in_root(path, lambda prefix: _link_at(root, prefix))[0]
    except TooManySymlinks:
        raise Unresolvable(f"a symlink loop in {path!r} (more than {MAX_SYMLINKS} links)") from None


def _link_at(root: Node[E], path: str) -> str | None:
    node = lookup(root, path)
    return node.symlink_to if node is not None else None


def _ensure_directory(root: Node[E], path: str, replace: bool = True) -> Node[E] | None:
    """Returns the directory node at path, creating implied directories on the way.

    Symlinks on the way are followed (see _through_links). Any other non-directory in the
    way is replaced, or, with replace=False, makes this return None.
    """
    node = root
    for name in path.split("/") if path else ():
        assert node.children is not None
        child = node.children.get(name)
        if child is not None and child.children is None:  # not a directory
            if child.symlink_to is not None:
                return _through_links(root, path)
            if not replace:
                return None
        if child is None or child.children is None:
            child = Node(None, {})
            node.children[name] = child
        node = child
    return node


def _through_links(root: Node[E], path: str) -> Node[E]:
    """Returns the directory that `path` leads to through its symlinks, creating the missing
    directories at the end; raises Unresolvable if that is no directory or there is a loop."""
    resolved = _resolved(root, path)
    node = _ensure_directory(root, resolved, replace=False)  # no symlink left on the way
    if node is None:
        raise Unresolvable(f"parent {path!r} leads through a symlink to {resolved!r}, which is no directory")
    return node


def _add(root: Node[E], entry: E, warn: Warn) -> Node[E]:
    if not entry.path:
        if not entry.is_dir:
            warn("a non-directory entry for the root is ignored")
            return root
        return Node(entry, root.children)
    parent_path, _, name = entry.path.rpartition("/")  # parent_and_name, less a call per entry
    new = _node_for(root, entry, warn)
    if new is None:
        return root
    try:
        parent = _ensure_directory(root, parent_path)
    except Unresolvable as error:
        warn(f"{entry.path!r}: {error}, entry skipped")
        return root
    assert parent is not None and parent.children is not None
    existing = parent.children.get(name)
    if existing is not None and existing.children is not None and new.children is not None:  # both directories
        new.children = existing.children
    parent.children[name] = new
    return root


def _node_for(root: Node[E], entry: E, warn: Warn) -> Node[E] | None:
    if entry.is_dir:
        return Node(entry, {})
    target_path = entry.hardlink_to
    if target_path is None:
        return Node(entry, None)
    target = _lookup_through_parents(root, target_path)
    if target is None or target.entry is None or target.is_dir:
        warn(f"hardlink {entry.path!r} -> {target_path!r}: no such file, entry skipped")
        return None
    return Node(target.entry, None)


def _lookup_through_parents(root: Node[E], path: str) -> Node[E] | None:
    """Returns the node at `path` with the symlinks of its parents followed, or None."""
    parent_path, name = parent_and_name(path)
    try:
        parent = _resolved(root, parent_path)
    except Unresolvable:
        return None
    return lookup(root, f"{parent}/{name}" if parent else name)
