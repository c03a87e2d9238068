"""One libfuse 3 per process, whatever else is installed: the layouts chosen per libfuse
version (read from each release's include/fuse_common.h), the library a real mount's server
maps (with libfuse 2 installed too, as .ci/run does), and the one line a machine without
libfuse 3 gets."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import COMMAND, IN_CI, MOUNT_TIMEOUT, ImageWriter, require, unmount
from tests.tarvocab import f
from unionfs.fuse import libfuse
from unionfs.fuse.libfuse import layout
from unionfs.fuse.lowlevel import buf_type, file_info_type

ROOT = Path(__file__).resolve().parent.parent

# (version, bit of cache_readdir): 3.14.1 inserted parallel_direct_writes after keep_cache,
# 3.17 moved it after noflush (libfuse issue 1029).
CACHE_READDIR_BITS = [
    ((3, 10, 5), 6),
    ((3, 14, 0), 6),
    ((3, 14, 1), 7),
    ((3, 15, 0), 7),
    ((3, 16, 2), 7),
    ((3, 17, 1), 6),
    ((3, 18, 2), 6),
]


@pytest.mark.parametrize(("version", "bit"), CACHE_READDIR_BITS)
def test_cache_readdir_bit_follows_the_version(version: tuple[int, int, int], bit: int) -> None:
    chosen = layout(version)
    assert chosen.bit("cache_readdir") == bit
    assert chosen.bit("keep_cache") == 2


@pytest.mark.parametrize(("version", "bit"), CACHE_READDIR_BITS)
def test_file_info_sets_the_bits_of_that_version(version: tuple[int, int, int], bit: int) -> None:
    info = file_info_type(layout(version))(keep_cache=1, cache_readdir=1)
    word = int.from_bytes(bytes(info)[4:8], sys.byteorder)
    assert word == 1 << 2 | 1 << bit


@pytest.mark.parametrize(("version", "has_mem_size"), [((3, 10, 5), False), ((3, 16, 2), False),
                                                        ((3, 17, 1), True), ((3, 18, 2), True)])  # fmt: skip
def test_fuse_buf_gains_mem_size_at_3_17(version: tuple[int, int, int], has_mem_size: bool) -> None:
    buf = buf_type(layout(version))
    pointer = ctypes.sizeof(ctypes.c_void_p)
    # size, flags (padded), mem, fd (padded), pos: 5 words; then mem_size, last.
    assert ctypes.sizeof(buf) == pointer * (6 if has_mem_size else 5)
    if has_mem_size:
        assert buf.mem_size.offset == buf.pos.offset + 8  # type: ignore[attr-defined]


def test_versions_are_read_with_their_hotfix() -> None:
    assert libfuse.parse_version("3.14.1") == (3, 14, 1)
    assert libfuse.parse_version("3.17") == (3, 17, 0)
    assert libfuse.parse_version("garbage") is None


def libfuse_files_mapped(pid: int | str) -> set[str]:
    """Returns the libfuse files (any major version) mapped into process `pid`."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if "/libfuse" in line}


def test_mfusepy_and_lowlevel_map_one_libfuse_3() -> None:
    require(libfuse.locate() is not None, libfuse.INSTALL_HINT)
    script = ("from unionfs.fuse import lowlevel; bound = lowlevel.bindings(); import mfusepy; "
              "print(bound.fuse.name, mfusepy.fuse_version_major, mfusepy._libfuse._name)")  # fmt: skip
    probe = f"{script}; print(open('/proc/self/maps').read())"
    env = {k: v for k, v in os.environ.items() if k != libfuse.LIBRARY_VARIABLE}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    name, major, mfusepy_name = run.stdout.splitlines()[0].split()
    assert major == "3" and mfusepy_name == name
    mapped = {line.split()[-1] for line in run.stdout.splitlines()[1:] if "/libfuse" in line}
    assert len(mapped) == 1 and "libfuse3" in mapped.pop()


