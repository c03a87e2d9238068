"""Benchmark crfs-merge against kernel overlayfs and fuse-overlayfs on the same synthetic image.

Builds bench_local.py's deterministic image (--files regular files over 5 gzip layers, with
file and directory whiteouts, opaque directories, symlinks and hardlinks) plus a sixth,
uncompressed layer holding one 200 MiB file (bench_lazy.py's `data/big.bin`), then serves it:

- crfs-merge: `python3 -m unionfs.cli --cache-dir C oci:LAYOUT:bench MNT`, with this checkout
  first on PYTHONPATH; mounted once to index (cold cache) before anything is measured, so every
  measured mount starts with cached indexes and decompressed layers;
- kernel overlayfs (the reference): each layer extracted with `tar -xf` into its own directory,
  OCI whiteouts converted to overlay ones (`.wh.NAME` -> character device 0/0 NAME,
  `DIR/.wh..wh..opq` -> xattr trusted.overlay.opaque=y on DIR, markers removed), then
  `mount -t overlay overlay -o lowerdir=L6:...:L1 MNT` (topmost layer first);
- fuse-overlayfs: `fuse-overlayfs -o lowerdir=L6:...:L1 MNT` over the same directories.

First all three trees are compared (os.walk + lstat: path, type, size of every entry; directory
sizes are filesystem-specific and only counted) and the big file's sha256 checked. Then, --repeat
rounds (the order of the three rotating each round), each a fresh mount running in order:

1. `find MNT | wc -l` cold, then warm (immediately again);
2. os.walk + os.lstat of every entry in a Python subprocess (its own timing), cold, then warm;
3. `tar -cf - -C MNT . | wc -c`, cold (reads every byte);
4. the big file read sequentially in 1 MiB pieces, cold, then again;
5. 2000 `pread`s of 4 KiB at seeded random offsets of the big file, warm (read whole just before);
6. 8 reader processes, each reading a disjoint eighth (round-robin over sorted paths) of the
   regular files except the big one, cold; wall time until the last finishes;
7. the servers' peak RSS (VmHWM) at ready and after the workload, and the mount-ready time.
   crfs-merge's RSS per merged entry is its VmHWM less a baseline: the VmHWM of a crfs-merge
   server that mounted a 1-file image and ran find, lstat and tar on it (also --repeat times).

"Cold" means after `sync; echo 3 > /proc/sys/vm/drop_caches` (needs root, as do the overlay
mount and the trusted.* xattrs). A FUSE server keeps what it holds in its own memory across a
drop, so within one mount only the kernel side is cold. Prints a markdown table of median
(min-max) per workload and each median's ratio to kernel overlayfs, then a summary; --json PATH
writes all samples.

    python3 benchmarks/bench_overlay.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import stat
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_lazy import BIG_PATH, CRFS, build_big, read_file  # noqa: E402
from benchmarks.bench_local import build_image  # noqa: E402
from benchmarks.bench_registry import crfs_code, crfs_env  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    KIB,
    MIB,
    common_options,
    drop_caches,
    fmt,
    measure_server,
    ratio,
    run_benchmark,
    run_measured,
    tail,
    tar_info,
    timed_find,
    timed_shell,
    unmount,
    vm_hwm_kib,
)
from registry.layout import REF_NAME  # noqa: E402
from registry.layout_writer import write_layout, write_manifest  # noqa: E402
from registry.manifest import Platform  # noqa: E402
from registry.media_types import Compression  # noqa: E402

LAYERS = 5
BIG_SIZE = 200 * MIB
TAG = "bench"
RANDOM_READS = 2000
RANDOM_READ_SIZE = 4 * KIB
READERS = 8
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
UNMOUNT_WAIT_SECONDS = 60.0
SYSTEMS = ("crfs", "fuse_overlayfs", "kernel")
NAMES = {"crfs": "crfs-merge", "fuse_overlayfs": "fuse-overlayfs", "kernel": "kernel overlayfs"}
MOUNTPOINTS = {"crfs": "mnt", "fuse_overlayfs": "mnt-fuse-overlayfs", "kernel": "mnt-overlay"}

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
ROWS: list[Row] = [
    ("mount ready (s)", "mount_seconds", 1.0, 3),
    ("`find \\| wc -l`, cold (s)", "find_cold_seconds", 1.0, 3),
    ("`find \\| wc -l`, warm (s)", "find_warm_seconds", 1.0, 3),
    ("lstat every entry, cold (s)", "lstat_cold_seconds", 1.0, 3),
    ("lstat every entry, warm (s)", "lstat_warm_seconds", 1.0, 3),
    ("`tar -cf - \\| wc -c`, cold (s)", "tar_seconds", 1.0, 3),
    ("big file (200 MiB) sequential read, cold (s)", "big_cold_seconds", 1.0, 3),
    ("big file sequential read, again (s)", "big_again_seconds", 1.0, 3),
    (f"{RANDOM_READS} random 4 KiB reads of the big file, warm (s)", "random_seconds", 1.0, 4),
    (f"{READERS} parallel readers, all regular files but the big one, cold (wall s)", "parallel_seconds", 1.0, 3),
    ("server VmHWM at ready (MiB)", "rss_ready_kib", 1024.0, 1),
    ("server peak RSS, VmHWM after the workload (MiB)", "peak_rss_kib", 1024.0, 1),
    ("entries (`find \\| wc -l`)", "find_entries", 1.0, 0),
    ("bytes from `tar -cf - \\| wc -c` (MiB)", "tar_bytes", float(MIB), 3),
    (f"bytes read by the {READERS} readers (MiB)", "parallel_bytes", float(MIB), 3),
]
INFO_KEYS = {"find_entries", "tar_bytes", "parallel_bytes"}  # shown without ratios


@dataclass(frozen=True)
class Setup:
    """Where everything of one run lives."""

    work: Path
    layout: Path
    layers: list[Path]
    cache: Path
    log: Path

    def mountpoint(self, system: str) -> Path:
        return self.work / MOUNTPOINTS[system]

    def lowerdir(self) -> str:
        return ":".join(str(d) for d in reversed(self.layers))


# ---------------------------------------------------------------- image


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def tagged_image(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and config (parsed) of the image tagged `tag` in `layout`."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    manifest = json.loads(blob_path(layout, descriptor["digest"]).read_bytes())
    return manifest, json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())


def stack_images(layout: Path, top: Path) -> list[Path]:
    """Tags TAG in `layout`: the layers of its `latest` image under those of the `latest` image
    of layout `top` (whose blobs are hard-linked in); returns the layer blobs, bottom first."""
    base, base_config = tagged_image(layout, "latest")
    extra, extra_config = tagged_image(top, "latest")
    for layer in extra["layers"]:
        target = blob_path(layout, layer["digest"])
        if not target.exists():
            os.link(blob_path(top, layer["digest"]), target)
    diff_ids = base_config["rootfs"]["diff_ids"] + extra_config["rootfs"]["diff_ids"]
    config = {**base_config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    layers = base["layers"] + extra["layers"]
    write_manifest(layout, layers, json.dumps(config, sort_keys=True).encode(), TAG, Platform.host())
    return [blob_path(layout, layer["digest"]) for layer in layers]


def build(work: Path, files: int, seed: int) -> tuple[list[Path], dict[str, Any]]:
    """Writes the image (tag TAG) at WORK/image; returns its layer blobs and facts about it."""
    facts = build_image(work / "image", files, LAYERS, seed)
    started = time.perf_counter()
    facts["big_sha256"] = build_big(work / "big-src", BIG_SIZE, seed)
    blobs = stack_images(work / "image", work / "big-src")
    facts["big_build_seconds"] = time.perf_counter() - started
    facts["expected_entries"] += 2  # data/ and data/big.bin
    facts["layers"] = len(blobs)
    return blobs, facts


def build_tiny(layout: Path) -> None:
    """An OCI layout (tag TAG) holding one 1 KiB file, for the crfs-merge RSS baseline."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tar_info("only.txt", tarfile.REGTYPE, 0o644, KIB), io.BytesIO(b"x" * KIB))
    write_layout(layout, [buffer.getvalue()], Compression.GZIP, tag=TAG)


