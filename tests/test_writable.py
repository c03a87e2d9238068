"""The writable mount (`--upper DIR`) through real FUSE mounts: what lands in DIR (OCI diff form),
what survives a remount, what is refused, hardlinks and inode numbers across copy-up, crashes,
a full disk, and a commit of DIR that mounts as the writable mount showed.

Errno-for-errno parity with kernel overlayfs over random operation sequences is
tests/test_writable_differential.py; real programs (dpkg, git, sqlite...) are
tests/test_writable_programs.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import COMMAND, ImageWriter, Mounter, require, unmount
from tests.tarvocab import d, f, hl, opq, sym, wh
from tests.tree_walk import describe_tree

BIG = 24 * 1024 * 1024


def _layers() -> list[list]:  # type: ignore[type-arg]
    base = [d("etc"), f("etc/hostname", b"seed\n"), f("etc/passwd", b"root:x:0:0\n"), d("etc/network"),
            f("etc/network/interfaces", b"auto lo\n"), d("usr"), d("usr/lib"), f("usr/lib/big", _big()),
            f("usr/lib/one", b"hardlinked\n"), hl("usr/lib/two", "usr/lib/one"), sym("usr/lib/link", "one"),
            d("var"), d("var/cache"), f("var/cache/a", b"a"), f("var/cache/b", b"b"),
            f("srv", b"file", mode=0o4755, uid=7, gid=8)]  # fmt: skip
    top = [wh("var/cache/a"), opq("etc/network"), f("etc/network/new", b"new\n")]
    return [base, top]


def _big() -> bytes:
    return hashlib.sha256(b"seed").digest() * (BIG // 32)


@pytest.fixture
def image(oci_image: ImageWriter) -> str:
    return oci_image(*_layers())


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    return tmp_path / "upper"


def _errno(action: Callable[[], object]) -> int:
    try:
        action()
    except OSError as exc:
        return exc.errno or 0
    return 0


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_changes_land_in_the_upper_directory_as_an_oci_diff(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    (mnt / "etc/hostname").write_bytes(b"changed\n")
    (mnt / "etc/new").write_bytes(b"created\n")
    (mnt / "etc/passwd").unlink()
    for name in os.listdir(mnt / "etc/network"):
        (mnt / "etc/network" / name).unlink()
    (mnt / "etc/network").rmdir()
    (mnt / "etc/network").mkdir()
    (mnt / "etc/network/fresh").write_bytes(b"fresh\n")
    assert _names(mnt / "etc") == ["hostname", "network", "new"]
    assert _names(mnt / "etc/network") == ["fresh"]
    assert (upper / "etc/hostname").read_bytes() == b"changed\n"
    assert (upper / "etc/new").read_bytes() == b"created\n"
    assert (upper / "etc/.wh.passwd").stat().st_size == 0
    assert (upper / "etc/network/.wh..wh..opq").exists(), "a directory made where a lower one was must be opaque"
    assert not (upper / "usr").exists(), "nothing is copied up that was not changed"
    assert not any(".wh." in name for name in os.listdir(mnt / "etc"))


def test_the_image_layers_are_never_written(image: str, upper: Path, mount: Mounter, tmp_path: Path) -> None:
    layout = Path(image.split(":")[1])
    before = {p: p.read_bytes() for p in layout.rglob("*") if p.is_file()}
    cache_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    mnt = mount(image, "--upper", str(upper))
    with open(mnt / "usr/lib/big", "r+b") as handle:
        handle.write(b"X" * 100)
    (mnt / "usr/lib/one").chmod(0o600)
    assert {p: p.read_bytes() for p in layout.rglob("*") if p.is_file()} == before
    for path, stamp in cache_before.items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was written"


def test_changes_survive_a_remount(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    (mnt / "etc/hostname").write_bytes(b"kept\n")
    (mnt / "var/cache/b").unlink()
    (mnt / "etc/dir").mkdir(mode=0o750)
    os.chown(mnt / "etc/dir", 1234, 5678)
    os.symlink("../usr", mnt / "etc/up")
    first = describe_tree(mnt)
    unmount(mnt)
    again = mount(image, "--upper", str(upper))
    assert describe_tree(again) == first
    assert (again / "etc/hostname").read_bytes() == b"kept\n"
    assert not (again / "var/cache/b").exists()


def test_an_upper_directory_is_refused_for_another_image(image: str, upper: Path, mount: Mounter,
                                                        oci_image: ImageWriter, tmp_path: Path) -> None:  # fmt: skip
    mnt = mount(image, "--upper", str(upper))
    (mnt / "etc/hostname").write_bytes(b"x\n")
    unmount(mnt)
    other = oci_image([d("etc"), f("etc/hostname", b"other\n")])
    target = tmp_path / "other-mnt"
    target.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper), other,
                          str(target)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds changes to image sha256:" in lines[0], run.stderr
    assert not os.path.ismount(target)


def test_a_second_mount_of_one_upper_directory_is_refused(image: str, upper: Path, mount: Mounter,
                                                          tmp_path: Path) -> None:  # fmt: skip
    mount(image, "--upper", str(upper))
    target = tmp_path / "second"
    target.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper), image,
                          str(target)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "another crfs-merge mount is writing to it" in run.stderr
    assert not os.path.ismount(target)


def test_whiteout_names_are_refused_and_never_shown(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    assert _errno(lambda: (mnt / ".wh.x").write_bytes(b"")) == errno.EINVAL
    assert _errno(lambda: (mnt / "etc/.wh..wh..opq").mkdir()) == errno.EINVAL
    assert _errno(lambda: os.symlink("x", mnt / ".wh.y")) == errno.EINVAL
    assert _errno(lambda: os.link(mnt / "etc/hostname", mnt / "etc/.wh.hostname")) == errno.EINVAL
    assert _errno(lambda: os.rename(mnt / "etc/hostname", mnt / "etc/.wh.z")) == errno.EINVAL
    (mnt / "etc/passwd").unlink()
    assert _errno(lambda: os.stat(mnt / "etc/.wh.passwd")) == errno.ENOENT
    assert not [n for _, dirs, files in os.walk(mnt) for n in dirs + files if n.startswith(".wh.")]


def test_a_lower_directory_rename_is_exdev_and_mv_falls_back(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    assert _errno(lambda: os.rename(mnt / "etc", mnt / "etc2")) == errno.EXDEV
    subprocess.run(["mv", str(mnt / "usr"), str(mnt / "usr2")], check=True)
    assert not (mnt / "usr").exists()
    assert (mnt / "usr2/lib/big").read_bytes() == _big()
    (mnt / "made").mkdir()
    (mnt / "made/file").write_bytes(b"x")
    os.rename(mnt / "made", mnt / "moved")  # made in the upper: renames as anywhere
    assert (mnt / "moved/file").read_bytes() == b"x"


def test_a_hardlinked_lower_file_stays_one_inode_after_copy_up(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    one, two = mnt / "usr/lib/one", mnt / "usr/lib/two"
    before = one.stat()
    assert before.st_ino == two.stat().st_ino and before.st_nlink == 2
    with open(two, "ab") as handle:
        handle.write(b"appended\n")
    assert one.read_bytes() == b"hardlinked\nappended\n"
    assert one.stat().st_ino == two.stat().st_ino == before.st_ino
    assert one.stat().st_nlink == 2
    assert (upper / "usr/lib/one").stat().st_ino == (upper / "usr/lib/two").stat().st_ino


def test_inode_numbers_stay_through_copy_up(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    paths = ["etc/hostname", "usr/lib/big", "srv", "usr/lib/link"]
    before = {p: os.lstat(mnt / p).st_ino for p in paths}
    (mnt / "etc/hostname").write_bytes(b"new\n")
    with open(mnt / "usr/lib/big", "r+b") as handle:
        handle.seek(BIG - 1)
        handle.write(b"!")
    os.chmod(mnt / "srv", 0o700)
    os.chown(mnt / "usr/lib/link", 3, 4, follow_symlinks=False)
    assert {p: os.lstat(mnt / p).st_ino for p in paths} == before


def test_a_copy_up_keeps_metadata_and_bytes(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    before = os.stat(mnt / "srv")
    with open(mnt / "usr/lib/big", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"HELLO")
    expected = bytearray(_big())
    expected[1000:1005] = b"HELLO"
    assert (mnt / "usr/lib/big").read_bytes() == bytes(expected)
    os.utime(mnt / "srv", ns=(before.st_atime_ns, 1_500_000_000_000_000_000))
    after = os.stat(mnt / "srv")
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o4755, 7, 8)
    assert after.st_mtime_ns == 1_500_000_000_000_000_000


def test_a_commit_mounts_as_the_writable_mount_showed(image: str, upper: Path, mount: Mounter,
                                                      tmp_path: Path) -> None:  # fmt: skip
    mnt = mount(image, "--upper", str(upper))
    (mnt / "etc/hostname").write_bytes(b"committed\n")
    subprocess.run(["rm", "-rf", str(mnt / "var/cache")], check=True)
    (mnt / "var/cache").mkdir()
    (mnt / "var/cache/c").write_bytes(b"c")
    os.link(mnt / "usr/lib/one", mnt / "etc/three")
    os.mkfifo(mnt / "etc/pipe")
    os.chown(mnt / "etc/passwd", 42, 43)
    os.setxattr(mnt / "etc/passwd", "user.note", b"kept")
    shown = describe_tree(mnt, skip_dir_mtime=True)
    unmount(mnt)
    assert _committed_tree(image, upper, mount, tmp_path) == shown


def _committed_tree(image: str, upper: Path, mount: Mounter, tmp_path: Path) -> dict[str, tuple[object, ...]]:
    """The tree of IMAGE plus the layer `crfs-merge commit` makes of `upper`, mounted read-only."""
    dest = f"oci:{tmp_path / 'committed'}:v2"
    run = subprocess.run([*COMMAND, "commit", "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper), image,
                          dest], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return describe_tree(mount(dest), skip_dir_mtime=True)


def test_sigkill_during_copy_ups_never_shows_half_a_file(image: str, upper: Path, mount: Mounter) -> None:
    for round_number in range(3):
        mnt = mount(image, "--upper", str(upper))
        writer = subprocess.Popen(["sh", "-c", f"echo tail >> {mnt}/usr/lib/big"])
        time.sleep(0.02 * round_number)
        server = _server_pid(mnt)
        os.kill(server, signal.SIGKILL)
        writer.wait(timeout=30)
        unmount(mnt)
        copied = upper / "usr/lib/big"
        if copied.exists():
            data = copied.read_bytes()
            whole = [_big() + b"tail\n" * appended for appended in range(round_number + 2)]
            assert data in whole, f"round {round_number}: {len(data)} bytes, not the lower file with whole appends"
        assert not [p for p in upper.rglob("*") if ".wh..wh.crfs" in p.name]
    again = mount(image, "--upper", str(upper))
    assert (again / "usr/lib/big").read_bytes().startswith(_big())


def _server_pid(mountpoint: Path) -> int:
    found = subprocess.run(["pgrep", "-f", f"unionfs.cli.*{mountpoint}"], capture_output=True, text=True).stdout
    pids = [int(p) for p in found.split()]
    assert pids, "no server process"
    return pids[0]


def test_a_full_disk_is_enospc_to_the_writer_and_nothing_is_lost(image: str, mount: Mounter, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        mnt = mount(image, "--upper", str(small / "upper"))
        (mnt / "etc/hostname").write_bytes(b"before\n")
        with pytest.raises(OSError) as raised, open(mnt / "fill", "wb") as handle:
            for _ in range(64):
                handle.write(b"x" * 65536)
                handle.flush()
            os.fsync(handle.fileno())
        assert raised.value.errno == errno.ENOSPC
        assert _errno(lambda: (mnt / "usr/lib/big").open("ab").write(b"more")) == errno.ENOSPC
        (mnt / "fill").unlink()
        assert (mnt / "etc/hostname").read_bytes() == b"before\n"
        assert (mnt / "usr/lib/big").read_bytes() == _big(), "a failed copy-up must leave the lower file showing"
        (mnt / "after").write_bytes(b"room again\n")
        assert (mnt / "after").read_bytes() == b"room again\n"
        unmount(mnt)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


_WORKER = r"""
import os, sys
root, number = sys.argv[1], int(sys.argv[2])
shared = os.path.join(root, "var/shared")
os.makedirs(shared, exist_ok=True)
mine = os.path.join(root, f"etc/network/w{number}")
os.mkdir(mine)
for j in range(60):
    made = os.path.join(shared, f"w{number}-{j}")
    with open(made, "wb") as handle:
        handle.write(f"{number}:{j}\n".encode() * 50)
    os.rename(made, os.path.join(mine, f"r{j}"))
    if j % 3 == 0:
        os.unlink(os.path.join(mine, f"r{j}"))
    with open(os.path.join(root, "etc/hostname"), "ab") as log:
        log.write(f"line {number} {j}\n".encode())
    os.listdir(os.path.join(root, "etc/network"))
