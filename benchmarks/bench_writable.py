"""Benchmark writable mounts: crfs-merge `--upper` against kernel overlayfs and fuse-overlayfs.

The image is bench_overlay's `debian` image (a Debian bookworm minbase root filesystem and
three `docker build`-style layers, see overlay_images.py) plus one more layer holding what the
workloads need of a lower layer: a 500 MB file (seeded, half random and half text) at
srv/big/big.bin and a tree of 20,000 small files under srv/tree.

Methods, each with the same upper directory layout (a fresh one for every workload):

- kernel: the image's layers extracted with tar and their whiteouts converted (bench_overlay's
  extract_layers), `mount -t overlay -o lowerdir=LN:...:L1,upperdir=U,workdir=W`: the reference
  every ratio divides by;
- fuse_overlayfs: `fuse-overlayfs -o lowerdir=...,upperdir=U,workdir=W` over the same layers;
- crfs: `python3 -m unionfs.cli --cache-dir C --upper U oci:LAYOUT:bench MNT`, this checkout
  first on PYTHONPATH (the cache indexed once, untimed, before the rounds). When this crfs-merge
  refuses `--upper` (before the writable mount exists), its column says "not available".

Workloads, each on a fresh mount with an empty upper directory, caches dropped
(`sync; echo 3 > /proc/sys/vm/drop_caches`) before each mount:

1. untar: `tar -xf` of 10,000 small files (a tar on the host disk, read once before) into opt/untar;
2. dpkg: `chroot MNT dpkg -i` of a package built with `dpkg-deb` (500 files, a conffile, a
   postinst), /proc not mounted (dpkg -i of such a package does not need it);
3. seq_write: `dd if=/dev/zero of=MNT/var/tmp/seq.bin bs=1M count=1024 conv=fsync` (1 GiB);
4. copy_up: the first write to the 500 MB lower file, cold: open it O_WRONLY, write 4 KiB at
   offset 0, fsync, close (kernel overlayfs and fuse-overlayfs copy the whole file up at open);
5. create_unlink: 10,000 empty files created (O_CREAT|O_EXCL) in one directory, then unlinked;
6. rm_rf: `rm -rf` of the 20,000-file lower tree, cold (one whiteout goes in the upper);
7. reads: the upper populated through the mount (the untar of 1, the big file copied up, a tenth
   of the lower tree removed, another tenth chmod'ed), unmounted and mounted again, then `find
   MNT | wc -l` cold and warm, `tar -cf - -C MNT . | wc -c` cold, and the copied-up big file
   read sequentially cold and again. In the first round each populated tree is compared with
   kernel overlayfs's (path, type, size) and the big file's sha256 with kernel's.

--repeat rounds (3 by default; the order of the methods rotating each round); the table shows
the median (min-max) of each figure and its ratio to kernel overlayfs, then the issue's targets.
--quick is a smoke run: one round, 1,000 files to untar, 100 in the package, a 2,000-file
tree, a 32 MB big file, 64 MiB written, 1,000 creates. Needs root (overlay mounts, chroot,
dropping caches), fuse-overlayfs and dpkg-deb.

    sudo python3 benchmarks/bench_writable.py --repeat 3 --json /tmp/writable.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_lazy import CRFS, read_file  # noqa: E402
from benchmarks.bench_overlay import (  # noqa: E402
    DEFAULT_BUILD_CACHE,
    TAG,
    compare_trees,
    extract_layers,
    fuse_overlayfs_pid,
    layer_blobs,
    stack_images,
    tree,
)
from benchmarks.bench_registry import crfs_code, crfs_env  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    KIB,
    MIB,
    common_options,
    drop_caches,
    fmt,
    ratio,
    run_benchmark,
    run_measured,
    summarize,
    tail,
    tar_info,
    text_pool,
    timed_find,
    timed_shell,
    unmount,
)
from benchmarks.overlay_images import Generated, build_debian, finish_layout, layer_tar  # noqa: E402

METHODS = ("crfs", "fuse_overlayfs", "kernel")
NAMES = {"crfs": "crfs-merge --upper", "fuse_overlayfs": "fuse-overlayfs", "kernel": "kernel overlayfs"}
MOUNTPOINTS = {"crfs": "mnt", "fuse_overlayfs": "mnt-fuse-overlayfs", "kernel": "mnt-overlay"}
WORKLOADS = ("untar", "dpkg", "seq_write", "copy_up", "create_unlink", "rm_rf", "reads")
BIG_PATH = "srv/big/big.bin"
TREE_PATH = "srv/tree"
TREE_DIR_FILES = 100  # files per directory of the lower tree and of the untar tree
UNTAR_PATH = "opt/untar"
SEQ_PATH = "var/tmp/seq.bin"
CREATE_PATH = "tmp/create-unlink"
DEB_NAME = "benchpkg"
COPY_UP_WRITE = 4 * KIB
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "DEBIAN_FRONTEND": "noninteractive"}
UNAVAILABLE = "not available"


@dataclass(frozen=True)
class Sizes:
    """How big each workload is."""

    untar_files: int
    package_files: int
    tree_files: int
    big_bytes: int
    write_mib: int
    creates: int


FULL = Sizes(untar_files=10_000, package_files=500, tree_files=20_000, big_bytes=500_000_000, write_mib=1024,
             creates=10_000)  # fmt: skip
QUICK = Sizes(untar_files=1_000, package_files=100, tree_files=2_000, big_bytes=32_000_000, write_mib=64, creates=1_000)


@dataclass
class Setup:
    """Where everything of one run lives."""

    work: Path
    sizes: Sizes
    layers: list[Path] = field(default_factory=list)  # extracted for the overlays, bottom first
    crfs_unavailable: str | None = None  # why crfs-merge cannot mount writable, if it cannot

    @property
    def layout(self) -> Path:
        return self.work / "image"

    @property
    def log(self) -> Path:
        return self.work / "log.txt"

    @property
    def inputs(self) -> Path:
        return self.work / "inputs"

    @property
    def cache(self) -> Path:
        return self.work / "caches" / "crfs"

    def mountpoint(self, method: str) -> Path:
        return self.work / MOUNTPOINTS[method]

    def upper_root(self, method: str) -> Path:
        """The upper directory (upper/) and overlayfs work directory (work/) of `method`'s mount."""
        return self.work / "uppers" / method

    def lowerdir(self) -> str:
        return ":".join(str(d) for d in reversed(self.layers))


