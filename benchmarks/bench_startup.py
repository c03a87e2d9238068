"""Start-up: how soon a registry image's lazy mount is ready, against the interpreter's own start.

Builds the README's two-layer seed image (examples/build_seed_image.py), converts it to eStargz
with `crfs-merge convert` and pushes it to a local docker-registry. Then, in rounds (the order
rotating), with the modules precompiled as an installed package has them:

- `python3 -c pass`: the floor every Python command pays;
- a lazy mount (`--prefetch none`) from an empty cache directory;
- a second mount with that cache, `--pull missing` (the default): the reference's record and the
  saved tree, no registry asked before ready;
- the same with `--pull always`: the manifest and config asked for again.

`--also REF` (repeatable) adds the warm mounts of images already served by another registry,
e.g. bench_overlay's 200k-file image kept with --keep (its first mount fills the cache, untimed).
Each time is from the command's start to its exit (it exits once the mount is ready). Prints
medians (min-max) and each against `python3 -c pass`; --json PATH writes the results.

    sudo python3 benchmarks/bench_startup.py --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_registry import crfs_code, crfs_env, keep_bytecode  # noqa: E402
from benchmarks.measure import common_options, run_benchmark, unmount  # noqa: E402
from tests.registry_servers import Registry, skopeo_copy  # noqa: E402

CRFS = [sys.executable, "-m", "unionfs.cli"]
SEED = "bench/seed:esgz"


def timed(argv: list[str]) -> float:
    """Seconds from the start of `argv` to its exit; raises if it fails."""
    started = time.perf_counter()
    run = subprocess.run(argv, env=crfs_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {run.returncode}: {run.stderr[-2000:]}")
    return seconds


def mount_seconds(image: str, cache: Path, mnt: Path, *options: str) -> float:
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        return timed([*CRFS, "--cache-dir", str(cache), "--tls-verify", "false", "--prefetch", "none", *options,
                      image, str(mnt)])  # fmt: skip
    finally:
        unmount(mnt)


def publish_seed(work: Path) -> tuple[Registry, str]:
    """The seed image, eStargz, in a new loopback registry; returns it and the image's reference."""
    layout, converted = work / "seed", work / "seed-esgz"
    subprocess.run([sys.executable, str(REPO_ROOT / "examples/build_seed_image.py"), str(layout)], check=True,
                   capture_output=True, env=crfs_env())  # fmt: skip
    subprocess.run([*CRFS, "convert", "--cache-dir", str(work / "convert-cache"), f"oci:{layout}",
                    f"oci:{converted}:esgz"], check=True, capture_output=True, env=crfs_env())  # fmt: skip
    (work / "registry").mkdir(exist_ok=True)
    registry = Registry(work / "registry")
    skopeo_copy(f"oci:{converted}:esgz", f"docker://{registry.host}/{SEED}")
    return registry, f"{registry.host}/{SEED}"


def one_round(number: int, seed: str, also: list[str], work: Path) -> dict[str, float]:
    """Every measurement once, in an order that rotates with `number`."""
    fresh, warm, mnt = work / "caches" / f"seed-{number}", work / "caches/seed", work / "mnt"
    steps: list[tuple[str, Any]] = [
        ("python3 -c pass", lambda: timed([sys.executable, "-c", "pass"])),
        ("seed: empty cache", lambda: mount_seconds(seed, fresh, mnt)),
        ("seed: warm, --pull missing", lambda: mount_seconds(seed, warm, mnt)),
        ("seed: warm, --pull always", lambda: mount_seconds(seed, warm, mnt, "--pull", "always")),
    ]
    for k, image in enumerate(also):
        cache = work / "caches" / f"also-{k}"
        steps.append((f"{image}: warm, --pull missing", lambda i=image, c=cache: mount_seconds(i, c, work / "mnt")))
        steps.append((f"{image}: warm, --pull always",
                      lambda i=image, c=cache: mount_seconds(i, c, work / "mnt", "--pull", "always")))  # fmt: skip
    shift = number % len(steps)
    return {name: measure() for name, measure in steps[shift:] + steps[:shift]}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"args": {"repeat": args.repeat, "also": args.also}, "workdir": str(work),
                               "crfs_code": crfs_code(), "bytecode": keep_bytecode(work)}  # fmt: skip
    registry, seed = publish_seed(work)
    try:
        mount_seconds(seed, work / "caches/seed", work / "mnt")  # the warm mounts' cache
        for k, image in enumerate(args.also):
            mount_seconds(image, work / "caches" / f"also-{k}", work / "mnt")
        rounds = [one_round(n, seed, args.also, work) for n in range(args.repeat)]
    finally:
        registry.stop()
    results["seconds"] = {name: [r[name] for r in rounds] for name in rounds[0]}
    return results


def table(results: dict[str, Any]) -> str:
    samples: dict[str, list[float]] = results["seconds"]
    floor = statistics.median(samples["python3 -c pass"])
    lines = [f"| ready (s), median of {len(samples['python3 -c pass'])} (min-max) | s | vs `python3 -c pass` |",
             "| --- | ---: | ---: |"]  # fmt: skip
    for name, values in samples.items():
        middle = statistics.median(values)
        lines.append(f"| {name} | {middle:.3f} ({min(values):.3f}-{max(values):.3f}) | {middle / floor:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="rounds; medians are reported")
    parser.add_argument("--also", action="append", default=[], metavar="REF",
                        help="another registry image to time warm mounts of (plain HTTP allowed)")  # fmt: skip
    common_options(parser, keep_help="keep the images, registry storage and caches")
    args = parser.parse_args(argv)
    scratch = ("seed", "seed-esgz", "convert-cache", "registry", "caches", "pycache", "mnt")
    return run_benchmark(args, "crfs-bench-startup-", scratch, run, (table,), [])


if __name__ == "__main__":
    sys.exit(main())
