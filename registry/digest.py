"""Content digests of the form `algorithm:hex` (image-spec descriptor.md "Digests")."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from registry.errors import DigestMismatchError, ManifestError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_PATTERN = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


@dataclass(frozen=True, slots=True)
class Digest:
    """A parsed, validated digest; `str()` gives it back as written."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _PATTERN.match(text)
        if not match or len(match[2]) != _HEX_LENGTH[match[1]]:
            raise ManifestError(f"invalid or unsupported digest {text!r}")
        return cls(match[1], match[2])

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """Returns a fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def verify(self, hashed: hashlib._Hash, what: str) -> None:
        """Raises DigestMismatchError unless `hashed` (fed all the bytes) matches."""
        if hashed.hexdigest() != self.hex:
            raise DigestMismatchError(f"{what}: content is {self.algorithm}:{hashed.hexdigest()}, expected {self}")

    def check_bytes(self, data: bytes, what: str) -> bytes:
        """Returns `data` after checking it against this digest."""
        hashed = self.hasher()
        hashed.update(data)
        self.verify(hashed, what)
        return data
