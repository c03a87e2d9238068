"""The typed reports of `ImageView.explain(path)` and `ImageView.layers()`, built from
whiteout.history's answers and the image's layer facts (unionfs.provenance.gather)."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unionfs.entry import Entry
from unionfs.provenance.gather import LayerInfo, kind_of, layer_entries, layer_infos, stored_bytes
from whiteout.history import Action, Change, Reason, layer_summaries, path_history
from whiteout.paths import clean_path

if TYPE_CHECKING:
    from unionfs.api.image import ImageView


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One entry of one layer: `path` as that layer names it (for a hardlink, the file it
    links to: the entry whose bytes and metadata the path shows)."""

    layer: int
    path: str
    kind: str
    permissions: str  # as ls -l shows them, e.g. -rw-r--r--
    uid: int
    gid: int
    size: int
    symlink_to: str | None = None


def entry_info(entry: Entry) -> EntryInfo:
    return EntryInfo(entry.layer, entry.path, kind_of(entry), stat.filemode(entry.mode), entry.uid, entry.gid,
                     entry.size, entry.symlink_to)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Event:
    """What one layer did to the explained path (see whiteout.history.Action and Cause):
    the kinds below and after it (None: absent), the entry after (None: absent, or a
    directory implied by entries below it), and the layer's entries that caused it."""

    layer: LayerInfo
    action: Action
    before: str | None
    after: str | None
    entry: EntryInfo | None
    reasons: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class HardlinkGroup:
    """The paths holding the explained path's file after layer `layer`."""

    layer: int
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why `path` of the merged tree is what it is, or is not there.

    `path` is the clean path explained: the asked one with its parents' symlinks followed in
    the merged tree where they exist. `entry` is the visible entry (its `layer` holds its
    bytes and metadata); `made_by` the layer whose change left the path as it is (for a
    hardlink, the layer of the link, which may be above the file's). `events` lists every
    layer that changed the path, bottom first. `hardlinks` are the paths sharing its file in
    the final tree (empty for one), `hardlink_history` how that group was made and split."""

    image: str
    asked: str
    path: str
    kind: str | None
    entry: EntryInfo | None
    made_by: LayerInfo | None
    events: tuple[Event, ...]
    hardlinks: tuple[str, ...]
    hardlink_history: tuple[HardlinkGroup, ...]

    @property
    def exists(self) -> bool:
        return self.kind is not None

    @property
    def ever_existed(self) -> bool:
        """True if the tree of any layer had the path."""
        return bool(self.events)

    @property
    def removed_by(self) -> Event | None:
        """For a path no longer there: the event that removed it."""
        return None if self.exists or not self.events else self.events[-1]


def explain(view: ImageView, path: str) -> Explanation:
    """Returns the Explanation of `path` (relative or absolute) in the image `view` shows."""
    infos = layer_infos(view.mounted, view.config)
    entries = layer_entries(view.mounted)
    clean = _tree_path(view, path)
    history = path_history(entries, clean, kind_of)
    made_by = history.made_by
    return Explanation(
        image=view.reference,
        asked=path,
        path=clean,
        kind=history.kind,
        entry=entry_info(history.entry) if history.entry is not None else None,
        made_by=infos[made_by] if made_by is not None else None,
        events=tuple(_event(change, infos) for change in history.changes),
        hardlinks=history.hardlinks,
        hardlink_history=tuple(HardlinkGroup(g.layer, g.paths) for g in history.groups),
    )


def _event(change: Change[Entry], infos: tuple[LayerInfo, ...]) -> Event:
    entry = entry_info(change.entry) if change.entry is not None else None
    return Event(infos[change.layer], change.action, change.before, change.after, entry, change.reasons)


def _tree_path(view: ImageView, asked: str) -> str:
    """The clean path of `asked` in the merged tree: its parents' symlinks followed (the
    last component never), as far as they exist; lexically cleaned where they do not."""
    lexical = clean_path(asked.strip("/")) or ""
    try:
        return view.resolve(asked, follow_symlinks=False)
    except OSError:
        pass
    parent, _, name = lexical.rpartition("/")
    try:
        resolved_parent = view.resolve(parent, follow_symlinks=True) if parent else ""
    except OSError:
        return lexical
    return f"{resolved_parent}/{name}" if resolved_parent else name


# ------------------------------------------------------------ layers


@dataclass(frozen=True, slots=True)
class LayerReport:
    """One layer: its facts (LayerInfo) and what it did (whiteout.history.LayerSummary has
    the exact meaning of each count and byte figure)."""

    layer: LayerInfo
    entries: int
    added: int
    changed: int
    removed: int
    file_bytes: int
    wasted_bytes: int


@dataclass(frozen=True, slots=True)
class LayersReport:
    """Every layer of an image, bottom first, and the image's figures.

    `efficiency` is 1 - wasted_bytes / file_bytes: the share of the file bytes stored in
    the layers that the merged tree shows. `user_wasted_fraction` is wasted_bytes over the
    file bytes of every layer but the first (the base image's), as dive's "user wasted
    percent" (0.0 when those layers store no file bytes)."""

    image: str
    id: str
    layers: tuple[LayerReport, ...]
    file_bytes: int
    wasted_bytes: int
    user_file_bytes: int
    efficiency: float
    user_wasted_fraction: float


def layers(view: ImageView) -> LayersReport:
    """Returns the LayersReport of the image `view` shows."""
    infos = layer_infos(view.mounted, view.config)
    summary = layer_summaries(layer_entries(view.mounted), stored_bytes)
    reports = tuple(LayerReport(info, s.entries, s.added, s.changed, s.removed, s.file_bytes, s.wasted_bytes)
                    for info, s in zip(infos, summary.layers, strict=True))  # fmt: skip
    return LayersReport(view.reference, view.id, reports, summary.file_bytes, summary.wasted_bytes,
                        summary.user_file_bytes, summary.efficiency, summary.user_wasted_fraction)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Thresholds:
    """`crfs-merge layers --ci` limits, as dive's CI rules; None switches a rule off."""

    lowest_efficiency: float | None = 0.9
    highest_wasted_bytes: int | None = None
    highest_user_wasted_fraction: float | None = 0.1


def crossed(report: LayersReport, limits: Thresholds) -> list[str]:
    """The thresholds the image crosses, each as a sentence; empty if it passes."""
    found = []
    if limits.lowest_efficiency is not None and report.efficiency < limits.lowest_efficiency:
        found.append(f"efficiency {report.efficiency:.4f} is below the lowest allowed, {limits.lowest_efficiency}")
    if limits.highest_wasted_bytes is not None and report.wasted_bytes > limits.highest_wasted_bytes:
        found.append(f"wasted bytes {report.wasted_bytes} are above the highest allowed, {limits.highest_wasted_bytes}")
    fraction = limits.highest_user_wasted_fraction
    if fraction is not None and report.user_wasted_fraction > fraction:
        found.append(f"user wasted {report.user_wasted_fraction:.2%} is above the highest allowed, {fraction:.2%}")
    return found
