"""The merge rules of image-spec layer.md, case by case, and against a reference model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.merge_helpers import merge_tars, visible
from tests.tarvocab import d, f, hl, opq, sym, wh
from whiteout.apply import Node, merge_layers
from whiteout.markers import Marker, classify
from whiteout.paths import clean_path


@pytest.mark.parametrize(
    ("name", "clean"),
    [
        ("etc/hosts", "etc/hosts"),
        ("./etc/hosts", "etc/hosts"),
        ("etc/", "etc"),
        ("./", ""),
        (".", ""),
        ("/etc//passwd", "etc/passwd"),
        ("a/./b/../c", "a/c"),
        ("../x", None),
        ("../../x", None),
        ("a/../../x", None),
        ("/../x", None),
    ],
)
def test_clean_path(name: str, clean: str | None) -> None:
    assert clean_path(name) == clean


@pytest.mark.parametrize(
    ("path", "marker", "target"),
    [
        ("etc/hosts", Marker.NONE, "etc/hosts"),
        ("etc/.wh.hosts", Marker.WHITEOUT, "etc/hosts"),
        (".wh.etc", Marker.WHITEOUT, "etc"),
        ("etc/.wh..wh..opq", Marker.OPAQUE, "etc"),
        (".wh..wh..opq", Marker.OPAQUE, ""),
        (".wh..wh.plnk", Marker.HIDDEN, ".wh..wh.plnk"),
        (".wh..wh.plnk/123.456", Marker.HIDDEN, ".wh..wh.plnk/123.456"),
        (".wh..wh.aufs", Marker.HIDDEN, ".wh..wh.aufs"),
        ("a/.wh.b/c", Marker.HIDDEN, "a/.wh.b/c"),
        ("a/.wh.", Marker.HIDDEN, "a/.wh."),
        ("a/.wh..", Marker.HIDDEN, "a/.wh.."),
        ("a/x.wh.y", Marker.NONE, "a/x.wh.y"),
    ],
)
def test_classify(path: str, marker: Marker, target: str) -> None:
    assert classify(path) == (marker, target)


LOWER_ETC = [d("etc/"), f("etc/hosts", b"h"), f("etc/motd", b"m"), d("etc/sub/"), f("etc/sub/x", b"x")]

# (case, layers bottom first, the tree docker run shows)
CASES = [
    ("file whiteout", [LOWER_ETC, [wh("etc/motd")]],
     {"etc": "dir", "etc/hosts": "file:h", "etc/sub": "dir", "etc/sub/x": "file:x"}),
    ("directory whiteout hides the subtree", [LOWER_ETC, [wh("etc/sub")]],
     {"etc": "dir", "etc/hosts": "file:h", "etc/motd": "file:m"}),
    ("symlink whiteout", [[sym("l", "/etc"), f("k", b"k")], [wh("l")]], {"k": "file:k"}),
    ("opaque directory, marker first", [LOWER_ETC, [d("etc/"), opq("etc"), f("etc/new", b"n")]],
     {"etc": "dir", "etc/new": "file:n"}),
    ("opaque directory, marker last", [LOWER_ETC, [d("etc/"), f("etc/new", b"n"), opq("etc")]],
     {"etc": "dir", "etc/new": "file:n"}),
    ("opaque keeps same-layer subdirectories", [LOWER_ETC, [opq("etc"), d("etc/sub/"), f("etc/sub/y", b"y")]],
     {"etc": "dir", "etc/sub": "dir", "etc/sub/y": "file:y"}),
    ("opaque root", [LOWER_ETC, [opq("."), f("only", b"o")]], {"only": "file:o"}),
    ("whiteout does not hide its own layer (after)", [[f("a", b"1")], [f("a", b"2"), wh("a")]], {"a": "file:2"}),
    ("whiteout does not hide its own layer (before)", [[f("a", b"1")], [wh("a"), f("a", b"2")]], {"a": "file:2"}),
    ("deleted then re-created in a later layer", [[f("a", b"1")], [wh("a")], [f("a", b"3")]], {"a": "file:3"}),
    ("re-created directory does not bring back its children",
     [LOWER_ETC, [wh("etc")], [d("etc/"), f("etc/new", b"n")]], {"etc": "dir", "etc/new": "file:n"}),
    ("file becomes directory", [[f("x", b"1")], [d("x/"), f("x/y", b"y")]], {"x": "dir", "x/y": "file:y"}),
    ("directory becomes file", [LOWER_ETC, [f("etc", b"e")]], {"etc": "file:e"}),
    ("directory becomes symlink", [LOWER_ETC, [sym("etc", "/other")]], {"etc": "link->/other"}),
    ("symlink becomes directory", [[sym("x", "/y")], [d("x/"), f("x/z", b"z")]], {"x": "dir", "x/z": "file:z"}),
    ("whiteout of a name that never existed", [[f("a", b"1")], [wh("ghost")]], {"a": "file:1"}),
    ("markers below a file change nothing", [[f("a", b"1")], [wh("a/none"), opq("a/b"), opq("a")]],
     {"a": "file:1"}),
    ("opaque marker of a missing directory creates it", [[f("x")], [opq("new")]], {"x": "file:", "new": "dir"}),
    ("whiteout in a missing directory leaves the directory", [[f("a", b"1")], [wh("new/x")]],
     {"a": "file:1", "new": "dir"}),
    ("parents without headers", [[f("a/b/c", b"c")]], {"a": "dir", "a/b": "dir", "a/b/c": "file:c"}),
    ("same path twice in one layer: last wins", [[f("a", b"1"), f("a", b"2")]], {"a": "file:2"}),
    ("directory then file at one path in one layer", [[d("a/"), f("a/x", b"x"), f("a", b"2")]], {"a": "file:2"}),
    ("./ prefixes and trailing slashes", [[d("./etc/"), f("./etc/hosts", b"h")], [f("etc//hosts2", b"2")]],
     {"etc": "dir", "etc/hosts": "file:h", "etc/hosts2": "file:2"}),
    ("AUFS metadata never shown", [[d(".wh..wh.plnk/"), f(".wh..wh.plnk/1.2", b"p"), f(".wh..wh.aufs"), f("a")]],
     {"a": "file:"}),
    (".wh.-prefixed parents never shown", [[d(".wh.dir/"), f(".wh.dir/x", b"x"), f("a")]], {"a": "file:"}),
    ("hardlink survives whiteout of its target", [[f("a", b"1"), hl("b", "a")], [wh("a")]], {"b": "file:1"}),
    ("hardlink keeps old bytes when its target is replaced", [[f("a", b"1"), hl("b", "a")], [f("a", b"2")]],
     {"a": "file:2", "b": "file:1"}),
    ("hardlink to a lower layer's file", [[f("a", b"1")], [hl("b", "a")]], {"a": "file:1", "b": "file:1"}),
]  # fmt: skip


@pytest.mark.parametrize(("layers", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_merge_rules(layers: list, expected: dict[str, str]) -> None:
    assert visible(*layers) == expected


def test_seed_issue_tree() -> None:
    """google/crfs: "Whiteouts don't work with overlayfs" — the merged /etc it expects."""
    lower = [d("etc/"), *(f(f"etc/{n}") for n in ("group", "hostname", "hosts", "localtime", "passwd"))]
    lower += [sym("etc/mtab", "/proc/mounts"), d("etc/network/")]
    lower += [d(f"etc/network/{n}/") for n in ("if-down.d", "if-post-down.d", "if-pre-up.d", "if-up.d")]
    lower += [f("etc/resolv.conf"), f("etc/shadow")]
    upper = [d("etc/"), d("etc/network/"), f("etc/network/newfile"), opq("etc/network"), wh("etc/localtime")]
    seen = visible(lower, upper)
    names = ["group", "hostname", "hosts", "mtab", "network", "network/newfile", "passwd", "resolv.conf", "shadow"]
    assert sorted(seen) == sorted(["etc", *(f"etc/{n}" for n in names)])


def test_a_directory_replaced_by_a_file_mid_layer_takes_its_subtree_with_it() -> None:
    # The merge remembers the last parent directory an entry went into: entries after that
    # directory (or one above it) is replaced must land in the tree, not in what was detached.
    seen = visible([d("a"), f("a/x", b"x"), f("a", b"file"), f("a/y", b"y")])
    assert seen == {"a": "dir", "a/y": "file:y"}
    seen = visible([d("a/b"), f("a/b/x", b"x"), sym("a", "elsewhere"), f("a/b/y", b"y")])
    assert seen == {"a": "dir", "a/b": "dir", "a/b/y": "file:y"}


def test_hardlinks_share_one_inode_and_count_links() -> None:
    tree, _ = merge_tars([f("a", b"1"), hl("b", "a"), hl("c", "a")], [wh("c")])
    a, b = tree.lookup("/a"), tree.lookup("/b")
    assert a.ino == b.ino and a.nlink == 2


def test_escaping_names_are_skipped_with_a_warning() -> None:
    warnings: list[str] = []
    tree, _ = merge_tars([f("../../x", b"evil"), f("/abs", b"a"), hl("h", "../../etc/passwd")], warnings=warnings)
    assert sorted(p for p, _ in tree.items()) == ["", "abs"]
    assert any("escapes" in w for w in warnings) and any("leaves the root" in w for w in warnings)


def test_inode_numbers_are_stable() -> None:
    layers = [LOWER_ETC, [wh("etc/motd"), f("z", b"z")]]
    first, _ = merge_tars(*layers)
    second, _ = merge_tars(*layers)
    assert {p: i.ino for p, i in first.items()} == {p: i.ino for p, i in second.items()}


# --- Property test: random layer stacks against a flat reference model -----------------

NAMES = ["a", "b", "c"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)


@dataclass(eq=False)
class ModelEntry:
    """A layer entry for the engine: what the merge needs, plus a token to trace it."""

    path: str
    is_dir: bool = False
    hardlink_to: str | None = None
    token: int = 0
    kind: str = "file"  # file | dir | hardlink | whiteout | opaque


@st.composite
def layer_entries(draw: st.DrawFn) -> list[ModelEntry]:
    entries = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["file", "dir", "hardlink", "whiteout", "opaque"]))
        path = draw(paths)
        token = draw(st.integers(0, 10**9))
        if kind == "whiteout":
            parent, _, name = path.rpartition("/")
            entries.append(ModelEntry(f"{parent}/.wh.{name}" if parent else f".wh.{name}", kind=kind))
        elif kind == "opaque":
            entries.append(ModelEntry(f"{path}/.wh..wh..opq", kind=kind))
        elif kind == "hardlink":
            entries.append(ModelEntry(path, hardlink_to=draw(paths), kind=kind, token=token))
        else:
            entries.append(ModelEntry(path, is_dir=kind == "dir", kind=kind, token=token))
    return entries


@dataclass
class Model:
    """The merged view as a flat {path: (kind, token)} dict; None token: implied dir."""

    paths: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def drop_subtree(self, path: str, keep_self: bool = False) -> None:
        for p in list(self.paths):
            if p.startswith(path + "/") or (p == path and not keep_self):
                del self.paths[p]

    def ensure_dir(self, path: str, replace: bool = True) -> bool:
        """Makes `path` a directory; with replace=False, gives up at a non-directory."""
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix in self.paths and self.paths[prefix][0] != "dir":
                if not replace:
                    return False
                self.drop_subtree(prefix)
            self.paths.setdefault(prefix, ("dir", None))
        return True

    def apply(self, layer: list[ModelEntry]) -> None:
        for e in layer:  # markers act on lower layers only: all of them first
            parent, _, name = e.path.rpartition("/")
            if e.kind == "whiteout" and self.ensure_dir(parent, replace=False):
                self.drop_subtree(f"{parent}/{name[4:]}" if parent else name[4:])
            elif e.kind == "opaque" and self.ensure_dir(parent, replace=False):
                self.drop_subtree(parent, keep_self=True)
        for e in layer:
            if e.kind in ("whiteout", "opaque"):
                continue
            target = self.paths.get(e.hardlink_to or "")
            if e.kind == "hardlink" and (target is None or target[0] == "dir"):
                continue  # a dangling hardlink is skipped whole: it creates no parents either
            self.ensure_dir(e.path.rpartition("/")[0])
            if e.kind == "hardlink" and target is not None:
                self.drop_subtree(e.path)
                self.paths[e.path] = target
            elif e.kind == "dir" and self.paths.get(e.path, ("",))[0] == "dir":
                self.paths[e.path] = ("dir", e.token)
            else:
                self.drop_subtree(e.path)
                self.paths[e.path] = ("dir" if e.kind == "dir" else "file", e.token)


def flatten(root: Node[ModelEntry]) -> dict[str, tuple[str, int | None]]:
    out: dict[str, tuple[str, int | None]] = {}
    stack = [("", root)]
    while stack:
        path, node = stack.pop()
        for name, child in (node.children or {}).items():
            full = f"{path}/{name}" if path else name
            out[full] = ("dir" if child.is_dir else "file", child.entry.token if child.entry else None)
            stack.append((full, child))
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(layer_entries(), min_size=1, max_size=4))
def test_engine_matches_reference_model(layers: list[list[ModelEntry]]) -> None:
    model = Model()
    for layer in layers:
        model.apply(layer)
    assert flatten(merge_layers(layers)) == model.paths
