"""Push an image from an OCI layout on disk to a registry (blobs first, then the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

from registry.digest import Digest
from registry.errors import ManifestError
from registry.layout import REF_NAME
from registry.media_types import OCI_MANIFEST
from registry.remote import RegistryClient


async def push_layout(client: RegistryClient, root: Path, tag: str) -> str:
    """Pushes the image tagged `tag` in the layout at `root` to the client's repository under
    the client's tag; returns the manifest digest."""
    index = json.loads((root / "index.json").read_text())
    found = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) == tag]
    if not found:
        raise ManifestError(f"{root}: no image tagged {tag!r} to push")
    digest = Digest.parse(found[0]["digest"])
    manifest = digest.check_bytes(_blob(root, digest).read_bytes(), f"manifest {digest}")
    document = json.loads(manifest)
    for descriptor in [document["config"], *document["layers"]]:
        blob = Digest.parse(descriptor["digest"])
        await client.push_blob(blob, _blob(root, blob), int(descriptor["size"]))
    await client.push_manifest(client.reference.tag or tag, manifest, document.get("mediaType", OCI_MANIFEST))
    return str(digest)


def _blob(root: Path, digest: Digest) -> Path:
    return root / "blobs" / digest.algorithm / digest.hex
