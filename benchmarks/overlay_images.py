"""The `debian` and `large` images of bench_overlay.py, written as OCI layouts.

- debian: a Debian minbase root filesystem from `debootstrap` as the base layer (its tar cached
  under --build-cache, so a rerun does not debootstrap again), then three layers made the way
  `docker build` makes them: each is the difference of the tree before and after one step,
  computed here by walking both (whiteouts for what went, an opaque directory for one that was
  removed and made again);
- large: three big files (200, 350 and 500 MB; seeded, half random and half text) and a small tree.

bench_overlay.py imports this module as `benchmarks.overlay_images`; it is not meant to be run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import KIB, MIB, MTIME, ancestors, tar_info, text_pool
from registry.layout_writer import LAYER_MEDIA_TYPES, write_manifest
from registry.manifest import Platform
from registry.media_types import Compression

SUITE, VARIANT, MIRROR = "bookworm", "minbase", "http://deb.debian.org/debian"
# Left out of the base layer, as in Docker's own Debian images: the container runtime fills them.
RUNTIME_DIRS = ("dev", "proc", "sys")
APP_FILES = 300
LARGE_FILE_MB = (200, 350, 500)
LARGE_SMALL_FILES = 400
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
COPY_BLOCK = MIB


# ---------------------------------------------------------------- blobs


class BlobWriter(io.RawIOBase):
    """A tar stream written into a layout as a gzip layer blob: it hashes the tar (the diff_id)
    and the gzip (the blob digest) as it goes, so a layer of any size is never held in memory."""

    def __init__(self, layout: Path) -> None:
        super().__init__()
        self.blobs = layout / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial = self.blobs / f".partial-{os.getpid()}"
        self.out = self.partial.open("wb")
        # wbits 31: a gzip wrapper with mtime 0, so the same tar gives the same blob.
        self.zip = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.tar_hash, self.blob_hash = hashlib.sha256(), hashlib.sha256()
        self.tar_bytes = self.blob_bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.tar_hash.update(chunk)
        self.tar_bytes += len(chunk)
        self._emit(self.zip.compress(chunk))
        return len(chunk)

    def _emit(self, packed: bytes) -> None:
        self.blob_hash.update(packed)
        self.blob_bytes += len(packed)
        self.out.write(packed)

    def finish(self) -> tuple[dict[str, object], str]:
        """Closes the blob; returns its descriptor and the layer's diff_id."""
        self._emit(self.zip.flush())
        self.out.close()
        digest = self.blob_hash.hexdigest()
        self.partial.rename(self.blobs / digest)
        descriptor = {"mediaType": LAYER_MEDIA_TYPES[Compression.GZIP], "digest": f"sha256:{digest}",
                      "size": self.blob_bytes}  # fmt: skip
        return descriptor, f"sha256:{self.tar_hash.hexdigest()}"


@contextlib.contextmanager
def layer_tar(layout: Path, layers: list[tuple[dict[str, object], str]]) -> Iterator[tarfile.TarFile]:
    """Yields a tar stream that becomes the next gzip layer of `layout`, appended to `layers`."""
    writer = BlobWriter(layout)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        yield tar
    layers.append(writer.finish())


def blob_from_tar(layout: Path, tar_path: Path, layers: list[tuple[dict[str, object], str]]) -> None:
    """Adds the tar file `tar_path`, gzipped, as the next layer of `layout`."""
    writer = BlobWriter(layout)
    with tar_path.open("rb") as source:
        while block := source.read(COPY_BLOCK):
            writer.write(block)
    layers.append(writer.finish())


