"""`crfs-merge layers` and ImageView.layers: per-layer counts and wasted bytes checked by hand
on a small image, the history lines, and `--ci` as a gate (exit status 3 on an image that
copies a 10 MB file and deletes it in the next layer, 0 on one that keeps it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import COMMAND, ImageWriter
from tests.tarvocab import d, f, hl, opq, wh
from tests.test_explain import indexed
from unionfs.api import open_image
from whiteout.history import layer_summaries

TEN_MB = 10 * 1000 * 1000
SMALL = [
    [d("etc/"), f("etc/motd", b"hello"), f("etc/hosts", b"h"), d("var/"), d("var/cache/"), f("var/cache/a", b"aaaa"),
     f("data", b"0123456789"), hl("data-link", "data")],
    [wh("etc/motd"), opq("var/cache"), f("var/cache/b", b"bb"), wh("data"), d("etc/"), f("etc/hosts", b"hh")],
    [f("etc/motd", b"again"), f("etc/hosts", b"hhh")],
]  # fmt: skip
# By hand. Layer 0 adds its 8 paths; of its 20 file bytes, motd (5, whited out), hosts (1,
# overwritten) and var/cache/a (4, opaque) are hidden; data's 10 stay visible through data-link.
# Layer 1 adds var/cache/b, changes etc (a new directory entry) and etc/hosts, removes
# etc/motd, var/cache/a and data; its hosts (2) is overwritten by layer 2. Layer 2 adds
# etc/motd back and changes etc/hosts.
SMALL_EXPECTED = [
    {"entries": 8, "added": 8, "changed": 0, "removed": 0, "file_bytes": 20, "wasted_bytes": 10},
    {"entries": 6, "added": 1, "changed": 2, "removed": 3, "file_bytes": 4, "wasted_bytes": 2},
    {"entries": 2, "added": 1, "changed": 1, "removed": 0, "file_bytes": 8, "wasted_bytes": 0},
]
FIELDS = list(SMALL_EXPECTED[0])


def layers(image: str, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "layers", "--cache-dir", str(tmp_path / "cache"), *options, image],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_counts_and_wasted_bytes_of_a_small_image(oci_image: ImageWriter, tmp_path: Path) -> None:
    run = layers(oci_image(*SMALL), tmp_path, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [{k: layer[k] for k in FIELDS} for layer in report["layers"]] == SMALL_EXPECTED
    assert (report["file_bytes"], report["wasted_bytes"], report["user_file_bytes"]) == (32, 12, 12)
    assert report["efficiency"] == pytest.approx(20 / 32)
    assert report["user_wasted_fraction"] == pytest.approx(1.0)
    blobs = [layer["layer"] for layer in report["layers"]]
    assert [b["index"] for b in blobs] == [0, 1, 2] and all(b["digest"].startswith("sha256:") for b in blobs)
    assert all(b["size"] > 0 for b in blobs)


def test_a_removed_subtree_counts_every_path(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image([d("a/"), d("a/b/"), f("a/b/c", b"c"), f("a/d", b"d")], [f("a", b"now a file")])
    with open_image(image, cache_dir=tmp_path / "cache") as view:
        report = view.layers()
    upper = report.layers[1]
    assert (upper.added, upper.changed, upper.removed) == (0, 1, 3)  # a changed; a/b, a/b/c, a/d removed
    assert (report.layers[0].wasted_bytes, upper.wasted_bytes) == (2, 0)


HISTORY = [{"created_by": "/bin/sh -c #(nop) ADD file:abc in / "}, {"created_by": "ENV A=b", "empty_layer": True},
           {"created_by": "RUN /bin/sh -c rm -rf /var/cache/* # buildkit"},
           {"created_by": "COPY motd /etc/motd # buildkit"}]  # fmt: skip


def test_each_layer_shows_its_history_line(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(*SMALL, history=HISTORY)
    run = layers(image, tmp_path)
    assert run.returncode == 0, run.stderr
    rows = run.stdout.splitlines()[1:4]
    assert [row.split()[0] for row in rows] == ["0", "1", "2"]
    for row, line in zip(rows, [HISTORY[0], HISTORY[2], HISTORY[3]], strict=True):
        assert row.endswith(" ".join(str(line["created_by"]).split())), row
    assert "efficiency: 62.50%" in run.stdout
    report = json.loads(layers(image, tmp_path, "--json").stdout)
    assert [layer["layer"]["created_by"] for layer in report["layers"]] == [h["created_by"] for h in HISTORY
                                                                          if not h.get("empty_layer")]  # fmt: skip


BASE = [d("usr/"), f("usr/tool", b"t" * 1000)]


def copy_then_delete(oci_image: ImageWriter) -> str:
    return oci_image(BASE, [d("srv/"), f("srv/big.bin", bytes(TEN_MB))], [wh("srv/big.bin")])


def test_ci_fails_on_a_copied_and_deleted_10_mb_file(oci_image: ImageWriter, tmp_path: Path) -> None:
    run = layers(copy_then_delete(oci_image), tmp_path, "--ci")
    assert run.returncode == 3, run.stderr
    assert "FAIL: efficiency" in run.stderr and "FAIL: user wasted" in run.stderr
    report = json.loads(layers(copy_then_delete(oci_image), tmp_path, "--ci", "--json").stdout)
    assert report["wasted_bytes"] == TEN_MB and report["layers"][1]["wasted_bytes"] == TEN_MB


def test_ci_passes_an_image_that_keeps_its_file(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(BASE, [d("srv/"), f("srv/big.bin", bytes(TEN_MB))], [f("srv/other", b"o")])
    run = layers(image, tmp_path, "--ci")
    assert run.returncode == 0, run.stderr
    assert "PASS" in run.stderr and "efficiency: 100.00%" in run.stdout


def test_each_threshold_can_fail_alone(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = copy_then_delete(oci_image)
    lenient = ["--ci", "--lowest-efficiency", "0", "--highest-user-wasted-percent", "1000%"]
    assert layers(image, tmp_path, *lenient, "--highest-wasted-bytes", "20M").returncode == 0
    bytes_rule = layers(image, tmp_path, *lenient, "--highest-wasted-bytes", "5M")
    assert bytes_rule.returncode == 3 and "FAIL: wasted bytes 10000000" in bytes_rule.stderr
    user_rule = layers(image, tmp_path, "--ci", "--lowest-efficiency", "0", "--highest-user-wasted-percent", "50%")
    assert user_rule.returncode == 3 and "FAIL: user wasted" in user_rule.stderr
    assert "FAIL: efficiency" not in user_rule.stderr


def test_thresholds_without_ci_are_a_usage_error(oci_image: ImageWriter, tmp_path: Path) -> None:
    run = layers(oci_image(BASE), tmp_path, "--lowest-efficiency", "0.5")
    assert run.returncode == 2 and "--ci" in run.stderr


def test_a_layer_hidden_by_an_opaque_root_wastes_all_its_bytes() -> None:
    summary = layer_summaries(indexed([BASE, [opq(""), f("new", b"n")]]), lambda e: e.size)
    assert [(s.added, s.removed, s.wasted_bytes) for s in summary.layers] == [(2, 0, 1000), (1, 2, 0)]
    assert summary.efficiency == pytest.approx(1 / 1001)
