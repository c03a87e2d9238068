"""The fsspec file system `crfs` (unionfs/fsspecfs/) against the real FUSE mount of the same
image: on every merge-rule row and every image the mount tests use, find/info/ls/cat show what
the mount shows. Then the URL forms, real fsspec consumers (fsspec.open, pandas), the entry
point in a fresh interpreter, the refusal of writes, and the bytes that a read of one small file
fetches from an eStargz image in a registry (through a counting proxy)."""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from registry.media_types import TOC_DIGEST_ANNOTATION, Compression
from tests.conftest import COMMAND, IN_CI, ImageWriter, Mounter, require
from tests.registry_servers import REGISTRY_BINARY, FaultProxy, estargz_in_registry
from tests.tarvocab import d, f, sym, tar_of
from tests.test_mount import RICH_LOWER, RICH_UPPER, UMOCI_CASES
from unionfs.aio import EventLoopThread
from unionfs.api import open_image
from unionfs.entry import Chunk, Entry
from unionfs.estargz.lazy import SMALL_FILE_MAX, SMALL_FILE_SPAN, TAIL_GUESS
from unionfs.estargz.toc import FOOTER_SIZE, parse_footer, parse_toc, read_toc_member
from unionfs.fsspecfs import CrfsFileSystem
from unionfs.fsspecfs.filesystem import byte_range
from unionfs.fsspecfs.urls import make_url, split_url

REPO = Path(__file__).resolve().parent.parent
Opener = Callable[[str], Any]


def _entry_point_installed() -> bool:
    return any(ep.name == "crfs" for ep in importlib.metadata.entry_points(group="fsspec.specs"))


@pytest.fixture(scope="module", autouse=True)
def crfs_protocol() -> None:
    """The protocol as an installed crfs-merge registers it (setup.cfg's entry point). A
    checkout installed before the entry point existed gets it by hand here, outside CI;
    test_the_entry_point_registers_crfs_in_a_fresh_interpreter fails in CI without it."""
    if not _entry_point_installed() and not IN_CI:
        fsspec.register_implementation("crfs", CrfsFileSystem, clobber=True)


@pytest.fixture
def crfs(tmp_path: Path) -> Iterator[Opener]:
    """Returns open(image) -> fsspec.filesystem('crfs', ...) with a cache of its own (not the
    mount's), closed and dropped from fsspec's instance cache after the test."""
    opened: list[Any] = []

    def open_fs(image: str) -> Any:
        fs = fsspec.filesystem("crfs", image=image, cache_dir=str(tmp_path / "fs-cache"))
        opened.append(fs)
        return fs

    yield open_fs
    for fs in opened:
        fs.close()
    CrfsFileSystem.clear_instance_cache()


# --- the mount as the oracle ---------------------------------------------------------------


def _kind(mode: int) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "link"}.get(stat.S_IFMT(mode), "other")


def mount_view(root: Path) -> dict[str, dict[str, Any]]:
    """{path: what lstat and readlink show of it on the mount, under fsspec's keys}."""
    rows = {}
    for directory, subdirectories, files in os.walk(root):  # never into a symlink, as find()
        for name in subdirectories + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            row = {"size": info.st_size, "type": _kind(info.st_mode), "mode": info.st_mode, "uid": info.st_uid,
                   "gid": info.st_gid, "mtime": info.st_mtime_ns / 1e9, "ino": info.st_ino, "nlink": info.st_nlink,
                   "islink": stat.S_ISLNK(info.st_mode), "rdev": info.st_rdev}  # fmt: skip
            if stat.S_ISLNK(info.st_mode):
                row["destination"] = os.readlink(full)
            rows[os.path.relpath(full, root)] = row
    return rows


def fsspec_view(fs: Any, top: str = "") -> dict[str, dict[str, Any]]:
    found = fs.find(top, withdirs=True, detail=True)
    assert all(info["name"] == name for name, info in found.items())
    return {name: {k: v for k, v in info.items() if k != "name"} for name, info in found.items()}


