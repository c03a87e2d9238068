"""Benchmark lazy eStargz mounts from a registry against the whole-layer path and `skopeo copy` + `umoci raw unpack`.

Builds bench_registry's deterministic synthetic image (--size-mb of gzip blobs, --files regular
files over 5 layers), pushes it to a local docker-registry as `bench/image:gzip` (and under
bench_registry's tag, for its reference_phase), converts it with `crfs-merge convert` (default
chunk size, 20 deterministically chosen files as --prefetch-files) and pushes that as
`bench/image:esgz`. It also builds `bench/big:esgz` (one --size-mb MiB file) and
`bench/small:esgz` (the image at a tenth of --size-mb and --files). Through a counting proxy
(tests.registry_servers.FaultProxy) it measures, each mount with a fresh --cache-dir:

- time until the mount is ready and bytes served: eStargz lazy (`--prefetch none`), the gzip
  tag (layers downloaded whole), and skopeo copy + umoci raw unpack of the gzip tag;
- on fresh lazy mounts: bytes served to read one file of about 1 MiB, and bytes and time of
  a workload reading the 20 prioritized files; then the same workload on a `--prefetch
  landmark` mount once its prefetch has settled (no bytes should be served);
- throughput of the big file: first (cold) read, a second read on the same mount, and a read
  on a new mount sharing the cache directory (chunks from the disk cache);
- flatness: lazy mount-ready time (median of 3) of the small image and of the full one.

Kernel caches are dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) before every
measured step. File contents read through the mounts are checked against the rootfs that umoci
wrote. Prints a markdown table and a summary; --json PATH writes the results.

    python3 benchmarks/bench_lazy.py
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a file, this script has only its own directory on sys.path: put the repository root first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_registry import (  # noqa: E402
    EXPECTED_RATIO,
    PROBE_PATH,
    REPOSITORY,
    build_image,
    content,
    counting_proxy,
    crfs_code,
    crfs_env,
    make_pools,
    plan_layers,
    reference_phase,
)
from benchmarks.measure import (  # noqa: E402
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
    unmount,
)
from registry.layout_writer import write_layout  # noqa: E402
from registry.media_types import Compression  # noqa: E402
from tests.registry_servers import FaultProxy, Registry, skopeo_copy  # noqa: E402

CRFS = [sys.executable, "-m", "unionfs.cli"]
GZIP_REF, ESGZ_REF = "bench/image:gzip", "bench/image:esgz"
BIG_REF, SMALL_REF = "bench/big:esgz", "bench/small:esgz"
BIG_PATH = "data/big.bin"
WORKLOAD_FILES = 20
READ_BLOCK = MIB
SETTLE_QUIET_SECONDS = 2.0  # the landmark prefetch has settled once nothing was served for this long
SETTLE_TIMEOUT_SECONDS = 600.0
FLAT_REPEATS = 3
PHASES = ("reference", "whole", "lazy_mount", "lazy_workload", "landmark", "big", "flatness")

# A table row: label, value, reference, divisor for display, ratio kind ("x", "%" or "").
TableRow = tuple[str, Any, Any, float, str]


# ---------------------------------------------------------------- images


def image_plan(size_mb: int, files: int, seed: int) -> dict[str, int]:
    """Path -> size of every regular file build_image(size_mb, files, seed) writes (its own first rng draws)."""
    layers, _ = plan_layers(random.Random(seed), files, int(size_mb * MIB / EXPECTED_RATIO))
    return {path: size for layer in layers for path, size in layer.files.items()}


def pick_one_mib(plan: dict[str, int]) -> str:
    """The file closest to 1 MiB among those of 0.9-1.1 MiB (the probe aside); the probe if none."""
    near = sorted((abs(size - MIB), path) for path, size in plan.items() if 0.9 * MIB <= size <= 1.1 * MIB)
    return next((path for _, path in near if path != PROBE_PATH), PROBE_PATH)


def pick_workload(plan: dict[str, int], exclude: set[str], seed: int) -> list[str]:
    """WORKLOAD_FILES files drawn deterministically from the plan, `exclude` left out."""
    candidates = sorted(path for path in plan if path not in exclude)
    return random.Random(f"workload-{seed}").sample(candidates, min(WORKLOAD_FILES, len(candidates)))


def build_big(root: Path, size: int, seed: int) -> str:
    """Writes an OCI layout (tag `latest`, uncompressed) holding one `size`-byte file; returns its sha256."""
    rng = random.Random(f"big-{seed}")
    data = content(BIG_PATH, size, make_pools(rng), rng)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tar_info("data", tarfile.DIRTYPE, 0o755))
        tar.addfile(tar_info(BIG_PATH, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    write_layout(root, [buffer.getvalue()], Compression.NONE)
    return hashlib.sha256(data).hexdigest()


def convert(source: Path, dest: Path, tag: str, work: Path, prioritized: list[str]) -> float:
    """`crfs-merge convert` of layout `source` (tag latest) to oci:DEST:TAG; returns its seconds."""
    files = ["--prefetch-files", ",".join(prioritized)] if prioritized else []
    argv = [*CRFS, "convert", "--cache-dir", str(work / "caches" / f"convert-{dest.name}"), *files,
            f"oci:{source}:latest", f"oci:{dest}:{tag}"]  # fmt: skip
    seconds, rc, _ = run_measured(argv, work / "log.txt", crfs_env())
    if rc != 0:
        raise RuntimeError(f"convert {source} exited {rc}; log: {tail(work / 'log.txt')}")
    return seconds


def layer_bytes(layout: Path, tag: str) -> int:
    """The total size of the layer blobs of image `tag` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    names = "org.opencontainers.image.ref.name"
    (entry,) = [m for m in index["manifests"] if m.get("annotations", {}).get(names) == tag]
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    return sum(int(layer["size"]) for layer in manifest["layers"])


