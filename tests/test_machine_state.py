"""The suite, run as root on someone's machine, leaves it as it found it: the rootless tests
(a user, /dev/fuse's mode, a venv) undo their setup."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent


def machine_state() -> dict[str, object]:
    """Returns what the rootless tests touch: users, /dev/fuse's mode, /opt, /tmp and /home."""
    return {
        "passwd": Path("/etc/passwd").read_text(),
        "group": Path("/etc/group").read_text(),
        "/dev/fuse": stat.S_IMODE(os.stat("/dev/fuse").st_mode) if os.path.exists("/dev/fuse") else None,
        "/opt": sorted(os.listdir("/opt")) if os.path.isdir("/opt") else [],
        "/home": sorted(os.listdir("/home")) if os.path.isdir("/home") else [],
        "/tmp": sorted(n for n in os.listdir("/tmp") if n.startswith("crfs-rootless")),
    }


def test_the_rootless_tests_leave_the_machine_as_they_found_it() -> None:
    require(os.geteuid() == 0, "the rootless tests change the machine only as root")
    before = machine_state()
    test = "tests/test_rootless.py::test_missing_fusermount3_is_a_clear_error"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert machine_state() == before
