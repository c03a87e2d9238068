"""One contract for every local source: each resolves to the same verified layers and tree."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.errors import ImageError, ManifestError
from registry.layout_writer import write_index, write_layout
from registry.local import resolve_image
from registry.manifest import Platform
from registry.media_types import Compression
from registry.reference import ImageReference
from tests.conftest import require
from tests.merge_helpers import describe
from tests.tarvocab import d, f, opq, sym, tar_of, wh
from unionfs.build import build
from unionfs.storage.layer_store import LayerStore

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


def skopeo_dir(tmp: Path, *options: str) -> Path:
    """Returns a directory that real skopeo wrote with its dir: transport from an OCI layout."""
    skopeo = shutil.which("skopeo")
    require(skopeo is not None, "skopeo is missing (apt-get install skopeo)")
    write_layout(tmp / "layout", LAYERS, Compression.GZIP, tag="v1")
    target = tmp / "dir-image"
    subprocess.run([str(skopeo), "copy", "--insecure-policy", *options, f"oci:{tmp / 'layout'}:v1", f"dir:{target}"],
                   check=True, capture_output=True)  # fmt: skip
    return target


def dir_transport(tmp: Path) -> str:
    """`skopeo copy oci:... dir:DIR`: the OCI manifest as is, blobs named by hex."""
    return f"dir:{skopeo_dir(tmp)}"


def dir_transport_docker_schema2(tmp: Path) -> str:
    """The same with `--format v2s2`, as `podman save --format docker-dir` writes it."""
    return f"dir:{skopeo_dir(tmp, '--format', 'v2s2')}"


def dir_transport_bare_path(tmp: Path) -> str:
    return str(skopeo_dir(tmp))


SOURCES: list[Callable[[Path], str]] = [
    oci_layout, oci_layout_bare_path, docker_archive_legacy, docker_archive_oci,
    dir_transport, dir_transport_docker_schema2, dir_transport_bare_path,
]  # fmt: skip


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
        ("dir:/x/y", "dir", "/x/y", None),
        ("dir:/x/y:z", "dir", "/x/y:z", None),
        ("docker://quay.io/a/b:c", "docker", "quay.io/a/b:c", None),
        ("alpine", "docker", "docker.io/library/alpine:latest", None),
        ("127.0.0.1:5000/x:y", "docker", "127.0.0.1:5000/x:y", None),
    ],
)
def test_reference_parsing(text: str, transport: str, path: str, tag: str | None) -> None:
    reference = ImageReference.parse(text)
    assert (reference.transport, reference.path, reference.tag) == (transport, path, tag)


@pytest.mark.parametrize("text", ["", "oci:", "oci:/x:", "dir:", "./missing/dir", "/no/such/file.tar"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(ImageError):
        ImageReference.parse(text)


def test_a_bare_directory_is_a_dir_image_only_with_its_version_file_and_no_index(tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", LAYERS)
    (tmp_path / "layout" / "manifest.json").write_text("{}")  # as an unpacked `docker save` has
    (tmp_path / "layout" / "version").write_text("Directory Transport Version: 1.1\n")
    assert ImageReference.parse(str(tmp_path / "layout")).transport == "oci"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "manifest.json").write_text("{}")
    assert ImageReference.parse(str(tmp_path / "dir")).transport == "oci"  # no version file
    (tmp_path / "dir" / "version").write_text("Directory Transport Version: 1.1\n")
    assert ImageReference.parse(str(tmp_path / "dir")).transport == "dir"


def test_a_dir_image_of_an_index_picks_the_platform(tmp_path: Path) -> None:
    """`skopeo copy --all` writes the index as manifest.json, each instance as HEX.manifest.json."""
    skopeo = shutil.which("skopeo")
    require(skopeo is not None, "skopeo is missing (apt-get install skopeo)")
    layout = tmp_path / "layout"
    write_layout(layout, LAYERS[:1], tag="arm", platform=Platform.parse("linux/arm64"))
    write_layout(layout, LAYERS, tag="amd", platform=Platform.parse("linux/amd64"))
    write_index(layout, ["arm", "amd"], "multi")
    subprocess.run([str(skopeo), "copy", "--insecure-policy", "--all", f"oci:{layout}:multi", f"dir:{tmp_path / 'd'}"],
                   check=True, capture_output=True)  # fmt: skip
    assert len(list((tmp_path / "d").glob("*.manifest.json"))) == 2
    reference = ImageReference.parse(f"dir:{tmp_path / 'd'}")
    assert len(resolve_image(reference, Platform.parse("linux/amd64")).layers) == 2
    assert len(resolve_image(reference, Platform.parse("linux/arm64")).layers) == 1
    with pytest.raises(ManifestError, match="no image for platform linux/s390x"):
        resolve_image(reference, Platform.parse("linux/s390x"))


def test_dir_images_that_are_not_there_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no manifest\.json"):
        resolve_image(ImageReference.parse(f"dir:{tmp_path}"), Platform.host())
    (tmp_path / "manifest.json").write_text("[")
    with pytest.raises(ManifestError, match=r"manifest.json: "):
        resolve_image(ImageReference.parse(f"dir:{tmp_path}"), Platform.host())


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
