"""Lazy pulling of eStargz images from a real registry: images converted by upstream's
ctr-remote (containerd with a private root, state and socket) and by our own converter,
mounted through a counting proxy and compared entry by entry with the plain tar path."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from tests.conftest import COMMAND, Mounter, require, unmount
from tests.registry_servers import REGISTRY_BINARY, Fault, FaultProxy, Registry, skopeo_copy
from tests.tarvocab import d, f, hl, opq, sym, tar_of, wh
from tests.tree_walk import describe_tree
from unionfs.aio import EventLoopThread
from unionfs.entry import Entry
from unionfs.estargz.toc import FOOTER_SIZE, parse_footer, parse_toc, read_toc_member

MIB = 1024 * 1024
BIG = {f"data/blob{i:02}": os.urandom(MIB) for i in range(12)}  # incompressible: bytes on the wire are real
PAGES = {f"docs/page{i:03}": f"page {i}\n".encode() * (20 + i) for i in range(200)}  # a tree of small files
LOWER = [d("data/"), *(f(name, data) for name, data in BIG.items()), f("etc/motd", b"old"), d("cache/"),
         f("cache/stale", b"s"), f("bin/tool", b"#!/bin/sh\n" * 5000, mode=0o755),
         *(f(name, data) for name, data in PAGES.items())]  # fmt: skip
# Hardlinks within one layer: upstream's eStargz reader refuses a link to a lower layer's file
# (our merge takes it; test_whiteout covers that case).
UPPER = [wh("etc/motd"), opq("cache"), f("cache/fresh", b"n"), f("bin/tool2", b"2"), hl("bin/tool-link", "bin/tool2"),
         sym("bin/sh", "tool"), f("etc/config", b"key=value\n" * 100, xattrs={"user.k": "v"})]  # fmt: skip
PRIORITIZED = "data/blob03"


class Containerd:
    """containerd with a private root, state and socket (CRI off), for ctr-remote."""

    def __init__(self, root: Path) -> None:
        config = root / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{root}/root"\nstate = "{root}/state"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{root}/sock"\n'
        )
        self.socket = root / "sock"
        self._process = subprocess.Popen(["containerd", "--config", str(config)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert time.monotonic() < deadline and self._process.poll() is None, "containerd did not start"
            time.sleep(0.05)

    def ctr(self, *args: str) -> None:
        env = {**os.environ, "GOMAXPROCS": "1"}  # the converter's output depends on it
        run = subprocess.run(["ctr-remote", "--address", str(self.socket), *args], capture_output=True, text=True,
                             env=env, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=20)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A registry holding the source image and its eStargz conversions; yields their refs."""
    for tool in ("containerd", "ctr-remote", "skopeo"):
        require(shutil.which(tool) is not None, f"{tool} is missing (apt-get install containerd stargz-snapshotter)")
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing")
    root = tmp_path_factory.mktemp("lazy")
    write_layout(root / "source", [tar_of(*LOWER), tar_of(*UPPER)], tag="v1")
    (root / "registry").mkdir()
    registry = Registry(root / "registry")
    containerd = Containerd(root)
    try:
        host = registry.host
        skopeo_copy(f"oci:{root / 'source'}:v1", f"docker://{host}/lazy/image:v1")
        containerd.ctr("content", "fetch", "--plain-http", f"{host}/lazy/image:v1")
        refs = {"source": f"oci:{root / 'source'}:v1"}
        record = root / "record.json"  # ctr-remote's record of accessed files: they go first
        record.write_text(json.dumps({"path": PRIORITIZED}) + "\n")
        for name, options in (("upstream", ["--estargz-chunk-size", "0"]),
                              ("upstream-64k", ["--estargz-chunk-size", "65536"]),
                              ("upstream-landmark", ["--estargz-record-in", str(record)])):  # fmt: skip
            containerd.ctr("image", "convert", "--estargz", "--oci", *options,
                           f"{host}/lazy/image:v1", f"{host}/lazy/image:{name}")  # fmt: skip
            containerd.ctr("image", "push", "--plain-http", f"{host}/lazy/image:{name}")
            refs[name] = f"lazy/image:{name}"
        subprocess.run([*COMMAND, "convert", "--cache-dir", str(root / "cc"), "--chunk-size", "262144",
                        "--prefetch-files", PRIORITIZED, refs["source"], f"oci:{root / 'ours'}:esgz"],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
        skopeo_copy(f"oci:{root / 'ours'}:esgz", f"docker://{host}/lazy/image:ours")
        refs["ours"] = "lazy/image:ours"
        refs["ours-layout"] = str(root / "ours")
        refs["host"] = host
        yield refs
    finally:
        containerd.stop()
        registry.stop()


@pytest.fixture
def proxy(images: dict[str, str]) -> Iterator[FaultProxy]:
    with EventLoopThread() as loop:
        counting = FaultProxy(images["host"], loop)
        counting.start()
        yield counting
        counting.stop()


@pytest.fixture
def source_tree(images: dict[str, str], mount: Mounter, tmp_path: Path) -> dict[str, tuple[object, ...]]:
    return describe_tree(mount(images["source"], cache=tmp_path / "source-cache"))


def _image_bytes(images: dict[str, str], name: str) -> int:
    """The size of an image's layer blobs, as skopeo reports them."""
    run = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{images['host']}/{images[name]}"], capture_output=True, check=True)  # fmt: skip
    return sum(layer["size"] for layer in json.loads(run.stdout)["layers"])


@pytest.mark.parametrize("name", ["upstream", "upstream-64k", "upstream-landmark", "ours"])
def test_estargz_mounts_after_fetching_only_tocs_and_equals_the_tar_path(
    name: str, images: dict[str, str], proxy: FaultProxy, mount: Mounter,
    source_tree: dict[str, tuple[object, ...]],
) -> None:  # fmt: skip
    root = mount(f"{proxy.host}/{images[name]}", "--prefetch", "none")
    at_mount = proxy.served_bytes
    assert at_mount < _image_bytes(images, name) / 20, "mounting fetched more than footers and TOCs"
    assert proxy.requests["blob"] == 1  # the config; layers only through ranges
    assert describe_tree(root) == source_tree


@pytest.mark.parametrize("pull", ["missing", "always"])
@pytest.mark.parametrize("damage", ["none", "byte-flipped"])
def test_a_second_mount_loads_the_saved_tree_and_makes_no_range_request(
    damage: str, pull: str, images: dict[str, str], proxy: FaultProxy, mount: Mounter, tmp_path: Path,
    source_tree: dict[str, tuple[object, ...]],
) -> None:  # fmt: skip
    """The first mount saves the merged tree with its chunk tables; the second loads it and
    asks the registry nothing (--pull missing: the reference's record names the image) or
    only for the manifest and config (--pull always); its TOCs are not needed: they are
    removed first. A saved tree damaged in between is refused with one warning and made again
    from the cached TOCs, again without a range request."""
    image, cache = f"{proxy.host}/{images['upstream-64k']}", tmp_path / "cache"
    unmount(mount(image, "--prefetch", "none", cache=cache))
    [saved] = (cache / "trees").rglob("*.tree")
    if damage == "none":
        shutil.rmtree(cache / "toc")  # the saved tree alone serves the mount
    else:
        data = bytearray(saved.read_bytes())
        data[len(data) // 2] ^= 0x5A
        saved.write_bytes(data)
    proxy.requests.clear()
    (tmp_path / "m").mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(cache), "--prefetch", "none", "--pull", pull, "-v", image,
                          str(tmp_path / "m")], capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert run.returncode == 0, run.stderr
        if pull == "missing":
            assert sum(proxy.requests.values()) == 0, proxy.requests
        else:
            assert proxy.requests["range"] == 0 and proxy.requests["blob"] == 1  # the config
        loaded = "merged tree loaded from the cache" in run.stderr
        assert loaded == (damage == "none"), run.stderr
        if damage != "none":
            assert [line for line in run.stderr.splitlines() if str(saved) in line and "is damaged" in line]
        assert describe_tree(tmp_path / "m") == source_tree  # every byte, read lazily through the loaded tables
    finally:
        unmount(tmp_path / "m")
    assert proxy.requests["range"] > 0


def test_a_first_mount_asks_for_the_tocs_before_the_config_is_answered(
    images: dict[str, str], proxy: FaultProxy, mount: Mounter
) -> None:
    """Every layer of the image may be read lazily, so the TOCs need only the manifest: the
    proxy holds the config's answer until a range request arrives, which it does (the mount
    fetches them side by side, one round trip less before it is ready), not after a timeout."""
    image = images["upstream-64k"]
    manifest = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                          f"docker://{proxy.host}/{image}"], capture_output=True, text=True,
                                         check=True, timeout=60).stdout)  # fmt: skip
    proxy.stall_seconds = 10
    proxy.faults.append(Fault("hold", path_part=f"/blobs/{manifest['config']['digest']}", until="range"))
    root = mount(f"{proxy.host}/{image}", "--prefetch", "none")
    assert proxy.released_by == ["range"]
    assert (root / "etc/config").read_bytes() == b"key=value\n" * 100


