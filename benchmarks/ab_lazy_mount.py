"""A first lazy mount (empty cache) of one registry image by two checkouts, alternated: how
long until the mount is ready, and the server's peak RSS (VmHWM) then.

    sudo python3 benchmarks/ab_lazy_mount.py 127.0.0.1:PORT/bench-esgz:bench /work/main . --rounds 3

Each round mounts with each checkout in turn (its root first on PYTHONPATH), a fresh cache
directory each time, `--prefetch none`; prints one line per mount with the load average, then
the range per checkout. Needs FUSE (root, or fusermount3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.measure import server_pid, unmount, vm_hwm_kib


def mount_once(image: str, checkout: Path, work: Path) -> tuple[float, int | None]:
    """Seconds until the mount of `image` by `checkout` is ready, and its server's VmHWM (KiB)."""
    cache, mountpoint = Path(tempfile.mkdtemp(dir=work)), Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    argv = [sys.executable, "-m", "unionfs.cli", "--cache-dir", str(cache), "--prefetch", "none", image,
            str(mountpoint)]  # fmt: skip
    started = time.monotonic()
    # Run from the checkout: `python3 -m` puts the working directory ahead of PYTHONPATH.
    subprocess.run(argv, env=env, cwd=checkout, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = time.monotonic() - started
    hwm = vm_hwm_kib(server_pid(str(mountpoint)))
    unmount(mountpoint)
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    mountpoint.rmdir()
    return ready, hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("checkouts", nargs=2, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    results: dict[Path, list[tuple[float, int | None]]] = {c: [] for c in args.checkouts}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for round_number in range(args.rounds):
            for checkout in args.checkouts if round_number % 2 == 0 else reversed(args.checkouts):
                ready, hwm = mount_once(args.image, checkout, Path(work))
                results[checkout].append((ready, hwm))
                load = os.getloadavg()[0]
                print(f"round {round_number} {checkout}: ready {ready:.2f} s, VmHWM {(hwm or 0) / 1024:.0f} MiB, "
                      f"load {load:.2f}", flush=True)  # fmt: skip
    for checkout, rows in results.items():
        times = [t for t, _ in rows]
        hwms = [h / 1024 for _, h in rows if h is not None]
        print(f"{checkout}: ready {min(times):.2f}-{max(times):.2f} s, VmHWM {min(hwms, default=0):.0f}-"
              f"{max(hwms, default=0):.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
