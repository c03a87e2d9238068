"""Measuring, image-building and reporting helpers shared by the benchmark scripts.

bench_local.py and bench_registry.py import this module as `benchmarks.measure`, after
putting the repository root on sys.path; it is not meant to be run by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

MTIME = 1_600_000_000
KIB = 1024
MIB = 1024 * KIB
UNMOUNT_WAIT_SECONDS = 60.0
HWM_SAMPLE_SECONDS = 0.01

# A table row: label, key in each phase's results, divisor for display, whether to show ratios.
Row = tuple[str, str, float, bool]


# ---------------------------------------------------------------- measuring


def drop_caches() -> bool:
    """Drops the page, dentry and inode caches; False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def vm_hwm_kib(pid: int | None) -> int | None:
    """The peak RSS (VmHWM) of process `pid` in KiB; None when it is gone or has no memory map."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def peak_kib(*values: int | None) -> int | None:
    """The largest of `values` that is known, or None."""
    return max((v for v in values if v is not None), default=None)


def run_measured(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, int | None]:
    """Runs `argv` with its output appended to `log`; returns (seconds, exit status, the
    child's peak RSS in KiB, or None if it exited before the first sample).

    The peak is VmHWM sampled every 10 ms, not wait4's ru_maxrss: that also counts the RSS
    this process had when it forked the child (the kernel keeps the pre-exec high-water
    mark). Popen returns only once the child has exec'd, so no sample sees the forked copy.
    """
    with log.open("ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        peak: list[int] = []
        done = threading.Event()
        sampler = threading.Thread(target=_sample_hwm, args=(child.pid, done, peak), daemon=True)
        sampler.start()
        _, status, _ = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, child.returncode, max(peak, default=None)


def _sample_hwm(pid: int, done: threading.Event, peak: list[int]) -> None:
    """Appends VmHWM of `pid` to `peak` every HWM_SAMPLE_SECONDS until `done` is set."""
    while not done.is_set():
        hwm = vm_hwm_kib(pid)
        if hwm is not None:
            peak.append(hwm)
        done.wait(HWM_SAMPLE_SECONDS)


def timed_shell(command: str) -> tuple[float, int, str]:
    """Runs `command` under bash -o pipefail; returns (seconds, exit status, stdout)."""
    started = time.perf_counter()
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done.returncode, done.stdout.strip()


def timed_find(root: Path) -> tuple[float, int | None]:
    """Drops caches, then times `find ROOT | wc -l`; returns (seconds, entries or None on failure)."""
    drop_caches()
    seconds, rc, out = timed_shell(f"find {shlex.quote(str(root))} | wc -l")
    return seconds, int(out) if rc == 0 and out.isdigit() else None


def tail(log: Path) -> str:
    """The last 2000 characters of `log`, for an error message."""
    return log.read_text(errors="replace")[-2000:]


# ---------------------------------------------------------------- crfs-merge server


def server_pid(mountpoint: str) -> int | None:
    """The pid of the crfs-merge server serving `mountpoint`, found by its command line: either a
    fresh interpreter given --ready-fd (as with --creds), or a child forked by the command, which
    keeps the command's own command line (the command itself has exited once the mount is ready)."""
    commands = (b"crfs-merge", b"unionfs.cli")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if mountpoint.encode() in args and (b"--ready-fd" in args or any(a.endswith(commands) for a in args)):
            return int(entry)
    return None


def unmount(mountpoint: Path) -> None:
    """Unmounts `mountpoint` if it is a mount (lazily if fusermount3 fails) and waits up to
    UNMOUNT_WAIT_SECONDS for its crfs-merge server to exit."""
    if not os.path.ismount(mountpoint):
        return
    pid = server_pid(str(mountpoint))
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    deadline = time.monotonic() + UNMOUNT_WAIT_SECONDS
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def measure_server(
    mountpoint: Path, steps: Callable[[], dict[str, Any]], after: Callable[[], object] | None = None
) -> dict[str, Any]:
    """On a ready crfs-merge mount: reads the server's VmHWM, runs `steps` (whose results are
    returned), reads VmHWM again, runs `after` (unmeasured), and unmounts, even on error.

    Adds rss_ready_kib, rss_after_kib and their maximum, peak_rss_kib. The server is a
    long-lived process, so reading its VmHWM at these two points catches its peak.
    """
    pid = server_pid(str(mountpoint))
    hwm_ready = vm_hwm_kib(pid)
    try:
        result = steps()
        hwm_after = vm_hwm_kib(pid)
        result["rss_ready_kib"], result["rss_after_kib"] = hwm_ready, hwm_after
        result["peak_rss_kib"] = peak_kib(hwm_ready, hwm_after)
        if after is not None:
            after()
    finally:
        unmount(mountpoint)
    return result


# ---------------------------------------------------------------- image


def text_pool(rng: random.Random, min_bytes: int) -> bytes:
    """Text-like bytes to cut file contents from: words of a random 3000-word vocabulary,
    space-separated, at least `min_bytes` long (up to one 10,000-word chunk more)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
    words: list[str] = []
    length = 0
    while length < min_bytes:
        chunk = rng.choices(vocab, k=10_000)
        words.extend(chunk)
        length += sum(len(w) + 1 for w in chunk)
    return " ".join(words).encode()


def tar_info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    """A tar header for `name` with the fixed MTIME, so that images are reproducible."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname, info.mtime = kind, mode, size, link, MTIME
    return info


def ancestors(path: str) -> list[str]:
    """The directories above relative `path`, outermost first: "a/b/c" gives ["a", "a/b"]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# ---------------------------------------------------------------- statistics


def spread(values: Iterable[Any]) -> dict[str, float] | None:
    """Median, min, max and count of the numbers among `values`; None if there are none."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The spread of every key over `rounds` (an "error" key aside)."""
    keys = {key for r in rounds for key in r if key != "error"}
    return {key: spread(r.get(key) for r in rounds) for key in sorted(keys)}


# ---------------------------------------------------------------- report


def fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    """`value` divided by `scale` for a table cell; "n/a" for None."""
    if value is None:
        return "n/a"
    if isinstance(value, float) or scale != 1.0:
        return f"{value / scale:.{digits}f}"
    return str(value)


def ratio(a: Any, b: Any) -> str:
    """a / b as "1.23x" (three decimals below 0.1); "n/a" unless both are numbers and b is not 0."""
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "n/a"
    return f"{a / b:.3f}x" if a / b < 0.1 else f"{a / b:.2f}x"


def markdown_table(columns: Sequence[str], rows: Iterable[Row], phases: Sequence[dict[str, Any]]) -> str:
    """A markdown table with one column per phase (named by `columns`, which also names the two
    ratio columns) and one line per row; the ratios are each of the first two phases to the
    third. Values scaled to MiB get three decimals, others two."""
    lines = [f"| metric | {' | '.join(columns)} |", "| --- |" + " ---: |" * len(columns)]
    for label, key, scale, show_ratio in rows:
        a, b, c = (phase.get(key) for phase in phases)
        ratios = (ratio(a, c), ratio(b, c)) if show_ratio else ("", "")
        digits = 3 if scale == float(MIB) else 2
        cells = " | ".join(fmt(v, scale, digits) for v in (a, b, c))
        lines.append(f"| {label} | {cells} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def common_options(parser: argparse.ArgumentParser, keep_help: str) -> None:
    """Adds --seed, --workdir, --json and --keep to `parser`."""
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new directory under /var/tmp")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help=keep_help)


def run_benchmark(
    args: argparse.Namespace,
    prefix: str,
    scratch: Sequence[str],
    run: Callable[[argparse.Namespace, Path], dict[str, Any]],
    report: Sequence[Callable[[dict[str, Any]], str]],
    phases: Sequence[str],
) -> int:
    """Runs `run(args, WORK)` in args.workdir or a new /var/tmp/PREFIX* directory, unmounts
    WORK/mnt, then (unless --keep, and only if nothing is still mounted there) deletes the
    `scratch` subdirectories and a directory it made; prints each of `report` applied to the
    results, separated by blank lines, writes --json, and returns 0 if no phase has an error."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    try:
        results = run(args, work)
    finally:
        unmount(mnt)
        if not args.keep and not os.path.ismount(mnt):
            for name in scratch:
                shutil.rmtree(work / name, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print("\n\n".join(part(results) for part in report))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if all("error" not in results[k] for k in phases) else 1
