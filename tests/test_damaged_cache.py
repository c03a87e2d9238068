"""Every kind of file in the cache, damaged as crashes, full disks and other tools damage
them, then mounted again: the mount serves exactly what a fresh cache serves (or fails with
one clean line), and says in one line which cached file it dropped.

Local images go through real FUSE mounts (and the build path itself for the 40-flip trial);
registry images come from a real docker-registry on 127.0.0.1, pushed with skopeo, through a
counting proxy that shows what was fetched again."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from registry.local import resolve_image
from registry.manifest import Platform
from registry.media_types import Compression
from registry.options import RemoteOptions
from registry.push import push_layout
from registry.reference import ImageReference
from registry.remote import RegistryClient
from registry.remote_reference import RemoteReference
from registry.source import Image
from tests.conftest import COMMAND, MOUNT_TIMEOUT, require, unmount
from tests.registry_servers import REGISTRY_BINARY, FaultProxy, Registry, skopeo_copy
from tests.tarvocab import d, f, sym, tar_of, wh
from tests.tree_walk import describe_tree
from unionfs.aio import EventLoopThread
from unionfs.build import build
from unionfs.storage.layer_store import LayerStore
from unionfs.tree import MergedTree

RANDOM = random.Random(9)
LOWER = [d("etc/"), f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
         f("etc/shadow", b"root:$6$secret:19000::::::\n", mode=0o640, gid=42),
         *(f(f"usr/share/doc/f{i:03}", f"file {i}\n".encode() * (i + 1), uid=i, gid=1000 + i) for i in range(150)),
         f("bin/busybox", RANDOM.randbytes(300_000), mode=0o755), sym("bin/sh", "busybox")]  # fmt: skip
UPPER = [wh("usr/share/doc/f007"), f("etc/motd", b"hello\n"), f("usr/share/doc/f010", b"replaced", uid=7)]
Tree = dict[str, tuple[object, ...]]
Mount = Callable[..., tuple[Path, str]]


@pytest.fixture
def mount(tmp_path: Path, fuse_works: None) -> Iterator[Mount]:
    """Returns mount(image, cache) -> (mountpoint, the command's stderr); unmounts at the end."""
    mounted: list[Path] = []

    def do_mount(image: str, cache: Path, *options: str) -> tuple[Path, str]:
        mountpoint = tmp_path / f"mnt{len(mounted)}"
        mountpoint.mkdir()
        run = subprocess.run([*COMMAND, "--cache-dir", str(cache), *options, image, str(mountpoint)],
                             capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip
        assert run.returncode == 0 and "Traceback" not in run.stderr, f"mount failed: {run.stderr}"
        mounted.append(mountpoint)
        return mountpoint, run.stderr

    yield do_mount
    for mountpoint in mounted:
        unmount(mountpoint)


def mounted_tree(mount: Mount, image: str, cache: Path, *options: str) -> tuple[Tree, str]:
    """Mounts, describes the tree (every byte of every file), unmounts."""
    mountpoint, stderr = mount(image, cache, *options)
    try:
        return describe_tree(mountpoint), stderr
    finally:
        unmount(mountpoint)


def one_line_naming(stderr: str, path: Path) -> str:
    """Returns the one line of `stderr` that names `path`; fails unless there is exactly one."""
    lines = [line for line in stderr.splitlines() if str(path) in line]
    assert len(lines) == 1, stderr
    return lines[0]


def sealed_json(path: Path) -> tuple[bytes, dict[str, object]]:
    """Returns (what precedes the JSON, the JSON) of a cached index, sealed or not."""
    data = path.read_bytes()
    start = data.index(b'{"format"')
    return data[:start], json.loads(data[start:])


def member_offsets(tar: Path) -> dict[str, tuple[int, int]]:
    """Returns {name: (offset of its header, offset of its data)} of each member of `tar`."""
    with tarfile.open(tar) as archive:
        return {m.name: (m.offset, m.offset_data) for m in archive.getmembers()}


def flip_byte(path: Path, at: int) -> None:
    """Flips one byte in place: same size, a new mtime (as any write leaves)."""
    with open(path, "r+b") as out:
        out.seek(at)
        byte = out.read(1)[0]
        out.seek(at)
        out.write(bytes([byte ^ 0x5A]))


# --- local images ---------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> str:
    write_layout(tmp_path / "layout", [tar_of(*LOWER), tar_of(*UPPER)], Compression.GZIP, tag="v1")
    return f"oci:{tmp_path / 'layout'}:v1"


@pytest.fixture
def fresh(layout: str, mount: Mount, tmp_path: Path) -> Tree:
    """The image as a fresh cache serves it."""
    return mounted_tree(mount, layout, tmp_path / "fresh-cache")[0]


def lower_tar(cache: Path) -> Path:
    """The cached tar of the image's lower layer (the one with etc/passwd)."""
    return next(p for p in (cache / "tars").glob("*.tar") if "etc/passwd" in member_offsets(p))


@pytest.mark.parametrize("damage", ["cut-at-a-member-boundary", "byte-flipped-same-size"])
def test_a_damaged_cached_tar_is_made_again(
    damage: str, layout: str, fresh: Tree, mount: Mount, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert mounted_tree(mount, layout, cache)[0] == fresh
    tar = lower_tar(cache)
    offsets = member_offsets(tar)
    if damage == "cut-at-a-member-boundary":
        os.truncate(tar, offsets["usr/share/doc/f100"][0])  # a valid tar, 50 files short
    else:
        flip_byte(tar, offsets["usr/share/doc/f120"][1])
    tree, stderr = mounted_tree(mount, layout, cache)
    assert tree == fresh
    assert "is damaged" in one_line_naming(stderr, tar)
    assert member_offsets(tar) == offsets  # made again whole


def test_an_index_whose_offsets_were_moved_is_dropped(layout: str, fresh: Tree, mount: Mount, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mounted_tree(mount, layout, cache)
    shutil.rmtree(cache / "trees")  # so that the mount reads the indexes
    index = next(p for p in (cache / "index").rglob("*.json") if b"etc/shadow" in p.read_bytes())
    head, document = sealed_json(index)
    rows = {row[0]: row for row in document["entries"]}  # type: ignore[attr-defined]
    rows["etc/shadow"][-1] = rows["etc/passwd"][-1]  # shadow's bytes now said to be passwd's
    index.write_bytes(head + json.dumps(document, separators=(",", ":")).encode())
    tree, stderr = mounted_tree(mount, layout, cache)
    assert tree == fresh
    assert "is damaged" in one_line_naming(stderr, index)


def test_40_random_byte_flips_in_a_saved_tree_are_all_caught(layout: str, tmp_path: Path) -> None:
    """Each trial flips one byte anywhere in the saved tree, then builds the image again:
    the tree and every file's bytes equal the fresh ones, and one warning names the file."""
    image = resolve_image(ImageReference.parse(layout), Platform.host())
    cache = tmp_path / "cache"
    first = build(image, LayerStore(cache, print))
    expected = everything(first.tree, first.content.read)
    [saved] = (cache / "trees").rglob("*.tree")
    good = saved.read_bytes()
    first.content.close()
    chooser = random.Random(40)
    failed = {}
    for _ in range(40):
        damaged = bytearray(good)
        at = chooser.randrange(len(damaged))
        damaged[at] ^= chooser.randrange(1, 256)
        saved.write_bytes(damaged)
        outcome = _served_after_damage(image, cache, expected, saved)
        failed[at] = outcome or ("" if saved.read_bytes() == good else "kept the damaged file")
        saved.write_bytes(good)
    assert {at: outcome for at, outcome in failed.items() if outcome} == {}, f"of {len(good)} bytes"


def _served_after_damage(image: Image, cache: Path, expected: dict[str, tuple[object, ...]], saved: Path) -> str:
    """Builds the image from the damaged cache; returns what went wrong, '' if nothing."""
    warnings: list[str] = []
    try:
        again = build(image, LayerStore(cache, warnings.append))
    except Exception as exc:
        return f"raised {exc!r}"
    try:
        if everything(again.tree, again.content.read) != expected:
            return "served a wrong tree or wrong bytes"
    except Exception as exc:
        return f"raised {exc!r} on reading"
    finally:
        again.content.close()
    return "" if len(warnings) == 1 and str(saved) in warnings[0] else f"warned {warnings}"


def everything(tree: MergedTree, read: Callable[..., bytes]) -> dict[str, tuple[object, ...]]:
    """Every path's inode, owner, mode, size, link, and bytes."""
    result = {}
    for path, inode in tree.items():
        entry = inode.entry
        data = read(entry, 0, entry.size) if not inode.is_dir and entry.size < 10**7 else b""
        result[path] = (inode.ino, inode.nlink, entry.mode, entry.uid, entry.gid, entry.size, entry.link, data)
    return result


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Returns view(directory) -> it, made read-only: a read-only bind mount as root
    (who may write anywhere), the directory with its write bits cleared otherwise."""
    views: list[Path] = []

    def view(directory: Path) -> Path:
        if os.geteuid() != 0:
            subprocess.run(["chmod", "-R", "a-w", str(directory)], check=True)
            return directory
        # Over itself: the cache keeps its path, which its indexes' stamps name.
        subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
        views.append(directory)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        return directory

    yield view
    for target in views:  # a mount's server may still hold the cache for a moment: detach then
        if subprocess.run(["umount", str(target)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(target)], check=True)
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)


def test_a_read_only_cache_that_holds_everything_mounts(
    layout: str, fresh: Tree, mount: Mount, tmp_path: Path, read_only: Callable[[Path], Path]
) -> None:
    cache = tmp_path / "cache"
    mounted_tree(mount, layout, cache)
    tree, stderr = mounted_tree(mount, layout, read_only(cache))
    assert tree == fresh and stderr == ""


def test_a_tar_that_does_not_fit_is_one_line_naming_it(layout: str, tmp_path: Path, small_disk: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(small_disk), layout, str(mountpoint)],
                         capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip
    assert run.returncode == 1 and not os.path.ismount(mountpoint)
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"{small_disk / 'tars'}/sha256-" in run.stderr and "(the uncompressed tar of layer" in run.stderr
    assert "No space left on device" in run.stderr and not list(small_disk.rglob(".partial-*"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 KiB tmpfs: room for lock files, not for an index or a tree."""
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:  # a mount serving from the disk may outlive this fixture by a moment: detach then
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_tree_that_cannot_be_saved_on_a_full_disk_is_still_mounted(
    mount: Mount, tmp_path: Path, small_disk: Path
) -> None:
    write_layout(tmp_path / "plain", [tar_of(*LOWER), tar_of(*UPPER)], Compression.NONE, tag="v1")
    image = f"oci:{tmp_path / 'plain'}:v1"
    fresh = mounted_tree(mount, image, tmp_path / "fresh-cache")[0]
    tree, stderr = mounted_tree(mount, image, small_disk)
    assert tree == fresh
    line = one_line_naming(stderr, small_disk / "trees")
    assert "merged tree" in line and "No space left on device" in line, stderr


# --- registry images ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A registry with the image as gzip, uncompressed, and eStargz layers; yields
    {kind: repository:tag}, plus 'host' and 'layout' (the gzip source layout's path)."""
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(shutil.which("skopeo") is not None, "skopeo is missing (apt-get install skopeo)")
    root = tmp_path_factory.mktemp("damaged-registry")
    write_layout(root / "gzip", [tar_of(*LOWER), tar_of(*UPPER)], Compression.GZIP, tag="v1")
    write_layout(root / "plain", [tar_of(*LOWER), tar_of(*UPPER)], Compression.NONE, tag="v1")
    subprocess.run([*COMMAND, "convert", "--cache-dir", str(root / "cc"), f"oci:{root / 'gzip'}:v1",
                    f"oci:{root / 'esgz'}:v1"], check=True, capture_output=True, timeout=300)  # fmt: skip
    (root / "registry").mkdir()
    server = Registry(root / "registry")
    try:
        for kind in ("gzip", "esgz"):
            skopeo_copy(f"oci:{root / kind}:v1", f"docker://{server.host}/damaged/{kind}:v1")
        shutil.copytree(root / "gzip", root / "bad-diff-id")
        _break_first_diff_id(root / "bad-diff-id")
        with EventLoopThread() as loop:  # skopeo would compress the uncompressed layers, or refuse
            for kind in ("plain", "bad-diff-id"):
                loop.run(_push(root / kind, f"{server.host}/damaged/{kind}:v1"))
        yield {"host": server.host, "layout": str(root / "gzip"),
               **{kind: f"damaged/{kind}:v1" for kind in ("gzip", "plain", "esgz", "bad-diff-id")}}  # fmt: skip
    finally:
        server.stop()


def _break_first_diff_id(layout: Path) -> None:
    """Makes the config's first diff_id wrong, and stores config and manifest under their new
    digests: every blob is then what its descriptor says, but the image is wrong."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config["rootfs"]["diff_ids"][0] = "sha256:" + "1" * 64
    manifest["config"].update(_store(blobs, json.dumps(config).encode()))
    index["manifests"][0].update(_store(blobs, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


def _store(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


async def _push(layout: Path, image: str) -> None:
    async with RegistryClient(RemoteReference.parse(image), RemoteOptions(tls_verify=False), {}) as client:
        await push_layout(client, layout, "v1")


@pytest.fixture
def proxy(registry: dict[str, str]) -> Iterator[FaultProxy]:
    with EventLoopThread() as loop:
        counting = FaultProxy(registry["host"], loop)
        counting.start()
        yield counting
        counting.stop()


@pytest.fixture
def remote_fresh(registry: dict[str, str], mount: Mount, tmp_path: Path) -> Tree:
    return mounted_tree(mount, f"oci:{registry['layout']}:v1", tmp_path / "local-cache")[0]


def layer_blobs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blobs").iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("damage", ["cut-at-a-member-boundary", "byte-flipped-same-size"])
def test_a_damaged_tar_of_a_registry_layer_is_fetched_again(
    damage: str, registry: dict[str, str], proxy: FaultProxy, remote_fresh: Tree, mount: Mount, tmp_path: Path
) -> None:
    image, cache = f"{proxy.host}/{registry['gzip']}", tmp_path / "cache"
    assert mounted_tree(mount, image, cache)[0] == remote_fresh
    tar = lower_tar(cache)
    offsets = member_offsets(tar)
    if damage == "cut-at-a-member-boundary":
        os.truncate(tar, offsets["usr/share/doc/f100"][0])
    else:
        flip_byte(tar, offsets["usr/share/doc/f120"][1])
    proxy.requests.clear()
    tree, stderr = mounted_tree(mount, image, cache)
    assert tree == remote_fresh
    assert "is damaged" in one_line_naming(stderr, tar)
    assert proxy.requests["blob"] == 1  # that one layer again (the config: the reference's record)
    assert layer_blobs(cache) == []  # one copy per layer: the tar, not the blob too


def test_a_read_only_cache_that_holds_a_registry_image_mounts(
    registry: dict[str, str], remote_fresh: Tree, mount: Mount, tmp_path: Path, read_only: Callable[[Path], Path]
) -> None:
    image, cache = f"{registry['host']}/{registry['gzip']}", tmp_path / "cache"
    mounted_tree(mount, image, cache)
    assert mounted_tree(mount, image, read_only(cache)) == (remote_fresh, "")


@pytest.mark.parametrize("damage", ["truncated", "byte-flipped"])
def test_a_damaged_registry_blob_is_fetched_again(
    damage: str, registry: dict[str, str], proxy: FaultProxy, remote_fresh: Tree, mount: Mount, tmp_path: Path
) -> None:
    """A blob fetched but not yet decompressed (the mount was killed) and damaged since."""
    image, cache = f"{proxy.host}/{registry['gzip']}", tmp_path / "cache"
    mounted_tree(mount, image, cache)
    tar = lower_tar(cache)
    name = tar.name.removesuffix(".tar")
    tar.unlink()
    blob = cache / "blobs" / name
    good = (Path(registry["layout"]) / "blobs" / "sha256" / name.removeprefix("sha256-")).read_bytes()
    blob.write_bytes(good[: len(good) // 2] if damage == "truncated" else good)
    if damage == "byte-flipped":
        flip_byte(blob, len(good) // 2)
    proxy.requests.clear()
    tree, stderr = mounted_tree(mount, image, cache)
    assert tree == remote_fresh
    assert "is damaged" in one_line_naming(stderr, blob)
    assert proxy.requests["blob"] == 2 and layer_blobs(cache) == []  # no tar: resolved anew, config and layer


def test_a_damaged_uncompressed_registry_blob_is_fetched_again(
    registry: dict[str, str], proxy: FaultProxy, remote_fresh: Tree, mount: Mount, tmp_path: Path
) -> None:
    """An uncompressed layer's blob is its tar, read in place: flipped, it is fetched again."""
    image, cache = f"{proxy.host}/{registry['plain']}", tmp_path / "cache"
    assert mounted_tree(mount, image, cache)[0] == remote_fresh
    blob = next(p for p in layer_blobs(cache) if "etc/passwd" in member_offsets(p))
    flip_byte(blob, member_offsets(blob)["usr/share/doc/f120"][1])
    proxy.requests.clear()
    tree, stderr = mounted_tree(mount, image, cache)
    assert tree == remote_fresh
    assert "is damaged" in one_line_naming(stderr, blob)
    assert proxy.requests["blob"] == 1  # that layer again (the config: the reference's record)


@pytest.mark.parametrize("damage", ["garbage", "another-layers-toc"])
def test_a_damaged_cached_toc_is_fetched_again(
    damage: str, registry: dict[str, str], proxy: FaultProxy, remote_fresh: Tree, mount: Mount, tmp_path: Path
) -> None:
    image, cache = f"{proxy.host}/{registry['esgz']}", tmp_path / "cache"
    assert mounted_tree(mount, image, cache, "--prefetch", "none")[0] == remote_fresh
    first, second = sorted(p for p in (cache / "toc").rglob("*") if p.is_file())
    first.write_bytes(os.urandom(first.stat().st_size) if damage == "garbage" else second.read_bytes())
    shutil.rmtree(cache / "trees")  # else the saved tree serves the mount, and no TOC is read
    proxy.requests.clear()
    mountpoint, stderr = mount(image, cache, "--prefetch", "none")
    assert proxy.requests["range"] == 1  # that layer's tail (footer and TOC, one request), fetched again
    assert describe_tree(mountpoint) == remote_fresh
    assert "is damaged" in one_line_naming(stderr, first)
    unmount(mountpoint)
    assert mounted_tree(mount, image, cache, "--prefetch", "none") == (remote_fresh, "")  # saved right again


def test_a_layer_that_fails_when_fetched_fresh_is_the_images_error(
    registry: dict[str, str], proxy: FaultProxy, tmp_path: Path
) -> None:
    """A blob that matches its digest but not its diff_id is the image's fault: one line, the
    same on every mount, and not fetched again to find that out."""
    image, mountpoint = f"{proxy.host}/{registry['bad-diff-id']}", tmp_path / "mnt"
    mountpoint.mkdir()
    for blob_requests in (3, 1):  # the config and both layers; then the config only (no tar: resolved anew)
        proxy.requests.clear()
        run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)],
                             capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip
        assert run.returncode == 1 and not os.path.ismount(mountpoint)
        assert run.stderr.count("\n") == 1 and "expected sha256:1111" in run.stderr, run.stderr
        assert proxy.requests["blob"] == blob_requests


def test_convert_from_a_registry_fetches_a_damaged_layer_again(
    registry: dict[str, str], proxy: FaultProxy, remote_fresh: Tree, mount: Mount, tmp_path: Path
) -> None:
    """`convert` reads whole layers through the same cache (pull_whole), with the same checks."""
    image, cache = f"{proxy.host}/{registry['gzip']}", tmp_path / "cache"
    mounted_tree(mount, image, cache)
    tar = lower_tar(cache)
    os.truncate(tar, member_offsets(tar)["usr/share/doc/f100"][0])
    proxy.requests.clear()
    run = subprocess.run([*COMMAND, "convert", "--cache-dir", str(cache), image, f"oci:{tmp_path / 'esgz'}:v1"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "is damaged" in one_line_naming(run.stderr, tar)
    assert proxy.requests["blob"] == 1  # that one layer again (the config: the mount's record of the reference)
    assert mounted_tree(mount, f"oci:{tmp_path / 'esgz'}:v1", tmp_path / "cache2")[0] == remote_fresh
