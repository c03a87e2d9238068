"""The kernel records that unionfs/fuse/lowlevel.py packs, read back with an independent parser
written from include/uapi/linux/fuse.h (fuse_entry_out, fuse_attr_out, fuse_dirent[plus])."""

from __future__ import annotations

import stat
import struct

from unionfs.entry import Attributes
from unionfs.fuse.lowlevel import Listed, attr_record, entry_record, listing_buffer, spliceable_pages

ATTR_FIELDS = "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags"
FILE = Attributes(ino=7, mode=stat.S_IFREG | 0o640, nlink=2, uid=1000, gid=50, size=1025, rdev=0,
                  mtime_ns=1_600_000_000_123_456_789)  # fmt: skip


def parse_attr(data: bytes) -> dict[str, int]:
    return dict(zip(ATTR_FIELDS.split(), struct.unpack("<6Q10I", data), strict=True))


def parse_entry(data: bytes) -> dict[str, object]:
    nodeid, _, entry_valid, attr_valid, entry_nsec, attr_nsec = struct.unpack("<4Q2I", data[:40])
    assert entry_nsec == attr_nsec == 0
    return {"nodeid": nodeid, "entry_valid": entry_valid, "attr_valid": attr_valid, "attr": parse_attr(data[40:128])}


def parse_listing(data: bytes, plus: bool) -> list[dict[str, object]]:
    """Walks a READDIR(PLUS) buffer the way the kernel does (fuse_parse_dirfile/dirplusfile)."""
    records = []
    at = 0
    while at < len(data):
        entry = parse_entry(data[at : at + 128]) if plus else None
        at += 128 if plus else 0
        ino, offset, namelen, kind = struct.unpack("<QQII", data[at : at + 24])
        name = data[at + 24 : at + 24 + namelen]
        padded = 24 + namelen + (-(24 + namelen) % 8)
        assert data[at + 24 + namelen : at + padded] == b"\0" * (padded - 24 - namelen)
        records.append({"ino": ino, "off": offset, "type": kind, "name": name, "entry": entry})
        at += padded
    return records


def test_an_entry_record_carries_every_attribute_and_both_timeouts() -> None:
    record = entry_record(FILE, 86400)
    assert len(record) == 128  # sizeof(struct fuse_entry_out)
    parsed = parse_entry(record)
    assert parsed["nodeid"] == 7 and parsed["entry_valid"] == 86400 and parsed["attr_valid"] == 86400
    assert parsed["attr"] == {
        "ino": 7, "size": 1025, "blocks": 3, "atime": 1_600_000_000, "mtime": 1_600_000_000,
        "ctime": 1_600_000_000, "atimensec": 123_456_789, "mtimensec": 123_456_789,
        "ctimensec": 123_456_789, "mode": stat.S_IFREG | 0o640, "nlink": 2, "uid": 1000, "gid": 50,
        "rdev": 0, "blksize": 0, "flags": 0,
    }  # fmt: skip


def test_a_missing_name_is_a_negative_entry_the_kernel_may_keep() -> None:
    parsed = parse_entry(entry_record(None, 86400))
    assert parsed["nodeid"] == 0 and parsed["entry_valid"] == 86400


def test_an_attr_record_is_the_attributes_after_the_timeout() -> None:
    record = attr_record(FILE, 60)
    assert len(record) == 104  # sizeof(struct fuse_attr_out)
    assert struct.unpack("<QII", record[:16]) == (60, 0, 0)
    assert parse_attr(record[16:]) == parse_entry(entry_record(FILE, 60))["attr"]


def test_a_device_number_goes_out_as_the_kernel_encodes_it() -> None:
    device = Attributes(3, stat.S_IFCHR | 0o600, 1, 0, 0, 0, rdev=(4 << 8) | 1, mtime_ns=0)
    assert parse_attr(attr_record(device, 1)[16:])["rdev"] == (4 << 8) | 1


def items(count: int, plus: bool) -> list[Listed]:
    dots: list[Listed] = [(b".", 1, stat.S_IFDIR, None), (b"..", 1, stat.S_IFDIR, None)]
    names: list[Listed] = [(f"n{i:0{i % 7 + 1}d}".encode(), 10 + i, stat.S_IFREG | 0o644,
                            Attributes(10 + i, stat.S_IFREG | 0o644, 1, 0, 0, i, 0, 0) if plus else None)
             for i in range(count)]  # fmt: skip
    return dots + names


