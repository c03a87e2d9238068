"""Nothing left behind, nothing half-done: temporary cache files are reused or removed, an
interrupted pull resumes, a full disk is one line, and the cache is bounded and prunable
without ever taking a file from under a live mount."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.cache_files import SWEEP_GRACE_SECONDS, atomic_file, sweep_partials, write_atomically
from registry.digest import Digest
from registry.layout_writer import write_layout
from tests.conftest import COMMAND, ImageWriter, Mounter, require, unmount
from tests.registry_servers import REGISTRY_BINARY, FaultProxy, Registry, skopeo_copy
from tests.tarvocab import f, tar_of
from unionfs.aio import EventLoopThread
from unionfs.entry import Chunk
from unionfs.storage.cache_admin import CacheFile, choose_evictions, parse_size
from unionfs.storage.chunk_cache import LAYOUT, SUFFIX, ChunkCache

KB = 1000


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mounts a tmpfs of `size` at `path` (root only), unmounted afterwards."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def partials_under(root: Path) -> list[Path]:
    return [p for p in root.rglob(".partial-*") if p.is_file()]


def _chunk(number: int, size: int = 1000) -> tuple[Chunk, bytes]:
    """Chunk `number` of a layer of chunks of `size` bytes, one after the other."""
    data = random.randbytes(size - 1) + bytes([number % 256])
    return Chunk(0, size, number * 10, number * 10 + 10, 0, f"sha256:{hashlib.sha256(data).hexdigest()}",
                 number * size), data  # fmt: skip


LAYER = Digest.parse("sha256:" + "ab" * 32)


# --- the chunk cache ---------------------------------------------------------------------


def test_chunk_files_vanishing_during_the_first_size_scan_do_not_fail_a_write(tmp_path: Path) -> None:
    """The first write measures the directory. Another mount's evicter, or a writer renaming
    its temporary file, may remove a file between the listing and its stat: that must not
    turn the write (and so a lazy read) into an error. The interleaving is forced: the moment
    the scan has looked at its first file, every other file goes, as a concurrent evicter
    would remove them (a profile hook on this thread runs the removal there and then)."""
    directory = tmp_path / "chunks"
    (directory / LAYOUT).mkdir(parents=True)
    others = []
    for number in range(20):
        others.append(directory / LAYOUT / f"sha256-{number:064x}{SUFFIX}")
        others[-1].write_bytes(_chunk(number, 10)[1])
    cache = ChunkCache(directory, memory_bytes=0)
    evicted = False

    def evict_after_the_first_look(frame: object, event: str, function: object) -> None:
        nonlocal evicted
        if event == "c_return" and not evicted and getattr(function, "__name__", "") in ("stat", "lstat"):
            evicted = True
            for path in others:
                path.unlink()

    chunk, data = _chunk(10**6)
    sys.setprofile(evict_after_the_first_look)
    try:
        cache.layer(LAYER).put(chunk, data)  # raised FileNotFoundError before the fix
    finally:
        sys.setprofile(None)
    assert evicted
    assert ChunkCache(directory, memory_bytes=0).layer(LAYER).get(chunk) == data


def test_a_full_disk_under_the_chunk_cache_is_logged_once_and_reads_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "small", "256k") as directory:
        cache = ChunkCache(directory / "chunks").layer(LAYER)
        chunks = [_chunk(n, 20 * KB) for n in range(40)]  # 800 kB into 256 kB
        with caplog.at_level(logging.INFO, logger="crfs-merge"):
            for chunk, data in chunks:
                cache.put(chunk, data)
        assert all(cache.get(chunk) == data for chunk, data in chunks)  # from memory
        lines = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "No space left on device" in lines[0].getMessage() and str(directory) in lines[0].getMessage()
        assert partials_under(directory) == []


# --- temporary files ---------------------------------------------------------------------


def test_atomic_writes_leave_nothing_on_failure_and_sweeps_take_only_dead_writers(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json", "a test") as out:
        out.write(b"half")
        raise RuntimeError("the writer fails")
    assert list(tmp_path.iterdir()) == []
    write_atomically(tmp_path / "b", b"whole", "a test")
    assert (tmp_path / "b").read_bytes() == b"whole" and partials_under(tmp_path) == []
    # A writer that is alive (holds its file's lock) is left alone however old its file;
    # a dead one's file is removed once past the grace period.
    old = time.time() - SWEEP_GRACE_SECONDS - 1
    with atomic_file(tmp_path / "c", "a test") as out:
        (live,) = partials_under(tmp_path)
        os.utime(live, (old, old))
        dead = tmp_path / ".partial-12345-dead"
        dead.write_bytes(b"x" * 10)
        os.utime(dead, (old, old))
        assert sweep_partials(tmp_path) == [(dead.name, 10)]
        assert live.exists()
        out.write(b"done")
    assert (tmp_path / "c").read_bytes() == b"done" and partials_under(tmp_path) == []


# --- pure eviction choice ----------------------------------------------------------------


def _row(name: str, size: int, used_at: float, in_use: bool = False) -> CacheFile:
    return CacheFile(name, "tars", size, used_at, in_use)


@pytest.mark.parametrize(
    ("rows", "max_bytes", "evicted"),
    [
        ([_row("a", 10, 1), _row("b", 10, 2)], 20, []),  # within the bound: nothing
        ([_row("a", 10, 1), _row("b", 10, 2)], 15, ["a"]),  # the least recently used goes
        ([_row("a", 10, 2), _row("b", 10, 1)], 15, ["b"]),
        ([_row("a", 10, 1, in_use=True), _row("b", 10, 2)], 15, ["b"]),  # never one in use
        ([_row("a", 10, 1, in_use=True), _row("b", 10, 2, in_use=True)], 0, []),  # bound stays exceeded
        ([_row("a", 5, 1), _row("b", 5, 2), _row("c", 50, 3)], 50, ["a", "b"]),  # only as many as needed
        ([_row("a", 5, 1), _row("b", 50, 2), _row("c", 5, 3)], 10, ["a", "b"]),
        ([_row("a", 1, 1), _row("b", 1, 1, in_use=True), _row("c", 1, 3)], 0, ["a", "c"]),  # --all
        ([], 0, []),
    ],
)
def test_choose_evictions(rows: list[CacheFile], max_bytes: int, evicted: list[str]) -> None:
    assert [r.path for r in choose_evictions(rows, max_bytes)] == evicted


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1048576), ("64k", 65536), ("500M", 500 * 1024**2), ("10G", 10 * 1024**3), ("1.5GiB", 1610612736),
     ("2gb", 2 * 1024**3), ("0", 0)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "-1G", "5X", "1.2.3"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


# --- interrupted pulls and full disks, against a real registry ----------------------------

BIG = 6_000_000  # bytes of random data: the gzip layer is about as large


@pytest.fixture(scope="module")
def io_loop() -> Iterator[EventLoopThread]:
    with EventLoopThread() as loop:
        yield loop


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry holding `big`: a layer of 6 MB that does not compress, and a small one
    that compresses 100 to 1."""
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(shutil.which("skopeo") is not None, "skopeo is missing (apt-get install skopeo)")
    root = tmp_path_factory.mktemp("registry")
    layout = root / "layout"
    big = tar_of(f("big", random.Random(9).randbytes(BIG)))
    zeros = tar_of(f("zeros", bytes(3_000_000)))
    write_layout(layout, [big, tar_of(f("small", b"small"))], tag="big")
    write_layout(layout, [zeros], tag="zeros")
    server = Registry(root)
    try:
        skopeo_copy(f"oci:{layout}:big", f"docker://{server.host}/test/big:1")
        skopeo_copy(f"oci:{layout}:zeros", f"docker://{server.host}/test/zeros:1")
        yield server
    finally:
        server.stop()


