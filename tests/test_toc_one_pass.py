"""The one-pass TOC reader (unionfs.estargz.toc._one_pass, what parse_toc tries first) against
the whole-document one: the same entries and chunk rows for every TOC it takes, and for every
TOC it leaves, parse_toc gives what the whole-document reader gives (entries, or
LayerFormatError). Pure: no mount, no network."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest

from registry.errors import LayerFormatError
from tests.tarvocab import d, dev, f, fifo, hl, sym, tar_of
from unionfs.estargz.toc import (
    FOOTER_SIZE,
    LayerToc,
    _NotOnePass,
    _one_pass,
    member_ends,
    parse_footer,
    parse_toc,
    read_toc_member,
    toc_entries,
    toc_rows,
)
from unionfs.estargz.writer import write_estargz

LAYER = tar_of(
    d("etc/"), f("etc/hosts", b"127.0.0.1\n", mode=0o600, uid=7, gid=8), f("big", os.urandom(5000)),
    hl("big-link", "big"), sym("lnk", "big"), f("empty"), f("x", b"xa", xattrs={"user.a": "b"}),
    dev("dev/null", "c", 1, 3), fifo("run/fifo"), d("sub/dir/"), f("sub/dir/ü", b"u" * 3000),
)  # fmt: skip


def _written_toc(chunk_size: int = 1024) -> tuple[bytes, int]:
    out = io.BytesIO()
    write_estargz(io.BytesIO(LAYER), out, chunk_size=chunk_size, prioritized=["x"])
    blob = out.getvalue()
    footer = parse_footer(blob[-FOOTER_SIZE:])
    assert footer is not None
    return read_toc_member(blob[footer.toc_offset : -footer.size]), footer.toc_offset


def _whole(toc_json: bytes, toc_offset: int) -> LayerToc:
    rows = toc_rows(toc_json, "eStargz")
    return toc_entries(rows, 2, lambda: member_ends(rows, toc_offset), "eStargz")


def _facts(toc: LayerToc) -> tuple[object, ...]:
    return toc.prefetch_end, [(e.path, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.link, e.hardlink, e.rdev,
                               dict(e.xattrs), e.layer, e.offset, tuple(e.chunks)) for e in toc.entries]  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1024, 1 << 22])
def test_one_pass_gives_what_the_whole_document_gives(chunk_size: int) -> None:
    toc_json, toc_offset = _written_toc(chunk_size)
    one_pass = _one_pass(toc_json, 2, toc_offset)  # takes it: no _NotOnePass
    assert _facts(one_pass) == _facts(_whole(toc_json, toc_offset))
    assert len(next(e for e in one_pass.entries if e.path == "big").chunks) == (5 if chunk_size == 1024 else 1)
    assert one_pass.prefetch_end is not None


def test_one_pass_takes_blanks_members_in_any_order_and_other_members() -> None:
    toc_json, toc_offset = _written_toc()
    document = json.loads(toc_json)
    reordered = json.dumps({"entries": document["entries"], "other": [1, {"a": 2}], "version": 1}, indent=2)
    assert _facts(_one_pass(reordered.encode(), 2, toc_offset)) == _facts(_whole(toc_json, toc_offset))


def _rows(*rows: dict[str, Any]) -> bytes:
    return json.dumps({"version": 1, "entries": list(rows)}).encode()


REG = {"name": "a", "type": "reg", "size": 10, "offset": 100, "chunkSize": 5, "mode": 0o644}
CHUNK = {"name": "a", "type": "chunk", "offset": 200, "chunkOffset": 5, "chunkSize": 5}
OTHER = {"name": "b", "type": "reg", "size": 3, "offset": 300, "mode": 0o644}


@pytest.mark.parametrize(
    "toc",
    [
        _rows(CHUNK, REG, OTHER),  # a chunk row before its file: the file's own row replaces it
        _rows(REG, OTHER, CHUNK),  # a chunk row after another file
        _rows(REG, CHUNK, OTHER, {**OTHER, "offset": 400}),  # a name twice: the later row's chunks
        _rows({"name": "a", "type": "dir", "mode": 0o755}, REG, CHUNK),  # a name twice, a directory first
        _rows(REG, CHUNK, {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 350}, CHUNK),
    ],
    ids=["chunk-first", "chunk-after-another", "name-twice", "dir-then-file", "chunk-after-landmark"],
)
def test_unusual_orders_are_read_whole(toc: bytes) -> None:
    with pytest.raises((_NotOnePass, LayerFormatError)):  # a file cut short of its chunks does not tile
        _one_pass(toc, 2, 1000)
    try:
        expected: object = _facts(_whole(toc, 1000))
    except LayerFormatError as exc:
        expected = str(exc)
    try:
        got: object = _facts(parse_toc(toc, 2, 1000))
    except LayerFormatError as exc:
        got = str(exc)
    assert got == expected


def test_every_truncation_is_a_layer_format_error() -> None:
    """A TOC cut anywhere (in a row, between rows, in the envelope) is refused as the whole-
    document reader refuses it."""
    toc_json, toc_offset = _written_toc()
    for end in range(len(toc_json)):
        with pytest.raises(LayerFormatError, match="malformed eStargz TOC"):
            parse_toc(toc_json[:end], 2, toc_offset)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"},{", b"};{"), (b'"entries":[', b'"entries":{'), (b'{"version":1', b'{"version":2'), (b"]}", b"],}")],
    ids=["bad-separator", "entries-not-a-list", "version-2", "trailing-comma"],
)
def test_damaged_tocs_are_refused_with_the_whole_document_message(old: bytes, new: bytes) -> None:
    toc_json, toc_offset = _written_toc()
    assert old in toc_json
    damaged = toc_json.replace(old, new, 1)
    with pytest.raises(LayerFormatError) as whole:
        _whole(damaged, toc_offset)
    with pytest.raises(LayerFormatError) as got:
        parse_toc(damaged, 2, toc_offset)
    assert str(got.value) == str(whole.value)


def test_a_toc_nested_past_the_parsers_depth_is_a_layer_format_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    toc = b'{"version": 1, "entries": [{"name": "a", "type": "dir", "x": ' + deep + b"}]}"
    with pytest.raises(LayerFormatError, match="malformed eStargz TOC: RecursionError"):
        parse_toc(toc, 0, 100)
