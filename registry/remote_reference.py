"""Registry image references, by Docker's rules (distribution/reference): parsed and
normalised before any network I/O.

    alpine                      -> docker.io/library/alpine:latest
    quay.io/org/app:1.2         -> quay.io/org/app:1.2
    127.0.0.1:5000/x@sha256:... -> 127.0.0.1:5000/x@sha256:...
    localhost/x:tag@sha256:...  -> both kept; the digest decides what is pulled
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from registry.digest import Digest
from registry.errors import InvalidReferenceError, ManifestError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # docker.io serves a website, the API lives here
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$")
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.?)+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class RemoteReference:
    """A normalised registry reference; `str()` gives its canonical spelling."""

    registry: str  # as the user names it: docker.io, quay.io, 127.0.0.1:5000
    repository: str  # library/alpine
    tag: str | None
    digest: Digest | None
    # The name as typed when it named no registry ("alpine", "user/app"): registries.conf's
    # aliases and unqualified-search-registries may send it elsewhere than docker.io.
    short_name: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> RemoteReference:
        """Returns the reference `text` names; raises InvalidReferenceError saying why not."""
        name, digest = _split_digest(text.removeprefix("docker://"))
        name, tag = _split_tag(name)
        registry, repository = _split_registry(name)
        if len(repository) > MAX_NAME_LENGTH:
            raise InvalidReferenceError(f"{text}: repository name longer than {MAX_NAME_LENGTH} characters")
        for component in repository.split("/"):
            if not _COMPONENT.match(component):
                raise InvalidReferenceError(f"{text}: invalid repository name component {component!r}")
        short_name = None if _names_registry(name) else name
        return cls(registry, repository, tag or (None if digest else DEFAULT_TAG), digest, short_name)

    @property
    def api_host(self) -> str:
        """Returns the host[:port] that serves the registry API."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def version(self) -> str:
        """Returns what to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return str(self.digest) if self.digest else str(self.tag)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        return text + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port."""
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    bare = bare.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def _split_digest(text: str) -> tuple[str, Digest | None]:
    name, sep, digest = text.partition("@")
    if not sep:
        return text, None
    try:
        return name, Digest.parse(digest)
    except ManifestError as exc:
        raise InvalidReferenceError(f"{text}: {exc}") from None


def _split_tag(name: str) -> tuple[str, str | None]:
    # A ':' after the last '/' is a tag; one before it belongs to a registry's port.
    head, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, None
    if not _TAG.match(tag):
        raise InvalidReferenceError(f"{name}: invalid tag {tag!r}")
    return head, tag


def _names_registry(name: str) -> bool:
    """True if the name's first component is a registry host (docker's rule), not a short name."""
    first, sep, _ = name.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost" or first.startswith("["))


def _split_registry(name: str) -> tuple[str, str]:
    if not name:
        raise InvalidReferenceError("empty repository name")
    first, _, rest = name.partition("/")
    if _names_registry(name):
        if not _DOMAIN.match(first):
            raise InvalidReferenceError(f"{name}: invalid registry host {first!r}")
        registry = DOCKER_HUB if first == "index.docker.io" else first
        return registry, _docker_hub_library(registry, rest)
    return DOCKER_HUB, _docker_hub_library(DOCKER_HUB, name)


def _docker_hub_library(registry: str, repository: str) -> str:
    # Official images on Docker Hub live under library/: `alpine` is library/alpine.
    if registry == DOCKER_HUB and "/" not in repository:
        return f"library/{repository}"
    return repository
