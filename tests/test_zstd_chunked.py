"""zstd:chunked images as podman writes them: podman (a private storage, configuration and
run directory) builds an image, pushes it to a loopback registry as zstd:chunked, as plain
zstd and as gzip, and pulls the zstd:chunked one back. The oracles: umoci's unpack of the
gzip form, and `podman image mount` of what podman pulled."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from registry.digest import Digest
from tests.conftest import COMMAND, Mounter, require
from tests.podman import Podman
from tests.registry_servers import REGISTRY_BINARY, Fault, FaultProxy, Registry, skopeo_copy
from tests.tarvocab import d, dev, f, fifo, hl, sym, tar_of
from tests.test_mount import umoci_unpack, umoci_view
from tests.test_toc_one_pass import _facts
from tests.test_zstd_toc_one_pass import whole_zstd_toc
from unionfs.aio import EventLoopThread
from unionfs.estargz.toc import read_one_pass
from unionfs.storage.layer_store import missing_tar_padding
from unionfs.zstdchunked.toc import TocPosition, _with_chunk_digest

MIB = 1024 * 1024
BIG = os.urandom(4 * MIB)  # incompressible, so that bytes on the wire are real; many chunks
ONE_MIB = os.urandom(MIB)
PAGES = {f"docs/page{i:03}": f"page {i}\n".encode() * (20 + i) for i in range(100)}
# The hardlink's header repeats its target's metadata, as tar writes it: podman applies a
# hardlink header's mode and owner to the shared inode, where tar and umoci ignore them.
# podman imports this tar as the base layer as it is: Python's tarfile pads it to a whole
# 10240-byte record, which podman 4.3's zstd:chunked writer leaves out of the stream.
BASE = [d("data/"), f("data/big", BIG), f("data/one", ONE_MIB), f("data/empty"), d("docs/"),
        *(f(name, data) for name, data in PAGES.items()), f("etc/motd", b"hello\n", mode=0o600, uid=7, gid=8),
        d("etc/"), sym("etc/link", "motd"), hl("etc/motd-again", "etc/motd", mode=0o600, uid=7, gid=8),
        fifo("run-fifo"), dev("null", "c", 1, 3),
        f("etc/config", b"key=value\n" * 100, xattrs={"user.k": "v"})]  # fmt: skip
ADDED = {"etc/motd": b"replaced by the second layer\n", "added/new": b"new file\n" * 1000}
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
POSITION = "io.containers.zstd-chunked.manifest-position"
CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
FORMS = ("zstd:chunked", "zstd", "gzip")


def _manifest(host: str, repository: str) -> dict[str, object]:
    request = urllib.request.Request(f"http://{host}/v2/{repository}/manifests/v1", headers={"Accept": MANIFEST})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return dict(json.load(answer))


def _put_manifest(host: str, repository: str, tag: str, manifest: dict[str, object]) -> None:
    url = f"http://{host}/v2/{repository}/manifests/{tag}"
    data = json.dumps(manifest).encode()
    request = urllib.request.Request(url, method="PUT", data=data, headers={"Content-Type": MANIFEST})
    urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The registry's host, the gzip form as umoci unpacked it, podman's own mount of the
    zstd:chunked image it pulled, and the zstd:chunked manifest."""
    require(shutil.which("podman") is not None, "podman is missing (apt-get install podman)")
    require(os.geteuid() == 0, "podman image mount needs root")
    require(shutil.which("skopeo") is not None and shutil.which("umoci") is not None, "skopeo or umoci is missing")
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing")
    root = tmp_path_factory.mktemp("zstd-chunked")
    # A registry per form: podman 4.3 reuses a layer blob that the registry already holds in
    # another compression (it has no --force-compression), so one registry would hold one form.
    registries: dict[str, Registry] = {}
    builder, puller = Podman(root / "builder"), Podman(root / "puller")
    try:
        for form in FORMS:
            (root / form).mkdir()
            registries[form] = Registry(root / form)
        (root / "base.tar").write_bytes(tar_of(*BASE))
        builder("import", str(root / "base.tar"), "localhost/base:v1")
        context = root / "context"
        for path, data in ADDED.items():
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            (context / path).write_bytes(data)
        (context / "Containerfile").write_text("FROM localhost/base:v1\nCOPY etc/ /etc/\nCOPY added/ /added/\n")
        builder("build", "--quiet", "-t", "localhost/image:v1", str(context))
        for form, registry in registries.items():
            destination = f"docker://{registry.host}/{form.replace(':', '-')}:v1"
            builder("push", "--tls-verify=false", "--compression-format", form, "localhost/image:v1", destination)
        skopeo_copy(f"docker://{registries['gzip'].host}/gzip:v1", f"oci:{root / 'gzip-layout'}:v1",
                    "--src-tls-verify=false")  # fmt: skip
        host, plain = registries["zstd:chunked"].host, registries["zstd"].host
        reference = f"{host}/zstd-chunked:v1"
        puller("pull", "--quiet", "--tls-verify=false", reference)
        podman_tree = umoci_view(Path(puller("image", "mount", reference)))
        puller("image", "unmount", reference)
        umoci_tree = umoci_view(umoci_unpack("umoci", f"oci:{root / 'gzip-layout'}:v1", root / "umoci"))
        yield {"host": host, "plain": plain, "gzip": registries["gzip"].host, "podman": podman_tree,
               "umoci": umoci_tree, "manifest": _manifest(host, "zstd-chunked")}  # fmt: skip
    finally:
        for registry in registries.values():
            registry.stop()


