"""Benchmark crfs-merge mounting from a registry against `skopeo copy` + `umoci raw unpack`.

Builds a deterministic synthetic OCI image (--size-mb of gzip blobs, about twice that of tar,
--files regular files over 5 layers: mostly small files, some of 32 KiB-1 MiB, a few large
ones; contents cut from a text pool and a random-bytes pool), pushes it with skopeo to a
local docker-registry, and puts an aiohttp reverse proxy (tests.registry_servers.FaultProxy,
no faults) in front of it to count the bytes each phase downloads. Through the proxy it measures:

- crfs-merge cold (fresh --cache-dir): the time until `crfs-merge REF DIR` returns (mount
  ready), bytes served, then on the mount `find | wc -l` and reading one 1 MiB file, and the
  server's peak RSS (VmHWM); unmount;
- crfs-merge warm (same cache dir, second mount): the same; only manifest and config
  should be downloaded;
- reference: `skopeo copy docker://REF oci:OUT:v1` (time, bytes served) then
  `umoci raw unpack --rootless` (time); their sum is "full pull + unpack"; the same
  `find` and read on the rootfs umoci wrote.

Kernel caches are dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) before
every measured step. Prints a markdown table and a summary; --json PATH writes the results.

    python3 benchmarks/bench_registry.py

Note: the proxy buffers each response whole before sending it, in the benchmark's own
process; both crfs-merge and skopeo pay that, so the ratios stay fair.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root
# first, for `benchmarks.measure`, `tests.registry_servers` and this checkout's packages ahead
# of any installed copy.
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
    peak_kib,
    run_benchmark,
    run_measured,
    tail,
    tar_info,
    text_pool,
    timed_find,
    timed_shell,
    unmount,
)
from registry.layout_writer import write_layout  # noqa: E402
from registry.media_types import Compression  # noqa: E402
from tests.registry_servers import FaultProxy, Registry, skopeo_copy  # noqa: E402
from unionfs.aio import EventLoopThread  # noqa: E402

POOL_BYTES = 8 * MIB
CHUNK = 16 * KIB
RANDOM_CHUNK_SHARE = 0.16  # 16 KiB text chunks gzip to about 0.44, random ones to 1.0: about 0.53 overall
EXPECTED_RATIO = RANDOM_CHUNK_SHARE + (1 - RANDOM_CHUNK_SHARE) * 0.44
LAYER_WEIGHTS = (0.35, 0.25, 0.2, 0.12, 0.08)
PROBE_PATH = "usr/share/bench/probe-1mib.bin"
REPOSITORY = "bench/image:v1"


# ---------------------------------------------------------------- image


@dataclass
class Layer:
    """What one layer holds: relative paths, without a leading slash."""

    files: dict[str, int] = field(default_factory=dict)  # path -> size
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> target


def make_dirs(rng: random.Random, count: int) -> list[str]:
    dirs: list[str] = []
    for i in range(count):
        parent = rng.choice(dirs) if dirs and rng.random() > 0.15 else ""
        if parent.count("/") >= 4:
            parent = ""
        dirs.append(f"{parent}/d{i:04d}" if parent else f"d{i:04d}")
    return dirs


def plan_sizes(rng: random.Random, files: int, tar_target: int) -> list[int]:
    """Sizes for `files` files (the 1 MiB probe excluded) adding up to about `tar_target`."""
    large = max(2, files // 200)
    medium = max(1, files * 9 // 200)
    small = [int(16 * KIB * rng.random() ** 2.5) for _ in range(files - large - medium)]
    mids = [int(32 * KIB * 32 ** rng.random()) for _ in range(medium)]  # log-uniform 32 KiB..1 MiB
    budget = max(0, tar_target - MIB - sum(small))
    if sum(mids) > 0.4 * budget:
        mids = [max(KIB, int(m * 0.4 * budget / sum(mids))) for m in mids]
    weights = [0.5 + rng.random() for _ in range(large)]
    rest = max(large * 2 * MIB, budget - sum(mids))
    bigs = [int(rest * w / sum(weights)) for w in weights]
    sizes = small + mids + bigs
    rng.shuffle(sizes)
    return sizes


def plan_layers(rng: random.Random, files: int, tar_target: int) -> tuple[list[Layer], int]:
    """Spreads the files over the layers; returns them and the expected `find | wc -l`."""
    dirs = make_dirs(rng, max(8, files // 40))
    layers = [Layer() for _ in LAYER_WEIGHTS]
    layers[0].files[PROBE_PATH] = MIB
    for serial, size in enumerate(plan_sizes(rng, files - 1, tar_target)):
        layer = rng.choices(layers, weights=LAYER_WEIGHTS)[0]
        layer.files[f"{rng.choice(dirs)}/f{serial:06d}"] = size
    for layer in layers:
        own = list(layer.files)
        for serial in range(max(1, len(own) // 100)):
            path = f"{rng.choice(dirs)}/s{serial:05d}-{len(own)}"
            layer.symlinks[path] = os.path.relpath(rng.choice(own), os.path.dirname(path))
    entries = {a for layer in layers for p in [*layer.files, *layer.symlinks] for a in ancestors(p)}
    entries.update(p for layer in layers for p in [*layer.files, *layer.symlinks])
    return layers, 1 + len(entries)


def make_pools(rng: random.Random) -> tuple[bytes, bytes]:
    """Returns a text pool (gzips to about 0.41, 0.44 in 16 KiB pieces) and a random-bytes pool to cut contents from."""
    return text_pool(rng, POOL_BYTES)[:POOL_BYTES], rng.randbytes(POOL_BYTES)


def content(path: str, size: int, pools: tuple[bytes, bytes], rng: random.Random) -> bytes:
    parts = [f"{path}\n".encode()]
    length = len(parts[0])
    while length < size:
        pool = pools[1] if rng.random() < RANDOM_CHUNK_SHARE else pools[0]
        offset = rng.randrange(len(pool) - CHUNK)
        parts.append(pool[offset : offset + CHUNK])
        length += CHUNK
    return b"".join(parts)[:size]


def layer_tar(layer: Layer, pools: tuple[bytes, bytes], rng: random.Random) -> bytes:
    dirs = {a for p in [*layer.files, *layer.symlinks] for a in ancestors(p)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            tar.addfile(tar_info(d, tarfile.DIRTYPE, 0o755))
        for path, size in layer.files.items():
            tar.addfile(tar_info(path, tarfile.REGTYPE, 0o644, size), io.BytesIO(content(path, size, pools, rng)))
        for path, target in layer.symlinks.items():
            tar.addfile(tar_info(path, tarfile.SYMTYPE, 0o777, link=target))
    return buffer.getvalue()


def build_image(root: Path, size_mb: int, files: int, seed: int) -> dict[str, Any]:
    """Writes the OCI layout (tag `latest`) at `root`; returns facts about it."""
    started = time.perf_counter()
    rng = random.Random(seed)
    layers, expected = plan_layers(rng, files, int(size_mb * MIB / EXPECTED_RATIO))
    pools = make_pools(rng)
    tars = [layer_tar(layer, pools, rng) for layer in layers]
    write_layout(root, tars, Compression.GZIP)
    blobs = sorted((p.stat().st_size for p in (root / "blobs" / "sha256").iterdir()), reverse=True)
    all_sizes = [s for layer in layers for s in layer.files.values()]
    return {
        "layers": len(layers),
        "files": len(all_sizes),
        "files_over_1mib": sum(s > MIB for s in all_sizes),
        "largest_file_bytes": max(all_sizes),
        "symlinks": sum(len(layer.symlinks) for layer in layers),
        "tar_bytes": sum(len(t) for t in tars),
        "layer_tar_bytes": [len(t) for t in tars],
        "blob_bytes": sum(blobs),
        "largest_blob_bytes": blobs[0],
        "expected_entries": expected,
        "build_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- measuring


def crfs_env() -> dict[str, str]:
    """The environment for crfs-merge: this checkout first on PYTHONPATH, so that the command
    and the server it spawns run this repo's code even if the editable install points elsewhere."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)}


