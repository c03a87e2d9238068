"""How to talk to registries: settings chosen on the command line, kept apart from the
aiohttp client so that mounting a local image never imports it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from registry.auth import Credentials

# Budgets in units of --timeout, so that one option sets how long anything waits.
MOUNT_PATIENCE_TIMEOUTS = 10  # a request made while mounting retries this long (5 min at the default)
READ_DEADLINE_TIMEOUTS = 2  # a lazy read answers within this (1 min at the default), EIO if it must


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """How to talk to registries."""

    credentials: Credentials | None = None  # --creds; otherwise looked up per registry
    tls_verify: bool = True
    timeout: float = 30.0  # seconds to connect, and the longest silence while reading
    connections: int = 8  # requests in flight to one registry
    registries_conf: Path | None = None  # --registries-conf; otherwise podman's files (registry/registries_files.py)

    @property
    def mount_patience(self) -> float:
        """Returns the seconds of failures in a row (resets, timeouts, 429, 5xx) a request
        made while mounting waits out before the mount fails."""
        return MOUNT_PATIENCE_TIMEOUTS * self.timeout

    @property
    def read_deadline(self) -> float:
        """Returns the seconds within which a lazy read gets its bytes or EIO; also the
        patience of background fetches and of a registry never reached at all."""
        return READ_DEADLINE_TIMEOUTS * self.timeout
