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
  cut at the deadline, and no try starts after it;
- pulls from the sources that registries.conf names (registry/registries_conf.py): mirrors
  first, in order, then the registry itself. A source that fails a try (unreachable, reset,
  429, 5xx), lacks what is asked for, refuses, or serves bytes that fail their digest, hands
  the request to the next one at once; only when every source has failed a round does the
  request wait (backoff) and start another round, all within the one request's budget. A
  source that failed a try is asked last for a while (a dead mirror costs each request
  nothing), and every source has its own scheme, credentials and token.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from registry.auth import Challenge, Credentials, parse_challenges
from registry.credentials import find_credentials
from registry.digest import Digest
from registry.errors import AuthenticationError, BlobNotFoundError, ImageError, ManifestError, RegistryError
from registry.options import RemoteOptions
from registry.registries_conf import PullSource, pull_sources, push_source
from registry.registries_files import load as load_registries_conf
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


class _DeadlinePassed(RegistryError):
    """A reader's deadline passed: no other source may be tried either."""


@dataclass(eq=False)
class _Source:
    """One place the image is pulled from (a mirror, or the registry), and what was learned
    talking to it: its scheme, its auth challenge and token."""

    pull: PullSource
    credentials: Credentials | None
    limit: asyncio.Semaphore  # requests in flight to this source
    base: str | None = None
    authorization: str | None = None
    token_expires: float = float("inf")
    challenge: Challenge | None = None
    auth_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # parallel requests that meet a 401 share a token
    failed_at: float = float("-inf")  # when a try last failed (time.monotonic()): asked last for a while

    @property
    def reference(self) -> RemoteReference:
        return self.pull.physical

    @property
    def registry(self) -> str:
        return self.pull.physical.registry

    def describe(self) -> str:
        return f"{'mirror ' if self.pull.mirror else ''}{self.pull.physical.registry}"


