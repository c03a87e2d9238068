"""Real programs on the writable mount of a real Debian image (issue 10), run as root in a
chroot of the mount: apt and dpkg, useradd, dpkg-divert, rm -rf, python3 -m venv and pip,
git, sqlite3 in WAL mode, tar. Then `crfs-merge commit`, and the committed image mounted
read-only must show the very tree the writable mount showed, with `dpkg --verify` agreeing;
and an unmount and a mount again with the same DIR must keep every change.

The image is the `debian` image of benchmarks/overlay_images.py (debootstrap minbase of
bookworm, debootstrapped once and cached, plus layers with whiteouts and an opaque directory),
built once a session. Minbase has neither python3 nor git: rather than run the host's binaries
on the mount, the test installs Debian's own from .debs, which apt downloads on the host
(resolving against the image's own package lists and dpkg status, so the versions are the
image's; cached beside the debootstrap tar) and apt installs inside the chroot. That is the
package-manager workload itself (about fifty packages, perl's thousands of files, triggers),
and every later program is the image's own.

The tests of this module share one writable mount and run in order: each program works in
its own paths; then a remount and a commit must keep everything the others left, and the
programs must find their state whole after both.
CRFS_WRITABLE_MOUNT=overlayfs runs the same programs on kernel overlayfs instead.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.overlay_images import SUITE, VARIANT, arch, build_debian, debian_base
from tests.conftest import COMMAND, MOUNT_TIMEOUT, require, unmount
from tests.tree_walk import describe_tree
from tests.writable_mounts import WritableMount, writable_mount
from unionfs.storage.tar_index import XATTR_PAX_PREFIX

MOUNT_KIND = os.environ.get("CRFS_WRITABLE_MOUNT", "crfs-merge")
# The cache of benchmarks/bench_overlay.py: the debootstrap tar is made once for both.
BUILD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crfs-merge-bench"
TOOLCHAIN = ("python3-venv", "git")  # with their dependencies, about fifty packages
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}  # fmt: skip
STAGING = "mnt"  # where the host's files (debs, wheel, tar) appear, read-only, in the chroot
PROGRAM_TIMEOUT = 600


# ---------------------------------------------------------------- the image and its packages


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    require(os.geteuid() == 0, "the programs run as root in a chroot of the mount")
    for tool in ("chroot", "dpkg-deb", "apt-get", "mount"):
        require(shutil.which(tool) is not None, f"{tool} is missing")
    base_cached = (BUILD_CACHE / f"{base_name()}.tar").exists()
    require(base_cached or shutil.which("debootstrap") is not None, "debootstrap is missing (apt install debootstrap)")
    layout = tmp_path_factory.mktemp("debian-image")
    build_debian(layout / "layout", layout / "work", BUILD_CACHE, "latest", seed=1)
    shutil.rmtree(layout / "work", ignore_errors=True)
    return f"oci:{layout / 'layout'}:latest"


def base_name() -> str:
    return f"debian-{SUITE}-{VARIANT}-{arch()}"


@pytest.fixture(scope="session")
def toolchain_debs(debian_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .debs of TOOLCHAIN and what it needs beyond the image, downloaded by the host's apt
    from the image's own sources, lists and status; kept in the build cache."""
    base, _ = debian_base(BUILD_CACHE, tmp_path_factory.mktemp("debootstrap"))
    state = tmp_path_factory.mktemp("apt-state")
    subprocess.run(["tar", "-xf", str(base), "-C", str(state), "etc/apt", "var/lib/apt/lists", "var/lib/dpkg/status"],
                   check=True)  # fmt: skip
    # One directory per image state, so a newer debootstrap never mixes two versions of a package.
    digest = hashlib.sha256()
    for path in [*sorted((state / "var/lib/apt/lists").glob("*Release")), state / "var/lib/dpkg/status"]:
        digest.update(path.read_bytes())
    archives = BUILD_CACHE / f"{base_name()}-debs-{digest.hexdigest()[:16]}"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    options = {"Dir::Etc::sourcelist": state / "etc/apt/sources.list",
               "Dir::Etc::sourceparts": state / "etc/apt/sources.list.d",
               "Dir::Etc::preferencesparts": state / "etc/apt/preferences.d",
               "Dir::Etc::trusted": state / "etc/apt/trusted.gpg",  # the image's keys, whatever the host has
               "Dir::Etc::trustedparts": state / "etc/apt/trusted.gpg.d",
               "Dir::State::Lists": state / "var/lib/apt/lists", "Dir::State::status": state / "var/lib/dpkg/status",
               "Dir::Cache::archives": archives, "Dir::Cache::pkgcache": "", "Dir::Cache::srcpkgcache": ""}  # fmt: skip
    argv = ["apt-get", "install", "--download-only", "-y", "-q", "--no-install-recommends"]
    argv += [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
    run = subprocess.run([*argv, *TOOLCHAIN], capture_output=True, text=True, timeout=PROGRAM_TIMEOUT)
    assert run.returncode == 0, f"apt-get --download-only: {run.stdout[-2000:]}{run.stderr[-2000:]}"
    return archives


# ---------------------------------------------------------------- the mount and the chroot


@pytest.fixture(scope="module")
def staging(tmp_path_factory: pytest.TempPathFactory, toolchain_debs: Path) -> Path:
    """The host directory the chroot sees, read-only, at /STAGING: the toolchain's debs and
    what the tests build (a .deb, a wheel, a tar, scripts)."""
    root = tmp_path_factory.mktemp("staging")
    (root / "debs").mkdir()
    for deb in toolchain_debs.glob("*.deb"):
        if same_device(deb, root):
            os.link(deb, root / "debs" / deb.name)
        else:
            shutil.copy(deb, root / "debs")
    return root


def same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


@pytest.fixture(scope="module")
def writable(debian_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WritableMount]:
    mount = writable_mount(MOUNT_KIND, debian_image, tmp_path_factory.mktemp("writable"))
    mount.mount()
    try:
        yield mount
    finally:
        mount.unmount()


@contextlib.contextmanager
def runtime_mounts(root: Path, staging: Path | None) -> Iterator[None]:
    """Binds /dev and /proc into the chroot `root` (maintainer scripts, git and python need
    /dev/null, /dev/urandom and /proc), and `staging` read-only at /STAGING; undone after."""
    binds = [(Path("/dev"), root / "dev"), (Path("/proc"), root / "proc")]
    if staging is not None:
        binds.append((staging, root / STAGING))
    done: list[Path] = []
    try:
        for source, target in binds:
            subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
            done.append(target)
            if source == staging:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield
    finally:
        for target in reversed(done):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)