def push(layout: Path, tag: str, registry: Registry, ref: str) -> float:
    started = time.perf_counter()
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{registry.host}/{ref}")
    return time.perf_counter() - started


def prepare_main(args: argparse.Namespace, work: Path, registry: Registry) -> dict[str, Any]:
    """Builds, converts and pushes the main image; returns facts and the files picked."""
    print(f"building image in {work / 'image'} ...", file=sys.stderr)
    facts = build_image(work / "image", args.size_mb, args.files, args.seed)
    plan = image_plan(args.size_mb, args.files, args.seed)
    if len(plan) != facts["files"] or max(plan.values()) != facts["largest_file_bytes"]:
        raise RuntimeError("image_plan() no longer matches build_image(): pick files another way")
    one = pick_one_mib(plan)
    workload = pick_workload(plan, {one}, args.seed)
    print("pushing the gzip image, converting to eStargz ...", file=sys.stderr)
    facts["push_seconds"] = push(work / "image", "latest", registry, GZIP_REF)
    push(work / "image", "latest", registry, REPOSITORY)  # the same image, for bench_registry.reference_phase
    facts["convert_seconds"] = convert(work / "image", work / "esgz", "esgz", work, workload)
    push(work / "esgz", "esgz", registry, ESGZ_REF)
    facts["gzip_layer_bytes"] = layer_bytes(work / "image", "latest")
    facts["esgz_layer_bytes"] = layer_bytes(work / "esgz", "esgz")
    facts["one_mib_file"] = {"path": one, "size": plan[one]}
    facts["workload_files"] = workload
    facts["workload_bytes"] = sum(plan[p] for p in workload)
    return facts


