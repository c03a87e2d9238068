"""Benchmark crfs-merge against `umoci raw unpack` on a synthetic local OCI image.

Builds a deterministic image of --files regular files over --layers gzip layers (with
overwrites, file and directory whiteouts, opaque directories, symlinks and hardlinks),
then measures, in one run:

- crfs-merge cold mount (fresh cache dir) and warm mount (same cache dir again): the time
  until `crfs-merge IMAGE DIR` returns, the server's peak RSS (VmHWM), and on the mount
  `find | wc -l`, a Python read of every regular file, `tar -cf - | wc -c` and `tar -cf /dev/null`;
- umoci: the time and peak RSS (VmHWM sampled every 10 ms) of `umoci raw unpack --rootless`,
  then the same workload on the rootfs it wrote.

Kernel caches are dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) before
every mount, unpack and workload step. Prints a markdown table; --json PATH writes it as JSON.

    python3 benchmarks/bench_local.py --files 100000

Note: GNU tar does not read file contents when the archive is /dev/null, so the
`tar -cf /dev/null` row measures a metadata walk; `tar -cf - | wc -c` reads everything.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shlex
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root
# first, for `benchmarks.measure` and for this checkout's packages ahead of any installed copy.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.measure import (  # noqa: E402
    KIB,
    MIB,
    Row,
    ancestors,
    common_options,
    drop_caches,
    markdown_table,
    measure_server,
    run_benchmark,
    run_measured,
    tail,
    tar_info,
    text_pool,
    timed_find,
    timed_shell,
)
from registry.layout_writer import write_layout  # noqa: E402
from registry.media_types import Compression  # noqa: E402

POOL_BYTES = 4 * MIB

READER = r"""
import os, sys
buf = bytearray(1 << 20)
files = total = 0
stack = [sys.argv[1]]
while stack:
    with os.scandir(stack.pop()) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file(follow_symlinks=False):
                with open(e.path, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
                files += 1
print(files, total)
"""


# ---------------------------------------------------------------- image


@dataclass
class LayerPlan:
    """What one layer holds; paths are relative, without a leading slash."""

    dirs: set[str] = field(default_factory=set)
    opaque: list[str] = field(default_factory=list)
    whiteouts: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # path -> size (new files and overwrites)
    symlinks: dict[str, str] = field(default_factory=dict)
    hardlinks: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)  # dirs whited out here: nothing may be added under them


class ImagePlanner:
    """Plans the layers and tracks the merged view, so the expected entry count is known."""

    def __init__(self, files: int, layers: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.files = files
        self.layers = layers
        self.dirs = self._make_dirs(min(400, max(8, files // 300)))
        self.leaves = {d for d in self.dirs if not any(o.startswith(d + "/") for o in self.dirs)}
        self.live: dict[str, str] = {}  # path -> 'd', 'f', 'h' (hardlink) or 'l' (symlink)
        self.serial = 0

    def _make_dirs(self, count: int) -> list[str]:
        dirs: list[str] = []
        for i in range(count):
            parent = self.rng.choice(dirs) if dirs and self.rng.random() > 0.1 else ""
            if parent.count("/") >= 4:
                parent = ""
            dirs.append(f"{parent}/d{i:03d}" if parent else f"d{i:03d}")
        return dirs

    def _name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:06d}"

    def _size(self) -> int:
        r = self.rng.random()
        if r < 0.001:
            return self.rng.randint(64 * KIB, MIB)
        if r < 0.03:
            return self.rng.randint(8 * KIB, 32 * KIB)
        return int(8 * KIB * self.rng.random() ** 3)

    def new_file_counts(self) -> list[int]:
        if self.layers == 1:
            return [self.files]
        base = self.files // 2
        rest = [(self.files - base) // (self.layers - 1)] * (self.layers - 1)
        rest[-1] += self.files - base - sum(rest)
        return [base, *rest]

    def plan(self, index: int, new_files: int) -> LayerPlan:
        plan = LayerPlan()
        if index > 0:
            self._hide_dirs(plan, index)
            self._whiteout_files(plan, max(1, self.files // 200))
            self._overwrite_files(plan, max(1, self.files // 100))
        self._add_files(plan, new_files)
        self._add_symlinks(plan, max(1, new_files // 100))
        self._add_hardlinks(plan, max(1, new_files // 200))
        for path in [*plan.files, *plan.symlinks, *plan.hardlinks, *plan.whiteouts, *plan.opaque]:
            plan.dirs.update(ancestors(path))
        plan.dirs.update(plan.opaque)
        # Sorted: a set's order follows PYTHONHASHSEED, and `live`'s order feeds later random
        # choices, so without it two runs with one --seed would build different images.
        self.live.update(dict.fromkeys(sorted(plan.dirs), "d"))
        return plan

    def _remove(self, path: str, keep_self: bool = False) -> None:
        prefix = path + "/"
        for p in [p for p in self.live if p.startswith(prefix) or (p == path and not keep_self)]:
            del self.live[p]

    def _hide_dirs(self, plan: LayerPlan, index: int) -> None:
        # leaf directories only, so that one whiteout or opaque marker hides a few hundred files, not half the image
        deep = [p for p, kind in self.live.items() if kind == "d" and p.count("/") >= 1 and p in self.leaves]
        if not deep:
            return
        if index in {min(2, self.layers - 1), self.layers - 1}:
            opaque = self.rng.choice(deep)
            plan.opaque.append(opaque)
            self._remove(opaque, keep_self=True)
            for _ in range(3):
                path = f"{opaque}/{self._name('o')}"
                plan.files[path] = self._size()
                self.live[path] = "f"
        candidates = [
            d for d in deep if d in self.live and not any(o.startswith(d + "/") or o == d for o in plan.opaque)
        ]
        if candidates:
            victim = self.rng.choice(candidates)
            plan.whiteouts.append(victim)
            plan.blocked.append(victim)
            self._remove(victim)

    def _lower_files(self) -> list[str]:
        return [p for p, kind in self.live.items() if kind in "fh"]

    def _whiteout_files(self, plan: LayerPlan, count: int) -> None:
        lower = self._lower_files()
        for path in self.rng.sample(lower, min(count, len(lower))):
            plan.whiteouts.append(path)
            del self.live[path]

    def _overwrite_files(self, plan: LayerPlan, count: int) -> None:
        lower = self._lower_files()
        for path in self.rng.sample(lower, min(count, len(lower))):
            plan.files[path] = self._size()
            self.live[path] = "f"

    def _pick_dir(self, plan: LayerPlan) -> str:
        while True:
            d = self.rng.choice(self.dirs)
            if not any(d == b or d.startswith(b + "/") for b in plan.blocked):
                return d

    def _add_files(self, plan: LayerPlan, count: int) -> None:
        for _ in range(count):
            path = f"{self._pick_dir(plan)}/{self._name('f')}"
            plan.files[path] = self._size()
            self.live[path] = "f"

    def _add_symlinks(self, plan: LayerPlan, count: int) -> None:
        targets = [p for p, kind in self.live.items() if kind in "fd"]
        for _ in range(count):
            path = f"{self._pick_dir(plan)}/{self._name('s')}"
            r = self.rng.random()
            target = self.rng.choice(targets)
            if r < 0.7:
                link = os.path.relpath(target, os.path.dirname(path))
            elif r < 0.95:
                link = "/" + target
            else:
                link = "../no/such/file"
            plan.symlinks[path] = link
            self.live[path] = "l"

    def _add_hardlinks(self, plan: LayerPlan, count: int) -> None:
        own = [p for p in plan.files if self.live.get(p) == "f"]
        for _ in range(min(count, len(own))):
            path = f"{self._pick_dir(plan)}/{self._name('h')}"
            plan.hardlinks[path] = self.rng.choice(own)
            self.live[path] = "h"

    def expected_entries(self) -> int:
        """What `find ROOT | wc -l` should print on the merged tree (the root included)."""
        return 1 + len(self.live)


def _content(path: str, index: int, size: int, pool: bytes, rng: random.Random) -> bytes:
    head = f"{path} layer {index}\n".encode()
    offset = rng.randrange(len(pool) - size)
    return (head + pool[offset : offset + size])[:size]


def write_layer_tar(plan: LayerPlan, index: int, pool: bytes, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(plan.dirs):
            tar.addfile(tar_info(d, tarfile.DIRTYPE, 0o755))
        for d in plan.opaque:
            tar.addfile(tar_info(f"{d}/.wh..wh..opq", tarfile.REGTYPE, 0o644))
        for p in plan.whiteouts:
            parent, _, name = p.rpartition("/")
            tar.addfile(tar_info(f"{parent}/.wh.{name}" if parent else f".wh.{name}", tarfile.REGTYPE, 0o644))
        for p, size in plan.files.items():
            tar.addfile(tar_info(p, tarfile.REGTYPE, 0o644, size), io.BytesIO(_content(p, index, size, pool, rng)))
        for p, link in plan.symlinks.items():
            tar.addfile(tar_info(p, tarfile.SYMTYPE, 0o777, link=link))
        for p, target in plan.hardlinks.items():
            tar.addfile(tar_info(p, tarfile.LNKTYPE, 0o644, link=target))
    return buffer.getvalue()


def build_image(root: Path, files: int, layers: int, seed: int) -> dict[str, Any]:
    """Writes the OCI layout at `root`; returns facts about it."""
    started = time.perf_counter()
    planner = ImagePlanner(files, layers, seed)
    pool = text_pool(planner.rng, POOL_BYTES + MIB)  # compresses about 3x
    tars: list[bytes] = []
    stats = {"whiteouts": 0, "opaque_dirs": 0, "file_entries": 0, "symlinks": 0, "hardlinks": 0}
    for index, count in enumerate(planner.new_file_counts()):
        plan = planner.plan(index, count)
        tars.append(write_layer_tar(plan, index, pool, planner.rng))
        stats["whiteouts"] += len(plan.whiteouts)
        stats["opaque_dirs"] += len(plan.opaque)
        stats["file_entries"] += len(plan.files)
        stats["symlinks"] += len(plan.symlinks)
        stats["hardlinks"] += len(plan.hardlinks)
    write_layout(root, tars, Compression.GZIP)
    blobs = sum(p.stat().st_size for p in (root / "blobs" / "sha256").iterdir())
    return {
        **stats,
        "layers": layers,
        "dirs": len(planner.dirs),
        "tar_bytes": sum(len(t) for t in tars),
        "blob_bytes": blobs,
        "expected_entries": planner.expected_entries(),
        "build_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- measuring


def workload(root: Path) -> dict[str, Any]:
    """find | wc -l, read-all, tar | wc -c and tar to /dev/null on `root`, caches dropped before each."""
    q = shlex.quote(str(root))
    result: dict[str, Any] = {}
    result["find_seconds"], result["find_entries"] = timed_find(root)
    drop_caches()
    result["read_seconds"], rc, out = timed_shell(f"{shlex.quote(sys.executable)} -c {shlex.quote(READER)} {q}")
    files, _, size = out.partition(" ")
    result["read_files"], result["read_bytes"] = (int(files), int(size)) if rc == 0 else (None, None)
    drop_caches()
    result["tar_pipe_seconds"], result["tar_pipe_rc"], out = timed_shell(f"tar -cf - -C {q} . | wc -c")
    result["tar_pipe_bytes"] = int(out) if out.isdigit() else None
    drop_caches()
    result["tar_null_seconds"], result["tar_null_rc"], _ = timed_shell(f"tar -cf /dev/null -C {q} .")
    return result


def listing(root: Path) -> dict[str, str]:
    """Every path under `root` with its type, size (files) or target (symlinks)."""
    found: dict[str, str] = {}
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                rel = os.path.relpath(e.path, root)
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                    found[rel] = "d"
                elif e.is_symlink():
                    found[rel] = "l " + os.readlink(e.path)
                else:
                    found[rel] = f"f {e.stat(follow_symlinks=False).st_size}"
    return found


# ---------------------------------------------------------------- phases


def crfs_phase(image: Path, cache: Path, mountpoint: Path, log: Path, extra: Callable[[], None]) -> dict[str, Any]:
    """Mounts, measures, runs `extra` (untimed), unmounts."""
    drop_caches()
    argv = ["crfs-merge", "--cache-dir", str(cache), f"oci:{image}", str(mountpoint)]
    seconds, rc, _ = run_measured(argv, log)
    result: dict[str, Any] = {"mount_seconds": seconds, "mount_rc": rc}
    if rc != 0 or not os.path.ismount(mountpoint):
        result["error"] = f"crfs-merge exited {rc}; log: {tail(log)}"
        return result
    result.update(measure_server(mountpoint, lambda: workload(mountpoint), extra))
    return result


def umoci_phase(image: Path, out: Path, log: Path) -> dict[str, Any]:
    """Times `umoci raw unpack --rootless` of `image` with its peak RSS, then runs the workload on its rootfs."""
    drop_caches()
    out.mkdir(parents=True, exist_ok=True)
    argv = ["umoci", "raw", "unpack", "--rootless", "--image", f"{image}:latest", str(out / "rootfs")]
    seconds, rc, peak = run_measured(argv, log)
    result: dict[str, Any] = {"mount_seconds": seconds, "mount_rc": rc, "peak_rss_kib": peak}
    if rc != 0:
        result["error"] = f"umoci exited {rc}; log: {tail(log)}"
        return result
    result.update(workload(out / "rootfs"))
    return result


def compare(crfs: dict[str, str], umoci: dict[str, str]) -> dict[str, Any]:
    only_crfs = sorted(crfs.keys() - umoci.keys())
    only_umoci = sorted(umoci.keys() - crfs.keys())
    differ = sorted(p for p in crfs.keys() & umoci.keys() if crfs[p] != umoci[p])
    return {
        "crfs_entries": len(crfs),
        "umoci_entries": len(umoci),
        "only_crfs": only_crfs[:20],
        "only_crfs_count": len(only_crfs),
        "only_umoci": only_umoci[:20],
        "only_umoci_count": len(only_umoci),
        "differ": [(p, crfs[p], umoci[p]) for p in differ[:20]],
        "differ_count": len(differ),
    }


# ---------------------------------------------------------------- report


PHASES = ("crfs_cold", "crfs_warm", "umoci")
ROWS: list[Row] = [
    ("mount / unpack time (s)", "mount_seconds", 1.0, True),
    ("peak RSS (MiB)", "peak_rss_kib", 1024.0, True),
    ("`find \\| wc -l` time (s)", "find_seconds", 1.0, True),
    ("read-all, python (s)", "read_seconds", 1.0, True),
    ("`tar -cf - \\| wc -c` (s)", "tar_pipe_seconds", 1.0, True),
    ("`tar -cf /dev/null` (s)", "tar_null_seconds", 1.0, True),
    ("entries (`find \\| wc -l`)", "find_entries", 1.0, False),
    ("regular files read", "read_files", 1.0, False),
    ("bytes read (MiB)", "read_bytes", float(MIB), False),
]


def table(results: dict[str, Any]) -> str:
    columns = ["crfs-merge cold", "crfs-merge warm", "umoci unpack", "cold/umoci", "warm/umoci"]
    return markdown_table(columns, ROWS, [results[name] for name in PHASES])


def summary(results: dict[str, Any]) -> str:
    image, check = results["image"], results.get("listing_compare", {})
    lines = [
        f"image: {results['args']['files']} files, {image['layers']} gzip layers, {image['dirs']} dirs, "
        f"{image['file_entries']} file entries, {image['whiteouts']} whiteouts, {image['opaque_dirs']} opaque dirs, "
        f"{image['symlinks']} symlinks, {image['hardlinks']} hardlinks; tar {image['tar_bytes'] / MIB:.1f} MiB, "
        f"blobs {image['blob_bytes'] / MIB:.1f} MiB, built in {image['build_seconds']:.1f} s",
        f"expected `find | wc -l` entries: {image['expected_entries']}; caches dropped: {results['caches_dropped']}",
    ]
    for name in PHASES:
        phase = results[name]
        if "error" in phase:
            lines.append(f"{name}: ERROR {phase['error']}")
        if phase.get("tar_pipe_rc") or phase.get("tar_null_rc"):
            lines.append(f"{name}: tar exit status {phase.get('tar_pipe_rc')} / {phase.get('tar_null_rc')}")
    if check:
        lines.append(
            f"listing (crfs warm vs umoci): {check['crfs_entries']} vs {check['umoci_entries']} paths; "
            f"only in crfs {check['only_crfs_count']} {check['only_crfs'][:5]}, only in umoci "
            f"{check['only_umoci_count']} {check['only_umoci'][:5]}, type/size/target differ {check['differ_count']} "
            f"{check['differ'][:5]}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="regular files added over all layers")
    parser.add_argument("--layers", type=int, default=5)
    common_options(parser, keep_help="keep the image, cache and rootfs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image, cache, mnt, out, log = work / "image", work / "cache", work / "mnt", work / "umoci", work / "log.txt"
    mnt.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": {"files": args.files, "layers": args.layers, "seed": args.seed},
                               "workdir": str(work), "caches_dropped": drop_caches()}  # fmt: skip
    print(f"building image in {image} ...", file=sys.stderr)
    results["image"] = build_image(image, args.files, args.layers, args.seed)
    print("crfs-merge cold ...", file=sys.stderr)
    results["crfs_cold"] = crfs_phase(image, cache, mnt, log, lambda: None)
    crfs_listing: dict[str, str] = {}
    print("crfs-merge warm ...", file=sys.stderr)
    results["crfs_warm"] = crfs_phase(image, cache, mnt, log, lambda: crfs_listing.update(listing(mnt)))
    print("umoci ...", file=sys.stderr)
    results["umoci"] = umoci_phase(image, out, log)
    if crfs_listing and "error" not in results["umoci"]:
        results["listing_compare"] = compare(crfs_listing, listing(out / "rootfs"))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("image", "cache", "mnt", "umoci")
    return run_benchmark(args, "crfs-bench-", scratch, run, (table, summary), PHASES)


if __name__ == "__main__":
    sys.exit(main())
