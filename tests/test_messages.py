"""Every failure names the thing it is about: the layout's file, the repository and tag, the
blob; in one line, with status 1 and no traceback. And `--platform` is checked against a
single-platform image's config, as docker checks it."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from registry.manifest import Platform
from tests.conftest import COMMAND, ImageWriter, Mounter, require, unmount
from tests.registry_servers import REGISTRY_BINARY, Registry, skopeo_copy
from tests.tarvocab import f, tar_of

AMD64 = Platform("linux", "amd64")


def _failure(image: str, tmp_path: Path, *options: str) -> str:
    """Runs the real mount command on an image that cannot be mounted; returns its one line."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), "--timeout", "5", *options,
                          image, str(mountpoint)], capture_output=True, text=True, timeout=120)  # fmt: skip
    mounted = os.path.ismount(mountpoint)
    unmount(mountpoint)  # a wrongly successful mount must not outlive the test
    assert run.returncode == 1 and not mounted, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def _layout(root: Path, platform: Platform = AMD64) -> Path:
    write_layout(root, [tar_of(f("a", b"a"))], tag="latest", platform=platform)
    return root


def _manifest_digest(root: Path) -> str:
    return str(json.loads((root / "index.json").read_text())["manifests"][0]["digest"])


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _layer_digest(root: Path) -> str:
    manifest = json.loads(_blob(root, _manifest_digest(root)).read_bytes())
    return str(manifest["layers"][0]["digest"])


# --- local layouts ------------------------------------------------------------------------


def test_missing_index_json_names_the_layout(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path / "img")
    (root / "index.json").unlink()
    assert _failure(f"oci:{root}", tmp_path) == f"crfs-merge: {root}: not an OCI image layout (no index.json)"


@pytest.mark.parametrize(("content", "problem"), [
    ("{nope", "not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[]", "not a JSON object"),
    pytest.param("[" * 100_000 + "]" * 100_000,  # nested past the parser's depth: a RecursionError inside json
                 "not valid JSON: maximum recursion depth exceeded while decoding a JSON array from a unicode string",
                 id="nested-past-the-parsers-depth"),  # a short id: pytest puts it in the environment
    ('{"manifests": 3}', "manifest field 'manifests' is missing or not a list"),
    ('{"manifests": [{"digest": "sha256:00"}]}',
     "descriptor lacks a valid mediaType, digest or size: 'size'"),
])  # fmt: skip
def test_malformed_index_json_names_the_file(content: str, problem: str, tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path / "img")
    (root / "index.json").write_text(content)
    assert _failure(f"oci:{root}", tmp_path) == f"crfs-merge: {root}/index.json: {problem}"


def test_missing_tag_names_the_layout_and_its_tags(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path / "img")
    expected = f"crfs-merge: {root}: no image tagged 'v9' (tags: latest)"
    assert _failure(f"oci:{root}:v9", tmp_path) == expected


def test_missing_blobs_name_the_layout_and_digest(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path / "img")
    layer = _layer_digest(root)
    _blob(root, layer).unlink()
    assert _failure(f"oci:{root}", tmp_path) == (
        f"crfs-merge: {root}: blob {layer} (application/vnd.oci.image.layer.v1.tar+gzip) is missing from the image"
    )
    manifest = _manifest_digest(root)
    _blob(root, manifest).unlink()
    assert _failure(f"oci:{root}", tmp_path) == (
        f"crfs-merge: {root}: blob {manifest} (application/vnd.oci.image.manifest.v1+json) is missing from the image"
    )


