"""No reader waits for minutes, and mount-time requests stay patient: a real docker-registry on
loopback, stopped with SIGSTOP (a hung server: the kernel still accepts connections for it,
nothing answers) or behind a proxy that answers 429/503 with Retry-After."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from registry.layout_writer import write_layout
from registry.options import MOUNT_PATIENCE_TIMEOUTS, READ_DEADLINE_TIMEOUTS
from tests.conftest import COMMAND, MOUNT_TIMEOUT, Mounter, require, unmount
from tests.registry_servers import REGISTRY_BINARY, Fault, FaultProxy, Registry, skopeo_copy
from tests.tarvocab import d, f, tar_of
from unionfs.aio import EventLoopThread
from unionfs.estargz.lazy import FAILURE_MEMORY, SMALL_FILE_MAX

T = TypeVar("T")
# Each file twice what counts as small, so that reading one never fetches the next as its
# neighbour: a read of data/file3 must need the registry.
CHUNK = SMALL_FILE_MAX // 2
STALLED = {f"data/file{i}": os.urandom(4 * CHUNK) for i in range(4)}  # incompressible, four chunks each
LAYER = [d("data/"), *(f(name, data) for name, data in STALLED.items()), f("etc/motd", b"hello\n")]
TIMEOUT = 2.0
SLACK = 1.5  # the grace a FUSE thread gives a fetch that is ending by itself, and scheduling


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, dict[str, str]]]:
    """A registry of its own (the tests stop it) holding an eStargz image and a plain one."""
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(shutil.which("skopeo") is not None, "skopeo is missing (apt-get install skopeo)")
    root = tmp_path_factory.mktemp("stalls")
    write_layout(root / "plain", [tar_of(*LAYER)], tag="v1")
    subprocess.run([*COMMAND, "convert", "--cache-dir", str(root / "cc"), "--chunk-size", str(CHUNK),
                    f"oci:{root / 'plain'}:v1", f"oci:{root / 'esgz'}:v1"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    (root / "registry").mkdir()
    server = Registry(root / "registry")
    try:
        skopeo_copy(f"oci:{root / 'plain'}:v1", f"docker://{server.host}/stalls/plain:v1")
        skopeo_copy(f"oci:{root / 'esgz'}:v1", f"docker://{server.host}/stalls/esgz:v1")
        yield server, {"plain": "stalls/plain:v1", "esgz": "stalls/esgz:v1"}
    finally:
        server.stop()


def _timed(action: Callable[[], T], limit: float) -> tuple[T | BaseException, float]:
    """Runs `action` in a thread; returns what it returned or raised, and the seconds it took.
    A reader still blocked after `limit` fails the test (its mount is then torn down)."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    elapsed = time.monotonic() - started
    assert outcome, f"still blocked after {limit:.0f}s"
    return outcome[0], elapsed


