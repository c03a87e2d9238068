"""Why a merged tree looks as it does: what each layer did to one path, and to the tree.

Pure logic, no I/O: the layers' entries in (bottom first), plain reports out. The merge is
whiteout.apply's own (merge_layers with an observer that sees each layer's lower tree), so
the answers follow exactly the rules a mount follows; this module only compares the tree
before and after each layer, and reads the layer's entries to name the cause of a change.

Where a layer's entry or marker lands is found as the merge finds it: the symlinks among
its parents followed in the tree below the layer (an opaque marker's directory itself too).
The one difference: an ordinary entry is resolved against the lower tree, where the merge
uses the tree as the layer's earlier entries left it; they differ only for a symlink that a
layer makes and then writes through in the same layer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic

from whiteout.apply import E, LayerEntry, Node, lookup, merge_layers
from whiteout.markers import Marker, classify
from whiteout.paths import parent_and_name
from whiteout.resolve import TooManySymlinks, resolve_in_root


def coarse_kind(entry: LayerEntry) -> str:
    """'directory', 'symlink' or 'file': what the merge itself can tell of an entry."""
    if entry.is_dir:
        return "directory"
    return "symlink" if entry.symlink_to is not None else "file"


class Cause(enum.Enum):
    """What an entry of a layer did to a path: removed what it held (the first four),
    replaced it, emptied it, or made a directory there for entries below it."""

    WHITEOUT = "whiteout"  # `.wh.NAME` of the path itself
    PARENT_WHITEOUT = "parent-whiteout"  # `.wh.NAME` of a directory above the path
    OPAQUE = "opaque"  # `.wh..wh..opq` in a directory above the path
    PARENT_REPLACED = "parent-replaced"  # a directory above the path replaced by a non-directory
    REPLACED = "replaced"  # the layer's own entry at the path, of another kind than below
    OVERWRITTEN = "overwritten"  # the layer's own entry at the path, of the kind it had
    MADE_OPAQUE = "made-opaque"  # `.wh..wh..opq` in the path itself: its lower children hidden
    IMPLIED = "implied"  # a directory made for an entry below the path (no entry of its own)


REMOVING = (Cause.WHITEOUT, Cause.PARENT_WHITEOUT, Cause.OPAQUE, Cause.PARENT_REPLACED)


class Action(enum.Enum):
    """What a layer did to a path, seen from the tree below it and the tree after it."""

    ADDED = "added"  # absent below, present after
    REMOVED = "removed"  # present below, absent after
    REPLACED = "replaced"  # present below and after, as another kind (file -> directory, ...)
    MODIFIED = "modified"  # present below and after, a new entry of the same kind
    EMPTIED = "emptied"  # the same directory, its lower children hidden by its own opaque marker


@dataclass(frozen=True, slots=True)
class Reason:
    """One entry of a layer and what it did: `marker` as the layer names it (`etc/.wh.motd`,
    `var/cache/.wh..wh..opq`, or an ordinary entry), `target` the tree path it acted on
    (the explained path itself, or a directory above it)."""

    cause: Cause
    marker: str
    target: str


@dataclass(frozen=True, slots=True)
class Change(Generic[E]):
    """What layer `layer` did to the path: the kinds below and after it (None: absent), the
    entry it holds after (None: absent, or a directory implied by entries below it) and the
    layer's entries that caused the change."""

    layer: int
    action: Action
    before: str | None
    after: str | None
    entry: E | None
    reasons: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class GroupState:
    """The paths holding the path's file (hardlinks of one another) after layer `layer`."""

    layer: int
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PathHistory(Generic[E]):
    """Everything the layers did to one path, bottom first, and what the final tree holds.

    `hardlinks` are all paths of the final tree that hold the path's file (itself included,
    sorted), empty unless there are two or more. `groups` follows that group through the
    layers: one state per layer that changed its members (made it, or split it)."""

    path: str
    changes: tuple[Change[E], ...]
    kind: str | None  # in the final tree; None: absent
    entry: E | None
    hardlinks: tuple[str, ...]
    groups: tuple[GroupState, ...]

    @property
    def present(self) -> bool:
        return self.kind is not None

    @property
    def ever_present(self) -> bool:
        """True if any layer's tree had the path."""
        return self.present or bool(self.changes)

    @property
    def made_by(self) -> int | None:
        """The layer whose change left the path as the final tree has it; None if absent."""
        if not self.present:
            return None
        return next((c.layer for c in reversed(self.changes) if c.after is not None), None)

    @property
    def removed_by(self) -> Change[E] | None:
        """The change that removed the path for good; None if it is present or never was."""
        if self.present or not self.changes:
            return None
        return self.changes[-1]


