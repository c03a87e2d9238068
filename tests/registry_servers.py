"""Real servers on 127.0.0.1 for the registry tests, each stopped by its fixture:

- `Registry`: Debian's docker-registry (the reference distribution implementation), with no
  auth, htpasswd Basic auth, or token auth trusting our token server's certificate;
- `TokenServer`: an aiohttp token endpoint issuing real RS256 JWTs with an x5c chain,
  which the registry verifies against its rootcertbundle;
- `FaultProxy`: an aiohttp reverse proxy that resets, refuses (503/429, with a Retry-After in
  seconds or as an HTTP-date), stalls, truncates, redirects to another host, or ignores Range,
  as a test plans it, optionally at a slow rate; it counts what it serves.

`Registry.pause()` stops the registry process (SIGSTOP) as a hung server: the kernel still
accepts connections for it, but nothing answers; `resume()` (SIGCONT) lets it go on.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientSession, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from unionfs.aio import EventLoopThread

REGISTRY_BINARY = "/usr/bin/docker-registry"
SERVICE = "crfs-test-registry"
ISSUER = "crfs-test-issuer"
START_SECONDS = 20


_UNVERIFIED = ssl.create_default_context()
_UNVERIFIED.check_hostname, _UNVERIFIED.verify_mode = False, ssl.CERT_NONE


def self_signed_certificate(root: Path, common_name: str = "127.0.0.1") -> tuple[Path, Path]:
    """Writes a self-signed server certificate for 127.0.0.1; returns (cert, key) paths."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = root / "server.pem", root / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_serving(url: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            errors = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"server exited with {process.returncode}: {errors}")
        try:
            urllib.request.urlopen(url, timeout=1, context=_UNVERIFIED).close()
            return
        except urllib.error.HTTPError:
            return  # it answered: 401 is a fine answer to /v2/
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not start within {START_SECONDS}s")


