"""--export writes the same merged tree as the mount, for machines without FUSE."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

from tests.conftest import COMMAND, ImageWriter, Mounter
from tests.tarvocab import d, f, hl, opq, sym, wh
from tests.tree_walk import describe_tree

LOWER = [d("etc/"), f("etc/a", b"a", mode=0o600, uid=7, gid=8), f("etc/b", b"b"), hl("etc/c", "etc/a"),
         sym("etc/l", "a"), d("var/cache/"), f("var/cache/x", b"x")]  # fmt: skip
UPPER = [wh("etc/b"), opq("var/cache"), f("var/cache/y", b"y", xattrs={"user.k": "v"})]


def _export(image: str, dest: Path, tmp_path: Path) -> None:
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), "--export", str(dest), image],
                   check=True, capture_output=True, timeout=60)  # fmt: skip


def test_directory_export_equals_the_mount(oci_image: ImageWriter, mount: Mounter, tmp_path: Path) -> None:
    image = oci_image(LOWER, UPPER)
    _export(image, tmp_path / "out", tmp_path)
    exported = describe_tree(tmp_path / "out", skip_dir_mtime=True)
    assert exported == describe_tree(mount(image), skip_dir_mtime=True)
    assert exported["etc/a"][-1] == ("etc/a", "etc/c")


def test_tar_export_lists_the_merged_tree(oci_image: ImageWriter, tmp_path: Path) -> None:
    _export(oci_image(LOWER, UPPER), tmp_path / "out.tar", tmp_path)
    with tarfile.open(tmp_path / "out.tar") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == ["etc", "etc/a", "etc/c", "etc/l", "var", "var/cache", "var/cache/y"]
        assert members["etc/c"].islnk() and members["etc/c"].linkname == "etc/a"
        assert (members["etc/a"].uid, members["etc/a"].mode) == (7, 0o600)
        assert members["var/cache/y"].pax_headers["SCHILY.xattr.user.k"] == "v"
        assert archive.extractfile("var/cache/y").read() == b"y"  # type: ignore[union-attr]


def test_export_refuses_a_non_empty_directory(oci_image: ImageWriter, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("mine")
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--export", str(tmp_path / "busy"),
                          oci_image(LOWER)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and "not empty" in run.stderr
    assert (tmp_path / "busy" / "keep").read_text() == "mine"