# ---------------------------------------------------------------- image and inputs


def small_files(tar: tarfile.TarFile, top: str, count: int, pool: bytes, rng: random.Random) -> None:
    """`count` text files of 0-4 KiB (most small) under TOP/dNNN/, TREE_DIR_FILES a directory."""
    for n in range(count):
        directory = f"{top}/d{n // TREE_DIR_FILES:03d}"
        if n % TREE_DIR_FILES == 0:
            tar.addfile(tar_info(directory, tarfile.DIRTYPE, 0o755))
        size = int(4 * KIB * rng.random() ** 3)
        offset = rng.randrange(len(pool) - size)
        data = pool[offset : offset + size]
        tar.addfile(tar_info(f"{directory}/f{n:05d}", tarfile.REGTYPE, 0o644, size), io.BytesIO(data))


def build_extra(layout: Path, sizes: Sizes, seed: int) -> dict[str, Any]:
    """An OCI layout (tag latest) of one layer: the lower tree and the big file; returns facts."""
    rng = random.Random(f"writable-{seed}")
    pool = text_pool(rng, 8 * MIB)
    layers: list[tuple[dict[str, object], str]] = []
    with layer_tar(layout, layers) as tar:
        for directory in ("srv", TREE_PATH, "srv/big"):
            tar.addfile(tar_info(directory, tarfile.DIRTYPE, 0o755))
        small_files(tar, TREE_PATH, sizes.tree_files, pool, rng)
        big = Generated(sizes.big_bytes, rng, pool)
        tar.addfile(tar_info(BIG_PATH, tarfile.REGTYPE, 0o644, sizes.big_bytes), big)  # type: ignore[arg-type]
    facts = finish_layout(layout, layers, "latest")
    return {"extra_layer_bytes": facts["blob_bytes"], "big_sha256": big.hash.hexdigest()}