class Registry:
    """docker-registry serving from a temporary directory on 127.0.0.1; with `proxy` (a
    registry's URL), a pull-through cache of that registry; `port` again after a stop() starts
    the same registry anew (its storage is kept)."""

    def __init__(self, root: Path, auth: dict[str, object] | None = None, tls: tuple[Path, Path] | None = None,
                 proxy: str | None = None, port: int | None = None) -> None:  # fmt: skip
        self.root = root
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        http: dict[str, object] = {"addr": self.host, "secret": "crfs-merge-tests"}
        if tls:
            http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
            "http": http,
            **({"auth": auth} if auth else {}),
            **({"proxy": {"remoteurl": proxy}} if proxy else {}),
        }
        (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        self._process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_until_serving(f"{'https' if tls else 'http'}://{self.host}/v2/", self._process)

    def pause(self) -> None:
        """Stops the registry process: connections are still accepted, nothing answers."""
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused registry go on (harmless when it is not paused)."""
        if self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process cannot act on SIGTERM
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()


def skopeo_copy(source: str, dest: str, *flags: str) -> None:
    """Pushes with skopeo: the reference tool, so our client reads what others write."""
    run = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *flags, source, dest],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if run.returncode:
        raise RuntimeError(f"skopeo copy {source} {dest} failed: {run.stderr}")


@contextmanager
def estargz_in_registry(root: Path, layers: list[bytes], repository: str,
                       history: list[dict[str, object]] | None = None) -> Iterator[Registry]:  # fmt: skip
    """A loopback registry holding the tars `layers` as estargz_layout makes them, pushed as
    `repository`; stopped on exit."""
    converted = estargz_layout(root, layers, history)
    (root / "registry").mkdir()
    registry = Registry(root / "registry")
    try:
        skopeo_copy(f"oci:{converted}:v1", f"docker://{registry.host}/{repository}")
        yield registry
    finally:
        registry.stop()


def estargz_layout(root: Path, layers: list[bytes], history: list[dict[str, object]] | None = None,
                   name: str = "") -> Path:  # fmt: skip
    """The tars `layers` as an OCI layout (`root/sourceNAME`, tag v1) converted to eStargz by
    `crfs-merge convert`; returns the converted layout (`root/esgzNAME`, tag v1)."""
    from registry.layout_writer import write_layout
    from tests.conftest import COMMAND

    source, converted = root / f"source{name}", root / f"esgz{name}"
    write_layout(source, layers, tag="v1", history=history)
    subprocess.run([*COMMAND, "convert", "--cache-dir", str(root / "convert-cache"), f"oci:{source}:v1",
                    f"oci:{converted}:v1"], check=True, capture_output=True, timeout=300)  # fmt: skip
    return converted


def htpasswd_auth(root: Path, users: dict[str, str]) -> dict[str, object]:
    lines = [subprocess.run(["htpasswd", "-Bbn", u, p], check=True, capture_output=True, text=True).stdout.strip()
             for u, p in users.items()]  # fmt: skip
    (root / "htpasswd").write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": "crfs-test", "path": str(root / "htpasswd")}}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Issues pull/push tokens: any action to known users, pull on public/* to anyone."""

    root: Path
    loop: EventLoopThread
    users: dict[str, str]
    lifetime: int = 300
    issued: Counter[str] = field(default_factory=Counter)

    def start(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        self.cert_path = self.root / "token-cert.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app)
        self.loop.run(self._runner.setup())
        self.loop.run(web.TCPSite(self._runner, "127.0.0.1", self.port).start())

    def stop(self) -> None:
        self.loop.run(self._runner.cleanup())

    def registry_auth(self) -> dict[str, object]:
        return {"token": {"realm": f"http://127.0.0.1:{self.port}/token", "service": SERVICE,
                          "issuer": ISSUER, "rootcertbundle": str(self.cert_path)}}  # fmt: skip

    async def _token(self, request: web.Request) -> web.Response:
        user = self._user(request.headers.get("Authorization", ""))
        if user == "":
            return web.Response(status=401, text="bad credentials")
        scopes = request.query.getall("scope") if "scope" in request.query else []
        access = [a for scope in scopes if (a := self._grant(scope, user))]
        if user is None and scopes and not access:
            return web.Response(status=401, text="anonymous access is for public/* only")
        token = self._sign({"iss": ISSUER, "sub": user or "", "aud": request.query.get("service", ""),
                            "exp": int(time.time()) + self.lifetime, "nbf": int(time.time()) - 5,
                            "iat": int(time.time()), "jti": uuid.uuid4().hex, "access": access})  # fmt: skip
        self.issued[user or "anonymous"] += 1
        return web.json_response({"token": token, "expires_in": self.lifetime})

    def _user(self, header: str) -> str | None:
        """Returns the user of a valid Basic header, None without one, '' for a wrong one."""
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else ""

    @staticmethod
    def _grant(scope: str, user: str | None) -> dict[str, object] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or (user is None and not name.startswith("public/")):
            return None
        allowed = actions.split(",") if user else ["pull"]
        return {"type": "repository", "name": name, "actions": allowed}

    def _sign(self, claims: dict[str, object]) -> str:
        cert = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        header = {"typ": "JWT", "alg": "RS256", "x5c": [cert]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _kind(request: web.Request) -> str:
    """Returns what a registry request asks for: blob, range (of a blob), manifest, other."""
    if "/blobs/" in request.path:
        return "range" if "Range" in request.headers else "blob"
    return "manifest" if "/manifests/" in request.path else "other"


@dataclass
class Fault:
    """What the proxy does to the next `count` requests whose path contains `path_part`."""

    kind: str  # reset | status | stall | hold | truncate | corrupt | redirect | ignore_range
    count: int = 1
    path_part: str = "/blobs/"
    status: int = 503
    retry_after: float = 0  # what a `status` answer's Retry-After asks for, in seconds
    retry_after_as_date: bool = False  # sent as the HTTP-date that many seconds from now
    until: str = "range"  # `hold`: answered once a request of this kind (see _kind) arrives

    def retry_after_header(self) -> str:
        if self.retry_after_as_date:
            return email.utils.formatdate(time.time() + self.retry_after, usegmt=True)
        return f"{self.retry_after:g}"


@dataclass
class FaultProxy:
    """A reverse proxy in front of `upstream` (host:port) that applies planned faults."""

    upstream: str
    loop: EventLoopThread
    bind: str = "127.0.0.1"
    faults: list[Fault] = field(default_factory=list)
    served_bytes: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)  # requests per path
    stall_seconds: float = 30.0
    redirect_to: str | None = None  # base URL of a BlobStorage
    bytes_per_second: float | None = None  # a slow link: bodies are sent at this rate
    # Per request a `hold` fault held: the kind whose arrival let it go, or "timeout" (after
    # stall_seconds): what a client asked for while it waited for the held answer.
    released_by: list[str] = field(default_factory=list)
    _arrived: dict[str, asyncio.Event] = field(default_factory=dict)

    def start(self) -> None:
        self.port = free_port()
        self.host = f"{self.bind}:{self.port}"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self.loop.run(self._runner.setup())
        self.loop.run(web.TCPSite(self._runner, self.bind, self.port).start())

    def stop(self) -> None:
        self.loop.run(self._runner.cleanup(), timeout=30)

    def _take(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.count > 0 and fault.path_part in path:
                fault.count -= 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[_kind(request)] += 1
        self.paths[request.path] += 1
        self._arrived.setdefault(_kind(request), asyncio.Event()).set()
        fault = self._take(request.path)
        if fault and fault.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault and fault.kind == "status":
            return web.Response(status=fault.status, headers={"Retry-After": fault.retry_after_header()})
        if fault and fault.kind == "stall":
            await asyncio.sleep(self.stall_seconds)
        if fault and fault.kind == "hold":
            self.released_by.append(await self._first_arrival(fault.until))
        if fault and fault.kind == "redirect":
            return web.Response(status=307, headers={"Location": f"{self.redirect_to}{request.path_qs}"})
        # A list, not a dict: clients repeat headers (skopeo sends one Accept per media type).
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "range")]
        if "Range" in request.headers and not (fault and fault.kind == "ignore_range"):
            headers.append(("Range", request.headers["Range"]))
        try:
            return await self._forward(request, headers, fault.kind if fault else None)
        except ConnectionResetError:  # the client went away (a command that ended, a read given up)
            return web.StreamResponse(status=499)

    async def _first_arrival(self, kind: str) -> str:
        """Returns `kind` once a request of that kind has arrived, or "timeout" after stall_seconds."""
        try:
            await asyncio.wait_for(self._arrived.setdefault(kind, asyncio.Event()).wait(), self.stall_seconds)
        except asyncio.TimeoutError:
            return "timeout"
        return kind

    async def _forward(
        self, request: web.Request, headers: list[tuple[str, str]], fault: str | None
    ) -> web.StreamResponse:
        async with ClientSession(auto_decompress=False) as session, session.request(
            request.method, f"http://{self.upstream}{request.path_qs}", headers=headers,
            data=await request.read(), allow_redirects=False,
        ) as upstream:  # fmt: skip
            body = await upstream.read()
            passed = {k: v for k, v in upstream.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            if upstream.headers.get("Location", "").startswith(f"http://{self.upstream}"):
                passed["Location"] = upstream.headers["Location"].replace(self.upstream, self.host)
            response = web.StreamResponse(status=upstream.status, headers=passed)
            await response.prepare(request)
            sent = body[: len(body) // 2] if fault == "truncate" else body
            if fault == "corrupt" and sent:  # wrong bytes, right length: only a digest can tell
                sent = sent[: len(sent) // 2] + bytes([sent[len(sent) // 2] ^ 0xFF]) + sent[len(sent) // 2 + 1 :]
            await self._send(response, sent)
            if fault == "truncate":
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
            return response

    async def _send(self, response: web.StreamResponse, body: bytes) -> None:
        """Writes `body`, counting what leaves, at `bytes_per_second` if that is set."""
        step = len(body) if self.bytes_per_second is None else max(1, int(self.bytes_per_second / 20))
        for start in range(0, len(body), step) if body else ():
            # Counted before it is written: a client that has the bytes must find them counted
            # (after the write, the count could lag behind a read that has already returned).
            self.served_bytes += len(body[start : start + step])
            await response.write(body[start : start + step])
            if self.bytes_per_second is not None:
                await asyncio.sleep(0.05)


@dataclass
class BlobStorage:
    """A stand-in for the object store that registries redirect blob downloads to. It serves
    blobs from an OCI layout on disk (honouring Range), refuses its first request as an
    expired signed URL would, and records every Authorization header that reaches it: the
    registry's credentials must never be sent here."""

    layout: Path
    loop: EventLoopThread
    bind: str = "127.0.0.2"
    expire_first: bool = True
    authorization_seen: list[str] = field(default_factory=list)
    served: int = 0

    def start(self) -> None:
        self.port = free_port()
        self.base = f"http://{self.bind}:{self.port}"
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self.loop.run(self._runner.setup())
        self.loop.run(web.TCPSite(self._runner, self.bind, self.port).start())

    def stop(self) -> None:
        self.loop.run(self._runner.cleanup())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            self.authorization_seen.append(request.headers["Authorization"])
        if self.expire_first:
            self.expire_first = False
            return web.Response(status=403, text="Request has expired")
        algorithm, _, hexdigest = request.path.rsplit("/", 1)[-1].partition(":")
        self.served += 1
        return web.FileResponse(self.layout / "blobs" / algorithm / hexdigest)  # serves Range requests too
