"""Pure parts of the registry client: references, challenges, credentials. No network."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from registry.auth import Challenge, Credentials, parse_challenges
from registry.credentials import find_credentials
from registry.errors import ImageError, InvalidReferenceError
from registry.remote_reference import RemoteReference, is_loopback
from unionfs.commands.progress import terminal_progress

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "canonical", "api_host", "repository", "version"),
    [
        ("alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", "library/alpine", "latest"),
        ("docker.io/alpine:3.19", "docker.io/library/alpine:3.19", "registry-1.docker.io", "library/alpine", "3.19"),
        ("index.docker.io/org/app", "docker.io/org/app:latest", "registry-1.docker.io", "org/app", "latest"),
        ("user/app:v1", "docker.io/user/app:v1", "registry-1.docker.io", "user/app", "v1"),
        ("quay.io/org/app:1.2", "quay.io/org/app:1.2", "quay.io", "org/app", "1.2"),
        ("localhost/app", "localhost/app:latest", "localhost", "app", "latest"),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t"),
        (f"ghcr.io/o/r@{DIGEST}", f"ghcr.io/o/r@{DIGEST}", "ghcr.io", "o/r", DIGEST),
        (f"ghcr.io/o/r:t@{DIGEST}", f"ghcr.io/o/r:t@{DIGEST}", "ghcr.io", "o/r", DIGEST),
        ("docker://ghcr.io/o/r:t", "ghcr.io/o/r:t", "ghcr.io", "o/r", "t"),
        ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000", "x", "latest"),
        ("reg.example.com/a-b__c.d/e:TAG_1.x", "reg.example.com/a-b__c.d/e:TAG_1.x", "reg.example.com", "a-b__c.d/e",
         "TAG_1.x"),
    ],
)  # fmt: skip
def test_references_normalise_like_docker(
    text: str, canonical: str, api_host: str, repository: str, version: str
) -> None:
    reference = RemoteReference.parse(text)
    assert (str(reference), reference.api_host, reference.repository, reference.version) == (
        canonical, api_host, repository, version)  # fmt: skip
    assert RemoteReference.parse(str(reference)) == reference


@pytest.mark.parametrize(
    "text", ["", "Alpine", "a:b:c", "x@sha256:12", "quay.io/A/b", "a//b", "x:" + "t" * 129, "x:-tag", "a/b_/c"]
)
def test_invalid_references_are_refused_before_any_io(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        RemoteReference.parse(text)


def test_loopback_hosts() -> None:
    assert [is_loopback(h) for h in ["localhost:5000", "127.0.0.5", "[::1]:80", "::1", "quay.io", "10.0.0.1:5000"]] == [
        True, True, True, True, False, False]  # fmt: skip


@pytest.mark.parametrize(
    ("header", "challenges"),
    [
        ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"',
         [Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                               "scope": "repository:a/b:pull"})]),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ('Basic realm="x", Bearer realm="y",service="s"',
         [Challenge("basic", {"realm": "x"}), Challenge("bearer", {"realm": "y", "service": "s"})]),
        ('Bearer realm="a,b\\"c"', [Challenge("bearer", {"realm": 'a,b"c'})]),
        ("Negotiate, Basic realm=r", [Challenge("negotiate"), Challenge("basic", {"realm": "r"})]),
        ("", []),
    ],
)  # fmt: skip
def test_challenge_parsing(header: str, challenges: list[Challenge]) -> None:
    assert parse_challenges(header) == challenges


def test_credentials_never_show_their_secret() -> None:
    creds = Credentials.parse("alice:s3cret:with:colons")
    assert creds.password == "s3cret:with:colons"
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)
    assert creds.basic_header() == "Basic " + base64.b64encode(b"alice:s3cret:with:colons").decode()


def _auth_file(path: Path, document: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def _auths(host: str, user: str) -> dict[str, object]:
    return {"auths": {host: {"auth": base64.b64encode(f"{user}:pw".encode()).decode()}}}


def test_credential_files_are_read_in_podman_order(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    _auth_file(tmp_path / "home" / ".docker" / "config.json", _auths("reg.example", "docker"))
    assert find_credentials("reg.example", None, env) == Credentials("docker", "pw")
    _auth_file(tmp_path / "home" / ".config" / "containers" / "auth.json", _auths("reg.example", "podman-home"))
    assert find_credentials("reg.example", None, env) == Credentials("podman-home", "pw")
    _auth_file(tmp_path / "run" / "containers" / "auth.json", _auths("https://reg.example/v1/", "runtime"))
    assert find_credentials("reg.example", None, env) == Credentials("runtime", "pw")
    _auth_file(tmp_path / "explicit.json", _auths("reg.example", "explicit-file"))
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "explicit.json")
    assert find_credentials("reg.example", None, env) == Credentials("explicit-file", "pw")
    assert find_credentials("reg.example", "flag:pw", env) == Credentials("flag", "pw")
    assert find_credentials("other.example", None, env) is None


def test_docker_hub_aliases_and_bad_entries(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    _auth_file(tmp_path / ".docker" / "config.json", _auths("https://index.docker.io/v1/", "hub"))
    assert find_credentials("docker.io", None, env) == Credentials("hub", "pw")
    _auth_file(tmp_path / ".docker" / "config.json", {"auths": {"docker.io": {"auth": "not base64!"}}})
    with pytest.raises(ImageError, match="not base64"):
        find_credentials("docker.io", None, env)
    (tmp_path / ".docker" / "config.json").write_text("{broken")
    with pytest.raises(ImageError, match="unreadable auth file"):
        find_credentials("docker.io", None, env)


def test_creds_store_helper_and_its_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "bin" / "docker-credential-store"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread s\n[ "$s" = reg.example ] && echo \'{"Username":"u","Secret":"p"}\' && exit 0\n'
                      'echo "credentials not found in native keychain"; exit 1\n')  # fmt: skip
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    env = {"HOME": str(tmp_path)}
    _auth_file(tmp_path / ".docker" / "config.json", {"credsStore": "store"})
    assert find_credentials("reg.example", None, env) == Credentials("u", "p")
    assert find_credentials("elsewhere.example", None, env) is None
    _auth_file(tmp_path / ".docker" / "config.json", {"credHelpers": {"reg.example": "absent"}})
    with pytest.raises(ImageError, match="docker-credential-absent failed"):
        find_credentials("reg.example", None, env)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_a_terminal() -> None:
    assert terminal_progress(io.StringIO(), "pulling layers") is None
    screen = _Terminal()
    start = terminal_progress(screen, "pulling layers")
    assert start is not None
    advance = start(3_000_000)
    for _ in range(3):
        advance(1_000_000)
    assert screen.getvalue().endswith("pulling layers      3.0 / 3.0 MB\n")
