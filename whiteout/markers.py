"""Recognise the OCI whiteout names of image-spec layer.md ("Whiteouts")."""

from __future__ import annotations

import enum

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# AUFS keeps its own bookkeeping under this prefix (.wh..wh.plnk, .wh..wh.aufs, .wh..wh.orph).
# layer.md says such entries are not whiteouts; containerd and docker never extract them.
AUFS_META_PREFIX = ".wh..wh."


class Marker(enum.Enum):
    """What a layer entry means for the merge."""

    NONE = "none"  # an ordinary entry
    WHITEOUT = "whiteout"  # hides `target` of lower layers
    OPAQUE = "opaque"  # hides the lower children of directory `target`
    HIDDEN = "hidden"  # format bookkeeping: never shown, no effect


def classify(path: str) -> tuple[Marker, str]:
    """Returns the marker kind of a clean path and the path it acts on.

    A `.wh.`-prefixed component anywhere but last (e.g. `.wh.dir/file`, or the AUFS
    `.wh..wh.plnk/...` tree) marks the entry as bookkeeping: showing it would leak a
    whiteout name into the mount, which layer.md forbids.
    """
    if WHITEOUT_PREFIX not in path:  # nearly every path: each marker below has the prefix in it
        return Marker.NONE, path
    parent, _, name = path.rpartition("/")
    if any(part.startswith(WHITEOUT_PREFIX) for part in parent.split("/")):
        return Marker.HIDDEN, path
    if name == OPAQUE_MARKER:
        return Marker.OPAQUE, parent
    if name.startswith(AUFS_META_PREFIX):
        return Marker.HIDDEN, path
    if name.startswith(WHITEOUT_PREFIX):
        target = name[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            return Marker.HIDDEN, path
        return Marker.WHITEOUT, f"{parent}/{target}" if parent else target
    return Marker.NONE, path