@pytest.fixture
def slow_proxy(registry: Registry, io_loop: EventLoopThread) -> Iterator[FaultProxy]:
    proxy = FaultProxy(registry.host, io_loop, bytes_per_second=1_000_000)
    proxy.start()
    yield proxy
    proxy.stop()


def _wait_for_partial(cache: Path, at_least: int, server: subprocess.Popen[bytes]) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in partials_under(cache):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= at_least:
                    return path
        assert server.poll() is None, "the pull ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no partial download appeared")


@pytest.mark.parametrize("interrupt", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_an_interrupted_pull_is_resumed_and_leaves_nothing_behind(
    interrupt: signal.Signals, slow_proxy: FaultProxy, mount: Mounter, tmp_path: Path
) -> None:
    image = f"{slow_proxy.host}/test/big:1"
    cache = tmp_path / "cache"
    mountpoint = tmp_path / "interrupted"
    mountpoint.mkdir()
    server = subprocess.Popen([*COMMAND, "-f", "--cache-dir", str(cache), image, str(mountpoint)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        partial = _wait_for_partial(cache, 1_500_000, server)
        server.send_signal(interrupt)
        server.wait(timeout=30)
    finally:
        server.kill()
        server.wait()
        unmount(mountpoint)
    kept = partial.stat().st_size  # left for the next pull to continue
    assert kept >= 1_500_000
    slow_proxy.bytes_per_second, slow_proxy.served_bytes = None, 0
    mounted = mount(image, cache=cache)
    assert (mounted / "big").read_bytes() == random.Random(9).randbytes(BIG)
    # Only the rest was fetched (before: the whole blob again, beside the old partial file).
    assert slow_proxy.served_bytes < BIG - kept + 100_000, (slow_proxy.served_bytes, kept)
    assert partials_under(cache) == []
    # The mount is live: a prune keeps its blobs and tars, and it reads on.
    blobs = sorted(p.name for p in (cache / "blobs").iterdir() if not p.name.endswith(".lock"))
    _cache(cache, "prune", "--all")
    assert sorted(p.name for p in (cache / "blobs").iterdir() if not p.name.endswith(".lock")) == blobs
    assert (mounted / "big").read_bytes() == random.Random(9).randbytes(BIG)


def _mount_fails(image: str, cache: Path, tmp_path: Path) -> str:
    mountpoint = tmp_path / "full-mount"
    mountpoint.mkdir(exist_ok=True)
    run = subprocess.run([*COMMAND, "--cache-dir", str(cache), image, str(mountpoint)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1 and not os.path.ismount(mountpoint), run.stderr
    return run.stderr


@pytest.mark.parametrize(
    ("tag", "size", "what"),
    [("big", "2m", ("blobs/sha256-", "downloading layer sha256:")),  # the blob does not fit
     ("zeros", "2m", ("tars/sha256-", "uncompressed tar of layer sha256:"))],  # the blob fits, its tar not
    ids=["blob", "tar"],
)  # fmt: skip
def test_a_full_disk_is_one_line_naming_the_file_and_what_needed_the_space(
    tag: str, size: str, what: tuple[str, str], registry: Registry, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "cache", size) as cache:
        error = _mount_fails(f"{registry.host}/test/{tag}:1", cache, tmp_path)
        lines = error.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in error, error
        assert "No space left on device" in error and all(part in error for part in what), error
        assert str(cache) in error
        assert partials_under(cache) == []


# --- cache management ----------------------------------------------------------------------


def _cache(cache: Path, *args: str) -> str:
    run = subprocess.run([*COMMAND, "cache", "--cache-dir", str(cache), *args], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


def _layer_key(image: str) -> str:
    """Returns the cache key of the one layer of an `oci_image` (its blob, the largest)."""
    root = Path(image.split(":")[1])
    return "sha256-" + max((root / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size).name


def _tar_keys(cache: Path) -> set[str]:
    return {p.name.removesuffix(".tar") for p in (cache / "tars").iterdir()}


def _until(condition: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _no_live_mounts(cache: Path) -> bool:
    return "used by 0 live mounts" in _cache(cache)


def test_cache_shows_usage_and_prune_never_removes_what_a_live_mount_uses(
    oci_image: ImageWriter, mount: Mounter, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    data = random.randbytes(300_000)
    used, other = oci_image([f("kept", data)]), oci_image([f("other", b"other")])
    unmount(mount(other, cache=cache))
    mountpoint = mount(used, cache=cache)
    shown = _cache(cache)
    assert "used by 1 live mount" in shown, shown
    rows = {line.split()[0]: line.split()[1:] for line in shown.splitlines()[2:]}
    assert rows["tars"][0] == "2" and rows["indexes"][0] == "2" and rows["trees"][0] == "2", shown
    assert rows["tars"][2].endswith("KiB"), shown  # in use: the live mount's tar

    assert "removed" in _cache(cache, "prune", "--all")
    assert _tar_keys(cache) == {_layer_key(used)}  # the other image's files went, not the mounted one's
    assert len(list((cache / "trees").rglob("*.tree"))) == 1
    assert (mountpoint / "kept").read_bytes() == data

    unmount(mountpoint)
    _until(lambda: _no_live_mounts(cache))
    _cache(cache, "prune", "--all")
    left = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock") and p.parent.name != "mounts"]
    assert left == []


def test_the_cache_is_held_to_its_bound_least_recently_used_first(
    oci_image: ImageWriter, mount: Mounter, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    images = [oci_image([f(name, random.randbytes(1_000_000))]) for name in ("a", "b", "c")]
    for image in images[:2]:
        unmount(mount(image, cache=cache))
        time.sleep(0.05)
    _until(lambda: _no_live_mounts(cache))
    # c's mount makes the cache about 3 MB: above 2.5 MB, a (the least recently used) goes.
    mountpoint = mount(images[2], "--cache-max-size", "2500k", cache=cache)
    _until(lambda: _layer_key(images[0]) not in _tar_keys(cache))
    assert _tar_keys(cache) == {_layer_key(images[1]), _layer_key(images[2])}
    assert len((mountpoint / "c").read_bytes()) == 1_000_001 - 1
    # Below any file's size: everything unused goes, the live mount's files stay.
    unmount(mount(images[0], "--cache-max-size", "1k", cache=cache))
    mountpoint = mount(images[1], "--cache-max-size", "1k", cache=cache)
    _until(lambda: _tar_keys(cache) == {_layer_key(images[1]), _layer_key(images[2])})
    assert len((mountpoint / "b").read_bytes()) == 1_000_000


def test_cache_command_usage(tmp_path: Path) -> None:
    for args, message in ((["prune"], "needs --max-size SIZE or --all"), (["--all"], "options of prune"),
                          (["prune", "--max-size", "ten"], "not a size"),
                          (["prune", "--all", "--max-size", "1G"], "not allowed with")):  # fmt: skip
        run = subprocess.run([*COMMAND, "cache", "--cache-dir", str(tmp_path), *args], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    run = subprocess.run([*COMMAND, "cache", "--cache-dir", str(tmp_path / "absent")], capture_output=True, text=True)
    assert run.returncode == 2 and "no such cache directory" in run.stderr


def test_a_mount_removes_the_temporary_files_of_dead_writers_and_only_those(
    oci_image: ImageWriter, mount: Mounter, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    image = oci_image([f("a", b"a")])
    unmount(mount(image, cache=cache))
    old = time.time() - SWEEP_GRACE_SECONDS - 1
    abandoned = []
    for directory in ("blobs", "tars", "index/v1", "trees/v1", "toc", "chunks"):
        (cache / directory).mkdir(parents=True, exist_ok=True)
        abandoned.append(cache / directory / ".partial-999999-1-0")  # a killed writer's
        abandoned[-1].write_bytes(b"x" * 1000)
        os.utime(abandoned[-1], (old, old))
    with atomic_file(cache / "tars" / "being-written.tar", "a test") as out:  # a live writer's
        (live,) = [p for p in partials_under(cache / "tars") if p not in abandoned]
        os.utime(live, (old, old))
        mount(image, cache=cache)
        _until(lambda: not any(p.exists() for p in abandoned))
        assert live.exists()
        out.write(b"done")
    assert partials_under(cache) == []


def test_a_kept_download_that_is_not_the_blob_is_fetched_again_whole(
    slow_proxy: FaultProxy, mount: Mounter, tmp_path: Path
) -> None:
    """Bytes at a download's name that are not the blob's beginning (another tool wrote
    there, a disk went bad) fail the digest once the rest is fetched: the blob is then
    fetched whole, and the mount succeeds."""
    slow_proxy.bytes_per_second = None
    image = f"{slow_proxy.host}/test/big:1"
    cache = tmp_path / "cache"
    run = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{image}"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    big_layer = json.loads(run.stdout)["Layers"][0].replace(":", "-")
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / f".partial-resume-{big_layer}").write_bytes(b"not the blob" * 100_000)
    slow_proxy.served_bytes = 0
    assert (mount(image, cache=cache) / "big").read_bytes() == random.Random(9).randbytes(BIG)
    assert slow_proxy.served_bytes > BIG  # the rest, then the whole
    assert partials_under(cache) == []
