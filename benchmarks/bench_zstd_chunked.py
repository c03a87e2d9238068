"""Benchmark lazy zstd:chunked mounts against `podman pull` of the same image.

podman (a private storage under the work directory: tests/podman.py) imports the Debian
bookworm minbase tar of bench_overlay (debootstrapped once and cached in
~/.cache/crfs-merge-bench; run `python3 benchmarks/bench_overlay.py` first if it is not
there), pushes it as zstd:chunked to a loopback docker-registry, and, through a counting
proxy (tests.registry_servers.FaultProxy), with caches dropped before each step:

- crfs-merge mounts it lazily (`--prefetch none`, a fresh --cache-dir): seconds until the
  mount is ready and bytes served by then;
- on that mount: bytes served to read one file of about 1 MiB, then seconds and bytes of a
  `tar` of the whole tree (every file read lazily);
- the reference: `podman pull` of the same image into a fresh storage (podman 4.3 pulls
  zstd:chunked whole), seconds and bytes.

Prints a markdown table and the ratios; --json PATH writes the results.

    python3 benchmarks/bench_zstd_chunked.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_registry import counting_proxy, crfs_env  # noqa: E402
from benchmarks.measure import drop_caches, run_measured, server_pid, tail, timed_shell, unmount, vm_hwm_kib  # noqa: E402
from tests.podman import Podman  # noqa: E402
from tests.registry_servers import FaultProxy, Registry  # noqa: E402

DEBIAN_TAR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crfs-merge-bench" / \
    "debian-bookworm-minbase-amd64.tar"  # fmt: skip
REPOSITORY = "bench/debian"
MIB = 1024 * 1024


def one_file_of_about_a_mib(tar: Path) -> str:
    """The regular file of the tar whose size is nearest 1 MiB."""
    with tarfile.open(tar) as archive:
        files = [m for m in archive if m.isreg()]
    return min(files, key=lambda m: abs(m.size - MIB)).name.lstrip("./")


def without_record_padding(tar: Path, out: Path) -> Path:
    """Writes `tar` ending at its end-of-archive blocks, as Go's archive/tar (and so buildah)
    writes layers: podman 4.3's zstd:chunked writer fails on the Debian tar with its record
    padding ("short write": its compressor stops at the end-of-archive and refuses the
    padding written after it)."""
    data = tar.read_bytes()
    content_end = -(-len(data.rstrip(b"\0")) // 512) * 512
    out.write_bytes(data[: content_end + 1024])
    return out


def lazy_phase(proxy: FaultProxy, work: Path, probe: str) -> dict[str, Any]:
    mountpoint, log = work / "mnt", work / "crfs.log"
    mountpoint.mkdir(exist_ok=True)
    drop_caches()
    proxy.served_bytes = 0
    argv = ["crfs-merge", "--cache-dir", str(work / "cache"), "--prefetch", "none", f"{proxy.host}/{REPOSITORY}:zc",
            str(mountpoint)]  # fmt: skip
    seconds, rc, _ = run_measured(argv, log, crfs_env())
    if rc != 0:
        raise RuntimeError(f"crfs-merge exited {rc}: {tail(log)}")
    result: dict[str, Any] = {"ready_seconds": seconds, "ready_bytes": proxy.served_bytes}
    try:
        before = proxy.served_bytes
        size = (mountpoint / probe).stat().st_size
        (mountpoint / probe).read_bytes()
        result.update(probe=probe, probe_size=size, probe_bytes=proxy.served_bytes - before)
        drop_caches()
        before = proxy.served_bytes
        tar_seconds, tar_rc, out = timed_shell(f"tar -C {mountpoint} -cf - . | wc -c")
        peak = vm_hwm_kib(server_pid(str(mountpoint)))
        result.update(tar_seconds=tar_seconds, tar_rc=tar_rc, tar_size=int(out or 0), peak_rss_kib=peak,
                      tar_bytes=proxy.served_bytes - before, tar_requests=proxy.requests["range"])  # fmt: skip
    finally:
        unmount(mountpoint)
    return result


def podman_phase(proxy: FaultProxy, work: Path) -> dict[str, Any]:
    puller = Podman(work / "puller")
    drop_caches()
    proxy.served_bytes = 0
    started = time.perf_counter()
    puller("pull", "--quiet", "--tls-verify=false", f"{proxy.host}/{REPOSITORY}:zc")
    return {"pull_seconds": time.perf_counter() - started, "pull_bytes": proxy.served_bytes}


def run(work: Path) -> dict[str, Any]:
    if not DEBIAN_TAR.exists():
        raise SystemExit(f"{DEBIAN_TAR} is missing: run python3 benchmarks/bench_overlay.py once to make it")
    (work / "registry").mkdir()
    registry = Registry(work / "registry")
    try:
        builder = Podman(work / "builder")
        builder("import", str(without_record_padding(DEBIAN_TAR, work / "debian.tar")), "localhost/debian:bench")
        builder("push", "--tls-verify=false", "--compression-format", "zstd:chunked", "localhost/debian:bench",
                f"docker://{registry.host}/{REPOSITORY}:zc")  # fmt: skip
        blob_dir = work / "registry" / "storage"
        image_bytes = sum(p.stat().st_size for p in blob_dir.rglob("data"))  # the blobs: layer, config, manifest
        with counting_proxy(registry) as proxy:
            results = {"image_bytes": image_bytes, "source_tar_bytes": DEBIAN_TAR.stat().st_size,
                       **lazy_phase(proxy, work, one_file_of_about_a_mib(DEBIAN_TAR)),
                       **podman_phase(proxy, work)}  # fmt: skip
    finally:
        registry.stop()
    return results


def report(r: dict[str, Any]) -> str:
    rows = [
        ("lazy mount ready", f"{r['ready_seconds']:.2f} s", f"{r['ready_bytes'] / 1e6:.2f} MB"),
        (f"read {r['probe']} ({r['probe_size'] / MIB:.2f} MiB)", "", f"{r['probe_bytes'] / 1e6:.2f} MB"),
        ("lazy `tar` of the whole tree", f"{r['tar_seconds']:.2f} s",
         f"{r['tar_bytes'] / 1e6:.1f} MB in {r['tar_requests']} ranges"),
        ("`podman pull` (reference)", f"{r['pull_seconds']:.2f} s", f"{r['pull_bytes'] / 1e6:.1f} MB"),
    ]
    lines = ["| step | time | served |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    lines.append(f"\nimage: {r['image_bytes'] / 1e6:.1f} MB in the registry "
                 f"(tar {r['source_tar_bytes'] / 1e6:.1f} MB); "
                 f"ready in {r['ready_seconds'] / r['pull_seconds']:.3f} of podman pull's time, after "
                 f"{r['ready_bytes'] / r['pull_bytes']:.4f} of its bytes; lazy tar / podman pull: "
                 f"{r['tar_seconds'] / r['pull_seconds']:.2f}x the time")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="crfs-bench-zstd-chunked-"))
    try:
        results = run(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