def build_image(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """The debian image with the extra layer on top, tagged TAG in setup.layout; returns facts."""
    started = time.perf_counter()
    facts = build_debian(setup.layout, setup.work, args.build_cache, "latest", args.seed)
    facts.update(build_extra(setup.work / "extra", setup.sizes, args.seed))
    stack_images(setup.layout, setup.work / "extra")
    facts["layers"] += 1
    facts["build_seconds"] = time.perf_counter() - started
    return facts


def write_untar_input(path: Path, sizes: Sizes, seed: int) -> None:
    """The tar that the untar workload extracts: sizes.untar_files small files under untar/."""
    rng = random.Random(f"untar-{seed}")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tar_info("untar", tarfile.DIRTYPE, 0o755))
        small_files(tar, "untar", sizes.untar_files, text_pool(rng, MIB), rng)


def build_package(root: Path, deb: Path, files: int) -> None:
    """A Debian package made with dpkg-deb: `files` files under /usr/share/benchpkg, a conffile
    and a postinst that writes a file, as packages do."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {DEB_NAME}\nVersion: 1.0\nArchitecture: all\nMaintainer: bench <bench@example.invalid>\n"
        "Description: a package for the writable-mount benchmark\n its files are text\n"
    )
    (root / "DEBIAN/conffiles").write_text(f"/etc/{DEB_NAME}/{DEB_NAME}.conf\n")
    postinst = root / "DEBIAN/postinst"
    state = f"/var/lib/{DEB_NAME}"
    postinst.write_text(f'#!/bin/sh\nset -e\nmkdir -p {state}\necho "$@" > {state}/configured\n')
    postinst.chmod(0o755)
    (root / f"etc/{DEB_NAME}").mkdir(parents=True)
    (root / f"etc/{DEB_NAME}/{DEB_NAME}.conf").write_text("setting = 1\n")
    for n in range(files):
        path = root / f"usr/share/{DEB_NAME}/d{n // 50:02d}/f{n:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {n}\n" * (n % 40 + 1))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)], check=True,
                   capture_output=True)  # fmt: skip


# ---------------------------------------------------------------- mounting


def mount_argv(method: str, setup: Setup) -> list[str]:
    """The command that mounts `method` writable over the image, its upper in upper_root(method)."""
    mnt, upper = str(setup.mountpoint(method)), setup.upper_root(method)
    if method == "crfs":
        return [*CRFS, "--cache-dir", str(setup.cache), "--upper", str(upper / "upper"), f"oci:{setup.layout}:{TAG}",
                mnt]  # fmt: skip
    options = f"lowerdir={setup.lowerdir()},upperdir={upper / 'upper'},workdir={upper / 'work'}"
    if method == "fuse_overlayfs":
        return ["fuse-overlayfs", "-o", options, mnt]
    return ["mount", "-t", "overlay", "overlay", "-o", options, mnt]


def mount(method: str, setup: Setup) -> float:
    """Drops caches, mounts `method`; returns the seconds until the command returned, or raises."""
    drop_caches()
    upper = setup.upper_root(method)
    upper.mkdir(parents=True, exist_ok=True)
    if method != "crfs":  # crfs-merge makes its upper directory itself and needs no work directory
        (upper / "upper").mkdir(exist_ok=True)
        (upper / "work").mkdir(exist_ok=True)
    env = crfs_env() if method == "crfs" else None
    seconds, rc, _ = run_measured(mount_argv(method, setup), setup.log, env)
    if rc != 0 or not os.path.ismount(setup.mountpoint(method)):
        raise RuntimeError(f"mounting {NAMES[method]} exited {rc}; log: {tail(setup.log)}")
    return seconds


def unmount_method(method: str, setup: Setup) -> None:
    """Unmounts `method`'s mountpoint and waits for its server (if any) to exit."""
    mnt = setup.mountpoint(method)
    if not os.path.ismount(mnt):
        return
    if method == "kernel":
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        return
    pid = fuse_overlayfs_pid(mnt) if method == "fuse_overlayfs" else None
    unmount(mnt)  # fusermount3 -u; waits for a crfs-merge server itself
    deadline = time.monotonic() + 60
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(method: str, setup: Setup) -> Iterator[Path]:
    """`method` mounted writable over the image with its current upper directory."""
    mount(method, setup)
    try:
        yield setup.mountpoint(method)
    finally:
        unmount_method(method, setup)