"""


def test_sixteen_processes_create_write_rename_and_delete_at_once(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    (mnt / "var/shared").mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(mnt), str(n)], stderr=subprocess.PIPE)
               for n in range(16)]  # fmt: skip
    for worker in workers:
        _, errors = worker.communicate(timeout=300)
        assert worker.returncode == 0, errors.decode()
    assert os.listdir(mnt / "var/shared") == []
    for n in range(16):
        kept = sorted(os.listdir(mnt / f"etc/network/w{n}"))
        assert kept == sorted(f"r{j}" for j in range(60) if j % 3), n
        assert (mnt / f"etc/network/w{n}/r1").read_bytes() == f"{n}:1\n".encode() * 50
    lines = (mnt / "etc/hostname").read_bytes().split(b"\n")
    assert lines[0] == b"seed", "the copy-up happened once, before every append"
    assert sorted(lines[1:-1]) == sorted(f"line {n} {j}".encode() for n in range(16) for j in range(60))
    shown = describe_tree(mnt)
    unmount(mnt)
    assert describe_tree(mount(image, "--upper", str(upper))) == shown


def test_chown_r_copies_metadata_only_and_the_bytes_come_later(image: str, upper: Path, mount: Mounter,
                                                               tmp_path: Path) -> None:  # fmt: skip
    mnt = mount(image, "--upper", str(upper))
    subprocess.run(["chown", "-R", "1000:1000", str(mnt / "usr")], check=True)
    copy = upper / "usr/lib/big"
    assert copy.stat().st_size == BIG and copy.stat().st_blocks * 512 < BIG // 100, "no bytes copied by chown"
    assert os.stat(mnt / "usr/lib/big").st_uid == 1000
    assert (mnt / "usr/lib/big").read_bytes() == _big()
    unmount(mnt)
    mnt = mount(image, "--upper", str(upper))
    assert (mnt / "usr/lib/big").read_bytes() == _big(), "a remount still reads a metadata-only copy's bytes"
    assert os.stat(mnt / "usr/lib/one").st_ino == os.stat(mnt / "usr/lib/two").st_ino
    with open(mnt / "usr/lib/big", "r+b") as handle:
        handle.write(b"NEW")
    assert (mnt / "usr/lib/big").read_bytes() == b"NEW" + _big()[3:]
    assert copy.stat().st_blocks * 512 >= BIG
    assert os.stat(mnt / "usr/lib/big").st_uid == 1000
    shown = describe_tree(mnt, skip_dir_mtime=True)
    unmount(mnt)
    assert _committed_tree(image, upper, mount, tmp_path) == shown


def test_commit_refuses_an_upper_directory_in_use(image: str, upper: Path, mount: Mounter, tmp_path: Path) -> None:
    mount(image, "--upper", str(upper))
    run = subprocess.run([*COMMAND, "commit", "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper), image,
                          f"oci:{tmp_path / 'out'}:x"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1 and "a writable mount is using it" in run.stderr, run.stderr


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def test_the_file_operations_programs_use(image: str, upper: Path, mount: Mounter) -> None:
    mnt = mount(image, "--upper", str(upper))
    made = mnt / "etc/made"
    fd = os.open(made, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    assert _errno(lambda: os.open(made, os.O_CREAT | os.O_EXCL | os.O_RDWR)) == errno.EEXIST
    os.pwrite(fd, b"0123456789", 0)
    os.posix_fallocate(fd, 0, 1 << 20)
    assert os.fstat(fd).st_size == 1 << 20
    os.ftruncate(fd, 4096)
    with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
        mapped[0:5] = b"MMAP!"
        mapped.flush()
    os.fdatasync(fd)
    os.fsync(fd)
    os.close(fd)
    assert made.read_bytes()[:10] == b"MMAP!56789"
    with open(mnt / "etc/hostname", "ab") as appending:  # a lower file: copied up, then appended to
        appending.write(b"tail\n")
    assert (mnt / "etc/hostname").read_bytes() == b"seed\ntail\n"
    with open(mnt / "etc/hostname", "r+b") as locked:
        fcntl.flock(locked, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(locked, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        other = os.open(mnt / "etc/hostname", os.O_RDONLY)
        assert _errno(lambda: fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)) == errno.EWOULDBLOCK
        os.close(other)
    noreplace, exchange = 1, 2
    assert _errno(lambda: _renameat2(mnt / "etc/made", mnt / "etc/hostname", noreplace)) == errno.EEXIST
    _renameat2(mnt / "etc/made", mnt / "etc/passwd", exchange)
    assert (mnt / "etc/made").read_bytes() == b"root:x:0:0\n"
    assert (mnt / "etc/passwd").read_bytes()[:5] == b"MMAP!"
    os.mkfifo(mnt / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    os.setxattr(mnt / "etc/hostname", "user.a", b"1", os.XATTR_CREATE)
    assert _errno(lambda: os.setxattr(mnt / "etc/hostname", "user.a", b"2", os.XATTR_CREATE)) == errno.EEXIST
    assert _errno(lambda: os.setxattr(mnt / "etc/hostname", "user.b", b"2", os.XATTR_REPLACE)) == errno.ENODATA
    own = "user.containers.override_stat"  # the mount's own bookkeeping: not settable through it
    assert _errno(lambda: os.setxattr(mnt / "etc/hostname", own, b"0:0:777")) == errno.EPERM
    os.removexattr(mnt / "etc/hostname", "user.a")
    assert os.listxattr(mnt / "etc/hostname") == []
    statfs = os.statvfs(mnt)
    assert statfs.f_bavail > 0 and statfs.f_namemax == 255


def test_a_file_unlinked_while_open_stays_usable_through_its_descriptor(image: str, upper: Path,
                                                                        mount: Mounter) -> None:  # fmt: skip
    mnt = mount(image, "--upper", str(upper))
    fd = os.open(mnt / "scratch", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"abc")
    os.unlink(mnt / "scratch")
    os.write(fd, b"def")
    os.fchmod(fd, 0o640)
    os.setxattr(fd, "user.k", b"v")
    info = os.fstat(fd)
    assert (info.st_size, info.st_nlink, stat.S_IMODE(info.st_mode)) == (6, 0, 0o640)
    assert os.pread(fd, 10, 0) == b"abcdef" and os.getxattr(fd, "user.k") == b"v"
    os.close(fd)
    lower = os.open(mnt / "etc/passwd", os.O_RDONLY)
    os.unlink(mnt / "etc/passwd")
    assert os.pread(lower, 100, 0) == b"root:x:0:0\n", "a lower file unlinked while open still reads"
    os.close(lower)
    assert sorted(os.listdir(upper)) == ["etc"], "nothing left of the unlinked file in DIR"
    assert stat.S_IMODE(os.stat(upper).st_mode) == 0o755, "DIR itself untouched"


def test_tar_archives_a_tree_right_after_a_change_deep_below(oci_image: ImageWriter, upper: Path,
                                                             mount: Mounter) -> None:  # fmt: skip
    """A change two levels down copies up the directories above it, whose size and link count
    then become DIR's: the kernel, which cached the old ones, is told to forget them, or GNU
    tar's stats before and after reading a directory differ ("file changed as we read it")."""
    image = oci_image([d("a"), d("a/b"), d("a/b/c"), d("a/b/d"), f("a/b/c/file", b"x"), f("a/top", b"t")])
    mnt = mount(image, "--upper", str(upper))
    before = os.stat(mnt / "a")  # cached by the kernel
    (mnt / "a/b/c/new").write_bytes(b"new")
    after = os.stat(mnt / "a")
    assert (after.st_size, after.st_nlink) == (os.stat(upper / "a").st_size, 1) != (before.st_size, before.st_nlink)
    (mnt / "a/b/d/new").write_bytes(b"new")
    run = subprocess.run(["tar", "-cf", "/dev/null", "-C", str(mnt), "a"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_inode_numbers_stay_across_a_remount(image: str, upper: Path, mount: Mounter) -> None:
    """git's index, for one, keeps inode numbers: a file made in DIR and a copied-up one keep
    theirs from one mount to the next (the copied-up one its image number)."""
    mnt = mount(image, "--upper", str(upper))
    image_number = os.stat(mnt / "etc/hostname").st_ino
    (mnt / "etc/hostname").write_bytes(b"copied\n")
    (mnt / "made").write_bytes(b"made\n")
    (mnt / "dir").mkdir()
    before = {p: os.lstat(mnt / p).st_ino for p in ("etc/hostname", "made", "dir", "etc")}
    assert before["etc/hostname"] == image_number
    unmount(mnt)
    mnt = mount(image, "--upper", str(upper))
    assert {p: os.lstat(mnt / p).st_ino for p in before} == before


def test_removing_one_name_of_an_image_hardlink_pair_leaves_one_link(image: str, upper: Path,
                                                                     mount: Mounter) -> None:  # fmt: skip
    mnt = mount(image, "--upper", str(upper))
    (mnt / "usr/lib/one").unlink()
    assert os.stat(mnt / "usr/lib/two").st_nlink == 1, "as kernel overlayfs counts it"
    assert (mnt / "usr/lib/two").read_bytes() == b"hardlinked\n"


def test_a_mount_or_commit_right_after_an_unmount_is_not_refused(image: str, upper: Path, mount: Mounter,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """fusermount3 -u returns before the old server has exited and let go of its locks; a
    script that mounts or commits at once must not be refused for that moment."""
    mnt = mount(image, "--upper", str(upper))
    for round_number in range(6):
        (mnt / f"round-{round_number}").write_bytes(b"x")
        unmount(mnt)
        mnt = mount(image, "--upper", str(upper))
    unmount(mnt)
    dest = f"oci:{tmp_path / 'committed'}:latest"
    run = subprocess.run([*COMMAND, "commit", "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper), image,
                          dest], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in upper.glob("round-*")) == [f"round-{n}" for n in range(6)]
