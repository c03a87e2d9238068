"""The merge rules of image-spec layer.md, case by case, and against a reference model."""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.merge_helpers import merge_tars, visible
from tests.tarvocab import d, f, hl, opq, sym, wh
from whiteout.apply import Node, merge_layers
from whiteout.markers import Marker, classify
from whiteout.paths import clean_path
from whiteout.resolve import MAX_SYMLINKS, TooManySymlinks, resolve_in_root


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


# Parents through symlinks: containerd's applyNaive (fs.RootPath) and umoci (SecureJoin)
# follow them inside the root. (case, layers, the tree containerd 1.6's native snapshotter
# unpacked, seen for the first eleven; True if umoci 0.4.7 unpacks the same tree.)
LOWER_REAL = [d("real/"), f("real/x", b"x"), f("real/y", b"y"), sym("p", "real")]
REAL = {"real": "dir", "real/x": "file:x", "real/y": "file:y", "p": "link->real"}
SYMLINK_CASES = [
    ("entry below a link lands in its target", [LOWER_REAL, [f("p/c", b"c")]], {**REAL, "real/c": "file:c"}, True),
    ("merged /usr: absolute target",
     [[d("usr/lib/"), f("usr/lib/l", b"l"), sym("lib", "/usr/lib")], [f("lib/n", b"n")]],
     {"usr": "dir", "usr/lib": "dir", "usr/lib/l": "file:l", "usr/lib/n": "file:n", "lib": "link->/usr/lib"}, True),
    ("'..' stops at the root", [[d("real/"), sym("a/p", "../../../real")], [f("a/p/c", b"c")]],
     {"a": "dir", "a/p": "link->../../../real", "real": "dir", "real/c": "file:c"}, True),
    ("whiteout below a link", [LOWER_REAL, [wh("p/x")]], {k: v for k, v in REAL.items() if k != "real/x"}, True),
    ("opaque marker below a link", [LOWER_REAL, [opq("p"), f("p/new", b"n")]],
     {"p": "link->real", "real": "dir", "real/new": "file:n"}, True),
    ("hardlink target through a link", [LOWER_REAL, [hl("h", "p/x")]], {**REAL, "h": "file:x"}, True),
    ("an entry at the link's own path replaces it", [LOWER_REAL, [f("p", b"file")]], {**REAL, "p": "file:file"}, True),
    ("link made earlier in the same layer", [[d("real/")], [sym("p", "real"), f("p/c", b"c")]],
     {"real": "dir", "p": "link->real", "real/c": "file:c"}, True),
    ("directory header at a link's path replaces it", [LOWER_REAL, [d("p/"), f("p/c", b"c")]],
     {**REAL, "p": "dir", "p/c": "file:c"}, True),
    ("link to a file: the entry is skipped", [[f("t", b"t"), sym("p", "t")], [f("p/c", b"c"), f("z", b"z")]],
     {"t": "file:t", "p": "link->t", "z": "file:z"}, False),
    ("symlink loop: the entry is skipped", [[sym("a", "b"), sym("b", "a")], [f("a/c", b"c"), f("z", b"z")]],
     {"a": "link->b", "b": "link->a", "z": "file:z"}, False),
    ("chain of links, absolute and relative", [[d("r/s/"), sym("q", "/r/s"), sym("p", "q")], [f("p/c", b"c")]],
     {"r": "dir", "r/s": "dir", "r/s/c": "file:c", "q": "link->/r/s", "p": "link->q"}, True),
    ("dangling link: its target directory is made", [[sym("p", "gone")], [f("p/c", b"c")]],
     {"p": "link->gone", "gone": "dir", "gone/c": "file:c"}, True),
    ("link to the root", [[sym("p", "/"), d("etc/")], [f("p/etc/c", b"c")]],
     {"p": "link->/", "etc": "dir", "etc/c": "file:c"}, True),
    ("absolute target with '..' stays inside", [[sym("p", "/../../etc")], [f("p/c", b"c")]],
     {"p": "link->/../../etc", "etc": "dir", "etc/c": "file:c"}, True),
    ("whiteout of the link itself leaves its target", [LOWER_REAL, [wh("p")]],
     {k: v for k, v in REAL.items() if k != "p"}, True),
]  # fmt: skip


@pytest.mark.parametrize(("layers", "expected"), [c[1:3] for c in SYMLINK_CASES], ids=[c[0] for c in SYMLINK_CASES])
def test_parents_through_symlinks(layers: list, expected: dict[str, str]) -> None:
    assert visible(*layers) == expected