def assert_same_as_mount(fs: Any, root: Path) -> None:
    """find, info, ls and cat of `fs` against the mount at `root`: entry by entry, byte by byte."""
    expected = mount_view(root)
    assert fsspec_view(fs) == expected
    assert fs.info("")["type"] == "directory" and fs.info("/")["name"] == ""
    for path, row in expected.items():
        assert {k: v for k, v in fs.info(path).items() if k != "name"} == row
        assert fs.info("/" + path)["name"] == path  # a leading '/' names the same entry
        if row["type"] == "file":
            assert fs.cat(path) == (root / path).read_bytes(), path
        if row["type"] == "directory":
            assert sorted(fs.ls(path, detail=False)) == sorted(f"{path}/{n}" for n in os.listdir(root / path))
    assert sorted(fs.ls("", detail=False)) == sorted(os.listdir(root))


@pytest.mark.parametrize(("name", "layers", "expected"), UMOCI_CASES, ids=[c[0] for c in UMOCI_CASES])
def test_each_merge_rule_reads_as_the_mount_shows_it(
    name: str, layers: list, expected: dict[str, str], oci_image: ImageWriter, mount: Mounter, crfs: Opener
) -> None:  # fmt: skip
    image = oci_image(*layers)
    fs = crfs(image)
    assert sorted(fs.find("", withdirs=True)) == sorted(expected)
    assert_same_as_mount(fs, mount(image))


@pytest.mark.parametrize("compression", list(Compression), ids=[c.value for c in Compression])
def test_rich_image_reads_as_the_mount_shows_it(
    compression: Compression, oci_image: ImageWriter, mount: Mounter, crfs: Opener
) -> None:
    image = oci_image(RICH_LOWER, RICH_UPPER, compression=compression)
    fs = crfs(image)
    root = mount(image)
    assert_same_as_mount(fs, root)
    assert fs.info("dev/null")["type"] == "other" and fs.info("dev/null")["rdev"] == os.makedev(1, 3)
    assert fs.info("usr/lib/liby.so")["destination"] == "libx.so.1"
    assert fs.cat("usr/lib/liby.so") == (root / "usr/lib/libx.so.1").read_bytes()  # a link is read through


