"""Benchmark the commands that read an image without a mount (issue 11's performance section).

(a) One file of a realistic image in a registry: the Debian minbase image of overlay_images.py
    (its base tar cached in --build-cache) converted to eStargz with `crfs-merge convert` and
    pushed to a docker-registry on 127.0.0.1, behind a proxy that counts the bytes it serves.
    `crfs-merge cat IMAGE etc/os-release` with a fresh --cache-dir (cold: only the TOCs and the
    file's chunks are fetched), then again with that cache (warm); next to it, the same file by
    `skopeo copy docker://... oci:DIR` + `umoci raw unpack` + `cat` of the gzip image (every blob
    fetched), and `crane export | tar -xO` where crane is installed. Kernel caches are dropped
    before every step; the file's bytes are checked against the unpacked rootfs.
(b) A 100k-entry image already in the cache (a local OCI layout of two gzip layers, opened once
    before the timed runs, so its merged tree is loaded from the cache): `crfs-merge ls -R`
    (target under 1 s), `stat` and `cat` of one file (the start-up floor), and `python3 -c pass`
    (the interpreter's own start).

Every figure is the median of --repeat runs. Prints a markdown table and a summary; --json PATH
writes all samples.

    python3 benchmarks/bench_inspect.py --repeat 3 --json /tmp/inspect.json
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_lazy import convert, layer_bytes, push  # noqa: E402
from benchmarks.bench_registry import counting_proxy, crfs_code, crfs_env, keep_bytecode  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    MIB,
    ancestors,
    common_options,
    drop_caches,
    fmt,
    ratio,
    run_benchmark,
    tar_info,
    text_pool,
)
from benchmarks.overlay_images import build_debian, finish_layout, layer_tar  # noqa: E402
from tests.registry_servers import FaultProxy, Registry  # noqa: E402

CRFS = [sys.executable, "-m", "unionfs.cli"]
DEFAULT_BUILD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crfs-merge-bench"
GZIP_REF, ESGZ_REF = "bench/debian:gzip", "bench/debian:esgz"
CAT_PATH = "etc/os-release"  # a symlink to ../usr/lib/os-release: cat follows it inside the image
BIG_DIRS, BIG_LAYER_SHARE = 1000, 0.6
BIG_PROBE = "srv/d0000/f00000"
PHASES = ("lazy_cat", "reference", "cached")
COMMAND_TIMEOUT = 600


def inspect_argv(name: str, image: str, cache: Path, *paths: str, recursive: bool = False) -> list[str]:
    """`crfs-merge NAME --cache-dir CACHE [-R] IMAGE PATH...`."""
    return [*CRFS, name, "--cache-dir", str(cache), *(["-R"] if recursive else []), image, *paths]


def timed(argv: list[str], cold: bool = False) -> tuple[float, bytes]:
    """Runs `argv` (caches dropped first with `cold`); returns (seconds, its stdout); raises on failure."""
    if cold:
        drop_caches()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=crfs_env(), timeout=COMMAND_TIMEOUT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{argv[:4]}... exited {done.returncode}: {done.stderr.decode(errors='replace')[-1500:]}")
    return seconds, done.stdout


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric key over `runs`, with the runs themselves."""
    keys = sorted({k for run in runs for k, v in run.items() if isinstance(v, int | float)})
    return {**{k: statistics.median(run[k] for run in runs) for k in keys}, "runs": runs}


# ---------------------------------------------------------------- (a) one file from a registry


def prepare_registry(args: argparse.Namespace, work: Path, registry: Registry) -> dict[str, Any]:
    """Builds the Debian image, converts it to eStargz, pushes both; returns facts."""
    print("building the debian image ...", file=sys.stderr)
    facts = build_debian(work / "debian", work, args.build_cache, "latest", args.seed)
    print("converting to eStargz and pushing ...", file=sys.stderr)
    facts["convert_seconds"] = convert(work / "debian", work / "esgz", "esgz", work, [])
    push(work / "debian", "latest", registry, GZIP_REF)
    push(work / "esgz", "esgz", registry, ESGZ_REF)
    facts["gzip_layer_bytes"] = layer_bytes(work / "debian", "latest")
    facts["esgz_layer_bytes"] = layer_bytes(work / "esgz", "esgz")
    return facts


def lazy_cat_phase(args: argparse.Namespace, proxy: FaultProxy, work: Path) -> dict[str, Any]:
    """`crfs-merge cat` of CAT_PATH from the eStargz tag: a fresh cache (cold), then that cache again."""
    cold: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    for attempt in range(args.repeat):
        cache = work / "caches" / f"cat-{attempt}"
        for runs in (cold, warm):
            proxy.served_bytes = 0
            seconds, out = timed(inspect_argv("cat", f"{proxy.host}/{ESGZ_REF}", cache, CAT_PATH), cold=True)
            runs.append({"seconds": seconds, "served_bytes": proxy.served_bytes, "bytes": len(out), "out": out})
    expected = cold[0]["out"]
    for run in cold + warm:
        run["same_bytes"] = run.pop("out") == expected
    return {"cold": medians(cold), "warm": medians(warm), "file_bytes": len(expected)}


