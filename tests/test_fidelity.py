"""Fidelity corners through a real mount: parents through symlinks that umoci refuses (those it
agrees on are rows of tests/test_mount.py's umoci comparison), empty PAX xattrs, dir: images."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import COMMAND, ImageWriter, Mounter, require
from tests.tarvocab import d, f, hl, sym, tar_of, wh
from tests.test_whiteout import SYMLINK_CASES
from tests.tree_walk import describe_tree
from unionfs.estargz.toc import FOOTER_SIZE, parse_footer, parse_toc, read_toc_member
from unionfs.estargz.writer import write_estargz
from unionfs.storage.tar_index import index_tar

RICH = [
    [d("etc/"), f("etc/hosts", b"h", uid=7, mode=0o600), f("etc/motd", b"m"), sym("etc/mtab", "/proc/mounts"),
     f("x", b"xattr", xattrs={"user.a": "b"}), hl("etc/hosts2", "etc/hosts")],
    [wh("etc/motd"), f("var/log", b"log")],
]  # fmt: skip
REFUSED = [c for c in SYMLINK_CASES if not c[3]]


@pytest.mark.parametrize(("name", "layers", "expected"), [c[:3] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_parents_umoci_refuses_skip_only_the_entry(
    name: str, layers: list, expected: dict[str, str], oci_image: ImageWriter, mount: Mounter, umoci: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A link to a file (ENOTDIR) or a loop (ELOOP) stops umoci's unpack, as it stops
    containerd's: the mount keeps the rest of the layer and leaves the entry out."""
    image = oci_image(*layers)
    root = mount(image)
    assert sorted(describe_tree(root)) == sorted(expected)
    assert os.path.islink(root / "p") or os.path.islink(root / "a")
    _, path, tag = image.split(":")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run = subprocess.run([umoci, "raw", "unpack", *rootless, "--image", f"{path}:{tag}", str(tmp_path / "rootfs")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0, "umoci unpacked what containerd refuses"


# POSIX says an empty pax value deletes the keyword, and Go's deprecated Header.Xattrs
# drops it (umoci 0.4.7 reads that field: no xattr). But containerd and docker set every
# SCHILY.xattr.* of Header.PAXRecords, which keeps the empty value: containerd 1.6.20
# (native and overlayfs snapshotters alike) unpacks this file with `user.empty` = b''.
# The mount shows what `docker run` shows.
EMPTY_XATTR = [f("e", b"e", xattrs={"user.empty": "", "user.full": "v"})]
XATTRS = {"user.empty": b"", "user.full": b"v"}


def test_an_empty_pax_xattr_is_an_empty_xattr_in_both_indexes() -> None:
    tar = tar_of(*EMPTY_XATTR)
    (entry,) = index_tar(io.BytesIO(tar), len(tar), 0, print)
    assert dict(entry.xattrs) == XATTRS
    out = io.BytesIO()
    write_estargz(io.BytesIO(tar), out)
    blob = out.getvalue()
    found = parse_footer(blob[-FOOTER_SIZE:])
    assert found is not None
    toc = parse_toc(read_toc_member(blob[found.toc_offset : -found.size]), 0, found.toc_offset)
    assert [dict(e.xattrs) for e in toc.entries if e.path == "e"] == [XATTRS]


def test_an_empty_pax_xattr_is_listed_and_reads_empty(oci_image: ImageWriter, mount: Mounter) -> None:
    root = mount(oci_image(EMPTY_XATTR))
    assert sorted(os.listxattr(root / "e")) == sorted(XATTRS)
    assert {name: os.getxattr(root / "e", name) for name in XATTRS} == XATTRS


def test_a_skopeo_dir_image_mounts_exports_and_converts_like_its_layout(
    oci_image: ImageWriter, mount: Mounter, tmp_path: Path
) -> None:
    skopeo = shutil.which("skopeo")
    require(skopeo is not None, "skopeo is missing (apt-get install skopeo)")
    layout = oci_image(*RICH)
    copied = tmp_path / "dir-image"
    subprocess.run([str(skopeo), "copy", "--insecure-policy", layout, f"dir:{copied}"], check=True, capture_output=True)
    expected = describe_tree(mount(layout))
    assert describe_tree(mount(f"dir:{copied}")) == expected
    assert describe_tree(mount(str(copied))) == expected  # a bare path: told apart from a layout
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for command in (
        [*cache, "--export", str(tmp_path / "exported"), f"dir:{copied}"],
        ["convert", *cache, f"dir:{copied}", f"oci:{tmp_path / 'converted'}:esgz"],
    ):
        run = subprocess.run([*COMMAND, *command], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    assert describe_tree(tmp_path / "exported") == expected
    assert describe_tree(mount(f"oci:{tmp_path / 'converted'}:esgz")) == expected
