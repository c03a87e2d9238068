"""Benchmark crfs-merge (from an OCI layout, from a registry, and lazily as eStargz) against
kernel overlayfs, fuse-overlayfs and `skopeo copy` + `umoci raw unpack`, on one image.

Images (--image):

- synthetic (default): bench_local.py's deterministic image (--files regular files over 5 gzip
  layers, with file and directory whiteouts, opaque directories, symlinks and hardlinks) plus a
  sixth, uncompressed layer holding one 200 MiB file (bench_lazy.py's `data/big.bin`);
- debian: a Debian bookworm minbase root filesystem from `debootstrap` (its layer tar cached in
  --build-cache) and three layers made as `docker build` makes them: a RUN removing docs, man
  pages and .debs (whiteouts), a RUN replacing /etc/apt/apt.conf.d (an opaque directory), and
  a COPY of an app tree that also changes /etc/passwd (see overlay_images.py); the "big file"
  is the largest file, apt's Packages list;
- large: files of 200, 350 and 500 MB (seeded; half random, half text) and a small tree; the
  big file is the 500 MB one.

Methods (--methods, a comma-separated subset; kernel overlayfs always runs: it is the reference):

- crfs: `python3 -m unionfs.cli --cache-dir C oci:LAYOUT:bench MNT`, this checkout first on
  PYTHONPATH;
- crfs_registry: the layout pushed with skopeo to a docker-registry on 127.0.0.1, mounted as
  `127.0.0.1:PORT/bench:bench`;
- crfs_esgz: the image converted with `crfs-merge convert` straight into that registry as
  `bench-esgz:bench`, mounted lazily (`--prefetch none`);
- skopeo_umoci: `skopeo copy docker://127.0.0.1:PORT/bench:bench oci:DIR:bench` then
  `umoci raw unpack --image DIR:bench ROOTFS`; "mount ready" is the sum, the workload runs on ROOTFS;
- kernel: each layer extracted with `tar -xf` into its own directory, OCI whiteouts converted
  to overlay ones (`.wh.NAME` -> character device 0/0, `.wh..wh..opq` -> xattr
  trusted.overlay.opaque=y), then `mount -t overlay overlay -o lowerdir=LN:...:L1 MNT`;
- fuse_overlayfs: `fuse-overlayfs -o lowerdir=LN:...:L1 MNT` over the same directories.

Two mount-ready rows: "from nothing" is a mount with a fresh cache directory for crfs-merge,
pull + unpack for skopeo_umoci, and the extraction of the layers (timed once) plus the mount
for the overlays. crfs and crfs_registry then mount again with that cache (warm: the other
row) to run the workload; crfs_esgz runs it on its fresh lazy mount, so its reads fetch chunks:
the `tar` step fetches every chunk, and the reads after it come from its caches.

First every tree is compared with kernel overlayfs's (os.walk + lstat: path, type, size; directory
sizes are filesystem-specific and only counted) and the big file's sha256 checked. Then --repeat
rounds (the order of the methods rotating each round), each a fresh mount running in order:

1. `find MNT | wc -l` cold, then warm (immediately again);
2. os.walk + os.lstat of every entry in a Python subprocess (its own timing), cold, then warm;
3. `tar -cf - -C MNT . | wc -c`, cold (reads every byte);
4. the big file read sequentially in 1 MiB pieces, cold, then again;
5. 2000 `pread`s of 4 KiB at seeded random offsets of the big file, warm (read whole just before);
6. 8 reader processes, each reading a disjoint eighth (round-robin over sorted paths) of the
   regular files except the big one, cold; wall time until the last finishes;
7. the server's peak RSS (VmHWM) at ready and after the workload (crfs-merge, fuse-overlayfs),
   and that per merged entry; for crfs-merge also beyond a baseline: the VmHWM of a crfs-merge
   server that mounted a 1-file image and ran find, lstat and tar on it (--repeat times).

"Cold" means after `sync; echo 3 > /proc/sys/vm/drop_caches` (needs root, as do the overlay
mount and the trusted.* xattrs). A FUSE server keeps what it holds in its own memory across a
drop, so within one mount only the kernel side is cold. Prints a markdown table of median
(min-max) per workload and method with each median's ratio to kernel overlayfs, then a summary;
--json PATH writes all samples. --quick is a smoke run: one round, 200 random reads, and a
smaller synthetic (5000 files, 32 MiB big file unless --files says otherwise) or large (a tenth) image.

    python3 benchmarks/bench_overlay.py --image debian --repeat 3 --json /tmp/debian.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_lazy import BIG_PATH, CRFS, build_big, read_file  # noqa: E402
from benchmarks.bench_local import build_image  # noqa: E402
from benchmarks.bench_registry import crfs_code, crfs_env, keep_bytecode  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    KIB,
    MIB,
    common_options,
    drop_caches,
    fmt,
    measure_server,
    peak_kib,
    ratio,
    run_benchmark,
    run_measured,
    summarize,
    tail,
    tar_info,
    timed_find,
    timed_shell,
    unmount,
    vm_hwm_kib,
)
from benchmarks.overlay_images import build_debian, build_large  # noqa: E402
from registry.layout import REF_NAME  # noqa: E402
from registry.layout_writer import write_layout, write_manifest  # noqa: E402
from registry.manifest import Platform  # noqa: E402
from registry.media_types import Compression  # noqa: E402
from tests.registry_servers import Registry, skopeo_copy  # noqa: E402

LAYERS = 5
BIG_SIZE = 200 * MIB
QUICK_BIG_SIZE = 32 * MIB
QUICK_FILES = 5000
QUICK_LARGE_SCALE = 0.1
TAG = "bench"
REPO, ESGZ_REPO = "bench", "bench-esgz"
RANDOM_READS, QUICK_RANDOM_READS = 2000, 200
RANDOM_READ_SIZE = 4 * KIB
READERS = 8
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
UNMOUNT_WAIT_SECONDS = 60.0
IMAGES = ("synthetic", "debian", "large")
METHODS = ("crfs", "crfs_registry", "crfs_esgz", "skopeo_umoci", "fuse_overlayfs", "kernel")
CRFS_METHODS = ("crfs", "crfs_registry", "crfs_esgz")
SERVER_METHODS = (*CRFS_METHODS, "fuse_overlayfs")
REGISTRY_METHODS = ("crfs_registry", "crfs_esgz", "skopeo_umoci")
NAMES = {"crfs": "crfs-merge (OCI layout)", "crfs_registry": "crfs-merge (registry)",
         "crfs_esgz": "crfs-merge eStargz (lazy)", "skopeo_umoci": "skopeo + umoci",
         "fuse_overlayfs": "fuse-overlayfs", "kernel": "kernel overlayfs"}  # fmt: skip
MOUNTPOINTS = {"crfs": "mnt", "crfs_registry": "mnt-registry", "crfs_esgz": "mnt-esgz", "skopeo_umoci": "umoci/rootfs",
               "fuse_overlayfs": "mnt-fuse-overlayfs", "kernel": "mnt-overlay"}  # fmt: skip
DEFAULT_BUILD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crfs-merge-bench"

LSTAT_WALK = r"""
import os, sys, time
started = time.perf_counter()
count = 1
for parent, dirs, files in os.walk(sys.argv[1]):
    for name in dirs + files:
        os.lstat(os.path.join(parent, name))
        count += 1
