"""Images mounted straight from a real docker-registry on 127.0.0.1, pushed with skopeo:
no auth, htpasswd Basic, token auth with real JWTs, and faults injected by a proxy."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.digest import Digest
from registry.layout_writer import write_index, write_layout
from registry.manifest import Platform
from registry.options import MOUNT_PATIENCE_TIMEOUTS
from registry.remote import RegistryClient, RemoteOptions
from registry.remote_reference import RemoteReference
from tests.conftest import COMMAND, Mounter, require
from tests.registry_servers import (
    REGISTRY_BINARY,
    BlobStorage,
    Fault,
    FaultProxy,
    Registry,
    TokenServer,
    htpasswd_auth,
    self_signed_certificate,
    skopeo_copy,
)
from tests.tarvocab import f, tar_of
from tests.test_mount import RICH_LOWER, RICH_UPPER
from tests.tree_walk import describe_tree
from unionfs.aio import EventLoopThread

USERS = {"alice": "wonderland"}
FAST = ["--timeout", "2"]


@pytest.fixture(scope="module")
def tools() -> None:
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(shutil.which("skopeo") is not None, "skopeo is missing (apt-get install skopeo)")
    require(shutil.which("htpasswd") is not None, "htpasswd is missing (apt-get install apache2-utils)")


@pytest.fixture(scope="module")
def io_loop() -> Iterator[EventLoopThread]:
    with EventLoopThread() as loop:
        yield loop


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout: `rich` (every entry kind, two layers) and a two-platform index `multi`."""
    root = tmp_path_factory.mktemp("layout")
    write_layout(root, [tar_of(*RICH_LOWER), tar_of(*RICH_UPPER)], tag="rich")
    write_layout(root, [tar_of(f("arch", b"amd64"))], tag="amd64", platform=Platform("linux", "amd64"))
    write_layout(root, [tar_of(f("arch", b"arm64"))], tag="arm64", platform=Platform("linux", "arm64", "v8"))
    write_index(root, ["amd64", "arm64"], tag="multi")
    return root


def _serve(
    root: Path, auth: dict[str, object] | None, layout: Path, creds: str | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[Registry]:  # fmt: skip
    registry = Registry(root, auth, tls)
    push = ["--dest-creds", creds] if creds else []
    try:
        skopeo_copy(f"oci:{layout}:rich", f"docker://{registry.host}/public/rich:oci", *push)
        skopeo_copy(f"oci:{layout}:rich", f"docker://{registry.host}/public/rich:v2s2", "--format", "v2s2", *push)
        skopeo_copy(f"oci:{layout}:multi", f"docker://{registry.host}/public/multi:latest", "--all", *push)
        skopeo_copy(f"oci:{layout}:rich", f"docker://{registry.host}/private/rich:v1", *push)
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tools: None, layout: Path) -> Iterator[Registry]:
    yield from _serve(tmp_path_factory.mktemp("plain"), None, layout)


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, tools: None, layout: Path) -> Iterator[tuple[Registry, Path]]:
    root = tmp_path_factory.mktemp("https")
    cert, key = self_signed_certificate(root)
    for registry in _serve(root, None, layout, tls=(cert, key)):
        yield registry, cert


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory, tools: None, layout: Path) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("basic")
    yield from _serve(root, htpasswd_auth(root, USERS), layout, creds="alice:wonderland")


@pytest.fixture(scope="module")
def token(
    tmp_path_factory: pytest.TempPathFactory, tools: None, layout: Path, io_loop: EventLoopThread
) -> Iterator[tuple[Registry, TokenServer]]:
    root = tmp_path_factory.mktemp("token")
    server = TokenServer(root, io_loop, USERS)
    server.start()
    try:
        for registry in _serve(root, server.registry_auth(), layout, creds="alice:wonderland"):
            yield registry, server
    finally:
        server.stop()


@pytest.fixture
def local_tree(layout: Path, mount: Mounter, tmp_path: Path) -> dict[str, tuple[object, ...]]:
    """The tree of the same image mounted from the layout. Its own cache directory, so a
    registry mount in the same test cannot reuse its layers and must download them."""
    return describe_tree(mount(f"oci:{layout}:rich", cache=tmp_path / "local-cache"))


