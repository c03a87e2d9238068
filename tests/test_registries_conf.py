"""containers-registries.conf(5) without a network: parsing, merging drop-ins, choosing the
table, rewriting names to their mirrors and location, short names, and where the files are
looked for. The rules (and several cases) are those of containers/image's sysregistriesv2."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.errors import InvalidReferenceError
from registry.reference import ImageReference
from registry.registries_conf import (
    BlockedError,
    RegistriesConf,
    RegistriesConfError,
    VersionOneError,
    matched_length,
    merge,
    parse_document,
    pull_sources,
    push_source,
)
from registry.registries_files import _toml, config_files, load
from registry.remote_reference import RemoteReference

EXAMPLE = """
unqualified-search-registries = ["example.com"]

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true

[[registry]]
location = "registry.com"

[[registry.mirror]]
location = "mirror.registry.com"
"""


def conf(text: str, origin: str = "test.conf") -> RegistriesConf:
    return parse_document(_toml().loads(text), origin)


def sources(configuration: RegistriesConf, name: str) -> list[tuple[str, bool, bool]]:
    """Where `name` is pulled from, in order: (physical name, insecure, is a mirror)."""
    found = pull_sources(configuration, ImageReference.parse(name).remote())
    return [(str(s.physical), s.insecure, s.mirror) for s in found]


def test_the_man_page_example_tries_both_mirrors_then_the_location() -> None:
    assert sources(conf(EXAMPLE), "example.com/foo/image:latest") == [
        ("example-mirror-0.local/mirror-for-foo/image:latest", False, True),
        ("example-mirror-1.local/mirrors/foo/image:latest", True, True),
        ("internal-registry-for-example.com/bar/image:latest", False, False),
    ]
    # A mirror belongs to its own table only.
    assert sources(conf(EXAMPLE), "registry.com/image:latest") == [
        ("mirror.registry.com/image:latest", False, True), ("registry.com/image:latest", False, False)]  # fmt: skip


def test_a_name_under_no_table_is_pulled_from_where_it_names() -> None:
    assert sources(conf(EXAMPLE), "quay.io/a/b:1") == [("quay.io/a/b:1", False, False)]
    assert sources(RegistriesConf(), "quay.io/a/b:1") == [("quay.io/a/b:1", False, False)]


@pytest.mark.parametrize(
    ("name", "prefix", "length"),
    [
        ("example.com/foo", "example.com/foo", 15),
        ("example.com/foo/x:1", "example.com/foo", 15),
        ("example.com/foo:1", "example.com/foo", 15),
        ("example.com/foo@sha256:ab", "example.com/foo", 15),
        ("example.com/foobar:1", "example.com/foo", None),  # a path component is matched whole
        ("example.co/x", "example.com", None),
        ("a.example.com/x:1", "*.example.com", 13),
        ("a.b.example.com:5000/x", "*.example.com", 15),  # the port is left for the location
        ("example.com/x", "*.example.com", None),  # the wildcard needs a subdomain
        ("other.com/a.example.com/x", "*.example.com", None),  # only within the host
    ],
)
def test_prefix_matching(name: str, prefix: str, length: int | None) -> None:
    assert matched_length(name, prefix) == length


def test_the_longest_matching_prefix_wins() -> None:
    text = """
    [[registry]]
    location = "quay.io"
    [[registry.mirror]]
    location = "mirror.site/quay"
    [[registry]]
    prefix = "quay.io/org"
    location = "internal.site/org"
    """
    assert sources(conf(text), "quay.io/org/app:1") == [("internal.site/org/app:1", False, False)]
    assert sources(conf(text), "quay.io/other/app:1") == [
        ("mirror.site/quay/other/app:1", False, True), ("quay.io/other/app:1", False, False)]  # fmt: skip


def test_a_wildcard_table_without_location_keeps_the_name_and_applies_its_settings() -> None:
    text = """
    [[registry]]
    prefix = "*.internal.site"
    insecure = true
    [[registry.mirror]]
    location = "cache.site:5000/internal"
    """
    assert sources(conf(text), "a.b.internal.site/x:1") == [
        ("cache.site:5000/internal/x:1", False, True), ("a.b.internal.site/x:1", True, False)]  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "by_tag", "by_digest"),
    [
        ('pull-from-mirror = "digest-only"', ["reg.site"], ["m.site", "reg.site"]),
        ('pull-from-mirror = "tag-only"', ["m.site", "reg.site"], ["reg.site"]),
        ('pull-from-mirror = "all"', ["m.site", "reg.site"], ["m.site", "reg.site"]),
        ("", ["m.site", "reg.site"], ["m.site", "reg.site"]),
    ],
)
def test_pull_from_mirror(settings: str, by_tag: list[str], by_digest: list[str]) -> None:
    configuration = conf(f'[[registry]]\nlocation = "reg.site"\n[[registry.mirror]]\nlocation = "m.site"\n{settings}')
    digest = "sha256:" + "a" * 64
    assert [s[0].split("/")[0] for s in sources(configuration, "reg.site/x:1")] == by_tag
    assert [s[0].split("/")[0] for s in sources(configuration, f"reg.site/x@{digest}")] == by_digest


def test_mirror_by_digest_only_leaves_tags_to_the_registry() -> None:
    configuration = conf('[[registry]]\nlocation = "reg.site"\nmirror-by-digest-only = true\n'
                         '[[registry.mirror]]\nlocation = "m.site"')  # fmt: skip
    digest = "sha256:" + "b" * 64
    assert sources(configuration, "reg.site/x:1") == [("reg.site/x:1", False, False)]
    assert sources(configuration, f"reg.site/x@{digest}")[0] == (f"m.site/x@{digest}", False, True)


def test_docker_hub_official_images_are_matched_with_their_library_namespace() -> None:
    text = '[[registry]]\nprefix = "docker.io/library"\nlocation = "hub-cache.site/library"'
    assert sources(conf(text), "alpine:3") == [("hub-cache.site/library/alpine:3", False, False)]
    assert sources(conf(text), "docker.io/user/app") == [("docker.io/user/app:latest", False, False)]


def test_blocked_refuses_and_a_blocked_mirror_is_never_asked() -> None:
    text = """
    [[registry]]
    location = "bad.site"
    blocked = true
    [[registry]]
    location = "good.site"
    [[registry.mirror]]
    location = "bad.site/good"
    """
    with pytest.raises(BlockedError, match=r"bad.site/x:1: registry bad.site is blocked \(blocked = true in test.conf"):
        sources(conf(text), "bad.site/x:1")
    with pytest.raises(BlockedError):
        push_source(conf(text), RemoteReference.parse("bad.site/x:1"))
    assert sources(conf(text), "good.site/x:1") == [("good.site/x:1", False, False)]


def test_pushes_go_to_the_name_as_given() -> None:
    pushed = push_source(conf(EXAMPLE), RemoteReference.parse("example.com/foo/image:v2"))
    assert (str(pushed.physical), pushed.mirror) == ("example.com/foo/image:v2", False)


@pytest.mark.parametrize(
    ("search", "mode", "expected"),
    [
        (None, "", ["docker.io/library/alpine:3"]),  # nothing configured: docker.io, as docker does
        ("[]", "", ["docker.io/library/alpine:3"]),
        ('["quay.io"]', 'short-name-mode = "enforcing"', ["quay.io/alpine:3"]),  # one: no ambiguity
        ('["quay.io", "docker.io"]', "", ["quay.io/alpine:3", "docker.io/library/alpine:3"]),
        ('["quay.io", "docker.io"]', 'short-name-mode = "disabled"',
         ["quay.io/alpine:3", "docker.io/library/alpine:3"]),
    ],
)
def test_short_names_go_to_the_search_registries_in_order(search: str | None, mode: str, expected: list[str]) -> None:
    text = (f"unqualified-search-registries = {search}\n" if search else "") + mode
    assert [s[0] for s in sources(conf(text), "alpine:3")] == expected


def test_several_search_registries_in_enforcing_mode_are_refused_with_the_choices() -> None:
    text = 'unqualified-search-registries = ["quay.io", "docker.io"]\nshort-name-mode = "enforcing"'
    with pytest.raises(InvalidReferenceError, match=r"name one of quay\.io/alpine:latest, docker\.io/library/alpine"):
        sources(conf(text), "alpine")
    assert sources(conf(text), "quay.io/alpine") == [("quay.io/alpine:latest", False, False)]  # not a short name


def test_an_alias_wins_over_the_search_registries_and_keeps_the_tag() -> None:
    text = 'unqualified-search-registries = ["quay.io"]\n[aliases]\n"tool" = "registry.site/team/tool"'
    assert sources(conf(text), "tool:2") == [("registry.site/team/tool:2", False, False)]
    assert sources(conf(text), "other:2") == [("quay.io/other:2", False, False)]
    erased = merge(conf(text), conf('[aliases]\n"tool" = ""', "drop-in.conf"))
    assert sources(erased, "tool:2") == [("quay.io/tool:2", False, False)]


def test_each_search_candidate_has_its_own_mirrors() -> None:
    text = """
    unqualified-search-registries = ["one.site", "two.site"]
    [[registry]]
    location = "two.site"
    [[registry.mirror]]
    location = "cache.site/two"
    """
    assert sources(conf(text), "x") == [
        ("one.site/x:latest", False, False), ("cache.site/two/x:latest", False, True),
        ("two.site/x:latest", False, False)]  # fmt: skip


def test_drop_ins_replace_tables_of_the_same_prefix_and_the_search_list() -> None:
    base = conf(EXAMPLE, "main.conf")
    drop_in = conf('unqualified-search-registries = ["quay.io"]\n[[registry]]\nlocation = "registry.com"\n'
                   'insecure = true', "drop-in.conf")  # fmt: skip
    merged = merge(base, drop_in)
    assert sources(merged, "registry.com/image:1") == [("registry.com/image:1", True, False)]
    assert merged.unqualified_search == ("quay.io",)
    assert len(sources(merged, "example.com/foo/image:1")) == 3  # untouched
    assert merge(merged, conf("", "empty.conf")).unqualified_search == ("quay.io",)  # unset: kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[registry]]\nlocation = "https://reg.site"', "without http"),
        ('[[registry]]\nprefix = "reg.site"', "has no location"),
        ("[[registry]]\ninsecure = true", "neither prefix nor location"),
        ('[[registry]]\nprefix = "*.site/x"', "must be \\*.domain"),
        ('[[registry]]\nlocation = "r.site"\npull-from-mirror = "all"', "belongs in"),
        ('[[registry]]\nlocation = "r.site"\n[[registry.mirror]]\ninsecure = true', "has no location"),
        ('[[registry]]\nlocation = "r.site"\n[[registry.mirror]]\nlocation = "m.site"\npull-from-mirror = "some"',
         "must be one of"),
        ('[[registry]]\nlocation = "r.site"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m.site"\n'
         'pull-from-mirror = "all"', "use one of the two"),
        ('[[registry]]\nprefix = "a.site"\nlocation = "r.site"\n[[registry]]\nprefix = "b.site"\nlocation = "r.site"\n'
         "insecure = true", "conflicting 'insecure'"),
        ('[[registry]]\nlocation = "r.site"\ninsecure = "yes"', "must be true or false"),
        ('unqualified-search-registries = ["quay.io/org"]', "not a host"),
        ('short-name-mode = "sometimes"', "invalid short-name-mode"),
        ('[aliases]\n"quay.io/x" = "quay.io/x"', "a short name"),
        ('[aliases]\n"x" = "quay.io/x:1"', "without tag or digest"),
    ],
)  # fmt: skip
def test_invalid_files_are_refused_saying_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RegistriesConfError, match=message):
        conf(text)


def test_a_location_that_is_not_a_fully_qualified_name_is_refused_when_used() -> None:
    configuration = conf('[[registry]]\nprefix = "reg.site"\nlocation = "mirror"')  # would mean docker.io/mirror/...
    with pytest.raises(RegistriesConfError, match="not a fully-qualified name"):
        sources(configuration, "reg.site/x:1")


def test_version_one_is_refused_by_name() -> None:
    with pytest.raises(VersionOneError, match="version 1"):
        conf("[registries.search]\nregistries = ['quay.io']")


# --- the files ------------------------------------------------------------------------------


def test_the_files_podman_reads_in_its_order(tmp_path: Path) -> None:
    etc, home = tmp_path / "etc", tmp_path / "home"
    env = {"HOME": str(home)}
    user = home / ".config" / "containers"
    assert config_files(None, env, etc).main == etc / "registries.conf"
    assert config_files(None, env, etc).drop_in_dirs == (etc / "registries.conf.d", user / "registries.conf.d")
    user.mkdir(parents=True)
    (user / "registries.conf").write_text("")
    assert config_files(None, env, etc).main == user / "registries.conf"
    assert config_files(None, env, etc).drop_in_dirs == (user / "registries.conf.d",)
    named = config_files(None, {**env, "CONTAINERS_REGISTRIES_CONF": "/x.conf"}, etc)
    assert (named.main, named.named, len(named.drop_in_dirs)) == (Path("/x.conf"), True, 2)
    explicit = config_files(Path("/y.conf"), {**env, "CONTAINERS_REGISTRIES_CONF": "/x.conf"}, etc)
    assert (explicit.main, explicit.drop_in_dirs) == (Path("/y.conf"), ())


def test_drop_ins_are_read_in_name_order_conf_files_only(tmp_path: Path) -> None:
    etc, home = tmp_path / "etc", tmp_path / "home"
    (etc / "registries.conf.d" / "sub.conf").mkdir(parents=True)
    (etc / "registries.conf").write_text('unqualified-search-registries = ["main.site"]')
    (etc / "registries.conf.d" / "20-b.conf").write_text('unqualified-search-registries = ["b.site"]')
    (etc / "registries.conf.d" / "10-a.conf").write_text('unqualified-search-registries = ["a.site"]')
    (etc / "registries.conf.d" / "30-c.ignored").write_text('unqualified-search-registries = ["c.site"]')
    assert load(None, {"HOME": str(home)}, etc).unqualified_search == ("b.site",)
    (home / ".config" / "containers" / "registries.conf.d").mkdir(parents=True)
    (home / ".config" / "containers" / "registries.conf.d" / "00.conf").write_text(
        'unqualified-search-registries = ["user.site"]')  # fmt: skip
    assert load(None, {"HOME": str(home)}, etc).unqualified_search == ("user.site",)  # the user's come last


def test_version_one_is_ignored_in_its_usual_place_and_refused_when_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "registries.conf").write_text("[registries.search]\nregistries = ['quay.io']\n")
    assert load(None, {"HOME": str(tmp_path)}, etc) == RegistriesConf()
    assert "version 1" in caplog.text and "ignored" in caplog.text
    with pytest.raises(VersionOneError):
        load(etc / "registries.conf", {}, etc)
    (etc / "registries.conf.d").mkdir()
    (etc / "registries.conf.d" / "old.conf").write_text("[registries.block]\nregistries = ['x.site']\n")
    with pytest.raises(VersionOneError):
        load(None, {"HOME": str(tmp_path)}, etc)


def test_a_named_file_must_exist_and_parse(tmp_path: Path) -> None:
    with pytest.raises(RegistriesConfError, match=r"no such registries\.conf"):
        load(tmp_path / "missing.conf", {})
    (tmp_path / "bad.conf").write_text("[[registry]\n")
    with pytest.raises(RegistriesConfError, match=r"bad\.conf: not valid TOML"):
        load(tmp_path / "bad.conf", {})
