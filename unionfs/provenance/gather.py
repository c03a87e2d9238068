"""What the provenance reports read from an open image: each layer's entries, digest, size and
the history line that made it."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from registry.errors import ImageError
from registry.source import Image
from unionfs.build import MountedImage
from unionfs.entry import Entry

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One layer of the image: its place (0 is the bottom), the digest of its blob (its
    diff_id where the source has no blob digest), the blob's size in bytes, and the config
    history entry that made it (`created_by`: `/bin/sh -c #(nop) COPY ...`, `RUN ...`)."""

    index: int
    digest: str
    size: int
    created_by: str | None = None
    created: str | None = None
    comment: str | None = None


def layer_entries(mounted: MountedImage) -> list[list[Entry]]:
    """Returns the entries of each layer of an open image, bottom first, markers included:
    from the layer index cache for local tars, from the TOC (the cached copy, else fetched
    again) for eStargz layers read lazily."""
    if mounted.layer_entries is None:
        raise ImageError("the layers of this image cannot be read again")
    return mounted.layer_entries()


def layer_infos(mounted: MountedImage, config: dict[str, Any]) -> tuple[LayerInfo, ...]:
    """Returns what the source and the config say of each layer."""
    source: Image | None = mounted.source
    if source is None:
        return ()
    lines = history_lines(config, len(source.layers))
    return tuple(
        LayerInfo(n, str(layer.digest or layer.diff_id or ""), layer.window.size, *lines[n])
        for n, layer in enumerate(source.layers)
    )


def history_lines(config: dict[str, Any], count: int) -> list[tuple[str | None, str | None, str | None]]:
    """(created_by, created, comment) for each of `count` layers: the config's `history`
    entries in order, those marked `empty_layer` (ENV, CMD, ... which make no layer) left
    out; (None, None, None) for a layer the history does not reach."""
    history = config.get("history")
    kept = [h for h in history if isinstance(h, dict) and not h.get("empty_layer")] if isinstance(history, list) else []
    lines = [(_text(h.get("created_by")), _text(h.get("created")), _text(h.get("comment"))) for h in kept[:count]]
    return lines + [(None, None, None)] * (count - len(lines))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def kind_of(entry: Entry) -> str:
    """'file', 'directory', 'symlink', 'char', 'block', 'fifo' or 'socket'."""
    return KINDS.get(stat.S_IFMT(entry.mode), "unknown")


def stored_bytes(entry: Entry) -> int:
    """The file bytes an entry stores in its layer: a regular file's size; a hardlink's 0."""
    return entry.size if entry.is_regular and not entry.hardlink else 0
