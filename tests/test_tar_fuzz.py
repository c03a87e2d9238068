"""Raw tar headers, every field fuzzed (ustar, GNU and PAX; octal, base-256, garbage, huge and
negative numbers; PAX records with odd values), through the real index, merge and freeze:
the only outcomes allowed are a tree or one of the project's one-line errors."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import ImageError, LayerFormatError
from registry.layout_writer import write_layout
from tests.conftest import COMMAND
from tests.tarvocab import f, tar_of
from unionfs.build import merged_tree
from unionfs.storage.tar_index import index_tar

BLOCK = 512
# (offset, width) of each ustar header field
NAME, MODE, UID, GID, SIZE, MTIME, CHKSUM, TYPE = (0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), \
    (148, 8), (156, 1)  # fmt: skip
LINKNAME, MAGIC, UNAME, GNAME, DEVMAJOR, DEVMINOR, PREFIX = (157, 100), (257, 8), (265, 32), (297, 32), (329, 8), \
    (337, 8), (345, 155)  # fmt: skip
MAGICS = [b"ustar\x0000", b"ustar  \x00", b"\x00" * 8, b"garbage!"]
TYPES = [b"0", b"\x00", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S", b"D", b"V", b"M",
         b"N", b"Z"]  # fmt: skip
NAMES = [b"a", b"d/", b"d/a", b"./a", b"/etc/passwd", b"../x", b"a/../../x", b"d/.wh.a", b"d/.wh..wh..opq", b".",
         b"", b"\xff\xfe", b"a" * 99, b"d//a/./b", b"\xc3\xa9t\xc3\xa9"]  # fmt: skip
PAX_KEYS = ["size", "mtime", "atime", "ctime", "uid", "gid", "path", "linkpath", "uname", "gname", "hdrcharset",
            "SCHILY.xattr.user.a", "SCHILY.xattr.security.capability", "SCHILY.xattr.", "GNU.sparse.size",
            "GNU.sparse.map", "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize",
            "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes", "comment",
            "LIBARCHIVE.xattr.user.b"]  # fmt: skip
PAX_VALUES = ["", "-1", "0", "1", "-0.5", "1e3", "1E400", "nan", "NaN", "inf", "-inf", "0x10", " 7", "7 ", "1.5",
              "99999999999999999999999999999", "-99999999999999999999999", "1.000000000000000000001", "é",
              "a\x00b", "d/a", "../../x", "\udcff", "18446744073709551616", "4294967296",
              "9223372036854775807"]  # fmt: skip


def _octal(width: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, 8 ** (width - 1) - 1).map(lambda n: b"%0*o\x00" % (width - 1, n))


def _base256(width: int) -> st.SearchStrategy[bytes]:
    """GNU's binary numbers: 0x80 then big-endian for positives, two's complement with a
    leading 0xff for negatives (what Python's tarfile and Go's archive/tar both read)."""
    bits = 8 * (width - 1)
    return st.one_of(st.integers(0, 2**33), st.integers(-(2**bits), 2**bits - 1)).map(
        lambda n: (b"\x80" if n >= 0 else b"\xff") + (n % 2**bits).to_bytes(width - 1, "big")
    )


def _number(width: int) -> st.SearchStrategy[bytes]:
    special = [b" " * width, b"\x00" * width, b"7" * width, b"-1".ljust(width, b"\x00"), b"\xff" * width,
               b"\x80" + b"\xff" * (width - 1)]  # fmt: skip
    return st.one_of(_octal(width), _base256(width), st.sampled_from(special))


def _text(width: int, choices: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(choices), st.binary(max_size=width)).map(lambda b: b[:width])


@st.composite
def headers(draw: st.DrawFn, size: int | None) -> bytes:
    """One 512-byte header, each field drawn on its own (the size too unless given); the
    checksum is usually right (so the header is read at all), sometimes not."""
    header = bytearray(BLOCK)

    def put(field: tuple[int, int], value: bytes) -> None:
        offset, width = field
        header[offset : offset + width] = value[:width].ljust(width, b"\x00")

    put(NAME, draw(_text(100, NAMES)))
    for field in (MODE, UID, GID, DEVMAJOR, DEVMINOR):
        put(field, draw(_number(8)))
    put(SIZE, b"%011o\x00" % size if size is not None else draw(_number(12)))
    put(MTIME, draw(_number(12)))
    # At most one number is garbage, so that most headers are read and the fuzzing goes on.
    garbled = draw(st.sampled_from([None] * 14 + [MODE, UID, GID, SIZE, MTIME, DEVMAJOR, DEVMINOR]))
    if garbled is not None:
        put(garbled, draw(st.binary(min_size=garbled[1], max_size=garbled[1])))
    put(TYPE, draw(st.one_of(st.sampled_from(TYPES), st.binary(min_size=1, max_size=1))))
    put(LINKNAME, draw(_text(100, NAMES)))
    put(MAGIC, draw(st.sampled_from(MAGICS)))
    put(UNAME, draw(st.binary(max_size=32)))
    put(GNAME, draw(st.binary(max_size=32)))
    put(PREFIX, draw(st.sampled_from([b"", b"d", b"..", b"/abs", b"\xff"])))
    put(CHKSUM, b" " * 8)
    checksum = sum(header) + draw(st.sampled_from([0] * 19 + [1]))
    put(CHKSUM, b"%06o\x00 " % checksum)
    return bytes(header)


@st.composite
def pax_records(draw: st.DrawFn) -> bytes:
    """PAX extended-header records: odd keys and values, sometimes with a wrong length."""
    records = b""
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(PAX_KEYS), st.sampled_from(PAX_KEYS), st.text(max_size=10)))
        value = draw(st.one_of(st.sampled_from(PAX_VALUES), st.text(max_size=20)))
        body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        length = len(body) + 1
        while len(str(length)) + len(body) != length:  # the length counts its own digits
            length += 1
        length += draw(st.sampled_from([0] * 30 + [-1, 1, 10**6]))
        records += str(length).encode() + body
    return records


def _pax_header(records: bytes, kind: bytes) -> bytes:
    header = bytearray(BLOCK)
    header[0:9] = b"PaxHeader"
    header[100:108] = b"0000644\x00"
    header[124:136] = b"%011o\x00" % len(records)
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + _padded(records)


def _padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % BLOCK)


@st.composite
def members(draw: st.DrawFn) -> bytes:
    """A member: perhaps a PAX header (per-file 'x' or global 'g'), the fuzzed header, data
    (of the size in the header, unless that was fuzzed too)."""
    pax = draw(st.one_of(st.just(b""), pax_records().map(lambda r: _pax_header(r, b"x")),
                         pax_records().map(lambda r: _pax_header(r, b"g"))))  # fmt: skip
    size = draw(st.one_of(st.integers(0, 1200), st.none()))  # mostly a size the data has
    data = draw(st.binary(min_size=size or 0, max_size=size if size is not None else 1100))
    return pax + draw(headers(size)) + _padded(data)


@st.composite
def raw_tars(draw: st.DrawFn) -> bytes:
    tar = b"".join(draw(st.lists(members(), min_size=1, max_size=3)))
    return tar + draw(st.sampled_from([b"\x00" * 2 * BLOCK, b"", b"\x00" * BLOCK]))


def _index_merge_freeze(tars: list[bytes]) -> None:
    """The real path from layer tars to a frozen tree; raises only ImageError subclasses."""
    layers = [index_tar(io.BytesIO(tar), len(tar), number, lambda _: None) for number, tar in enumerate(tars)]
    tree = merged_tree(layers)
    for _, inode in tree.items():
        tree.attributes(inode.ino)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_tars(), min_size=1, max_size=2))
def test_no_header_field_value_reaches_a_traceback(tars: list[bytes]) -> None:
    try:
        _index_merge_freeze(tars)
    except ImageError as exc:
        assert "\n" not in str(exc)


# --- the case that was seen, end to end ----------------------------------------------------


def _negative_size_tar() -> bytes:
    """A regular file 'etc/bad' whose size field is -1 in base-256, after a good file."""
    header = bytearray(tar_of(f("etc/bad", b""))[:BLOCK])
    header[124:136] = b"\xff" * 12
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return tar_of(f("etc/ok", b"ok"))[: 2 * BLOCK] + bytes(header) + b"\x00" * 3 * BLOCK


def test_negative_size_is_a_layer_format_error() -> None:
    tar = _negative_size_tar()
    try:
        index_tar(io.BytesIO(tar), len(tar), 1, lambda _: None)
    except LayerFormatError as exc:
        assert str(exc) == "layer 1: 'etc/bad': negative size -1"
    else:
        raise AssertionError("a negative size was indexed")


def test_negative_size_fails_the_command_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "image"
    write_layout(root, [tar_of(f("a", b"a")), _negative_size_tar()])
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), "--export", str(tmp_path / "out.tar"),
                          f"oci:{root}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["crfs-merge: layer 1: 'etc/bad': negative size -1"]
