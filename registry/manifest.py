"""Decode manifests, indexes and configs, and pick a platform (image-spec manifest.md,
image-index.md, config.md). Bytes in, frozen values out: no I/O here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from registry.digest import Digest
from registry.errors import ManifestError
from registry.media_types import INDEXES, MANIFESTS, OCI_INDEX, OCI_MANIFEST


@dataclass(frozen=True, slots=True)
class Platform:
    """An os/architecture[/variant] triple, as `--platform` spells it.

    `requested` says whether the user asked for it (`--platform`) or it is only this host's:
    a single-platform image of another platform is refused only in the first case, as docker
    does."""

    os: str
    architecture: str
    variant: str = ""
    requested: bool = field(default=True, compare=False)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ManifestError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        """Returns the platform of this machine, named as Go (and so docker) names it."""
        machine = os.uname().machine.lower()  # what platform.machine() says, without its 5-10 ms import
        arch, variant = _GO_ARCH.get(machine, (machine, ""))
        return cls("linux", arch, variant, requested=False)

    def matches(self, other: Platform) -> bool:
        """True if `other` (an index entry) can run where `self` is wanted."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or not other.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_GO_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A typed, sized, digested pointer to a blob (image-spec descriptor.md)."""

    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: Platform | None = None

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest: its config and its layers, bottom first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class Index:
    """An image index or manifest list."""

    manifests: tuple[Descriptor, ...]


def decode(data: bytes, media_type: str | None = None, name: str = "manifest") -> Manifest | Index:
    """Returns the manifest or index that `data` holds; errors start with `name`, the file or
    reference that held it.

    The media type comes from the document itself, else from `media_type` (a registry's
    Content-Type or the descriptor that pointed here), else from its shape.
    """
    try:
        return _decode(data, media_type)
    except ManifestError as exc:
        raise ManifestError(f"{name}: {exc}") from None


def _decode(data: bytes, media_type: str | None) -> Manifest | Index:
    doc = _json_object(data)
    kind = doc.get("mediaType") or media_type or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if kind in INDEXES:
        return Index(tuple(_descriptor(d) for d in _list(doc, "manifests")))
    if kind in MANIFESTS:
        return Manifest(_descriptor(doc.get("config")), tuple(_descriptor(d) for d in _list(doc, "layers")))
    raise ManifestError(f"unsupported manifest media type {kind!r}")


def select_platform(index: Index, wanted: Platform, name: str = "image") -> Descriptor:
    """Returns the first index entry that runs on `wanted`, as docker picks it; `name` (the
    image) starts the error if none does."""
    candidates = [d for d in index.manifests if d.platform is not None and wanted.matches(d.platform)]
    if candidates:
        return candidates[0]
    if len(index.manifests) == 1 and index.manifests[0].platform is None:
        return index.manifests[0]
    available = ", ".join(sorted({str(d.platform) for d in index.manifests if d.platform})) or "none"
    raise ManifestError(f"{name}: no image for platform {wanted} (available: {available})")


def check_platform(config: bytes, wanted: Platform, name: str) -> None:
    """Refuses a single-platform image whose config names another platform than the one the
    user asked for (docker's rule); a config that names none, or a platform only implied by
    the host, passes."""
    if not wanted.requested:
        return
    try:
        doc = _json_object(config)
    except ManifestError as exc:
        raise ManifestError(f"{name}: image config: {exc}") from None
    actual = Platform(str(doc.get("os") or ""), str(doc.get("architecture") or ""), str(doc.get("variant") or ""))
    if actual.os and actual.architecture and not wanted.matches(actual):
        raise ManifestError(f"{name}: image platform {actual} does not match the requested {wanted}")


def diff_ids(config: bytes, name: str = "image config") -> tuple[Digest, ...]:
    """Returns the uncompressed-layer digests that an image config lists (rootfs.diff_ids);
    errors start with `name`, the config's file or digest."""
    try:
        doc = _json_object(config)
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise ManifestError("no rootfs.diff_ids")
        return tuple(Digest.parse(str(d)) for d in rootfs["diff_ids"])
    except ManifestError as exc:
        raise ManifestError(f"{name}: {exc}") from None


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested beyond the parser's depth
        raise ManifestError(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError("not a JSON object")
    return doc


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise ManifestError(f"manifest field {key!r} is missing or not a list")
    return value


def _descriptor(doc: Any) -> Descriptor:
    if not isinstance(doc, dict):
        raise ManifestError("descriptor is not a JSON object")
    try:
        size = int(doc["size"])
        media_type = str(doc["mediaType"])
        digest = Digest.parse(str(doc["digest"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"descriptor lacks a valid mediaType, digest or size: {exc}") from exc
    if size < 0:
        raise ManifestError(f"descriptor {digest} has a negative size")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestError(f"descriptor {digest} has malformed annotations")
    return Descriptor(media_type, digest, size, tuple(sorted(annotations.items())), _platform(doc.get("platform")))


def _platform(doc: Any) -> Platform | None:
    if not isinstance(doc, dict):
        return None
    return Platform(str(doc.get("os", "")), str(doc.get("architecture", "")), str(doc.get("variant", "")))