def path_history(layers: Sequence[Sequence[E]], path: str, kind_of: Callable[[E], str] = coarse_kind) -> PathHistory[E]:
    """Returns what each layer did to the clean path `path` (see whiteout.paths.clean_path:
    the path as it stands in the merged tree, its own parents' symlinks already followed)."""
    tracker = _PathTracker(path, kind_of, _link_partners(layers, path))
    final = merge_layers(layers, observe=tracker.observe)
    tracker.finish(final)
    node = lookup(final, path)
    hardlinks = _group_in(final, node.entry) if node is not None and not node.is_dir else ()
    return PathHistory(path, tuple(tracker.changes), _node_kind(node, kind_of), node.entry if node else None,
                       hardlinks if len(hardlinks) > 1 else (), tuple(tracker.groups))  # fmt: skip


class _PathTracker(Generic[E]):
    """The observer of path_history: before each layer it notes the path's node and the
    layer's entries that touch it; with the next layer's tree (the tree after) it settles
    the change."""

    def __init__(self, path: str, kind_of: Callable[[E], str], partners: frozenset[str]) -> None:
        self.path, self.kind_of, self.partners = path, kind_of, partners
        self.changes: list[Change[E]] = []
        self.groups: list[GroupState] = []
        self._pending: tuple[int, Node[E] | None, _Touches[E]] | None = None

    def observe(self, number: int, lower: Node[E], entries: list[E]) -> None:
        self.finish(lower)
        self._pending = (number, lookup(lower, self.path), _touching(lower, entries, self.path))

    def finish(self, after_root: Node[E]) -> None:
        if self._pending is None:
            return
        number, before, touches = self._pending
        self._pending = None
        after = lookup(after_root, self.path)
        change = _settle(number, self.path, before, after, touches, self.kind_of)
        if change is not None:
            self.changes.append(change)
        self._note_group(number, after_root, after)

    def _note_group(self, number: int, root: Node[E], node: Node[E] | None) -> None:
        entry = node.entry if node is not None and not node.is_dir else None
        members: tuple[str, ...] = ()
        if entry is not None:
            members = tuple(sorted(p for p in self.partners if _holds(root, p, entry)))
        last = self.groups[-1].paths if self.groups else ()
        if members != last and (len(members) > 1 or len(last) > 1):
            self.groups.append(GroupState(number, members))


@dataclass(slots=True)
class _Touches(Generic[E]):
    """What one layer has for the explained path: the entries that remove or empty what it
    holds, its last ordinary entry landing on it, and the first entry below it (which
    implies a directory there if there is none)."""

    reasons: list[Reason]
    at_path: E | None = None
    below: E | None = None


def _touching(lower: Node[E], entries: list[E], path: str) -> _Touches[E]:
    touches: _Touches[E] = _Touches([])
    for entry in entries:
        marker, target = classify(entry.path)
        if marker is Marker.HIDDEN:
            continue
        landed = _landing(lower, target, whole=marker is Marker.OPAQUE)
        if landed == path:
            if marker is Marker.NONE:
                touches.at_path = entry
            else:
                cause = Cause.WHITEOUT if marker is Marker.WHITEOUT else Cause.MADE_OPAQUE
                touches.reasons.append(Reason(cause, entry.path, landed))
        elif _is_below(path, landed):
            above = _cause_above(marker, entry)
            if above is not None:
                touches.reasons.append(Reason(above, entry.path, landed))
        elif touches.below is None and marker is Marker.NONE and _is_below(landed, path):
            touches.below = entry
    return touches


