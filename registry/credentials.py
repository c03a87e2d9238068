"""Find registry credentials where podman and docker keep them, in podman's order:

1. --creds USER[:PASS]
2. $REGISTRY_AUTH_FILE
3. $XDG_RUNTIME_DIR/containers/auth.json
4. ~/.config/containers/auth.json
5. ~/.docker/config.json (and $DOCKER_CONFIG/config.json)

In each file, `credHelpers[host]` names a `docker-credential-NAME` program that is asked
first, then `auths[host].auth` (base64 "user:pass"), then the file's `credsStore` program.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from registry.auth import Credentials
from registry.errors import ImageError
from registry.remote_reference import DOCKER_HUB

HELPER_TIMEOUT = 30
# Docker Hub is spelled many ways in auth files; all of them mean the same registry.
_HUB_ALIASES = {DOCKER_HUB, "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/"}


def find_credentials(registry: str, explicit: str | None, env: Mapping[str, str]) -> Credentials | None:
    """Returns the credentials for `registry` (as the reference names it), or None."""
    if explicit is not None:
        return Credentials.parse(explicit)
    for path in auth_files(env):
        found = _from_file(path, registry)
        if found is not None:
            return found
    return None


def auth_files(env: Mapping[str, str]) -> Iterator[Path]:
    """Yields the auth files to look in, most specific first."""
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    if env.get("REGISTRY_AUTH_FILE"):
        yield Path(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        yield Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    yield home / ".config" / "containers" / "auth.json"
    yield Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json"


def _from_file(path: Path, registry: str) -> Credentials | None:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable auth file: {exc}") from None
    if not isinstance(document, dict):
        return None
    helper = _matching(document.get("credHelpers"), registry)
    if isinstance(helper, str):
        return _from_helper(helper, registry)
    entry = _matching(document.get("auths"), registry)
    if isinstance(entry, dict) and entry.get("auth"):
        return _decode_auth(str(entry["auth"]), path)
    store = document.get("credsStore")
    return _from_helper(store, registry) if isinstance(store, str) and store else None


def _matching(table: object, registry: str) -> object:
    if not isinstance(table, dict):
        return None
    wanted = _HUB_ALIASES if registry == DOCKER_HUB else {registry}
    for key, value in table.items():
        if _host_of(key) in wanted or key in wanted:
            return value
    return None


def _host_of(key: str) -> str:
    # Keys may be bare hosts or URLs: "https://quay.io/v1/", "quay.io", "quay.io/org" (podman).
    return key.split("://", 1)[-1].split("/", 1)[0]


def _decode_auth(value: str, path: Path) -> Credentials:
    try:
        return Credentials.parse(base64.b64decode(value).decode())
    except (binascii.Error, UnicodeDecodeError):
        raise ImageError(f"{path}: an 'auth' entry is not base64 of user:password") from None


def _from_helper(helper: str, registry: str) -> Credentials | None:
    """Asks `docker-credential-HELPER get` (docker's credential-helper protocol)."""
    import subprocess  # only for a configured helper: a mount's start-up need not load it

    program = f"docker-credential-{helper}"
    server = "https://index.docker.io/v1/" if registry == DOCKER_HUB else registry
    try:
        run = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=HELPER_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"credential helper {program} failed: {type(exc).__name__}") from None
    if run.returncode != 0:
        if "credentials not found" in run.stdout.lower() + run.stderr.lower():
            return None
        raise ImageError(f"credential helper {program} failed with status {run.returncode}")
    try:
        reply = json.loads(run.stdout)
        return Credentials(str(reply["Username"]), str(reply["Secret"]))
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"credential helper {program} gave an unreadable answer") from None
