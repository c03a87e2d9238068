"""What each registry reference last resolved to, for `--pull missing`.

A mount that resolved `REGISTRY/REPO:TAG` for a platform keeps the image manifest it chose
and the config it named (CACHE/refs/v1/KEY.ref, sealed: unionfs/storage/sealed.py). The next
mount of the same reference and platform with `--pull missing` (the default, as `docker run`
and `podman run` use an image already pulled) takes the image from there and asks the
registry nothing before it is ready, when the layers' tars or merged tree are cached too:
the tag is not looked up again, and a registry that is down does not stop the mount.
`--pull always` resolves the reference anew each time, and records what it found.

The record holds only content-addressed data besides the reference: the config is checked
against the manifest's digest of it, and every blob and chunk read later against its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from registry.cache_files import write_atomically
from registry.errors import ImageError
from registry.manifest import Manifest, Platform, decode
from registry.remote_reference import RemoteReference
from registry.source import Image
from unionfs.storage.sealed import DamagedCacheFile, drop_damaged, seal, unseal

if TYPE_CHECKING:  # registry.pull imports asyncio: not for the command's check of a record
    from registry.pull import ResolvedManifest

log = logging.getLogger("crfs-merge")
RECORDS = Path("refs") / "v1"


def record_path(cache_dir: Path, reference: RemoteReference, platform: Platform) -> Path:
    """Where the resolution of `reference` for `platform` is kept."""
    return cache_dir / RECORDS / f"{hashlib.sha256(_label(reference, platform).encode()).hexdigest()}.ref"


def save(cache_dir: Path, asked: RemoteReference, resolved: ResolvedManifest, config: bytes) -> None:
    """Records that `asked` resolved to `resolved` (with `config`); a cache that cannot take it
    costs the next mount a round trip, not this one its mount."""
    header = {"reference": str(resolved.reference), "by_platform": resolved.by_platform, "media_type":
              resolved.media_type, "manifest_size": len(resolved.data), "resolved_at": time.time()}  # fmt: skip
    payload = json.dumps(header).encode() + b"\n" + resolved.data + config
    path = record_path(cache_dir, asked, resolved.platform)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, seal(_label(asked, resolved.platform), payload), "a resolved reference")
    except OSError as exc:
        log.warning("cache: cannot record what %s resolved to in %s: %s", asked, path, exc.strerror)


def load(cache_dir: Path, asked: RemoteReference, platform: Platform) -> tuple[Image, str] | None:
    """The image `asked` resolved to for `platform` when last recorded, its layers windows on
    blob files under CACHE/blobs, and how long ago that was ("3 h"); None if there is no record
    (or a damaged one: then it is removed, with a warning)."""
    path = record_path(cache_dir, asked, platform)
    try:
        payload = unseal(_label(asked, platform), path.read_bytes())
        return _image(payload, platform, cache_dir / "blobs", str(asked))
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cache: cannot read %s: %s; asking the registry", path, exc.strerror)
        return None
    except (DamagedCacheFile, ImageError, ValueError, KeyError, TypeError) as exc:
        drop_damaged(path, exc, "asking the registry", log.warning)
        return None


def _image(payload: memoryview, platform: Platform, blob_dir: Path, asked: str) -> tuple[Image, str]:
    from registry.pull import resolved_from

    newline = bytes(payload[:65536]).index(b"\n")
    header = json.loads(bytes(payload[:newline]))
    body = bytes(payload[newline + 1 :])
    size = int(header["manifest_size"])
    data, config = body[:size], body[size:]
    manifest = decode(data, header["media_type"], f"{asked}: recorded manifest")
    if not isinstance(manifest, Manifest):
        raise ValueError("the recorded manifest is an index")
    manifest.config.digest.check_bytes(config, f"{asked}: recorded config")
    reference = RemoteReference.parse(str(header["reference"]))
    resolved = resolved_from(reference, manifest, bool(header["by_platform"]), platform, blob_dir, data,
                             header["media_type"])  # fmt: skip
    age = max(0.0, time.time() - float(header["resolved_at"]))
    return resolved.image(config), _duration(age)


def _label(reference: RemoteReference, platform: Platform) -> str:
    return f"resolved {reference} for {platform}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"