def fresh_upper(method: str, setup: Setup) -> None:
    shutil.rmtree(setup.upper_root(method), ignore_errors=True)


def refusal(setup: Setup) -> str | None:
    """Mounts crfs-merge writable once (which also indexes the image into its cache, untimed):
    None if that works, else the one line saying why (an unknown --upper before it exists)."""
    fresh_upper("crfs", setup)
    try:
        with mounted("crfs", setup):
            return None
    except RuntimeError as error:
        lines = [line for line in tail(setup.log).splitlines() if line.strip()]
        return lines[-1] if lines else str(error)
    finally:
        fresh_upper("crfs", setup)


# ---------------------------------------------------------------- workloads


def checked_shell(command: str) -> float:
    """Times `command` under bash; raises unless it exits 0."""
    seconds, rc, out = timed_shell(command)
    if rc != 0:
        raise RuntimeError(f"`{command}` exited {rc}: {out[-500:]}")
    return seconds


def untar(root: Path, setup: Setup) -> dict[str, Any]:
    source = setup.inputs / "untar.tar"
    target = root / UNTAR_PATH
    target.mkdir(parents=True)
    Path(source).read_bytes()  # in the page cache: the workload is writing, not reading the host disk
    seconds = checked_shell(f"tar -xf {shlex.quote(str(source))} -C {shlex.quote(str(target))}")
    files = sum(len(names) for _, _, names in os.walk(target))
    if files != setup.sizes.untar_files:
        raise RuntimeError(f"untar left {files} files, not {setup.sizes.untar_files}")
    return {"untar_seconds": seconds}


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *argv], env=CHROOT_ENV, capture_output=True, text=True, check=False)


def dpkg(root: Path, setup: Setup) -> dict[str, Any]:
    shutil.copyfile(setup.inputs / f"{DEB_NAME}.deb", root / f"tmp/{DEB_NAME}.deb")
    started = time.perf_counter()
    done = chroot(root, "dpkg", "-i", f"/tmp/{DEB_NAME}.deb")
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"dpkg -i exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}")
    status = chroot(root, "dpkg-query", "-W", "-f=${Status}", DEB_NAME).stdout
    if status != "install ok installed" or not (root / f"var/lib/{DEB_NAME}/configured").exists():
        raise RuntimeError(f"after dpkg -i, {DEB_NAME} is {status!r}")
    return {"dpkg_seconds": seconds}


def seq_write(root: Path, setup: Setup) -> dict[str, Any]:
    target = shlex.quote(str(root / SEQ_PATH))
    seconds = checked_shell(f"dd if=/dev/zero of={target} bs=1M count={setup.sizes.write_mib} conv=fsync status=none")
    size = os.stat(root / SEQ_PATH).st_size
    if size != setup.sizes.write_mib * MIB:
        raise RuntimeError(f"dd wrote {size} bytes")
    return {"seq_write_seconds": seconds}