# ---------------------------------------------------------------- overlay layers


def extract_layers(blobs: list[Path], root: Path) -> tuple[list[Path], dict[str, Any]]:
    """Extracts each blob with tar into ROOT/N and converts its whiteouts; returns the directories."""
    started = time.perf_counter()
    dirs: list[Path] = []
    counts = {"whiteouts": 0, "opaque": 0}
    for number, blob in enumerate(blobs, start=1):
        target = root / f"L{number}"
        target.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(blob), "-C", str(target)], check=True)
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


def mount_argv(system: str, setup: Setup) -> list[str]:
    mnt = str(setup.mountpoint(system))
    if system == "crfs":
        return [*CRFS, "--cache-dir", str(setup.cache), f"oci:{setup.layout}:{TAG}", mnt]
    if system == "fuse_overlayfs":
        return ["fuse-overlayfs", "-o", f"lowerdir={setup.lowerdir()}", mnt]
    return ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={setup.lowerdir()}", mnt]


def mount(system: str, setup: Setup) -> dict[str, Any]:
    """Drops caches and mounts; returns the time until the command returned (and an error)."""
    drop_caches()
    env = crfs_env() if system == "crfs" else None
    seconds, rc, _ = run_measured(mount_argv(system, setup), setup.log, env)
    result: dict[str, Any] = {"mount_seconds": seconds}
    if rc != 0 or not os.path.ismount(setup.mountpoint(system)):
        result["error"] = f"mounting {NAMES[system]} exited {rc}; log: {tail(setup.log)}"
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