def keep_bytecode(work: Path) -> str:
    """Lets the commands keep their compiled modules (under WORK/pycache, not in the checkout), as an
    installed package has them: with PYTHONDONTWRITEBYTECODE every start compiles ~50 modules again."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    packages = [str(REPO_ROOT / name) for name in ("unionfs", "registry", "whiteout")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], env=crfs_env(), check=True)
    return os.environ["PYTHONPYCACHEPREFIX"]


def crfs_code() -> str:
    """Where crfs-merge's `unionfs.cli` is imported from, under crfs_env()."""
    argv = [sys.executable, "-c", "import unionfs.cli; print(unionfs.cli.__file__)"]
    done = subprocess.run(argv, capture_output=True, text=True, env=crfs_env(), cwd="/", check=False)
    return done.stdout.strip() or done.stderr.strip()[-200:]


def workload(root: Path) -> dict[str, Any]:
    """`find | wc -l` and a read of the 1 MiB probe file on `root`, caches dropped before each."""
    result: dict[str, Any] = {}
    result["find_seconds"], result["find_entries"] = timed_find(root)
    drop_caches()
    result["read_seconds"], rc, out = timed_shell(f"cat {shlex.quote(str(root / PROBE_PATH))} | wc -c")
    result["read_bytes"] = int(out) if rc == 0 and out.isdigit() else None
    return result