def finish_layout(layout: Path, layers: list[tuple[dict[str, object], str]], tag: str) -> dict[str, Any]:
    """Writes the config and manifest of `layers` (bottom first) under `tag`; returns blob facts."""
    platform = Platform.host()
    config = {"architecture": platform.architecture, "os": platform.os, "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]}}  # fmt: skip
    write_manifest(layout, [d for d, _ in layers], json.dumps(config, sort_keys=True).encode(), tag, platform)
    sizes = [int(str(d["size"])) for d, _ in layers]
    return {"layers": len(layers), "blob_bytes": sum(sizes), "layer_blob_bytes": sizes}


# ---------------------------------------------------------------- deterministic tars of a tree


def add_path(tar: tarfile.TarFile, root: Path, rel: str) -> None:
    """Adds ROOT/rel to `tar` with numeric owners and the mtime clamped to MTIME (as
    SOURCE_DATE_EPOCH does), so a tree gives the same tar whenever it was made. tarfile itself
    turns a second name of an inode already in this tar into a hardlink to the first."""
    path = root / rel
    info = tar.gettarinfo(str(path), arcname=rel)
    if info is None:  # a socket: tar has no type for it
        return
    info.uname = info.gname = ""
    info.mtime = min(int(info.mtime), MTIME)
    if info.isreg():
        with path.open("rb") as data:
            tar.addfile(info, data)
    else:
        tar.addfile(info)


def add_marker(tar: tarfile.TarFile, rel: str) -> None:
    """An empty whiteout or opaque marker file."""
    tar.addfile(tar_info(rel, tarfile.REGTYPE, 0o644))


def tree_paths(root: Path) -> list[str]:
    """Every path under `root`, relative and sorted (a directory before its contents), the
    contents of RUNTIME_DIRS left out."""
    found: list[str] = []
    for parent, dirs, files in os.walk(root):
        rel = os.path.relpath(parent, root)
        if rel in RUNTIME_DIRS:
            dirs.clear()
            continue
        found += [name if rel == "." else f"{rel}/{name}" for name in dirs + files]
    return sorted(found)


# ---------------------------------------------------------------- debian base


def arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def debian_base(cache: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """The cached base layer tar (debootstrapping it first if it is not cached); returns it and facts."""
    name = f"debian-{SUITE}-{VARIANT}-{arch()}"
    tar_path, meta_path = cache / f"{name}.tar", cache / f"{name}.json"
    if tar_path.exists() and meta_path.exists():
        return tar_path, {**json.loads(meta_path.read_text()), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = work / "debootstrap"
    shutil.rmtree(rootfs, ignore_errors=True)
    print(f"debootstrap --variant={VARIANT} {SUITE} {rootfs} {MIRROR} ...", file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run(["debootstrap", f"--variant={VARIANT}", SUITE, str(rootfs), MIRROR],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap exited {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    seconds = time.perf_counter() - started
    partial = cache / f".{name}.tar.partial"
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in tree_paths(rootfs):
            add_path(tar, rootfs, rel)
    partial.rename(tar_path)
    shutil.rmtree(rootfs, ignore_errors=True)
    facts = {"suite": SUITE, "variant": VARIANT, "mirror": MIRROR, "debootstrap_seconds": seconds,
             "made": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    meta_path.write_text(json.dumps(facts, indent=2) + "\n")
    return tar_path, {**facts, "cached": False}


# ---------------------------------------------------------------- layer diffs


@dataclass(frozen=True)
class Node:
    """What the diff compares of one path: everything a layer carries (not the mtime, which
    `docker build` would carry but this benchmark clamps), and the inode of a directory."""

    kind: int
    mode: int
    uid: int
    gid: int
    size: int
    digest: str
    link: str
    rdev: int
    ino: int

    def same(self, other: Node) -> bool:
        """Whether a layer needs no entry for this path; a directory's size says nothing."""
        mine = (self.kind, self.mode, self.uid, self.gid, self.digest, self.link, self.rdev)
        theirs = (other.kind, other.mode, other.uid, other.gid, other.digest, other.link, other.rdev)
        return mine == theirs and (self.kind == stat.S_IFDIR or self.size == other.size)


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as data:
        while block := data.read(COPY_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def snapshot(root: Path) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for rel in tree_paths(root):
        st = os.lstat(root / rel)
        kind = stat.S_IFMT(st.st_mode)
        digest = file_digest(root / rel) if kind == stat.S_IFREG else ""
        link = os.readlink(root / rel) if kind == stat.S_IFLNK else ""
        nodes[rel] = Node(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, digest, link,
                          st.st_rdev, st.st_ino)  # fmt: skip
    return nodes


@contextlib.contextmanager
def held_directories(root: Path, nodes: dict[str, Node]) -> Iterator[None]:
    """Keeps an O_PATH descriptor on each directory of `nodes` open: a directory removed while
    held keeps its inode allocated, so one made again in its place gets another inode number,
    which is how the diff tells "removed and made again" (opaque) from "still there"."""
    dirs = [rel for rel, node in nodes.items() if node.kind == stat.S_IFDIR]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < len(dirs) + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(dirs) + 1024), hard))
    fds = [os.open(root / rel, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW) for rel in dirs]
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)


@dataclass
class Changes:
    """One layer: the paths it carries from the tree after the step, and its markers."""

    paths: set[str]
    whiteouts: list[str]
    opaque: list[str]


def diff(before: dict[str, Node], after: dict[str, Node]) -> Changes:
    """What overlay2 would have in the upper directory after the step, as an OCI layer."""
    replaced = {rel for rel, node in after.items() if node.kind == stat.S_IFDIR and rel in before
                and before[rel].kind == stat.S_IFDIR and before[rel].ino != node.ino}  # fmt: skip

    def in_replaced(rel: str) -> bool:
        return any(a in replaced for a in ancestors(rel))

    paths = {rel for rel, node in after.items()
             if rel not in before or not node.same(before[rel]) or rel in replaced or in_replaced(rel)}  # fmt: skip
    whiteouts: list[str] = []
    for rel in before.keys() - after.keys():
        parent, _, name = rel.rpartition("/")
        # Only the topmost path that went needs a marker: one under a removed directory, a
        # directory now a file, or an opaque directory is hidden already.
        if parent and (after.get(parent) is None or after[parent].kind != stat.S_IFDIR):
            continue
        if parent in replaced or in_replaced(rel):
            continue
        whiteouts.append(f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else f"{WHITEOUT_PREFIX}{name}")
    # overlay2 copies up every parent directory of what changed; so does the layer.
    parents = {a for rel in [*paths, *whiteouts] for a in ancestors(rel)}
    return Changes(paths | parents, sorted(whiteouts), sorted(replaced))


def write_changes(tar: tarfile.TarFile, root: Path, changes: Changes) -> None:
    """The layer's entries in sorted order, each marker right after its directory's entries begin."""
    markers = {w: "w" for w in changes.whiteouts} | {f"{d}/{OPAQUE_MARKER}": "o" for d in changes.opaque}
    for rel in sorted([*changes.paths, *markers]):
        if rel in markers:
            add_marker(tar, rel)
        else:
            add_path(tar, root, rel)


def step_layer(
    root: Path, layout: Path, layers: list[tuple[dict[str, object], str]], step: Callable[[Path], None]
) -> dict[str, int]:
    """Runs `step` on the tree at `root` and adds what it changed as the next layer; returns counts."""
    before = snapshot(root)
    with held_directories(root, before):
        step(root)
        after = snapshot(root)
    changes = diff(before, after)
    with layer_tar(layout, layers) as tar:
        write_changes(tar, root, changes)
    return {"entries": len(changes.paths), "whiteouts": len(changes.whiteouts), "opaque_dirs": len(changes.opaque)}


# ---------------------------------------------------------------- the steps (RUN and COPY)


def remove(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def slim(root: Path) -> None:
    """RUN rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /var/cache/apt/archives/*.deb
    /var/cache/debconf/*-old /var/log/*.log: directory and file whiteouts."""
    remove(sorted((root / "usr/share/doc").iterdir()))
    remove(sorted((root / "usr/share/man").iterdir()))
    remove(sorted((root / "usr/share/info").glob("*")))
    remove(sorted((root / "var/cache/apt/archives").glob("*.deb")))
    remove(sorted((root / "var/cache/debconf").glob("*-old")))
    remove(sorted((root / "var/log").glob("*.log")))


def apt_config(root: Path) -> None:
    """RUN rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d && echo ... > .../99bench:
    an opaque directory with new files."""
    conf = root / "etc/apt/apt.conf.d"
    shutil.rmtree(conf)
    conf.mkdir(mode=0o755)
    (conf / "99bench").write_text('APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
    (conf / "99nocache").write_text('Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')


def copy_app(root: Path, seed: int) -> None:
    """COPY app/ /opt/app/ and a user for it: APP_FILES new files (with a symlink and a hardlink),
    and /etc/passwd, /etc/group and /etc/shadow changed."""
    rng = random.Random(f"app-{seed}")
    pool = text_pool(rng, MIB)
    app = root / "opt/app"
    for serial in range(APP_FILES):
        path = app / f"{('bin', 'lib', 'share/data', 'share/locale', 'conf')[serial % 5]}/m{serial // 50}/f{serial:04d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = int(64 * KIB * rng.random() ** 3)
        offset = rng.randrange(len(pool) - size)
        path.write_bytes(pool[offset : offset + size])
        os.chown(path, 1000, 1000)
    (app / "bin/app").symlink_to("m0/f0000")
    os.link(app / "bin/m0/f0000", app / "bin/app-hardlink")
    with (root / "etc/passwd").open("a") as f:
        f.write("app:x:1000:1000:bench app:/opt/app:/usr/sbin/nologin\n")
    with (root / "etc/group").open("a") as f:
        f.write("app:x:1000:\n")
    with (root / "etc/shadow").open("a") as f:
        f.write("app:!:19000::::::\n")


# ---------------------------------------------------------------- images


def largest_file(root: Path) -> tuple[str, int]:
    """The largest regular file under `root` (the first in sorted order among equals)."""
    sizes = [(-os.lstat(root / rel).st_size, rel) for rel in tree_paths(root) if (root / rel).is_file()
             and not (root / rel).is_symlink()]  # fmt: skip
    size, rel = min(sizes)
    return rel, -size


def build_debian(layout: Path, work: Path, cache: Path, tag: str, seed: int) -> dict[str, Any]:
    """The debian image at `layout` under `tag`; returns facts (whiteout counts, the big file...)."""
    started = time.perf_counter()
    base, facts = debian_base(cache, work)
    rootfs = work / "debian-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir(parents=True)
    subprocess.run(["tar", "--numeric-owner", "-xpf", str(base), "-C", str(rootfs)], check=True)
    layers: list[tuple[dict[str, object], str]] = []
    blob_from_tar(layout, base, layers)
    steps = {"slim": slim, "apt_config": apt_config, "copy_app": lambda root: copy_app(root, seed)}
    facts["steps"] = {name: step_layer(rootfs, layout, layers, step) for name, step in steps.items()}
    facts.update(finish_layout(layout, layers, tag))
    facts["whiteouts"] = sum(s["whiteouts"] for s in facts["steps"].values())
    facts["opaque_dirs"] = sum(s["opaque_dirs"] for s in facts["steps"].values())
    facts["expected_entries"] = 1 + len(tree_paths(rootfs))
    facts["big_path"], facts["big_size"] = largest_file(rootfs)
    facts["big_sha256"] = file_digest(rootfs / facts["big_path"])
    facts["base_tar_bytes"] = base.stat().st_size
    facts["build_seconds"] = time.perf_counter() - started
    shutil.rmtree(rootfs, ignore_errors=True)
    return facts


class Generated(io.RawIOBase):
    """A file's contents made on demand: 1 MiB blocks, each random (incompressible) or cut from a
    text pool (gzips to about 0.4) by a seeded coin, hashed as they are made."""

    def __init__(self, size: int, rng: random.Random, pool: bytes) -> None:
        super().__init__()
        self.left, self.rng, self.pool = size, rng, pool
        self.hash = hashlib.sha256()
        self.block, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def _next_block(self) -> None:
        take = min(MIB, self.left)
        if self.rng.random() < 0.5:
            self.block = self.rng.randbytes(take)
        else:
            offset = self.rng.randrange(len(self.pool) - take)
            self.block = self.pool[offset : offset + take]
        self.hash.update(self.block)
        self.pos, self.left = 0, self.left - take

    def read(self, size: int = -1) -> bytes:
        """Exactly `size` bytes unless the end comes first: tarfile takes a short read for the end."""
        want = sys.maxsize if size < 0 else size
        parts: list[bytes] = []
        while want:
            if self.pos == len(self.block):
                if not self.left:
                    break
                self._next_block()
            piece = self.block[self.pos : self.pos + want]
            parts.append(piece)
            self.pos += len(piece)
            want -= len(piece)
        return b"".join(parts)


def build_large(layout: Path, tag: str, seed: int, scale: float) -> dict[str, Any]:
    """The large image: layer 1 a small tree and the first big file, then one big file a layer
    (the last one also whites out a small file); sizes times `scale` (--quick makes them small)."""
    started = time.perf_counter()
    rng = random.Random(f"large-{seed}")
    pool = text_pool(rng, 8 * MIB)
    sizes = [int(mb * scale) * 1_000_000 for mb in LARGE_FILE_MB]
    names = [f"data/big-{mb}m.bin" for mb in LARGE_FILE_MB]
    layers: list[tuple[dict[str, object], str]] = []
    digests: dict[str, str] = {}
    small = [f"app/d{n % 20:02d}/f{n:04d}" for n in range(LARGE_SMALL_FILES)]
    for number, (name, size) in enumerate(zip(names, sizes, strict=True)):
        with layer_tar(layout, layers) as tar:
            if number == 0:
                add_small_tree(tar, small, pool, rng)
            elif number == len(names) - 1:
                add_marker(tar, f"app/d00/{WHITEOUT_PREFIX}{small[0].rpartition('/')[2]}")
            tar.addfile(tar_info("data", tarfile.DIRTYPE, 0o755))
            data = Generated(size, rng, pool)
            tar.addfile(tar_info(name, tarfile.REGTYPE, 0o644, size), data)  # type: ignore[arg-type]
            digests[name] = data.hash.hexdigest()
    facts = finish_layout(layout, layers, tag)
    dirs = {a for p in small for a in ancestors(p)} | {"data"}
    facts.update(
        {
            "files": len(small) + len(names),
            "file_sizes": dict(zip(names, sizes, strict=True)),
            "whiteouts": 1,
            "opaque_dirs": 0,
            "expected_entries": 1 + len(dirs) + len(small) - 1 + len(names),
            "big_path": names[-1],
            "big_size": sizes[-1],
            "big_sha256": digests[names[-1]],
            "build_seconds": time.perf_counter() - started,
        }
    )
    return facts


def add_small_tree(tar: tarfile.TarFile, paths: list[str], pool: bytes, rng: random.Random) -> None:
    for d in sorted({a for p in paths for a in ancestors(p)}):
        tar.addfile(tar_info(d, tarfile.DIRTYPE, 0o755))
    for path in paths:
        size = int(32 * KIB * rng.random() ** 2)
        offset = rng.randrange(len(pool) - size)
        tar.addfile(tar_info(path, tarfile.REGTYPE, 0o644, size), io.BytesIO(pool[offset : offset + size]))
