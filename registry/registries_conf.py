"""containers-registries.conf(5), version 2, as podman reads it: which registry, mirrors and
search registries a reference is pulled from. Pure: TOML documents in, an ordered list of
sources out (the files themselves are found and read by registry/registries_files.py).

    [[registry]]
    prefix = "quay.io/org"                # the longest matching prefix chooses the table
    location = "registry.internal/quay-org"  # where that namespace really lives
    insecure = false                      # true: plain HTTP and unverified TLS allowed
    blocked = false                       # true: refused
    mirror-by-digest-only = false         # true: mirrors only for pulls by digest
    [[registry.mirror]]                   # tried in order, before `location`
    location = "mirror.site/quay-org"
    pull-from-mirror = "all"              # or digest-only, tag-only

A prefix is host[:port][/namespace...][/repo][:tag|@digest], or *.domain for any subdomain; it
matches a reference that starts with it and goes on with ':', '/' or '@' (or ends there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from registry.errors import ImageError, InvalidReferenceError
from registry.remote_reference import RemoteReference

PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
SHORT_NAME_MODES = ("enforcing", "permissive", "disabled")
V1_TABLES = ("search", "insecure", "block")
# host[:port] as distribution/reference's domain rule: dot-separated labels, an optional port.
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                     r"(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")  # fmt: skip


class RegistriesConfError(ImageError):
    """A registries.conf file that cannot be used as written."""


class BlockedError(ImageError):
    """The reference is under a `blocked = true` registry table."""


class VersionOneError(RegistriesConfError):
    """The file is in the deprecated version 1 format ([registries.search] and so on)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A place a namespace can be pulled from: a registry's location, or one of its mirrors."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = ""  # mirrors only: "", all, digest-only, tag-only


@dataclass(frozen=True, slots=True)
class RegistryTable:
    """One `[[registry]]` table, normalised (prefix set, trailing slashes gone)."""

    prefix: str
    endpoint: Endpoint  # its location (empty only under a *.domain prefix: the name is kept) and insecure
    blocked: bool = False
    mirrors: tuple[Endpoint, ...] = ()
    mirror_by_digest_only: bool = False


@dataclass(frozen=True, slots=True)
class RegistriesConf:
    """The merged configuration. `unqualified_search` is None when no file set it."""

    registries: tuple[RegistryTable, ...] = ()
    unqualified_search: tuple[str, ...] | None = None
    short_name_mode: str | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)  # short name -> name; "" erases
    origin: str = ""  # the files read, for messages


@dataclass(frozen=True, slots=True)
class PullSource:
    """Where to ask for an image: `physical` at its registry, for the name `logical`."""

    logical: RemoteReference  # the image as named (after short-name resolution)
    physical: RemoteReference  # what to ask which registry for (after location rewriting)
    insecure: bool = False
    mirror: bool = False


# --- reading one file's document ---------------------------------------------------------


def parse_document(document: Mapping[str, object], origin: str) -> RegistriesConf:
    """Returns the configuration of one parsed TOML document (file `origin`), validated as
    containers/image does; raises VersionOneError for the old format, RegistriesConfError
    for anything else it cannot use."""
    if _is_version_one(document):
        raise VersionOneError(f"{origin}: registries.conf version 1 ([registries.search], [registries.insecure], "
                              "[registries.block]) is not supported: use version 2 "
                              "(unqualified-search-registries, [[registry]] tables)")  # fmt: skip
    tables = [_registry_table(t, origin) for t in _array_of_tables(document, "registry", origin)]
    _check_conflicts(tables, origin)
    search = document.get("unqualified-search-registries")
    mode = document.get("short-name-mode")
    if mode is not None and mode not in SHORT_NAME_MODES and mode != "":
        raise RegistriesConfError(f"{origin}: invalid short-name-mode {mode!r} (one of {', '.join(SHORT_NAME_MODES)})")
    return RegistriesConf(
        registries=_first_of_each_prefix(tables),
        unqualified_search=None if search is None else tuple(_search_registries(search, origin)),
        short_name_mode=str(mode) if mode else None,
        aliases=_aliases(document.get("aliases", {}), origin),
        origin=origin,
    )