def _fails(image: str, tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> str:
    mountpoint = tmp_path / "failing-mount"
    mountpoint.mkdir(exist_ok=True)
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "fail-cache"), *options, image, str(mountpoint)],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and not os.path.ismount(mountpoint)
    return run.stderr


# --- plain registry ---------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["oci", "v2s2"])
def test_registry_mount_equals_the_local_mount(
    plain: Registry, tag: str, mount: Mounter, local_tree: dict[str, tuple[object, ...]], tmp_path: Path
) -> None:
    assert describe_tree(mount(f"{plain.host}/public/rich:{tag}")) == local_tree
    fetched = list((tmp_path / "cache" / "tars").glob("*.tar"))
    assert len(fetched) == 2  # both layers came over the wire, and were decompressed
    kept = [p for p in (tmp_path / "cache" / "blobs").iterdir() if not p.name.endswith(".lock")]
    assert kept == []  # one copy per layer: the verified tar, not the blob too


def test_docker_transport_prefix_and_digest_pin(plain: Registry, mount: Mounter, tmp_path: Path) -> None:
    digest = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                             f"docker://{plain.host}/public/rich:oci"], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    root = mount(f"docker://{plain.host}/public/rich@{digest}")
    assert (root / "bin" / "su").exists()
    wrong = "sha256:" + "0" * 64
    assert "not found" in _fails(f"{plain.host}/public/rich@{wrong}", tmp_path)


def test_platform_selection(plain: Registry, mount: Mounter, tmp_path: Path) -> None:
    image = f"{plain.host}/public/multi"
    assert (mount(image, "--platform", "linux/arm64") / "arch").read_bytes() == b"arm64"
    assert (mount(image, "--platform", "linux/amd64") / "arch").read_bytes() == b"amd64"
    error = _fails(image, tmp_path, "--platform", "linux/s390x")
    assert "no image for platform linux/s390x (available: linux/amd64, linux/arm64/v8)" in error


def test_missing_repository_and_unreachable_registry(plain: Registry, tmp_path: Path) -> None:
    assert "not found" in _fails(f"{plain.host}/public/absent:v1", tmp_path)
    from tests.registry_servers import free_port

    started = time.monotonic()
    error = _fails(f"127.0.0.1:{free_port()}/x:y", tmp_path, *FAST)
    assert "cannot reach" in error and "gave up" in error
    assert time.monotonic() - started < 60


def test_range_reads_against_the_registry(plain: Registry, layout: Path, io_loop: EventLoopThread) -> None:
    blob = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = blob.read_bytes()
    digest = Digest.parse(f"sha256:{blob.name}")

    async def read(start: int, end: int) -> bytes:
        reference = RemoteReference.parse(f"{plain.host}/public/rich:oci")
        async with RegistryClient(reference, RemoteOptions(), {}) as client:
            return await client.read_range(digest, start, end)

    for start, end in ((0, 0), (1, 4096), (len(data) - 10, len(data) - 1)):
        assert io_loop.run(read(start, end)) == data[start : end + 1]


def test_https_verifies_certificates_unless_told_not_to(
    https: tuple[Registry, Path], mount: Mounter, tmp_path: Path, local_tree: dict[str, tuple[object, ...]]
) -> None:
    registry, cert = https
    image = f"{registry.host}/public/rich:oci"
    assert "TLS certificate not trusted" in _fails(image, tmp_path, *FAST)
    assert describe_tree(mount(image, "--tls-verify=false")) == local_tree
    trusting = {**os.environ, "SSL_CERT_FILE": str(cert)}  # as if the CA were in the system store
    mountpoint = tmp_path / "trusted"
    mountpoint.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "t"), image, str(mountpoint)], env=trusting,
                   check=True, timeout=120)  # fmt: skip
    try:
        assert describe_tree(mountpoint) == local_tree
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)


# --- authentication ---------------------------------------------------------------------


