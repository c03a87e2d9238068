"""A registry client on aiohttp (distribution spec): the only module that imports aiohttp.

Every request goes through one path, `_get`, which:
- picks the scheme once per registry: HTTPS, and plain HTTP only for loopback hosts or
  with tls_verify=False (as docker does for localhost and insecure registries);
- answers 401 challenges (Bearer token flow or Basic), reusing a token until it expires;
- follows redirects itself, sending the registry's Authorization header only to the
  registry's own host, and asks the registry again when a signed URL has expired (403);
- retries resets, timeouts, 429 and 5xx with exponential backoff and jitter, honouring
  Retry-After, for as long as a time budget allows (registry.retry: the policy), with at most
  `connections` requests in flight per registry;
- keeps a request that someone is waiting for (a lazy read) within its deadline: each try is
  cut at the deadline, and no try starts after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from registry.auth import Challenge, parse_challenges
from registry.credentials import find_credentials
from registry.digest import Digest
from registry.errors import AuthenticationError, BlobNotFoundError, ManifestError, RegistryError
from registry.options import RemoteOptions
from registry.remote_reference import RemoteReference, is_loopback
from registry.retry import Patience, RetryClock, parse_retry_after
from registry.source import MAX_DOCUMENT_SIZE

log = logging.getLogger("crfs-merge")
T = TypeVar("T")
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
MAX_REDIRECTS = 5
TOKEN_DEFAULT_SECONDS = 60  # distribution spec: a token without expires_in lasts 60 s
STREAM_BLOCK = 1 << 20
Progress = Callable[[int], None]
# What a dropped, reset, refused or silent connection raises: worth another try.
NETWORK_ERRORS = (TimeoutError, aiohttp.ClientError, ConnectionError)
DEADLINE_PASSED = asyncio.TimeoutError  # what asyncio.wait_for raises; builtin TimeoutError from 3.11


@dataclass(frozen=True, slots=True)
class Send:
    """A request other than a plain GET: its method, and its body made anew for each try."""

    method: str
    body: Callable[[], object] = lambda: None


class _Retryable(Exception):
    """A failure worth another try; `unreachable` when the registry has never answered."""

    def __init__(self, reason: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.unreachable = unreachable


class RegistryClient:
    """Talks to the registry of one reference. Use as `async with RegistryClient(...)`."""

    def __init__(self, reference: RemoteReference, options: RemoteOptions, env: Mapping[str, str]) -> None:
        self.reference = reference
        self._options = options
        self._credentials = options.credentials or find_credentials(reference.registry, None, env)
        self._limit = asyncio.Semaphore(options.connections)
        self._base: str | None = None
        self._authorization: str | None = None
        self._token_expires = float("inf")
        self._challenge: Challenge | None = None
        self._auth_lock = asyncio.Lock()  # parallel downloads that meet a 401 share one new token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RegistryClient:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._options.timeout, sock_read=self._options.timeout)
        connector = aiohttp.TCPConnector(limit=self._options.connections * 2)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    # --- what callers ask for ---------------------------------------------------------

    async def manifest(self, version: str) -> tuple[bytes, str | None]:
        """Returns a manifest's bytes and Content-Type, by tag or digest."""

        async def read(response: aiohttp.ClientResponse) -> tuple[bytes, str | None]:
            return await _read_bounded(response, MAX_DOCUMENT_SIZE), response.headers.get("Content-Type")

        path = f"/v2/{self.reference.repository}/manifests/{version}"
        return await self._get(path, {"Accept": MANIFEST_ACCEPT}, read, what=f"manifest {version}")

    async def small_blob(self, digest: Digest) -> bytes:
        """Returns a small blob (a config), verified against its digest."""

        async def read(response: aiohttp.ClientResponse) -> bytes:
            return await _read_bounded(response, MAX_DOCUMENT_SIZE)

        data = await self._get(self._blob_path(digest), {}, read, what=f"blob {digest}")
        return digest.check_bytes(data, f"blob {digest}")

    async def download(self, digest: Digest, size: int, dest: Path, progress: Progress | None = None) -> None:
        """Writes blob `digest` to `dest`, verified. Bytes already in `dest` (an earlier,
        interrupted download) are hashed and kept, and only the rest is asked for, with a
        Range request, as after a dropped connection; if the whole then fails its digest,
        the kept bytes were wrong, and the blob is fetched once more from its start."""
        for kept_allowed in (True, False):
            with os.fdopen(os.open(dest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), "r+b") as out:
                state = _Download(out, digest.hasher(), size, progress)
                # Hashing what is kept may take a second per few hundred MB: not on the loop.
                resumed = await asyncio.to_thread(state.keep_existing) if kept_allowed else state.discard_existing()
                if resumed and progress:
                    progress(state.received)
                if state.received < size:
                    await self._get(self._blob_path(digest), state.headers, state.consume, f"blob {digest}",
                                    progress=state.received_so_far)  # fmt: skip
            if state.received != size:
                raise RegistryError(f"blob {digest}: got {state.received} bytes, expected {size}")
            if resumed and digest.hex != state.hashed.hexdigest():
                log.info("blob %s: the kept part of an interrupted download was wrong; fetching it whole", digest)
                continue
            digest.verify(state.hashed, f"blob {digest} from {self.reference.registry}")
            return

    async def read_range(self, digest: Digest, start: int, end: int, patience: Patience | None = None) -> bytes:
        """Returns bytes start..end (inclusive) of a blob with one closed Range request,
        retried within `patience` (by default the mount's).

        A 200 answer means the registry ignores ranges for this blob (pull-through caches do
        this on a miss): the wanted bytes are then cut out of the stream."""

        async def read(response: aiohttp.ClientResponse) -> bytes:
            if response.status == 206:
                data = await _read_bounded(response, end - start + 1)
            else:
                data = await _slice_of_stream(response, start, end)
            if len(data) != end - start + 1:
                raise _Retryable(f"short range answer: {len(data)} of {end - start + 1} bytes")
            return data

        headers = {"Range": f"bytes={start}-{end}"}
        return await self._get(self._blob_path(digest), headers, read, f"blob {digest} range", patience=patience)

    async def push_blob(self, digest: Digest, path: Path, size: int) -> None:
        """Uploads a blob from a local file unless the registry has it (distribution spec,
        "Pushing blobs": monolithic POST then PUT ?digest=)."""
        if await self._get(self._blob_path(digest), {}, _status, f"blob {digest}", Send("HEAD")) == 200:
            return
        upload = f"/v2/{self.reference.repository}/blobs/uploads/"
        location = await self._get(upload, {}, _location, f"upload of {digest}", Send("POST"))
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        put = Send("PUT", lambda: open(path, "rb"))  # noqa: SIM115 (aiohttp streams and closes it)
        await self._get(f"{location}{separator}digest={digest}", headers, _status, f"upload of {digest}", put)

    async def push_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        """Stores a manifest under `tag`."""
        path = f"/v2/{self.reference.repository}/manifests/{tag}"
        send = Send("PUT", lambda: data)
        await self._get(path, {"Content-Type": media_type}, _status, f"manifest {tag}", send)

    def _blob_path(self, digest: Digest) -> str:
        return f"/v2/{self.reference.repository}/blobs/{digest}"

    # --- the one request path ---------------------------------------------------------

    async def _get(
        self,
        path: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None = None,
        patience: Patience | None = None,
        progress: Callable[[], int] | None = None,
    ) -> T:
        """Requests `path` (GET, or `send.method` with its body) and returns what `consume`
        makes of the answer; the one place requests are retried: within `patience` (by
        default the mount's), a try that moves `progress` on starting the count again."""
        clock = RetryClock(patience or Patience(self._options.mount_patience), time.monotonic())
        while True:
            try_started, before = time.monotonic(), progress() if progress else 0
            try:
                return await self._try_within(clock, path, headers, consume, what, send)
            except _Retryable as exc:
                if exc.unreachable:  # a wrong name or a dead host: no reason to wait minutes
                    clock.patience = Patience(min(clock.patience.seconds, self._options.read_deadline),
                                              clock.patience.deadline)  # fmt: skip
                now = time.monotonic()
                moved = progress is not None and progress() != before
                delay = clock.after_failure(try_started, now, exc.retry_after, moved)
                if delay is None:
                    raise RegistryError(f"{named(self.reference, what)}: {exc} ({clock.gave_up(now)})") from None
                log.info("%s: %s; retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)

    async def _try_within(
        self,
        clock: RetryClock,
        path: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None,
    ) -> T:
        """Makes one try, cut at the clock's deadline if it has one."""
        remaining = clock.remaining(time.monotonic())
        if remaining is None:
            return await self._try(path, headers, consume, what, send)
        try:
            return await asyncio.wait_for(self._try(path, headers, consume, what, send), max(remaining, 0.0))
        except DEADLINE_PASSED:
            clock.tries += 1
            raise RegistryError(
                f"{named(self.reference, what)}: no answer before the deadline ({clock.gave_up(time.monotonic())})"
            ) from None

    async def _try(
        self,
        path: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None,
    ) -> T:
        async with self._limit:
            base = await self._base_url()
            wanted = headers() if callable(headers) else headers
            url = path if path.startswith(("http://", "https://")) else base + path
            return await self._follow(url, base, wanted, consume, what, send)

    async def _follow(
        self,
        url: str,
        base: str,
        headers: Mapping[str, str],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None = None,
    ) -> T:
        original, authenticated, asked_again = url, False, False
        if self._authorization is None and self._challenge is not None:
            await self._authenticate_with(self._challenge, stale=None)  # the ping already told us how
        for _ in range(MAX_REDIRECTS + 3):
            on_registry = _origin(url) == _origin(base)
            if on_registry:
                await self._refresh_expired_token()
            authorization = self._authorization if on_registry else None
            sent = {**headers, **({"Authorization": authorization} if authorization else {})}
            try:
                async with self._request(url, sent, send) as response:
                    status = response.status
                    if status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if status == 401 and on_registry and not authenticated:
                        await self._authenticate(response.headers.get("WWW-Authenticate", ""), stale=authorization)
                        authenticated = True
                        continue
                    if status == 403 and not on_registry and not asked_again:
                        url, asked_again = original, True  # a signed URL expired: get a fresh one
                        continue
                    _check(response, what, named(self.reference, what))
                    return await consume(response)
            except (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError) as exc:
                raise RegistryError(f"{_safe(url)}: TLS certificate not trusted: {exc}") from None
            except NETWORK_ERRORS as exc:
                raise _Retryable(f"{type(exc).__name__} from {_safe(url)}: {exc}") from None
        raise RegistryError(f"{what}: too many redirects")

    def _request(self, url: str, headers: Mapping[str, str], send: Send | None = None):  # type: ignore[no-untyped-def]
        assert self._session is not None
        method, body = (send.method, send.body()) if send else ("GET", None)
        # ssl=True: verify with the system CAs; False: no verification (--tls-verify=false).
        return self._session.request(method, url, headers=dict(headers), data=body, allow_redirects=False,
                                     ssl=self._options.tls_verify)  # fmt: skip

    async def _base_url(self) -> str:
        """Returns scheme://host of the registry API, learning it with a ping of /v2/."""
        if self._base is not None:
            return self._base
        host = self.reference.api_host
        schemes = ["https"] + (["http"] if is_loopback(host) or not self._options.tls_verify else [])
        failures = []
        for scheme in schemes:
            try:
                async with self._request(f"{scheme}://{host}/v2/", {}) as response:
                    if response.status == 429 or response.status >= 500:
                        raise _Retryable(f"HTTP {response.status} from {scheme}://{host}/v2/", _retry_after(response))
                    if response.status == 400:  # plain HTTP sent to a TLS port: not this scheme
                        failures.append(f"{scheme}: HTTP 400")
                        continue
                    if response.status == 401:
                        self._challenge = _pick_challenge(response.headers.get("WWW-Authenticate", ""))
                    self._base = f"{scheme}://{host}"
                    return self._base
            except (*NETWORK_ERRORS, ssl.SSLError) as exc:
                failures.append(f"{scheme}: {type(exc).__name__}: {exc}")
        if any("Certificate" in f for f in failures):
            raise RegistryError(f"{host}: TLS certificate not trusted ({'; '.join(failures)}); see --tls-verify")
        raise _Retryable(f"cannot reach {host} ({'; '.join(failures)})", unreachable=True)

    # --- authentication ---------------------------------------------------------------

    async def _refresh_expired_token(self) -> None:
        if time.monotonic() >= self._token_expires and self._challenge is not None:
            await self._authenticate_with(self._challenge, stale=self._authorization)

    async def _authenticate(self, header: str, stale: str | None) -> None:
        challenge = _pick_challenge(header) or self._challenge
        if challenge is None:
            raise AuthenticationError(f"{self.reference.registry}: 401 without a usable WWW-Authenticate challenge")
        self._challenge = challenge
        await self._authenticate_with(challenge, stale)

    async def _authenticate_with(self, challenge: Challenge, stale: str | None) -> None:
        """Replaces the `stale` authorization, unless another task already has."""
        async with self._auth_lock:
            if self._authorization != stale:
                return
            await self._authorize(challenge)

    async def _authorize(self, challenge: Challenge) -> None:
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise AuthenticationError(
                    f"{self.reference.registry} requires credentials: use --creds USER[:PASS] or an auth file"
                )
            self._authorization, self._token_expires = self._credentials.basic_header(), float("inf")
            return
        token, lifetime = await self._fetch_token(challenge)
        self._authorization = f"Bearer {token}"
        self._token_expires = time.monotonic() + max(1.0, lifetime * 0.9)

    async def _fetch_token(self, challenge: Challenge) -> tuple[str, float]:
        """Asks the token server named by a Bearer challenge for a pull token."""
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthenticationError(f"{self.reference.registry}: Bearer challenge without a realm")
        query = {"scope": challenge.params.get("scope") or f"repository:{self.reference.repository}:pull"}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {"Authorization": self._credentials.basic_header()} if self._credentials else {}
        try:
            async with self._request(f"{realm}?{urlencode(query)}", headers) as response:
                if response.status in (401, 403):
                    raise AuthenticationError(
                        f"{self.reference.registry}: token server {_safe(realm)} refused "
                        + ("the credentials" if self._credentials else "anonymous access; use --creds")
                    )
                _check(response, "token", f"token server {_safe(realm)}")
                reply = json.loads(await _read_bounded(response, MAX_DOCUMENT_SIZE))
        except NETWORK_ERRORS as exc:
            raise _Retryable(f"token server {_safe(realm)}: {type(exc).__name__}: {exc}") from None
        except ValueError:
            raise AuthenticationError(f"token server {_safe(realm)} answered with malformed JSON") from None
        token = reply.get("token") or reply.get("access_token") if isinstance(reply, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationError(f"token server {_safe(realm)} answered without a token")
        return token, float(reply.get("expires_in") or TOKEN_DEFAULT_SECONDS)


@dataclass(slots=True)
class _Download:
    """A blob download that survives retries: later attempts resume where the last stopped."""

    out: BinaryIO
    hashed: hashlib._Hash
    size: int
    progress: Progress | None
    received: int = 0

    def received_so_far(self) -> int:
        """Returns the bytes written so far (the retry budget restarts when they grow)."""
        return self.received

    def keep_existing(self) -> bool:
        """Continues after the bytes the file already holds (hashing them); returns whether
        there were any. A file longer than the blob cannot be its beginning: emptied."""
        self.out.seek(0)
        while block := self.out.read(STREAM_BLOCK):
            self.hashed.update(block)
            self.received += len(block)
        if self.received > self.size:
            return self.discard_existing()
        return self.received > 0

    def discard_existing(self) -> bool:
        """Starts from the first byte; returns False (nothing kept)."""
        self._restart()
        return False

    def headers(self) -> dict[str, str]:
        if 0 < self.received < self.size:
            return {"Range": f"bytes={self.received}-{self.size - 1}"}
        return {}

    async def consume(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200 and self.received:  # the registry ignored the Range: start over
            self._restart()
        elif response.status == 206 and _range_start(response) != self.received:
            self._restart()  # not the bytes we asked for: never append them
            raise _Retryable(f"Content-Range {response.headers.get('Content-Range')!r} does not resume the download")
        try:
            async for block in response.content.iter_chunked(STREAM_BLOCK):
                if self.received + len(block) > self.size:
                    raise RegistryError(f"blob is longer than its descriptor's {self.size} bytes")
                self.out.write(block)
                self.hashed.update(block)
                self.received += len(block)
                if self.progress:
                    self.progress(len(block))
        except NETWORK_ERRORS as exc:
            raise _Retryable(f"{type(exc).__name__} after {self.received} bytes: {exc}") from None
        if self.received < self.size:
            raise _Retryable(f"connection closed after {self.received} of {self.size} bytes")

    def _restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.hashed, self.received = hashlib.new(self.hashed.name), 0


def _range_start(response: aiohttp.ClientResponse) -> int | None:
    """Returns the first byte of a 206 answer's `Content-Range: bytes A-B/N`, or None."""
    unit, _, span = response.headers.get("Content-Range", "").partition(" ")
    start = span.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


async def _status(response: aiohttp.ClientResponse) -> int:
    return response.status


async def _location(response: aiohttp.ClientResponse) -> str:
    location = response.headers.get("Location")
    if not location:
        raise RegistryError(f"{_safe(str(response.url))}: upload started without a Location")
    return urljoin(str(response.url), location)


def _pick_challenge(header: str) -> Challenge | None:
    challenges = {c.scheme: c for c in parse_challenges(header)}
    return challenges.get("bearer") or challenges.get("basic")


def _check(response: aiohttp.ClientResponse, what: str, subject: str) -> None:
    """The one place HTTP statuses become domain errors, each starting with `subject`: what
    was asked for, named in full (see `named`)."""
    status = response.status
    if status in (200, 201, 202, 206) or (status == 404 and response.method == "HEAD"):
        return
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}", _retry_after(response))
    if status == 404:
        error = BlobNotFoundError if "blob" in what else ManifestError
        raise error(f"{subject} not found")
    if status in (401, 403):
        raise AuthenticationError(f"{subject}: access denied (HTTP {status})")
    raise RegistryError(f"{subject}: unexpected HTTP {status}")


def named(reference: RemoteReference, what: str) -> str:
    """Returns `what` a request was for ('manifest TAG', 'blob DIGEST [range]') with the
    repository in front, as a user names it: 'REGISTRY/REPO:TAG: manifest',
    'REGISTRY/REPO@DIGEST: blob'."""
    repository = f"{reference.registry}/{reference.repository}"
    kind, _, rest = what.partition(" ")
    version = rest.partition(" ")[0]
    if kind not in ("manifest", "blob") or not version:
        return f"{repository}: {what}"
    separator = "@" if ":" in version else ":"  # a digest has a colon, a tag cannot
    return f"{repository}{separator}{version}: {kind}"


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"), time.time())


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    # The pieces as they were received, joined once: a lazy read receives every byte of its
    # chunks here, on the loop thread, and growing one buffer then copying it cost two more
    # copies (and their page faults) of each.
    parts: list[bytes] = []
    size = 0
    try:
        async for block in response.content.iter_any():
            parts.append(block)
            size += len(block)
            if size > limit:
                raise RegistryError(f"{_safe(str(response.url))}: answer larger than {limit} bytes")
    except NETWORK_ERRORS as exc:
        raise _Retryable(f"{type(exc).__name__} while reading: {exc}") from None
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != size:
        raise _Retryable(f"body of {size} bytes, Content-Length said {length}")
    return b"".join(parts)


async def _slice_of_stream(response: aiohttp.ClientResponse, start: int, end: int) -> bytes:
    data = bytearray()
    position = 0
    try:
        async for block in response.content.iter_chunked(STREAM_BLOCK):
            lo, hi = max(start - position, 0), min(end + 1 - position, len(block))
            if lo < hi:
                data += block[lo:hi]
            position += len(block)
            if position > end:
                break
    except NETWORK_ERRORS as exc:
        raise _Retryable(f"{type(exc).__name__} while reading: {exc}") from None
    return bytes(data)


def _origin(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _safe(url: str) -> str:
    """Returns a URL fit for messages: signed query strings are secrets."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
