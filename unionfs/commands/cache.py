"""`crfs-merge cache [prune ...]`: what the cache holds, by kind and by what live mounts use,
and pruning it (never a file a live mount uses). The rules live in unionfs/storage/cache_admin.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unionfs.storage.cache_admin import describe_prune, live_keys, parse_size, prune, scan, usage_table


def command(argv: list[str]) -> int:
    """Runs `crfs-merge cache [prune ...]`; returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="crfs-merge cache",
        description="Show what the cache holds (by kind, and what live mounts use), or prune it. "
        "prune never removes a file that a live mount uses.",
    )
    parser.add_argument("action", nargs="?", choices=["prune"], help="remove unused files")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $XDG_CACHE_HOME/crfs-merge")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--max-size", type=size_argument, metavar="SIZE",
                       help="prune: least recently used first, down to SIZE (e.g. 5G)")  # fmt: skip
    bound.add_argument("--all", action="store_true", help="prune: every file no live mount uses")
    args = parser.parse_args(argv)
    if args.action is None and (args.max_size is not None or args.all):
        parser.error("--max-size and --all are options of prune: crfs-merge cache prune --all")
    if args.action == "prune" and args.max_size is None and not args.all:
        parser.error("prune needs --max-size SIZE or --all")
    cache_dir = args.cache_dir or _default_cache_dir()
    if args.cache_dir is not None and not cache_dir.is_dir():
        print(f"crfs-merge: {cache_dir}: no such cache directory", file=sys.stderr)
        return 2
    try:
        if args.action == "prune":
            print(describe_prune(prune(cache_dir, 0 if args.all else args.max_size)))
            return 0
        files = scan(cache_dir)
        _, mounts = live_keys(cache_dir)
    except OSError as exc:  # a cache of another user's, or on a read-only file system
        print(f"crfs-merge: {exc}", file=sys.stderr)
        return 1
    print(f"cache {cache_dir}, used by {mounts} live mount{'' if mounts == 1 else 's'}")
    print(usage_table(files))
    return 0


def size_argument(text: str) -> int:
    """Parses a SIZE argument (500M, 10G, bytes) for argparse."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_cache_dir() -> Path:
    from unionfs.storage import default_cache_dir

    return default_cache_dir()