def prepare_extra(args: argparse.Namespace, work: Path, registry: Registry) -> dict[str, Any]:
    """Builds, converts and pushes the big-file image and the image a tenth the size."""
    print("building the big-file and the small image ...", file=sys.stderr)
    big_size = args.size_mb * MIB
    big_sha = build_big(work / "big-src", big_size, args.seed)
    big_convert = convert(work / "big-src", work / "big", "esgz", work, [])
    push(work / "big", "esgz", registry, BIG_REF)
    small_mb, small_files = max(1, args.size_mb // 10), max(20, args.files // 10)
    small = build_image(work / "small-src", small_mb, small_files, args.seed)
    convert(work / "small-src", work / "small", "esgz", work, [])
    push(work / "small", "esgz", registry, SMALL_REF)
    return {
        "big": {
            "size": big_size,
            "sha256": big_sha,
            "convert_seconds": big_convert,
            "layer_bytes": layer_bytes(work / "big", "esgz"),
        },
        "small": {
            "size_mb": small_mb,
            "files": small_files,
            "blob_bytes": small["blob_bytes"],
            "layer_bytes": layer_bytes(work / "small", "esgz"),
        },
    }


# ---------------------------------------------------------------- measuring


def reset(proxy: FaultProxy) -> None:
    proxy.served_bytes = 0
    proxy.requests.clear()


def mount(proxy: FaultProxy, ref: str, cache: Path, mnt: Path, log: Path, prefetch: str) -> dict[str, Any]:
    """Drops caches and mounts `ref` through the proxy; returns ready time, bytes and requests served."""
    drop_caches()
    reset(proxy)
    argv = [*CRFS, "--cache-dir", str(cache), "--prefetch", prefetch, f"{proxy.host}/{ref}", str(mnt)]
    seconds, rc, _ = run_measured(argv, log, crfs_env())
    result: dict[str, Any] = {"ready_seconds": seconds, "served_bytes": proxy.served_bytes,
                              "requests": dict(proxy.requests)}  # fmt: skip
    if rc != 0 or not os.path.ismount(mnt):
        result["error"] = f"mount of {ref} exited {rc}; log: {tail(log)}"
    return result


def read_file(path: Path, digest: bool = True) -> tuple[float, int, str]:
    """Reads `path` in READ_BLOCK pieces; returns (seconds, bytes, sha256 hex or "")."""
    hasher = hashlib.sha256()
    total = 0
    started = time.perf_counter()
    with path.open("rb", buffering=0) as reader:
        while block := reader.read(READ_BLOCK):
            total += len(block)
            if digest:
                hasher.update(block)
    return time.perf_counter() - started, total, hasher.hexdigest() if digest else ""


def expected_digests(rootfs: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of each of `paths` in the rootfs umoci wrote ({} if it is missing)."""
    if not rootfs.is_dir():
        return {}
    return {p: read_file(rootfs / p)[2] for p in paths if (rootfs / p).is_file()}


def timed_reads(proxy: FaultProxy, root: Path, paths: list[str], expected: dict[str, str]) -> dict[str, Any]:
    """Drops caches, reads `paths` under `root` one after the other; returns time, bytes served
    and read, and the paths whose contents differ from `expected`."""
    drop_caches()
    reset(proxy)
    started = time.perf_counter()
    done = [(p, *read_file(root / p)[1:]) for p in paths]
    seconds = time.perf_counter() - started
    wrong = [p for p, _, sha in done if p in expected and expected[p] != sha]
    return {"seconds": seconds, "served_bytes": proxy.served_bytes, "read_bytes": sum(n for _, n, _ in done),
            "requests": dict(proxy.requests), "wrong_content": wrong}  # fmt: skip


def mounted(
    proxy: FaultProxy, ref: str, cache: Path, work: Path, prefetch: str, steps: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Mounts `ref` at WORK/mnt, runs `steps(mountpoint)` (with the server's peak RSS), unmounts."""
    mnt = work / "mnt"
    result = {"mount": mount(proxy, ref, cache, mnt, work / "log.txt", prefetch)}
    if "error" in result["mount"]:
        unmount(mnt)
        return {**result, "error": result["mount"]["error"]}
    result.update(measure_server(mnt, lambda: steps(mnt)))
    return result


def wait_for_settle(proxy: FaultProxy) -> dict[str, Any]:
    """Waits until the proxy has served nothing for SETTLE_QUIET_SECONDS; returns what it served since the mount."""
    started = last_change = time.monotonic()
    seen = proxy.served_bytes
    while time.monotonic() - last_change < SETTLE_QUIET_SECONDS:
        if time.monotonic() - started > SETTLE_TIMEOUT_SECONDS:
            return {"served_bytes": proxy.served_bytes, "error": "landmark prefetch did not settle"}
        time.sleep(0.05)
        if proxy.served_bytes != seen:
            seen, last_change = proxy.served_bytes, time.monotonic()
    return {"served_bytes": seen, "settle_seconds": last_change - started, "requests": dict(proxy.requests)}


# ---------------------------------------------------------------- phases


def whole_phase(proxy: FaultProxy, work: Path) -> dict[str, Any]:
    """(b) The gzip tag: layers downloaded whole at mount time."""
    return mounted(proxy, GZIP_REF, work / "caches" / "whole", work, "none", lambda mnt: entries_step(proxy, mnt))


def entries_step(proxy: FaultProxy, root: Path) -> dict[str, Any]:
    reset(proxy)
    seconds, count = timed_find(root)
    return {"find_seconds": seconds, "find_entries": count, "find_served_bytes": proxy.served_bytes}


def lazy_mount_phase(proxy: FaultProxy, work: Path, facts: dict[str, Any], expected: dict[str, str]) -> dict[str, Any]:
    """(a) eStargz, `--prefetch none`: mount, then read the ~1 MiB file, then `find`."""
    path = facts["one_mib_file"]["path"]

    def steps(root: Path) -> dict[str, Any]:
        return {"one_file": timed_reads(proxy, root, [path], expected), **entries_step(proxy, root)}

    return mounted(proxy, ESGZ_REF, work / "caches" / "lazy-mount", work, "none", steps)


def lazy_workload_phase(
    proxy: FaultProxy, work: Path, facts: dict[str, Any], expected: dict[str, str]
) -> dict[str, Any]:
    """The 20 prioritized files read on a fresh `--prefetch none` mount."""

    def steps(root: Path) -> dict[str, Any]:
        return {"workload": timed_reads(proxy, root, facts["workload_files"], expected)}

    return mounted(proxy, ESGZ_REF, work / "caches" / "lazy-workload", work, "none", steps)


def landmark_phase(proxy: FaultProxy, work: Path, facts: dict[str, Any], expected: dict[str, str]) -> dict[str, Any]:
    """The 20 prioritized files read on a `--prefetch landmark` mount once its prefetch settled."""
    files = facts["workload_files"]

    def steps(root: Path) -> dict[str, Any]:
        prefetch = wait_for_settle(proxy)
        return {"prefetch": prefetch, "workload": timed_reads(proxy, root, files, expected)}

    return mounted(proxy, ESGZ_REF, work / "caches" / "landmark", work, "landmark", steps)


def throughput(proxy: FaultProxy, path: Path) -> dict[str, Any]:
    """Drops caches and reads `path` whole without hashing; returns MiB/s and bytes served."""
    drop_caches()
    reset(proxy)
    seconds, size, _ = read_file(path, digest=False)
    return {
        "seconds": seconds,
        "bytes": size,
        "mib_per_second": size / MIB / seconds,
        "served_bytes": proxy.served_bytes,
        "requests": dict(proxy.requests),
    }


def big_phase(proxy: FaultProxy, work: Path, big: dict[str, Any]) -> dict[str, Any]:
    """The big file: cold read, a second read on the same mount, then a read on a new mount
    sharing the cache directory (the server's memory empty: chunks from disk), and a check."""
    cache = work / "caches" / "big"

    def first(root: Path) -> dict[str, Any]:
        return {"cold": throughput(proxy, root / BIG_PATH), "again": throughput(proxy, root / BIG_PATH)}

    def remount(root: Path) -> dict[str, Any]:
        result = {"disk_cache": throughput(proxy, root / BIG_PATH)}
        result["sha256_ok"] = read_file(root / BIG_PATH)[2] == big["sha256"]
        return result

    result = mounted(proxy, BIG_REF, cache, work, "none", first)
    if "error" not in result:
        second = mounted(proxy, BIG_REF, cache, work, "none", remount)
        result.update(remount=second, **({"error": second["error"]} if "error" in second else {}))
    return result


def flatness_phase(proxy: FaultProxy, work: Path) -> dict[str, Any]:
    """Lazy mount-ready times of the small and the full image, alternating, FLAT_REPEATS each."""
    times: dict[str, list[float]] = {"small": [], "full": []}
    served: dict[str, list[int]] = {"small": [], "full": []}
    for attempt in range(FLAT_REPEATS):
        for name, ref in (("small", SMALL_REF), ("full", ESGZ_REF)):
            result = mounted(proxy, ref, work / "caches" / f"flat-{name}-{attempt}", work, "none", lambda _: {})
            if "error" in result:
                return {"error": result["error"], "ready_seconds": times}
            times[name].append(result["mount"]["ready_seconds"])
            served[name].append(result["mount"]["served_bytes"])
    medians = {f"{name}_ready_seconds": statistics.median(values) for name, values in times.items()}
    return {**medians, "ready_seconds": times, "served_bytes": served}


def guarded(results: dict[str, Any], name: str, phase: Callable[[], dict[str, Any]]) -> None:
    """Runs one phase into results[name]; an exception becomes its error, and the next phases still run."""
    print(f"{name} ...", file=sys.stderr)
    try:
        results[name] = phase()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        unmount(Path(results["workdir"]) / "mnt")


def measure(proxy: FaultProxy, work: Path, results: dict[str, Any]) -> None:
    facts = results["image"]
    guarded(results, "reference", lambda: reference_phase(proxy, work / "reference", work / "log.txt"))
    rootfs = work / "reference" / "rootfs"
    expected = expected_digests(rootfs, [facts["one_mib_file"]["path"], *facts["workload_files"]])
    results["local_workload"] = timed_reads(proxy, rootfs, facts["workload_files"], {}) if expected else {}
    guarded(results, "whole", lambda: whole_phase(proxy, work))
    guarded(results, "lazy_mount", lambda: lazy_mount_phase(proxy, work, facts, expected))
    guarded(results, "lazy_workload", lambda: lazy_workload_phase(proxy, work, facts, expected))
    guarded(results, "landmark", lambda: landmark_phase(proxy, work, facts, expected))
    guarded(results, "big", lambda: big_phase(proxy, work, results["extra"]["big"]))
    guarded(results, "flatness", lambda: flatness_phase(proxy, work))


# ---------------------------------------------------------------- report


def get(results: dict[str, Any], path: str) -> Any:
    """results["a"]["b"]... for path "a.b..."; None where something is missing."""
    value: Any = results
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def rows(r: dict[str, Any]) -> list[TableRow]:
    image, extra = r["image"], r["extra"]
    esgz, small = image["esgz_layer_bytes"], extra["small"]
    one = image["one_mib_file"]
    m = float(MIB)
    return [
        ("image layer blobs: eStargz vs gzip (MiB)", esgz, image["gzip_layer_bytes"], m, "x"),
        ("ready: lazy eStargz `--prefetch none` vs skopeo + umoci (s)", get(r, "lazy_mount.mount.ready_seconds"),
         get(r, "reference.ready_seconds"), 1.0, "x"),
        ("ready: gzip whole-layer path vs skopeo + umoci (s)", get(r, "whole.mount.ready_seconds"),
         get(r, "reference.ready_seconds"), 1.0, "x"),
        ("served at mount: lazy vs skopeo (MiB)", get(r, "lazy_mount.mount.served_bytes"),
         get(r, "reference.served_bytes"), m, "x"),
        ("served at mount: whole-layer vs skopeo (MiB)", get(r, "whole.mount.served_bytes"),
         get(r, "reference.served_bytes"), m, "x"),
        ("served at mount: lazy, of the eStargz blobs (MiB)", get(r, "lazy_mount.mount.served_bytes"), esgz, m, "%"),
        (f"read 1 file ({one['size'] / MIB:.2f} MiB), fresh lazy mount: served (MiB)",
         get(r, "lazy_mount.one_file.served_bytes"), esgz, m, "%"),
        ("  the same: time (s)", get(r, "lazy_mount.one_file.seconds"), None, 1.0, ""),
        (f"{WORKLOAD_FILES} prioritized files ({image['workload_bytes'] / MIB:.2f} MiB), fresh lazy: served (MiB)",
         get(r, "lazy_workload.workload.served_bytes"), esgz, m, "%"),
        ("  the same: time (s), vs the umoci rootfs", get(r, "lazy_workload.workload.seconds"),
         get(r, "local_workload.seconds"), 1.0, "x"),
        ("landmark prefetch: served after the TOCs until settled (MiB), vs the files' size", prefetch_bytes(r),
         image["workload_bytes"], m, "x"),
        ("  settled after (s)", get(r, "landmark.prefetch.settle_seconds"), None, 1.0, ""),
        (f"{WORKLOAD_FILES} files after landmark prefetch: served (MiB)", get(r, "landmark.workload.served_bytes"),
         esgz, m, "%"),
        ("  the same: time (s), vs `--prefetch none`", get(r, "landmark.workload.seconds"),
         get(r, "lazy_workload.workload.seconds"), 1.0, "x"),
        (f"big file ({extra['big']['size'] / MIB:.0f} MiB) cold read: served (MiB), vs its blob",
         get(r, "big.cold.served_bytes"), extra["big"]["layer_bytes"], m, "x"),
        ("  cold read (MiB/s)", get(r, "big.cold.mib_per_second"), None, 1.0, ""),
        ("  second read, same mount (server's memory cache), caches dropped (MiB/s), vs cold",
         get(r, "big.again.mib_per_second"),
         get(r, "big.cold.mib_per_second"), 1.0, "x"),
        ("  read on a new mount, chunk disk cache (MiB/s), vs cold", get(r, "big.remount.disk_cache.mib_per_second"),
         get(r, "big.cold.mib_per_second"), 1.0, "x"),
        ("  served on that new mount, mount + read (MiB)", served_sum(r, "big.remount"), None, m, ""),
        (f"flatness: lazy ready, {r['args']['size_mb']} MB / {r['args']['files']} files vs "
         f"{small['size_mb']} MB / {small['files']} files (s, median of {FLAT_REPEATS})",
         get(r, "flatness.full_ready_seconds"), get(r, "flatness.small_ready_seconds"), 1.0, "x"),
    ]  # fmt: skip


def prefetch_bytes(r: dict[str, Any]) -> int | None:
    """Bytes the landmark mount was served from its start until settled, less what the `--prefetch none`
    mount of the same image was served (footers and TOCs)."""
    total, tocs = get(r, "landmark.prefetch.served_bytes"), get(r, "lazy_mount.mount.served_bytes")
    return total - tocs if isinstance(total, int) and isinstance(tocs, int) else None


def served_sum(r: dict[str, Any], path: str) -> int | None:
    parts = [get(r, f"{path}.mount.served_bytes"), get(r, f"{path}.disk_cache.served_bytes")]
    return sum(parts) if all(isinstance(p, int) for p in parts) else None  # type: ignore[arg-type]


def cell_ratio(value: Any, reference: Any, kind: str) -> str:
    if kind == "x":
        return ratio(value, reference)
    if kind == "%" and isinstance(value, int | float) and isinstance(reference, int | float) and reference:
        return f"{100 * value / reference:.3f}%"
    return ""


def table(results: dict[str, Any]) -> str:
    lines = ["| metric | value | reference | ratio |", "| --- | ---: | ---: | ---: |"]
    for label, value, reference, scale, kind in rows(results):
        digits = 3 if scale == float(MIB) else 2
        ref = fmt(reference, scale, digits) if reference is not None else ""
        lines.append(f"| {label} | {fmt(value, scale, digits)} | {ref} | {cell_ratio(value, reference, kind)} |")
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    image = r["image"]
    lines = [
        f"image: {image['files']} files, {image['layers']} layers; gzip layers {image['gzip_layer_bytes'] / MIB:.1f} "
        f"MiB, eStargz {image['esgz_layer_bytes'] / MIB:.1f} MiB (convert {image['convert_seconds']:.1f} s, "
        f"big file's {r['extra']['big']['convert_seconds']:.1f} s); caches dropped: {r['caches_dropped']}; "
        f"crfs-merge code: {r['crfs_code']}",
        f"1 MiB file: {image['one_mib_file']['path']}; workload: {', '.join(image['workload_files'])}",
        f"requests at lazy mount: {get(r, 'lazy_mount.mount.requests')}; for the 1 file: "
        f"{get(r, 'lazy_mount.one_file.requests')}; for the workload: {get(r, 'lazy_workload.workload.requests')}",
    ]
    counts = {k: get(r, f"{k}.find_entries") for k in ("reference", "whole", "lazy_mount")}
    ok = set(counts.values()) == {image["expected_entries"]}
    lines.append(f"`find | wc -l`: {counts}, expected {image['expected_entries']}: {'OK' if ok else 'MISMATCH'}")
    lines += problems(r)
    return "\n".join(lines)


def problems(r: dict[str, Any]) -> list[str]:
    found = [f"{name}: ERROR {r[name]['error']}" for name in PHASES if "error" in r.get(name, {})]
    for path in ("lazy_mount.one_file", "lazy_workload.workload", "landmark.workload"):
        if get(r, f"{path}.wrong_content"):
            found.append(f"{path}: WRONG CONTENT {get(r, f'{path}.wrong_content')}")
    if get(r, "big.remount.sha256_ok") is False:
        found.append("big file: WRONG CONTENT")
    if get(r, "lazy_mount.find_served_bytes"):
        found.append(f"lazy `find` was served {get(r, 'lazy_mount.find_served_bytes')} bytes")
    if not r.get("local_workload"):
        found.append("no umoci rootfs: contents not checked")
    return found or ["contents checked against the umoci rootfs: OK"]


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mb", type=int, default=200, help="target size of the gzip blobs (and the big file, MiB)"
    )
    parser.add_argument("--files", type=int, default=10_000, help="regular files over all layers")
    common_options(parser, keep_help="keep the images, registry storage, caches and rootfs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    for d in (work / "registry", work / "mnt", work / "reference", work / "caches"):
        d.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "args": {"size_mb": args.size_mb, "files": args.files, "seed": args.seed},
        "workdir": str(work),
        "caches_dropped": drop_caches(),
        "crfs_code": crfs_code(),
    }
    registry = Registry(work / "registry")
    try:
        results["image"] = prepare_main(args, work, registry)
        results["extra"] = prepare_extra(args, work, registry)
        with counting_proxy(registry) as proxy:
            try:
                measure(proxy, work, results)
            finally:
                unmount(work / "mnt")
    finally:
        registry.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = ("image", "esgz", "big-src", "big", "small-src", "small", "registry", "caches", "mnt", "reference")
    return run_benchmark(args, "crfs-bench-lazy-", scratch, run, (table, summary), PHASES)


if __name__ == "__main__":
    sys.exit(main())
