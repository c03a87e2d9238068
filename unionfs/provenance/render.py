"""Text and JSON for the provenance reports: text for people, JSON (the reports' fields, enums
as their values) for scripts."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from unionfs.provenance.gather import LayerInfo
from unionfs.provenance.report import EntryInfo, Event, Explanation, LayersReport
from whiteout.history import Action, Cause, Reason

COMMAND_WIDTH = 100  # a history line longer than this is cut in tables


def to_json(report: Explanation | LayersReport) -> str:
    """The report as JSON: its fields, and the figures its properties derive."""
    document = plain(report)
    if isinstance(report, Explanation):
        document.update(exists=report.exists, ever_existed=report.ever_existed)
    return json.dumps(document, indent=2)


def plain(value: Any) -> Any:
    """Dataclasses as dicts, enums as their values, tuples as lists: what json.dumps takes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [plain(item) for item in value]
    return value


# ------------------------------------------------------------ explain


def explanation_text(report: Explanation) -> str:
    """What `crfs-merge explain` prints: the verdict, then the layers that changed the path."""
    lines = [_verdict(report)]
    if report.exists:
        lines.append(f"  entry: {_entry(report.entry)}")
    if report.made_by is not None and report.made_by.created_by is not None:
        lines.append(f"  made by: {_command(report.made_by)}")
    if report.hardlinks:
        lines.append(f"  hardlinks: {', '.join(report.hardlinks)}")
    if report.events:
        lines.append("history:")
        lines.extend(line for event in report.events for line in _event_lines(event))
    if report.hardlink_history:
        lines.append("hardlink group:")
        lines.extend(f"  after layer {g.layer}: {', '.join(g.paths) or '(no longer a file)'}"
                     for g in report.hardlink_history)  # fmt: skip
    return "\n".join(lines)


def _entry(entry: EntryInfo | None) -> str:
    if entry is None:
        return "none of its own (a directory implied by the entries below it)"
    link = f" -> {entry.symlink_to}" if entry.symlink_to is not None else ""
    owner = f"{entry.uid}:{entry.gid}"
    return f"{entry.permissions} {owner} {entry.size} bytes{link}, {entry.path!r} of layer {entry.layer}"


def _verdict(report: Explanation) -> str:
    shown = report.path if report.path == report.asked.strip("/") else f"{report.path} (asked: {report.asked})"
    if report.exists:
        assert report.made_by is not None
        return f"{shown}: {_article(report.kind)} from layer {report.made_by.index} ({_short(report.made_by.digest)})"
    removed = report.removed_by
    if removed is None:
        return f"{shown}: no layer ever had this path"
    return f"{shown}: not in the merged tree; {_reasons(removed)} in layer {removed.layer.index}"


def _event_lines(event: Event) -> list[str]:
    layer = event.layer
    head = f"  layer {layer.index} ({_short(layer.digest)}): {_action(event)}"
    if event.reasons:
        head += f", {_reasons(event)}"
    return [head, f"      {_command(layer)}"] if layer.created_by is not None else [head]


def _action(event: Event) -> str:
    if event.action is Action.ADDED:
        return f"added {_what(event.after, event)}"
    if event.action is Action.REMOVED:
        return f"removed {event.before}"
    if event.action is Action.REPLACED:
        return f"replaced {event.before} by {_what(event.after, event)}"
    if event.action is Action.EMPTIED:
        return "emptied directory"
    return f"modified {event.after}"


def _what(kind: str | None, event: Event) -> str:
    if kind == "directory" and event.entry is None:
        return "directory (implied)"
    return str(kind)


def _reasons(event: Event) -> str:
    return "; ".join(_reason(reason) for reason in event.reasons) or "removed with no marker of its own"


REASONS = {
    Cause.WHITEOUT: "by whiteout {marker!r}",
    Cause.PARENT_WHITEOUT: "by whiteout {marker!r} of parent directory {target!r}",
    Cause.OPAQUE: "by opaque marker {marker!r} of directory {target!r}",
    Cause.PARENT_REPLACED: "parent directory {target!r} replaced by a non-directory, entry {marker!r}",
    Cause.REPLACED: "entry {marker!r}",
    Cause.OVERWRITTEN: "entry {marker!r}",
    Cause.MADE_OPAQUE: "opaque marker {marker!r} hides its lower children",
    Cause.IMPLIED: "made for entry {marker!r}",
}


def _reason(reason: Reason) -> str:
    return REASONS[reason.cause].format(marker=reason.marker, target=reason.target)


def _article(kind: str | None) -> str:
    return f"an {kind}" if kind and kind[0] in "aeiou" else f"a {kind}"


def _short(digest: str) -> str:
    algorithm, _, hex_digits = digest.partition(":")
    return f"{algorithm}:{hex_digits[:12]}" if hex_digits else digest or "no digest"


def _command(layer: LayerInfo, width: int | None = None) -> str:
    text = " ".join((layer.created_by or "(no history line)").split())
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------ layers


def layers_text(report: LayersReport) -> str:
    """What `crfs-merge layers` prints: a table of the layers and the image's figures."""
    header = f"{'#':>3}  {'digest':<19}  {'size':>9}  {'entries':>7}  {'added':>6}  {'changed':>7}  " \
             f"{'removed':>7}  {'files':>9}  {'wasted':>9}  command"  # fmt: skip
    rows = [f"{r.layer.index:>3}  {_short(r.layer.digest):<19}  {_size(r.layer.size):>9}  {r.entries:>7}  "
            f"{r.added:>6}  {r.changed:>7}  {r.removed:>7}  {_size(r.file_bytes):>9}  {_size(r.wasted_bytes):>9}  "
            f"{_command(r.layer, COMMAND_WIDTH)}" for r in report.layers]  # fmt: skip
    totals = [
        f"image {report.image} ({report.id})",
        f"efficiency: {report.efficiency:.2%} ({_size(report.file_bytes - report.wasted_bytes)} of "
        f"{_size(report.file_bytes)} of file bytes shown)",
        f"wasted: {_size(report.wasted_bytes)} ({report.wasted_bytes} bytes), "
        f"{report.user_wasted_fraction:.2%} of the {_size(report.user_file_bytes)} above the first layer",
    ]
    return "\n".join([header, *rows, *totals])


def _size(count: int) -> str:
    """Bytes in decimal units, as dive and docker show them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
