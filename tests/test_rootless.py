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
from tests.tarvocab import d, dev, f, opq, tar_of, wh

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
    # A test that failed inside `unshare --mount` leaves its server serving a mount no one
    # else can see, holding files here: stop the user's processes before removing them.
    subprocess.run(["pkill", "-u", USER], capture_output=True)
    deadline = time.monotonic() + USER_GONE_SECONDS
    while _processes_of(pwd.getpwnam(USER).pw_uid) and time.monotonic() < deadline:
        time.sleep(0.1)
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


# ---------------------------------------------------------------- writable, in a user namespace


def _in_user_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Runs `script` as the user inside `unshare --map-root-user --mount`: the user is root
    there (one id mapped), may mount FUSE and chroot, and the mount is gone with the namespace."""
    return _as_user("unshare", "--map-root-user", "--mount", "sh", "-euc", script, check=False)


def test_copy_up_keeps_owners_and_devices_the_user_cannot_set_in_override_stat(
    rootless_command: Path, world_readable_dir: Path, tmp_path: Path, fuse_works: None
) -> None:
    """In the namespace only the user's id is mapped. The kernel lets no one there write to a
    file whose owner is not mapped, but a change below a directory owned by uid 100 copies that
    directory up, and a chmod copies up a device node: neither can be made so on disk, so the
    upper directory keeps them in user.containers.override_stat, and a commit restores them."""
    require(shutil.which("unshare") is not None, "unshare is missing")
    image = world_readable_dir / "image"
    write_layout(image, [tar_of(d("srv/", mode=0o750, uid=100, gid=0), d("srv/sub/"),
                                f("srv/sub/file", b"data\n"),
                                d("dev/"), dev("dev/null", "c", 1, 3), f("plain", b"p"))])  # fmt: skip
    subprocess.run(["chmod", "-R", "a+rX", str(image)], check=True)
    user = pwd.getpwnam(USER)
    base = world_readable_dir / "home"
    base.mkdir()
    os.chown(base, user.pw_uid, user.pw_gid)
    upper, mnt = base / "upper", base / "mnt"
    run = _in_user_namespace(f"""
        export XDG_STATE_HOME={base}/state
        mkdir -p {mnt}
        {rootless_command} --cache-dir {base}/cache --upper {upper} oci:{image} {mnt}
        echo more >> {mnt}/srv/sub/file
        echo made > {mnt}/srv/sub/made
        chmod 644 {mnt}/dev/null
        echo new > {mnt}/made
        stat -c '%u %a %F' {mnt}/made {mnt}/dev/null
        fusermount3 -u {mnt}
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["0 644 regular file", "0 644 character special file"]
    assert os.stat(upper / "made").st_uid == user.pw_uid, "what the user made is the user's own, on disk"
    assert os.getxattr(upper / "srv", "user.containers.override_stat") == b"100:0:750"
    assert os.getxattr(upper / "dev/null", "user.containers.override_stat").startswith(b"0:0:644:char-1-3")
    # The commit runs in a namespace like the mount's, where the user's files are root's.
    dest = base / "committed"
    committed = _in_user_namespace(f"{rootless_command} commit --cache-dir {base}/cache --upper {upper} "
                                   f"oci:{image} oci:{dest}:v2")  # fmt: skip
    assert committed.returncode == 0, committed.stderr
    mnt_root = tmp_path / "ro"
    mnt_root.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), f"oci:{dest}:v2", str(mnt_root)], check=True)
    try:
        owned, null = os.stat(mnt_root / "srv"), os.stat(mnt_root / "dev/null")
        assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (100, 0, 0o750)
        assert (mnt_root / "srv/sub/file").read_bytes() == b"data\nmore\n"
        assert os.stat(mnt_root / "srv/sub/made").st_uid == 0, "the namespace's root made it: root in the image"
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o644
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt_root)], check=True)


def _hello_deb(work: Path) -> Path:
    """A package with a maintainer script, built with dpkg-deb."""
    require(shutil.which("dpkg-deb") is not None, "dpkg-deb is missing")
    root = work / "hello-pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/hello-crfs").mkdir(parents=True)
    control = "Package: hello-crfs\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: t\n"
    (root / "DEBIAN/control").write_text(control)
    (root / "DEBIAN/postinst").write_text("#!/bin/sh\nset -e\necho configured > /var/lib/hello-crfs\n")
    (root / "DEBIAN/postinst").chmod(0o755)
    (root / "usr/share/hello-crfs/greeting").write_text("hello\n")
    deb = work / "hello-crfs.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    deb.chmod(0o644)
    return deb


def test_dpkg_installs_a_package_in_a_rootless_writable_mount(
    rootless_command: Path, world_readable_dir: Path, tmp_path: Path
) -> None:
    """README's recipe: the user mounts a Debian image writable inside `unshare --map-root-user
    --mount`, chroots into it and installs a package; then commits, in the same kind of
    namespace, and the committed image has the package installed."""
    from benchmarks.bench_overlay import DEFAULT_BUILD_CACHE
    from benchmarks.overlay_images import debian_base

    require(shutil.which("debootstrap") is not None or (DEFAULT_BUILD_CACHE / "debian-bookworm-minbase-amd64.tar")
            .exists(), "debootstrap is missing (apt-get install debootstrap)")  # fmt: skip
    base_tar, _ = debian_base(DEFAULT_BUILD_CACHE, tmp_path)
    image = world_readable_dir / "debian"
    write_layout(image, [base_tar.read_bytes()])
    deb = _hello_deb(world_readable_dir)
    subprocess.run(["chmod", "-R", "a+rX", str(world_readable_dir)], check=True)
    user = pwd.getpwnam(USER)
    home = world_readable_dir / "home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    upper, mnt, dest = home / "changes", home / "rootfs", home / "committed"
    run = _in_user_namespace(f"""
        export XDG_STATE_HOME={home}/state
        mkdir -p {mnt}
        {rootless_command} --cache-dir {home}/cache --upper {upper} oci:{image} {mnt}
        cp {deb} {mnt}/tmp/
        chroot {mnt} /usr/bin/dpkg -i /tmp/hello-crfs.deb
        chroot {mnt} /usr/bin/dpkg -s hello-crfs
        chroot {mnt} /bin/cat /var/lib/hello-crfs
        rm {mnt}/tmp/hello-crfs.deb
        fusermount3 -u {mnt}
        {rootless_command} commit --cache-dir {home}/cache --upper {upper} oci:{image} oci:{dest}:v2
    """)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Status: install ok installed" in run.stdout and "configured" in run.stdout
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), f"oci:{dest}:v2", str(readonly)], check=True)
    try:
        status = subprocess.run(["chroot", str(readonly), "/usr/bin/dpkg", "-s", "hello-crfs"], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        assert "Status: install ok installed" in status
        greeting = readonly / "usr/share/hello-crfs/greeting"
        assert greeting.read_text() == "hello\n" and greeting.stat().st_uid == 0
        assert not (readonly / "tmp/hello-crfs.deb").exists()
    finally:
        subprocess.run(["fusermount3", "-u", str(readonly)], check=True)