def in_chroot(root: Path, script: str, staging: Path | None = None, check: bool = True) -> str:
    """Runs the shell `script` as root in a chroot of `root`; returns its stdout. With `check`,
    a failure names the script and shows its output."""
    argv = ["chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in CHROOT_ENV.items()),
            "/bin/sh", "-ec", script]  # fmt: skip
    with runtime_mounts(root, staging):
        run = subprocess.run(argv, capture_output=True, text=True, timeout=PROGRAM_TIMEOUT)
    if check and run.returncode:
        pytest.fail(f"in chroot {root}, exit {run.returncode}:\n$ {script}\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return run.stdout


@pytest.fixture(scope="module")
def toolchain(writable: WritableMount, staging: Path) -> list[str]:
    """apt-get installs the toolchain's debs in the chroot; returns their package names."""
    in_chroot(writable.mountpoint, f"apt-get install -y -q --no-install-recommends /{STAGING}/debs/*.deb", staging)
    return sorted(deb.name.partition("_")[0] for deb in (staging / "debs").glob("*.deb"))


# ---------------------------------------------------------------- the programs


def test_apt_installs_python3_and_git_from_debs(writable: WritableMount, toolchain: list[str]) -> None:
    root = writable.mountpoint
    status = in_chroot(root, "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' " + " ".join(toolchain))
    assert sorted(status.split("\n")[:-1]) == sorted(f"{name} ii " for name in toolchain)
    assert in_chroot(root, "dpkg --verify " + " ".join(toolchain)) == ""
    assert in_chroot(root, "dpkg --audit") == ""
    versions = in_chroot(root, "python3 -c 'import sqlite3, ssl, venv; print(sqlite3.sqlite_version)'; git --version")
    assert versions.splitlines()[1].startswith("git version 2.")


# ---------------------------------------------------------------- dpkg -i of a package built here

PROBE = "crfs-probe"
PROBE_USER = "crfsprobe"
DIVERTED = "usr/bin/hostid"  # coreutils's, in the image's lowest layer
PROBE_CONF = "etc/crfs-probe/probe.conf"
OVERRIDDEN = "usr/lib/crfs-probe/data-1.bin"  # dpkg-statoverride makes it setuid, of the system user
PREINST = f"""#!/bin/sh
set -e
if [ "$1" = install ] || [ "$1" = upgrade ]; then
    dpkg-divert --package {PROBE} --add --rename --divert /{DIVERTED}.distrib /{DIVERTED}
    echo "preinst $1 $2" >> /var/log/{PROBE}.log
fi
"""
POSTINST = f"""#!/bin/sh
set -e
if [ "$1" = configure ]; then
    getent passwd {PROBE_USER} >/dev/null || useradd --system --user-group --no-create-home \\
        --home-dir /var/lib/{PROBE} --shell /usr/sbin/nologin {PROBE_USER}
    install -d -o {PROBE_USER} -g {PROBE_USER} -m 0750 /var/lib/{PROBE}
    dpkg-statoverride --list /{OVERRIDDEN} >/dev/null ||
        dpkg-statoverride --update --add {PROBE_USER} {PROBE_USER} 4750 /{OVERRIDDEN}
    echo "postinst $1 $2" >> /var/log/{PROBE}.log
fi
"""
POSTRM = f"""#!/bin/sh
set -e
if [ "$1" = remove ]; then
    dpkg-divert --package {PROBE} --remove --rename --divert /{DIVERTED}.distrib /{DIVERTED}
fi
if [ "$1" = purge ]; then
    rm -rf /var/lib/{PROBE}
    dpkg-statoverride --remove /{OVERRIDDEN}
fi
echo "postrm $1 $2" >> /var/log/{PROBE}.log
"""


def probe_files(version: str) -> dict[str, bytes]:
    """The package's files by version: 1.1 changes one data file, drops one, adds one, and
    changes its conffile."""
    rng = random.Random(f"probe-{version}")
    files = {DIVERTED: f"#!/bin/sh\necho {PROBE}-hostid\n".encode(),
             PROBE_CONF: f"# {PROBE} {version}\nlevel = {version}\n".encode(),
             f"usr/share/doc/{PROBE}/copyright": b"Public domain.\n",
             "usr/lib/crfs-probe/data-0.bin": rng.randbytes(1 << 20) if version == "1.0" else b"",
             "usr/lib/crfs-probe/data-1.bin": f"version {version}\n".encode() * 100}  # fmt: skip
    if version == "1.0":
        files["usr/lib/crfs-probe/data-2.bin"] = b"only in 1.0\n"
    else:
        files["usr/lib/crfs-probe/data-3.bin"] = b"new in 1.1\n"
        files["usr/lib/crfs-probe/data-0.bin"] = random.Random("probe-1.0").randbytes(1 << 20)
    return files


def build_probe_deb(work: Path, version: str) -> Path:
    """`dpkg-deb --build` of the probe package: conffile, preinst, postinst, md5sums (as
    dh_md5sums writes them: every file but the conffiles) and a symlink."""
    tree = work / f"{PROBE}-{version}"
    files = probe_files(version)
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
        os.chmod(tree / rel, 0o755 if rel == DIVERTED else 0o644)
    (tree / "usr/lib/crfs-probe/current").symlink_to("data-1.bin")
    control = tree / "DEBIAN"
    control.mkdir()
    (control / "control").write_text(f"Package: {PROBE}\nVersion: {version}\nArchitecture: all\n"
                                     "Maintainer: crfs-merge tests <tests@crfs-merge.invalid>\nDepends: passwd\n"
                                     "Description: what the writable mount's tests install\n"
                                     " Conffiles, maintainer scripts, a diversion and a system user.\n")  # fmt: skip
    (control / "conffiles").write_text(f"/{PROBE_CONF}\n")
    (control / "md5sums").write_text("".join(f"{hashlib.md5(data).hexdigest()}  {rel}\n"
                                             for rel, data in sorted(files.items()) if rel != PROBE_CONF))  # fmt: skip
    for name, script in (("preinst", PREINST), ("postinst", POSTINST), ("postrm", POSTRM)):
        (control / name).write_text(script)
        os.chmod(control / name, 0o755)
    deb = work / f"{PROBE}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True)
    return deb


def test_dpkg_installs_and_upgrades_a_package_built_here(
    writable: WritableMount, staging: Path, tmp_path: Path
) -> None:
    root = writable.mountpoint
    lower_hostid = (root / DIVERTED).read_bytes()
    for version in ("1.0", "1.1"):
        shutil.copy(build_probe_deb(tmp_path, version), staging)
    staging_probe = f"/{STAGING}/{PROBE}"
    in_chroot(root, f"dpkg -i {staging_probe}_1.0_all.deb", staging)
    assert in_chroot(root, f"dpkg --verify {PROBE}") == ""
    (root / PROBE_CONF).write_text("# the admin's own\n")  # so the upgrade must keep it
    in_chroot(root, f"dpkg -i --force-confold {staging_probe}_1.1_all.deb", staging)

    assert in_chroot(root, f"dpkg-query -W -f '${{Version}} ${{db:Status-Abbrev}}' {PROBE}") == "1.1 ii "
    # The conffile: the admin's edit kept, the package's new one beside it, and verify says so.
    assert (root / PROBE_CONF).read_text() == "# the admin's own\n"
    assert (root / f"{PROBE_CONF}.dpkg-dist").read_bytes() == probe_files("1.1")[PROBE_CONF]
    assert in_chroot(root, f"dpkg --verify {PROBE}").split() == ["??5??????", "c", f"/{PROBE_CONF}"]
    # The files of 1.1, none of 1.0's that went, the symlink.
    for rel, data in probe_files("1.1").items():
        if rel != PROBE_CONF:
            assert (root / rel).read_bytes() == data, rel
    assert not (root / "usr/lib/crfs-probe/data-2.bin").exists()
    assert os.readlink(root / "usr/lib/crfs-probe/current") == "data-1.bin"
    # The diversion the preinst made of a lower file: coreutils's hostid moved aside, and runs.
    assert in_chroot(root, "dpkg-divert --list /usr/bin/hostid").strip() == (
        f"diversion of /{DIVERTED} to /{DIVERTED}.distrib by {PROBE}"
    )
    assert (root / f"{DIVERTED}.distrib").read_bytes() == lower_hostid
    ours, theirs = in_chroot(root, "hostid; hostid.distrib").split()
    assert ours == f"{PROBE}-hostid" and len(theirs) == 8 and int(theirs, 16) >= 0
    # The system user the postinst made, owning its directory.
    user = in_chroot(root, f"getent passwd {PROBE_USER}").strip().split(":")
    assert user[5:] == [f"/var/lib/{PROBE}", "/usr/sbin/nologin"] and 100 <= int(user[2]) < 1000
    assert in_chroot(root, f"getent group {PROBE_USER}").split(":")[2] == user[3]
    assert in_chroot(root, f"getent shadow {PROBE_USER}").startswith(f"{PROBE_USER}:")
    home = os.stat(root / f"var/lib/{PROBE}")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (int(user[2]), int(user[3]), 0o750)
    # The statoverride the postinst of 1.0 registered, applied by dpkg to 1.1's file as it unpacked it.
    overridden = os.stat(root / OVERRIDDEN)
    assert (overridden.st_uid, overridden.st_gid, stat.S_IMODE(overridden.st_mode)) == (
        home.st_uid,
        home.st_gid,
        0o4750,
    )
    assert (root / f"var/log/{PROBE}.log").read_text().splitlines() == [
        "preinst install ",
        "postinst configure ",
        "preinst upgrade 1.0",
        "postrm upgrade 1.1",
        "postinst configure 1.0",
    ]


def test_dpkg_purge_undoes_the_diversion_and_the_package_installs_again(writable: WritableMount, staging: Path) -> None:
    root = writable.mountpoint
    diverted = (root / f"{DIVERTED}.distrib").read_bytes()
    uid = (root / f"var/lib/{PROBE}").stat().st_uid
    in_chroot(root, f"dpkg --purge {PROBE}")
    assert in_chroot(root, f"dpkg-query -W -f '${{db:Status-Abbrev}}' {PROBE}", check=False) in ("pn ", "")
    assert (root / DIVERTED).read_bytes() == diverted and not (root / f"{DIVERTED}.distrib").exists()
    assert in_chroot(root, "dpkg-divert --list '*hostid*'") == ""
    for gone in ("etc/crfs-probe", "usr/lib/crfs-probe", f"var/lib/{PROBE}", f"usr/share/doc/{PROBE}"):
        assert not (root / gone).exists(), gone
    assert (root / f"var/log/{PROBE}.log").read_text().splitlines()[-2:] == ["postrm remove ", "postrm purge "]
    # Installed again: the user the first install made is found, not made twice.
    in_chroot(root, f"dpkg -i /{STAGING}/{PROBE}_1.1_all.deb", staging)
    assert in_chroot(root, f"dpkg --verify {PROBE}") == ""
    assert (root / f"var/lib/{PROBE}").stat().st_uid == uid
    overridden = os.stat(root / OVERRIDDEN)
    assert (overridden.st_uid, stat.S_IMODE(overridden.st_mode)) == (uid, 0o4750)
    assert in_chroot(root, f"grep -c '^{PROBE_USER}:' /etc/passwd /etc/group /etc/shadow").split() == [
        "/etc/passwd:1",
        "/etc/group:1",
        "/etc/shadow:1",
    ]
    (root / PROBE_CONF).write_text("# changed again\n")  # what the final dpkg --verify must still see


# ---------------------------------------------------------------- rm -rf of lower trees


def test_rm_rf_of_lower_trees_and_a_directory_made_again(writable: WritableMount) -> None:
    """usr/share/locale (the lowest layer's, partly copied up first) and opt/app (a higher
    layer's, with a hardlink and a symlink) go; locale is made again, empty but for one file."""
    root = writable.mountpoint
    locale = sorted(str(p.relative_to(root)) for p in (root / "usr/share/locale").rglob("*"))
    assert len(locale) > 500 and (root / "opt/app/bin/app-hardlink").stat().st_nlink == 2
    first_mo = next(p for p in locale if p.endswith(".mo"))
    in_chroot(root, f"echo appended >> /{first_mo} && chmod 600 /{locale[0]} && touch /opt/app/bin/app")
    in_chroot(root, "rm -rf /usr/share/locale /opt/app")
    assert not (root / "usr/share/locale").exists() and not (root / "opt/app").exists()
    assert sorted(os.listdir(root / "opt")) == []
    in_chroot(root, "mkdir /usr/share/locale && echo fresh > /usr/share/locale/only-this")
    assert os.listdir(root / "usr/share/locale") == ["only-this"]


def test_coreutils_move_a_lower_directory_chown_it_and_edit_in_place(writable: WritableMount) -> None:
    """mv of a lower directory (rename is EXDEV there, so mv copies and deletes), chown -R,
    chmod -R and touch of a lower tree (metadata-only copy-ups), and sed -i of a lower file."""
    root = writable.mountpoint
    zoneinfo = root / "usr/share/zoneinfo"
    europe = {p.name: p.read_bytes() for p in (zoneinfo / "Europe").iterdir() if p.is_file() and not p.is_symlink()}
    login_defs = (root / "etc/login.defs").read_text()
    assert len(europe) > 30 and "\nUMASK\t\t022\n" in login_defs
    in_chroot(root, "mv /usr/share/zoneinfo/Europe /srv/Europe && mv /srv/Europe /srv/Europa")
    assert not (zoneinfo / "Europe").exists() and not (root / "srv/Europe").exists()
    assert {name: (root / "srv/Europa" / name).read_bytes() for name in europe} == europe
    in_chroot(root, "chown -R 1000:1000 /usr/share/zoneinfo/Asia && chmod -R g+w /usr/share/zoneinfo/Asia && "
                    "touch -d @1000000000 /usr/share/zoneinfo/Asia/Tokyo")  # fmt: skip
    for path in [zoneinfo / "Asia", *(p for p in (zoneinfo / "Asia").iterdir() if not p.is_symlink())]:
        info = path.lstat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o020) == (1000, 1000, 0o020), path
    assert (zoneinfo / "Asia/Tokyo").stat().st_mtime == 1_000_000_000
    in_chroot(root, "sed -i 's/^UMASK.*/UMASK\t\t027/' /etc/login.defs")
    assert (root / "etc/login.defs").read_text() == login_defs.replace("\nUMASK\t\t022\n", "\nUMASK\t\t027\n")


