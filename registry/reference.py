"""Parse the IMAGE argument: a transport-prefixed local path, or a bare path.

Spelled as skopeo spells them: `oci:PATH[:TAG]`, `docker-archive:FILE[:NAME]`, `dir:PATH`.
The first colon after `oci:` or `docker-archive:` ends the path, as in skopeo, so those paths
cannot contain ':'; `dir:` takes no tag, and its path is all the rest.
Anything else is a registry reference (`host/repo:tag`, `docker://...`), checked by
RemoteReference's rules here, before any network I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from registry.dir_transport import is_dir_transport
from registry.errors import InvalidReferenceError
from registry.remote_reference import RemoteReference

OCI = "oci"
DOCKER_ARCHIVE = "docker-archive"
DIR = "dir"  # skopeo's dir: transport (registry/dir_transport.py)
REGISTRY = "docker"


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed IMAGE argument; `str()` gives the canonical spelling back."""

    transport: str
    path: str
    tag: str | None = None
    short_name: str | None = field(default=None, compare=False)  # a registry name typed without its registry

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Returns the reference that `text` names; raises InvalidReferenceError."""
        if not text:
            raise InvalidReferenceError("empty image reference")
        transport, sep, rest = text.partition(":")
        if sep and transport in (OCI, DOCKER_ARCHIVE):
            return cls._with_tag(transport, rest)
        if sep and transport == DIR:
            if not rest:
                raise InvalidReferenceError(f"{DIR}: reference has no path")
            return cls(DIR, rest)
        if sep and transport == REGISTRY and rest.startswith("//"):
            return cls._remote(rest[2:])
        if os.path.isdir(text):
            return cls(DIR if is_dir_transport(text) else OCI, text)
        if os.path.isfile(text):
            return cls(DOCKER_ARCHIVE, text)
        if text.startswith(("/", "./", "../")) or (os.sep in text and not _looks_like_registry(text)):
            raise InvalidReferenceError(f"{text}: no such file or directory")
        return cls._remote(text)

    def remote(self) -> RemoteReference:
        """Returns a registry reference's parsed form, still knowing if it was a short name."""
        return replace(RemoteReference.parse(self.path), short_name=self.short_name)

    @classmethod
    def _remote(cls, text: str) -> ImageReference:
        parsed = RemoteReference.parse(text)
        return cls(REGISTRY, str(parsed), short_name=parsed.short_name)

    @classmethod
    def _with_tag(cls, transport: str, rest: str) -> ImageReference:
        path, sep, tag = rest.partition(":")
        if not path:
            raise InvalidReferenceError(f"{transport}: reference has no path")
        if sep and not tag:
            raise InvalidReferenceError(f"{transport}:{rest}: empty tag after ':'")
        return cls(transport, path, tag or None)

    def __str__(self) -> str:
        if self.transport == REGISTRY:
            return f"docker://{self.path}"
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def _looks_like_registry(text: str) -> bool:
    first = text.split("/", 1)[0]
    return "." in first or ":" in first or first == "localhost"