def unmount_overlay(system: str, mountpoint: Path, pid: int | None) -> None:
    """Unmounts a kernel overlay or fuse-overlayfs mount and waits for its process (if any) to exit."""
    kernel = system == "kernel" and os.path.ismount(mountpoint)
    if kernel and subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    unmount(mountpoint)  # fusermount3 for fuse-overlayfs; nothing if already unmounted
    deadline = time.monotonic() + UNMOUNT_WAIT_SECONDS
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def on_mount(system: str, setup: Setup, steps: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Mounts `system`, runs `steps(mountpoint)` with its server's VmHWM before and after, unmounts."""
    mnt = setup.mountpoint(system)
    result = mount(system, setup)
    if "error" in result:
        unmount_overlay(system, mnt, None)
        return result
    if system == "crfs":
        result.update(measure_server(mnt, lambda: steps(mnt)))
        return result
    pid = fuse_overlayfs_pid(mnt) if system == "fuse_overlayfs" else None
    result["rss_ready_kib"] = vm_hwm_kib(pid)
    try:
        result.update(steps(mnt))
        result["peak_rss_kib"] = vm_hwm_kib(pid)
    finally:
        unmount_overlay(system, mnt, pid)
    return result


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


def verify(setup: Setup, big_sha256: str) -> tuple[dict[str, Any], list[str]]:
    """Compares each tree and big-file digest to the kernel overlay's; returns the comparison and
    the regular files (relative, sorted) that the parallel readers share out."""
    trees: dict[str, dict[str, tuple[str, int]]] = {}
    checks: dict[str, Any] = {}
    for system in SYSTEMS:

        def steps(mnt: Path, system: str = system) -> dict[str, Any]:
            trees[system] = tree(mnt)
            return {"big_sha256_ok": read_file(mnt / BIG_PATH)[2] == big_sha256}

        checks[system] = on_mount(system, setup, steps)
    reference = trees.get("kernel", {})
    for system in ("crfs", "fuse_overlayfs"):
        if system in trees and reference:
            checks[system]["tree"] = compare_trees(trees[system], reference)
    files = sorted(p for p, (kind, _) in reference.items() if kind == "-" and p != BIG_PATH)
    return checks, files


# ---------------------------------------------------------------- workloads


def lstat_walk(root: Path) -> tuple[float | None, int | None]:
    """os.walk + os.lstat of every entry in a Python subprocess; returns its own (seconds, entries)."""
    _, rc, out = timed_shell(f"{shlex.quote(sys.executable)} -c {shlex.quote(LSTAT_WALK)} {shlex.quote(str(root))}")
    count, _, seconds = out.partition(" ")
    return (float(seconds), int(count)) if rc == 0 and count.isdigit() else (None, None)


def random_reads(path: Path, seed: int) -> float:
    """Reads `path` whole, then times RANDOM_READS preads of RANDOM_READ_SIZE at seeded offsets."""
    size = read_file(path, digest=False)[1]
    rng = random.Random(f"random-reads-{seed}")
    offsets = [rng.randrange(size - RANDOM_READ_SIZE) for _ in range(RANDOM_READS)]
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


def workload(root: Path, shares: list[Path], seed: int) -> dict[str, Any]:
    """Workloads 1-6 on `root`, in order."""
    q = shlex.quote(str(root))
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
    r["big_cold_seconds"], r["big_bytes"], _ = read_file(root / BIG_PATH, digest=False)
    r["big_again_seconds"], _, _ = read_file(root / BIG_PATH, digest=False)
    r["random_seconds"] = random_reads(root / BIG_PATH, seed)
    r["parallel_seconds"], r["parallel_bytes"] = parallel_read(root, shares)
    return r


def tiny_workload(root: Path) -> dict[str, Any]:
    """What the baseline server serves: find, lstat walk and tar of its one file."""
    q = shlex.quote(str(root))
    _, entries = timed_find(root)
    lstat_walk(root)
    timed_shell(f"tar -cf - -C {q} . | wc -c")
    return {"find_entries": entries}


# ---------------------------------------------------------------- statistics


def spread(values: list[Any]) -> dict[str, float] | None:
    """Median, min and max of the numbers among `values`; None if there are none."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The spread of every key over `rounds`."""
    keys = {key for r in rounds for key in r if key != "error"}
    return {key: spread([r.get(key) for r in rounds]) for key in sorted(keys)}


def rounds(setup: Setup, shares: list[Path], seed: int, repeat: int) -> dict[str, Any]:
    """`repeat` rounds of the workload on each system, the order rotating; returns samples and spreads."""
    samples: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    for attempt in range(repeat):
        for system in SYSTEMS[attempt % 3 :] + SYSTEMS[: attempt % 3]:
            print(f"round {attempt + 1}/{repeat}: {NAMES[system]} ...", file=sys.stderr)
            samples[system].append(on_mount(system, setup, lambda mnt: workload(mnt, shares, seed)))
    results: dict[str, Any] = {}
    for system, runs in samples.items():
        results[system] = {"rounds": runs, "stats": summarize(runs)}
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            results[system]["error"] = errors[0]
    return results


def baseline(setup: Setup, repeat: int) -> dict[str, Any]:
    """The VmHWM of a crfs-merge server for a 1-file image (mounted once to index first)."""
    tiny = Setup(setup.work, setup.work / "tiny", [], setup.cache, setup.log)
    build_tiny(tiny.layout)
    on_mount("crfs", tiny, tiny_workload)
    runs = [on_mount("crfs", tiny, tiny_workload) for _ in range(repeat)]
    return {"rounds": runs, "stats": summarize(runs)}


# ---------------------------------------------------------------- report


def median(results: dict[str, Any], system: str, key: str) -> Any:
    stats = results.get(system, {}).get("stats", {}).get(key)
    return stats["median"] if stats else None


def cell(stats: dict[str, float] | None, scale: float, digits: int) -> str:
    if not stats:
        return "n/a"
    low, high = fmt(stats["min"], scale, digits), fmt(stats["max"], scale, digits)
    value = fmt(stats["median"], scale, digits)
    return value if low == high else f"{value} ({low}–{high})"


def table(results: dict[str, Any]) -> str:
    header = ["workload", *(NAMES[s] for s in SYSTEMS), "crfs/kernel", "fuse-overlayfs/kernel"]
    lines = [f"| {' | '.join(header)} |", "| --- |" + " ---: |" * (len(header) - 1)]
    for label, key, scale, digits in ROWS:
        cells = [cell(results.get(s, {}).get("stats", {}).get(key), scale, digits) for s in SYSTEMS]
        ratios = ["", ""]
        if key not in INFO_KEYS:
            reference = median(results, "kernel", key)
            ratios = [ratio(median(results, s, key), reference) for s in ("crfs", "fuse_overlayfs")]
        lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    lines += crfs_rows(results)
    return "\n".join(lines)


def crfs_rows(results: dict[str, Any]) -> list[str]:
    """crfs-merge-only lines: the baseline VmHWM and RSS per merged entry beyond it."""
    base = median(results, "baseline", "peak_rss_kib")
    peak, ready = median(results, "crfs", "peak_rss_kib"), median(results, "crfs", "rss_ready_kib")
    entries = median(results, "crfs", "find_entries")
    lines = [f"| crfs-merge baseline VmHWM, 1-file image (MiB) | {fmt(base, 1024.0, 1)} | | | | |"]
    for label, value in (("peak", peak), ("at ready", ready)):
        per_entry = (value - base) * KIB / entries if None not in (value, base, entries) and entries else None
        lines.append(f"| crfs-merge RSS per merged entry beyond baseline, {label} (bytes) | {fmt(per_entry, 1.0, 0)} "
                     "| | | | |")  # fmt: skip
    return lines


def summary(results: dict[str, Any]) -> str:
    image, layers = results["image"], results["overlay_layers"]
    lines = [
        f"image: {results['args']['files']} files in {LAYERS} gzip layers + 1 uncompressed layer of a "
        f"{BIG_SIZE / MIB:.0f} MiB file; {image['dirs']} dirs, {image['whiteouts']} whiteouts, "
        f"{image['opaque_dirs']} opaque dirs, {image['symlinks']} symlinks, {image['hardlinks']} hardlinks; tar "
        f"{image['tar_bytes'] / MIB:.1f} MiB; expected entries {image['expected_entries']}",
        f"overlay layers: extracted and converted in {layers['extract_seconds']:.1f} s "
        f"({layers['whiteouts']} whiteouts, {layers['opaque']} opaque dirs); crfs-merge first (indexing) mount "
        f"{fmt(results['crfs_index_mount'].get('mount_seconds'), 1.0, 2)} s",
        f"caches dropped: {results['caches_dropped']}; crfs-merge code: {results['crfs_code']}; "
        f"{results['args']['repeat']} rounds, the order of the three rotating",
    ]
    lines += tree_lines(results["verify"])
    lines += [f"{NAMES[s]}: ERROR {results[s]['error']}" for s in SYSTEMS if "error" in results.get(s, {})]
    lines += throughput_lines(results)
    return "\n".join(lines)


def tree_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for system in SYSTEMS:
        check = checks.get(system, {})
        sha = check.get("big_sha256_ok")
        lines.append(f"{NAMES[system]}: big file sha256 {'OK' if sha else 'WRONG' if sha is False else 'n/a'}"
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
    parts = []
    for system in SYSTEMS:
        cold, again = median(results, system, "big_cold_seconds"), median(results, system, "big_again_seconds")
        if cold and again:
            parts.append(f"{NAMES[system]} {BIG_SIZE / MIB / cold:.0f} / {BIG_SIZE / MIB / again:.0f}")
    return [f"big file MiB/s (cold / again, medians): {'; '.join(parts)}"] if parts else []


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="regular files over the 5 layers")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the workload per system")
    common_options(parser, keep_help="keep the image, cache and extracted layers")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> Setup:
    """Builds the image, extracts the overlay layers and indexes the image with a first crfs-merge mount."""
    print(f"building image in {work / 'image'} ...", file=sys.stderr)
    blobs, results["image"] = build(work, args.files, args.seed)
    print("extracting layers for overlayfs ...", file=sys.stderr)
    layers, results["overlay_layers"] = extract_layers(blobs, work / "layers")
    setup = Setup(work, work / "image", layers, work / "cache", work / "log.txt")
    for system in SYSTEMS:
        setup.mountpoint(system).mkdir(parents=True, exist_ok=True)
    print("crfs-merge indexing mount ...", file=sys.stderr)
    results["crfs_index_mount"] = on_mount("crfs", setup, lambda _: {})
    return setup


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "args": {"files": args.files, "repeat": args.repeat, "seed": args.seed},
        "workdir": str(work),
        "caches_dropped": drop_caches(),
        "crfs_code": crfs_code(),
    }
    setup = Setup(work, work / "image", [], work / "cache", work / "log.txt")
    try:
        setup = prepare(args, work, results)
        print("comparing the trees ...", file=sys.stderr)
        results["verify"], files = verify(setup, results["image"]["big_sha256"])
        print("\n".join(tree_lines(results["verify"])), file=sys.stderr)
        shares = write_shares(files, work / "lists")
        results.update(rounds(setup, shares, args.seed, args.repeat))
        print("crfs-merge baseline (1-file image) ...", file=sys.stderr)
        results["baseline"] = baseline(setup, args.repeat)
    finally:
        for system in SYSTEMS:
            unmount_overlay(system, setup.mountpoint(system), None)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("image", "big-src", "tiny", "layers", "cache", "lists", *MOUNTPOINTS.values())
    return run_benchmark(args, "crfs-bench-overlay-", scratch, run, (table, summary), SYSTEMS)


if __name__ == "__main__":
    sys.exit(main())