# ---------------------------------------------------------------- python3 -m venv, pip install of a wheel

WHEEL = "crfs_probe-1.0-py3-none-any.whl"


def wheel_record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(path: Path) -> None:
    """A pure-Python wheel with package data and a console script, as a build backend writes one."""
    info = "crfs_probe-1.0.dist-info"
    files = {
        "crfs_probe/__init__.py": b"import importlib.resources\n\n\ndef main() -> None:\n"
        b"    table = importlib.resources.files(__name__).joinpath('data/table.txt').read_text()\n"
        b"    print('crfs-probe', len(table.splitlines()), __file__)\n",
        "crfs_probe/data/table.txt": "".join(f"row {n}\n" for n in range(1000)).encode(),
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: crfs-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: crfs-merge-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": b"[console_scripts]\ncrfs-probe = crfs_probe:main\n",
        f"{info}/top_level.txt": b"crfs_probe\n",
    }
    record = "".join(f"{name},{wheel_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)


def test_python3_venv_and_pip_install_of_a_local_wheel(
    writable: WritableMount, toolchain: list[str], staging: Path
) -> None:
    root = writable.mountpoint
    build_wheel(staging / WHEEL)
    pip = "/opt/venv/bin/pip --disable-pip-version-check --no-input"
    in_chroot(root, f"python3 -m venv /opt/venv && {pip} install --no-index /{STAGING}/{WHEEL}", staging)
    ran = in_chroot(root, "/opt/venv/bin/crfs-probe").split()
    assert ran == ["crfs-probe", "1000", "/opt/venv/lib/python3.11/site-packages/crfs_probe/__init__.py"]
    listed = in_chroot(root, f"{pip} list --format=freeze")
    assert "crfs-probe==1.0" in listed.split() and any(p.startswith("pip==") for p in listed.split())
    assert in_chroot(root, f"{pip} check").startswith("No broken requirements")
    # pip compiled the module, and the venv's python is the image's own.
    assert list((root / "opt/venv/lib/python3.11/site-packages/crfs_probe/__pycache__").glob("__init__.*.pyc"))
    assert os.readlink(root / "opt/venv/bin/python3") in ("python3", "/usr/bin/python3")


# ---------------------------------------------------------------- git

GIT_SCRIPT = """
git config --global user.email tests@crfs-merge.invalid
git config --global user.name 'crfs-merge tests'
git config --global gc.autoDetach false
git config --global init.defaultBranch main
git init -q /srv/repo && cd /srv/repo
for n in $(seq 1 20); do
    mkdir -p dir$((n % 4)) && seq $n 500 > dir$((n % 4))/file$n && echo "step $n" >> log
    git add -A && git commit -q -m "step $n"
done
git checkout -q -b side && git mv dir0 moved && git rm -q dir1/file1 && git commit -q -m side
git checkout -q main && echo main >> log && git commit -q -am main
git merge -q --no-edit side
git gc -q --prune=now
git fsck --full --strict --no-progress
git count-objects -v | grep -E '^(count|in-pack|packs):'
git rev-list --count HEAD
git status --porcelain
git clone -q /srv/repo /srv/clone
git -C /srv/clone fsck --strict --no-progress
git -C /srv/clone rev-list --count HEAD
stat -c %h /srv/clone/.git/objects/pack/*.pack
"""


def test_git_init_commits_merge_gc_and_fsck(writable: WritableMount, toolchain: list[str]) -> None:
    root = writable.mountpoint
    out = in_chroot(root, GIT_SCRIPT).split("\n")
    # A local clone hardlinks the pack (two names, one inode, both made through the mount).
    assert out == ["count: 0", "in-pack: 108", "packs: 1", "23", "23", "2", ""], out
    assert sorted(os.listdir(root / "srv/repo")) == [".git", "dir1", "dir2", "dir3", "log", "moved"]
    assert not (root / "srv/repo/dir1/file1").exists() and (root / "srv/repo/dir1/file5").exists()
    assert (root / "srv/repo/moved/file20").read_text() == "".join(f"{n}\n" for n in range(20, 501))


# ---------------------------------------------------------------- sqlite3 in WAL mode

SQLITE_ROWS, SQLITE_BATCH, SQLITE_READERS = 3000, 30, 2
# Run by the image's python3 in the chroot: a writer process commits batches into a WAL
# database while reader processes count the rows; a reader must only ever see whole batches,
# never fewer rows than before. Then a TRUNCATE checkpoint, and an integrity check.
SQLITE_SCRIPT = f"""
import sqlite3, subprocess, sys, time
DB = "/var/lib/crfs-sqlite/probe.db"

def connect():
    db = sqlite3.connect(DB, timeout=60, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 60000")
    return db

def writer():
    db = connect()
    for start in range(0, {SQLITE_ROWS}, {SQLITE_BATCH}):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO t (n, payload) VALUES (?, ?)",
                       [(n, str(n).encode() * 50) for n in range(start, start + {SQLITE_BATCH})])
        db.execute("COMMIT")
    db.close()

def reader():
    db = connect()
    first = seen = db.execute("SELECT count(*) FROM t").fetchone()[0]
    print("ready", flush=True)
    while seen < {SQLITE_ROWS}:
        count = db.execute("SELECT count(*) FROM t").fetchone()[0]
        assert count % {SQLITE_BATCH} == 0 and count >= seen, (count, seen)
        seen = count
    total = db.execute("SELECT sum(n) FROM t").fetchone()[0]
    assert total == sum(range({SQLITE_ROWS})), total
    print("reader from", first, "to", seen)

if sys.argv[1:] == ["writer"]:
    writer()
elif sys.argv[1:] == ["reader"]:
    reader()
else:
    db = connect()
    assert db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, payload BLOB)")
    # The writer starts once every reader has read the empty table: they all run at once.
    readers = [subprocess.Popen([sys.executable, __file__, "reader"], stdout=subprocess.PIPE, text=True)
               for _ in range({SQLITE_READERS})]
    assert [reader.stdout.readline() for reader in readers] == ["ready\\n"] * len(readers)
    writer = subprocess.Popen([sys.executable, __file__, "writer"])
    assert [child.wait() for child in [*readers, writer]] == [0] * (len(readers) + 1)
    for reader in readers:
        print(reader.stdout.read().strip())
    print("checkpoint", db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    print("integrity", db.execute("PRAGMA integrity_check").fetchone()[0])
    print("rows", db.execute("SELECT count(*) FROM t").fetchone()[0])
    db.close()
"""


def test_sqlite_wal_with_concurrent_readers_and_a_writer(
    writable: WritableMount, toolchain: list[str], staging: Path
) -> None:
    root = writable.mountpoint
    (staging / "sqlite_probe.py").write_text(SQLITE_SCRIPT)
    out = in_chroot(root, f"mkdir -p /var/lib/crfs-sqlite && python3 /{STAGING}/sqlite_probe.py", staging)
    assert out.split("\n") == [*[f"reader from 0 to {SQLITE_ROWS}"] * SQLITE_READERS, "checkpoint (0, 0, 0)",
                               "integrity ok", f"rows {SQLITE_ROWS}", ""]  # fmt: skip
    # The last connection closed: the WAL was checkpointed into the database and removed.
    assert sorted(os.listdir(root / "var/lib/crfs-sqlite")) == ["probe.db"]
    again = in_chroot(root, "python3 -c \"import sqlite3; db = sqlite3.connect('/var/lib/crfs-sqlite/probe.db'); "
                            "print(db.execute('PRAGMA journal_mode').fetchone()[0], "
                            "db.execute('SELECT count(*), sum(length(payload)) FROM t').fetchone())\"")  # fmt: skip
    payload = sum(len(str(n)) * 50 for n in range(SQLITE_ROWS))
    assert again.strip() == f"wal ({SQLITE_ROWS}, {payload})"


# ---------------------------------------------------------------- tar -x of a few thousand files

PAYLOAD_DIRS, PAYLOAD_FILES_PER_DIR = 40, 75


def build_payload(path: Path, lower_licenses: list[str]) -> list[tarfile.TarInfo]:
    """A tar of PAYLOAD_DIRS x PAYLOAD_FILES_PER_DIR files under srv/payload (sizes up to 64
    KiB, several modes, owners and mtimes, one in ten with a user xattr, with symlinks, hardlinks
    and a fifo per directory), and new contents for the lower files `lower_licenses`; returns its
    members."""
    rng = random.Random("payload")
    members: list[tuple[tarfile.TarInfo, bytes]] = []

    def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "", owner: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
        info.uid = info.gid = owner
        info.mtime = 1_650_000_000 + rng.randrange(10_000_000)
        members.append((info, data))

    add("srv/payload", tarfile.DIRTYPE, 0o755)
    for d in range(PAYLOAD_DIRS):
        directory = f"srv/payload/d{d:02d}"
        add(directory, tarfile.DIRTYPE, (0o755, 0o750, 0o700)[d % 3], owner=(0, 1000, 65534)[d % 3])
        for n in range(PAYLOAD_FILES_PER_DIR - 3):
            size = int(64 * 1024 * rng.random() ** 4)
            add(f"{directory}/f{n:03d}", tarfile.REGTYPE, (0o644, 0o600, 0o755, 0o4755)[n % 4], rng.randbytes(size),
                owner=(0, 1000, 65534)[n % 3])  # fmt: skip
            if n % 10 == 0:
                members[-1][0].pax_headers = {f"{XATTR_PAX_PREFIX}user.crfs.serial": f"{d}-{n}"}
        add(f"{directory}/link", tarfile.SYMTYPE, 0o777, link="f000")
        add(f"{directory}/hard", tarfile.LNKTYPE, 0o644, link=f"{directory}/f001")
        add(f"{directory}/fifo", tarfile.FIFOTYPE, 0o640)
    for rel in lower_licenses:
        add(rel, tarfile.REGTYPE, 0o644, f"replaced {rel}\n".encode())
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return [info for info, _ in members]


def test_tar_extracts_thousands_of_files_over_lower_ones(writable: WritableMount, staging: Path) -> None:
    root = writable.mountpoint
    licenses = sorted(f"usr/share/common-licenses/{n}" for n in os.listdir(root / "usr/share/common-licenses"))
    members = build_payload(staging / "payload.tar", [p for p in licenses if (root / p).is_file()])
    assert len(members) > 3000
    in_chroot(root, f"tar --xattrs --xattrs-include='user.*' -xpf /{STAGING}/payload.tar -C /", staging)
    with tarfile.open(staging / "payload.tar") as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}  # type: ignore[union-attr]
    for member in members:
        assert extracted_as(root, member, data.get(member.name)) == [], member.name