def _replace_manifest(root: Path, data: bytes) -> str:
    """Stores `data` as the layout's manifest, under its digest; returns that digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(root, digest).write_bytes(data)
    index = json.loads((root / "index.json").read_text())
    index["manifests"][0].update(digest=digest, size=len(data))
    (root / "index.json").write_text(json.dumps(index))
    return digest


def test_malformed_manifest_names_the_layout_and_digest(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path / "img")
    digest = _replace_manifest(root, b'{"layers": []}')
    expected = f"crfs-merge: {root}: {digest}: descriptor is not a JSON object"
    assert _failure(f"oci:{root}", tmp_path) == expected


def test_unknown_layer_type_names_the_layout_and_layer(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path / "img")
    manifest = json.loads(_blob(root, _manifest_digest(root)).read_bytes())
    manifest["layers"][0]["mediaType"] = "application/vnd.example.layer.v1"
    _replace_manifest(root, json.dumps(manifest).encode())
    layer = manifest["layers"][0]["digest"]
    expected = f"crfs-merge: {root}: layer {layer}: unknown layer media type 'application/vnd.example.layer.v1'"
    assert _failure(f"oci:{root}", tmp_path) == expected


def test_platform_of_a_single_platform_layout_is_checked(tmp_path: Path, mount: Mounter) -> None:
    root = _layout(tmp_path / "img", AMD64)
    expected = f"crfs-merge: {root}: image platform linux/amd64 does not match the requested linux/arm64"
    assert _failure(f"oci:{root}", tmp_path, "--platform", "linux/arm64") == expected
    assert (mount(f"oci:{root}", "--platform", "linux/amd64") / "a").read_bytes() == b"a"
    # Without --platform, the host's platform is only a preference: the image mounts anyway.
    other = _layout(tmp_path / "other", Platform("linux", "s390x"))
    assert (mount(f"oci:{other}") / "a").read_bytes() == b"a"


def test_platform_of_a_legacy_archive_is_checked(tmp_path: Path, fuse_works: None) -> None:
    layer = tar_of(f("a", b"a"))
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"os": "linux", "architecture": "arm", "variant": "v7",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()  # fmt: skip
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l.tar"]}]).encode()
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as out:
        for name, data in (("manifest.json", manifest), ("c.json", config), ("l.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    expected = f"crfs-merge: {archive}: image platform linux/arm/v7 does not match the requested linux/arm/v6"
    assert _failure(f"docker-archive:{archive}", tmp_path, "--platform", "linux/arm/v6") == expected


# --- a real registry ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry on loopback holding test/img:latest, a linux/amd64 image."""
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(shutil.which("skopeo") is not None, "skopeo is missing (apt-get install skopeo)")
    root = tmp_path_factory.mktemp("registry")
    layout = _layout(root / "layout", AMD64)
    server = Registry(root)
    try:
        skopeo_copy(f"oci:{layout}:latest", f"docker://{server.host}/test/img:latest")
        skopeo_copy(f"oci:{layout}:latest", f"docker://{server.host}/test/gone:latest")
        yield server
    finally:
        server.stop()


def test_missing_tag_in_a_registry_names_repository_and_tag(registry: Registry, tmp_path: Path,
                                                           fuse_works: None) -> None:  # fmt: skip
    expected = f"crfs-merge: {registry.host}/test/img:absent: manifest not found"
    assert _failure(f"{registry.host}/test/img:absent", tmp_path) == expected
    digest = "sha256:" + "0" * 64
    expected = f"crfs-merge: {registry.host}/test/img@{digest}: manifest not found"
    assert _failure(f"{registry.host}/test/img@{digest}", tmp_path) == expected


def test_missing_blob_in_a_registry_names_repository_and_digest(registry: Registry, tmp_path: Path,
                                                               fuse_works: None) -> None:  # fmt: skip
    layer = _registry_layer(registry)
    request = urllib.request.Request(f"http://{registry.host}/v2/test/gone/blobs/{layer}", method="DELETE")
    urllib.request.urlopen(request, timeout=10).close()
    expected = f"crfs-merge: {registry.host}/test/gone@{layer}: blob not found"
    assert _failure(f"{registry.host}/test/gone:latest", tmp_path) == expected


def _registry_layer(registry: Registry) -> str:
    """Returns the digest of the layer of test/gone, as the registry serves its manifest."""
    request = urllib.request.Request(f"http://{registry.host}/v2/test/gone/manifests/latest",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(json.loads(answer.read())["layers"][0]["digest"])


def test_platform_of_a_single_platform_registry_image_is_checked(registry: Registry, tmp_path: Path,
                                                                 mount: Mounter) -> None:  # fmt: skip
    image = f"{registry.host}/test/img:latest"
    expected = f"crfs-merge: {image}: image platform linux/amd64 does not match the requested linux/arm64"
    assert _failure(image, tmp_path, "--platform", "linux/arm64") == expected
    assert (mount(image, "--platform", "linux/amd64") / "a").read_bytes() == b"a"


# --- names too long for any file system ---------------------------------------------------


def test_a_name_longer_than_name_max_is_enametoolong(oci_image: ImageWriter, mount: Mounter) -> None:
    """ext4 and tmpfs answer ENAMETOOLONG for a name over 255 bytes; the kernel hands FUSE
    names of up to 1024 bytes and answers longer ones itself."""
    root = mount(oci_image([f("a", b"a")]))
    for length, expected in ((255, errno.ENOENT), (256, errno.ENAMETOOLONG), (1024, errno.ENAMETOOLONG),
                             (1025, errno.ENAMETOOLONG)):  # fmt: skip
        for path in (root / ("x" * length), root / ("x" * length) / "a"):
            with pytest.raises(OSError) as raised:
                os.stat(path)
            assert raised.value.errno == expected, (length, path.name)
