"""Cache files that prove their own integrity: a label, a digest, then the payload.

A file in the cache outlives crashes, full disks and other tools: it may be cut short,
have a byte flipped, or be another file copied over its name. A sealed file is trusted only
if its digest matches its bytes and its label names what it is expected to be (a file
copied over another's name carries the other's label), so a damaged one is dropped and
rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MAGIC = b"crfs-merge sealed sha256\n"
DIGEST_SIZE = 32  # SHA-256 runs at about 1.7 GB/s where the CPU has SHA extensions (blake2b: 0.7)


class DamagedCacheFile(ValueError):
    """A sealed file whose digest or label does not match."""


def seal(label: str, payload: bytes) -> bytes:
    """Returns `payload` behind a header naming `label` and a digest over both."""
    head = _head(label)
    return head + _digest(head, payload) + payload


def seal_parts(label: str, parts: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """seal(label, b"".join(parts)) as pieces to write one after the other: a large payload
    (a merged tree) is not copied whole to be sealed."""
    head = _head(label)
    hashed = hashlib.sha256(head)
    for part in parts:
        hashed.update(part)
    return [head, hashed.digest(), *parts]


def unseal(label: str, data: bytes) -> memoryview:
    """Returns the payload of `data` (without copying it); DamagedCacheFile unless `data` is
    what seal(label, payload) returned."""
    head = _checked_head(label, data)
    payload = memoryview(data)[len(head) + DIGEST_SIZE :]
    _check_digest(data, head, _digest(head, payload))
    return payload


def unsealed(label: str, data: bytes, use: Callable[[memoryview], T]) -> T:
    """use(unseal(label, data)), with the digest computed on another thread meanwhile (hashlib
    lets the GIL go): a 200,000-file tree's 30 MB take 20 ms to hash and 60 ms to parse. What
    `use` made of a payload whose digest fails is thrown away, its error too: DamagedCacheFile."""
    head = _checked_head(label, data)
    payload = memoryview(data)[len(head) + DIGEST_SIZE :]
    digest: list[bytes] = []
    hasher = threading.Thread(target=lambda: digest.append(_digest(head, payload)), name="crfs-merge-unseal")
    hasher.start()
    try:
        result = use(payload)
    except BaseException:
        hasher.join()
        _check_digest(data, head, digest[0])  # damage explains the failure better than the failure
        raise
    hasher.join()
    _check_digest(data, head, digest[0])
    return result


def _checked_head(label: str, data: bytes) -> bytes:
    head = _head(label)
    if not data.startswith(MAGIC):
        raise DamagedCacheFile("not a sealed cache file")
    if not data.startswith(head):
        raise DamagedCacheFile(f"it is not the file of {label}")
    return head


def _check_digest(data: bytes, head: bytes, digest: bytes) -> None:
    if digest != data[len(head) : len(head) + DIGEST_SIZE]:
        raise DamagedCacheFile("its digest does not match its contents")


def drop_damaged(path: Path, damage: Exception, then: str, warn: Callable[[str], None], must_go: bool = False) -> None:
    """Removes a damaged cache file, with one warning naming it and what happens `then`. A file
    that would be used again if left (`must_go`: a tar, a blob) and cannot be removed (a
    read-only cache) fails the mount instead; a tree, index or TOC is then just not used."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if must_go:
            raise OSError(exc.errno, f"cache: {path} is damaged ({damage}) and cannot be removed: "
                                     f"{exc.strerror}") from None  # fmt: skip
        warn(f"cache: {path} is damaged ({damage}); {then}")
        return
    warn(f"cache: {path} is damaged ({damage}); removed, {then}")


def _head(label: str) -> bytes:
    return MAGIC + label.encode() + b"\n"


def _digest(head: bytes, payload: bytes | memoryview) -> bytes:
    hashed = hashlib.sha256(head)
    hashed.update(payload)
    return hashed.digest()