def reference_phase(args: argparse.Namespace, proxy: FaultProxy, work: Path) -> dict[str, Any]:
    """skopeo copy + umoci raw unpack + cat of the gzip tag, each step after a cache drop."""
    runs: list[dict[str, Any]] = []
    for attempt in range(args.repeat):
        out = work / "reference" / str(attempt)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        proxy.served_bytes = 0
        skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{proxy.host}/{GZIP_REF}",
                  f"oci:{out / 'layout'}:v1"]  # fmt: skip
        pull, _ = timed(skopeo, cold=True)
        served = proxy.served_bytes
        unpack, _ = timed(["umoci", "raw", "unpack", "--rootless", "--image", f"{out / 'layout'}:v1",
                           str(out / "rootfs")], cold=True)  # fmt: skip
        cat, data = timed(["cat", str(out / "rootfs" / CAT_PATH)], cold=True)
        runs.append({"pull_seconds": pull, "unpack_seconds": unpack, "cat_seconds": cat,
                     "seconds": pull + unpack + cat, "served_bytes": served, "bytes": len(data)})  # fmt: skip
        (work / "reference_file").write_bytes(data)
        if attempt + 1 < args.repeat:
            shutil.rmtree(out, ignore_errors=True)
    return medians(runs)


def crane_phase(args: argparse.Namespace, proxy: FaultProxy) -> dict[str, Any]:
    """`crane export IMAGE - | tar -xO PATH` of the gzip tag, where crane is installed."""
    crane = shutil.which("crane")
    if crane is None:
        return {"absent": "crane is not installed (not packaged in Debian bookworm; it needs a Go toolchain)"}
    runs: list[dict[str, Any]] = []
    # tar -xO prints nothing for a symlink: ask for the file it names.
    script = f"{crane} export --insecure {proxy.host}/{GZIP_REF} - | tar -xO usr/lib/os-release"
    for _ in range(args.repeat):
        proxy.served_bytes = 0
        seconds, data = timed(["bash", "-o", "pipefail", "-c", script], cold=True)
        runs.append({"seconds": seconds, "served_bytes": proxy.served_bytes, "bytes": len(data)})
    return medians(runs)


