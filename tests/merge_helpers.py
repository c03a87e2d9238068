"""Merge in-memory tar layers with the real indexer and engine, and describe the result."""

from __future__ import annotations

import io
import stat
from dataclasses import fields

from tests.tarvocab import Member, tar_of
from unionfs.entry import Entry
from unionfs.storage.tar_index import index_tar
from unionfs.tree import MergedTree, freeze
from whiteout.apply import merge_layers


def merge_tars(*layers: list[Member], warnings: list[str] | None = None) -> tuple[MergedTree, list[bytes]]:
    """Returns the frozen merged tree of `layers` (bottom first) and the layers' tar bytes.

    The tree returned has been through the cache's bytes (to_bytes, from_bytes), after a check
    that it reads back the same as the tree freeze made: every merge test covers both."""
    sink = warnings if warnings is not None else []
    tars = [tar_of(*members) for members in layers]
    indexed = [index_tar(io.BytesIO(t), len(t), n, sink.append) for n, t in enumerate(tars)]
    fresh = freeze(merge_layers(indexed, sink.append))
    saved = MergedTree.from_bytes(fresh.to_bytes())
    assert _comparable(saved) == _comparable(fresh)
    return saved, tars


def _comparable(tree: MergedTree) -> list[tuple[object, ...]]:
    # Entry compares by identity: compare its fields, xattrs as a plain dict.
    return [(p, i.ino, i.nlink, *(getattr(i.entry, f.name) for f in fields(Entry) if f.name != "xattrs"),
             dict(i.entry.xattrs)) for p, i in tree.items()]  # fmt: skip


def describe(entry: Entry, tars: list[bytes]) -> str:
    """Returns 'dir', 'file:<content>', 'link-><target>' or the octal file type."""
    if stat.S_ISDIR(entry.mode):
        return "dir"
    if stat.S_ISLNK(entry.mode):
        return f"link->{entry.link}"
    if stat.S_ISREG(entry.mode):
        data = tars[entry.layer][entry.offset : entry.offset + entry.size]
        return f"file:{data.decode()}"
    return oct(stat.S_IFMT(entry.mode))


def visible(*layers: list[Member]) -> dict[str, str]:
    """Returns {path: description} of every path below the root of the merged layers."""
    tree, tars = merge_tars(*layers)
    return {p: describe(i.entry, tars) for p, i in tree.items() if p}
