"""podman for the tests and benchmarks: a private storage (vfs), configuration and run
directory, so that it leaves nothing behind but its directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SHORT_WRITE_TRIES = 3


class Podman:
    """podman with its own storage (vfs), configuration and run directory under `root`, so
    that it touches nothing of the machine's own containers (but the blob-info cache that
    containers/image keeps in /var/lib/containers/cache, as skopeo does)."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n')
        (root / "containers.conf").write_text(f'[engine]\ntmp_dir = "{root}/tmp"\nevents_logger = "none"\n')
        (root / "registries.conf").write_text("")
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
                    "CONTAINERS_CONF": str(root / "containers.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf")}  # fmt: skip

    def __call__(self, *args: str) -> str:
        for _ in range(SHORT_WRITE_TRIES):
            run = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=900)
            # podman 4.3's zstd:chunked writer now and then fails a push with "short write"
            # (its bug, not the image's); the same push then goes through.
            if not (run.returncode and args[:1] == ("push",) and "short write" in run.stderr):
                break
        assert run.returncode == 0, f"podman {' '.join(args)}: {run.stderr}"
        return run.stdout.strip()