# ---------------------------------------------------------------- phases


def crfs_phase(proxy: FaultProxy, cache: Path, mountpoint: Path, log: Path) -> dict[str, Any]:
    """Mounts through the proxy, measures, unmounts."""
    drop_caches()
    proxy.served_bytes = 0
    argv = ["crfs-merge", "--cache-dir", str(cache), f"{proxy.host}/{REPOSITORY}", str(mountpoint)]
    seconds, rc, _ = run_measured(argv, log, crfs_env())
    result: dict[str, Any] = {"ready_seconds": seconds, "rc": rc, "served_bytes": proxy.served_bytes}
    if rc != 0 or not os.path.ismount(mountpoint):
        result["error"] = f"crfs-merge exited {rc}; log: {tail(log)}"
        return result

    def steps() -> dict[str, Any]:
        return {**workload(mountpoint), "served_after_workload_bytes": proxy.served_bytes}

    result.update(measure_server(mountpoint, steps))
    return result


def reference_phase(proxy: FaultProxy, out: Path, log: Path) -> dict[str, Any]:
    """skopeo copy to an OCI layout through the proxy, then umoci raw unpack."""
    drop_caches()
    proxy.served_bytes = 0
    source = f"docker://{proxy.host}/{REPOSITORY}"
    skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", source, f"oci:{out / 'layout'}:v1"]
    pull_seconds, rc, pull_rss = run_measured(skopeo, log)
    result: dict[str, Any] = {"pull_seconds": pull_seconds, "served_bytes": proxy.served_bytes}
    if rc != 0:
        result["error"] = f"skopeo exited {rc}; log: {tail(log)}"
        return result
    drop_caches()
    umoci = ["umoci", "raw", "unpack", "--rootless", "--image", f"{out / 'layout'}:v1", str(out / "rootfs")]
    unpack_seconds, rc, unpack_rss = run_measured(umoci, log)
    result.update(unpack_seconds=unpack_seconds, ready_seconds=pull_seconds + unpack_seconds)
    result.update(pull_rss_kib=pull_rss, unpack_rss_kib=unpack_rss)
    result["peak_rss_kib"] = peak_kib(pull_rss, unpack_rss)
    if rc != 0:
        result["error"] = f"umoci exited {rc}; log: {tail(log)}"
        return result
    result.update(workload(out / "rootfs"))
    return result


# ---------------------------------------------------------------- report


PHASES = ("crfs_cold", "crfs_warm", "reference")
ROWS: list[Row] = [
    ("time to ready: mount / pull + unpack (s)", "ready_seconds", 1.0, True),
    ("of which `skopeo copy` (s)", "pull_seconds", 1.0, False),
    ("of which `umoci raw unpack` (s)", "unpack_seconds", 1.0, False),
    ("bytes served by the registry (MiB)", "served_bytes", float(MIB), True),
    ("peak RSS (MiB)", "peak_rss_kib", 1024.0, True),
    ("`skopeo copy` peak RSS (MiB)", "pull_rss_kib", 1024.0, False),
    ("`umoci raw unpack` peak RSS (MiB)", "unpack_rss_kib", 1024.0, False),
    ("`find \\| wc -l` time (s)", "find_seconds", 1.0, True),
    ("read the 1 MiB file (s)", "read_seconds", 1.0, True),
    ("entries (`find \\| wc -l`)", "find_entries", 1.0, False),
]


