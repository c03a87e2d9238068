"""The same mount made by an unprivileged user: no root, no overlayfs, just /dev/fuse.

Setup (as root, as on an ordinary distribution): a user `crfs-rootless`, /dev/fuse mode
0666, and a virtual environment of /usr/bin/python3 outside /root (which that user cannot
traverse) with crfs-merge installed from this checkout. All of it is undone when the module's
tests end: the user is deleted (with its home) if the tests created it, /dev/fuse gets its
mode back, and the venv lives in a temporary directory under /tmp that is removed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from tests.conftest import COMMAND, require
from tests.tarvocab import d, f, opq, tar_of, wh

USER = "crfs-rootless"
REPO = Path(__file__).resolve().parent.parent
USER_GONE_SECONDS = 10  # for the user's FUSE servers to exit after their unmount


def _as_user(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", *command], capture_output=True, text=True,
                          timeout=120, check=check)  # fmt: skip


def _install_venv(venv: Path) -> Path:
    """Returns the crfs-merge of a new venv at `venv` with this checkout installed."""
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, capture_output=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return venv / "bin" / "crfs-merge"


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _delete_user() -> None:
    """Deletes the test user and its home once its last process (a FUSE server that is
    still exiting after its unmount) is gone; userdel refuses a user with processes."""
    uid = pwd.getpwnam(USER).pw_uid
    deadline = time.monotonic() + USER_GONE_SECONDS
    while _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["userdel", "--remove", USER], check=True, capture_output=True)


@pytest.fixture(scope="module")
def rootless_command(fuse_works: None) -> Iterator[Path]:
    """Returns the crfs-merge that the user can run; undoes every change to the machine after."""
    require(os.geteuid() == 0, "setting up the rootless user needs root")
    require(Path("/usr/bin/python3").exists(), "/usr/bin/python3 is missing")
    require(shutil.which("runuser") is not None, "runuser is missing")
    try:
        pwd.getpwnam(USER)
        created_user = False
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        created_user = True
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    venv_dir = Path(tempfile.mkdtemp(prefix="crfs-rootless-venv-", dir="/tmp"))
    try:
        venv_dir.chmod(0o755)  # the user runs the venv's python
        os.chmod("/dev/fuse", 0o666)
        yield _install_venv(venv_dir / "venv")
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        shutil.rmtree(venv_dir, ignore_errors=True)
        if created_user:
            _delete_user()


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="crfs-rootless-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["fusermount3", "-uz", str(path / "mnt")], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def test_unprivileged_user_mounts_and_the_kernel_enforces_permissions(
    rootless_command: Path, world_readable_dir: Path
) -> None:
    image = world_readable_dir / "image"
    lower = tar_of(d("etc/"), f("etc/hosts", b"127.0.0.1\n"), f("etc/shadow", b"root:secret", mode=0o600),
                   d("var/cache/"), f("var/cache/old", b"o"), f("etc/motd", b"m"))  # fmt: skip
    upper = tar_of(wh("etc/motd"), opq("var/cache"), f("var/cache/new", b"n"))
    write_layout(image, [lower, upper])
    subprocess.run(["chmod", "-R", "a+rX", str(image)], check=True)
    user = pwd.getpwnam(USER)
    for name in ("mnt", "cache"):
        (world_readable_dir / name).mkdir()
        os.chown(world_readable_dir / name, user.pw_uid, user.pw_gid)
    mnt = world_readable_dir / "mnt"

    _as_user(str(rootless_command), "--cache-dir", str(world_readable_dir / "cache"), f"oci:{image}", str(mnt))
    try:
        assert f"user_id={user.pw_uid}" in Path("/proc/mounts").read_text().split(str(mnt))[1].split("\n")[0]
        assert _as_user("ls", "-A", str(mnt / "etc")).stdout.split() == ["hosts", "shadow"]
        assert _as_user("ls", "-A", str(mnt / "var/cache")).stdout.split() == ["new"]
        assert _as_user("cat", str(mnt / "etc/hosts")).stdout == "127.0.0.1\n"
        denied = _as_user("cat", str(mnt / "etc/shadow"), check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        with pytest.raises(PermissionError):  # the mount is the user's: root sees it only with allow_other
            os.stat(mnt / "etc")
        assert stat.S_IMODE(int(_as_user("stat", "-c", "%a", str(mnt / "etc/shadow")).stdout, 8)) == 0o600
    finally:
        _as_user("fusermount3", "-u", str(mnt), check=False)
    assert not os.path.ismount(mnt)


def test_missing_fusermount3_is_a_clear_error(rootless_command: Path, world_readable_dir: Path) -> None:
    """An unprivileged mount needs the setuid fusermount3; without it, say so before any work."""
    run = _as_user("env", "PATH=/nonexistent", str(rootless_command), "oci:/x", str(world_readable_dir), check=False)
    assert run.returncode == 2 and "fusermount3 is not installed" in run.stderr


def test_allow_other_lets_another_user_in_under_the_image_permissions(
    rootless_command: Path, world_readable_dir: Path, tmp_path: Path
) -> None:
    """-o passes through: root mounts with allow_other, and default_permissions still keeps
    the image's private files from another user."""
    require(os.geteuid() == 0, "mounting for another user needs root")
    image = world_readable_dir / "image"
    write_layout(image, [tar_of(f("public", b"p", mode=0o644), f("private", b"s", mode=0o600))])
    subprocess.run(["chmod", "-R", "a+rX", str(image)], check=True)
    mnt = world_readable_dir / "mnt"
    mnt.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "-o", "allow_other", f"oci:{image}", str(mnt)],
                   check=True, timeout=60)  # fmt: skip
    try:
        assert _as_user("cat", str(mnt / "public")).stdout == "p"
        assert "Permission denied" in _as_user("cat", str(mnt / "private"), check=False).stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
