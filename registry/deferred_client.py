"""A registry client made at its first use.

A mount made ready from the cache alone (`--pull missing`, the image's manifest, config and
merged tree all cached) needs the registry only when a lazy read misses the chunk cache.
Importing aiohttp costs 0.15-0.2 s of CPU, more than the rest of such a mount's start: it is
imported, and the client made, on a worker thread when a read first needs the registry (a
mount whose reads all hit the chunk cache never imports it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from registry.digest import Digest
from registry.retry import Patience

if TYPE_CHECKING:
    from registry.remote import Progress, RegistryClient


class BlobReader(Protocol):
    """What lazy reads and whole fetches ask of a registry client."""

    async def read_range(self, digest: Digest, start: int, end: int, patience: Patience | None = None) -> bytes: ...

    async def download(self, digest: Digest, size: int, dest: Path, progress: Progress | None = None) -> None: ...


class DeferredClient:
    """Makes its client with `make` (a plain function: it may import aiohttp, so it runs on a
    worker thread, never on the event loop) when first asked, once; closes it if it was made."""

    def __init__(self, make: Callable[[], RegistryClient]) -> None:
        self._make = make
        self._client: RegistryClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> RegistryClient:
        async with self._lock:
            if self._client is None:
                client = await asyncio.to_thread(self._make)
                await client.__aenter__()
                self._client = client
        return self._client

    async def read_range(self, digest: Digest, start: int, end: int, patience: Patience | None = None) -> bytes:
        return await (await self.client()).read_range(digest, start, end, patience)

    async def download(self, digest: Digest, size: int, dest: Path, progress: Progress | None = None) -> None:
        await (await self.client()).download(digest, size, dest, progress)

    async def close(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.__aexit__(None, None, None)
                self._client = None