def _is_version_one(document: Mapping[str, object]) -> bool:
    registries = document.get("registries")
    if not isinstance(registries, dict):
        return False
    return any(isinstance(t, dict) and t.get("registries") for name, t in registries.items() if name in V1_TABLES)


def _array_of_tables(document: Mapping[str, object], key: str, origin: str) -> list[Mapping[str, object]]:
    value = document.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RegistriesConfError(f"{origin}: '{key}' must be an array of tables ([[{key}]])")
    return value


def _registry_table(table: Mapping[str, object], origin: str) -> RegistryTable:
    location = _location(_string(table, "location", origin), origin)
    prefix = _location(_string(table, "prefix", origin), origin) or location
    if not prefix:
        raise RegistriesConfError(f"{origin}: a [[registry]] table has neither prefix nor location")
    wildcard = prefix.startswith("*.")
    if wildcard and any(c in prefix for c in "/@:"):
        raise RegistriesConfError(f"{origin}: wildcard prefix {prefix!r} must be *.domain, with no port or path")
    if not location and not wildcard:
        raise RegistriesConfError(f"{origin}: registry {prefix!r} has no location (only a *.domain prefix may omit it)")
    if _string(table, "pull-from-mirror", origin):
        raise RegistriesConfError(f"{origin}: registry {prefix!r}: pull-from-mirror belongs in [[registry.mirror]]")
    by_digest = _boolean(table, "mirror-by-digest-only", origin)
    mirrors = tuple(_mirror(m, prefix, by_digest, origin) for m in _array_of_tables(table, "mirror", origin))
    endpoint = Endpoint(location, _boolean(table, "insecure", origin))
    return RegistryTable(prefix, endpoint, _boolean(table, "blocked", origin), mirrors, by_digest)


def _mirror(table: Mapping[str, object], prefix: str, by_digest: bool, origin: str) -> Endpoint:
    location = _location(_string(table, "location", origin), origin)
    if not location:
        raise RegistriesConfError(f"{origin}: a mirror of {prefix!r} has no location")
    pull_from = _string(table, "pull-from-mirror", origin)
    if pull_from and pull_from not in PULL_FROM_MIRROR:
        raise RegistriesConfError(f"{origin}: mirror {location!r}: pull-from-mirror must be one of "
                                  f"{', '.join(PULL_FROM_MIRROR)}, not {pull_from!r}")  # fmt: skip
    if pull_from and by_digest:
        raise RegistriesConfError(f"{origin}: registry {prefix!r} sets mirror-by-digest-only and its mirror "
                                  f"{location!r} pull-from-mirror: use one of the two")  # fmt: skip
    return Endpoint(location, _boolean(table, "insecure", origin), pull_from)


def _location(text: str, origin: str) -> str:
    """Returns a prefix or location without trailing slashes; refuses URL schemes."""
    trimmed = text.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise RegistriesConfError(f"{origin}: {text!r}: a location is host[:port][/path], without http(s)://")
    return trimmed


def _check_conflicts(tables: list[RegistryTable], origin: str) -> None:
    """Tables of one location (several prefixes may share it) must agree on insecure and blocked."""
    seen: dict[str, RegistryTable] = {}
    for table in tables:
        key = table.endpoint.location or table.prefix
        other = seen.setdefault(key, table)
        for what in ("insecure", "blocked"):
            mine = table.blocked if what == "blocked" else table.endpoint.insecure
            theirs = other.blocked if what == "blocked" else other.endpoint.insecure
            if mine != theirs:
                raise RegistriesConfError(f"{origin}: registry {key!r} is defined twice with conflicting '{what}'")


def _first_of_each_prefix(tables: Iterable[RegistryTable]) -> tuple[RegistryTable, ...]:
    """The first table of each prefix (later ones with the same prefix are never used), sorted."""
    unique: dict[str, RegistryTable] = {}
    for table in tables:
        unique.setdefault(table.prefix, table)
    return tuple(unique[p] for p in sorted(unique))