def table(results: dict[str, Any]) -> str:
    columns = ["crfs-merge cold", "crfs-merge warm", "skopeo + umoci", "cold/ref", "warm/ref"]
    return markdown_table(columns, ROWS, [results[name] for name in PHASES])


def summary(results: dict[str, Any]) -> str:
    image = results["image"]
    lines = [
        f"image: {image['files']} files ({image['files_over_1mib']} over 1 MiB, largest "
        f"{image['largest_file_bytes'] / MIB:.1f} MiB), {image['symlinks']} symlinks, {image['layers']} gzip layers; "
        f"tar {image['tar_bytes'] / MIB:.1f} MiB, blobs {image['blob_bytes'] / MIB:.1f} MiB "
        f"(largest {image['largest_blob_bytes'] / MIB:.1f} MiB); built in {image['build_seconds']:.1f} s, "
        f"pushed in {results['push_seconds']:.1f} s; caches dropped: {results['caches_dropped']}; "
        f"crfs-merge code: {results['crfs_code']}",
    ]
    counts = {k: results[k].get("find_entries") for k in PHASES}
    same = len(set(counts.values())) == 1 and counts["crfs_cold"] == image["expected_entries"]
    lines.append(f"`find | wc -l`: {counts}, expected {image['expected_entries']}: {'OK' if same else 'MISMATCH'}")
    for name in PHASES:
        phase = results[name]
        if "error" in phase:
            lines.append(f"{name}: ERROR {phase['error']}")
        if phase.get("read_bytes") not in (None, MIB):
            lines.append(f"{name}: read {phase['read_bytes']} bytes of the probe, expected {MIB}")
        if phase.get("served_after_workload_bytes", phase.get("served_bytes")) != phase.get("served_bytes"):
            lines.append(f"{name}: the proxy served {phase['served_after_workload_bytes']} bytes after ready")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="target size of the gzip blobs")
    parser.add_argument("--files", type=int, default=10_000, help="regular files over all layers")
    common_options(parser, keep_help="keep the image, registry storage, cache and rootfs")
    return parser.parse_args(argv)


def push(layout: Path, registry: Registry) -> float:
    started = time.perf_counter()
    skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.host}/{REPOSITORY}")
    return time.perf_counter() - started


def measure(proxy: FaultProxy, work: Path, results: dict[str, Any]) -> None:
    cache, mnt, log = work / "cache", work / "mnt", work / "log.txt"
    print("crfs-merge cold ...", file=sys.stderr)
    results["crfs_cold"] = crfs_phase(proxy, cache, mnt, log)
    print("crfs-merge warm ...", file=sys.stderr)
    results["crfs_warm"] = crfs_phase(proxy, cache, mnt, log)
    print("skopeo copy + umoci raw unpack ...", file=sys.stderr)
    results["reference"] = reference_phase(proxy, work / "reference", log)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    layout, storage = work / "image", work / "registry"
    for d in (storage, work / "mnt", work / "reference"):
        d.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "args": {"size_mb": args.size_mb, "files": args.files, "seed": args.seed},
        "workdir": str(work),
        "caches_dropped": drop_caches(),
        "crfs_code": crfs_code(),
    }
    print(f"building image in {layout} ...", file=sys.stderr)
    results["image"] = build_image(layout, args.size_mb, args.files, args.seed)
    registry = Registry(storage)
    try:
        print(f"pushing to {registry.host} ...", file=sys.stderr)
        results["push_seconds"] = push(layout, registry)
        with counting_proxy(registry) as proxy:
            try:
                measure(proxy, work, results)
            finally:
                unmount(work / "mnt")
    finally:
        registry.stop()
    return results


@contextlib.contextmanager
def counting_proxy(registry: Registry) -> Iterator[FaultProxy]:
    """Yields a proxy (no faults) in front of `registry` that counts what it serves."""
    with EventLoopThread() as loop:
        proxy = FaultProxy(registry.host, loop)
        proxy.start()
        try:
            yield proxy
        finally:
            proxy.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("image", "registry", "cache", "mnt", "reference")
    return run_benchmark(args, "crfs-bench-registry-", scratch, run, (table, summary), PHASES)


if __name__ == "__main__":
    sys.exit(main())
