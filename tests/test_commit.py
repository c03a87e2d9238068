"""`crfs-merge commit --upper DIR IMAGE DEST` (issue 10, first part): an upper directory in
OCI diff form, made by hand on disk, becomes one more layer of a new image.

The expected result is the same image with a hand-written layer (tests/tarvocab.py) in
place of DIR: both are mounted read-only and compared entry by entry, and `umoci raw
unpack` is the oracle that the committed layer says what the hand-written one says.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from registry.layout_writer import write_layout
from tests.conftest import COMMAND, ImageWriter, Mounter, require
from tests.registry_servers import REGISTRY_BINARY, Registry
from tests.tarvocab import MTIME, Member, d, f, hl, opq, sym, tar_of, wh
from tests.test_mount import umoci_unpack, umoci_view
from tests.tree_walk import describe_tree
from unionfs.upper.diff import OverrideStat, UpperDirError, parse_override_stat, upper_members, write_layer_tar

OVERRIDE = "user.containers.override_stat"
ME = {"uid": os.getuid(), "gid": os.getgid()}
OTHER = 1000 if os.getuid() == 0 else os.getuid()  # the on-disk owner an override replaces

LOWER = [
    d("etc/"), f("etc/hosts", b"lower hosts"), f("etc/motd", b"motd"),
    d("var/"), d("var/cache/"), f("var/cache/old", b"old"), d("var/cache/sub/"), f("var/cache/sub/x", b"x"),
    d("opt/"), d("opt/tool/"), f("opt/tool/bin", b"bin"),
    d("usr/"), f("usr/keep", b"keep"),
]  # fmt: skip

# What DIR below says, written as a layer by hand.
EXPECTED_UPPER = [
    wh("opt"),
    d("dev/", **ME), Member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
    d("etc/", **ME), wh("etc/motd"), f("etc/hosts", b"upper hosts", uid=0, gid=0),
    d("links/", **ME), f("links/a", b"pair", **ME), hl("links/b", "links/a", **ME), sym("links/s", "a", **ME),
    f("new.txt", b"new", xattrs={"user.note": "hello"}, **ME),
    d("usr/", **ME), d("usr/sbin/", **ME), f("usr/sbin/tool", b"tool", mode=0o4755, uid=1234, gid=1234),
    d("var/", **ME), d("var/cache/", **ME), opq("var/cache/"), f("var/cache/fresh", b"fresh", **ME),
]  # fmt: skip


def make_upper(root: Path) -> Path:
    """Writes on disk the upper directory that EXPECTED_UPPER describes; returns it."""
    for directory in ("dev", "etc", "links", "usr/sbin", "var/cache"):
        (root / directory).mkdir(parents=True)
    files = {"etc/hosts": b"upper hosts", "etc/.wh.motd": b"", ".wh.opt": b"", "links/a": b"pair",
             "new.txt": b"new", "usr/sbin/tool": b"tool", "var/cache/.wh..wh..opq": b"",
             "var/cache/fresh": b"fresh", "dev/null": b""}  # fmt: skip
    for name, data in files.items():
        (root / name).write_bytes(data)
        os.chmod(root / name, 0o644)
    os.link(root / "links/a", root / "links/b")
    os.symlink("a", root / "links/s")
    os.setxattr(root / "new.txt", "user.note", b"hello")
    # Owned on disk by someone else than the override says: the override wins.
    os.chown(root / "etc/hosts", OTHER, OTHER)
    os.setxattr(root / "etc/hosts", OVERRIDE, b"0:0:0644")
    os.setxattr(root / "dev/null", OVERRIDE, b"0:0:0666:char-1-3")
    os.chmod(root / "usr/sbin/tool", 0o755)  # setuid for uid 1234: only the override can say so
    os.setxattr(root / "usr/sbin/tool", OVERRIDE, b"1234:1234:4755")
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # children before parents
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return root


def commit(upper: Path, image: str, dest: str, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "commit", "--cache-dir", str(tmp_path / "commit-cache"), "--upper", str(upper),
                           *options, image, dest], capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture
def lower(oci_image: ImageWriter) -> str:
    return oci_image(LOWER)


@pytest.fixture
def expected(tmp_path: Path) -> str:
    root = tmp_path / "expected"
    write_layout(root, [tar_of(*LOWER), tar_of(*EXPECTED_UPPER)])
    return f"oci:{root}:latest"


@pytest.fixture
def committed(lower: str, tmp_path: Path) -> str:
    upper = make_upper(tmp_path / "upper")
    dest = f"oci:{tmp_path / 'dest'}:v1"
    run = commit(upper, lower, dest, tmp_path, "-m", "hand-made upper")
    assert run.returncode == 0, run.stderr
    return dest


# --- the committed image --------------------------------------------------------------------


def test_the_committed_image_mounts_as_the_expected_merge(committed: str, expected: str, mount: Mounter) -> None:
    view = describe_tree(mount(committed))
    assert view == describe_tree(mount(expected))
    # The rows that say the override, whiteouts and opaque marker were read as meant:
    assert view["etc/hosts"][1:3] == (0, 0) and view["usr/sbin/tool"][0] & 0o7777 == 0o4755
    assert view["usr/sbin/tool"][1] == 1234 and view["dev/null"][5] == "dev 1,3"
    assert "etc/motd" not in view and "opt" not in view and "var/cache/old" not in view
    assert view["links/a"][7] == ("links/a", "links/b") and view["links/s"][5] == "-> a"
    assert ("user.note", b"hello") in view["new.txt"][6] and not any(OVERRIDE in str(r[6]) for r in view.values())


def test_umoci_unpacks_the_committed_image_as_the_expected_one(
    committed: str, expected: str, umoci: str, mount: Mounter, tmp_path: Path
) -> None:
    require(os.geteuid() == 0, "umoci makes device nodes and other owners only as root")
    unpacked = umoci_view(umoci_unpack(umoci, committed, tmp_path / "u1"))
    assert unpacked == umoci_view(umoci_unpack(umoci, expected, tmp_path / "u2"))
    assert unpacked["usr/sbin/tool"][:3] == (0o104755, 1234, 1234) and "var/cache/old" not in unpacked
    assert umoci_view(mount(committed)) == unpacked


def _layout_image(root: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((root / "index.json").read_text())
    [descriptor] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    manifest = json.loads(_blob(root, descriptor["digest"]))
    return manifest, json.loads(_blob(root, manifest["config"]["digest"]))


def _blob(root: Path, digest: str) -> bytes:
    return (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_config_and_manifest_gain_one_verified_layer(committed: str, lower: str) -> None:
    lower_manifest, lower_config = _layout_image(Path(lower.split(":")[1]), "latest")
    root = Path(committed.split(":")[1])
    manifest, config = _layout_image(root, "v1")
    assert manifest["layers"][:-1] == lower_manifest["layers"]  # IMAGE's layers unchanged
    new = manifest["layers"][-1]
    blob = _blob(root, new["digest"])
    assert new["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert _sha(blob) == new["digest"] and len(blob) == new["size"]
    assert config["rootfs"]["diff_ids"] == [*lower_config["rootfs"]["diff_ids"], _sha(gzip.decompress(blob))]
    assert len(config["history"]) == len(config["rootfs"]["diff_ids"])
    assert config["history"][-1]["created_by"] == "crfs-merge commit"
    assert config["history"][-1]["comment"] == "hand-made upper"
    assert config["architecture"] == lower_config["architecture"] and config["os"] == lower_config["os"]


@pytest.mark.parametrize("compression", ["zstd", "estargz"])
def test_zstd_and_estargz_layers_mount_alike(
    compression: str, committed: str, lower: str, mount: Mounter, tmp_path: Path
) -> None:
    dest = f"oci:{tmp_path / 'dest'}:{compression}"  # the same layout gains a tag
    run = commit(tmp_path / "upper", lower, dest, tmp_path, "--compression", compression)
    assert run.returncode == 0, run.stderr
    assert describe_tree(mount(dest)) == describe_tree(mount(committed))
    manifest, config = _layout_image(tmp_path / "dest", compression)
    new = manifest["layers"][-1]
    blob = _blob(tmp_path / "dest", new["digest"])
    assert _sha(blob) == new["digest"]
    if compression == "zstd":
        assert new["mediaType"].endswith("+zstd")
        tar = zstandard.ZstdDecompressor().stream_reader(blob).read()
    else:
        assert "containerd.io/snapshot/stargz/toc.digest" in new["annotations"]
        tar = gzip.decompress(blob)
    assert _sha(tar) == config["rootfs"]["diff_ids"][-1]


def test_commit_pushes_to_a_registry(lower: str, mount: Mounter, tmp_path: Path) -> None:
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    (tmp_path / "registry").mkdir()
    registry = Registry(tmp_path / "registry")
    try:
        dest = f"{registry.host}/committed/image:v1"
        run = commit(make_upper(tmp_path / "upper"), lower, dest, tmp_path)
        assert run.returncode == 0, run.stderr
        assert not list((tmp_path / "commit-cache").glob("commit-*"))  # the staging layout is gone
        local = f"oci:{tmp_path / 'local'}:v1"
        assert commit(tmp_path / "upper", lower, local, tmp_path).returncode == 0
        assert describe_tree(mount(dest)) == describe_tree(mount(local))
        # A registry IMAGE: its blobs, which the cache does not keep, go into DEST as they are.
        (tmp_path / "empty").mkdir()
        again = f"oci:{tmp_path / 'again'}:v2"
        run = commit(tmp_path / "empty", dest, again, tmp_path)
        assert run.returncode == 0, run.stderr
        pushed, _ = _layout_image(tmp_path / "local", "v1")
        manifest, _ = _layout_image(tmp_path / "again", "v2")
        assert [m["digest"] for m in manifest["layers"][:-1]] == [m["digest"] for m in pushed["layers"]]
        assert describe_tree(mount(again)) == describe_tree(mount(local))
    finally:
        registry.stop()


# --- refusals -----------------------------------------------------------------------------


def _refused(run: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert run.returncode == status, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr
    assert all(word in run.stderr for word in words), run.stderr


def test_refusals_are_one_line(lower: str, tmp_path: Path) -> None:
    dest = f"oci:{tmp_path / 'dest'}"
    _refused(commit(tmp_path / "missing", lower, dest, tmp_path), 1, "missing")
    (tmp_path / "a-file").write_text("")
    _refused(commit(tmp_path / "a-file", lower, dest, tmp_path), 1, "not a directory")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / ".wh.etc").write_text("not empty")
    _refused(commit(upper, lower, dest, tmp_path), 1, ".wh.etc", "empty")
    (upper / ".wh.etc").write_text("")
    (upper / "etc").mkdir()
    _refused(commit(upper, lower, dest, tmp_path), 1, ".wh.etc", "'etc'")
    shutil.rmtree(upper / "etc")
    (upper / "x").write_text("")
    os.setxattr(upper / "x", OVERRIDE, b"root:0:0644")
    _refused(commit(upper, lower, dest, tmp_path), 1, "x", "override_stat")
    os.removexattr(upper / "x", OVERRIDE)
    _refused(commit(upper, lower, "docker-archive:/tmp/x.tar", tmp_path), 1, "OCI layout")
    _refused(commit(upper, f"oci:{tmp_path / 'no-image'}", dest, tmp_path), 1)
    run = subprocess.run([*COMMAND, "commit", lower, dest], capture_output=True, text=True)
    assert run.returncode == 2 and "--upper" in run.stderr
    assert not (tmp_path / "dest" / "index.json").exists()  # nothing was tagged


# --- pure units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:0:755", OverrideStat(0, 0, 0o755)),
        ("1000:100:04755", OverrideStat(1000, 100, 0o4755)),
        ("0:0:0644:file", OverrideStat(0, 0, 0o644, "file")),
        ("0:6:0660:block-8-1", OverrideStat(0, 6, 0o660, "block", 8, 1)),
        ("0:0:0666:char-1-3\0", OverrideStat(0, 0, 0o666, "char", 1, 3)),
        ("0:0:0644:pipe", OverrideStat(0, 0, 0o644, "pipe")),
    ],
)
def test_override_stat_parses(text: str, expected: OverrideStat) -> None:
    assert parse_override_stat(text) == expected


@pytest.mark.parametrize("text", ["", "0:0", "a:0:0644", "0:0:0899", "0:0:0644:tape", "0:0:0644:char-1",
                                  "0:0:170644", "-1:0:0644", "0:0:0644:dir-1-2", "0:0:0644:file:extra"])  # fmt: skip
def test_override_stat_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_override_stat(text)


def _rows(root: Path, warnings: list[str]) -> list[tuple[object, ...]]:
    rows = []
    for m in upper_members(str(root), warnings.append):
        i = m.info
        rows.append((i.name, i.type, i.uid, i.mode, i.size, i.linkname, i.devmajor, i.devminor, i.mtime,
                     {k: v for k, v in i.pax_headers.items()}))  # fmt: skip
    return rows


def test_the_walk_yields_sorted_members(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    os.mkfifo(upper / "fifo")
    os.utime(upper / "fifo", (MTIME, MTIME))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(upper / "sock"))
        warnings: list[str] = []
        rows = _rows(upper, warnings)
    me = os.getuid()
    r, dr, ln, sl = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
    ch, ff = tarfile.CHRTYPE, tarfile.FIFOTYPE
    assert rows == [
        (".wh.opt", r, 0, 0o644, 0, "", 0, 0, MTIME, {}),
        ("dev", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("dev/null", ch, 0, 0o666, 0, "", 1, 3, MTIME, {}),
        ("etc", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("etc/.wh.motd", r, 0, 0o644, 0, "", 0, 0, MTIME, {}),
        ("etc/hosts", r, 0, 0o644, 11, "", 0, 0, MTIME, {}),
        ("fifo", ff, me, rows[6][3], 0, "", 0, 0, MTIME, {}),
        ("links", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("links/a", r, me, 0o644, 4, "", 0, 0, MTIME, {}),
        ("links/b", ln, me, 0o644, 0, "links/a", 0, 0, MTIME, {}),
        ("links/s", sl, me, 0o777, 0, "a", 0, 0, MTIME, {}),
        ("new.txt", r, me, 0o644, 3, "", 0, 0, MTIME, {"SCHILY.xattr.user.note": "hello"}),
        ("usr", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("usr/sbin", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("usr/sbin/tool", r, 1234, 0o4755, 4, "", 0, 0, MTIME, {}),
        ("var", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("var/cache", dr, me, 0o755, 0, "", 0, 0, MTIME, {}),
        ("var/cache/.wh..wh..opq", r, 0, 0o644, 0, "", 0, 0, MTIME, {}),
        ("var/cache/fresh", r, me, 0o644, 5, "", 0, 0, MTIME, {}),
    ]
    assert len(warnings) == 1 and "sock" in warnings[0] and "skipped" in warnings[0]


def test_the_walk_refuses_what_no_layer_can_say(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dir").mkdir()
    os.setxattr(tmp_path / "d" / "dir", OVERRIDE, b"0:0:0755:file")
    with pytest.raises(UpperDirError, match="says file"):
        list(upper_members(str(tmp_path / "d"), print))
    with pytest.raises(UpperDirError, match="missing"):
        list(upper_members(str(tmp_path / "none"), print))


def test_the_same_directory_gives_the_same_layer(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    first, second = io.BytesIO(), io.BytesIO()
    write_layer_tar(str(upper), first, print)
    os.utime(upper / "new.txt")  # atime and mtime move; then back: only the layer's inputs count
    os.utime(upper / "new.txt", (MTIME, MTIME))
    write_layer_tar(str(upper), second, print)
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as archive:
        assert archive.getmember("etc/hosts").uname == "" and archive.getmember("new.txt").pax_headers[
            "SCHILY.xattr.user.note"] == "hello"  # fmt: skip