@pytest.fixture
def proxy(images: dict[str, object]) -> Iterator[FaultProxy]:
    with EventLoopThread() as loop:
        counting = FaultProxy(str(images["host"]), loop)
        counting.start()
        yield counting
        counting.stop()


def _layers(images: dict[str, object]) -> list[dict[str, object]]:
    manifest = images["manifest"]
    assert isinstance(manifest, dict)
    return list(manifest["layers"])


def test_podman_wrote_zstd_chunked_with_its_annotations(images: dict[str, object]) -> None:
    layers = _layers(images)
    assert len(layers) == 3  # the import, and a layer per COPY
    for layer in layers:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        assert {POSITION, CHECKSUM} <= set(layer["annotations"])


def test_podmans_tocs_are_read_in_one_pass_as_the_whole_document_reads_them(images: dict[str, object]) -> None:
    for layer in _layers(images):
        annotations = layer["annotations"]
        assert isinstance(annotations, dict)
        offset, length, uncompressed, _ = (int(part) for part in annotations[POSITION].split(":"))
        blob = _blob(str(images["host"]), "zstd-chunked", str(layer["digest"]))
        toc_json = zstandard.ZstdDecompressor().decompress(blob[offset : offset + length])
        position = TocPosition(offset, length, uncompressed, "")
        one_pass = read_one_pass(toc_json, 1, position.frame_start, _with_chunk_digest, end_offsets=True)
        assert one_pass is not None  # taken, not left to the whole-document reader
        assert _facts(one_pass) == _facts(whole_zstd_toc(toc_json, 1, position))


def test_the_oracles_agree(images: dict[str, object]) -> None:
    assert images["podman"] == images["umoci"]


def test_lazy_mount_equals_umoci_and_podman(images: dict[str, object], proxy: FaultProxy, mount: Mounter) -> None:
    root = mount(f"{proxy.host}/zstd-chunked:v1", "--prefetch", "none")
    tocs = sum(int(str(layer["annotations"][POSITION]).split(":")[1]) for layer in _layers(images))
    manifest_and_config = 8192
    # The TOC frames and the footers; the manifest and the config; no layer bytes.
    assert proxy.served_bytes < tocs + 2 * 64 + manifest_and_config, (proxy.served_bytes, tocs)
    assert proxy.requests["blob"] == 1  # the config; the layers only through ranges
    tree = umoci_view(root)
    assert tree == images["umoci"]
    assert tree == images["podman"]


def test_reading_one_file_fetches_about_that_file(proxy: FaultProxy, mount: Mounter) -> None:
    root = mount(f"{proxy.host}/zstd-chunked:v1", "--prefetch", "none")
    before = proxy.served_bytes
    assert (root / "data/one").read_bytes() == ONE_MIB
    fetched = proxy.served_bytes - before
    assert MIB <= fetched < 1.1 * MIB, fetched


def test_a_corrupted_chunk_reads_as_eio_never_as_wrong_bytes(proxy: FaultProxy, mount: Mounter) -> None:
    root = mount(f"{proxy.host}/zstd-chunked:v1", "--prefetch", "none", "--timeout", "2")
    proxy.faults = [Fault("corrupt", 100)]
    with pytest.raises(OSError) as raised:
        (root / "data/big").read_bytes()
    assert raised.value.errno == errno.EIO
    proxy.faults = []
    assert (root / "data/big").read_bytes() == BIG


def test_a_toc_that_does_not_match_its_annotation_is_refused(
    images: dict[str, object], tmp_path: Path, fuse_works: None
) -> None:
    manifest = json.loads(json.dumps(images["manifest"]))
    manifest["layers"][0]["annotations"][CHECKSUM] = "sha256:" + "0" * 64
    _put_manifest(str(images["host"]), "zstd-chunked", "tampered", manifest)
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), f"{images['host']}/zstd-chunked:tampered",
                          str(mountpoint)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "TOC of zstd:chunked layer" in run.stderr and "manifest-checksum" in run.stderr, run.stderr
    assert "expected sha256:000" in run.stderr, run.stderr
    assert not os.path.ismount(mountpoint)


