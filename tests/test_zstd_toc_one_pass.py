"""The one-pass TOC reader on zstd:chunked TOCs (unionfs.zstdchunked.toc.parse_toc tries it
first): the same entries and chunk rows as the whole-document reader, chunk digests taken
from a one-chunk file's `digest`, each file's last chunk ending at its `endOffset`; a TOC it
leaves, parse_toc reads whole (the same entries, or the same LayerFormatError). The TOCs
are our writer's; tests/test_zstd_chunked.py checks podman's. Pure: no mount, no network."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import zstandard

from registry.errors import LayerFormatError
from tests.test_toc_one_pass import LAYER, _facts
from unionfs.estargz.toc import LayerToc, member_ends, read_one_pass, toc_entries, toc_rows
from unionfs.zstdchunked.toc import (
    KIND,
    TocPosition,
    _frame_ends,
    _with_chunk_digest,
    parse_toc,
)
from unionfs.zstdchunked.writer import write_zstd_chunked


def _written_toc(chunk_size: int = 1024) -> tuple[bytes, TocPosition]:
    out = io.BytesIO()
    written = write_zstd_chunked(io.BytesIO(LAYER), out, chunk_size=chunk_size)
    position = next(value for key, value in written.annotations.items() if key.endswith("manifest-position"))
    offset, length, uncompressed, _ = (int(part) for part in position.split(":"))
    toc_json = zstandard.ZstdDecompressor().decompress(out.getvalue()[offset : offset + length])
    return toc_json, TocPosition(offset, length, uncompressed, "")


def whole_zstd_toc(toc_json: bytes, layer: int, position: TocPosition) -> LayerToc:
    """The whole-document reader's entries (parse_toc's before the one-pass reader)."""
    rows = [_with_chunk_digest(row) for row in toc_rows(toc_json, KIND)]
    return toc_entries(rows, layer, lambda: _frame_ends(rows, position.frame_start), KIND)


def _whole(toc_json: bytes, position: TocPosition) -> LayerToc:
    return whole_zstd_toc(toc_json, 2, position)


def _one_pass(toc_json: bytes, position: TocPosition) -> LayerToc | None:
    return read_one_pass(toc_json, 2, position.frame_start, _with_chunk_digest, end_offsets=True)


def _either(read: Any, *args: Any) -> object:
    try:
        return _facts(read(*args))
    except LayerFormatError as exc:
        return str(exc)


@pytest.mark.parametrize("chunk_size", [1024, 1 << 22])
def test_one_pass_gives_what_the_whole_document_gives(chunk_size: int) -> None:
    toc_json, position = _written_toc(chunk_size)
    one_pass = _one_pass(toc_json, position)
    assert one_pass is not None  # taken, not left to the whole-document reader
    assert _facts(one_pass) == _facts(_whole(toc_json, position))
    big = next(e for e in one_pass.entries if e.path == "big")
    assert len(big.chunks) == (5 if chunk_size == 1024 else 1)
    assert all(chunk.digest.startswith("sha256:") for e in one_pass.entries for chunk in e.chunks)


def test_a_files_last_chunk_ends_at_its_end_offset_not_at_the_next_payload() -> None:
    toc_json, position = _written_toc()
    rows = toc_rows(toc_json, KIND)
    end_offset = next(int(row["endOffset"]) for row in rows if row["name"] == "big")
    next_payload = member_ends(rows, position.frame_start)
    one_pass = _one_pass(toc_json, position)
    assert one_pass is not None
    last = max(next(e for e in one_pass.entries if e.path == "big").chunks, key=lambda chunk: chunk.file_offset)
    assert last.blob_end == end_offset < next_payload[last.blob_offset]  # the next file's headers lie between


def test_one_pass_takes_members_in_any_order_and_other_members() -> None:
    """containers/storage 1.45 and later add a "tarSplitDigest" member."""
    toc_json, position = _written_toc()
    document = json.loads(toc_json)
    reordered = {"tarSplitDigest": "sha256:" + "0" * 64, "entries": document["entries"], "version": 1}
    one_pass = _one_pass(json.dumps(reordered, indent=1).encode(), position)
    assert one_pass is not None and _facts(one_pass) == _facts(_whole(toc_json, position))


def _rows(*rows: dict[str, Any]) -> bytes:
    return json.dumps({"version": 1, "entries": list(rows)}).encode()


POSITION = TocPosition(1008, 10, 10, "")  # the TOC's frame starts at 1000
REG = {"name": "a", "type": "reg", "size": 10, "offset": 100, "endOffset": 190, "chunkSize": 5,
       "chunkDigest": "sha256:" + "1" * 64, "mode": 0o644}  # fmt: skip
CHUNK = {"name": "a", "type": "chunk", "offset": 150, "chunkOffset": 5, "chunkSize": 5,
         "chunkDigest": "sha256:" + "2" * 64}  # fmt: skip
OTHER = {"name": "b", "type": "reg", "size": 3, "offset": 300, "endOffset": 310, "digest": "sha256:" + "3" * 64}
LANDMARK = {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 400, "endOffset": 405,
            "digest": "sha256:" + "4" * 64}  # fmt: skip


@pytest.mark.parametrize(
    "toc",
    [
        _rows({**REG, "name": "./a"}, CHUNK, OTHER),  # names written two ways: endOffset pairs by the written one
        _rows({**REG, "name": "../../a"}, OTHER),  # escapes the root: its frame still ends at its endOffset
        _rows(REG, CHUNK, LANDMARK, {**LANDMARK, "offset": 500}),  # an artifact twice
        _rows(REG, CHUNK, {**OTHER, "name": 7}),  # a name that is not a string
        _rows(REG, CHUNK, OTHER, CHUNK),  # a chunk row after another file
        _rows({**REG, "digest": "sha256:" + "1" * 64, "chunkDigest": ""}, CHUNK, OTHER),  # a chunk without digest
        _rows(REG, CHUNK, {**OTHER, "endOffset": "x"}),  # an endOffset that is no number
    ],
    ids=["dot-slash", "escapes", "artifact-twice", "not-a-string", "chunk-after-another", "no-digest", "end-not-int"],
)
def test_unusual_tocs_are_read_whole(toc: bytes) -> None:
    assert _one_pass(toc, POSITION) is None
    assert _either(parse_toc, toc, 2, POSITION) == _either(_whole, toc, POSITION)


def test_usual_rows_with_a_landmark_are_read_in_one_pass() -> None:
    toc = _rows(REG, CHUNK, OTHER, LANDMARK)
    one_pass = _one_pass(toc, POSITION)
    assert one_pass is not None and _facts(one_pass) == _facts(_whole(toc, POSITION))
    assert [chunk.blob_end for e in one_pass.entries for chunk in e.chunks] == [150, 190, 310]


def test_every_truncation_is_a_layer_format_error() -> None:
    toc_json, position = _written_toc()
    for end in range(len(toc_json)):
        assert _one_pass(toc_json[:end], position) is None
        with pytest.raises(LayerFormatError, match="malformed zstd:chunked TOC"):
            parse_toc(toc_json[:end], 2, position)


@pytest.mark.parametrize("entry", [7, "a", None, ["a"]], ids=["number", "string", "null", "list"])
def test_an_entry_that_is_not_an_object_is_a_layer_format_error(entry: object) -> None:
    toc = _rows(REG, CHUNK, entry, OTHER)  # type: ignore[arg-type]
    with pytest.raises(LayerFormatError, match="malformed zstd:chunked TOC"):
        parse_toc(toc, 2, POSITION)


def test_a_toc_nested_past_the_parsers_depth_is_a_layer_format_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    toc = b'{"version": 1, "entries": [{"name": "a", "type": "dir", "x": ' + deep + b"}]}"
    with pytest.raises(LayerFormatError, match="malformed zstd:chunked TOC: RecursionError"):
        parse_toc(toc, 2, POSITION)
