"""The cache as a whole: what it holds, what live mounts use, and pruning it to a size.

Every process that uses the cache (a mount's server, an export, a convert) records the
names of the layers it uses in `CACHE/mounts/live-PID` and holds an flock on that file
for its whole life: a record whose lock can be taken is that of a dead process. Records
are written under a shared lock on `CACHE/mounts/lock`, and a prune reads them and removes
files under the exclusive one, so a mount that starts while a prune runs either is seen by
it or finds the removed files gone (and fetches them again).

A cache file's key is its name up to the first dot (`sha256-HEX` for a layer's blob, tar,
index and TOC; the tree's hash for a merged tree). What a prune removes is chosen by a pure
function over (path, size, last use, in use) rows: never a file in use, the least recently
used first. eStargz chunks are never "in use": they are the registry's bytes, and a live
lazy mount fetches an evicted one again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from registry.cache_files import (
    RESUMABLE_PREFIX,
    has_live_writer,
    is_partial,
    is_resumable,
    remove_if_abandoned,
    sweep_partials,
)
from registry.source import Image

log = logging.getLogger("crfs-merge")
DEFAULT_MAX_BYTES = 20 * 1024**3
MOUNTS = "mounts"
# Directory of the cache -> the kind its files are shown as (partials are a kind of their own).
KINDS = {"blobs": "blobs", "tars": "tars", "index": "indexes", "trees": "trees", "toc": "TOCs", "chunks": "chunks"}
KIND_ORDER = (*KINDS.values(), "partials")
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True, slots=True)
class CacheFile:
    """One file of the cache as a prune sees it."""

    path: str
    kind: str  # one of KIND_ORDER
    size: int
    last_used: float  # seconds since the epoch: the later of its access and modification
    in_use: bool  # by a live mount or writer: never removed


# --- pure ------------------------------------------------------------------------------


def choose_evictions(files: Sequence[CacheFile], max_bytes: int) -> list[CacheFile]:
    """Returns the files to remove to bring the cache to at most `max_bytes`: only files not
    in use, least recently used first, and no more than needed (files in use still count,
    so the bound may stay exceeded)."""
    total = sum(f.size for f in files)
    chosen = []
    for candidate in sorted((f for f in files if not f.in_use), key=lambda f: (f.last_used, f.path)):
        if total <= max_bytes:
            break
        chosen.append(candidate)
        total -= candidate.size
    return chosen


def cache_key(name: str) -> str:
    """Returns the key of a cache file's name: what a live mount's record lists."""
    if name.startswith(RESUMABLE_PREFIX):
        name = name[len(RESUMABLE_PREFIX) :]
    return name.split(".", 1)[0]


def image_keys(image: Image) -> list[str]:
    """Returns the keys of the cache files that mounting `image` uses (its layers')."""
    return [layer.key for layer in image.layers if layer.digest is not None or layer.diff_id is not None]


def parse_size(text: str) -> int:
    """Returns a size given as bytes or with a binary unit (10G, 500M, 1.5GiB, 64k: K, M, G
    and T are powers of 1024, with or without B or iB, as human_size shows them), in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 500M, 10G, 1073741824)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def human_size(size: float) -> str:
    """Returns a size for people, in the binary units that parse_size reads: 0B, 512B,
    1.5KiB, 20.3MiB, 4.1GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TiB"


def usage_table(files: Sequence[CacheFile]) -> str:
    """Returns the usage of the cache by kind, like `podman system df`."""
    lines = [f"{'KIND':<10} {'FILES':>7} {'SIZE':>10} {'IN USE':>10} {'RECLAIMABLE':>12}"]
    for kind in KIND_ORDER:
        of_kind = [f for f in files if f.kind == kind]
        size = sum(f.size for f in of_kind)
        used = sum(f.size for f in of_kind if f.in_use)
        lines.append(f"{kind:<10} {len(of_kind):>7} {human_size(size):>10} {human_size(used):>10} "
                     f"{human_size(size - used):>12}")  # fmt: skip
    total = sum(f.size for f in files)
    used = sum(f.size for f in files if f.in_use)
    lines.append(f"{'total':<10} {len(files):>7} {human_size(total):>10} {human_size(used):>10} "
                 f"{human_size(total - used):>12}")  # fmt: skip
    return "\n".join(lines)


# --- live mounts -----------------------------------------------------------------------


class _Record:
    """This process's record of the cache files it uses, locked for as long as it lives."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"live-{os.getpid()}"
        # Created under the shared lock, which no prune holds meanwhile: no sweep can see it
        # between its creation and its own lock.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.keys: set[str] = set()

    def add(self, keys: Iterable[str]) -> None:
        self.keys.update(keys)
        data = json.dumps(sorted(self.keys)).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


_records: dict[Path, _Record] = {}
_records_lock = threading.Lock()


def note_in_use(cache_dir: Path, keys: Iterable[str]) -> None:
    """Records, for as long as this process lives, that it uses the cache files with these
    keys, so that no prune removes them. Call it before looking for the files."""
    directory = cache_dir / MOUNTS
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _records_lock, _registry_lock(directory, fcntl.LOCK_SH):
            record = _records.get(directory)
            if record is None:
                record = _records[directory] = _Record(directory)
            record.add(keys)
    except OSError as exc:  # a read-only or full cache still mounts; only a prune could miss it
        log.info("cache: cannot record the files this mount uses in %s (%s)", directory, exc.strerror)


@contextlib.contextmanager
def _registry_lock(directory: Path, operation: int) -> Iterator[None]:
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def note_also_in_use(keys: Iterable[str]) -> None:
    """Adds `keys` to the records this process already holds (for cache files named only once
    the layers are ready: a merged tree)."""
    with _records_lock:
        for directory, record in _records.items():
            with contextlib.suppress(OSError), _registry_lock(directory, fcntl.LOCK_SH):
                record.add(keys)


def live_keys(cache_dir: Path, reap: bool = False) -> tuple[set[str], int]:
    """Returns the keys that live processes use, and how many processes; with `reap` (only
    under the exclusive registry lock), removes the records of dead ones."""
    keys: set[str] = set()
    live = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cache_dir / MOUNTS):
            if entry.name.startswith("live-"):
                found = _keys_if_live(Path(entry.path), reap)
                if found is not None:
                    keys.update(found)
                    live += 1
    return keys, live


def _keys_if_live(path: Path, reap: bool) -> list[str] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its process lives
            with contextlib.suppress(ValueError):
                return [str(k) for k in json.loads(path.read_bytes() or b"[]")]
            return []
        if reap:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return None
    finally:
        os.close(fd)


# --- scanning and pruning --------------------------------------------------------------


def scan(cache_dir: Path, reap: bool = False) -> list[CacheFile]:
    """Returns every file of the cache, with whether a live mount or writer uses it (`reap`:
    see live_keys)."""
    in_use, _ = live_keys(cache_dir, reap)
    files = []
    for directory, kind in KINDS.items():
        for path, info in _walk(cache_dir / directory):
            name = os.path.basename(path)
            if name.endswith(".lock"):
                continue  # a lock belongs to whoever may wait on it: never removed
            partial = is_partial(name)
            used = has_live_writer(path) if partial else cache_key(name) in in_use and kind != "chunks"
            files.append(CacheFile(path, "partials" if partial else kind, _size(kind, info),
                                   max(info.st_atime, info.st_mtime), used))  # fmt: skip
    return files


def _size(kind: str, info: os.stat_result) -> int:
    """The bytes a cache file takes: a layer's chunk file is sparse (holes where no chunk was
    read), so its allocated bytes, not its length."""
    return min(info.st_size, info.st_blocks * 512) if kind == "chunks" else info.st_size


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing: by another mount, or its writer


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune removed, and what it had to keep."""

    removed: int
    freed: int
    kept_in_use: int
    remaining: int