def test_a_listing_names_each_entry_with_its_type_and_the_offset_of_the_next() -> None:
    listed = parse_listing(listing_buffer(items(3, False), 0, 4096, False, 1), plus=False)
    assert [r["name"] for r in listed] == [b".", b"..", b"n0", b"n01", b"n002"]
    assert [r["off"] for r in listed] == [1, 2, 3, 4, 5]
    assert [r["ino"] for r in listed] == [1, 1, 10, 11, 12]
    assert [r["type"] for r in listed] == [4, 4, 8, 8, 8]  # DT_DIR, DT_REG


def test_a_listing_stops_at_the_last_whole_record_that_fits() -> None:
    everything = listing_buffer(items(200, False), 0, 1 << 20, False, 1)
    for size in (24, 31, 32, 100, 1000, 4096):
        buffer = listing_buffer(items(200, False), 0, size, False, 1)
        assert len(buffer) <= size
        assert everything.startswith(buffer)
        assert len(buffer) + 40 > size  # the next record (at most 40 bytes here) would not fit


def test_a_listing_resumed_at_an_offset_continues_the_numbering() -> None:
    all_items = items(10, False)
    resumed = parse_listing(listing_buffer(all_items[5:], 5, 4096, False, 1), plus=False)
    assert [r["off"] for r in resumed] == list(range(6, 13))
    assert resumed[0]["name"] == all_items[5][0]


def test_a_plus_listing_links_children_but_not_the_dots() -> None:
    listed = parse_listing(listing_buffer(items(2, True), 0, 4096, True, 30), plus=True)
    assert [r["entry"]["nodeid"] for r in listed] == [0, 0, 10, 11]  # type: ignore[index]
    child = listed[3]["entry"]
    assert child["entry_valid"] == 30 and child["attr"]["size"] == 1  # type: ignore[index]


def test_a_time_before_1970_goes_out_as_the_kernel_reads_it() -> None:
    old = FILE._replace(mtime_ns=-1_500_000_000)  # 1.5 s before the epoch: -2 s + 500,000,000 ns
    attr = parse_attr(attr_record(old, 1)[16:])
    assert struct.unpack("<q", struct.pack("<Q", attr["mtime"]))[0] == -2 and attr["mtimensec"] == 500_000_000


def test_a_plus_listing_of_plain_attribute_tuples_carries_what_a_lookup_would() -> None:
    for attributes in (FILE, Attributes(9, stat.S_IFCHR | 0o600, 1, 0, 0, 0, (4 << 8) | 1, -1)):
        listed = parse_listing(listing_buffer([(b"name", attributes.ino, attributes.mode, tuple(attributes))], 6,
                                              4096, True, 45), plus=True)  # fmt: skip
        assert listed == [{"ino": attributes.ino, "off": 7, "type": attributes.mode >> 12, "name": b"name",
                           "entry": parse_entry(entry_record(attributes, 45))}]  # fmt: skip


def test_a_read_answer_is_as_large_as_libfuse_can_still_splice() -> None:
    # libfuse splices an answer only if a pipe of pipe-max-size holds it, its 16-byte header
    # and three pages of slack (fuse_send_data_iov); else it copies it through a new buffer.
    pages = spliceable_pages(1 << 20, 4096)
    assert pages == 252
    assert pages * 4096 + 16 + 3 * 4096 <= 1 << 20 < (pages + 1) * 4096 + 16 + 3 * 4096
    assert spliceable_pages(1 << 24, 4096) == 256  # never past FUSE_MAX_MAX_PAGES
    assert spliceable_pages(16384, 4096) == 1  # a tiny pipe-max-size still reads


def test_a_fault_repeated_within_the_window_is_logged_once() -> None:
    from unionfs.fuse.ops import RepeatedFaults

    now = [100.0]
    faults = RepeatedFaults(window=5.0, clock=lambda: now[0])
    key = ("read", (7,))
    assert faults.is_news(key)
    now[0] += 1.0
    assert not faults.is_news(key)  # the kernel's next request of the same read
    assert faults.is_news(("read", (8,))) and faults.is_news(("readlink", (7,)))
    now[0] += 5.0
    assert faults.is_news(key)  # a later read that fails is news again
