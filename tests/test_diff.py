"""`crfs-merge diff`: two real OCI layouts with known differences, checked against the expected
changes and against what the two images' FUSE mounts show (tests/tree_walk.describe_tree)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import COMMAND, ImageWriter, Mounter
from tests.tarvocab import MTIME, d, dev, f, hl, sym, wh
from tests.tree_walk import describe_tree

# The first layer of both images: one tar, so one diff_id, so unchanged files are equal unread.
BASE = [
    d("etc/"), f("etc/keep", b"kept"), f("etc/wh-removed", b"y"), d("etc/gone/"), f("etc/gone/inner", b"z"),
    f("etc/typechange", b"t"), f("etc/mode", b"m"), f("etc/owner", b"o"), f("etc/same-size", b"aaaa"),
    f("etc/diff-size", b"short"), sym("etc/link", "keep"), f("etc/hard-src", b"hh"), hl("etc/hard", "etc/hard-src"),
    f("etc/shared", b"identical bytes"), f("etc/attr", b"x", xattrs={"user.a": "1", "user.c": "4"}),
    dev("etc/dev", "c", 1, 3), f("etc/touched", b"touch"),
]  # fmt: skip
ONLY_A = [f("etc/only-in-a", b"a")]
CHANGES_B = [
    wh("etc/wh-removed"), wh("etc/gone"), f("etc/added", b"new"), d("etc/typechange/"),
    f("etc/typechange/inner", b"i"), f("etc/mode", b"m", mode=0o600), f("etc/owner", b"o", uid=1000, gid=1000),
    f("etc/same-size", b"bbbb"), f("etc/diff-size", b"much longer"), sym("etc/link", "other"), f("etc/hard", b"hh"),
    f("etc/shared", b"identical bytes"), f("etc/attr", b"x", xattrs={"user.a": "2", "user.b": "3", "user.c": "4"}),
    dev("etc/dev", "c", 1, 5), f("etc/touched", b"touch", mtime=MTIME + 60),
]  # fmt: skip

EXPECTED = {
    "/etc/only-in-a": ("D", set()),
    "/etc/wh-removed": ("D", set()),
    "/etc/gone": ("D", set()),
    "/etc/gone/inner": ("D", set()),
    "/etc/added": ("A", set()),
    "/etc/typechange": ("M", {"type", "mode"}),
    "/etc/typechange/inner": ("A", set()),
    "/etc/mode": ("M", {"mode"}),
    "/etc/owner": ("M", {"uid", "gid"}),
    "/etc/same-size": ("M", {"content"}),
    "/etc/diff-size": ("M", {"size", "content"}),
    "/etc/link": ("M", {"size", "target"}),
    "/etc/hard": ("M", {"hardlinks"}),
    "/etc/hard-src": ("M", {"hardlinks"}),
    "/etc/attr": ("M", {"xattrs"}),
    "/etc/dev": ("M", {"device"}),
    "/etc/touched": ("M", {"mtime"}),
}
# Files of the same size whose bytes B's second layer wrote again: these, and only these, are read.
REWRITTEN = {"etc/mode", "etc/owner", "etc/same-size", "etc/hard", "etc/shared", "etc/attr", "etc/touched"}

# describe_tree's columns: (mode, uid, gid, size, mtime, content, xattrs, hardlink group).
COLUMNS = ("mode", "uid", "gid", "size", "mtime", "content", "xattrs", "hardlinks")
FIELD_COLUMN = {"type": "mode", "mode": "mode", "uid": "uid", "gid": "gid", "size": "size", "content": "content",
                "target": "content", "device": "content", "xattrs": "xattrs", "hardlinks": "hardlinks",
                "mtime": "mtime"}  # fmt: skip


def crfs_diff(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "diff", "--cache-dir", str(tmp_path / "cache"), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def json_diff(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = crfs_diff(tmp_path, "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def as_table(document: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    return {c["path"]: (c["status"], set(c.get("fields", {}))) for c in document["changes"]}


def oracle(old: dict[str, tuple[object, ...]], new: dict[str, tuple[object, ...]]) -> dict[str, tuple[str, set[str]]]:
    """The changes from one mount's description to another's, by describe_tree column."""
    table: dict[str, tuple[str, set[str]]] = {}
    for path in old.keys() | new.keys():
        if path not in new:
            table["/" + path] = ("D", set())
        elif path not in old:
            table["/" + path] = ("A", set())
        elif old[path] != new[path]:
            table["/" + path] = ("M", {c for c, a, b in zip(COLUMNS, old[path], new[path], strict=True) if a != b})
    return table


def test_diff_reports_each_kind_of_change(oci_image: ImageWriter, tmp_path: Path) -> None:
    status, document = json_diff(tmp_path, oci_image(BASE, ONLY_A), oci_image(BASE, CHANGES_B))
    assert status == 1 and not document["equal"]
    assert as_table(document) == EXPECTED
    fields = {c["path"]: c.get("fields", {}) for c in document["changes"]}
    assert fields["/etc/typechange"]["type"] == {"old": "file", "new": "directory"}
    assert fields["/etc/mode"]["mode"] == {"old": 0o644, "new": 0o600}
    assert fields["/etc/owner"]["uid"] == {"old": 0, "new": 1000}
    assert fields["/etc/link"]["target"] == {"old": "keep", "new": "other"}
    assert fields["/etc/diff-size"]["content"] == {"old": None, "new": None}  # different unread
    assert fields["/etc/same-size"]["content"]["new"].startswith("sha256:")
    assert fields["/etc/hard"]["hardlinks"] == {"old": ["/etc/hard", "/etc/hard-src"], "new": []}
    assert fields["/etc/attr"]["xattrs"]["new"] == {"user.a": "2", "user.b": "3", "user.c": "4"}
    assert fields["/etc/dev"]["device"] == {"old": "1,3", "new": "1,5"}
    assert fields["/etc/touched"]["mtime"]["new"] - fields["/etc/touched"]["mtime"]["old"] == 60 * 10**9


def test_diff_reads_only_files_it_cannot_judge_unread(oci_image: ImageWriter, tmp_path: Path) -> None:
    _, document = json_diff(tmp_path, oci_image(BASE, ONLY_A), oci_image(BASE, CHANGES_B))
    checks = document["content_checks"]
    assert checks["sha256"] == len(REWRITTEN)
    assert checks["location"] == 2  # etc/keep and etc/hard-src, in the shared first layer
    assert checks["size"] == 1  # etc/diff-size
    assert document["hashed_bytes"] == 2 * sum(len(m.data) for m in CHANGES_B if m.name in REWRITTEN)


def test_diff_equals_the_difference_of_the_two_mounts(oci_image: ImageWriter, mount: Mounter, tmp_path: Path) -> None:
    old, new = oci_image(BASE, ONLY_A), oci_image(BASE, CHANGES_B)
    expected = oracle(describe_tree(mount(old)), describe_tree(mount(new)))
    _, document = json_diff(tmp_path, old, new)
    reported = as_table(document)
    assert reported.keys() == expected.keys()
    for path, (status, fields) in reported.items():
        columns = {FIELD_COLUMN[name] for name in fields}
        assert status == expected[path][0], path
        if "type" in fields:  # a new type: diff names the type, not the bytes of the old one
            assert columns <= expected[path][1], path
        else:
            assert columns == expected[path][1], path


def test_text_output_one_line_per_path(oci_image: ImageWriter, tmp_path: Path) -> None:
    done = crfs_diff(tmp_path, oci_image(BASE, ONLY_A), oci_image(BASE, CHANGES_B))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(EXPECTED)
    assert lines[:4] == ["A /etc/added", "M /etc/attr: xattrs ~user.a +user.b",
                         "M /etc/dev: device 1,3 -> 1,5", "M /etc/diff-size: size 5 -> 11, content"]  # fmt: skip
    assert "D /etc/gone" in lines and "D /etc/gone/inner" in lines
    assert "M /etc/mode: mode 0644 -> 0600" in lines
    assert "M /etc/link: size 4 -> 5, target keep -> other" in lines
    assert "M /etc/hard: hardlinks /etc/hard,/etc/hard-src -> none" in lines
    assert "M /etc/touched: mtime 2023-11-14T22:13:20Z -> 2023-11-14T22:14:20Z" in lines
    assert any(line.startswith("M /etc/same-size: content sha256:") for line in lines)


def test_ignore_mtime(oci_image: ImageWriter, tmp_path: Path) -> None:
    _, document = json_diff(tmp_path, "--ignore-mtime", oci_image(BASE, ONLY_A), oci_image(BASE, CHANGES_B))
    assert as_table(document) == {p: c for p, c in EXPECTED.items() if p != "/etc/touched"}


def test_equal_images_exit_0_silently(oci_image: ImageWriter, tmp_path: Path) -> None:
    done = crfs_diff(tmp_path, oci_image(BASE, CHANGES_B), oci_image(BASE, CHANGES_B))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_same_files_in_other_layers_are_equal(oci_image: ImageWriter, tmp_path: Path) -> None:
    one_layer = [d("etc/"), f("etc/a", b"alpha"), f("etc/b", b"beta"), hl("etc/c", "etc/a")]
    status, document = json_diff(tmp_path, oci_image(one_layer), oci_image(one_layer[:2], one_layer[2:]))
    assert (status, document["changes"]) == (0, [])
    assert document["content_checks"]["sha256"] == 3  # read, as no layer is shared; etc/c is etc/a


def test_trouble_exits_2(oci_image: ImageWriter, tmp_path: Path) -> None:
    done = crfs_diff(tmp_path, oci_image(BASE), f"oci:{tmp_path / 'absent'}:latest")
    assert done.returncode == 2 and done.stdout == "" and "absent" in done.stderr
    assert crfs_diff(tmp_path, oci_image(BASE)).returncode == 2  # usage