def test_basic_auth(basic: Registry, mount: Mounter, tmp_path: Path, local_tree: dict[str, tuple[object, ...]]) -> None:
    image = f"{basic.host}/private/rich:v1"
    assert "requires credentials" in _fails(image, tmp_path)
    assert "access denied" in _fails(image, tmp_path, "--creds", "alice:wrong")
    assert describe_tree(mount(image, "--creds", "alice:wonderland")) == local_tree


def test_credentials_from_auth_files_in_podman_order(basic: Registry, mount: Mounter, tmp_path: Path) -> None:
    image = f"{basic.host}/private/rich:v1"
    auth = base64.b64encode(b"alice:wonderland").decode()
    wrong = base64.b64encode(b"alice:nope").decode()
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {basic.host: {"auth": auth}}}))
    (tmp_path / "home" / ".docker").mkdir(parents=True)
    (tmp_path / "home" / ".docker" / "config.json").write_text(json.dumps({"auths": {basic.host: {"auth": wrong}}}))
    env = {**os.environ, "HOME": str(tmp_path / "home"), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    assert "access denied" in _fails(image, tmp_path, env={k: v for k, v in env.items() if k != "REGISTRY_AUTH_FILE"})
    mountpoint = tmp_path / "from-auth-file"
    mountpoint.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), image, str(mountpoint)], env=env, check=True,
                   timeout=120)  # fmt: skip
    try:
        assert (mountpoint / "big").stat().st_size > 0
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)


def test_token_auth_with_a_credential_helper(
    token: tuple[Registry, TokenServer], mount: Mounter, tmp_path: Path, local_tree: dict[str, tuple[object, ...]]
) -> None:
    registry, server = token
    assert describe_tree(mount(f"{registry.host}/public/rich:oci")) == local_tree  # anonymous pull
    assert "refused anonymous access" in _fails(f"{registry.host}/private/rich:v1", tmp_path)
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-crfstest"
    helper.write_text(
        '#!/bin/sh\nread server\necho \'{"ServerURL":"\'$server\'","Username":"alice","Secret":"wonderland"}\'\n'
    )
    helper.chmod(0o755)
    (tmp_path / "home" / ".docker").mkdir(parents=True)
    config = {"credHelpers": {registry.host: "crfstest"}}
    (tmp_path / "home" / ".docker" / "config.json").write_text(json.dumps(config))
    before = server.issued["alice"]
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{helper_dir}:{os.environ['PATH']}"}
    mountpoint = tmp_path / "helper-mount"
    mountpoint.mkdir()
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), f"{registry.host}/private/rich:v1",
                    str(mountpoint)], env=env, check=True, timeout=120)  # fmt: skip
    try:
        assert describe_tree(mountpoint) == local_tree
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert server.issued["alice"] - before == 1  # one token, reused for every request of the pull


def test_a_rejected_token_is_refreshed(
    token: tuple[Registry, TokenServer], io_loop: EventLoopThread, mount: Mounter,
    local_tree: dict[str, tuple[object, ...]],
) -> None:  # fmt: skip
    """A 401 in mid-pull (a token revoked or expired early) gets one fresh token, then goes on."""
    registry, server = token
    fault_proxy = FaultProxy(registry.host, io_loop, faults=[Fault("status", 1, status=401)])
    fault_proxy.start()
    before = server.issued["alice"]
    try:
        assert describe_tree(mount(f"{fault_proxy.host}/private/rich:v1", "--creds", "alice:wonderland")) == local_tree
    finally:
        fault_proxy.stop()
    assert server.issued["alice"] - before == 2