def _search_registries(value: object, origin: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistriesConfError(f"{origin}: unqualified-search-registries must be an array of strings")
    hosts = [_location(v, origin) for v in value]
    for host in hosts:
        if not _DOMAIN.match(host):
            raise RegistriesConfError(f"{origin}: unqualified-search-registries: {host!r} is not a host[:port]")
    return hosts


def _aliases(value: object, origin: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise RegistriesConfError(f"{origin}: [aliases] must map short names to strings")
    for name, target in value.items():
        if _has_tag_or_digest(name) or not _is_short(name):
            raise RegistriesConfError(f"{origin}: alias {name!r}: a short name, without registry, tag or digest")
        if target and (_has_tag_or_digest(target) or _is_short(target)):
            raise RegistriesConfError(f"{origin}: alias {name!r} = {target!r}: a registry/repository, "
                                      "without tag or digest")  # fmt: skip
    return dict(value)


def _is_short(name: str) -> bool:
    try:
        return RemoteReference.parse(name).short_name is not None
    except InvalidReferenceError:
        return False


def _has_tag_or_digest(name: str) -> bool:
    return "@" in name or ":" in name.rpartition("/")[2]


def _string(table: Mapping[str, object], key: str, origin: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise RegistriesConfError(f"{origin}: '{key}' must be a string, not {value!r}")
    return value


def _boolean(table: Mapping[str, object], key: str, origin: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise RegistriesConfError(f"{origin}: '{key}' must be true or false, not {value!r}")
    return value


# --- files read one after another ----------------------------------------------------------


def merge(base: RegistriesConf, update: RegistriesConf) -> RegistriesConf:
    """Returns `base` with a later file (a drop-in) applied: tables of the same prefix replaced,
    new ones added; the search list and mode replaced if set; aliases merged ("" erases)."""
    tables = {t.prefix: t for t in base.registries} | {t.prefix: t for t in update.registries}
    aliases = {**base.aliases, **update.aliases}
    return RegistriesConf(
        registries=tuple(tables[p] for p in sorted(tables)),
        unqualified_search=base.unqualified_search if update.unqualified_search is None else update.unqualified_search,
        short_name_mode=update.short_name_mode or base.short_name_mode,
        aliases={name: target for name, target in aliases.items() if target},
        origin=", ".join(o for o in (base.origin, update.origin) if o),
    )


# --- from a reference to the sources to try ------------------------------------------------


def pull_sources(conf: RegistriesConf, reference: RemoteReference) -> list[PullSource]:
    """Returns where to pull `reference` from, in order: mirrors of its short-name candidates'
    registries, each registry after its mirrors. Raises BlockedError when every candidate is
    blocked, RegistriesConfError or InvalidReferenceError when a name cannot be made."""
    blocked: BlockedError | None = None
    sources: list[PullSource] = []
    for candidate in candidates(conf, reference):
        try:
            sources += _sources_of(conf, candidate)
        except BlockedError as exc:
            blocked = blocked or exc
    if not sources:
        assert blocked is not None
        raise blocked
    return sources


def push_source(conf: RegistriesConf, reference: RemoteReference) -> PullSource:
    """Returns where to push `reference`: the name as given (podman neither rewrites nor
    mirrors pushes), insecure if its registry table says so; raises BlockedError."""
    table = find_registry(conf, str(reference))
    if table is not None and table.blocked:
        raise _blocked(conf, reference, table)
    return PullSource(reference, reference, table is not None and table.endpoint.insecure)


def candidates(conf: RegistriesConf, reference: RemoteReference) -> list[RemoteReference]:
    """Returns the fully-qualified names a reference may mean, in the order to try them.

    A qualified name means itself. A short name means its alias if one is set; else each
    unqualified-search registry in order (with several, short-name-mode "enforcing" refuses:
    there is no terminal to ask which); with none configured, docker.io, as docker does."""
    if reference.short_name is None:
        return [reference]
    alias = conf.aliases.get(reference.short_name)
    if alias:
        return [_qualified(alias, reference)]
    search = conf.unqualified_search or ()
    if len(search) > 1 and conf.short_name_mode == "enforcing":
        names = ", ".join(str(_on_registry(host, reference)) for host in search)
        raise InvalidReferenceError(f"{reference.short_name}: a short name, and short-name-mode is enforcing in "
                                    f"{conf.origin}: name one of {names}")  # fmt: skip
    return [_on_registry(host, reference) for host in search] or [reference]


def _on_registry(host: str, short: RemoteReference) -> RemoteReference:
    assert short.short_name is not None
    return _qualified(f"{host}/{short.short_name}", short)


def _qualified(name: str, short: RemoteReference) -> RemoteReference:
    """Returns `name` (registry/repository, normalised as docker does) with the tag and
    digest of `short`."""
    return replace(RemoteReference.parse(name), tag=short.tag, digest=short.digest, short_name=None)


def find_registry(conf: RegistriesConf, name: str) -> RegistryTable | None:
    """Returns the table whose prefix matches `name` (REGISTRY/REPO[:TAG][@DIGEST]) longest."""
    matching = [t for t in conf.registries if matched_length(name, t.prefix) is not None]
    return max(matching, key=lambda t: len(t.prefix), default=None)


def matched_length(name: str, prefix: str) -> int | None:
    """Returns how much of `name` the prefix matches (the part a location replaces), or None.

    "example.com/foo" matches "example.com/foo", "example.com/foo/x" and "example.com/foo:1",
    not "example.com/foobar"; "*.example.com" matches "a.example.com/x" and "a.b.example.com"."""
    if prefix.startswith("*."):
        return _subdomain_match(name, prefix[1:])
    if not name.startswith(prefix):
        return None
    if len(name) == len(prefix) or name[len(prefix)] in ":/@":
        return len(prefix)
    return None


def _subdomain_match(name: str, dot_domain: str) -> int | None:
    index = name.find(dot_domain)
    if index < 0 or "/" in name[:index]:  # the domain must end within the host
        return None
    end = index + len(dot_domain)
    return end if end == len(name) or name[end] in ":/@" else None


def _sources_of(conf: RegistriesConf, reference: RemoteReference) -> list[PullSource]:
    name = str(reference)
    table = find_registry(conf, name)
    if table is None:
        return [PullSource(reference, reference)]
    if table.blocked:
        raise _blocked(conf, reference, table)
    sources = [PullSource(reference, _rewritten(name, table, m), m.insecure, mirror=True)
               for m in _mirrors_for(table, reference.digest is not None)]  # fmt: skip
    sources.append(PullSource(reference, _rewritten(name, table, table.endpoint), table.endpoint.insecure))
    return [s for s in sources if not _host_blocked(conf, s)]


def _mirrors_for(table: RegistryTable, by_digest: bool) -> list[Endpoint]:
    """The mirrors a pull by digest (or by tag) may use, in order."""
    if table.mirror_by_digest_only:
        return list(table.mirrors) if by_digest else []
    unwanted = "tag-only" if by_digest else "digest-only"
    return [m for m in table.mirrors if m.pull_from_mirror != unwanted]


def _rewritten(name: str, table: RegistryTable, endpoint: Endpoint) -> RemoteReference:
    """Returns `name` with the table's prefix replaced by the endpoint's location."""
    if not endpoint.location:  # a *.domain table without location: the name as it is
        return RemoteReference.parse(name)
    length = matched_length(name, table.prefix)
    assert length is not None
    return _parse_canonical(endpoint.location + name[length:])


def _parse_canonical(text: str) -> RemoteReference:
    """Parses a name made from configuration: it must already be in canonical form (as
    containers/image requires), so that "mirror/x" never silently means docker.io/mirror/x."""
    try:
        parsed = RemoteReference.parse(text)
    except InvalidReferenceError as exc:
        raise RegistriesConfError(f"registries.conf makes an invalid name: {exc}") from None
    if f"{parsed.registry}/{parsed.repository}" != _name_part(text):
        raise RegistriesConfError(f"registries.conf makes {text!r}, which is not a fully-qualified name "
                                  f"(it would mean {parsed}): a location needs a host with a dot or a port, "
                                  "and docker.io's official images their library/")  # fmt: skip
    return parsed


def _name_part(text: str) -> str:
    """Returns REGISTRY/REPO of REGISTRY/REPO[:TAG][@DIGEST]."""
    name = text.partition("@")[0]
    head, sep, tag = name.rpartition(":")
    return head if sep and "/" not in tag else name


def _host_blocked(conf: RegistriesConf, source: PullSource) -> bool:
    """True for a mirror that is itself under a blocked table: never asked."""
    table = find_registry(conf, str(source.physical))
    return source.mirror and table is not None and table.blocked


def _blocked(conf: RegistriesConf, reference: RemoteReference, table: RegistryTable) -> BlockedError:
    return BlockedError(f"{reference}: registry {table.prefix} is blocked (blocked = true in {conf.origin})")