def _pread(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.fixture
def foreground_mount(tmp_path: Path, fuse_works: None) -> Iterator[Callable[..., tuple[Path, Path]]]:
    """Returns mount(image, *options) -> (mountpoint, server log): a `crfs-merge -f` server
    whose stderr is kept, so its log lines can be counted. Always torn down."""
    servers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(image: str, *options: str) -> tuple[Path, Path]:
        mountpoint, log = tmp_path / f"mnt{len(servers)}", tmp_path / f"server{len(servers)}.log"
        mountpoint.mkdir()
        with open(log, "wb") as stderr:
            server = subprocess.Popen([*COMMAND, "-f", "--cache-dir", str(tmp_path / "cache"), *options, image,
                                       str(mountpoint)], stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        servers.append((server, mountpoint))
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            assert server.poll() is None, f"server exited: {log.read_text()}"
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
        return mountpoint, log

    yield start
    for server, mountpoint in servers:
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)  # aborts the connection: no reader stays blocked
            server.wait(timeout=10)
        unmount(mountpoint)


def test_a_read_from_a_hung_registry_ends_within_twice_the_timeout_and_succeeds_later(
    registry: tuple[Registry, dict[str, str]], foreground_mount: Callable[..., tuple[Path, Path]]
) -> None:
    server, images = registry
    root, log = foreground_mount(f"{server.host}/{images['esgz']}", "--timeout", f"{TIMEOUT:g}", "--prefetch", "none")
    assert (root / "data/file0").read_bytes() == STALLED["data/file0"]
    time.sleep(0.5)  # the readahead this read started lands
    deadline = READ_DEADLINE_TIMEOUTS * TIMEOUT
    server.pause()
    try:
        failed, took = _timed(lambda: _pread(root / "data/file3", 4096, CHUNK), deadline + 30)
        assert isinstance(failed, OSError) and failed.errno == 5, failed  # EIO
        assert took < deadline + SLACK, f"EIO after {took:.1f}s, deadline {deadline:g}s"
        # The mount stays alive: metadata and cached bytes are served while the registry hangs.
        cached, took_cached = _timed(lambda: (root / "data/file0").read_bytes(), 10)
        assert cached == STALLED["data/file0"] and took_cached < 1
        assert sorted(os.listdir(root / "data")) == sorted(p.split("/")[1] for p in STALLED)
        assert (root / "data/file3").stat().st_size == 4 * CHUNK
    finally:
        server.resume()
    time.sleep(FAILURE_MEMORY)  # how long a failed fetch still fails reads that join it
    # The same read, once the registry answers again: nothing of the failed fetch remains.
    again, took_again = _timed(lambda: _pread(root / "data/file3", 4096, CHUNK), deadline + 30)
    assert again == STALLED["data/file3"][CHUNK : CHUNK + 4096], again
    assert took_again < TIMEOUT, took_again
    assert (root / "data/file3").read_bytes() == STALLED["data/file3"]
    errors = [line for line in log.read_text().splitlines() if "read(" in line]
    assert len(errors) == 1 and "no answer before the deadline" in errors[0], errors  # one line per failed read
    assert "Traceback" not in log.read_text()


def test_reads_waiting_on_a_hung_registry_hold_no_server_thread(
    registry: tuple[Registry, dict[str, str]], foreground_mount: Callable[..., tuple[Path, Path]]
) -> None:
    """A lazy mount serves with a thread per core (a 16-thread server spent its CPU handing the
    interpreter lock around): a read that must fetch is answered from the event loop, so more
    reads than threads may wait on a hung registry while the mount goes on listing."""
    server, images = registry
    root, _ = foreground_mount(f"{server.host}/{images['esgz']}", "--timeout", f"{TIMEOUT:g}", "--prefetch", "none")
    names = sorted(STALLED)  # more files than a 2- or 3-core machine's threads; no chunk of them cached
    server.pause()
    try:
        with ThreadPoolExecutor(len(names)) as readers:
            reads = [readers.submit(_pread, root / name, 4096, 0) for name in names]
            time.sleep(0.5)  # for the reads to reach the server (if they have not, this passes anyway)
            listed = os.listdir(root / "data")  # a READDIR: it needs a thread of its own
            still_waiting = [not read.done() for read in reads]
            failures = [read.exception(READ_DEADLINE_TIMEOUTS * TIMEOUT + 30) for read in reads]
    finally:
        server.resume()
    assert sorted(listed) == sorted(name.split("/")[1] for name in names)
    assert all(still_waiting), still_waiting  # listed while every read still waited
    assert all(isinstance(exc, OSError) and exc.errno == 5 for exc in failures), failures  # EIO at the deadline


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", 7, status=429, retry_after=1),
        Fault("status", 6, status=503, retry_after=2, retry_after_as_date=True),
    ],
    ids=["429-seconds", "503-http-date"],
)
def test_a_burst_of_retry_after_answers_is_waited_out(
    fault: Fault, registry: tuple[Registry, dict[str, str]], mount: Mounter, tmp_path: Path
) -> None:
    server, images = registry
    with EventLoopThread() as loop:
        proxy = FaultProxy(server.host, loop)
        proxy.start()
        try:
            layer = _layer_digest(f"{proxy.host}/{images['plain']}")
            proxy.faults = [dataclasses.replace(fault, path_part=layer)]
            started = time.monotonic()
            root = mount(f"{proxy.host}/{images['plain']}", "--timeout", f"{TIMEOUT:g}")
            took = time.monotonic() - started
        finally:
            proxy.stop()
    assert proxy.faults[0].count == 0 and proxy.paths[f"/v2/stalls/plain/blobs/{layer}"] > fault.count
    assert took >= fault.count * 0.9, f"Retry-After was not honoured: {took:.1f}s"
    assert (root / "etc/motd").read_bytes() == b"hello\n"


def test_a_registry_that_never_recovers_ends_the_mount_with_one_line_within_the_budget(
    registry: tuple[Registry, dict[str, str]], tmp_path: Path, fuse_works: None
) -> None:
    server, images = registry
    timeout = 1.0
    budget = MOUNT_PATIENCE_TIMEOUTS * timeout
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    with EventLoopThread() as loop:
        proxy = FaultProxy(server.host, loop, faults=[Fault("status", 10**6, "/manifests/", 503, retry_after=1)])
        proxy.start()
        try:
            started = time.monotonic()
            run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--timeout", f"{timeout:g}",
                                  f"{proxy.host}/{images['plain']}", str(mountpoint)],
                                 capture_output=True, text=True, timeout=budget + 60)  # fmt: skip
            took = time.monotonic() - started
        finally:
            proxy.stop()
    assert run.returncode == 1 and not os.path.ismount(mountpoint)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "HTTP 503" in lines[0] and "gave up after" in lines[0], run.stderr
    assert f"{proxy.host}/{images['plain']}: manifest: HTTP 503" in lines[0]  # the repository, named
    assert budget - 1.5 <= took <= budget + 5, f"{took:.1f}s for a budget of {budget:g}s"
    assert proxy.requests["manifest"] >= budget - 2  # one try a second, as Retry-After asked


def test_a_retry_after_beyond_the_budget_ends_the_mount_at_once(
    registry: tuple[Registry, dict[str, str]], tmp_path: Path, fuse_works: None
) -> None:
    server, images = registry
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    with EventLoopThread() as loop:
        proxy = FaultProxy(server.host, loop, faults=[Fault("status", 10**6, "/manifests/", 429, retry_after=3600)])
        proxy.start()
        try:
            started = time.monotonic()
            run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--timeout", "1",
                                  f"{proxy.host}/{images['plain']}", str(mountpoint)],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            took = time.monotonic() - started
        finally:
            proxy.stop()
    assert run.returncode == 1 and len(run.stderr.splitlines()) == 1, run.stderr
    assert "HTTP 429" in run.stderr and "asked to wait 3600s" in run.stderr and took < 5, (took, run.stderr)


def _layer_digest(image: str) -> str:
    """The digest of the image's only layer, as skopeo reads the manifest."""
    run = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"],
                         capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    (layer,) = json.loads(run.stdout)["layers"]
    return str(layer["digest"])