def test_secrets_stay_out_of_logs_and_process_titles(basic: Registry, tmp_path: Path) -> None:
    secret = "wonderland"
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    log = tmp_path / "server.log"
    run = subprocess.run([*COMMAND, "-v", "--cache-dir", str(tmp_path / "c"), "--creds", f"alice:{secret}",
                          "--log-file", str(log), f"{basic.host}/private/rich:v1", str(mountpoint)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert run.returncode == 0, run.stderr
        assert secret not in run.stderr and base64.b64encode(b"alice:" + secret.encode()).decode() not in run.stderr
        servers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count(str(mountpoint))]
        assert servers and not any(secret in _cmdline(p) for p in servers)
        # Nor in the server's environment (which its owner can read in /proc), nor in its log.
        assert not any(secret.encode() in (p / "environ").read_bytes() for p in servers)
        assert "mount ready" in log.read_text() and secret not in log.read_text()
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert secret not in _fails(f"{basic.host}/private/rich:v1", tmp_path, "--creds", "alice:wrongsecret")


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- faults between client and registry ----------------------------------------------------


@pytest.fixture
def proxy(plain: Registry, io_loop: EventLoopThread) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(plain.host, io_loop, stall_seconds=5)
    fault_proxy.start()
    yield fault_proxy
    fault_proxy.stop()


@pytest.mark.parametrize(
    "faults",
    [
        [Fault("reset", 2)],
        [Fault("status", 2, status=503)],
        [Fault("status", 1, status=429), Fault("status", 1, path_part="/manifests/", status=502)],
        [Fault("truncate", 2)],
        [Fault("stall", 1)],
        [Fault("reset", 1, path_part="/v2/")],
    ],
    ids=["resets", "503s", "429-and-502", "truncated-bodies", "stall", "reset-ping"],
)
def test_client_recovers_from_passing_faults(
    faults: list[Fault], proxy: FaultProxy, mount: Mounter, local_tree: dict[str, tuple[object, ...]]
) -> None:
    proxy.faults = faults
    assert describe_tree(mount(f"{proxy.host}/public/rich:oci", *FAST)) == local_tree
    assert all(fault.count == 0 for fault in faults)


def test_persistent_faults_fail_clearly_and_in_bounded_time(proxy: FaultProxy, tmp_path: Path) -> None:
    budget = MOUNT_PATIENCE_TIMEOUTS * float(FAST[1])  # retried for a time, not a count of tries
    for fault, message in ((Fault("status", 1000, status=503), "HTTP 503"), (Fault("stall", 1000), "Timeout")):
        proxy.faults = [fault]
        started = time.monotonic()
        error = _fails(f"{proxy.host}/public/rich:oci", tmp_path, *FAST)
        tries = re.search(r"gave up after (\d+) tries", error)
        assert message in error and tries and int(tries[1]) > 5, error
        assert budget - 1 < time.monotonic() - started < budget + 10


def test_registry_without_range_support_still_reads_right(
    proxy: FaultProxy, layout: Path, io_loop: EventLoopThread
) -> None:
    proxy.faults = [Fault("ignore_range", 100)]
    blob = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = blob.read_bytes()

    async def read() -> bytes:
        reference = RemoteReference.parse(f"{proxy.host}/public/rich:oci")
        async with RegistryClient(reference, RemoteOptions(), {}) as client:
            return await client.read_range(Digest.parse(f"sha256:{blob.name}"), 1000, 9999)

    assert io_loop.run(read()) == data[1000:10000]


def test_redirects_drop_credentials_and_expired_urls_are_asked_again(
    token: tuple[Registry, TokenServer], layout: Path, io_loop: EventLoopThread, mount: Mounter,
    local_tree: dict[str, tuple[object, ...]],
) -> None:  # fmt: skip
    registry, _ = token
    storage = BlobStorage(layout, io_loop)
    storage.start()
    fault_proxy = FaultProxy(registry.host, io_loop, redirect_to=storage.base, faults=[Fault("redirect", 1000)])
    fault_proxy.start()
    try:
        tree = describe_tree(mount(f"{fault_proxy.host}/private/rich:v1", "--creds", "alice:wonderland"))
    finally:
        fault_proxy.stop()
        storage.stop()
    assert tree == local_tree
    # The config, a footer of each gzip layer (is it eStargz? no), then each layer whole.
    assert storage.served == 5 and storage.authorization_seen == []


def test_concurrent_mounts_share_one_download(proxy: FaultProxy, tmp_path: Path, fuse_works: None) -> None:
    image = f"{proxy.host}/public/rich:oci"
    mountpoints = [tmp_path / "a", tmp_path / "b"]
    for mountpoint in mountpoints:
        mountpoint.mkdir()
    # --pull always: each resolves the image itself (the second might find the first's record)
    runs = [subprocess.Popen([*COMMAND, "--pull", "always", "--cache-dir", str(tmp_path / "shared"), image, str(m)])
            for m in mountpoints]  # fmt: skip
    try:
        assert [r.wait(timeout=120) for r in runs] == [0, 0]
        assert (mountpoints[0] / "big").read_bytes() == (mountpoints[1] / "big").read_bytes()
        assert proxy.requests["blob"] == 4  # a config each, and the two layers once between them
    finally:
        for mountpoint in mountpoints:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    assert stat.S_ISDIR(os.stat(tmp_path / "shared" / "blobs").st_mode)


def test_convert_pushes_estargz_through_token_auth(
    token: tuple[Registry, TokenServer], layout: Path, mount: Mounter, tmp_path: Path,
    local_tree: dict[str, tuple[object, ...]],
) -> None:  # fmt: skip
    """convert to a registry asks for a push token (the upload's challenge names push scope),
    uploads blobs then the manifest; the result mounts lazily and equals the source."""
    registry, _ = token
    image = f"{registry.host}/private/converted:esgz"
    subprocess.run([*COMMAND, "convert", "--cache-dir", str(tmp_path / "cc"), "--creds", "alice:wonderland",
                    f"oci:{layout}:rich", image], check=True, capture_output=True, timeout=300)  # fmt: skip
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "alice:wonderland",
                          f"docker://{image}"], capture_output=True, check=True).stdout  # fmt: skip
    layers = json.loads(raw)["layers"]
    assert all("containerd.io/snapshot/stargz/toc.digest" in layer["annotations"] for layer in layers)
    assert describe_tree(mount(image, "--creds", "alice:wonderland", "--prefetch", "none")) == local_tree
    assert not list((tmp_path / "cc").glob("convert-*"))  # the staging layout is gone