def test_tar_archives_a_tree_just_written_below(writable: WritableMount) -> None:
    """`tar -c` of a directory right after a file was made two levels below it (copying it up):
    GNU tar compares the directory's stat before and after reading it, and exits 1 with
    "file changed as we read it" if the size grew or the ctime moved while it read. (It did on
    crfs-merge until the copy-up told the kernel to forget the directory's old attributes.)"""
    tree = "/usr/share/zoneinfo/America"
    archive = writable.mountpoint / "tmp/zoneinfo.tar"
    # No listing of the tree first: a READDIR makes the kernel drop the directory's cached attributes.
    script = f"touch {tree}/Argentina/crfs-new && tar -cf /tmp/zoneinfo.tar {tree} 2>&1"
    try:
        out = in_chroot(writable.mountpoint, f"if {script}; then echo status 0; else echo status $?; fi")
        with tarfile.open(archive) as tar:
            names = tar.getnames()
    finally:
        archive.unlink(missing_ok=True)
    assert out.splitlines()[-1] == "status 0", out
    assert f"{tree[1:]}/Argentina/crfs-new" in names and len(names) > 100


def extracted_as(root: Path, member: tarfile.TarInfo, data: bytes | None) -> list[str]:
    """What differs between `member` and the path it was extracted to (a hardlink: its target)."""
    path = root / member.name
    info = os.lstat(path)
    wrong = []
    if member.islnk():
        return [] if os.path.samestat(info, os.lstat(root / member.linkname)) else ["not the target's inode"]
    kinds = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.REGTYPE: stat.S_IFREG, tarfile.SYMTYPE: stat.S_IFLNK,
             tarfile.FIFOTYPE: stat.S_IFIFO}  # fmt: skip
    if stat.S_IFMT(info.st_mode) != kinds[member.type]:
        return [f"type {stat.filemode(info.st_mode)}"]
    if not member.issym() and stat.S_IMODE(info.st_mode) != member.mode:
        wrong.append(f"mode {oct(info.st_mode)}")
    if (info.st_uid, info.st_gid) != (member.uid, member.gid):
        wrong.append(f"owner {info.st_uid}:{info.st_gid}")
    if int(info.st_mtime) != member.mtime:
        wrong.append(f"mtime {info.st_mtime}")
    xattrs = {f"{XATTR_PAX_PREFIX}{name}": os.getxattr(path, name, follow_symlinks=False).decode()
              for name in os.listxattr(path, follow_symlinks=False) if name.startswith("user.")}  # fmt: skip
    if xattrs != member.pax_headers:
        wrong.append(f"xattrs {xattrs}")
    if member.issym() and os.readlink(path) != member.linkname:
        wrong.append(f"target {os.readlink(path)}")
    if member.isreg() and path.read_bytes() != data:
        wrong.append(f"data ({info.st_size} bytes)")
    return wrong


