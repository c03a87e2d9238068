"""Hostile and broken images: a clear one-line error at mount time, never a crash, a hang,
wrong bytes, or a file outside the mount."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from registry.media_types import Compression
from tests.conftest import COMMAND, Mounter
from tests.tarvocab import f, hl, sym, tar_of

CLEAN = tar_of(f("ok", b"fine"))


def _mount_error(image: str, tmp_path: Path) -> str:
    """Runs the real command on a broken image; returns its one-line error."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert not os.path.ismount(mountpoint)
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("crfs-merge: ")]
    assert lines, run.stderr
    return lines[-1]


def _layout(tmp_path: Path, *tars: bytes, compression: Compression = Compression.GZIP) -> Path:
    root = tmp_path / "image"
    write_layout(root, list(tars), compression)
    return root


def _manifest(root: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    index = json.loads((root / "index.json").read_text())
    path = root / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    return path, json.loads(path.read_bytes())


def _rewrite_manifest(root: Path, manifest: dict) -> None:  # type: ignore[type-arg]
    """Stores a changed manifest under its new digest, so only the layer is at fault."""
    _rewrite_manifest_bytes(root, json.dumps(manifest).encode())


def _rewrite_manifest_bytes(root: Path, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    index = json.loads((root / "index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (root / "index.json").write_text(json.dumps(index))


def _layer_blob(root: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    _, manifest = _manifest(root)
    return root / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":")[1], manifest


def test_truncated_gzip_layer(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path, CLEAN, tar_of(f("big", os.urandom(200_000))))
    blob, manifest = _layer_blob(root)
    truncated = blob.read_bytes()[:-5000]
    blob.write_bytes(truncated)
    assert "has" in _mount_error(f"oci:{root}", tmp_path)  # size differs from the descriptor
    # Make the descriptor agree with the short blob: now only the gzip stream is at fault.
    digest = hashlib.sha256(truncated).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(truncated)
    manifest["layers"][-1].update(digest=f"sha256:{digest}", size=len(truncated))
    _rewrite_manifest(root, manifest)
    assert "not valid gzip" in _mount_error(f"oci:{root}", tmp_path)


def test_blob_whose_digest_does_not_match(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path, CLEAN, compression=Compression.NONE)
    blob, _ = _layer_blob(root)
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF  # inside the file's bytes: the tar stays well formed
    blob.write_bytes(bytes(data))
    assert "expected sha256:" in _mount_error(f"oci:{root}", tmp_path)


def test_manifest_naming_a_missing_blob(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path, CLEAN, tar_of(f("x")))
    blob, _ = _layer_blob(root)
    blob.unlink()
    assert "is missing from the image" in _mount_error(f"oci:{root}", tmp_path)


def test_malformed_manifest_and_tar(tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path, CLEAN)
    path, _ = _manifest(root)
    path.write_bytes(b"{not json")
    assert "its descriptor says" in _mount_error(f"oci:{root}", tmp_path)  # the size check comes first
    _rewrite_manifest_bytes(root, b"{not json")  # now the digest holds and only the JSON is wrong
    assert "not valid JSON" in _mount_error(f"oci:{root}", tmp_path)
    garbage = _layout(tmp_path / "g", os.urandom(4096), compression=Compression.NONE)
    assert "malformed tar" in _mount_error(f"oci:{garbage}", tmp_path)


@pytest.mark.parametrize(
    ("media_type", "message"),
    [
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "foreign"),
        ("application/vnd.example.layer.v1", "unknown layer media type"),
    ],
)
def test_unsupported_layer_types(media_type: str, message: str, tmp_path: Path, fuse_works: None) -> None:
    root = _layout(tmp_path, CLEAN)
    _, manifest = _manifest(root)
    manifest["layers"][0]["mediaType"] = media_type
    _rewrite_manifest(root, manifest)
    assert message in _mount_error(f"oci:{root}", tmp_path)


def test_escaping_paths_stay_inside(tmp_path: Path, mount: Mounter) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = tar_of(
        f("../../x", b"up"),
        f(f"../../../../../..{outside}/planted", b"evil"),
        f("/abs", b"absolute"),
        hl("link", "../../../../etc/passwd"),
        sym("esc", str(outside)),
    )
    upper = tar_of(f("esc/through-symlink", b"not outside"))
    root = _layout(tmp_path, hostile, upper)
    mounted = mount(f"oci:{root}")
    # The symlink parent is followed inside the image root, as containerd does: the file lands
    # in the image's own copy of the path the link names, and the link stays.
    assert sorted(os.listdir(mounted)) == ["abs", "esc", outside.parts[1]]
    assert (mounted / "abs").read_bytes() == b"absolute"
    assert os.readlink(mounted / "esc") == str(outside)
    assert (mounted / str(outside).lstrip("/") / "through-symlink").read_bytes() == b"not outside"
    assert os.listdir(outside) == []


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["oci:/nonexistent", str(tmp_path)], 1, "not an OCI image layout"),
        ([str(tmp_path / "absent.tar"), str(tmp_path)], 1, "no such file"),
        (["127.0.0.1:5000/Upper/case:t", str(tmp_path)], 1, "invalid repository name component 'Upper'"),
        (["oci:/x", str(tmp_path / "no-dir")], 2, "mountpoint is not an existing directory"),
        (["oci:/x", str(tmp_path), "-o", "rw"], 2, "read-only"),
    ]
    for argv, status, message in cases:
        run = subprocess.run([*COMMAND, *argv], capture_output=True, text=True, timeout=60)
        assert (run.returncode, message in run.stderr) == (status, True), run.stderr
        assert "Traceback" not in run.stderr


def test_gzip_with_trailing_garbage_is_refused(tmp_path: Path, fuse_works: None) -> None:
    bad = gzip.compress(CLEAN) + b"garbage that is not gzip"
    root = _layout(tmp_path, CLEAN, compression=Compression.NONE)
    blob, manifest = _layer_blob(root)
    digest = hashlib.sha256(bad).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(bad)
    manifest["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+gzip",
                                 digest=f"sha256:{digest}", size=len(bad))  # fmt: skip
    _rewrite_manifest(root, manifest)
    assert "not valid gzip" in _mount_error(f"oci:{root}", tmp_path)
    assert blob.exists()