@pytest.mark.parametrize(
    ("layers", "warning"),
    [
        ([[f("t"), sym("p", "t")], [f("p/c")]], "'p/c': parent 'p' leads through a symlink to 't', which is no"),
        ([[sym("a", "b"), sym("b", "a")], [f("a/c")]], "'a/c': a symlink loop in 'a' (more than 255 links)"),
        ([[sym("a", "a")], [wh("a/x")]], "'a/.wh.x': a symlink loop in 'a' (more than 255 links), marker ignored"),
        ([[sym("a", "a")], [opq("a")]], "'a/.wh..wh..opq': a symlink loop in 'a' (more than 255 links), marker"),
        ([[sym("a", "a")], [hl("h", "a/x")]], "hardlink 'h' -> 'a/x': no such file, entry skipped"),
    ],
)
def test_unresolvable_parents_are_skipped_with_a_warning(layers: list, warning: str) -> None:
    warnings: list[str] = []
    merge_tars(*layers, warnings=warnings)
    assert any(warning in w for w in warnings), warnings


LINKS = {"p": "real", "abs": "/usr/lib", "up": "../../x", "chain": "p/sub", "self": "self/a", "a": "b", "b": "a",
         "dot": "a/../real", "root": "/", "d/f": "z/../real"}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "resolved", "followed"),
    [
        ("", "", 0),
        ("real/c", "real/c", 0),
        ("p", "real", 1),
        ("p/c/d", "real/c/d", 1),
        ("abs/x", "usr/lib/x", 1),
        ("up/y", "x/y", 1),
        ("chain/c", "real/sub/c", 2),
        ("root/etc", "etc", 1),
        # fs.RootPath's corners: a relative target is joined and cleaned lexically ('z/..'
        # and 'a/..' vanish unseen) unless the link is all there is: then its raw target is
        # walked again, and its first component, 'a', is followed (to 'b', which '..' drops).
        ("d/f/c", "d/real/c", 1),
        ("dot/c", "real/c", 1),
        ("dot", "real", 2),
    ],
)
def test_resolve_in_root(path: str, resolved: str, followed: int) -> None:
    assert resolve_in_root(path, LINKS.get) == (resolved, followed)


@pytest.mark.parametrize("path", ["a/x", "self/x", "b"])
def test_resolve_in_root_gives_up_on_loops(path: str) -> None:
    with pytest.raises(TooManySymlinks):
        resolve_in_root(path, LINKS.get)


def test_resolve_in_root_follows_255_links_and_no_more() -> None:
    def chain(length: int) -> dict[str, str]:
        return {f"l{n}": f"l{n + 1}" if n + 1 < length else "end" for n in range(length)}

    assert resolve_in_root("l0/c", chain(MAX_SYMLINKS).get) == ("end/c", MAX_SYMLINKS)
    with pytest.raises(TooManySymlinks):
        resolve_in_root("l0/c", chain(MAX_SYMLINKS + 1).get)


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
    # A symlink replacing the directory takes its subtree too; a later entry below it goes
    # through the link, as containerd extracts it (native and overlayfs snapshotters alike).
    seen = visible([d("a/b"), f("a/b/x", b"x"), sym("a", "elsewhere"), f("a/b/y", b"y")])
    assert seen == {"a": "link->elsewhere", "elsewhere": "dir", "elsewhere/b": "dir", "elsewhere/b/y": "file:y"}


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
link_targets = st.one_of(
    st.tuples(st.sampled_from(["", "/", "../", "./", "a/../"]), paths).map("".join),
    st.sampled_from([".", "..", "/", "../.."]),
)


@dataclass(eq=False)
class ModelEntry:
    """A layer entry for the engine: what the merge needs, plus a token to trace it."""

    path: str
    is_dir: bool = False
    hardlink_to: str | None = None
    symlink_to: str | None = None
    token: int = 0
    kind: str = "file"  # file | dir | symlink | hardlink | whiteout | opaque


@st.composite
def layer_entries(draw: st.DrawFn) -> list[ModelEntry]:
    entries = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "whiteout", "opaque"]))
        path = draw(paths)
        token = draw(st.integers(0, 10**9))
        if kind == "whiteout":
            parent, _, name = path.rpartition("/")
            entries.append(ModelEntry(f"{parent}/.wh.{name}" if parent else f".wh.{name}", kind=kind))
        elif kind == "opaque":
            entries.append(ModelEntry(f"{path}/.wh..wh..opq", kind=kind))
        elif kind == "hardlink":
            entries.append(ModelEntry(path, hardlink_to=draw(paths), kind=kind, token=token))
        elif kind == "symlink":
            entries.append(ModelEntry(path, symlink_to=draw(link_targets), kind=kind, token=token))
        else:
            entries.append(ModelEntry(path, is_dir=kind == "dir", kind=kind, token=token))
    return entries


class Loop(Exception):
    pass


def go_clean(path: str) -> str:
    """Go's filepath.Clean: posixpath.normpath, less the two leading slashes it keeps."""
    cleaned = posixpath.normpath(path) if path else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def go_join(*elements: str) -> str:
    """Go's filepath.Join: empty elements vanish, the rest joined by '/' and cleaned."""
    kept = [e for e in elements if e]
    return go_clean("/".join(kept)) if kept else ""