# --- a password asked for ------------------------------------------------------------------


def test_creds_user_alone_asks_for_the_password_on_a_terminal(basic: Registry, tmp_path: Path) -> None:
    """`--creds alice` on a terminal: getpass asks (echo off), and the mount uses the answer."""
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    controller, terminal = os.openpty()
    # A session of its own, so no other terminal (the one running the tests) is asked instead.
    command = subprocess.Popen([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--creds", "alice",
                                f"{basic.host}/private/rich:v1", str(mountpoint)], stdin=terminal,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    os.close(terminal)
    prompt = "Password for alice: "
    try:
        assert command.stderr is not None
        assert command.stderr.read(len(prompt)) == prompt  # echo is off from now on (input before it is dropped)
        os.write(controller, b"wonderland\n")
        assert command.wait(timeout=120) == 0, command.stderr.read()
        assert (mountpoint / "big").stat().st_size > 0
    finally:
        command.kill()
        os.close(controller)
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)


def test_password_stdin(basic: Registry, tmp_path: Path) -> None:
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--creds", "alice", "--password-stdin",
                          f"{basic.host}/private/rich:v1", str(mountpoint)], input="wonderland\n",
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert run.returncode == 0, run.stderr
        assert (mountpoint / "big").stat().st_size > 0
        # The spawned server (a fresh interpreter, for the secret's sake) holds the mountpoint's lock.
        (server,) = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(mountpoint) in _cmdline(p)]
        second = subprocess.run([*COMMAND, f"{basic.host}/private/rich:v1", str(mountpoint)], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert (second.returncode, f"crfs-merge server {server} is already" in second.stderr) == (2, True)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)


def test_verbose_registry_mount_names_the_manifest_and_the_fetch(plain: Registry, tmp_path: Path) -> None:
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    image = f"{plain.host}/public/rich:oci"
    run = subprocess.run([*COMMAND, "-v", "--cache-dir", str(tmp_path / "c"), image, str(mountpoint)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    assert run.returncode == 0, run.stderr
    inspect = ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{image}"]
    digest = subprocess.run(inspect, capture_output=True, text=True, check=True).stdout.strip()
    assert f"crfs-merge: {image}: manifest {digest}" in run.stderr.splitlines()
    assert "crfs-merge: layer 0 (" in run.stderr and "fetching whole" in run.stderr
    assert "crfs-merge: fetched 2 layers" in run.stderr
    assert run.stderr.splitlines()[-1] == "crfs-merge: mount ready"
