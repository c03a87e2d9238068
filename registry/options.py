"""How to talk to registries: settings chosen on the command line, kept apart from the
aiohttp client so that mounting a local image never imports it."""

from __future__ import annotations

from dataclasses import dataclass

from registry.auth import Credentials


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """How to talk to registries."""

    credentials: Credentials | None = None  # --creds; otherwise looked up per registry
    tls_verify: bool = True
    timeout: float = 30.0  # seconds to connect, and the longest silence while reading
    retries: int = 4
    connections: int = 8  # requests in flight to one registry
