"""Mirrors and pull-through caches, with real processes: an origin docker-registry, a second
docker-registry configured as its pull-through cache (`proxy: remoteurl:`), and counting
proxies (tests/registry_servers.FaultProxy) in front, to see who served what. registries.conf
points the origin's name at the mirror; crfs-merge mounts and exports through it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from registry.layout_writer import write_layout
from tests.conftest import COMMAND, Mounter, require
from tests.registry_servers import (
    REGISTRY_BINARY,
    Fault,
    FaultProxy,
    Registry,
    estargz_in_registry,
    free_port,
    skopeo_copy,
)
from tests.tarvocab import d, f, tar_of
from unionfs.aio import EventLoopThread

FILES = {"etc/motd": b"hello from the origin\n", "data/big": os.urandom(400_000)}
LAYERS = [tar_of(d("etc/"), f("etc/motd", FILES["etc/motd"])), tar_of(d("data/"), f("data/big", FILES["data/big"]))]
LAYER_BYTES = 400_000  # at least this much must cross the wire for one pull (random data does not compress)
RUN_TIMEOUT = 120  # bounds every command: a fall-through that hung would fail here


@dataclass
class Site:
    """An origin registry holding `team/app:v1`, and a pull-through cache of it (`mirror`)
    behind a counting proxy (`mirror_front`)."""

    root: Path
    loop: EventLoopThread
    digest: str  # of the image's manifest
    origin: Registry = field(init=False)
    mirror: Registry = field(init=False)
    mirror_front: FaultProxy = field(init=False)

    @property
    def image(self) -> str:
        return f"{self.origin.host}/team/app:v1"

    def conf(self, name: str, body: str) -> Path:
        path = self.root / f"{name}.conf"
        path.write_text(body)
        return path

    def mirrored(self, *mirrors: str, extra: str = "") -> Path:
        """A registries.conf sending the origin's names to `mirrors` first, in order."""
        tables = "".join(f'[[registry.mirror]]\nlocation = "{m}"\n{extra}\n' for m in mirrors)
        return self.conf("mirrored", f'[[registry]]\nlocation = "{self.origin.host}"\n{tables}')


def _requires_registry() -> None:
    require(os.path.exists(REGISTRY_BINARY), "docker-registry is missing (apt-get install docker-registry)")
    require(shutil.which("skopeo") is not None, "skopeo is missing (apt-get install skopeo)")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    _requires_registry()
    digest = write_layout(tmp_path / "layout", LAYERS, tag="v1")
    for name in ("origin", "mirror"):
        (tmp_path / name).mkdir()
    with EventLoopThread() as loop, contextlib.ExitStack() as stopping:
        world = Site(tmp_path, loop, digest)
        world.origin = Registry(tmp_path / "origin")
        stopping.callback(lambda: world.origin.stop())  # the test may start it anew
        skopeo_copy(f"oci:{tmp_path / 'layout'}:v1", f"docker://{world.origin.host}/team/app:v1")
        world.mirror = Registry(tmp_path / "mirror", proxy=f"http://{world.origin.host}")
        stopping.callback(world.mirror.stop)
        world.mirror_front = FaultProxy(world.mirror.host, loop)
        world.mirror_front.start()
        stopping.callback(world.mirror_front.stop)
        yield world