def test_reading_one_file_fetches_about_that_file(images: dict[str, str], proxy: FaultProxy, mount: Mounter) -> None:
    root = mount(f"{proxy.host}/{images['upstream-64k']}", "--prefetch", "none")
    before = proxy.served_bytes
    name = "data/blob05"
    assert (root / name).read_bytes() == BIG[name]
    fetched = proxy.served_bytes - before
    image = _image_bytes(images, "upstream-64k")
    assert MIB <= fetched < 1.2 * MIB and fetched < image * 0.1, (fetched, image)


@pytest.mark.parametrize("name", ["upstream", "ours"])
def test_reading_a_tree_of_small_files_in_order_takes_few_requests(
    name: str, images: dict[str, str], proxy: FaultProxy, mount: Mounter
) -> None:
    root = mount(f"{proxy.host}/{images[name]}", "--prefetch", "none")
    before = proxy.requests["range"]
    for path, data in sorted(PAGES.items()):
        assert (root / path).read_bytes() == data
    requests = proxy.requests["range"] - before
    assert 1 <= requests <= 10, f"{requests} range requests for {len(PAGES)} small files"


def test_corrupted_chunks_read_as_eio_and_do_not_poison_the_cache(
    images: dict[str, str], proxy: FaultProxy, mount: Mounter
) -> None:
    root = mount(f"{proxy.host}/{images['upstream']}", "--prefetch", "none", "--timeout", "2")
    proxy.faults = [Fault("corrupt", 100)]
    with pytest.raises(OSError) as raised:
        (root / "data/blob07").read_bytes()
    assert raised.value.errno == errno.EIO
    proxy.faults = []
    assert (root / "data/blob07").read_bytes() == BIG["data/blob07"]


