"""`crfs-merge explain` and ImageView.explain: constructed images with known answers (a file
whited out, a directory made opaque, a file replaced by a directory, a parent whited out or
replaced, a hardlink group split), the history line of the layer that made a path, and a lazy
eStargz image in a registry, explained from its TOCs alone.

The pure rules (whiteout.history) run on layers indexed by the real tar indexer; the command
runs on real OCI layouts through the installed command line."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import COMMAND, ImageWriter, require
from tests.registry_servers import REGISTRY_BINARY, FaultProxy, estargz_in_registry, skopeo_copy
from tests.tarvocab import Member, d, f, hl, opq, sym, tar_of, wh
from unionfs.aio import EventLoopThread
from unionfs.api import open_image
from unionfs.entry import Entry
from unionfs.provenance.gather import kind_of
from unionfs.storage.tar_index import index_tar
from whiteout.history import Action, Cause, path_history

MIB = 1024 * 1024
WHITED_OUT = [[d("etc/"), f("etc/motd", b"hello")], [f("etc/hosts", b"h")], [wh("etc/motd")]]
OPAQUE = [[d("var/"), d("var/cache/"), f("var/cache/old", b"o")], [opq("var/cache"), f("var/cache/new", b"n")]]
FILE_TO_DIRECTORY = [[f("x", b"file")], [d("x/"), f("x/inner", b"i")]]
PARENT_WHITED_OUT = [[d("p/"), d("p/q/"), f("p/q/file", b"f")], [wh("p")]]
PARENT_REPLACED = [[d("p/"), f("p/file", b"f")], [f("p", b"now a file")]]
SPLIT_GROUP = [[f("a", b"shared"), hl("b", "a"), hl("c", "a")], [f("c", b"split off")]]
THROUGH_A_SYMLINK = [[d("real/"), f("real/f", b"f"), sym("lnk", "real")], [wh("lnk/f")]]
IMPLIED = [[f("x", b"file")], [f("x/y", b"y")]]

# (layers, path, [(layer, action, before, after, [(cause, marker, target), ...]), ...], final kind)
CASES: dict[str, tuple[list[list[Member]], str, list[tuple[Any, ...]], str | None]] = {
    "file whited out in layer 2": (WHITED_OUT, "etc/motd", [
        (0, "added", None, "file", []),
        (2, "removed", "file", None, [("whiteout", "etc/.wh.motd", "etc/motd")])], None),
    "file hidden by an opaque directory": (OPAQUE, "var/cache/old", [
        (0, "added", None, "file", []),
        (1, "removed", "file", None, [("opaque", "var/cache/.wh..wh..opq", "var/cache")])], None),
    "directory made opaque": (OPAQUE, "var/cache", [
        (0, "added", None, "directory", []),
        (1, "emptied", "directory", "directory", [("made-opaque", "var/cache/.wh..wh..opq", "var/cache")])],
        "directory"),
    "file replaced by a directory": (FILE_TO_DIRECTORY, "x", [
        (0, "added", None, "file", []),
        (1, "replaced", "file", "directory", [("replaced", "x", "x")])], "directory"),
    "parent whited out": (PARENT_WHITED_OUT, "p/q/file", [
        (0, "added", None, "file", []),
        (1, "removed", "file", None, [("parent-whiteout", ".wh.p", "p")])], None),
    "parent replaced by a file": (PARENT_REPLACED, "p/file", [
        (0, "added", None, "file", []),
        (1, "removed", "file", None, [("parent-replaced", "p", "p")])], None),
    "directory replaced by a file": (PARENT_REPLACED, "p", [
        (0, "added", None, "directory", []),
        (1, "replaced", "directory", "file", [("replaced", "p", "p")])], "file"),
    "hardlink split off by a replacement": (SPLIT_GROUP, "c", [
        (0, "added", None, "file", []),
        (1, "modified", "file", "file", [("overwritten", "c", "c")])], "file"),
    "whiteout through a symlinked parent": (THROUGH_A_SYMLINK, "real/f", [
        (0, "added", None, "file", []),
        (1, "removed", "file", None, [("whiteout", "lnk/.wh.f", "real/f")])], None),
    "file replaced by an implied directory": (IMPLIED, "x", [
        (0, "added", None, "file", []),
        (1, "replaced", "file", "directory", [("implied", "x/y", "x")])], "directory"),
}  # fmt: skip


def indexed(layers: list[list[Member]]) -> list[list[Entry]]:
    """The layers' entries as the real tar indexer gives them (no image, no mount)."""
    tars = [tar_of(*members) for members in layers]
    return [index_tar(io.BytesIO(t), len(t), n, lambda _m: None) for n, t in enumerate(tars)]