def export(image: str, conf: Path, cache: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`crfs-merge --export` of `image` with registries.conf `conf`, into cache/out.tar."""
    return subprocess.run([*COMMAND, "--cache-dir", str(cache), "--registries-conf", str(conf), *options,
                           "--export", str(cache.parent / f"{cache.name}.tar"), image],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip


def exported_files(cache: Path) -> dict[str, bytes]:
    with tarfile.open(cache.parent / f"{cache.name}.tar") as archive:
        return {m.name.removeprefix("./"): archive.extractfile(m).read()  # type: ignore[union-attr]
                for m in archive.getmembers() if m.isfile()}  # fmt: skip


def served(proxy: FaultProxy) -> int:
    return sum(proxy.requests.values())


def test_a_pull_through_cache_serves_a_second_machine_alone_and_the_origin_serves_when_it_is_down(
    site: Site, mount: Mounter, tmp_path: Path
) -> None:
    conf = site.mirrored(site.mirror_front.host)
    first = mount(site.image, "--registries-conf", str(conf), cache=tmp_path / "machine1")
    assert {name: (first / name).read_bytes() for name in FILES} == FILES
    assert site.mirror_front.served_bytes >= LAYER_BYTES  # the cache served the pull (and filled itself)

    site.origin.stop()  # the second machine: only the site's cache is there to ask
    before = site.mirror_front.served_bytes
    second = mount(site.image, "--registries-conf", str(conf), cache=tmp_path / "machine2")
    assert {name: (second / name).read_bytes() for name in FILES} == FILES
    assert site.mirror_front.served_bytes - before >= LAYER_BYTES

    site.origin = Registry(site.origin.root, port=site.origin.port)
    site.mirror_front.stop()
    site.mirror.stop()  # the cache is down, the origin back: a third machine pulls from the origin
    third = mount(site.image, "--registries-conf", str(conf), cache=tmp_path / "machine3")
    assert {name: (third / name).read_bytes() for name in FILES} == FILES


def test_a_mirror_that_refuses_is_asked_once_and_the_origin_serves(site: Site, tmp_path: Path) -> None:
    site.mirror_front.faults = [Fault("status", 10**6, path_part="/", status=503)]
    run = export(site.image, site.mirrored(site.mirror_front.host), tmp_path / "c")
    assert run.returncode == 0, run.stderr
    assert exported_files(tmp_path / "c") == FILES
    # Asked first (the manifest), then, having failed, asked last: the origin served the rest.
    assert served(site.mirror_front) == 1


def test_a_mirror_that_is_down_or_silent_falls_through_within_the_budget(site: Site, tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # refuses connections
    site.mirror.pause()  # accepts connections, never answers: each try ends at --timeout
    conf = site.mirrored(nobody, site.mirror.host)
    run = export(site.image, conf, tmp_path / "c", "--timeout", "3", "--verbose")
    site.mirror.resume()
    assert run.returncode == 0, run.stderr
    assert exported_files(tmp_path / "c") == FILES
    assert "from mirror " + nobody in run.stderr and "from mirror " + site.mirror.host in run.stderr


def test_a_mirror_serving_wrong_bytes_is_passed_over(site: Site, tmp_path: Path) -> None:
    site.mirror_front.faults = [Fault("corrupt", 10**6)]  # every blob answer, right length, wrong bytes
    run = export(site.image, site.mirrored(site.mirror_front.host), tmp_path / "c", "--verbose")
    assert run.returncode == 0, run.stderr
    assert exported_files(tmp_path / "c") == FILES
    assert site.mirror_front.requests["blob"] >= 1 and "content is sha256:" in run.stderr


def test_digest_only_mirrors_are_skipped_for_tags_and_used_for_digests(site: Site, tmp_path: Path) -> None:
    conf = site.mirrored(site.mirror_front.host, extra='pull-from-mirror = "digest-only"')
    run = export(site.image, conf, tmp_path / "by-tag")
    assert run.returncode == 0, run.stderr
    assert served(site.mirror_front) == 0
    run = export(f"{site.origin.host}/team/app@{site.digest}", conf, tmp_path / "by-digest")
    assert run.returncode == 0, run.stderr
    assert exported_files(tmp_path / "by-digest") == FILES
    assert site.mirror_front.served_bytes >= LAYER_BYTES


def test_blocked_registries_are_refused_before_any_request(tmp_path: Path) -> None:
    conf = tmp_path / "blocked.conf"
    conf.write_text('[[registry]]\nlocation = "quay.io/untrusted"\nblocked = true\n')
    run = export("quay.io/untrusted/app:1", conf, tmp_path / "c")
    assert run.returncode == 1
    assert f"quay.io/untrusted/app:1: registry quay.io/untrusted is blocked (blocked = true in {conf})" in run.stderr


def test_insecure_allows_plain_http_to_that_registry_only(site: Site, tmp_path: Path) -> None:
    address = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    require(bool(address), "this machine has no address besides loopback")
    front = FaultProxy(site.origin.host, site.loop, bind=address[0])  # a plain HTTP registry, not on loopback
    front.start()
    try:
        image = f"{front.host}/team/app:v1"
        refused = export(image, site.conf("none", ""), tmp_path / "secure", "--timeout", "3")
        assert refused.returncode == 1
        conf = site.conf("insecure", f'[[registry]]\nlocation = "{front.host}"\ninsecure = true\n')
        run = export(image, conf, tmp_path / "insecure")
        assert run.returncode == 0, run.stderr
        assert exported_files(tmp_path / "insecure") == FILES
    finally:
        front.stop()


def test_an_estargz_image_is_read_lazily_through_the_mirror(tmp_path: Path, mount: Mounter) -> None:
    _requires_registry()
    big = os.urandom(2_000_000)
    layers = [tar_of(d("srv/"), f("srv/big", big), f("srv/small", b"small\n"))]
    with estargz_in_registry(tmp_path / "world", layers, "lazy/app:v1") as origin, EventLoopThread() as loop:
        (tmp_path / "mirror").mkdir()
        mirror = Registry(tmp_path / "mirror", proxy=f"http://{origin.host}")
        origin_front, mirror_front = FaultProxy(origin.host, loop), FaultProxy(mirror.host, loop)
        origin_front.start()
        mirror_front.start()
        try:
            conf = tmp_path / "registries.conf"
            conf.write_text(f'[[registry]]\nlocation = "{origin_front.host}"\n'
                            f'[[registry.mirror]]\nlocation = "{mirror_front.host}"\n')  # fmt: skip
            root = mount(f"{origin_front.host}/lazy/app:v1", "--registries-conf", str(conf), "--prefetch", "none")
            assert (root / "srv/small").read_bytes() == b"small\n"
            assert (root / "srv/big").read_bytes() == big
            assert mirror_front.requests["range"] >= 1  # footers, TOCs and chunks: ranges, from the mirror
            assert served(origin_front) == 0  # crfs-merge never asked the origin itself
        finally:
            origin_front.stop()
            mirror_front.stop()
            mirror.stop()
