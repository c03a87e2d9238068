"""Pure OCI whiteout and opaque-directory logic: entry lists in, merged tree out, no I/O."""

from __future__ import annotations

from whiteout.apply import Node, merge_layers
from whiteout.markers import Marker, classify
from whiteout.paths import clean_path

__all__ = ["Marker", "Node", "classify", "clean_path", "merge_layers"]