def test_a_loadable_soname_is_found_without_running_ldconfig() -> None:
    """find_library forks `ldconfig -p`, 10 ms of each mount's start (twice: the command's check
    and the server's load); it is for a libfuse 3 that no known soname names."""
    require(libfuse.locate() is not None, libfuse.INSTALL_HINT)
    probe = ("import ctypes.util\n"
             "def refuse(name): raise AssertionError(f'find_library({name!r}) was called')\n"
             "ctypes.util.find_library = refuse\n"
             "from unionfs.fuse import libfuse\n"
             "print(libfuse.locate())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != libfuse.LIBRARY_VARIABLE}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in libfuse.SONAMES


def libfuse2_installed() -> bool:
    patterns = ("/usr/lib/*/libfuse.so.2", "/usr/lib/libfuse.so.2", "/lib*/libfuse.so.2")
    return any(glob.glob(pattern) for pattern in patterns)


def server_of(mountpoint: Path) -> int:
    """Returns the pid of the process serving `mountpoint`: the forked server keeps the
    command line of the `crfs-merge IMAGE DIR` that started it."""
    wanted = os.fsencode(mountpoint)
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and wanted in argv and b"unionfs.cli" in argv:
            return int(entry.name)
    raise AssertionError(f"no server process for {mountpoint}")


def test_a_mount_next_to_libfuse_2_maps_only_libfuse_3(tmp_path: Path, oci_image: ImageWriter,
                                                       fuse_works: None) -> None:  # fmt: skip
    # .ci/run installs libfuse2: mfusepy alone would pick it (it looks for libfuse.so first).
    require(libfuse2_installed(), "libfuse2 is not installed (apt-get install libfuse2)")
    image = oci_image([f("hello", b"world")])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = {k: v for k, v in os.environ.items() if k != libfuse.LIBRARY_VARIABLE}
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)],
                         capture_output=True, text=True, env=env, timeout=MOUNT_TIMEOUT)  # fmt: skip
    try:
        assert run.returncode == 0, run.stderr
        assert (mountpoint / "hello").read_bytes() == b"world"
        mapped = libfuse_files_mapped(server_of(mountpoint))
        assert len(mapped) == 1 and "libfuse3" in next(iter(mapped)), mapped
    finally:
        unmount(mountpoint)


def libfuse3_files() -> set[str]:
    """Returns every libfuse 3 file the dynamic loader could find, symlinks resolved."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    listed = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout.splitlines()
    paths = {line.rsplit("=> ", 1)[-1] for line in listed if "libfuse3.so" in line}
    for directory in ("/lib", "/lib64", "/usr/lib", "/usr/local/lib", "/usr/lib/*", "/lib/*"):
        paths.update(glob.glob(f"{directory}/libfuse3.so*"))
    return {os.path.realpath(p) for p in paths if os.path.exists(p)}


def without_libfuse3(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Runs `command` in a private mount namespace where every libfuse 3 file is an empty
    file: the loader then finds none, as on a machine without fuse3."""
    require(shutil.which("unshare") is not None, "unshare is missing (util-linux)")
    require(os.geteuid() == 0 or not IN_CI, "hiding libfuse 3 in a mount namespace needs root")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    hide = "".join(f'mount --bind "$0" "{path}" && ' for path in sorted(libfuse3_files()))
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]
    env = {k: v for k, v in os.environ.items() if k != libfuse.LIBRARY_VARIABLE}
    return subprocess.run([*namespace, "sh", "-c", f'{hide}exec "$@"', str(empty), *command],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip


def test_no_libfuse_3_gets_one_line_and_status_2(tmp_path: Path, oci_image: ImageWriter) -> None:
    image = oci_image([f("hello", b"world")])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for foreground in ([], ["-f"]):
        run = without_libfuse3([*COMMAND, *foreground, image, str(mountpoint)], tmp_path)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and "apt-get install fuse3" in run.stderr, run.stderr
        assert not os.path.ismount(mountpoint)


def test_without_libfuse_3_the_tests_still_collect(tmp_path: Path) -> None:
    run = without_libfuse3([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "tests/test_lowlevel.py", "tests/test_mount.py"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_without_libfuse_3_a_fuse_test_fails_in_ci_with_the_hint(tmp_path: Path) -> None:
    test = "tests/test_mount.py::test_mount_is_read_only"
    run = without_libfuse3(["env", "CI=true", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                           tmp_path)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 error" in run.stdout and libfuse.INSTALL_HINT in run.stdout, run.stdout
