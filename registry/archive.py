"""`docker save` tarballs: the legacy manifest.json form, and OCI layouts inside a tar."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any

from registry.digest import Digest
from registry.errors import BlobNotFoundError, ManifestError
from registry.layout import resolve_layout
from registry.manifest import Platform, check_platform, diff_ids
from registry.media_types import sniff_compression
from registry.source import FileWindow, Image, Layer


@dataclass(frozen=True, slots=True)
class TarFiles:
    """The regular-file members of an uncompressed tarball, as windows on it."""

    path: str
    members: dict[str, FileWindow]

    @classmethod
    def scan(cls, path: str) -> TarFiles:
        try:
            with tarfile.open(path, mode="r:") as archive:
                members = {
                    m.name.removeprefix("./"): FileWindow(path, m.offset_data, m.size) for m in archive if m.isreg()
                }
        except (OSError, tarfile.TarError) as exc:
            raise ManifestError(f"{path}: not a readable docker archive: {exc}") from exc
        return cls(path, members)

    def window(self, name: str) -> FileWindow:
        try:
            return self.members[name.removeprefix("./")]
        except KeyError:
            raise BlobNotFoundError(f"{self.path}: archive has no member {name!r}") from None


def resolve_archive(path: str, ref: str | None, platform: Platform) -> Image:
    """Returns the image `ref` (or the only one) of a docker-save or OCI-layout tarball."""
    files = TarFiles.scan(path)
    if "manifest.json" in files.members:
        return _resolve_legacy(files, ref, platform)
    if "index.json" in files.members:
        return resolve_layout(files, path, ref, platform)
    raise ManifestError(f"{path}: neither manifest.json nor index.json: not a docker archive")


def _resolve_legacy(files: TarFiles, ref: str | None, platform: Platform) -> Image:
    try:
        entries = json.loads(files.window("manifest.json").read_all())
        entry = _pick_entry(entries, ref, files.path)
        layer_names = [str(name) for name in entry["Layers"]]
        config_name = str(entry["Config"])
        config = files.window(config_name).read_all()
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ManifestError(f"{files.path}: malformed manifest.json: {exc}") from exc
    diffs = diff_ids(config, f"{files.path}: {config_name}")
    check_platform(config, platform, files.path)
    if len(diffs) != len(layer_names):
        raise ManifestError(f"{files.path}: {len(layer_names)} layers but config lists {len(diffs)} diff_ids")
    layers = tuple(_legacy_layer(files.window(n), d) for n, d in zip(layer_names, diffs, strict=True))
    return Image(files.path, layers, config)


def _pick_entry(entries: list[dict[str, Any]], ref: str | None, path: str) -> dict[str, Any]:
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{path}: manifest.json lists no image")
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        raise ManifestError(f"{path}: {len(entries)} images; name one of: {_all_tags(entries)}")
    for entry in entries:
        tags = [str(t) for t in entry.get("RepoTags") or []]
        if any(t == ref or t.endswith("/" + ref) or t.rpartition(":")[2] == ref for t in tags):
            return entry
    raise ManifestError(f"{path}: no image {ref!r} (images: {_all_tags(entries)})")


def _all_tags(entries: list[dict[str, Any]]) -> str:
    return ", ".join(str(t) for e in entries for t in e.get("RepoTags") or []) or "untagged"


def _legacy_layer(window: FileWindow, diff_id: Digest) -> Layer:
    # Legacy archives carry no media types: docker writes plain tars, but look at the
    # magic bytes so a compressed layer is decompressed rather than misread.
    with window.open() as reader:
        compression = sniff_compression(reader.read(4))
    return Layer(None, diff_id, compression, window)
