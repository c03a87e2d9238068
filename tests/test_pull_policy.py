"""--pull: `missing` (the default, as `docker run` and `podman run`) mounts what the reference
resolved to when a mount last recorded it, asking the registry nothing before ready when the
image is cached; `always` resolves the reference anew. Real registry, real mounts; the
registry is stopped to prove that nothing was asked of it."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from tests.conftest import COMMAND, MOUNT_TIMEOUT, Mounter, require, unmount
from tests.registry_servers import REGISTRY_BINARY, Registry, estargz_layout, skopeo_copy
from tests.tarvocab import d, f, tar_of, wh

BIG = os.urandom(3 * 1024 * 1024)  # chunks of its own: read only when asked for
FIRST = [tar_of(d("etc/"), f("etc/release", b"one\n"), f("etc/gone", b"x"), f("data/big", BIG)),
         tar_of(wh("etc/gone"), f("etc/added", b"upper\n"))]  # fmt: skip
SECOND = [tar_of(d("etc/"), f("etc/release", b"two\n"))]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    (tmp_path / "registry").mkdir()
    served = Registry(tmp_path / "registry")
    yield served
    served.stop()


def _push(tmp_path: Path, registry: Registry, layers: list[bytes], name: str, estargz: bool) -> str:
    """Pushes `layers` (eStargz-converted, or plain gzip) as IMAGE:latest; returns IMAGE:latest."""
    if estargz:
        layout = estargz_layout(tmp_path, layers, name=f"-{name}")
    else:
        layout = tmp_path / f"layout-{name}"
        write_layout(layout, layers, tag="v1")
    image = f"{registry.host}/pull/{'esgz' if estargz else 'gzip'}:latest"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{image}")
    return image


def _entries(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Each entry's mode, size and bytes (not data/big's: reading it would cache its chunks)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            rel = str(path.relative_to(root))
            readable = path.is_file() and not path.is_symlink() and rel != "data/big"
            found[rel] = (info.st_mode, info.st_size, path.read_bytes() if readable else None)
    return found


def _mount(image: str, mountpoint: Path, cache: Path, *options: str) -> subprocess.CompletedProcess[str]:
    mountpoint.mkdir(exist_ok=True)
    return subprocess.run([*COMMAND, "--cache-dir", str(cache), "--tls-verify", "false", "-v", *options, image,
                           str(mountpoint)], capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip


@pytest.mark.parametrize("estargz", [True, False], ids=["estargz", "gzip"])
def test_a_recorded_image_mounts_with_its_registry_stopped(
    estargz: bool, registry: Registry, tmp_path: Path, mount: Mounter
) -> None:
    """The second mount is ready from the record and the cached tree (lazy layers) or tars
    (whole ones) with the registry down; a chunk never fetched reads as EIO, in bounded time;
    `--pull always` fails with one line instead."""
    image = _push(tmp_path, registry, FIRST, "first", estargz)
    first = mount(image, "--tls-verify", "false", "--prefetch", "none")
    expected = _entries(first)
    assert expected["etc/release"][2] == b"one\n" and "etc/gone" not in expected
    unmount(first)
    registry.stop()
    root = tmp_path / "again"
    run = _mount(image, root, tmp_path / "cache", "--prefetch", "none", "--timeout", "1")
    try:
        assert run.returncode == 0, run.stderr
        assert "taken from the cache" in run.stderr
        assert _entries(root) == expected
        started = time.monotonic()
        if estargz:  # never read: its chunks are not cached, and the registry is gone
            with pytest.raises(OSError) as raised:
                (root / "data/big").read_bytes()
            assert raised.value.errno == errno.EIO and time.monotonic() - started < 60
        else:  # fetched whole by the first mount
            assert (root / "data/big").read_bytes() == BIG
    finally:
        unmount(root)
    run = _mount(image, tmp_path / "always", tmp_path / "cache", "--pull", "always", "--timeout", "1")
    assert run.returncode == 1 and not os.path.ismount(tmp_path / "always")
    assert registry.host in run.stderr, run.stderr


def test_a_moved_tag_is_seen_with_pull_always_and_then_recorded(registry: Registry, tmp_path: Path) -> None:
    image = _push(tmp_path, registry, FIRST, "first", estargz=True)
    cache = tmp_path / "cache"
    seen = []
    for step, options in enumerate([(), "move", (), ("--pull", "always"), ()]):
        if options == "move":
            _push(tmp_path, registry, SECOND, "second", estargz=True)
            continue
        root = tmp_path / f"m{step}"
        run = _mount(image, root, cache, *options)
        assert run.returncode == 0, run.stderr
        try:
            seen.append((root / "etc/release").read_bytes())
        finally:
            unmount(root)
    # missing keeps what was recorded; always finds the moved tag and records it for the next
    assert seen == [b"one\n", b"one\n", b"two\n", b"two\n"]


def test_a_damaged_record_is_dropped_and_the_registry_asked(registry: Registry, tmp_path: Path) -> None:
    image = _push(tmp_path, registry, FIRST, "first", estargz=True)
    cache = tmp_path / "cache"
    run = _mount(image, tmp_path / "m1", cache)
    assert run.returncode == 0, run.stderr
    unmount(tmp_path / "m1")
    [record] = (cache / "refs").rglob("*.ref")
    data = bytearray(record.read_bytes())
    data[-5] ^= 0x21
    record.write_bytes(bytes(data))
    run = _mount(image, tmp_path / "m2", cache)
    try:
        assert run.returncode == 0, run.stderr
        assert [line for line in run.stderr.splitlines() if str(record) in line and "is damaged" in line], run.stderr
        assert "taken from the cache" not in run.stderr
        assert (tmp_path / "m2/etc/release").read_bytes() == b"one\n"
    finally:
        unmount(tmp_path / "m2")
    assert record.read_bytes() != bytes(data)  # recorded again, whole


def test_a_recorded_image_no_longer_cached_is_resolved_anew(registry: Registry, tmp_path: Path) -> None:
    """As podman's "missing": an image whose tree and tars were pruned is not all there, so its
    tag is looked up again (the recorded digest's blobs may be gone from the registry)."""
    image = _push(tmp_path, registry, FIRST, "first", estargz=True)
    cache = tmp_path / "cache"
    assert _mount(image, tmp_path / "m1", cache).returncode == 0
    unmount(tmp_path / "m1")
    _push(tmp_path, registry, SECOND, "second", estargz=True)
    prune = subprocess.run([*COMMAND, "cache", "prune", "--all", "--cache-dir", str(cache)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert prune.returncode == 0, prune.stderr
    run = _mount(image, tmp_path / "m2", cache)
    try:
        assert run.returncode == 0, run.stderr
        assert "not all in the cache: asking the registry" in run.stderr
        assert (tmp_path / "m2/etc/release").read_bytes() == b"two\n"
    finally:
        unmount(tmp_path / "m2")