def prune(cache_dir: Path, max_bytes: int) -> PruneResult:
    """Removes unused cache files, least recently used first, until the cache holds at most
    `max_bytes` (0: every unused file); returns what it did."""
    directory = cache_dir / MOUNTS
    directory.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:  # what dead writers left goes first
        _log_swept(_sweep_tree(cache_dir / kind))
    with _registry_lock(directory, fcntl.LOCK_EX):
        files = scan(cache_dir, reap=True)
        removed, freed = 0, 0
        for chosen in choose_evictions(files, max_bytes):
            if _remove(chosen):
                removed, freed = removed + 1, freed + chosen.size
    kept = sum(1 for f in files if f.in_use)
    return PruneResult(removed, freed, kept, sum(f.size for f in files) - freed)


def _remove(chosen: CacheFile) -> bool:
    if chosen.kind == "partials":
        return remove_if_abandoned(chosen.path)
    try:
        os.unlink(chosen.path)
        return True
    except FileNotFoundError:
        return False


def tidy(cache_dir: Path, max_bytes: int) -> None:
    """Removes abandoned temporary files, then prunes the cache if it is over `max_bytes`
    (after a mount is ready: a pass over the directories, no lock unless over the bound)."""
    try:
        total = 0
        for kind in KINDS:  # one pass: sweeping and measuring
            for path, info in _walk(cache_dir / kind):
                name = os.path.basename(path)
                if is_partial(name) and not is_resumable(name) and remove_if_abandoned(path):
                    _log_swept([(name, info.st_size)])
                else:
                    total += _size(kind, info)
        if total > max_bytes:
            result = prune(cache_dir, max_bytes)
            log.info("cache: over its %s bound; removed %d unused files (%s)", human_size(max_bytes),
                     result.removed, human_size(result.freed))  # fmt: skip
    except OSError as exc:  # tidying is a courtesy: it must never cost the mount
        log.warning("cache: could not tidy %s: %s", cache_dir, exc)


def _log_swept(removed: Iterable[tuple[str, int]]) -> None:
    for name, size in removed:
        log.info("cache: removed %s (%d bytes), which an interrupted writer left", name, size)


def _sweep_tree(root: Path) -> Iterator[tuple[str, int]]:
    stack = [root]
    while stack:
        directory = stack.pop()
        yield from sweep_partials(directory)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            stack.extend(Path(e.path) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False))


def tidy_in_background(cache_dir: Path, max_bytes: int) -> None:
    """Starts `tidy` on a daemon thread (it may be cut short at exit: every step is whole)."""
    threading.Thread(target=tidy, args=(cache_dir, max_bytes), name="cache-tidy", daemon=True).start()


def describe_prune(result: PruneResult) -> str:
    """Returns the one line `crfs-merge cache prune` prints."""
    kept = f"; kept {result.kept_in_use} files in use by live mounts" if result.kept_in_use else ""
    return (f"removed {result.removed} files, {human_size(result.freed)}{kept}; "
            f"the cache now holds {human_size(result.remaining)}")  # fmt: skip