def test_seed_example_reads_as_the_mount_shows_it(tmp_path: Path, mount: Mounter, crfs: Opener) -> None:
    example = REPO / "examples" / "build_seed_image.py"
    subprocess.run([sys.executable, str(example), str(tmp_path / "seed")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    image = f"oci:{tmp_path / 'seed'}"
    fs = crfs(image)
    assert_same_as_mount(fs, mount(image))
    assert fs.ls("etc/network", detail=False) == ["etc/network/newfile"]


def test_ranges_and_seeks_read_as_the_mount_reads_them(oci_image: ImageWriter, mount: Mounter, crfs: Opener) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    image = oci_image([f("blob", data, mode=0o600), sym("l", "blob"), d("sub/")])
    fs, root = crfs(image), mount(image)
    assert_same_as_mount(fs, root)
    size = len(data)
    positions = [None, 0, 1, 4095, 1 << 20, size - 3, size, size + 100, -1, -70_000, -size, -size - 5]
    with open(root / "blob", "rb") as on_mount:
        for start in positions:
            for end in positions:
                first, last = byte_range(size, start, end)
                on_mount.seek(first)
                assert fs.cat_file("blob", start, end) == on_mount.read(last - first) == data[start:end]
    with fs.open("l", "rb") as through_link, open(root / "blob", "rb") as on_mount:
        assert through_link.size == size and through_link.name == "l"
        for offset in (0, 4095, 1 << 20, size - 3, size + 100):
            through_link.seek(offset)
            on_mount.seek(offset)
            assert through_link.read(70_000) == on_mount.read(70_000)
        through_link.seek(-5, os.SEEK_END)
        assert through_link.read() == data[-5:]


def test_a_large_directory_lists_as_the_mount_lists_it(oci_image: ImageWriter, mount: Mounter, crfs: Opener) -> None:
    names = [f"{i:04d}-" + "n" * (i % 190) for i in range(1500)]
    image = oci_image([d("big/"), *(f(f"big/{n}", n.encode()) for n in names)])
    fs = crfs(image)
    assert_same_as_mount(fs, mount(image))
    assert fs.du("big") == sum(len(n) for n in names)


# --- paths, links and errors -----------------------------------------------------------------

LINKS = [d("usr/lib/"), f("usr/lib/os-release", b"ID=test\n"), d("etc/"),
         sym("etc/os-release", "../usr/lib/os-release"), sym("lib", "/usr/lib"), sym("loop", "loop"),
         sym("dangling", "/nowhere"), f("data.csv", b"a,b\n1,2\n3,4\n")]  # fmt: skip


def test_links_are_followed_inside_the_image_and_never_walked_into(oci_image: ImageWriter, crfs: Opener) -> None:
    fs = crfs(oci_image(LINKS))
    assert fs.cat("etc/os-release") == fs.cat("/lib/os-release") == b"ID=test\n"  # absolute: inside the image
    assert fs.ls("lib", detail=False) == ["lib/os-release"]  # a link to a directory lists its target, as ls
    assert fs.find("lib") == ["lib"]  # and find names the link only, as find does
    assert {p for _, _, files in fs.walk("") for p in files} >= {"lib", "loop", "dangling"}
    assert fs.info("lib")["type"] == "link" and fs.isdir("lib") is False and fs.isfile("etc/os-release") is False
    assert fs.exists("dangling") and fs.info("dangling")["destination"] == "/nowhere"
    for path, error in (("missing", FileNotFoundError), ("dangling", FileNotFoundError), ("usr", IsADirectoryError),
                        ("lib", IsADirectoryError), ("data.csv/x", NotADirectoryError)):  # fmt: skip
        with pytest.raises(error):
            fs.cat(path)
    with pytest.raises(OSError) as raised:
        fs.cat("loop")
    assert raised.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        fs.info("missing")
    with pytest.raises(FileNotFoundError):
        fs.ls("missing")
    assert not fs.exists("missing") and fs.glob("**/os-release") == ["etc/os-release", "usr/lib/os-release"]


def test_every_write_is_refused_and_changes_nothing(oci_image: ImageWriter, crfs: Opener, tmp_path: Path) -> None:
    fs = crfs(oci_image(LINKS))
    before = fsspec_view(fs)
    local = tmp_path / "local"
    local.write_bytes(b"x")
    writes = [lambda: fs.open("data.csv", "wb"), lambda: fs.open("new", "w"), lambda: fs.open("data.csv", "ab"),
              lambda: fs.pipe("new", b"1"), lambda: fs.write_text("new", "1"), lambda: fs.touch("new"),
              lambda: fs.mkdir("dir"), lambda: fs.makedirs("a/b"), lambda: fs.rmdir("usr"),
              lambda: fs.rm("data.csv"), lambda: fs.rm("usr", recursive=True), lambda: fs.rm_file("data.csv"),
              lambda: fs.cp_file("data.csv", "copy"), lambda: fs.copy("data.csv", "copy"),
              lambda: fs.mv("data.csv", "moved"), lambda: fs.put(str(local), "put")]  # fmt: skip
    for write in writes:
        with pytest.raises(PermissionError) as raised:
            write()
        assert raised.value.errno == errno.EROFS
    assert fsspec_view(fs) == before
    fs.get("data.csv", str(tmp_path / "got.csv"))  # reading out is no write
    assert (tmp_path / "got.csv").read_bytes() == b"a,b\n1,2\n3,4\n"


# --- URLs and consumers ----------------------------------------------------------------------

DIGEST = "sha256:" + "0" * 64


@pytest.mark.parametrize(("url", "image", "path"), [
    ("crfs://oci:/tmp/layout:latest!/etc/os-release", "oci:/tmp/layout:latest", "etc/os-release"),
    ("crfs://localhost:5000/repo:tag!/etc/os-release", "localhost:5000/repo:tag", "etc/os-release"),
    (f"crfs://docker://reg.example/a/b@{DIGEST}!//usr//lib/", f"docker://reg.example/a/b@{DIGEST}", "usr/lib"),
    ("crfs://oci:/tmp/layout!/", "oci:/tmp/layout", ""),
    ("crfs://etc/os-release", None, "etc/os-release"),
    ("/etc/./os-release/", None, "etc/os-release"),
    ("crfs::/etc/hosts", None, "etc/hosts"),
    ("", None, ""),
])  # fmt: skip
def test_url_forms(url: str, image: str | None, path: str) -> None:
    assert split_url(url) == (image, path)
    assert CrfsFileSystem._strip_protocol(url) == path
    assert CrfsFileSystem._get_kwargs_from_urls(url) == ({"image": image} if image else {})
    if image:
        assert split_url(make_url(image, path)) == (image, path)


def test_fsspec_open_with_the_image_in_the_url_or_in_the_options(oci_image: ImageWriter, crfs: Opener) -> None:
    image = oci_image(LINKS)
    fs = crfs(image)
    cache = fs.storage_options["cache_dir"]
    with fsspec.open(f"crfs://{image}!/etc/os-release", "rt", cache_dir=cache) as handle:
        assert handle.read() == "ID=test\n"
    with fsspec.open("crfs:///data.csv", "rb", image=image, cache_dir=cache) as handle:
        assert handle.read() == b"a,b\n1,2\n3,4\n"
    same, path = fsspec.core.url_to_fs(f"crfs://{image}!/usr/lib", cache_dir=cache)
    assert same is fs and path == "usr/lib"  # one instance per image and options: opened once
    assert fs.unstrip_protocol("etc/os-release") == f"crfs://{image}!/etc/os-release"
    with fsspec.open(fs.unstrip_protocol("data.csv"), "rb", cache_dir=cache) as handle:
        assert handle.read() == fs.cat("data.csv")
    files = fsspec.open_files(f"crfs://{image}!/**/os-release", "rt", cache_dir=cache)
    assert sorted(of.path for of in files) == ["etc/os-release", "usr/lib/os-release"]
    assert fs.ukey("data.csv") == fs.ukey("/data.csv") != fs.ukey("etc/os-release")
    with pytest.raises(FileNotFoundError):
        fs.ukey("missing")
    assert fs.modified("data.csv") == fs.created("data.csv") and fs.modified("data.csv").timestamp() == 1_700_000_000


def test_pandas_reads_a_csv_straight_out_of_an_image(oci_image: ImageWriter, crfs: Opener, mount: Mounter) -> None:
    import pandas  # the test extra installs it: a real consumer of fsspec URLs

    rows = "".join(f"{i},{i * i},name{i}\n" for i in range(2000))
    image = oci_image([d("srv/"), f("srv/table.csv", f"n,square,label\n{rows}".encode())])
    cache = crfs(image).storage_options["cache_dir"]
    frame = pandas.read_csv(f"crfs://{image}!/srv/table.csv", storage_options={"cache_dir": cache})
    assert frame.equals(pandas.read_csv(mount(image) / "srv/table.csv"))
    assert frame.shape == (2000, 3) and frame["square"].sum() == sum(i * i for i in range(2000))


def test_the_entry_point_registers_crfs_in_a_fresh_interpreter(oci_image: ImageWriter, tmp_path: Path) -> None:
    require(_entry_point_installed(), "the fsspec.specs entry point `crfs` is not installed: pip install -e .[test]")
    # fsspec alone must find `crfs`: nothing of crfs-merge is imported before it asks.
    program = (
        "import sys, fsspec\n"
        "assert 'unionfs' not in sys.modules\n"
        "fs = fsspec.filesystem('crfs', image=sys.argv[1], cache_dir=sys.argv[2])\n"
        "print(type(fs).__module__, fs.cat('etc/os-release').decode(), end='')\n"
    )
    run = subprocess.run([sys.executable, "-c", program, oci_image(LINKS), str(tmp_path / "c")], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == "unionfs.fsspecfs.filesystem ID=test\n"


def test_unionfs_api_imports_no_fsspec() -> None:
    program = "import sys, unionfs.api, unionfs.cli; print('fsspec' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}).stdout == "False\n"  # fmt: skip


# --- lazy: an eStargz image in a registry ------------------------------------------------------

MIB = 1024 * 1024
# 10 MiB of data: the 64 KiB that the first request for each layer's footer and TOC takes stay
# under 1/100 of the blobs.
LAZY_LOWER = [d("data/"), *(f(f"data/blob{i}", os.urandom(MIB)) for i in range(10)),
              *(f(f"docs/page{i:03}", f"page {i}\n".encode() * (20 + i)) for i in range(50))]  # fmt: skip
LAZY_UPPER = [f("etc/motd", b"hello\n"), d("srv/"), f("srv/table.csv", b"a,b\n1,2\n")]
SMALL_FILE = "docs/page025"  # among other small files: the engine reads some of them ahead


@pytest.fixture(scope="module")
def estargz_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A registry holding an image converted to eStargz by `crfs-merge convert`; yields its
    host, repository, the converted layout and the plain source layout."""
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(subprocess.run(["which", "skopeo"], capture_output=True).returncode == 0, "skopeo is missing")
    root = tmp_path_factory.mktemp("fsspec-lazy")
    with estargz_in_registry(root, [tar_of(*LAZY_LOWER), tar_of(*LAZY_UPPER)], "fsspec/lazy:esgz") as registry:
        yield {"host": registry.host, "repository": "fsspec/lazy:esgz", "layout": root / "esgz",
               "source": f"oci:{root / 'source'}:v1"}  # fmt: skip


@pytest.fixture
def counting_proxy(estargz_registry: dict[str, Any]) -> Iterator[FaultProxy]:
    with EventLoopThread() as loop:
        proxy = FaultProxy(estargz_registry["host"], loop)
        proxy.start()
        yield proxy
        proxy.stop()


def _layout_manifest(layout: Path) -> tuple[int, dict[str, Any]]:
    """(size of the manifest, the manifest) of a one-image layout."""
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    return entry["size"], json.loads(_blob(layout, entry["digest"]).read_text())


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _layer_tocs(layout: Path) -> list[tuple[int, int, list[Entry]]]:
    """Per layer of the layout: (blob size, bytes that fetching its footer and TOC takes, TOC entries)."""
    tocs = []
    for number, layer in enumerate(_layout_manifest(layout)[1]["layers"]):
        data = _blob(layout, layer["digest"]).read_bytes()
        footer = parse_footer(data[-FOOTER_SIZE:])
        assert footer is not None, "not eStargz"
        member = data[footer.toc_offset : len(data) - footer.size]
        entries = parse_toc(read_toc_member(member), number, footer.toc_offset).entries
        # The engine's first request takes the blob's last TAIL_GUESS bytes of a layer whose
        # descriptor names its TOC (our converter's do), and the rest of the TOC if it is larger.
        assert TOC_DIGEST_ANNOTATION in layer.get("annotations", {})
        tocs.append((len(data), max(min(TAIL_GUESS, len(data)), FOOTER_SIZE + len(member)), entries))
    return tocs


def _read_ahead_span(entries: list[Entry], last: Chunk) -> int:
    """Compressed bytes of the small one-chunk files within SMALL_FILE_SPAN after `last` in its
    blob, first to last: what the engine reads ahead once a file has been read to its end
    (unionfs/estargz/lazy.py, _read_neighbours)."""
    small = [e.chunks[0] for e in entries if e.chunks and len(e.chunks) == 1
             and e.chunks[0].blob_end - e.chunks[0].blob_offset <= SMALL_FILE_MAX]  # fmt: skip
    after = [c for c in small if c.blob_offset > last.blob_offset and c.blob_end - last.blob_end <= SMALL_FILE_SPAN]
    after.sort(key=lambda c: c.blob_offset)
    return after[-1].blob_end - after[0].blob_offset if after else 0


def _api_read(image: str, cache: Path) -> bytes:
    with open_image(image, cache_dir=cache) as view:
        return view.read(SMALL_FILE)


def _fsspec_read(image: str, cache: Path) -> bytes:
    fs = CrfsFileSystem(image=image, cache_dir=str(cache), skip_instance_cache=True)
    try:
        return bytes(fs.cat(SMALL_FILE))
    finally:
        fs.close()


def _command_read(image: str, cache: Path) -> bytes:
    run = subprocess.run([*COMMAND, "cat", "--cache-dir", str(cache), image, SMALL_FILE], capture_output=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == b""  # nothing left pending on close (the read-ahead of the next small files)
    return run.stdout


@pytest.mark.parametrize("read", [_command_read, _api_read, _fsspec_read], ids=["crfs-merge cat", "api", "fsspec"])
def test_reading_one_small_file_fetches_that_file_footers_and_tocs(
    read: Callable[[str, Path], bytes], estargz_registry: dict[str, Any], counting_proxy: FaultProxy, tmp_path: Path
) -> None:  # fmt: skip
    layout = estargz_registry["layout"]
    manifest_size, manifest = _layout_manifest(layout)
    tocs = _layer_tocs(layout)
    (entry,) = [e for _, _, entries in tocs for e in entries if e.path == SMALL_FILE]
    toc_entries = tocs[entry.layer][2]
    own = sum(c.blob_end - c.blob_offset for c in entry.chunks)
    ahead = _read_ahead_span(toc_entries, entry.chunks[-1])
    # The registry's answer to the API version check (GET /v2/), measured through the proxy.
    urllib.request.urlopen(f"http://{counting_proxy.host}/v2/").read()
    ping = counting_proxy.served_bytes
    before, pings_before = counting_proxy.served_bytes, counting_proxy.requests["other"]

    data = read(f"{counting_proxy.host}/{estargz_registry['repository']}", tmp_path / "cache")

    assert data == dict((m.name, m.data) for m in LAZY_LOWER)[SMALL_FILE]
    fetched = counting_proxy.served_bytes - before
    pings = counting_proxy.requests["other"] - pings_before
    opening = manifest_size + manifest["config"]["size"] + sum(toc for _, toc, _ in tocs)
    blobs = sum(size for size, _, _ in tocs)
    assert counting_proxy.requests["blob"] == 1  # the config: every layer byte came by range
    assert opening + own <= fetched <= opening + own + ahead + pings * ping, (fetched, opening, own, ahead)
    assert fetched < blobs / 100, (fetched, blobs)


def test_an_estargz_image_in_a_registry_reads_as_its_source_mounts(
    estargz_registry: dict[str, Any], counting_proxy: FaultProxy, mount: Mounter, crfs: Opener
) -> None:  # fmt: skip
    lazy = crfs(f"{counting_proxy.host}/{estargz_registry['repository']}")
    root = mount(estargz_registry["source"])
    expected = mount_view(root)
    without_ino = {p: {k: v for k, v in row.items() if k != "ino"} for p, row in fsspec_view(lazy).items()}
    assert without_ino == {p: {k: v for k, v in row.items() if k != "ino"} for p, row in expected.items()}
    for path, row in expected.items():
        if row["type"] == "file":
            assert hashlib.sha256(lazy.cat(path)).digest() == hashlib.sha256((root / path).read_bytes()).digest()
