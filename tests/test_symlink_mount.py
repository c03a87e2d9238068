"""Parents through symlinks, through a real mount, against `umoci raw unpack` of the same image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ImageWriter, Mounter
from tests.test_mount import umoci_unpack, umoci_view
from tests.test_whiteout import SYMLINK_CASES
from tests.tree_walk import describe_tree

AGREED = [c for c in SYMLINK_CASES if c[3]]
REFUSED = [c for c in SYMLINK_CASES if not c[3]]


@pytest.mark.parametrize(("name", "layers", "expected"), [c[:3] for c in AGREED], ids=[c[0] for c in AGREED])
def test_parents_through_symlinks_match_umoci(
    name: str, layers: list, expected: dict[str, str], oci_image: ImageWriter, mount: Mounter, umoci: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    image = oci_image(*layers)
    mounted = describe_tree(mount(image), skip_dir_mtime=True)
    assert sorted(mounted) == sorted(expected)
    assert mounted == umoci_view(umoci_unpack(umoci, image, tmp_path / "rootfs"))


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