def _cause_above(marker: Marker, entry: LayerEntry) -> Cause | None:
    """What an entry landing on a directory above the path does to the path, if anything."""
    if marker is Marker.WHITEOUT:
        return Cause.PARENT_WHITEOUT
    if marker is Marker.OPAQUE:
        return Cause.OPAQUE
    return None if entry.is_dir else Cause.PARENT_REPLACED


def _settle(number: int, path: str, before: Node[E] | None, after: Node[E] | None, touches: _Touches[E],
            kind_of: Callable[[E], str]) -> Change[E] | None:  # fmt: skip
    """The change a layer made to the path, from its node below and after the layer; None
    if there is none."""
    if after is before:  # untouched: the merge makes a new node for whatever it changes
        return None
    was, now = _node_kind(before, kind_of), _node_kind(after, kind_of)
    if after is None:
        return Change(number, Action.REMOVED, was, None, None, _only(touches.reasons, *REMOVING))
    made = _made_by(path, after, touches)
    if before is None:
        return Change(number, Action.ADDED, None, now, after.entry, _only(list(made), Cause.IMPLIED))
    removing = _only(touches.reasons, *REMOVING)
    if was != now:
        return Change(number, Action.REPLACED, was, now, after.entry, removing + made)
    emptied = _only(touches.reasons, Cause.MADE_OPAQUE)
    if after.entry is before.entry and emptied:
        return Change(number, Action.EMPTIED, was, now, after.entry, emptied)
    overwritten = tuple(Reason(Cause.OVERWRITTEN, r.marker, r.target) if r.cause is Cause.REPLACED else r for r in made)
    return Change(number, Action.MODIFIED, was, now, after.entry, removing + emptied + overwritten)


def _made_by(path: str, after: Node[E], touches: _Touches[E]) -> tuple[Reason, ...]:
    """The layer's entry that put the path's node there: its own (REPLACED), or, for a
    directory with no entry, the first entry below it (IMPLIED)."""
    if touches.at_path is not None and after.entry is not None:
        return (Reason(Cause.REPLACED, touches.at_path.path, path),)
    if after.entry is None and touches.below is not None:
        return (Reason(Cause.IMPLIED, touches.below.path, path),)
    return ()


def _only(reasons: list[Reason], *causes: Cause) -> tuple[Reason, ...]:
    return tuple(r for r in reasons if r.cause in causes)


def _node_kind(node: Node[E] | None, kind_of: Callable[[E], str]) -> str | None:
    if node is None:
        return None
    if node.is_dir:
        return "directory"
    assert node.entry is not None  # only implied directories have none
    return kind_of(node.entry)


def _link_partners(layers: Iterable[Sequence[E]], path: str) -> frozenset[str]:
    """The paths that hardlinks of any layer tie to `path`, directly or through one another
    (named as the layers name them): where its hardlink group can be."""
    pairs = [(e.path, e.hardlink_to) for layer in layers for e in layer if e.hardlink_to is not None]
    found = {path}
    grew = bool(pairs)
    while grew:
        grew = False
        for link, target in pairs:
            if (link in found) != (target in found):
                found.update((link, target))
                grew = True
    return frozenset(found)


def _holds(root: Node[E], path: str, entry: object) -> bool:
    node = lookup(root, path)
    return node is not None and not node.is_dir and node.entry is entry


def _group_in(root: Node[E], entry: object) -> tuple[str, ...]:
    """Every path of the tree that holds `entry` as a file (its hardlinks), sorted."""
    return tuple(sorted(p for p, node in walk(root) if node.entry is entry and not node.is_dir))