def registry_phases(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    (work / "registry").mkdir(parents=True, exist_ok=True)
    registry = Registry(work / "registry")
    try:
        results["image"] = prepare_registry(args, work, registry)
        with counting_proxy(registry) as proxy:
            guarded(results, "lazy_cat", lambda: lazy_cat_phase(args, proxy, work))
            guarded(results, "reference", lambda: reference_phase(args, proxy, work))
            guarded(results, "crane", lambda: crane_phase(args, proxy))
    finally:
        registry.stop()
    reference_file = work / "reference_file"
    if reference_file.exists() and "error" not in results["lazy_cat"]:
        results["lazy_cat"]["matches_rootfs"] = results["lazy_cat"]["file_bytes"] == reference_file.stat().st_size


# ---------------------------------------------------------------- (b) a 100k-entry cached image


def build_big(layout: Path, entries: int, seed: int) -> dict[str, Any]:
    """An OCI layout of `entries` paths (BIG_DIRS directories of small files) over two gzip layers."""
    started = time.perf_counter()
    rng = random.Random(f"inspect-{seed}")
    pool = text_pool(rng, MIB)
    files = entries - BIG_DIRS - 1  # the directories and srv/ itself
    paths = [f"srv/d{n % BIG_DIRS:04d}/f{n:05d}" for n in range(files)]
    split = int(len(paths) * BIG_LAYER_SHARE)
    layers: list[tuple[dict[str, object], str]] = []
    for part in (paths[:split], paths[split:]):
        with layer_tar(layout, layers) as tar:
            written: set[str] = set()
            for path in part:
                for directory in ancestors(path):
                    if directory not in written:
                        written.add(directory)
                        tar.addfile(tar_info(directory, tarfile.DIRTYPE, 0o755))
                size = rng.randrange(0, 400)
                offset = rng.randrange(len(pool) - size)
                tar.addfile(tar_info(path, tarfile.REGTYPE, 0o644, size), io.BytesIO(pool[offset : offset + size]))
    facts = finish_layout(layout, layers, "latest")
    return {**facts, "entries": 1 + BIG_DIRS + len(paths), "build_seconds": time.perf_counter() - started}


def cached_phase(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> dict[str, Any]:
    """ls -R, stat and cat on the 100k-entry image once its tree is in the cache; python3 -c pass."""
    print(f"building the {args.entries}-entry image ...", file=sys.stderr)
    results["big_image"] = build_big(work / "big", args.entries, args.seed)
    image, cache = f"oci:{work / 'big'}:latest", work / "caches" / "big"
    first, listing = timed(inspect_argv("ls", image, cache, recursive=True))
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        ls_seconds, listing = timed(inspect_argv("ls", image, cache, recursive=True))
        runs.append({
            "ls_seconds": ls_seconds,
            "stat_seconds": timed(inspect_argv("stat", image, cache, BIG_PROBE))[0],
            "cat_seconds": timed(inspect_argv("cat", image, cache, BIG_PROBE))[0],
            "python_seconds": timed([sys.executable, "-c", "pass"])[0],
        })  # fmt: skip
    return {**medians(runs), "first_open_seconds": first, "listed_lines": listing.count(b"\n")}


# ---------------------------------------------------------------- report


def guarded(results: dict[str, Any], name: str, phase: Callable[[], dict[str, Any]]) -> None:
    """Runs one phase into results[name]; an exception becomes its error, the next phases still run."""
    print(f"{name} ...", file=sys.stderr)
    try:
        results[name] = phase()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}


def share(a: Any, b: Any) -> str:
    """a / b as ratio() gives it, or as "1/N" when it is below 1/100."""
    if isinstance(a, int) and isinstance(b, int) and 0 < a * 100 < b:
        return f"1/{b / a:.0f}"
    return ratio(a, b)


def table(results: dict[str, Any]) -> str:
    lazy, ref, crane = results.get("lazy_cat", {}), results.get("reference", {}), results.get("crane", {})
    cold, warm = lazy.get("cold", {}), lazy.get("warm", {})
    lines = ["| one file from the registry | seconds | bytes fetched | vs skopeo+umoci+cat (time, bytes) |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    rows = [("crfs-merge cat, fresh cache", cold), ("crfs-merge cat, cache reused", warm),
            ("skopeo copy + umoci raw unpack + cat", ref), ("crane export \\| tar -xO", crane)]  # fmt: skip
    for label, row in rows:
        if "absent" in row:
            lines.append(f"| {label} | absent | | {row['absent']} |")
            continue
        lines.append(f"| {label} | {fmt(row.get('seconds'))} | {row.get('served_bytes', 'n/a')} | "
                     f"{ratio(row.get('seconds'), ref.get('seconds'))}, "
                     f"{share(row.get('served_bytes'), ref.get('served_bytes'))} |")  # fmt: skip
    cached = results.get("cached", {})
    lines += ["", f"| {results['args']['entries']}-entry image, tree cached | seconds | vs `python3 -c pass` |",
              "| --- | ---: | ---: |"]  # fmt: skip
    for label, key in (("ls -R", "ls_seconds"), ("stat FILE", "stat_seconds"), ("cat FILE", "cat_seconds"),
                       ("python3 -c pass", "python_seconds")):  # fmt: skip
        lines.append(f"| {label} | {fmt(cached.get(key))} | {ratio(cached.get(key), cached.get('python_seconds'))} |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    image, big, cached = results.get("image", {}), results.get("big_image", {}), results.get("cached", {})
    lines = [
        f"crfs-merge code: {results['crfs_code']}; bytecode in {results['bytecode']}; "
        f"repeat {results['args']['repeat']}; caches dropped: {results['caches_dropped']}",
        f"debian image: {image.get('expected_entries')} entries, gzip blobs {fmt(image.get('gzip_layer_bytes'))} B, "
        f"eStargz blobs {fmt(image.get('esgz_layer_bytes'))} B; file {CAT_PATH}: "
        f"{results.get('lazy_cat', {}).get('file_bytes')} B, same as the unpacked rootfs: "
        f"{results.get('lazy_cat', {}).get('matches_rootfs')}",
        f"cached image: {big.get('entries')} entries in {big.get('layers')} layers, built in "
        f"{fmt(big.get('build_seconds'))} s; first open (index + merge) {fmt(cached.get('first_open_seconds'))} s; "
        f"ls -R wrote {cached.get('listed_lines')} lines",
    ]  # fmt: skip
    ls_seconds = cached.get("ls_seconds")
    if isinstance(ls_seconds, float):
        lines.append(f"ls -R of the cached image: {ls_seconds:.2f} s, target under 1 s: "
                     f"{'met' if ls_seconds < 1 else 'NOT met'}")  # fmt: skip
    failed = [name for name in (*PHASES, "crane") if "error" in results.get(name, {})]
    lines += [f"{name}: ERROR {results[name]['error']}" for name in failed]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--entries", type=int, default=100_000, help="paths in the cached image of (b)")
    parser.add_argument("--build-cache", type=Path, default=DEFAULT_BUILD_CACHE,
                        help="where the debootstrapped Debian base tar is kept between runs")  # fmt: skip
    common_options(parser, keep_help="keep the images, registry storage, caches and rootfs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "args": {"repeat": args.repeat, "entries": args.entries, "seed": args.seed},
        "workdir": str(work),
        "caches_dropped": drop_caches(),
        "crfs_code": crfs_code(),
        "bytecode": keep_bytecode(work),
    }
    registry_phases(args, work, results)
    guarded(results, "cached", lambda: cached_phase(args, work, results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("debian", "esgz", "big", "registry", "caches", "reference", "debian-rootfs", "mnt", "pycache")
    return run_benchmark(args, "crfs-bench-inspect-", scratch, run, (table, summary), PHASES)


if __name__ == "__main__":
    sys.exit(main())
