"""Fixtures: real FUSE mounts through the installed command, and image builders.

Tests that need FUSE or a tool fail (not skip) when CI=true and it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from registry.media_types import Compression
from tests.tarvocab import Member, tar_of
from unionfs.fuse import libfuse

IN_CI = os.environ.get("CI", "").lower() == "true"
COMMAND = [sys.executable, "-m", "unionfs.cli"]
MOUNT_TIMEOUT = 60


def require(condition: bool, why: str) -> None:
    """Fails the test under CI, skips it elsewhere, unless `condition` holds."""
    if not condition:
        (pytest.fail if IN_CI else pytest.skip)(why)


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Sends the servers' log file and mountpoint locks ($XDG_STATE_HOME/crfs-merge) to a
    directory of the test run's own, not the user's ~/.local/state."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(scope="session")
def fuse_works() -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    require(shutil.which("fusermount3") is not None, "fusermount3 is missing (apt-get install fuse3)")
    require(libfuse.locate() is not None, libfuse.INSTALL_HINT)


@pytest.fixture(scope="session")
def umoci() -> str:
    path = shutil.which("umoci")
    require(path is not None, "umoci is missing (apt-get install umoci)")
    return str(path)


def unmount(mountpoint: Path) -> None:
    """Unmounts if mounted; lazily as a last resort so a failing test never leaves a mount."""
    if not os.path.ismount(mountpoint):
        return
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


Mounter = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path, fuse_works: None) -> Iterator[Mounter]:
    """Returns mount(image_ref, *options) -> mountpoint, through `crfs-merge IMAGE DIR`."""
    mounted: list[Path] = []

    def do_mount(image: str, *options: str, cache: Path | None = None) -> Path:
        mountpoint = tmp_path / f"mnt{len(mounted)}"
        mountpoint.mkdir()
        cache_dir = cache or tmp_path / "cache"
        run = subprocess.run([*COMMAND, "--cache-dir", str(cache_dir), *options, image, str(mountpoint)],
                             capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip
        assert run.returncode == 0, f"mount failed: {run.stderr}"
        assert os.path.ismount(mountpoint)
        mounted.append(mountpoint)
        return mountpoint

    yield do_mount
    for mountpoint in mounted:
        unmount(mountpoint)


ImageWriter = Callable[..., str]


@pytest.fixture
def oci_image(tmp_path: Path) -> ImageWriter:
    """Returns write(*layers, compression=..., tag=..., history=...) -> 'oci:PATH:TAG' of a new
    layout; `history` is the config's history list."""
    count = 0

    def write(*layers: list[Member], compression: Compression = Compression.GZIP, tag: str = "latest",
              history: list[dict[str, object]] | None = None) -> str:  # fmt: skip
        nonlocal count
        count += 1
        root = tmp_path / f"image{count}"
        write_layout(root, [tar_of(*layer) for layer in layers], compression, tag, history=history)
        return f"oci:{root}:{tag}"

    return write
