"""Real FUSE mounts compared entry by entry with `umoci raw unpack` of the same image."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.media_types import Compression
from tests.conftest import ImageWriter, Mounter
from tests.tarvocab import d, dev, f, fifo, hl, opq, sym, wh
from tests.test_whiteout import CASES, SYMLINK_CASES
from tests.tree_walk import describe_tree
from unionfs.fuse.ops import OLD_KERNEL_VARIABLE


def umoci_unpack(umoci: str, image: str, dest: Path) -> Path:
    """Returns the rootfs that umoci unpacks `image` ('oci:PATH:TAG') into."""
    _, path, tag = image.split(":")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run([umoci, "raw", "unpack", *rootless, "--image", f"{path}:{tag}", str(dest)],
                   check=True, capture_output=True)  # fmt: skip
    return dest


def umoci_view(rootfs: Path, skip_dir_mtime: bool = True) -> dict[str, tuple[object, ...]]:
    """umoci's tree, less what umoci 0.4.7 gets wrong against layer.md: it leaves AUFS
    metadata (.wh..wh.plnk, .wh..wh.aufs) and entries under `.wh.`-prefixed parents on disk,
    where the spec says such names are never part of the filesystem."""
    tree = describe_tree(rootfs, skip_dir_mtime=skip_dir_mtime)
    return {p: row for p, row in tree.items() if not any(part.startswith(".wh.") for part in p.split("/"))}


# Where umoci 0.4.7 departs from containerd, and so from what `docker run` shows, the
# extra paths that the mount has and umoci lacks. containerd's archive.applyNaive calls
# mkparent() for every tar entry before it looks for whiteouts, so a marker in a directory
# that no lower layer has leaves that directory behind; umoci creates nothing.
CONTAINERD_NOT_UMOCI = {
    "opaque marker of a missing directory creates it": {"new"},
    "whiteout in a missing directory leaves the directory": {"new"},
}


# The merge rules, and the parents-through-symlinks cases on which umoci agrees with containerd
# (tests/test_fidelity.py covers those it refuses).
UMOCI_CASES = [*CASES, *(c[:3] for c in SYMLINK_CASES if c[3])]


@pytest.mark.parametrize(("name", "layers", "expected"), UMOCI_CASES, ids=[c[0] for c in UMOCI_CASES])
def test_each_merge_rule_matches_umoci(
    name: str, layers: list, expected: dict[str, str], oci_image: ImageWriter, mount: Mounter, umoci: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    image = oci_image(*layers)
    mounted = describe_tree(mount(image), skip_dir_mtime=True)
    assert sorted(mounted) == sorted(expected)
    oracle = umoci_view(umoci_unpack(umoci, image, tmp_path / "rootfs"))
    extra = CONTAINERD_NOT_UMOCI.get(name, set())
    assert set(mounted) - set(oracle) == extra
    assert {p: row for p, row in mounted.items() if p not in extra} == oracle


RICH_LOWER = [
    d("bin/"),
    f("bin/su", b"#!setuid", mode=0o4755),
    f("bin/wall", b"#!setgid", mode=0o2755, gid=5),
    d("tmp/", mode=0o1777),
    d("home/", uid=1000, gid=1000, mode=0o700),
    f("home/secret", b"private", uid=1000, gid=1000, mode=0o600),
    f("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
    f("usr/lib/libx.so.1", b"\x7fELF" + bytes(range(256)) * 300),
    hl("usr/lib/libx.so", "usr/lib/libx.so.1"),
    hl("usr/lib/libx-copy", "usr/lib/libx.so.1"),
    sym("usr/lib/liby.so", "libx.so.1"),
    sym("dangling", "/nowhere"),
    f("cap", b"ping", xattrs={"user.note": "hello", "trusted.overlay.x": "y"}),
    dev("dev/null", "c", 1, 3),
    dev("dev/loop0", "b", 7, 0),
    fifo("run/fifo"),
    f("empty"),
]
RICH_UPPER = [
    wh("usr/lib/libx-copy"),
    f("usr/lib/libx.so.1", b"new library"),
    opq("home"),
    d("home/", mode=0o755),
    f("home/new", b"n", uid=1000),
    f("big", os.urandom(3 * 1024 * 1024 + 17)),
]


@pytest.mark.parametrize("compression", list(Compression), ids=[c.value for c in Compression])
def test_rich_image_matches_umoci(
    compression: Compression, oci_image: ImageWriter, mount: Mounter, umoci: str, tmp_path: Path
) -> None:
    image = oci_image(RICH_LOWER, RICH_UPPER, compression=compression)
    mounted = describe_tree(mount(image))
    # umoci 0.4.7 cannot read zstd layers: it unpacks the same tars gzipped instead.
    oracle_image = image if compression is not Compression.ZSTD else oci_image(RICH_LOWER, RICH_UPPER)
    oracle = umoci_view(umoci_unpack(umoci, oracle_image, tmp_path / "rootfs"), skip_dir_mtime=False)
    # A directory with no header of its own has no mtime in the image: umoci stamps the
    # time of extraction, the mount the epoch. Every other directory's mtime must match.
    implied = {p for p, row in mounted.items() if stat.S_ISDIR(row[0]) and row[4] == 0}
    assert implied == {"usr", "usr/lib", "run", "etc", "dev"}
    assert mounted == {p: (*row[:4], 0, *row[5:]) if p in implied else row for p, row in oracle.items()}
    assert mounted["bin/su"][0] == stat.S_IFREG | 0o4755
    assert mounted["usr/lib/libx.so"][-1] == ()  # its other names were whited out or replaced


def test_seed_example_shows_the_expected_tree(tmp_path: Path, mount: Mounter) -> None:
    example = Path(__file__).parent.parent / "examples" / "build_seed_image.py"
    subprocess.run([sys.executable, str(example), str(tmp_path / "seed")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(example.parent.parent)})  # fmt: skip
    root = mount(f"oci:{tmp_path / 'seed'}")
    assert sorted(os.listdir(root / "etc")) == sorted(
        ["group", "hostname", "hosts", "mtab", "network", "passwd", "resolv.conf", "shadow"]
    )
    assert os.listdir(root / "etc" / "network") == ["newfile"]
    assert os.readlink(root / "etc" / "mtab") == "/proc/mounts"


def test_mount_is_read_only(oci_image: ImageWriter, mount: Mounter) -> None:
    root = mount(oci_image([f("a", b"1"), d("dir/")]))
    for attempt in (
        lambda: os.open(root / "a", os.O_WRONLY),
        lambda: os.open(root / "new", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(root / "dir" / "x"),
        lambda: os.unlink(root / "a"),
        lambda: os.chmod(root / "a", 0o777),
        lambda: os.setxattr(root / "a", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS
    assert (root / "a").read_bytes() == b"1"


def test_random_reads_and_metadata(oci_image: ImageWriter, mount: Mounter) -> None:
    data = os.urandom(5 * 1024 * 1024)
    root = mount(oci_image([f("blob", data, mode=0o600), sym("l", "blob"), d("sub/")]))
    with open(root / "blob", "rb") as handle:
        for offset in (0, 1, 4095, 4096, 1 << 20, len(data) - 3, len(data), len(data) + 100):
            handle.seek(offset)
            assert handle.read(70_000) == data[offset : offset + 70_000]
    info = os.lstat(root / "blob")
    assert (info.st_size, stat.S_IMODE(info.st_mode), info.st_nlink) == (len(data), 0o600, 1)
    assert os.lstat(root / "l").st_size == len("blob")
    assert os.lstat(root / "sub").st_nlink == 2 and os.lstat(root).st_nlink == 3
    vfs = os.statvfs(root)
    assert vfs.f_blocks * vfs.f_frsize >= len(data) and vfs.f_files == 4
    with pytest.raises(OSError) as raised:
        os.getxattr(root / "blob", "user.absent")
    assert raised.value.errno == errno.ENODATA


def test_large_listings_and_xattr_sizes_through_the_kernel(oci_image: ImageWriter, mount: Mounter) -> None:
    # 1,500 names of up to 200 bytes take many READDIR(PLUS) requests, each resumed at the
    # offset the previous one ended with; the listing must come back whole, once each.
    names = [f"{i:04d}-" + "n" * (i % 190) for i in range(1500)]
    root = mount(oci_image([d("big/"), *(f(f"big/{n}", n.encode()) for n in names),
                            f("x", b"1", xattrs={"user.k": "value"})]))  # fmt: skip
    assert sorted(os.listdir(root / "big")) == sorted(names)
    with os.scandir(root / "big") as listing:  # stats every entry, as `ls -l` does
        sizes = {e.name: e.stat(follow_symlinks=False).st_size for e in listing}
    assert sizes == {n: len(n) for n in names}
    libc = ctypes.CDLL(None, use_errno=True)
    path = str(root / "x").encode()
    assert libc.getxattr(path, b"user.k", None, 0) == 5  # size 0 asks how long the value is
    small = ctypes.create_string_buffer(2)
    assert libc.getxattr(path, b"user.k", small, 2) == -1 and ctypes.get_errno() == errno.ERANGE
    assert libc.listxattr(path, None, 0) == len(b"user.k\0")
    assert libc.listxattr(path, small, 2) == -1 and ctypes.get_errno() == errno.ERANGE
    assert os.getxattr(root / "x", "user.k") == b"value" and os.listxattr(root / "x") == ["user.k"]


def test_second_mount_reuses_the_index(oci_image: ImageWriter, mount: Mounter, tmp_path: Path) -> None:
    image = oci_image([f("a", b"1")], [f("b", b"2")])
    first = mount(image)
    index_files = sorted((tmp_path / "cache" / "index").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in index_files]
    second = mount(image)
    assert len(index_files) == 2
    assert [p.stat().st_mtime_ns for p in index_files] == stamps
    assert (second / "b").read_bytes() == (first / "b").read_bytes() == b"2"


def test_signals_unmount_a_foreground_mount(oci_image: ImageWriter, fuse_works: None, tmp_path: Path) -> None:
    image = oci_image([f("a", b"1")])
    for signal_number in (2, 15):  # SIGINT, SIGTERM
        mountpoint = tmp_path / f"fg{signal_number}"
        mountpoint.mkdir()
        server = subprocess.Popen([*_command(tmp_path), "-f", image, str(mountpoint)], stderr=subprocess.PIPE)
        _wait_for(lambda mp=mountpoint: os.path.ismount(mp))
        server.send_signal(signal_number)
        assert server.wait(timeout=20) == 0
        assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize("old_kernel", [False, True], ids=["kernel-skips-open", "as-before-linux-5.1"])
def test_a_warm_walk_and_reread_are_served_by_the_kernel_alone(
    old_kernel: bool, oci_image: ImageWriter, fuse_works: None, tmp_path: Path
) -> None:
    """What the module docstring of unionfs/fuse/ops.py promises: once a tree has been walked
    and a file read, walking and reading again send the server no request at all (libfuse's
    debug log names every request it receives). A kernel that cannot skip OPEN and OPENDIR
    still opens and releases, but lists and reads nothing again."""
    image = oci_image([d("etc"), f("etc/hosts", b"127.0.0.1 localhost\n"), d("usr/bin"), f("usr/bin/sh", b"#!")],
                      [f("usr/bin/ls", b"ls"), wh("etc/hosts"), sym("etc/mtab", "/proc/mounts")])  # fmt: skip
    env = {**os.environ, OLD_KERNEL_VARIABLE: "1" if old_kernel else "0"}
    with _debug_mount(image, tmp_path, env) as (mountpoint, log_path):

        def walk_and_read() -> list[str]:
            seen = sorted(str(p.relative_to(mountpoint)) for p in mountpoint.rglob("*"))
            with open(mountpoint / "usr/bin/ls", "rb", buffering=0) as file:  # no isatty() ioctl
                assert file.read() == b"ls"
            assert os.readlink(mountpoint / "etc/mtab") == "/proc/mounts"
            assert not (mountpoint / "etc/hosts").exists()
            return seen

        first = walk_and_read()
        served = len(log_path.read_bytes())
        assert walk_and_read() == first == ["etc", "etc/mtab", "usr", "usr/bin", "usr/bin/ls", "usr/bin/sh"]
        again = log_path.read_bytes()[served:].decode(errors="replace")
        assert "opcode: READ" in log_path.read_text(errors="replace")  # the log is the one we think
        asked = {line.split("opcode: ")[1].split()[0].rstrip(",") for line in again.splitlines() if "opcode: " in line}
        opening = {"OPEN", "OPENDIR", "FLUSH", "RELEASE", "RELEASEDIR"} if old_kernel else set()
        assert asked <= opening, f"requests on a warm walk: {asked - opening}"
        assert ("OPENDIR" in asked) == old_kernel


def test_a_cold_sequential_read_goes_out_in_reads_as_large_as_can_be_spliced(
    oci_image: ImageWriter, fuse_works: None, tmp_path: Path
) -> None:
    """A read of a large file arrives in READs of lowlevel.read_size() (1008 KiB under the
    default pipe-max-size) that libfuse splices from the cached tar, four of them ahead of the
    reader, where the kernel's own readahead of 128 KiB would ask eight times as often. Only
    root may raise the readahead of a mount; anyone else's READs stay at 128 KiB (and are
    spliced all the same)."""
    from unionfs.fuse.lowlevel import read_size, readahead_size

    content = bytes(range(256)) * (12 * 1024)  # 3 MiB
    image = oci_image([f("big", content)])
    with _debug_mount(image, tmp_path) as (mountpoint, log_path):
        device = os.stat(mountpoint).st_dev
        setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        root = os.geteuid() == 0
        readahead = readahead_size() if root else 128 * 1024
        _wait_for(lambda: int(setting.read_text()) * 1024 == readahead)  # set by a thread, after INIT
        with open(mountpoint / "big", "rb", buffering=0) as file:
            assert file.read(1 << 22) + file.read() == content
        replies = [line.split("outsize: ")[1] for line in log_path.read_text(errors="replace").splitlines()
                   if "success, outsize: " in line]  # fmt: skip
        spliced = [int(reply.split()[0]) - 16 for reply in replies if reply.endswith("(splice)")]
        assert sum(spliced) == len(content) and max(spliced) == (read_size() if root else readahead)


def test_a_large_directory_is_listed_in_one_request_that_links_every_name(
    oci_image: ImageWriter, fuse_works: None, tmp_path: Path
) -> None:
    """1,000 names take about 170 KiB of READDIRPLUS: the directory's st_blksize says so, glibc
    reads it with a buffer that large, and the kernel asks for it all at once (one READDIRPLUS,
    and the empty request that ends every listing) and links every name, so that stat-ing them
    all, as `ls -l` does, sends no LOOKUP."""
    names = [f"file-{i:04d}" for i in range(1000)]
    image = oci_image([d("big"), *(f(f"big/{n}", n.encode()) for n in names)])
    with _debug_mount(image, tmp_path) as (mountpoint, log_path):
        directory = os.stat(mountpoint / "big")
        assert directory.st_blksize == 256 * 1024
        with os.scandir(mountpoint / "big") as listing:
            sizes = {entry.name: entry.stat(follow_symlinks=False).st_size for entry in listing}
        assert sizes == {n: len(n) for n in names}
        asked = [line.split("opcode: ")[1].split()[0] for line in log_path.read_text(errors="replace").splitlines()
                 if "opcode: " in line and f"nodeid: {directory.st_ino}," in line]  # fmt: skip
        listed = [op for op in asked if op in ("READDIRPLUS", "READDIR", "LOOKUP")]  # (not the one OPENDIR: ENOSYS)
        # The ending request is a READDIRPLUS too where the kernel saw the names used in between.
        assert listed in (["READDIRPLUS", "READDIR"], ["READDIRPLUS", "READDIRPLUS"]), asked


def test_a_worker_thread_keeps_its_python_state_from_one_request_to_the_next(fuse_works: None,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    """libfuse's worker threads are not Python's: ctypes runs each callback in a Python
    thread state made for that call alone, unless the Session keeps one per thread (a thread
    state costs a 16 KiB mapping and its setup on every request). A thread-local value set by
    one request is there for the next request served by the same (only) worker."""
    import threading

    from unionfs.entry import Attributes
    from unionfs.fuse import lowlevel

    per_thread = threading.local()
    counts: list[int] = []

    def getattr_(req: int, ino: int, fi: int) -> None:
        record = lowlevel.attr_record(Attributes(1, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, 0), 0)
        lowlevel.reply_buf(req, record, len(record))

    def lookup(req: int, parent: int, name: bytes) -> None:
        per_thread.count = getattr(per_thread, "count", 0) + 1
        counts.append(per_thread.count)
        lowlevel.reply_err(req, errno.ENOENT)

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()

    def ask_then_unmount() -> None:
        try:
            _wait_for(lambda: os.path.ismount(mountpoint))
            for number in range(5):
                assert not os.path.lexists(mountpoint / f"missing{number}")  # one LOOKUP each
        finally:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)

    session = lowlevel.Session({"getattr": getattr_, "lookup": lookup}, ["ro", "fsname=thread-state-test"])
    client = threading.Thread(target=ask_then_unmount)
    python_sigint = signal.getsignal(signal.SIGINT)
    client.start()
    try:
        session.serve(str(mountpoint), threads=1)  # in the main thread: libfuse installs signal handlers
    finally:
        signal.signal(signal.SIGINT, python_sigint)
        session.close()
        client.join()
    assert counts == [1, 2, 3, 4, 5]


@contextlib.contextmanager
def _debug_mount(image: str, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Path, Path]]:
    """Mounts `image` in the foreground with libfuse's debug log (every request it receives)
    in a file; yields (mountpoint, log path); stops the server with SIGTERM, which must end
    it cleanly."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log_path = tmp_path / "debug.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([*_command(tmp_path), "-f", "-o", "debug", image, str(mountpoint)], stderr=log,
                                  env=env)  # fmt: skip
    try:
        _wait_for(lambda: os.path.ismount(mountpoint))
        yield mountpoint, log_path
    finally:
        server.send_signal(15)
        assert server.wait(timeout=20) == 0


def _command(tmp_path: Path) -> list[str]:
    from tests.conftest import COMMAND

    return [*COMMAND, "--cache-dir", str(tmp_path / "cache")]


def _wait_for(condition, seconds: float = 30) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_layer_tar_cut_short_under_the_mount_reads_as_eio(
    oci_image: ImageWriter, mount: Mounter, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20)
    root = mount(oci_image([f("data", data)]))
    (cached,) = (tmp_path / "cache" / "tars").glob("*.tar")
    os.truncate(cached, 4096)
    with pytest.raises(OSError) as raised:
        (root / "data").read_bytes()
    assert raised.value.errno == errno.EIO
    assert os.path.ismount(root)  # one bad read does not bring the mount down
