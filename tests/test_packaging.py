"""The installed package is the whole checkout: `pip install .` (README's "Try it") must carry
every subpackage, or a command that imports one fails only for users, never in an editable CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("registry", "whiteout", "unionfs")


def _packages(root: Path) -> set[str]:
    return {str(init.parent.relative_to(root)) for top in TOP_LEVEL for init in (root / top).rglob("__init__.py")}


def test_a_plain_install_carries_every_subpackage(tmp_path: Path) -> None:
    # From a copy: setuptools reuses a checkout's build/ directory, which may hold old files.
    source, target = tmp_path / "source", tmp_path / "site"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")
    shutil.copytree(REPO, source, ignore=junk)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir", "--target",
                    str(target), str(source)], check=True, capture_output=True, timeout=600)  # fmt: skip
    assert _packages(target) == _packages(REPO)
    assert all((target / top / "py.typed").exists() for top in TOP_LEVEL)