class RegistryClient:
    """Talks to the registry of one reference, and to its mirrors. Use as
    `async with RegistryClient(...)`; raises ImageError when registries.conf blocks the
    reference or cannot be used."""

    def __init__(self, reference: RemoteReference, options: RemoteOptions, env: Mapping[str, str]) -> None:
        conf = load_registries_conf(options.registries_conf, env)
        self._options = options
        self._sources = [self._source(s, reference, env) for s in pull_sources(conf, reference)]
        self._push = self._source(push_source(conf, reference), reference, env)
        self.reference = self._sources[0].pull.logical  # a short name's first candidate, until one answers
        self._session: aiohttp.ClientSession | None = None

    def _source(self, pull: PullSource, named: RemoteReference, env: Mapping[str, str]) -> _Source:
        # --creds are for the registry named; a mirror elsewhere gets its own, from the auth files.
        explicit = self._options.credentials if pull.physical.registry == named.registry else None
        credentials = explicit or find_credentials(pull.physical.registry, None, env)
        return _Source(pull, credentials, asyncio.Semaphore(self._options.connections))

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

        async def read_checked(response: aiohttp.ClientResponse) -> tuple[bytes, str | None]:
            data, content_type = await read(response)
            return pinned.check_bytes(data, f"manifest {version}") if pinned else data, content_type

        # A manifest asked for by digest is checked on arrival: a mirror's wrong one is passed over.
        pinned = Digest.parse(version) if version.startswith(("sha256:", "sha512:")) else None
        return await self._get(f"manifests/{version}", {"Accept": MANIFEST_ACCEPT}, read_checked,
                               what=f"manifest {version}")  # fmt: skip

    async def small_blob(self, digest: Digest) -> bytes:
        """Returns a small blob (a config), verified against its digest."""

        async def read(response: aiohttp.ClientResponse) -> bytes:
            return digest.check_bytes(await _read_bounded(response, MAX_DOCUMENT_SIZE), f"blob {digest}")

        return await self._get(self._blob_path(digest), {}, read, what=f"blob {digest}")

    async def download(self, digest: Digest, size: int, dest: Path, progress: Progress | None = None) -> None:
        """Writes blob `digest` to `dest`, verified. Bytes already in `dest` (an earlier,
        interrupted download) are hashed and kept, and only the rest is asked for, with a
        Range request, as after a dropped connection; if the whole then fails its digest,
        the kept bytes were wrong, and the blob is fetched once more from its start. Wrong
        bytes from a source (a mirror) send the download, from its start, to the next one."""
        sources, kept_allowed = self._in_order(), True
        while True:
            with os.fdopen(os.open(dest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), "r+b") as out:
                state = _Download(out, digest.hasher(), size, progress)
                # Hashing what is kept may take a second per few hundred MB: not on the loop.
                resumed = await asyncio.to_thread(state.keep_existing) if kept_allowed else state.discard_existing()
                if resumed and progress:
                    progress(state.received)
                served = None
                if state.received < size:
                    _, served = await self._get_from(sources, self._blob_path(digest), state.headers, state.consume,
                                                     f"blob {digest}", progress=state.received_so_far)  # fmt: skip
            if state.received != size:
                raise RegistryError(f"blob {digest}: got {state.received} bytes, expected {size}")
            if digest.hex == state.hashed.hexdigest():
                return
            kept_allowed = False
            if resumed:
                log.info("blob %s: the kept part of an interrupted download was wrong; fetching it whole", digest)
            elif served is not None and len(sources) > 1:
                log.warning("blob %s: %s served wrong bytes; trying the next source", digest, served.describe())
                sources = [s for s in sources if s is not served]
            else:
                where = served.registry if served else self.reference.registry
                digest.verify(state.hashed, f"blob {digest} from {where}")

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
        if await self._pushed(self._blob_path(digest), {}, _status, f"blob {digest}", Send("HEAD")) == 200:
            return
        location = await self._pushed("blobs/uploads/", {}, _location, f"upload of {digest}", Send("POST"))
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        put = Send("PUT", lambda: open(path, "rb"))  # noqa: SIM115 (aiohttp streams and closes it)
        await self._pushed(f"{location}{separator}digest={digest}", headers, _status, f"upload of {digest}", put)

    async def push_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        """Stores a manifest under `tag`."""
        send = Send("PUT", lambda: data)
        await self._pushed(f"manifests/{tag}", {"Content-Type": media_type}, _status, f"manifest {tag}", send)

    async def _pushed(
        self, path: str, headers: Mapping[str, str], consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str, send: Send,
    ) -> T:  # fmt: skip
        """A push request: to the registry named, never to a mirror (as podman)."""
        result, _ = await self._get_from([self._push], path, headers, consume, what, send)
        return result

    def _blob_path(self, digest: Digest) -> str:
        return f"blobs/{digest}"

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
        """Requests `path` (relative to the repository, or a URL) from the pull sources and
        returns what `consume` makes of the first good answer."""
        result, _ = await self._get_from(self._in_order(), path, headers, consume, what, send, patience, progress)
        return result

    async def _get_from(
        self,
        sources: list[_Source],
        path: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None = None,
        patience: Patience | None = None,
        progress: Callable[[], int] | None = None,
    ) -> tuple[T, _Source]:
        """Returns what `consume` makes of the first good answer, and the source that gave it.
        The one place requests are retried: each round asks the sources in order, each once;
        within `patience` (by default the mount's), a round that moves `progress` on starts
        the count again. A source that refused (not found, denied, wrong bytes) is out of
        this request; when only such sources are left, the request fails with the last one's
        error (the registry's own), the others' named."""
        clock = RetryClock(patience or Patience(self._options.mount_patience), time.monotonic())
        refused: dict[_Source, ImageError] = {}
        while True:
            round_started, before = time.monotonic(), progress() if progress else 0
            failures: list[tuple[_Source, _Retryable]] = []
            for source in [s for s in sources if s not in refused]:
                try:
                    result = await self._try_within(clock, source, path, headers, consume, what, send)
                except _Retryable as exc:
                    source.failed_at = time.monotonic()
                    failures.append((source, exc))
                    self._log_fall_through(source, exc, sources, what)
                    continue
                except _DeadlinePassed:
                    raise
                except ImageError as exc:
                    if len(sources) == 1:
                        raise
                    refused[source] = exc
                    self._log_fall_through(source, exc, sources, what)
                    continue
                self._answered(source)
                return result, source
            if not failures or _registries_refused(sources, refused):
                raise _refusal(refused, failures) from None
            if all(exc.unreachable for _, exc in failures):  # wrong names or dead hosts: no reason to wait minutes
                clock.patience = Patience(min(clock.patience.seconds, self._options.read_deadline),
                                          clock.patience.deadline)  # fmt: skip
            now = time.monotonic()
            moved = progress is not None and progress() != before
            delay = clock.after_failure(round_started, now, _soonest(failures), moved)
            last_source, last = failures[-1]
            if delay is None:
                message = f"{named(self.reference, what)}: {last} ({clock.gave_up(now)})"
                raise RegistryError(message + _others(refused, failures, last_source)) from None
            log.info("%s: %s; retrying in %.1fs", what, last, delay)
            await asyncio.sleep(delay)

    def _in_order(self) -> list[_Source]:
        """The pull sources in configuration order, those that failed a try within the last
        --timeout seconds moved to the end (a dead mirror is not waited for at every request)."""
        recently = time.monotonic() - self._options.timeout
        return sorted(self._sources, key=lambda s: s.failed_at > recently)

    def _answered(self, source: _Source) -> None:
        """After a good answer: a short name's candidate is settled by its first answer."""
        if source.pull.logical != self.reference or len(self._sources) > 1:
            if source.pull.logical != self.reference:
                log.info("%s: resolved to %s", self.reference.short_name or self.reference, source.pull.logical)
            self.reference = source.pull.logical
            self._sources = [s for s in self._sources if s.pull.logical == source.pull.logical]
        source.failed_at = float("-inf")

    @staticmethod
    def _log_fall_through(source: _Source, error: Exception, sources: list[_Source], what: str) -> None:
        if len(sources) > 1:
            log.info("%s: %s from %s; asking the next source", what, error, source.describe())

    async def _try_within(
        self,
        clock: RetryClock,
        source: _Source,
        path: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None,
    ) -> T:
        """Makes one try, cut at the clock's deadline if it has one."""
        remaining = clock.remaining(time.monotonic())
        if remaining is None:
            return await self._try(source, path, headers, consume, what, send)
        try:
            return await asyncio.wait_for(self._try(source, path, headers, consume, what, send), max(remaining, 0.0))
        except DEADLINE_PASSED:
            clock.tries += 1
            raise _DeadlinePassed(
                f"{named(self.reference, what)}: no answer before the deadline ({clock.gave_up(time.monotonic())})"
            ) from None

    async def _try(
        self,
        source: _Source,
        path: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None,
    ) -> T:
        async with source.limit:
            base = await self._base_url(source)
            wanted = headers() if callable(headers) else headers
            absolute = path.startswith(("http://", "https://"))
            url = path if absolute else f"{base}/v2/{source.reference.repository}/{path}"
            return await self._follow(source, url, base, wanted, consume, what, send)

    async def _follow(
        self,
        source: _Source,
        url: str,
        base: str,
        headers: Mapping[str, str],
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        what: str,
        send: Send | None = None,
    ) -> T:
        original, authenticated, asked_again = url, False, False
        if source.authorization is None and source.challenge is not None:
            await self._authenticate_with(source, source.challenge, stale=None)  # the ping already told us how
        for _ in range(MAX_REDIRECTS + 3):
            on_registry = _origin(url) == _origin(base)
            if on_registry:
                await self._refresh_expired_token(source)
            authorization = source.authorization if on_registry else None
            sent = {**headers, **({"Authorization": authorization} if authorization else {})}
            try:
                async with self._request(source, url, sent, send) as response:
                    status = response.status
                    if status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if status == 401 and on_registry and not authenticated:
                        challenge = response.headers.get("WWW-Authenticate", "")
                        await self._authenticate(source, challenge, stale=authorization)
                        authenticated = True
                        continue
                    if status == 403 and not on_registry and not asked_again:
                        url, asked_again = original, True  # a signed URL expired: get a fresh one
                        continue
                    _check(response, what, named(source.reference, what))
                    return await consume(response)
            except (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError) as exc:
                raise RegistryError(f"{_safe(url)}: TLS certificate not trusted: {exc}") from None
            except NETWORK_ERRORS as exc:
                raise _Retryable(f"{type(exc).__name__} from {_safe(url)}: {exc}") from None
        raise RegistryError(f"{what}: too many redirects")

    def _request(self, source: _Source, url: str, headers: Mapping[str, str], send: Send | None = None):  # type: ignore[no-untyped-def]
        assert self._session is not None
        method, body = (send.method, send.body()) if send else ("GET", None)
        # ssl=True: verify with the system CAs; False: no verification (--tls-verify=false, or
        # `insecure = true` for this source in registries.conf).
        return self._session.request(method, url, headers=dict(headers), data=body, allow_redirects=False,
                                     ssl=self._verifies(source))  # fmt: skip

    def _verifies(self, source: _Source) -> bool:
        """True if TLS is required and verified for `source` (false lets plain HTTP in too)."""
        return self._options.tls_verify and not source.pull.insecure

    async def _base_url(self, source: _Source) -> str:
        """Returns scheme://host of the source's registry API, learning it with a ping of /v2/."""
        if source.base is not None:
            return source.base
        host = source.reference.api_host
        schemes = ["https"] + (["http"] if is_loopback(host) or not self._verifies(source) else [])
        failures = []
        for scheme in schemes:
            try:
                async with self._request(source, f"{scheme}://{host}/v2/", {}) as response:
                    if response.status == 429 or response.status >= 500:
                        raise _Retryable(f"HTTP {response.status} from {scheme}://{host}/v2/", _retry_after(response))
                    if response.status == 400:  # plain HTTP sent to a TLS port: not this scheme
                        failures.append(f"{scheme}: HTTP 400")
                        continue
                    if response.status == 401:
                        source.challenge = _pick_challenge(response.headers.get("WWW-Authenticate", ""))
                    source.base = f"{scheme}://{host}"
                    return source.base
            except (*NETWORK_ERRORS, ssl.SSLError) as exc:
                failures.append(f"{scheme}: {type(exc).__name__}: {exc}")
        if any("Certificate" in f for f in failures):
            raise RegistryError(f"{host}: TLS certificate not trusted ({'; '.join(failures)}); see --tls-verify")
        raise _Retryable(f"cannot reach {host} ({'; '.join(failures)})", unreachable=True)

    # --- authentication ---------------------------------------------------------------

    async def _refresh_expired_token(self, source: _Source) -> None:
        if time.monotonic() >= source.token_expires and source.challenge is not None:
            await self._authenticate_with(source, source.challenge, stale=source.authorization)

    async def _authenticate(self, source: _Source, header: str, stale: str | None) -> None:
        challenge = _pick_challenge(header) or source.challenge
        if challenge is None:
            raise AuthenticationError(f"{source.registry}: 401 without a usable WWW-Authenticate challenge")
        source.challenge = challenge
        await self._authenticate_with(source, challenge, stale)

    async def _authenticate_with(self, source: _Source, challenge: Challenge, stale: str | None) -> None:
        """Replaces the `stale` authorization, unless another task already has."""
        async with source.auth_lock:
            if source.authorization != stale:
                return
            await self._authorize(source, challenge)

    async def _authorize(self, source: _Source, challenge: Challenge) -> None:
        if challenge.scheme == "basic":
            if source.credentials is None:
                raise AuthenticationError(
                    f"{source.registry} requires credentials: use --creds USER[:PASS] or an auth file"
                )
            source.authorization, source.token_expires = source.credentials.basic_header(), float("inf")
            return
        token, lifetime = await self._fetch_token(source, challenge)
        source.authorization = f"Bearer {token}"
        source.token_expires = time.monotonic() + max(1.0, lifetime * 0.9)

    async def _fetch_token(self, source: _Source, challenge: Challenge) -> tuple[str, float]:
        """Asks the token server named by a Bearer challenge for a pull token."""
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthenticationError(f"{source.registry}: Bearer challenge without a realm")
        query = {"scope": challenge.params.get("scope") or f"repository:{source.reference.repository}:pull"}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        credentials = source.credentials
        headers = {"Authorization": credentials.basic_header()} if credentials else {}
        try:
            async with self._request(source, f"{realm}?{urlencode(query)}", headers) as response:
                if response.status in (401, 403):
                    raise AuthenticationError(
                        f"{source.registry}: token server {_safe(realm)} refused "
                        + ("the credentials" if credentials else "anonymous access; use --creds")
                    )
                _check(response, "token", f"token server {_safe(realm)}")
                reply = json.loads(await _read_bounded(response, MAX_DOCUMENT_SIZE))
        except NETWORK_ERRORS as exc:
            raise _Retryable(f"token server {_safe(realm)}: {type(exc).__name__}: {exc}") from None
        except (ValueError, RecursionError):  # RecursionError: nested beyond the parser's depth
            raise AuthenticationError(f"token server {_safe(realm)} answered with malformed JSON") from None
        token = reply.get("token") or reply.get("access_token") if isinstance(reply, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationError(f"token server {_safe(realm)} answered without a token")
        return token, float(reply.get("expires_in") or TOKEN_DEFAULT_SECONDS)


def _registries_refused(sources: list[_Source], refused: Mapping[_Source, ImageError]) -> bool:
    """True when the registries themselves (not mirrors) refused: their word is final, and a
    mirror that is down is not waited for."""
    registries = [s for s in sources if not s.pull.mirror]
    return bool(registries) and all(s in refused for s in registries)


def _refusal(refused: Mapping[_Source, ImageError], failures: list[tuple[_Source, _Retryable]]) -> ImageError:
    """The error of a request that every source refused: the registry's own (its type kept,
    so that callers tell "not found" from "denied"), the mirrors' named after it."""
    answers = list(refused.items())
    source, error = next(((s, e) for s, e in reversed(answers) if not s.pull.mirror), answers[-1])
    others = _others(refused, failures, source)
    return type(error)(f"{error}{others}") if others else error


def _others(refused: Mapping[_Source, ImageError], failures: list[tuple[_Source, _Retryable]], but: _Source) -> str:
    """Names what the sources other than `but` answered, as podman does: "(mirrors also failed: ...)"."""
    said = [f"{s.describe()}: {e}" for s, e in [*refused.items(), *failures] if s is not but]
    return f" (also failed: {'; '.join(said)})" if said else ""


def _soonest(failures: list[tuple[_Source, _Retryable]]) -> float | None:
    """The shortest Retry-After any source asked for: the round after it may find that one ready."""
    asked = [exc.retry_after for _, exc in failures if exc.retry_after is not None]
    return min(asked) if asked else None


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