def test_plain_zstd_is_fetched_whole(images: dict[str, object], mount: Mounter) -> None:
    with EventLoopThread() as loop:
        proxy = FaultProxy(str(images["plain"]), loop)
        proxy.start()
        try:
            root = mount(f"{proxy.host}/zstd:v1")
            assert proxy.requests["range"] == 0 and proxy.requests["blob"] == 4  # the config and the three layers
            assert umoci_view(root) == images["umoci"]
        finally:
            proxy.stop()


def test_zstd_chunked_fetched_whole_matches_its_diff_ids(images: dict[str, object], tmp_path: Path,
                                                         mount: Mounter) -> None:  # fmt: skip
    """The whole-layer path (convert fetches layers whole): the base layer's stream lacks the
    tar's record padding, and is accepted only as the tar its diff_id names, padding restored."""
    cache = tmp_path / "cache"
    run = subprocess.run([*COMMAND, "convert", "-v", "--cache-dir", str(cache), f"{images['host']}/zstd-chunked:v1",
                          f"oci:{tmp_path / 'converted'}:v1"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "zero padding its zstd stream left out" in run.stderr, run.stderr
    config = json.loads(_blob(str(images["host"]), "zstd-chunked", str(images["manifest"]["config"]["digest"])))
    tars = sorted((cache / "tars").iterdir())
    assert sorted(_sha256(tar) for tar in tars) == sorted(config["rootfs"]["diff_ids"])
    assert umoci_view(mount(f"oci:{tmp_path / 'converted'}:v1")) == images["umoci"]


def _blob(host: str, repository: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"http://{host}/v2/{repository}/blobs/{digest}", timeout=30) as answer:
        return bytes(answer.read())


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_mount_reads_the_tocs_from_the_cache(proxy: FaultProxy, mount: Mounter, tmp_path: Path) -> None:
    first = mount(f"{proxy.host}/zstd-chunked:v1", "--prefetch", "none", cache=tmp_path / "shared")
    ranges = proxy.requests["range"]
    second = mount(f"{proxy.host}/zstd-chunked:v1", "--prefetch", "none", cache=tmp_path / "shared")
    assert proxy.requests["range"] == ranges, "the second mount fetched a TOC again"
    assert (second / "data/one").read_bytes() == (first / "data/one").read_bytes() == ONE_MIB


def test_convert_writes_zstd_chunked_that_podman_and_our_lazy_mount_read(
    images: dict[str, object], proxy: FaultProxy, mount: Mounter, tmp_path: Path
) -> None:
    run = subprocess.run([*COMMAND, "convert", "--format", "zstd:chunked", "--chunk-size", "262144", "--cache-dir",
                          str(tmp_path / "cc"), f"{images['gzip']}/gzip:v1", f"{images['host']}/converted:v1"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    root = mount(f"{proxy.host}/converted:v1", "--prefetch", "none")
    assert proxy.requests["blob"] == 1  # the config; the layers only through ranges
    assert umoci_view(root) == images["umoci"]
    puller = Podman(tmp_path / "podman")
    reference = f"{images['host']}/converted:v1"
    puller("pull", "--quiet", "--tls-verify=false", reference)
    try:
        assert umoci_view(Path(puller("image", "mount", reference))) == images["umoci"]
    finally:
        puller("image", "unmount", reference)


# --- the padding that podman 4.3's zstd:chunked writer leaves out (pure) ----------------


def _hashed(data: bytes) -> hashlib._Hash:
    return hashlib.sha256(data)


@pytest.mark.parametrize("missing", [512, 5120, 8192])
def test_missing_tar_padding_is_restored_up_to_one_record(missing: int) -> None:
    tar = tar_of(f("a", b"x" * 700))
    assert len(tar) % 10240 == 0 and tar.endswith(bytes(missing))
    diff_id = Digest.parse(_sha256_of(tar))
    assert missing_tar_padding(_hashed(tar[:-missing]), diff_id) == missing
    assert missing_tar_padding(_hashed(tar), diff_id) == 0  # nothing missing


def test_missing_bytes_that_are_not_padding_are_not_restored() -> None:
    tar = tar_of(f("a", b"x" * 700))
    diff_id = Digest.parse(_sha256_of(tar))
    assert missing_tar_padding(_hashed(tar[:-10240 - 512]), diff_id) == 0  # more than one record
    ends_in_data = tar[:-512] + b"\x01" + bytes(511)  # the last block is not all zeros
    diff_id = Digest.parse(_sha256_of(ends_in_data))
    assert missing_tar_padding(_hashed(ends_in_data[:-511]), diff_id) == 0  # zeros, but not whole blocks
    assert missing_tar_padding(_hashed(ends_in_data[:-1024]), diff_id) == 0  # a missing byte that is not zero
    assert missing_tar_padding(_hashed(ends_in_data[:-512]), diff_id) == 0


def _sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
