"""eStargz reading and writing, pure: footers, TOCs, chunks. No mount, no network."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib

import pytest

from registry.errors import LayerFormatError
from tests.tarvocab import d, dev, f, fifo, hl, sym, tar_of
from unionfs.entry import Entry
from unionfs.estargz.toc import (
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    chunk_data,
    chunks_for,
    parse_footer,
    parse_toc,
    plan_fetches,
    read_toc_member,
)
from unionfs.estargz.writer import footer, write_estargz
from unionfs.storage.tar_index import index_tar

BIG = os.urandom(50_000)
LAYER = tar_of(
    d("etc/"), f("etc/hosts", b"127.0.0.1\n", mode=0o600, uid=7, gid=8), f("big", BIG), hl("big-link", "big"),
    sym("lnk", "big"), f("empty"), f("x", b"xa", xattrs={"user.a": "b", "trusted.t": "\x00\x01"}),
    dev("dev/null", "c", 1, 3), fifo("run/fifo"), d("sub/dir/"),
)  # fmt: skip


def _estargz(tar: bytes = LAYER, **options: object) -> tuple[bytes, str]:
    out = io.BytesIO()
    written = write_estargz(io.BytesIO(tar), out, **options)  # type: ignore[arg-type]
    return out.getvalue(), written.toc_digest


def _toc_entries(blob: bytes) -> list[Entry]:
    found = parse_footer(blob[-FOOTER_SIZE:])
    assert found is not None
    return parse_toc(read_toc_member(blob[found.toc_offset : -found.size]), 0, found.toc_offset).entries


def _read(blob: bytes, entry: Entry, offset: int, size: int) -> bytes:
    fetches = plan_fetches(chunks_for(entry, offset, size))
    pieces = {c.file_offset: chunk_data(blob[x.start : x.end], x.start, c) for x in fetches for c in x.chunks}
    data = b"".join(pieces[k] for k in sorted(pieces))
    first = min(pieces, default=0)
    return data[offset - first : offset - first + size]


def _metadata(entry: Entry) -> tuple[object, ...]:
    return (entry.path, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime_ns, entry.link, entry.hardlink,
            entry.rdev, entry.xattrs)  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1024, 4096, 1 << 22])
def test_toc_gives_what_the_tar_gives(chunk_size: int) -> None:
    blob, _ = _estargz(chunk_size=chunk_size)
    from_toc = _toc_entries(blob)
    plain = gzip.decompress(blob)
    from_tar = index_tar(io.BytesIO(plain), len(plain), 0, print)
    assert [_metadata(e) for e in from_toc] == [_metadata(e) for e in from_tar]
    big = next(e for e in from_toc if e.path == "big")
    assert len(big.chunks) == -(-len(BIG) // min(chunk_size, len(BIG)))
    for offset, size in ((0, 10), (1000, 5000), (len(BIG) - 7, 100), (0, len(BIG))):
        assert _read(blob, big, offset, size) == BIG[offset : offset + size]


def test_the_blob_is_ordinary_tar_gzip_with_artifacts_hidden_from_the_tar_path() -> None:
    blob, toc_digest = _estargz(prioritized=["x"])
    plain = gzip.decompress(blob)
    with tarfile.open(fileobj=io.BytesIO(plain)) as archive:
        names = archive.getnames()
    assert names[:2] == ["x", ".prefetch.landmark"] and names[-1] == "stargz.index.json"
    assert ".prefetch.landmark" not in [e.path for e in index_tar(io.BytesIO(plain), len(plain), 0, print)]
    found = parse_footer(blob[-FOOTER_SIZE:])
    assert found is not None
    toc = read_toc_member(blob[found.toc_offset : -found.size])
    assert f"sha256:{hashlib.sha256(toc).hexdigest()}" == toc_digest
    layer_toc = parse_toc(toc, 0, found.toc_offset)
    assert layer_toc.prefetch_end is not None and 0 < layer_toc.prefetch_end < found.toc_offset
    assert ".prefetch.landmark" not in [e.path for e in layer_toc.entries]


def test_a_file_named_like_the_toc_in_a_plain_tar_is_kept() -> None:
    plain = tar_of(f("stargz.index.json", b"{}"), f("a"))
    assert [e.path for e in index_tar(io.BytesIO(plain), len(plain), 0, print)] == ["stargz.index.json", "a"]


def test_footers() -> None:
    assert parse_footer(footer(12345)) is not None and len(footer(12345)) == FOOTER_SIZE
    assert parse_footer(footer(12345)).toc_offset == 12345  # type: ignore[union-attr]
    # Legacy stargz: the Extra field is the 22 bytes themselves, no RFC 1952 subfield header.
    extra = b"%016xSTARGZ" % 777
    legacy = (
        b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + len(extra).to_bytes(2, "little") + extra + b"\x01\0\0\xff\xff" + b"\0" * 8
    )
    assert len(legacy) == LEGACY_FOOTER_SIZE
    assert parse_footer(b"padding" + legacy) == parse_footer(legacy) and parse_footer(legacy).toc_offset == 777  # type: ignore[union-attr]
    assert parse_footer(gzip.compress(b"plain gzip layer")[-FOOTER_SIZE:]) is None
    assert parse_footer(b"short") is None


def test_upstream_toc_shapes_and_inner_offsets() -> None:
    """What upstream writes beyond the spec's example: chunkSize absent on the last chunk,
    uid/gid absent when 0, no offset on empty files, hardlinks without size or digest,
    directory names ending in '/', and several chunks in one gzip member (innerOffset)."""
    data = os.urandom(3000)
    member = gzip.compress(data)
    digests = [f"sha256:{hashlib.sha256(data[i : i + 1000]).hexdigest()}" for i in (0, 1000, 2000)]
    toc_offset = 10 + len(member)
    rows = [
        {"name": "dir/", "type": "dir", "mode": 0o40755},
        {"name": "dir/f", "type": "reg", "mode": 0o644, "size": 3000, "offset": 10, "chunkSize": 1000,
         "chunkDigest": digests[0]},
        {"name": "dir/f", "type": "chunk", "offset": 10, "innerOffset": 1000, "chunkOffset": 1000,
         "chunkSize": 1000, "chunkDigest": digests[1]},
        {"name": "dir/f", "type": "chunk", "offset": 10, "innerOffset": 2000, "chunkOffset": 2000,
         "chunkDigest": digests[2]},
        {"name": "dir/empty", "type": "reg", "mode": 0o644},
        {"name": "dir/h", "type": "hardlink", "linkName": "dir/f", "mode": 0o644},
        {"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": 5, "mode": 0o644},
    ]  # fmt: skip
    entries = parse_toc(json.dumps({"version": 1, "entries": rows}).encode(), 3, toc_offset).entries
    assert [e.path for e in entries] == ["dir", "dir/f", "dir/empty", "dir/h"]
    regular = entries[1]
    assert (regular.uid, regular.gid, regular.layer, [c.size for c in regular.chunks]) == (0, 0, 3, [1000] * 3)
    blob = b"\0" * 10 + member
    assert _read(blob, regular, 0, 3000) == data and _read(blob, regular, 1500, 1000) == data[1500:2500]
    assert entries[3].hardlink and entries[3].link == "dir/f" and entries[2].chunks == ()


@pytest.mark.parametrize(
    "toc",
    [
        b"not json",
        json.dumps({"version": 2, "entries": []}).encode(),
        json.dumps({"version": 1, "entries": [{"name": "a", "type": "weird", "mode": 0}]}).encode(),
        json.dumps(
            {
                "version": 1,
                "entries": [
                    {"name": "a", "type": "reg", "size": 10, "offset": 1, "chunkSize": 5},
                    {"name": "a", "type": "chunk", "offset": 5, "chunkOffset": 20, "chunkSize": 5},
                ],
            }
        ).encode(),
        json.dumps({"version": 1, "entries": [{"name": "a", "type": "dir", "modtime": "yesterday"}]}).encode(),
        json.dumps({"version": 1, "entries": [{"name": "a", "type": "reg", "size": 2**70, "offset": 1}]}).encode(),
        json.dumps({"version": 1, "entries": [{"name": "a", "type": "reg", "size": -5, "offset": 1}]}).encode(),
    ],
    ids=["not-json", "version-2", "unknown-type", "chunks-do-not-tile", "bad-modtime", "size-past-64-bits",
         "negative-size"],
)
def test_malformed_tocs_are_refused(toc: bytes) -> None:
    with pytest.raises(LayerFormatError):
        parse_toc(toc, 0, 1000)


def test_corrupt_chunk_bytes_are_an_error_not_data() -> None:
    blob, _ = _estargz(chunk_size=1024)
    big = next(e for e in _toc_entries(blob) if e.path == "big")
    chunk = big.chunks[1]
    broken = bytearray(blob)
    broken[chunk.blob_offset + 20] ^= 0xFF
    with pytest.raises((LayerFormatError, zlib.error)):
        chunk_data(bytes(broken[chunk.blob_offset : chunk.blob_end]), chunk.blob_offset, chunk)


def test_fetch_planning_merges_adjacent_members() -> None:
    blob, _ = _estargz(chunk_size=1024)
    big = next(e for e in _toc_entries(blob) if e.path == "big")
    fetches = plan_fetches(chunks_for(big, 1000, 3000))
    assert len(fetches) == 1 and [c.file_offset for c in fetches[0].chunks] == [0, 1024, 2048, 3072]
    assert fetches[0].start == big.chunks[0].blob_offset and fetches[0].end == big.chunks[3].blob_end


def test_entries_share_repeated_values_on_both_paths() -> None:
    """Memory per merged entry (issue 5): entries of a layer share one empty xattrs mapping
    and one object per repeated mode, owner and mtime, whichever index built them."""
    plain = tar_of(*(f(f"f{i}", b"", mode=0o644, uid=1000, gid=1000) for i in range(3)))
    blob, _ = _estargz(plain)
    for entries in (index_tar(io.BytesIO(plain), len(plain), 0, print), _toc_entries(blob)):
        first, second = entries[0], entries[1]
        assert first.xattrs is second.xattrs and not first.xattrs
        assert first.mode is second.mode and first.uid is second.uid
