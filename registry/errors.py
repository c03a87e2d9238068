"""One exception tree for everything that can go wrong getting an image's bytes."""

from __future__ import annotations


class ImageError(Exception):
    """Base of every crfs-merge error that a user should see as one line."""


class InvalidReferenceError(ImageError):
    """The image reference cannot be parsed or names nothing usable."""


class ManifestError(ImageError):
    """A manifest, index or config is missing, malformed or of an unknown kind."""


class BlobNotFoundError(ImageError):
    """A descriptor names a blob that the source does not hold."""


class DigestMismatchError(ImageError):
    """A blob's bytes do not hash to the digest that names them."""


class UnsupportedLayerError(ImageError):
    """A layer of a media type that crfs-merge will not guess at (foreign, unknown)."""


class LayerFormatError(ImageError):
    """A layer's compression or tar stream is malformed or truncated."""


class RegistryError(ImageError):
    """The registry could not be reached, or answered with an error."""


class AuthenticationError(RegistryError):
    """The registry wants credentials that are missing or were refused."""