# ---------------------------------------------------------------- persistence and commit

State = tuple[dict[str, tuple[object, ...]], str]


def whole_state(root: Path) -> State:
    """The tree entry by entry (type, mode, owner, size, mtime, bytes or link target, xattrs,
    hardlink groups) and what `dpkg --verify` says of every package."""
    return describe_tree(root), in_chroot(root, "dpkg --verify", check=False)


def tree_differences(got: dict[str, tuple[object, ...]], want: dict[str, tuple[object, ...]]) -> list[str]:
    """The first few paths whose rows differ, each with both rows (a full diff of some 15000
    rows would drown the one that matters)."""
    paths = sorted(p for p in got.keys() | want.keys() if got.get(p) != want.get(p))
    return [f"{p}: {got.get(p)} != {want.get(p)}" for p in paths[:15]] + ([f"... {len(paths)} in all"] if paths else [])


@pytest.fixture(scope="module")
def final_state(writable: WritableMount, toolchain: list[str]) -> State:
    """The writable mount's state once the programs above are done; the two tests that use it
    change nothing on the mount, so each walk of a remount or a commit compares with this one."""
    state = whole_state(writable.mountpoint)
    assert len(state[0]) > 14_000 and "/usr/share/locale" in state[1]  # what the programs above left
    return state


def test_changes_persist_across_a_remount(writable: WritableMount, final_state: State) -> None:
    writable.unmount()
    assert not os.path.ismount(writable.mountpoint)
    writable.mount()
    tree, verify = whole_state(writable.mountpoint)
    assert tree_differences(tree, final_state[0]) == []
    assert verify == final_state[1]


@contextlib.contextmanager
def read_only_mount(image: str, work: Path) -> Iterator[Path]:
    mountpoint = work / "committed"
    mountpoint.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(work / "cache"), image, str(mountpoint)],
                         capture_output=True, text=True, timeout=MOUNT_TIMEOUT)  # fmt: skip
    assert run.returncode == 0, f"read-only mount of {image}: {run.stderr}"
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def test_commit_gives_an_image_that_mounts_as_the_writable_tree(
    writable: WritableMount, final_state: State, tmp_path: Path
) -> None:
    upper = writable.oci_diff(tmp_path)  # unmounted: DIR is read as it stands
    dest = f"oci:{tmp_path / 'committed-layout'}:programs"
    run = subprocess.run([*COMMAND, "commit", "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper),
                          "-m", "real programs", writable.image, dest],
                         capture_output=True, text=True, timeout=PROGRAM_TIMEOUT)  # fmt: skip
    assert run.returncode == 0, f"commit: {run.stderr}"
    with read_only_mount(dest, tmp_path) as committed:
        assert tree_differences(describe_tree(committed), final_state[0]) == []
        assert in_chroot(committed, "dpkg --verify", check=False) == final_state[1]