def go_split(path: str) -> tuple[str, str]:
    """Go's filepath.Split: the directory keeps its trailing slash."""
    cut = path.rfind("/") + 1
    return path[:cut], path[cut:]


@dataclass
class Model:
    """The merged view as a flat {path: (kind, token)} dict; None token: implied dir.

    A symlink's kind is 'link:TARGET'. Parents resolve through symlinks by a transcription
    of continuity's fs.RootPath (walkLinks, walkLink: recursive, from the right), which the
    engine does another way (whiteout.resolve: one pass from the left)."""

    paths: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def drop_subtree(self, path: str, keep_self: bool = False) -> None:
        if not path:
            self.paths.clear()
            return
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

    def walk_link(self, path: str, walked: list[int]) -> tuple[str, bool]:
        if walked[0] > 255:
            raise Loop
        path = go_join("/", path)
        if path == "/":
            return path, False
        kind = self.paths.get(path[1:], ("",))[0]
        if not kind.startswith("link:"):
            return path, False
        walked[0] += 1
        return kind[len("link:") :], True

    def walk_links(self, path: str, walked: list[int]) -> str:
        directory, file = go_split(path)
        if directory == "":
            return self.walk_link(file, walked)[0]
        if file == "":
            return directory if directory == "/" else self.walk_links(directory[:-1], walked)
        new_directory = self.walk_links(directory, walked)
        new_path, is_link = self.walk_link(go_join(new_directory, file), walked)
        if not is_link or new_path.startswith("/"):
            return new_path
        return go_join(new_directory, new_path)

    def root_path(self, path: str) -> tuple[str, int] | None:
        """Returns (path resolved, links followed), or None for a loop."""
        walked = [0]
        # A link into itself (a -> a/b) grows the path at each of its 255 turns, and
        # walk_links recurses once per component: allow for that depth.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20_000))
        try:
            while path:
                before = walked[0]
                path = self.walk_links(path, walked)
                if before == walked[0]:
                    rooted = go_join("/", path)
                    if rooted == path:
                        break
                    path = rooted
        except Loop:
            return None
        finally:
            sys.setrecursionlimit(limit)
        return path.lstrip("/"), walked[0]

    def parent_dir(self, path: str, replace: bool) -> str | None:
        """Returns the resolved parent of `path`, made a directory; None if that fails."""
        found = self.root_path(path.rpartition("/")[0])
        if found is None:
            return None
        parent, followed = found
        return parent if self.ensure_dir(parent, replace=replace and not followed) else None

    def apply(self, layer: list[ModelEntry]) -> None:
        for e in layer:  # markers act on lower layers only: all of them first
            if e.kind == "whiteout":
                name = e.path.rpartition("/")[2][len(".wh.") :]
                parent = self.parent_dir(e.path, replace=False)
                if parent is not None:
                    self.drop_subtree(go_join(parent, name))
            elif e.kind == "opaque":
                found = self.root_path(e.path.rpartition("/")[0])
                if found is not None and self.ensure_dir(found[0], replace=False):
                    self.drop_subtree(found[0], keep_self=True)
        for e in layer:
            if e.kind in ("whiteout", "opaque"):
                continue
            target = None
            if e.hardlink_to is not None:
                found = self.root_path(e.hardlink_to.rpartition("/")[0])
                target_path = found and go_join(found[0], e.hardlink_to.rpartition("/")[2])
                target = self.paths.get(target_path) if target_path else None
                if target is None or target[0] == "dir":
                    continue  # a dangling hardlink is skipped whole: it creates no parents either
            parent = self.parent_dir(e.path, replace=True)
            if parent is None:
                continue
            path = go_join(parent, e.path.rpartition("/")[2])
            if target is not None:
                self.drop_subtree(path)
                self.paths[path] = target
            elif e.kind == "dir" and self.paths.get(path, ("",))[0] == "dir":
                self.paths[path] = ("dir", e.token)
            else:
                self.drop_subtree(path)
                kind = f"link:{e.symlink_to}" if e.kind == "symlink" else e.kind
                self.paths[path] = (kind, e.token)


def flatten(root: Node[ModelEntry]) -> dict[str, tuple[str, int | None]]:
    out: dict[str, tuple[str, int | None]] = {}
    stack = [("", root)]
    while stack:
        path, node = stack.pop()
        for name, child in (node.children or {}).items():
            full = f"{path}/{name}" if path else name
            kind = "dir" if child.is_dir else f"link:{child.symlink_to}" if child.symlink_to is not None else "file"
            out[full] = (kind, child.entry.token if child.entry else None)
            stack.append((full, child))
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(layer_entries(), min_size=1, max_size=4))
def test_engine_matches_reference_model(layers: list[list[ModelEntry]]) -> None:
    model = Model()
    for layer in layers:
        model.apply(layer)
    assert flatten(merge_layers(layers)) == model.paths