def changes_of(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """JSON events as the CASES tuples."""
    return [(e["layer"]["index"], e["action"], e["before"], e["after"],
             [(r["cause"], r["marker"], r["target"]) for r in e["reasons"]]) for e in events]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_history_of_a_path_names_the_layer_and_marker(case: str) -> None:
    layers, path, expected, kind = CASES[case]
    history = path_history(indexed(layers), path, kind_of)
    found = [(c.layer, c.action.value, c.before, c.after, [(r.cause.value, r.marker, r.target) for r in c.reasons])
             for c in history.changes]  # fmt: skip
    assert found == expected
    assert history.kind == kind


def test_a_hardlink_group_split_by_a_replacement() -> None:
    history = path_history(indexed(SPLIT_GROUP), "a", kind_of)
    assert history.hardlinks == ("a", "b")
    assert [(g.layer, g.paths) for g in history.groups] == [(0, ("a", "b", "c")), (1, ("a", "b"))]
    assert history.made_by == 0 and not history.changes[1:]  # a itself never changed


def test_a_path_no_layer_had() -> None:
    history = path_history(indexed(WHITED_OUT), "etc/nothing", kind_of)
    assert not history.ever_present and history.changes == ()


def test_a_path_added_again_after_its_whiteout() -> None:
    layers = [*WHITED_OUT, [f("etc/motd", b"again")]]
    history = path_history(indexed(layers), "etc/motd", kind_of)
    assert [(c.layer, c.action) for c in history.changes] == [(0, Action.ADDED), (2, Action.REMOVED), (3, Action.ADDED)]
    assert history.made_by == 3 and history.entry is not None and history.entry.size == 5


def explain(image: str, path: str, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "explain", "--cache-dir", str(tmp_path / "cache"), *options, image, path],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_the_command_explains_each_case(case: str, oci_image: ImageWriter, tmp_path: Path) -> None:
    layers, path, expected, kind = CASES[case]
    image = oci_image(*layers)
    run = explain(image, "/" + path, tmp_path, "--json")
    assert run.returncode == (0 if kind else 1), run.stderr
    report = json.loads(run.stdout)
    assert (report["path"], report["kind"], report["exists"]) == (path, kind, kind is not None)
    assert changes_of(report["events"]) == expected
    text = explain(image, path, tmp_path)
    assert text.returncode == run.returncode
    last_marker = expected[-1][4][0][1]
    assert f"layer {expected[-1][0]}" in text.stdout and repr(last_marker) in text.stdout, text.stdout


def test_the_command_on_a_missing_path(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(*WHITED_OUT)
    removed = explain(image, "etc/motd", tmp_path)
    assert removed.returncode == 1
    assert "etc/motd: not in the merged tree; by whiteout 'etc/.wh.motd' in layer 2" in removed.stdout
    never = explain(image, "etc/nothing", tmp_path)
    assert never.returncode == 1
    assert "no layer of" in never.stderr and "ever had this path" in never.stderr


def test_the_command_names_a_hardlink_group_and_its_split(oci_image: ImageWriter, tmp_path: Path) -> None:
    run = explain(oci_image(*SPLIT_GROUP), "b", tmp_path, "--json")
    report = json.loads(run.stdout)
    assert run.returncode == 0
    assert report["hardlinks"] == ["a", "b"]
    assert report["hardlink_history"] == [{"layer": 0, "paths": ["a", "b", "c"]}, {"layer": 1, "paths": ["a", "b"]}]
    assert report["entry"]["path"] == "a" and report["entry"]["layer"] == 0  # the file b links to


DOCKERFILE_HISTORY = [
    {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:0123abcd in / "},
    {"created": "2024-01-01T00:00:01Z", "created_by": "/bin/sh -c #(nop)  CMD [\"bash\"]", "empty_layer": True},
    {"created": "2024-01-02T00:00:00Z", "created_by": "ENV LANG=C.UTF-8", "empty_layer": True},
    {"created": "2024-01-02T00:00:01Z", "created_by": "RUN /bin/sh -c echo 'deb http://x y z' > /etc/apt/sources.list "
     "&& rm /etc/motd # buildkit", "comment": "buildkit.dockerfile.v0"},
    {"created": "2024-01-02T00:00:02Z", "created_by": "COPY app /srv/app # buildkit",
     "comment": "buildkit.dockerfile.v0"},
]  # fmt: skip
DOCKERFILE_LAYERS = [
    [d("etc/"), f("etc/motd", b"welcome"), d("etc/apt/"), f("etc/apt/sources.list", b"deb old")],
    [d("etc/"), wh("etc/motd"), d("etc/apt/"), f("etc/apt/sources.list", b"deb http://x y z")],
    [d("srv/"), f("srv/app", b"binary")],
]
RUN_LINE = DOCKERFILE_HISTORY[3]["created_by"]


def test_the_run_line_that_made_a_path_is_named(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(*DOCKERFILE_LAYERS, history=DOCKERFILE_HISTORY)
    run = explain(image, "etc/apt/sources.list", tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"made by: {RUN_LINE}" in run.stdout
    assert "a file from layer 1" in run.stdout
    removed = json.loads(explain(image, "etc/motd", tmp_path, "--json").stdout)
    assert removed["events"][-1]["layer"]["created_by"] == RUN_LINE  # the RUN that deleted it
    assert removed["events"][0]["layer"]["created_by"] == DOCKERFILE_HISTORY[0]["created_by"]
    copied = json.loads(explain(image, "srv/app", tmp_path, "--json").stdout)
    assert copied["made_by"]["created_by"] == "COPY app /srv/app # buildkit"
    assert copied["made_by"]["comment"] == "buildkit.dockerfile.v0"


def test_the_api_explains_without_a_command(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(*DOCKERFILE_LAYERS, history=DOCKERFILE_HISTORY)
    with open_image(image, cache_dir=tmp_path / "cache") as view:
        report = view.explain("/etc/motd")
        kept = view.explain("srv/app")
    assert not report.exists and report.ever_existed
    removed = report.removed_by
    assert removed is not None and removed.layer.index == 1 and removed.layer.created_by == RUN_LINE
    assert [(r.cause, r.marker) for r in removed.reasons] == [(Cause.WHITEOUT, "etc/.wh.motd")]
    assert kept.exists and kept.made_by is not None and kept.made_by.index == 2
    assert kept.entry is not None and (kept.entry.kind, kept.entry.size) == ("file", len(b"binary"))


def test_a_path_through_a_symlink_is_explained_where_it_lands(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image([d("usr/"), d("usr/lib/"), f("usr/lib/libc.so", b"c"), sym("lib", "usr/lib")])
    run = explain(image, "/lib/libc.so", tmp_path, "--json")
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["path"] == "usr/lib/libc.so" and report["asked"] == "/lib/libc.so"


# ------------------------------------------------------------ a lazy eStargz image in a registry

LAZY_LOWER = [d("data/"), f("data/big", os.urandom(2 * MIB)), d("etc/"), f("etc/motd", b"lower")]
LAZY_UPPER = [wh("etc/motd"), f("etc/os-release", b"ID=test\n"), f("data/more", os.urandom(MIB))]
LAZY_HISTORY = [{"created_by": "ADD rootfs.tar /"}, {"created_by": "RUN rm /etc/motd && make-release"}]


@pytest.fixture(scope="module")
def lazy_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(host of a registry holding our eStargz conversion of a two-layer image, its repository:tag)."""
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing")
    require(subprocess.run(["skopeo", "--version"], capture_output=True).returncode == 0, "skopeo is missing")
    root = tmp_path_factory.mktemp("explain-lazy")
    layers = [tar_of(*LAZY_LOWER), tar_of(*LAZY_UPPER)]
    with estargz_in_registry(root, layers, "explain/lazy:v1", LAZY_HISTORY) as registry:
        skopeo_copy(f"oci:{root / 'source'}:v1", f"docker://{registry.host}/explain/plain:v1")
        yield registry.host, "explain/lazy:v1"


def test_a_lazy_image_is_explained_from_its_tocs(lazy_image: tuple[str, str], tmp_path: Path) -> None:
    host, name = lazy_image
    with EventLoopThread() as loop:
        proxy = FaultProxy(host, loop)
        proxy.start()
        try:
            with open_image(f"{proxy.host}/{name}", cache_dir=tmp_path / "cache") as view:
                opened = proxy.served_bytes
                assert view.mounted.waits_on_network, "the layers were not read lazily"
                report = view.explain("etc/motd")
                layers = view.layers()
            explained = proxy.served_bytes - opened
        finally:
            proxy.stop()
    assert explained == 0, "explain and layers fetched more than the TOCs the open had cached"
    assert opened < MIB / 2, f"opening fetched {opened} bytes: more than footers and TOCs"
    removed = report.removed_by
    assert removed is not None and removed.layer.index == 1
    assert removed.layer.created_by == LAZY_HISTORY[1]["created_by"]
    assert [r.marker for r in removed.reasons] == ["etc/.wh.motd"]
    assert [(r.added, r.removed) for r in layers.layers] == [(4, 0), (2, 1)]
    assert layers.wasted_bytes == len(b"lower") and layers.layers[0].layer.digest.startswith("sha256:")


def test_a_registry_image_fetched_whole_is_explained_alike(lazy_image: tuple[str, str], tmp_path: Path) -> None:
    host, name = lazy_image
    with open_image(f"{host}/{name}", cache_dir=tmp_path / "lazy") as lazy:
        expected = (lazy.explain("etc/motd").events, lazy.layers().layers)
    with open_image(f"{host}/explain/plain:v1", cache_dir=tmp_path / "plain") as plain:
        assert not plain.mounted.waits_on_network  # gzip layers, fetched whole and indexed
        report, layers = plain.explain("etc/motd"), plain.layers()
    assert [(e.layer.index, e.action, e.reasons) for e in report.events] == [
        (e.layer.index, e.action, e.reasons) for e in expected[0]]
    counts = [(r.entries, r.added, r.changed, r.removed, r.file_bytes, r.wasted_bytes) for r in layers.layers]
    assert counts == [(r.entries, r.added, r.changed, r.removed, r.file_bytes, r.wasted_bytes) for r in expected[1]]