def mounted(writable: WritableMount) -> Path:
    """The mountpoint, mounted again if a test before unmounted it (the commit reads DIR unmounted)."""
    if not os.path.ismount(writable.mountpoint):
        writable.mount()
    return writable.mountpoint


def test_git_finds_its_index_current_after_remount_and_commit(writable: WritableMount) -> None:
    """git keeps each file's stat data (inode, times, size, owner) in its index; if a remount
    shows other data, `git diff-files` (which, unlike `git status`, does not refresh the index
    first) lists the file as changed. Kernel overlayfs keeps inode numbers across a remount (so
    does crfs-merge since 2773922; before, it renumbered copied-up and new files on each mount)."""
    assert in_chroot(mounted(writable), "cd /srv/repo && git diff-files --name-only") == ""


def test_the_programs_find_their_state_after_remount_and_commit(writable: WritableMount) -> None:
    root = mounted(writable)
    assert in_chroot(root, "cd /srv/repo && git fsck --full --strict --no-progress && git status --porcelain") == ""
    db = "sqlite3.connect('/var/lib/crfs-sqlite/probe.db')"
    query = f"import sqlite3; q = lambda s: {db}.execute(s).fetchone()[0]; print(q('PRAGMA integrity_check'))"
    sqlite = in_chroot(root, f"python3 -c \"{query}; print(q('SELECT count(*) FROM t'))\"")
    assert sqlite.split() == ["ok", str(SQLITE_ROWS)]
    assert in_chroot(root, "/opt/venv/bin/crfs-probe").split()[:2] == ["crfs-probe", "1000"]
    assert in_chroot(root, f"dpkg --verify {PROBE}").split() == ["??5??????", "c", f"/{PROBE_CONF}"]
    in_chroot(root, "apt-get check -q")  # dpkg's and apt's view of what is installed agree
