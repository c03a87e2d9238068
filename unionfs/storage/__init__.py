"""What crfs-merge keeps on disk: layers turned into indexed tars, sealed index and tree
files, the eStargz chunk cache, and the cache's bounds and pruning."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Returns $XDG_CACHE_HOME/crfs-merge, or ~/.cache/crfs-merge."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crfs-merge"