def first_write(path: Path) -> float:
    """Opens `path` for writing, writes COPY_UP_WRITE bytes at offset 0, fsyncs, closes; returns seconds."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"w" * COPY_UP_WRITE, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def copy_up(root: Path, setup: Setup) -> dict[str, Any]:
    drop_caches()
    seconds = first_write(root / BIG_PATH)
    size = os.stat(root / BIG_PATH).st_size
    if size != setup.sizes.big_bytes:
        raise RuntimeError(f"the big file is {size} bytes after its first write")
    return {"copy_up_seconds": seconds}


def create_unlink(root: Path, setup: Setup) -> dict[str, Any]:
    directory = root / CREATE_PATH
    directory.mkdir()
    names = [str(directory / f"f{n:05d}") for n in range(setup.sizes.creates)]
    started = time.perf_counter()
    for name in names:
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    created = time.perf_counter()
    for name in names:
        os.unlink(name)
    done = time.perf_counter()
    if os.listdir(directory):
        raise RuntimeError("files are left after the unlinks")
    return {"create_seconds": created - started, "unlink_seconds": done - created}


def rm_rf(root: Path, setup: Setup) -> dict[str, Any]:
    drop_caches()
    seconds = checked_shell(f"rm -rf {shlex.quote(str(root / TREE_PATH))}")
    if os.path.lexists(root / TREE_PATH):
        raise RuntimeError(f"{TREE_PATH} is still there after rm -rf")
    return {"rm_rf_seconds": seconds}


def populate(root: Path, setup: Setup) -> None:
    """An upper with some of everything: new files, a copied-up big file, whiteouts of lower
    files and directories, lower files whose mode changed."""
    untar(root, setup)
    first_write(root / BIG_PATH)
    directories = sorted((root / TREE_PATH).iterdir())
    tenth = max(1, len(directories) // 10)
    for directory in directories[:tenth]:
        shutil.rmtree(directory)
    for directory in directories[tenth : 2 * tenth]:
        for path in directory.iterdir():
            path.chmod(0o600)


def reads(root: Path, setup: Setup) -> dict[str, Any]:
    """The read workloads on `root`, whose upper directory is already populated."""
    r: dict[str, Any] = {}
    q = shlex.quote(str(root))
    r["find_cold_seconds"], r["find_entries"] = timed_find(root)
    r["find_warm_seconds"] = checked_shell(f"find {q} | wc -l")
    drop_caches()
    r["tar_seconds"] = checked_shell(f"tar -cf - -C {q} . | wc -c")
    drop_caches()
    r["big_cold_seconds"], r["big_bytes"], _ = read_file(root / BIG_PATH, digest=False)
    r["big_again_seconds"], _, _ = read_file(root / BIG_PATH, digest=False)
    return r


# ---------------------------------------------------------------- rounds


Workload = Callable[[Path, Setup], dict[str, Any]]
SIMPLE: dict[str, Workload] = {"untar": untar, "dpkg": dpkg, "seq_write": seq_write, "copy_up": copy_up,
                               "create_unlink": create_unlink, "rm_rf": rm_rf}  # fmt: skip


def run_reads(method: str, setup: Setup, check: dict[str, Any] | None) -> dict[str, Any]:
    """Populates a fresh upper through a mount, mounts again, measures the reads; with `check`,
    also records the tree and the big file's sha256 there (untimed)."""
    with mounted(method, setup) as root:
        started = time.perf_counter()
        populate(root, setup)
        populate_seconds = time.perf_counter() - started
    with mounted(method, setup) as root:
        result = reads(root, setup)
        if check is not None:
            check["tree"] = tree(root)
            check["big_sha256"] = read_file(root / BIG_PATH)[2]
    return {**result, "populate_seconds": populate_seconds}


def run_workload(method: str, name: str, setup: Setup, check: dict[str, Any] | None) -> dict[str, Any]:
    """One workload on a fresh upper directory; an error becomes {"error": ...}."""
    fresh_upper(method, setup)
    try:
        if name == "reads":
            return run_reads(method, setup, check)
        with mounted(method, setup) as root:
            return SIMPLE[name](root, setup)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return {"error": f"{name}: {error}"}
    finally:
        fresh_upper(method, setup)