def walk(root: Node[E], top: str = "") -> Iterator[tuple[str, Node[E]]]:
    """Every (path, node) at and below `top`'s node `root`, parents before children."""
    stack = [(top, root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.children:
            prefix = path + "/" if path else ""
            stack.extend((prefix + name, child) for name, child in node.children.items())


# ------------------------------------------------------------ where entries land


def _landing(root: Node[E], path: str, whole: bool = False) -> str:
    """Where a layer's `path` lands in the tree `root` below the layer: the symlinks among
    its parents followed (the last component too with `whole`, as for an opaque marker's
    directory); the path as written if they loop, as the merge then skips the entry."""
    walked = path if whole else parent_and_name(path)[0]
    if not _link_on_the_way(root, walked):
        return path  # nearly always: no symlink to follow, no resolution to pay for
    try:
        resolved = resolve_in_root(walked, lambda p: _link_at(root, p))[0]
    except TooManySymlinks:
        return path
    if whole:
        return resolved
    name = parent_and_name(path)[1]
    return f"{resolved}/{name}" if resolved else name


def _link_on_the_way(root: Node[E], path: str) -> bool:
    node = root
    for name in path.split("/") if path else ():
        child = node.children.get(name) if node.children is not None else None
        if child is None:
            return False
        if child.symlink_to is not None:
            return True
        node = child
    return False


def _link_at(root: Node[E], path: str) -> str | None:
    node = lookup(root, path)
    return node.symlink_to if node is not None else None


def _is_below(path: str, ancestor: str) -> bool:
    """True if `path` is strictly inside directory `ancestor` ('' is the root)."""
    return path.startswith(ancestor + "/") if ancestor else path != ""


def _ancestors(path: str) -> Iterator[str]:
    """The strict ancestors of a clean path, the root ('') excluded."""
    parts = path.split("/")
    for end in range(1, len(parts)):
        yield "/".join(parts[:end])


# ------------------------------------------------------------ per layer


@dataclass(frozen=True, slots=True)
class LayerSummary:
    """What one layer did to the merged tree.

    - `entries`: members of the layer (whiteout and opaque markers included).
    - `added`, `changed`, `removed`: paths of the tree, the root not counted, compared below
      and after the layer: absent below and present after; present in both but holding
      another entry or kind (a directory whose metadata the layer sets again counts);
      present below and absent after, counting every path of a removed subtree.
    - `file_bytes`: bytes of the layer's own regular files (a hardlink stores none).
    - `wasted_bytes`: of those, the bytes the final tree does not show: the file was whited
      out, hidden by an opaque directory or replaced, by a later layer or by a later entry of
      the same layer, or never shown at all (a bookkeeping entry such as `.wh..wh.plnk/*`).
      A file that a hardlink still shows is not wasted.
    """

    layer: int
    entries: int
    added: int
    changed: int
    removed: int
    file_bytes: int
    wasted_bytes: int


@dataclass(frozen=True, slots=True)
class ImageSummary:
    """The layers' summaries, and the image's figures built from them."""

    layers: tuple[LayerSummary, ...]

    @property
    def file_bytes(self) -> int:
        return sum(layer.file_bytes for layer in self.layers)

    @property
    def wasted_bytes(self) -> int:
        return sum(layer.wasted_bytes for layer in self.layers)

    @property
    def user_file_bytes(self) -> int:
        """Bytes of regular files of every layer but the first (the base image's), as dive's user size."""
        return sum(layer.file_bytes for layer in self.layers[1:])

    @property
    def efficiency(self) -> float:
        """The share of the stored file bytes that the final tree shows: 1 - wasted/stored
        (1.0 for an image with no file bytes)."""
        return 1.0 - self.wasted_bytes / self.file_bytes if self.file_bytes else 1.0

    @property
    def user_wasted_fraction(self) -> float:
        """wasted_bytes / user_file_bytes, as dive's "wasted user percent" (0.0 for no user bytes)."""
        return self.wasted_bytes / self.user_file_bytes if self.user_file_bytes else 0.0


def layer_summaries(layers: Sequence[Sequence[E]], stored_bytes: Callable[[E], int]) -> ImageSummary:
    """Returns what each layer did to the tree, and what it stores that the final tree
    hides; `stored_bytes(entry)` is the bytes of file data an entry holds in its layer."""
    counter: _LayerCounter[E] = _LayerCounter()
    final = merge_layers(layers, observe=counter.observe)
    counter.finish(final)
    shown = {id(node.entry) for _, node in walk(final) if node.entry is not None}
    summaries = []
    for number, (layer, (added, changed, removed)) in enumerate(zip(layers, counter.counts, strict=True)):
        sizes = [(entry, stored_bytes(entry)) for entry in layer]
        summaries.append(LayerSummary(number, len(layer), added, changed, removed, sum(size for _, size in sizes),
                                      sum(size for entry, size in sizes if id(entry) not in shown)))  # fmt: skip
    return ImageSummary(tuple(summaries))


Snapshot = dict[str, tuple[object, bool]]  # path -> (entry, is_dir) of the paths a layer touches


class _LayerCounter(Generic[E]):
    """The observer of layer_summaries: before each layer it takes a snapshot of the paths
    the layer can touch; with the tree after, the same paths again, and counts."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int, int]] = []
        self._pending: tuple[set[str], set[str], Snapshot] | None = None

    def observe(self, _number: int, lower: Node[E], entries: list[E]) -> None:
        self.finish(lower)
        subtrees, nodes = _touched(lower, entries)
        self._pending = (subtrees, nodes, _snapshot(lower, subtrees, nodes))

    def finish(self, after_root: Node[E]) -> None:
        if self._pending is None:
            return
        subtrees, nodes, before = self._pending
        self._pending = None
        after = _snapshot(after_root, subtrees, nodes)
        changed = sum(1 for p, (entry, is_dir) in after.items() if p in before
                      and (before[p][0] is not entry or before[p][1] != is_dir))  # fmt: skip
        self.counts.append((len(after.keys() - before.keys()), changed, len(before.keys() - after.keys())))


def _touched(lower: Node[E], entries: list[E]) -> tuple[set[str], set[str]]:
    """The tree paths a layer can change: (subtrees, whole; single nodes). A whiteout or a
    non-directory can take a subtree away, an opaque marker its directory's children; a
    directory entry over a directory keeps the children, so only its node; and the parents
    of every entry can be made (implied) or replaced by directories."""
    subtrees: set[str] = set()
    nodes: set[str] = set()
    for entry in entries:
        marker, target = classify(entry.path)
        if marker is Marker.HIDDEN:
            continue
        landed = _landing(lower, target, whole=marker is Marker.OPAQUE)
        (nodes if marker is Marker.NONE and entry.is_dir else subtrees).add(landed)
        parent = parent_and_name(landed)[0]
        if parent and parent not in nodes:  # else its ancestors are in already, with it
            nodes.update(_ancestors(landed))
    return subtrees, nodes


def _snapshot(root: Node[E], subtrees: set[str], nodes: set[str]) -> Snapshot:
    """(entry, is_dir) of every path below (and at) `subtrees` and at `nodes` in the tree."""
    taken: Snapshot = {}
    for top in _outermost(subtrees):
        node = lookup(root, top)
        if node is not None:
            taken.update((path, (n.entry, n.is_dir)) for path, n in walk(node, top))
    for path in nodes:
        if path not in taken and (node := lookup(root, path)) is not None:
            taken[path] = (node.entry, node.is_dir)
    taken.pop("", None)  # the root is not counted
    return taken


def _outermost(paths: set[str]) -> list[str]:
    """The paths none of whose ancestors is among them: walking their subtrees walks all."""
    if "" in paths:
        return [""]
    covered: dict[str, bool] = {}  # directory -> it or one of its ancestors is in `paths`

    def is_covered(directory: str) -> bool:
        if not directory:
            return False
        found = covered.get(directory)
        if found is None:
            found = covered[directory] = directory in paths or is_covered(parent_and_name(directory)[0])
        return found

    return [p for p in paths if not is_covered(parent_and_name(p)[0])]
