"""One contract for every local source: each resolves to the same verified layers and tree."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.errors import ImageError, ManifestError
from registry.layout_writer import write_layout
from registry.local import resolve_image
from registry.manifest import Platform
from registry.media_types import Compression
from registry.reference import ImageReference
from tests.merge_helpers import describe
from tests.tarvocab import d, f, opq, sym, tar_of, wh
from unionfs.build import build
from unionfs.layer_store import LayerStore

LAYERS = [
    tar_of(d("etc/"), f("etc/hosts", b"127.0.0.1\n"), f("etc/motd", b"hi"), sym("etc/mtab", "/proc/mounts")),
    tar_of(wh("etc/motd"), opq("var"), f("var/log", b"log")),
]
EXPECTED = {
    "/etc": "dir",
    "/etc/hosts": "file:127.0.0.1\n",
    "/etc/mtab": "link->/proc/mounts",
    "/var": "dir",
    "/var/log": "file:log",
}


def _tar_directory(source: Path, target: Path) -> None:
    with tarfile.open(target, "w") as archive:
        for path in sorted(source.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(source)), recursive=False)


def oci_layout(tmp: Path) -> str:
    write_layout(tmp / "layout", LAYERS, Compression.GZIP, tag="v1")
    return f"oci:{tmp / 'layout'}:v1"


def oci_layout_bare_path(tmp: Path) -> str:
    write_layout(tmp / "layout", LAYERS, Compression.ZSTD)
    return str(tmp / "layout")


def docker_archive_legacy(tmp: Path) -> str:
    """The form `docker save` wrote before Docker 25: manifest.json, config, id/layer.tar."""
    staging = tmp / "staging"
    staging.mkdir()
    names = []
    for number, layer in enumerate(LAYERS):
        (staging / f"layer{number}").mkdir()
        (staging / f"layer{number}" / "layer.tar").write_bytes(layer)
        names.append(f"layer{number}/layer.tar")
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in LAYERS]
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    (staging / "cfg.json").write_bytes(config)
    manifest = [{"Config": "cfg.json", "RepoTags": ["example.com/seed:v1"], "Layers": names}]
    (staging / "manifest.json").write_text(json.dumps(manifest))
    _tar_directory(staging, tmp / "saved.tar")
    return f"docker-archive:{tmp / 'saved.tar'}"


def docker_archive_oci(tmp: Path) -> str:
    """The form of newer `docker save`: an OCI layout (index.json, blobs/) in a tar."""
    write_layout(tmp / "layout", LAYERS, Compression.NONE)
    _tar_directory(tmp / "layout", tmp / "oci.tar")
    return str(tmp / "oci.tar")


SOURCES: list[Callable[[Path], str]] = [oci_layout, oci_layout_bare_path, docker_archive_legacy, docker_archive_oci]


@pytest.mark.parametrize("make_source", SOURCES, ids=[s.__name__ for s in SOURCES])
def test_every_source_gives_the_same_tree(make_source: Callable[[Path], str], tmp_path: Path) -> None:
    reference = ImageReference.parse(make_source(tmp_path))
    image = resolve_image(reference, Platform.host())
    mounted = build(image, LayerStore(tmp_path / "cache", print))
    seen = {}
    for path, inode in mounted.tree.items():
        entry = inode.entry
        data = mounted.content.read(entry, 0, entry.size).decode()
        seen[f"/{path}" if path else "/"] = f"file:{data}" if entry.is_regular else describe(entry, [])
    assert seen == {"/": "dir", **EXPECTED}


def test_docker_archive_picks_the_named_image(tmp_path: Path) -> None:
    path = docker_archive_legacy(tmp_path)
    image = resolve_image(ImageReference.parse(f"{path}:example.com/seed:v1"), Platform.host())
    assert len(image.layers) == 2
    with pytest.raises(ManifestError, match="no image 'other'"):
        resolve_image(ImageReference.parse(f"{path}:other"), Platform.host())


def test_layout_tags(tmp_path: Path) -> None:
    write_layout(tmp_path / "l", LAYERS[:1], tag="one")
    write_layout(tmp_path / "l", LAYERS, tag="two")
    assert len(resolve_image(ImageReference.parse(f"oci:{tmp_path / 'l'}:two"), Platform.host()).layers) == 2
    with pytest.raises(ManifestError, match=r"2 images and no tag given \(tags: one, two\)"):
        resolve_image(ImageReference.parse(f"oci:{tmp_path / 'l'}"), Platform.host())
    with pytest.raises(ManifestError, match="no image tagged 'three'"):
        resolve_image(ImageReference.parse(f"oci:{tmp_path / 'l'}:three"), Platform.host())


@pytest.mark.parametrize(
    ("text", "transport", "path", "tag"),
    [
        ("oci:/x/y", "oci", "/x/y", None),
        ("oci:/x/y:v2", "oci", "/x/y", "v2"),
        ("docker-archive:/a.tar", "docker-archive", "/a.tar", None),
        ("docker-archive:/a.tar:repo:tag", "docker-archive", "/a.tar", "repo:tag"),
        ("docker://quay.io/a/b:c", "docker", "quay.io/a/b:c", None),
        ("alpine", "docker", "docker.io/library/alpine:latest", None),
        ("127.0.0.1:5000/x:y", "docker", "127.0.0.1:5000/x:y", None),
    ],
)
def test_reference_parsing(text: str, transport: str, path: str, tag: str | None) -> None:
    reference = ImageReference.parse(text)
    assert (reference.transport, reference.path, reference.tag) == (transport, path, tag)


@pytest.mark.parametrize("text", ["", "oci:", "oci:/x:", "./missing/dir", "/no/such/file.tar"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(ImageError):
        ImageReference.parse(text)


def test_index_platform_selection(tmp_path: Path) -> None:
    from registry.manifest import Index, decode, select_platform

    index = decode(json.dumps({"manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "digest": "sha256:" + "a" * 64,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "digest": "sha256:" + "b" * 64,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode())  # fmt: skip
    assert isinstance(index, Index)
    assert select_platform(index, Platform.parse("linux/amd64")).digest.hex == "b" * 64
    assert select_platform(index, Platform.parse("linux/arm/v7")).digest.hex == "a" * 64
    with pytest.raises(ManifestError, match=r"available: linux/amd64, linux/arm/v7"):
        select_platform(index, Platform.parse("linux/s390x"))


def test_manifest_json_that_is_not_an_object_is_refused() -> None:
    from registry.manifest import decode

    for bad in (b"[]", b"{", b"\xff", json.dumps({"mediaType": "text/plain"}).encode()):
        with pytest.raises(ManifestError):
            decode(bad)