def one_round(method: str, setup: Setup, workloads: list[str], check: dict[str, Any] | None) -> dict[str, Any]:
    """Every workload on `method`, their figures merged, their errors joined."""
    merged: dict[str, Any] = {}
    errors: list[str] = []
    for name in workloads:
        print(f"  {NAMES[method]}: {name} ...", file=sys.stderr)
        result = run_workload(method, name, setup, check)
        if "error" in result:
            errors.append(result.pop("error"))
            print(f"  ERROR {errors[-1][:300]}", file=sys.stderr)
        merged.update(result)
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def rounds(args: argparse.Namespace, setup: Setup, methods: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`args.repeat` rounds, the order of the methods rotating; returns the samples and the
    first round's checks (tree and big-file digest after `reads`)."""
    samples: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    checks: dict[str, Any] = {method: {} for method in methods}
    for attempt in range(args.repeat):
        turn = attempt % len(methods)
        for method in methods[turn:] + methods[:turn]:
            print(f"round {attempt + 1}/{args.repeat}: {NAMES[method]}", file=sys.stderr)
            check = checks[method] if attempt == 0 else None
            samples[method].append(one_round(method, setup, args.workloads, check))
    return samples, checks


def verdicts(checks: dict[str, Any], big_sha256: str) -> dict[str, Any]:
    """Each method's populated tree compared with kernel overlayfs's, and its big file's digest."""
    reference = checks.get("kernel", {})
    out: dict[str, Any] = {}
    for method, check in checks.items():
        if "tree" not in check:
            continue
        verdict: dict[str, Any] = {"big_sha256_same_as_kernel": check["big_sha256"] == reference.get("big_sha256"),
                                   "big_sha256_changed_by_write": check["big_sha256"] != big_sha256}  # fmt: skip
        if method != "kernel" and "tree" in reference:
            verdict["tree"] = compare_trees(check["tree"], reference["tree"])
        out[method] = verdict
    return out


def check_problems(checks: dict[str, Any]) -> dict[str, str]:
    """The methods whose populated tree or big file is not what kernel overlayfs shows: their
    figures measured something else."""
    problems = {}
    for method, verdict in checks.items():
        if method == "kernel" and not verdict["big_sha256_changed_by_write"]:
            problems[method] = "the big file is unchanged after its first write"
        elif method != "kernel" and not verdict["big_sha256_same_as_kernel"]:
            problems[method] = "the big file after its first write differs from kernel overlayfs's"
        elif "tree" in verdict and not verdict["tree"]["identical"]:
            problems[method] = "the populated tree differs from kernel overlayfs's"
    return problems


# ---------------------------------------------------------------- report

# A table row: label, key, digits, the workload that measures it.
Row = tuple[str, str, int, str]


def rows(results: dict[str, Any]) -> list[Row]:
    s = results["sizes"]
    big = f"{s['big_bytes'] / 1e6:.0f} MB"
    write = f"{s['write_mib'] // 1024} GiB" if s["write_mib"] % 1024 == 0 else f"{s['write_mib']} MiB"
    return [
        (f"`tar -xf` of {s['untar_files']:,} small files (s)", "untar_seconds", 3, "untar"),
        (f"`dpkg -i` of a {s['package_files']}-file package, chroot (s)", "dpkg_seconds", 3, "dpkg"),
        (f"sequential write of {write}, `dd conv=fsync` (s)", "seq_write_seconds", 3, "seq_write"),
        (f"first write to a {big} lower file (copy-up) + fsync, cold (s)", "copy_up_seconds", 3, "copy_up"),
        (f"create {s['creates']:,} empty files (s)", "create_seconds", 3, "create_unlink"),
        ("unlink them (s)", "unlink_seconds", 3, "create_unlink"),
        (f"`rm -rf` of a {s['tree_files']:,}-file lower tree, cold (s)", "rm_rf_seconds", 3, "rm_rf"),
        ("populated upper: `find \\| wc -l`, cold (s)", "find_cold_seconds", 3, "reads"),
        ("populated upper: `find \\| wc -l`, warm (s)", "find_warm_seconds", 3, "reads"),
        ("populated upper: `tar -cf - \\| wc -c`, cold (s)", "tar_seconds", 3, "reads"),
        (f"populated upper: the copied-up {big} file read, cold (s)", "big_cold_seconds", 3, "reads"),
        ("populated upper: the same read again (s)", "big_again_seconds", 3, "reads"),
    ]


def median(results: dict[str, Any], method: str, key: str) -> Any:
    stats = results.get(method, {}).get("stats", {}).get(key)
    return stats["median"] if stats else None


def cell(results: dict[str, Any], method: str, key: str, digits: int) -> str:
    """median (min–max), and the median's ratio to kernel overlayfs's."""
    if "unavailable" in results.get(method, {}):
        return UNAVAILABLE
    stats = results.get(method, {}).get("stats", {}).get(key)
    if not stats:
        return "error" if "error" in results.get(method, {}) else "n/a"
    low, high, value = (fmt(stats[k], 1.0, digits) for k in ("min", "max", "median"))
    text = value if low == high else f"{value} ({low}–{high})"
    reference = median(results, "kernel", key)
    if method == "kernel" or reference is None:
        return text
    return f"{text}, {ratio(stats['median'], reference)}"


def table(results: dict[str, Any]) -> str:
    methods = results["args"]["methods"]
    header = ["workload: median (min–max), ratio to kernel overlayfs", *(NAMES[m] for m in methods)]
    lines = [f"| {' | '.join(header)} |", "| --- |" + " ---: |" * len(methods)]
    for label, key, digits, workload in rows(results):
        if workload in results["args"]["workloads"]:
            lines.append(f"| {label} | {' | '.join(cell(results, m, key, digits) for m in methods)} |")
    return "\n".join(lines)


def rate_lines(results: dict[str, Any]) -> list[str]:
    """Throughputs and operation rates from the medians."""
    s = results["sizes"]
    parts = []
    for method in results["args"]["methods"]:
        figures = []
        write, copy, cold = (median(results, method, k) for k in ("seq_write_seconds", "copy_up_seconds",
                                                                   "big_cold_seconds"))  # fmt: skip
        create, unlink = median(results, method, "create_seconds"), median(results, method, "unlink_seconds")
        if write:
            figures.append(f"write {s['write_mib'] / write:,.0f} MiB/s")
        if copy:
            figures.append(f"copy-up {s['big_bytes'] / MIB / copy:,.0f} MiB/s")
        if cold:
            figures.append(f"cold read {s['big_bytes'] / MIB / cold:,.0f} MiB/s")
        if create and unlink:
            figures.append(f"{s['creates'] / create:,.0f} creates/s, {s['creates'] / unlink:,.0f} unlinks/s")
        if figures:
            parts.append(f"{NAMES[method]}: {', '.join(figures)}")
    return parts


def target_lines(results: dict[str, Any]) -> list[str]:
    """Issue 10's targets: data paths within 1.3x of kernel overlayfs; metadata-heavy workloads
    at least as fast as fuse-overlayfs."""
    if "crfs" not in results["args"]["methods"]:
        return []
    if "unavailable" in results.get("crfs", {}):
        return ["targets: crfs-merge --upper " + UNAVAILABLE]
    lines = ["targets (crfs-merge --upper):"]
    for key, what in (("seq_write_seconds", "sequential write"), ("big_cold_seconds", "read after copy-up, cold"),
                      ("big_again_seconds", "read after copy-up, again")):  # fmt: skip
        mine, kernel = median(results, "crfs", key), median(results, "kernel", key)
        met = mine is not None and kernel is not None and mine <= 1.3 * kernel
        lines.append(f"  {what} within 1.3x of kernel overlayfs: {ratio(mine, kernel)} -> {'yes' if met else 'NO'}")
    for key, what in (("untar_seconds", "untar"), ("dpkg_seconds", "dpkg -i"), ("rm_rf_seconds", "rm -rf")):
        mine, fuse = median(results, "crfs", key), median(results, "fuse_overlayfs", key)
        met = mine is not None and fuse is not None and mine <= fuse
        lines.append(f"  {what} at least as fast as fuse-overlayfs: {ratio(mine, fuse)} of it -> "
                     f"{'yes' if met else 'NO'}")  # fmt: skip
    return lines


def check_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for method, verdict in results.get("checks", {}).items():
        line = f"{NAMES[method]}: the big file after its first write "
        if method == "kernel":
            line += "changed" if verdict["big_sha256_changed_by_write"] else "UNCHANGED"
        else:
            line += "has kernel's sha256" if verdict["big_sha256_same_as_kernel"] else "DIFFERS from kernel's"
        if "tree" in verdict:
            t = verdict["tree"]
            state = "IDENTICAL to" if t["identical"] else "DIFFERS from"
            line += (f"; populated tree {state} kernel overlayfs's ({t['entries']} vs {t['reference_entries']} "
                     f"entries; only here {t['only_here'][:3]}, only in kernel {t['only_reference'][:3]}, "
                     f"type/size differ {t['differ'][:3]})")  # fmt: skip
        lines.append(line)
    return lines


def summary(results: dict[str, Any]) -> str:
    args, image = results["args"], results.get("image", {})
    lines = [
        f"image: debian + a layer with a {results['sizes']['big_bytes'] / 1e6:.0f} MB file and a "
        f"{results['sizes']['tree_files']:,}-file tree; {image.get('layers')} layers, "
        f"{(image.get('blob_bytes', 0) + image.get('extra_layer_bytes', 0)) / MIB:.1f} MiB of blobs, "
        f"built in {fmt(image.get('build_seconds'), 1.0, 1)} s",
        f"caches dropped: {results['caches_dropped']}; crfs-merge code: {results['crfs_code']}; "
        f"{args['repeat']} round(s), the order of the methods rotating; a fresh upper directory per workload",
    ]
    if results.get("crfs_unavailable"):
        lines.append(f"crfs-merge --upper {UNAVAILABLE}: {results['crfs_unavailable']}")
    lines += [f"{NAMES[m]}: ERROR {results[m]['error']}" for m in args["methods"] if "error" in results.get(m, {})]
    lines += check_lines(results)
    lines += rate_lines(results)
    lines += target_lines(results)
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def listed(choices: tuple[str, ...], always: str | None = None) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of `choices`, in their order, `always` always in."""

    def parse(value: str) -> list[str]:
        chosen = {name.strip() for name in value.split(",") if name.strip()}
        unknown = chosen - set(choices)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {', '.join(choices)}")
        return [c for c in choices if c in chosen or c == always]

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=listed(METHODS, "kernel"), default=list(METHODS),
                        help=f"default: {','.join(METHODS)} (kernel overlayfs always runs)")  # fmt: skip
    parser.add_argument("--workloads", type=listed(WORKLOADS), default=list(WORKLOADS),
                        help=f"default: {','.join(WORKLOADS)}")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="rounds per method")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, small sizes")
    parser.add_argument("--build-cache", type=Path, default=DEFAULT_BUILD_CACHE,
                        help="where the debootstrapped base layer is kept between runs")  # fmt: skip
    common_options(parser, keep_help="keep the image, the extracted layers and the crfs-merge cache")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    return args


def prepare(args: argparse.Namespace, setup: Setup, results: dict[str, Any]) -> None:
    """The image, the layers for the overlays, the inputs, the mountpoints, crfs-merge's cache."""
    print(f"building the image in {setup.layout} ...", file=sys.stderr)
    results["image"] = build_image(args, setup)
    print("extracting layers for the overlays ...", file=sys.stderr)
    setup.layers, results["overlay_layers"] = extract_layers(layer_blobs(setup.layout), setup.work / "layers")
    setup.inputs.mkdir(parents=True, exist_ok=True)
    write_untar_input(setup.inputs / "untar.tar", setup.sizes, args.seed)
    build_package(setup.inputs / "package", setup.inputs / f"{DEB_NAME}.deb", setup.sizes.package_files)
    for method in args.methods:
        setup.mountpoint(method).mkdir(parents=True, exist_ok=True)
    if "crfs" in args.methods:
        print("crfs-merge: a first writable mount (indexes the image) ...", file=sys.stderr)
        setup.crfs_unavailable = refusal(setup)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "args": {
            "methods": args.methods,
            "workloads": args.workloads,
            "repeat": args.repeat,
            "quick": args.quick,
            "seed": args.seed,
        },
        "sizes": sizes.__dict__,
        "workdir": str(work),
        "caches_dropped": drop_caches(),
        "crfs_code": crfs_code(),
    }
    setup = Setup(work, sizes)
    try:
        prepare(args, setup, results)
        methods = list(args.methods)
        if setup.crfs_unavailable is not None:
            results["crfs_unavailable"] = setup.crfs_unavailable
            results["crfs"] = {"unavailable": setup.crfs_unavailable, "rounds": [], "stats": {}}
            methods.remove("crfs")
        samples, checks = rounds(args, setup, methods)
        for method, runs in samples.items():
            results[method] = {"rounds": runs, "stats": summarize(runs)}
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                results[method]["error"] = errors[0]
        results["checks"] = verdicts(checks, results["image"]["big_sha256"])
        for method, problem in check_problems(results["checks"]).items():
            results[method].setdefault("error", problem)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        for method in args.methods:
            results.setdefault(method, {})["error"] = f"preparing: {error}"
    finally:
        for method in METHODS:
            unmount_method(method, setup)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("image", "extra", "layers", "caches", "inputs", "uppers", "debian-rootfs", "debootstrap",
               *MOUNTPOINTS.values())  # fmt: skip
    return run_benchmark(args, "crfs-bench-writable-", scratch, run, (table, summary), args.methods)


if __name__ == "__main__":
    sys.exit(main())
