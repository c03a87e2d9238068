"""How a mount's server starts: what it imports side by side (unionfs/cli.py, _serve)."""

from __future__ import annotations

import json
import subprocess
import sys

from unionfs import cli

# The interpreter as the command leaves it at the fork (its own imports and the preflight's
# libfuse lookup), plus the modules cli loads before the two imports start; then the modules
# given load, and the names of those that were new are printed.
NEW_MODULES = """
import importlib, json, sys
import unionfs.cli as cli
from unionfs.fuse import libfuse
libfuse.locate()
for name in cli.SHARED_IMPORTS:
    importlib.import_module(name)
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def new_modules(*names: str) -> set[str]:
    run = subprocess.run([sys.executable, "-c", NEW_MODULES, *names], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    return set(json.loads(run.stdout))


def test_the_mount_modules_and_aiohttp_load_side_by_side_with_no_module_in_common() -> None:
    """The server imports aiohttp on a thread while its main thread imports the mount's own
    modules: a module both load would have one thread wait on the other's import lock, and
    two in a circular import could hand one of them a half-made module."""
    registry_client = new_modules("aiohttp")
    mount = new_modules(*cli.MOUNT_MODULES)
    assert "aiohttp.connector" in registry_client and "unionfs.tree" in mount  # both sides did load
    assert registry_client & mount == set()