def test_a_toc_that_does_not_match_its_annotation_fails_the_mount(
    images: dict[str, str], tmp_path: Path, fuse_works: None
) -> None:
    layout = tmp_path / "tampered"
    shutil.copytree(images["ours-layout"], layout)
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    manifest["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] = "sha256:" + "0" * 64
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    skopeo_copy(f"oci:{layout}:esgz", f"docker://{images['host']}/lazy/tampered:v1")
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), f"{images['host']}/lazy/tampered:v1",
                          str(mountpoint)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1 and "TOC of layer" in run.stderr and "expected sha256:000" in run.stderr, run.stderr
    assert not os.path.ismount(mountpoint)


def test_two_mounts_share_one_cache_directory(
    images: dict[str, str], mount: Mounter, tmp_path: Path, source_tree: dict[str, tuple[object, ...]]
) -> None:
    image = f"{images['host']}/{images['upstream-64k']}"
    shared = tmp_path / "shared"
    roots = [mount(image, "--prefetch", "none", cache=shared) for _ in range(2)]
    trees: list[dict[str, tuple[object, ...]]] = []
    readers = [threading.Thread(target=lambda r=r: trees.append(describe_tree(r))) for r in roots]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=120)
    assert trees == [source_tree, source_tree]


@pytest.mark.parametrize("name", ["ours", "upstream-landmark"])
def test_landmark_prefetch_and_a_damaged_disk_cache(
    name: str, images: dict[str, str], proxy: FaultProxy, mount: Mounter, tmp_path: Path
) -> None:
    cache = tmp_path / "prefetch-cache"
    root = mount(f"{proxy.host}/{images[name]}", "--prefetch", "landmark", cache=cache)
    deadline = time.monotonic() + 30
    while proxy.served_bytes < MIB and time.monotonic() < deadline:  # the prioritized file arrives by itself
        time.sleep(0.05)
    time.sleep(0.3)
    before = proxy.served_bytes
    assert (root / PRIORITIZED).read_bytes() == BIG[PRIORITIZED]
    assert proxy.served_bytes == before, "the prefetched file was fetched again"
    layer_files = sorted((cache / "chunks").rglob("*.chunks"))
    assert layer_files
    for layer_file in layer_files:  # damage every cached chunk: a new mount must notice and refetch
        layer_file.write_bytes(b"garbage" * (layer_file.stat().st_size // 7))
    again = mount(f"{proxy.host}/{images[name]}", "--prefetch", "none", cache=cache)
    assert (again / PRIORITIZED).read_bytes() == BIG[PRIORITIZED]
    assert proxy.served_bytes > before


def test_prefetch_all_makes_the_image_local(
    images: dict[str, str], proxy: FaultProxy, mount: Mounter, source_tree: dict[str, tuple[object, ...]]
) -> None:
    root = mount(f"{proxy.host}/{images['upstream-64k']}", "--prefetch", "all")
    image = _image_bytes(images, "upstream-64k")
    deadline = time.monotonic() + 60
    while proxy.served_bytes < image * 0.9 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the last range lands
    before = proxy.served_bytes
    assert describe_tree(root) == source_tree
    assert proxy.served_bytes == before, "reading everything after prefetch=all fetched more"


def test_estargz_read_whole_hides_its_artifacts(
    images: dict[str, str], mount: Mounter, tmp_path: Path, source_tree: dict[str, tuple[object, ...]]
) -> None:
    """The same layers through the whole-layer path (an OCI layout on disk): the TOC and the
    landmark are tar entries there, and must not show either."""
    assert describe_tree(mount(f"oci:{images['ours-layout']}:esgz", cache=tmp_path / "whole")) == source_tree


# --- the upstream eStargz reader as an oracle ------------------------------------------

ORACLE_SOURCE = Path(__file__).parent / "oracle" / "estargz-verify"
GO_SOURCES = Path("/usr/share/gocode/src/github.com/containerd/stargz-snapshotter/estargz")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds tests/oracle/estargz-verify against Debian's copy of upstream's estargz package."""
    require(shutil.which("go") is not None, "go is missing (apt-get install golang-go)")
    require(GO_SOURCES.is_dir(), "upstream estargz sources missing (golang-github-containerd-stargz-snapshotter-dev)")
    out = tmp_path_factory.mktemp("oracle")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(out / "cache"),
           "GOFLAGS": ""}  # fmt: skip
    subprocess.run(["go", "build", "-o", str(out / "estargz-verify"), "."], cwd=ORACLE_SOURCE, env=env,
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return out / "estargz-verify"


def _layers_of(layout: Path, tag: str) -> list[tuple[Path, str]]:
    """Returns (blob path, toc.digest annotation) of each layer of an OCI layout image."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [
        m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    blobs = layout / "blobs" / "sha256"
    annotation = "containerd.io/snapshot/stargz/toc.digest"
    return [(blobs / layer["digest"].split(":")[1], layer["annotations"][annotation]) for layer in manifest["layers"]]


def _upstream_view(oracle: Path, blob: Path, toc_digest: str) -> list[str]:
    """Upstream's listing of a layer, less its landmark."""
    run = subprocess.run([str(oracle), str(blob), toc_digest], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # the TOC and every chunk verified by upstream's reader
    return sorted(line for line in run.stdout.splitlines() if not line.endswith("landmark"))


def _our_view(blob: Path) -> list[str]:
    """Our reader's listing of a layer in the oracle's format: a hardlink with its target's
    attributes, plus the parent directories that upstream's reader makes up for entries
    that have no header of their own."""
    data = blob.read_bytes()
    found = parse_footer(data[-FOOTER_SIZE:])
    assert found is not None
    entries = parse_toc(read_toc_member(data[found.toc_offset : -found.size]), 0, found.toc_offset).entries
    by_path = {e.path: e for e in entries}
    lines = {_line(by_path.get(e.link, e) if e.hardlink else e, e.path) for e in entries}
    parents = {"/".join(e.path.split("/")[:i]) for e in entries for i in range(1, e.path.count("/") + 1)}
    return sorted(lines | {f"dir 755 0 {p}" for p in parents - set(by_path)})


def _line(entry: Entry, path: str) -> str:
    return f"{_type(entry)} {entry.mode & 0o777:o} {entry.size} {path}"


def _type(entry: Entry) -> str:
    kinds = {stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char", stat.S_IFBLK: "block",
             stat.S_IFIFO: "fifo"}  # fmt: skip
    return "hardlink" if entry.hardlink else kinds.get(stat.S_IFMT(entry.mode), "reg")


def test_our_estargz_passes_upstream_verification(images: dict[str, str], oracle: Path) -> None:
    layers = _layers_of(Path(images["ours-layout"]), "esgz")
    assert len(layers) == 2
    for blob, toc_digest in layers:
        assert _upstream_view(oracle, blob, toc_digest) == _our_view(blob)


def test_upstream_and_our_reader_agree_on_upstream_images(images: dict[str, str], oracle: Path, tmp_path: Path) -> None:
    for name in ("upstream", "upstream-64k"):
        layout = tmp_path / name
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{images['host']}/{images[name]}",
                        f"oci:{layout}:{name}"], check=True, capture_output=True, timeout=120)  # fmt: skip
        for blob, toc_digest in _layers_of(layout, name):
            assert _upstream_view(oracle, blob, toc_digest) == _our_view(blob)


def test_upstream_refuses_a_tampered_toc_digest(images: dict[str, str], oracle: Path) -> None:
    blob, _ = _layers_of(Path(images["ours-layout"]), "esgz")[0]
    run = subprocess.run([str(oracle), str(blob), "sha256:" + "0" * 64], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "invalid TOC JSON" in run.stderr  # the oracle can fail


def test_random_reads_across_chunk_boundaries(images: dict[str, str], mount: Mounter) -> None:
    root = mount(f"{images['host']}/{images['upstream-64k']}", "--prefetch", "none")
    data = BIG["data/blob09"]
    with open(root / "data/blob09", "rb", buffering=0) as handle:
        for offset, size in ((0, 1), (65535, 2), (65536 * 3 - 10, 65536 + 20), (MIB - 5, 100), (12345, 300_000)):
            handle.seek(offset)
            assert handle.read(size) == data[offset : offset + size]


def test_a_registry_gone_after_the_mount_reads_as_eio_in_bounded_time(images: dict[str, str], mount: Mounter) -> None:
    with EventLoopThread() as loop:
        vanishing = FaultProxy(images["host"], loop)
        vanishing.start()
        root = mount(f"{vanishing.host}/{images['upstream']}", "--prefetch", "none", "--timeout", "1")
        vanishing.stop()
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        (root / "data/blob11").read_bytes()
    assert raised.value.errno == errno.EIO and time.monotonic() - started < 60
    assert sorted(os.listdir(root / "data")) == sorted(p.split("/")[1] for p in BIG)  # metadata still served


def test_a_writable_mount_of_a_lazy_image_copies_up_by_range_reads_and_commits(
    images: dict[str, str], proxy: FaultProxy, mount: Mounter, tmp_path: Path
) -> None:
    """--upper over an eStargz image in a registry: a copy-up fetches about the file it copies,
    the change survives a remount, and the commit mounts as the writable mount showed."""
    image, upper = f"{proxy.host}/{images['ours']}", tmp_path / "upper"
    root = mount(image, "--prefetch", "none", "--upper", str(upper))
    before = proxy.served_bytes
    with open(root / "data/blob02", "r+b") as handle:
        handle.write(b"XY")
    fetched = proxy.served_bytes - before
    assert MIB <= fetched < 1.3 * MIB, fetched
    assert (root / "data/blob02").read_bytes() == b"XY" + BIG["data/blob02"][2:]
    (root / "etc/config").unlink()
    (root / "cache/new").write_bytes(b"new")
    unmount(root)
    root = mount(image, "--prefetch", "none", "--upper", str(upper))
    shown = describe_tree(root)
    unmount(root)
    dest = f"oci:{tmp_path / 'committed'}:v2"
    run = subprocess.run([*COMMAND, "commit", "--cache-dir", str(tmp_path / "cache"), "--upper", str(upper), image,
                          dest], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert describe_tree(mount(dest)) == shown


def test_a_toc_larger_than_the_tail_request_is_fetched_whole(tmp_path: Path, mount: Mounter) -> None:
    """The first request reads the blob's tail (footer and, usually, the TOC); a TOC that starts
    before it takes exactly one more request, for its first part, and mounts as the tar path."""
    from tests.registry_servers import estargz_in_registry
    from unionfs.estargz.lazy import TAIL_GUESS

    names = [f"many/{i:05}-{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(3000)]
    layer = tar_of(d("many/"), *(f(name, name.encode()) for name in names))
    with estargz_in_registry(tmp_path / "img", [layer], "lazy/many") as registry, EventLoopThread() as loop:
        (blob,) = [p for p in (tmp_path / "img" / "esgz" / "blobs" / "sha256").iterdir() if p.stat().st_size > 100_000]
        data = blob.read_bytes()
        footer = parse_footer(data[-FOOTER_SIZE:])
        assert footer is not None and len(data) - footer.toc_offset > TAIL_GUESS  # the case under test
        counting = FaultProxy(registry.host, loop)
        counting.start()
        try:
            root = mount(f"{counting.host}/lazy/many", "--prefetch", "none", cache=tmp_path / "cache")
            assert counting.requests["range"] == 2  # the tail, then the TOC's first part
            expected = describe_tree(mount(f"oci:{tmp_path / 'img' / 'source'}:v1", cache=tmp_path / "source-cache"))
            assert describe_tree(root) == expected
        finally:
            counting.stop()