print(count, time.perf_counter() - started)
"""

LIST_READER = r"""
import os, sys
buf = bytearray(1 << 20)
total = 0
with open(sys.argv[2]) as names:
    for name in names.read().splitlines():
        with open(os.path.join(sys.argv[1], name), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
print(total)
"""

# A table row: label, key in each round's results, divisor for display, digits.
Row = tuple[str, str, float, int]
INFO_KEYS = {"find_entries", "tar_bytes", "parallel_bytes"}  # shown without ratios


def rows(big: str, random_reads: int) -> list[Row]:
    return [
        ("mount ready (s)", "mount_seconds", 1.0, 3),
        ("mount ready from nothing: fresh cache / pull + unpack / extract + mount (s)", "mount_cold_seconds", 1.0, 3),
        ("`find \\| wc -l`, cold (s)", "find_cold_seconds", 1.0, 3),
        ("`find \\| wc -l`, warm (s)", "find_warm_seconds", 1.0, 3),
        ("lstat every entry, cold (s)", "lstat_cold_seconds", 1.0, 3),
        ("lstat every entry, warm (s)", "lstat_warm_seconds", 1.0, 3),
        ("`tar -cf - \\| wc -c`, cold (s)", "tar_seconds", 1.0, 3),
        (f"big file ({big}) sequential read, cold (s)", "big_cold_seconds", 1.0, 3),
        ("big file sequential read, again (s)", "big_again_seconds", 1.0, 3),
        (f"{random_reads} random 4 KiB reads of the big file, warm (s)", "random_seconds", 1.0, 4),
        (f"{READERS} parallel readers, all regular files but the big one, cold (wall s)", "parallel_seconds", 1.0, 3),
        ("server VmHWM at ready (MiB)", "rss_ready_kib", 1024.0, 1),
        ("crfs-merge VmHWM at ready per merged entry beyond its 1-file baseline (B)", "ready_beyond_baseline_bytes",
         1.0, 0),
        ("lazy: server VmHWM at ready, cache warm (MiB)", "warm_rss_ready_kib", 1024.0, 1),
        ("server peak RSS, VmHWM after the workload (MiB)", "peak_rss_kib", 1024.0, 1),
        ("server peak RSS per merged entry (bytes)", "rss_per_entry_bytes", 1.0, 0),
        ("crfs-merge peak RSS per merged entry beyond its 1-file baseline (B)", "rss_beyond_baseline_bytes", 1.0, 0),
        ("entries (`find \\| wc -l`)", "find_entries", 1.0, 0),
        ("bytes from `tar -cf - \\| wc -c` (MiB)", "tar_bytes", float(MIB), 1),
        (f"bytes read by the {READERS} readers (MiB)", "parallel_bytes", float(MIB), 1),
    ]  # fmt: skip


@dataclass
class Setup:
    """Where everything of one run lives, and what the workloads need to know of the image."""

    work: Path
    layout: Path
    log: Path
    big_path: str = BIG_PATH
    layers: list[Path] = field(default_factory=list)  # extracted for the overlays, bottom first
    extract_seconds: float | None = None
    registry: str | None = None  # host:port
    random_reads: int = RANDOM_READS

    def mountpoint(self, method: str) -> Path:
        return self.work / MOUNTPOINTS[method]

    def lowerdir(self) -> str:
        return ":".join(str(d) for d in reversed(self.layers))


# ---------------------------------------------------------------- images


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def tagged_image(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and config (parsed) of the image tagged `tag` in `layout`."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    manifest = json.loads(blob_path(layout, descriptor["digest"]).read_bytes())
    return manifest, json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())


def layer_blobs(layout: Path) -> list[Path]:
    """The layer blobs of image TAG in `layout`, bottom first."""
    manifest, _ = tagged_image(layout, TAG)
    return [blob_path(layout, layer["digest"]) for layer in manifest["layers"]]


def stack_images(layout: Path, top: Path) -> None:
    """Tags TAG in `layout`: the layers of its `latest` image under those of the `latest` image
    of layout `top` (whose blobs are hard-linked in)."""
    base, base_config = tagged_image(layout, "latest")
    extra, extra_config = tagged_image(top, "latest")
    for layer in extra["layers"]:
        target = blob_path(layout, layer["digest"])
        if not target.exists():
            os.link(blob_path(top, layer["digest"]), target)
    diff_ids = base_config["rootfs"]["diff_ids"] + extra_config["rootfs"]["diff_ids"]
    config = {**base_config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    write_manifest(layout, base["layers"] + extra["layers"], json.dumps(config, sort_keys=True).encode(), TAG,
                   Platform.host())  # fmt: skip


def build_synthetic(work: Path, files: int, big_size: int, seed: int) -> dict[str, Any]:
    """bench_local's image plus a layer holding the big file, at WORK/image; returns facts."""
    facts = build_image(work / "image", files, LAYERS, seed)
    started = time.perf_counter()
    facts["big_sha256"] = build_big(work / "big-src", big_size, seed)
    stack_images(work / "image", work / "big-src")
    facts["build_seconds"] += time.perf_counter() - started
    facts["expected_entries"] += 2  # data/ and data/big.bin
    facts.update(files=files, layers=LAYERS + 1, big_path=BIG_PATH, big_size=big_size)
    return facts


def build(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Writes the chosen image (tag TAG) at WORK/image; returns facts about it."""
    layout = work / "image"
    if args.image == "debian":
        return build_debian(layout, work, args.build_cache, TAG, args.seed)
    if args.image == "large":
        return build_large(layout, TAG, args.seed, QUICK_LARGE_SCALE if args.quick else 1.0)
    return build_synthetic(work, args.files, QUICK_BIG_SIZE if args.quick else BIG_SIZE, args.seed)


def build_tiny(layout: Path) -> None:
    """An OCI layout (tag TAG) holding one 1 KiB file, for the crfs-merge RSS baseline."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tar_info("only.txt", tarfile.REGTYPE, 0o644, KIB), io.BytesIO(b"x" * KIB))
    write_layout(layout, [buffer.getvalue()], Compression.GZIP, tag=TAG)


def publish(setup: Setup, methods: list[str], work: Path) -> dict[str, Any]:
    """Pushes the layout to the registry and converts it to eStargz there, as `methods` need."""
    facts: dict[str, Any] = {}
    started = time.perf_counter()
    skopeo_copy(f"oci:{setup.layout}:{TAG}", f"docker://{setup.registry}/{REPO}:{TAG}")
    facts["push_seconds"] = time.perf_counter() - started
    if "crfs_esgz" in methods:
        argv = [*CRFS, "convert", "--cache-dir", str(work / "caches" / "convert"), f"oci:{setup.layout}:{TAG}",
                f"docker://{setup.registry}/{ESGZ_REPO}:{TAG}"]  # fmt: skip
        facts["convert_seconds"], rc, facts["convert_rss_kib"] = run_measured(argv, setup.log, crfs_env())
        if rc != 0:
            raise RuntimeError(f"crfs-merge convert exited {rc}; log: {tail(setup.log)}")
    return facts


# ---------------------------------------------------------------- overlay layers


def extract_layers(blobs: list[Path], root: Path) -> tuple[list[Path], dict[str, Any]]:
    """Extracts each blob with tar into ROOT/N and converts its whiteouts; returns the directories."""
    started = time.perf_counter()
    dirs: list[Path] = []
    counts = {"whiteouts": 0, "opaque": 0}
    for number, blob in enumerate(blobs, start=1):
        target = root / f"L{number}"
        target.mkdir(parents=True)
        subprocess.run(["tar", "--numeric-owner", "-xpf", str(blob), "-C", str(target)], check=True)
        for key, value in convert_whiteouts(target).items():
            counts[key] += value
        dirs.append(target)
    return dirs, {**counts, "extract_seconds": time.perf_counter() - started}


def convert_whiteouts(layer: Path) -> dict[str, int]:
    """Turns the OCI whiteout markers under `layer` into overlayfs whiteouts and opaque xattrs."""
    counts = {"whiteouts": 0, "opaque": 0}
    for parent, _, files in os.walk(layer):
        for name in files:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            os.unlink(os.path.join(parent, name))
            if name == OPAQUE_MARKER:
                os.setxattr(parent, OPAQUE_XATTR, b"y")
                counts["opaque"] += 1
            else:
                overlay_whiteout(os.path.join(parent, name.removeprefix(WHITEOUT_PREFIX)))
                counts["whiteouts"] += 1
    return counts


def overlay_whiteout(path: str) -> None:
    """A character device 0/0 at `path`; if this layer also has a directory there, it becomes
    opaque instead (OCI whiteouts hide only lower layers), and any other entry stays."""
    if os.path.isdir(path) and not os.path.islink(path):
        os.setxattr(path, OPAQUE_XATTR, b"y")
    elif not os.path.lexists(path):
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


# ---------------------------------------------------------------- mounting


def mount_argv(method: str, setup: Setup, cache: Path | None) -> list[str]:
    mnt = str(setup.mountpoint(method))
    if method == "crfs":
        return [*CRFS, "--cache-dir", str(cache), f"oci:{setup.layout}:{TAG}", mnt]
    if method == "crfs_registry":
        return [*CRFS, "--cache-dir", str(cache), f"{setup.registry}/{REPO}:{TAG}", mnt]
    if method == "crfs_esgz":
        return [*CRFS, "--cache-dir", str(cache), "--prefetch", "none", f"{setup.registry}/{ESGZ_REPO}:{TAG}", mnt]
    if method == "fuse_overlayfs":
        return ["fuse-overlayfs", "-o", f"lowerdir={setup.lowerdir()}", mnt]
    return ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={setup.lowerdir()}", mnt]


def mount(method: str, setup: Setup, cache: Path | None) -> dict[str, Any]:
    """Drops caches and mounts; returns the time until the command returned (and an error)."""
    drop_caches()
    env = crfs_env() if method in CRFS_METHODS else None
    seconds, rc, _ = run_measured(mount_argv(method, setup, cache), setup.log, env)
    result: dict[str, Any] = {"mount_seconds": seconds}
    if rc != 0 or not os.path.ismount(setup.mountpoint(method)):
        result["error"] = f"mounting {NAMES[method]} exited {rc}; log: {tail(setup.log)}"
    return result


def fuse_overlayfs_pid(mountpoint: Path) -> int | None:
    """The pid of the fuse-overlayfs process serving `mountpoint`, found by its command line."""
    for entry in os.listdir("/proc"):
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if entry.isdigit() else []
        except OSError:
            continue
        if args and args[0].endswith(b"fuse-overlayfs") and str(mountpoint).encode() in args:
            return int(entry)
    return None


def unmount_any(method: str, mountpoint: Path, pid: int | None) -> None:
    """Unmounts a kernel overlay or FUSE mount and waits for its process (if any) to exit."""
    kernel = method == "kernel" and os.path.ismount(mountpoint)
    if kernel and subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    unmount(mountpoint)  # fusermount3 for the FUSE ones; nothing if already unmounted
    deadline = time.monotonic() + UNMOUNT_WAIT_SECONDS
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


Steps = Callable[[Path], dict[str, Any]]


def on_mount(method: str, setup: Setup, cache: Path | None, steps: Steps) -> dict[str, Any]:
    """Mounts `method`, runs `steps(mountpoint)` with its server's VmHWM before and after, unmounts."""
    mnt = setup.mountpoint(method)
    result = mount(method, setup, cache)
    if "error" in result:
        unmount_any(method, mnt, None)
        return result
    if method in CRFS_METHODS:
        result.update(measure_server(mnt, lambda: steps(mnt)))
        return result
    pid = fuse_overlayfs_pid(mnt) if method == "fuse_overlayfs" else None
    result["rss_ready_kib"] = vm_hwm_kib(pid)
    try:
        result.update(steps(mnt))
        result["peak_rss_kib"] = peak_kib(result["rss_ready_kib"], vm_hwm_kib(pid))
    finally:
        unmount_any(method, mnt, pid)
    return result


def pull_and_unpack(setup: Setup, steps: Steps) -> dict[str, Any]:
    """skopeo copy from the registry to a fresh layout, then umoci raw unpack; `steps` on the rootfs."""
    out = setup.work / "umoci"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    drop_caches()
    skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{setup.registry}/{REPO}:{TAG}",
              f"oci:{out / 'layout'}:{TAG}"]  # fmt: skip
    pull_seconds, rc, pull_rss = run_measured(skopeo, setup.log)
    result: dict[str, Any] = {"pull_seconds": pull_seconds, "pull_rss_kib": pull_rss}
    if rc != 0:
        return {**result, "error": f"skopeo exited {rc}; log: {tail(setup.log)}"}
    # No drop here: a real pull-and-unpack has the blobs it just wrote in the page cache too.
    umoci = ["umoci", "raw", "unpack", "--image", f"{out / 'layout'}:{TAG}", str(setup.mountpoint("skopeo_umoci"))]
    unpack_seconds, rc, unpack_rss = run_measured(umoci, setup.log)
    result.update(unpack_seconds=unpack_seconds, unpack_rss_kib=unpack_rss, mount_seconds=pull_seconds + unpack_seconds)
    if rc != 0:
        return {**result, "error": f"umoci exited {rc}; log: {tail(setup.log)}"}
    result["mount_cold_seconds"] = result["mount_seconds"]
    result.update(steps(setup.mountpoint("skopeo_umoci")))
    return result


def run_method(method: str, setup: Setup, steps: Steps, label: str) -> dict[str, Any]:
    """One measured use of `method`: its mount(s) and `steps`; see the docstring for "from nothing"."""
    if method == "skopeo_umoci":
        return pull_and_unpack(setup, steps)
    if method not in CRFS_METHODS:
        result = on_mount(method, setup, None, steps)
        if setup.extract_seconds is not None and "mount_seconds" in result:
            result["mount_cold_seconds"] = setup.extract_seconds + result["mount_seconds"]
        return result
    cache = setup.work / "caches" / f"{method}-{label}"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        if method == "crfs_esgz":  # lazy: the workload runs on the fresh mount, and its reads fetch
            result = on_mount(method, setup, cache, steps)
            result["mount_cold_seconds"] = result.get("mount_seconds")
            if "error" not in result:  # then once more with that cache: the warm ready time
                warm = on_mount(method, setup, cache, count_entries)
                result.update(mount_seconds=warm.get("mount_seconds"), warm_rss_ready_kib=warm.get("rss_ready_kib"))
            return result
        cold = on_mount(method, setup, cache, lambda _: {})
        if "error" in cold:
            return cold
        result = on_mount(method, setup, cache, steps)
        result.update(mount_cold_seconds=cold["mount_seconds"], cold_peak_rss_kib=cold.get("peak_rss_kib"))
        return result
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------- trees


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under `root` (os.walk) with its type letter (as `ls -l` shows it) and lstat size."""
    found: dict[str, tuple[str, int]] = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (stat.filemode(st.st_mode)[0], st.st_size)
    return found


def compare_trees(other: dict[str, tuple[str, int]], reference: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Paths only in one tree, and type or size differences (directory sizes only counted)."""
    common = other.keys() & reference.keys()
    differ = sorted(p for p in common if other[p] != reference[p] and not other[p][0] == reference[p][0] == "d")
    dir_sizes = sum(1 for p in common if other[p] != reference[p] and other[p][0] == reference[p][0] == "d")
    only_other, only_reference = sorted(other.keys() - reference.keys()), sorted(reference.keys() - other.keys())
    return {
        "entries": len(other),
        "reference_entries": len(reference),
        "only_here_count": len(only_other),
        "only_here": only_other[:20],
        "only_reference_count": len(only_reference),
        "only_reference": only_reference[:20],
        "differ_count": len(differ),
        "differ": [(p, other[p], reference[p]) for p in differ[:20]],
        "dir_size_differ_count": dir_sizes,
        "identical": not (only_other or only_reference or differ),
    }


def verify(setup: Setup, methods: list[str], big_sha256: str) -> tuple[dict[str, Any], list[str]]:
    """Compares each tree and big-file digest to the kernel overlay's; returns the comparison and
    the regular files (relative, sorted) that the parallel readers share out."""
    trees: dict[str, dict[str, tuple[str, int]]] = {}
    checks: dict[str, Any] = {}
    for method in methods:

        def steps(mnt: Path, method: str = method) -> dict[str, Any]:
            trees[method] = tree(mnt)
            return {"big_sha256_ok": read_file(mnt / setup.big_path)[2] == big_sha256}

        print(f"verify: {NAMES[method]} ...", file=sys.stderr)
        checks[method] = run_method(method, setup, steps, "verify")
    reference = trees.get("kernel", {})
    for method in methods:
        if method != "kernel" and method in trees and reference:
            checks[method]["tree"] = compare_trees(trees[method], reference)
    files = sorted(p for p, (kind, _) in reference.items() if kind == "-" and p != setup.big_path)
    return checks, files


# ---------------------------------------------------------------- workloads


def lstat_walk(root: Path) -> tuple[float | None, int | None]:
    """os.walk + os.lstat of every entry in a Python subprocess; returns its own (seconds, entries)."""
    _, rc, out = timed_shell(f"{shlex.quote(sys.executable)} -c {shlex.quote(LSTAT_WALK)} {shlex.quote(str(root))}")
    count, _, seconds = out.partition(" ")
    return (float(seconds), int(count)) if rc == 0 and count.isdigit() else (None, None)


def random_reads(path: Path, seed: int, count: int) -> float:
    """Reads `path` whole, then times `count` preads of RANDOM_READ_SIZE at seeded offsets."""
    size = read_file(path, digest=False)[1]
    rng = random.Random(f"random-reads-{seed}")
    offsets = [rng.randrange(size - RANDOM_READ_SIZE) for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        for offset in offsets:
            os.pread(fd, RANDOM_READ_SIZE, offset)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def write_shares(files: list[str], directory: Path) -> list[Path]:
    """Writes READERS lists of `files`, dealt round-robin; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    shares = [directory / f"share-{k}.txt" for k in range(READERS)]
    for k, share in enumerate(shares):
        share.write_text("".join(f"{name}\n" for name in files[k::READERS]))
    return shares


def parallel_read(root: Path, shares: list[Path]) -> tuple[float, int | None]:
    """Drops caches, then runs one reader process per share at once; returns (wall seconds, bytes read)."""
    drop_caches()
    started = time.perf_counter()
    readers = [
        subprocess.Popen([sys.executable, "-c", LIST_READER, str(root), str(share)], stdout=subprocess.PIPE, text=True)
        for share in shares
    ]
    outputs = [reader.communicate()[0].strip() for reader in readers]
    seconds = time.perf_counter() - started
    ok = all(reader.returncode == 0 and out.isdigit() for reader, out in zip(readers, outputs, strict=True))
    return seconds, sum(int(out) for out in outputs) if ok else None


def workload(root: Path, setup: Setup, shares: list[Path], seed: int) -> dict[str, Any]:
    """Workloads 1-6 on `root`, in order."""
    q = shlex.quote(str(root))
    big = root / setup.big_path
    r: dict[str, Any] = {}
    r["find_cold_seconds"], r["find_entries"] = timed_find(root)
    r["find_warm_seconds"], _, _ = timed_shell(f"find {q} | wc -l")
    drop_caches()
    r["lstat_cold_seconds"], r["lstat_entries"] = lstat_walk(root)
    r["lstat_warm_seconds"], _ = lstat_walk(root)
    drop_caches()
    r["tar_seconds"], r["tar_rc"], out = timed_shell(f"tar -cf - -C {q} . | wc -c")
    r["tar_bytes"] = int(out) if out.isdigit() else None
    drop_caches()
    r["big_cold_seconds"], r["big_bytes"], _ = read_file(big, digest=False)
    r["big_again_seconds"], _, _ = read_file(big, digest=False)
    r["random_seconds"] = random_reads(big, seed, setup.random_reads)
    r["parallel_seconds"], r["parallel_bytes"] = parallel_read(root, shares)
    return r


def count_entries(root: Path) -> dict[str, Any]:
    """--mount-only's workload: the entries, for the per-entry figures."""
    return {"find_entries": timed_find(root)[1]}


def tiny_workload(root: Path) -> dict[str, Any]:
    """What the baseline server serves: find, lstat walk and tar of its one file."""
    q = shlex.quote(str(root))
    _, entries = timed_find(root)
    lstat_walk(root)
    timed_shell(f"tar -cf - -C {q} . | wc -c")
    return {"find_entries": entries}


# ---------------------------------------------------------------- rounds


def rounds(
    setup: Setup, methods: list[str], shares: list[Path], seed: int, repeat: int, mount_only: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """`repeat` rounds of the workload on each method, the order rotating; returns their samples."""

    def steps(mnt: Path) -> dict[str, Any]:
        return count_entries(mnt) if mount_only else workload(mnt, setup, shares, seed)

    samples: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for attempt in range(repeat):
        turn = attempt % len(methods)
        for method in methods[turn:] + methods[:turn]:
            print(f"round {attempt + 1}/{repeat}: {NAMES[method]} ...", file=sys.stderr)
            samples[method].append(run_method(method, setup, steps, f"round{attempt}"))
    return samples


def per_entry(samples: dict[str, list[dict[str, Any]]], base_kib: float | None, base_ready_kib: float | None) -> None:
    """Adds to each round of a server method its peak RSS per merged entry, and for crfs-merge
    that beyond the baseline's VmHWM (the fixed cost of a crfs-merge server), after the workload
    and at ready (the mount's own setup: merging, and for a lazy mount parsing the TOCs)."""
    for method, runs in samples.items():
        for r in runs:
            peak, ready, entries = r.get("peak_rss_kib"), r.get("rss_ready_kib"), r.get("find_entries")
            if method not in SERVER_METHODS or peak is None or not entries:
                continue
            r["rss_per_entry_bytes"] = peak * KIB / entries
            if method in CRFS_METHODS and base_kib is not None:
                r["rss_beyond_baseline_bytes"] = (peak - base_kib) * KIB / entries
            if method in CRFS_METHODS and base_ready_kib is not None and ready is not None:
                r["ready_beyond_baseline_bytes"] = (ready - base_ready_kib) * KIB / entries


def collect(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each method's rounds, the spread of every figure, and its first error."""
    results: dict[str, Any] = {}
    for method, runs in samples.items():
        results[method] = {"rounds": runs, "stats": summarize(runs)}
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            results[method]["error"] = errors[0]
    return results


def baseline(setup: Setup, repeat: int) -> dict[str, Any]:
    """The VmHWM of a crfs-merge server for a 1-file image (mounted once to index first)."""
    tiny = Setup(setup.work, setup.work / "tiny", setup.log)
    build_tiny(tiny.layout)
    tiny.mountpoint("crfs").mkdir(parents=True, exist_ok=True)  # also when --methods leaves crfs out
    cache = setup.work / "caches" / "tiny"
    on_mount("crfs", tiny, cache, tiny_workload)
    runs = [on_mount("crfs", tiny, cache, tiny_workload) for _ in range(repeat)]
    return {"rounds": runs, "stats": summarize(runs)}


# ---------------------------------------------------------------- report


def median(results: dict[str, Any], method: str, key: str) -> Any:
    stats = results.get(method, {}).get("stats", {}).get(key)
    return stats["median"] if stats else None


def cell(results: dict[str, Any], method: str, row: Row) -> str:
    """median (min–max), and the median's ratio to kernel overlayfs's."""
    _, key, scale, digits = row
    stats = results.get(method, {}).get("stats", {}).get(key)
    if not stats:
        return "n/a"
    low, high = fmt(stats["min"], scale, digits), fmt(stats["max"], scale, digits)
    value = fmt(stats["median"], scale, digits)
    text = value if low == high else f"{value} ({low}–{high})"
    reference = median(results, "kernel", key)
    if method == "kernel" or key in INFO_KEYS or reference is None:
        return text
    return f"{text}, {ratio(stats['median'], reference)}"


def table(results: dict[str, Any]) -> str:
    methods = results["args"]["methods"]
    image = results["image"]
    big = f"{image['big_size'] / MIB:.1f} MiB"  # its path is in the summary: Debian's is long
    header = ["workload: median (min–max), ratio to kernel overlayfs", *(NAMES[m] for m in methods)]
    lines = [f"| {' | '.join(header)} |", "| --- |" + " ---: |" * len(methods)]
    for row in rows(big, results["args"]["random_reads"]):
        lines.append(f"| {row[0]} | {' | '.join(cell(results, m, row) for m in methods)} |")
    base = median(results, "baseline", "peak_rss_kib")
    padding = " |" * (len(methods) - 1)
    lines.append(f"| crfs-merge baseline VmHWM, 1-file image (MiB) | {fmt(base, 1024.0, 1)} |{padding}")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    args, image = results["args"], results["image"]
    lines = [f"image {args['image']}: " + image_line(image), prepare_line(results),
             f"caches dropped: {results['caches_dropped']}; crfs-merge code: {results['crfs_code']}; "
             f"{args['repeat']} round(s), the order of the methods rotating"]  # fmt: skip
    lines += tree_lines(results.get("verify", {}), args["methods"])
    lines += [f"{NAMES[m]}: ERROR {results[m]['error']}" for m in args["methods"] if "error" in results.get(m, {})]
    lines += throughput_lines(results)
    lines += tool_lines(results)
    return "\n".join(lines)


def image_line(image: dict[str, Any]) -> str:
    facts = [f"{image['layers']} layers, blobs {image['blob_bytes'] / MIB:.1f} MiB",
             f"{image.get('whiteouts')} whiteouts, {image.get('opaque_dirs')} opaque dirs",
             f"expected entries {image['expected_entries']}", f"big file {image['big_path']}",
             f"built in {image['build_seconds']:.1f} s"]  # fmt: skip
    if "files" in image:
        facts.insert(0, f"{image['files']} files")
    if "steps" in image:
        facts.append(f"debootstrap base ({'cached' if image['cached'] else 'made now'}, {image['made']}), then "
                     + ", ".join(f"{name}: {s}" for name, s in image["steps"].items()))  # fmt: skip
    return "; ".join(facts)


def prepare_line(results: dict[str, Any]) -> str:
    layers, publish_facts = results.get("overlay_layers", {}), results.get("publish", {})
    parts = [f"overlay layers extracted and converted in {fmt(layers.get('extract_seconds'), 1.0, 1)} s "
             f"({layers.get('whiteouts')} whiteouts, {layers.get('opaque')} opaque dirs)"]  # fmt: skip
    if publish_facts:
        parts.append(f"pushed to the registry in {fmt(publish_facts.get('push_seconds'), 1.0, 1)} s")
    if "convert_seconds" in publish_facts:
        parts.append(f"converted to eStargz into it in {fmt(publish_facts['convert_seconds'], 1.0, 1)} s")
    return "; ".join(parts)


def tree_lines(checks: dict[str, Any], methods: list[str]) -> list[str]:
    lines = []
    for method in methods:
        check = checks.get(method, {})
        sha = check.get("big_sha256_ok")
        lines.append(f"{NAMES[method]}: big file sha256 {'OK' if sha else 'WRONG' if sha is False else 'n/a'}"
                     + (f"; ERROR {check['error']}" if "error" in check else ""))  # fmt: skip
        tree_check = check.get("tree")
        if tree_check:
            verdict = "IDENTICAL to" if tree_check["identical"] else "DIFFERS from"
            lines.append(
                f"  tree {verdict} kernel overlayfs: {tree_check['entries']} vs {tree_check['reference_entries']} "
                f"entries; only here {tree_check['only_here_count']} {tree_check['only_here'][:5]}; only in kernel "
                f"{tree_check['only_reference_count']} {tree_check['only_reference'][:5]}; type/size differ "
                f"{tree_check['differ_count']} {tree_check['differ'][:5]}; directory sizes differ "
                f"{tree_check['dir_size_differ_count']} (not compared)"
            )
    return lines


def throughput_lines(results: dict[str, Any]) -> list[str]:
    size = results["image"]["big_size"] / MIB
    parts = []
    for method in results["args"]["methods"]:
        cold, again = median(results, method, "big_cold_seconds"), median(results, method, "big_again_seconds")
        if cold and again:
            parts.append(f"{NAMES[method]} {size / cold:.0f} / {size / again:.0f}")
    return [f"big file MiB/s (cold / again, medians): {'; '.join(parts)}"] if parts else []


def tool_lines(results: dict[str, Any]) -> list[str]:
    if "skopeo_umoci" not in results["args"]["methods"]:
        return []
    pull, unpack = median(results, "skopeo_umoci", "pull_seconds"), median(results, "skopeo_umoci", "unpack_seconds")
    pull_rss = median(results, "skopeo_umoci", "pull_rss_kib")
    unpack_rss = median(results, "skopeo_umoci", "unpack_rss_kib")
    return [f"skopeo + umoci (medians): skopeo copy {fmt(pull, 1.0, 2)} s, peak RSS {fmt(pull_rss, 1024.0, 1)} MiB; "
            f"umoci raw unpack {fmt(unpack, 1.0, 2)} s, peak RSS {fmt(unpack_rss, 1024.0, 1)} MiB"]  # fmt: skip


# ---------------------------------------------------------------- main


def methods_option(value: str) -> list[str]:
    """--methods: a comma-separated subset of METHODS, kept in METHODS's order, kernel always in."""
    chosen = {name.strip() for name in value.split(",") if name.strip()}
    unknown = chosen - set(METHODS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in chosen or m == "kernel"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", choices=IMAGES, default="synthetic")
    parser.add_argument("--files", type=int, default=None, help="synthetic: regular files over the 5 layers "
                        f"(default 100000, {QUICK_FILES} with --quick)")  # fmt: skip
    parser.add_argument("--methods", type=methods_option, default=list(METHODS), help=f"default: {','.join(METHODS)}")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the workload per method")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, a smaller image, fewer reads")
    parser.add_argument("--mount-only", action="store_true", help="time the mounts (from nothing and warm) and "
                        "their memory at ready; run no workload but a `find` that counts the entries")  # fmt: skip
    parser.add_argument("--build-cache", type=Path, default=DEFAULT_BUILD_CACHE,
                        help="where the debootstrapped base layer is kept between runs")  # fmt: skip
    common_options(parser, keep_help="keep the image, caches, registry and extracted layers")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.files is None:
        args.files = QUICK_FILES if args.quick else 100_000
    return args


def prepare(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> Setup:
    """Builds the image, extracts the overlay layers, and publishes the image to the registry."""
    print(f"building the {args.image} image in {work / 'image'} ...", file=sys.stderr)
    results["image"] = build(args, work)
    print("extracting layers for the overlays ...", file=sys.stderr)
    layers, results["overlay_layers"] = extract_layers(layer_blobs(work / "image"), work / "layers")
    setup = Setup(work, work / "image", work / "log.txt", big_path=results["image"]["big_path"], layers=layers,
                  extract_seconds=results["overlay_layers"]["extract_seconds"],
                  random_reads=QUICK_RANDOM_READS if args.quick else RANDOM_READS)  # fmt: skip
    for method in args.methods:
        setup.mountpoint(method).mkdir(parents=True, exist_ok=True)
    return setup


def measure(args: argparse.Namespace, setup: Setup, results: dict[str, Any]) -> None:
    """Verification, the baseline, then the rounds."""
    if any(m in REGISTRY_METHODS for m in args.methods):
        print(f"pushing to {setup.registry} ...", file=sys.stderr)
        results["publish"] = publish(setup, args.methods, setup.work)
    print("comparing the trees ...", file=sys.stderr)
    results["verify"], files = verify(setup, args.methods, results["image"]["big_sha256"])
    print("\n".join(tree_lines(results["verify"], args.methods)), file=sys.stderr)
    if any(m in CRFS_METHODS for m in args.methods):
        print("crfs-merge baseline (1-file image) ...", file=sys.stderr)
        results["baseline"] = baseline(setup, args.repeat)
    shares = write_shares(files, setup.work / "lists")
    samples = rounds(setup, args.methods, shares, args.seed, args.repeat, args.mount_only)
    per_entry(samples, median(results, "baseline", "peak_rss_kib"), median(results, "baseline", "rss_ready_kib"))
    results.update(collect(samples))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "args": {
            "image": args.image,
            "files": args.files,
            "methods": args.methods,
            "repeat": args.repeat,
            "quick": args.quick,
            "mount_only": args.mount_only,
            "seed": args.seed,
            "random_reads": QUICK_RANDOM_READS if args.quick else RANDOM_READS,
        },
        "workdir": str(work),
        "caches_dropped": drop_caches(),
        "crfs_code": crfs_code(),
        "bytecode": keep_bytecode(work),
    }
    registry: Registry | None = None
    try:
        setup = prepare(args, work, results)
        if any(m in REGISTRY_METHODS for m in args.methods):
            (work / "registry").mkdir(exist_ok=True)
            registry = Registry(work / "registry")
            setup.registry = registry.host
        measure(args, setup, results)
    finally:
        for method in METHODS:
            if method != "skopeo_umoci":
                unmount_any(method, work / MOUNTPOINTS[method], None)
        if registry is not None:
            registry.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("image", "big-src", "tiny", "pycache", "layers", "caches", "lists", "registry", "umoci", "debian-rootfs",
               "debootstrap", *MOUNTPOINTS.values())  # fmt: skip
    return run_benchmark(args, "crfs-bench-overlay-", scratch, run, (table, summary), args.methods)


if __name__ == "__main__":
    sys.exit(main())
