"""Media types of manifests and layers, and what each layer type needs to be read."""

from __future__ import annotations

import enum

from registry.errors import UnsupportedLayerError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEXES = {OCI_INDEX, DOCKER_MANIFEST_LIST}


class Compression(enum.Enum):
    """How a layer blob wraps its tar stream."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": Compression.ZSTD,
}
_FOREIGN = {
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
# Layer annotations of eStargz (stargz-snapshotter docs/estargz.md): the TOC's digest, which
# makes the TOC verifiable, and the size of the uncompressed tar.
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def layer_compression(media_type: str, name: str = "layer") -> Compression:
    """Returns the compression of a layer media type; raises for foreign or unknown ones, in a
    message that starts with `name` (the image and the layer's digest)."""
    if media_type in _FOREIGN:
        raise UnsupportedLayerError(
            f"{name}: foreign (non-distributable) layer {media_type}: its bytes live outside the image, "
            "and crfs-merge does not fetch from URLs that the image names"
        )
    try:
        return _LAYERS[media_type]
    except KeyError:
        raise UnsupportedLayerError(f"{name}: unknown layer media type {media_type!r}") from None


def sniff_compression(head: bytes) -> Compression:
    """Returns the compression that a blob's first bytes show (for docker-save layers)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE
