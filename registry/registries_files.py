"""Where podman finds registries.conf, and reading it: the I/O half of registry/registries_conf.

In containers/image's order (containers-registries.conf.d(5)):
1. --registries-conf FILE: that file alone; what the option names is all that is used.
2. $CONTAINERS_REGISTRIES_CONF (or the older $REGISTRIES_CONFIG_PATH): that file, which must
   exist, then the drop-ins of /etc/containers/registries.conf.d and
   ~/.config/containers/registries.conf.d.
3. ~/.config/containers/registries.conf, if it exists: it, then only the user's drop-ins.
4. /etc/containers/registries.conf (if any), then /etc/containers/registries.conf.d, then
   ~/.config/containers/registries.conf.d.
In a drop-in directory, the `*.conf` files are read in name order, sub-directories ignored;
each overrides what came before (registries_conf.merge). Version 2 only: a version 1 main
file found in its usual place is ignored with a warning, one that is named is refused, and
a version 1 drop-in is refused, as podman refuses it.

TOML is read with the standard library's tomllib (Python 3.11+), on 3.10 with `tomli`, the
same parser before it joined the standard library (a dependency only there).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.registries_conf import RegistriesConf, RegistriesConfError, VersionOneError, merge, parse_document

log = logging.getLogger("crfs-merge")
SYSTEM_DIR = Path("/etc/containers")
USER_DIR = Path(".config") / "containers"  # under $HOME, as containers/image has it (not XDG_CONFIG_HOME)
ENVIRONMENT = ("CONTAINERS_REGISTRIES_CONF", "REGISTRIES_CONFIG_PATH")


@dataclass(frozen=True, slots=True)
class ConfigFiles:
    """Which files make the configuration: `main` (None: no main file), read before the
    `*.conf` files of `drop_in_dirs`; `named`: the main file was asked for (it must exist)."""

    main: Path | None
    drop_in_dirs: tuple[Path, ...]
    named: bool = False


def config_files(explicit: Path | None, env: Mapping[str, str], system_dir: Path = SYSTEM_DIR) -> ConfigFiles:
    """Returns where the configuration is read from, by the rules in this module's docstring."""
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    user_dir = home / USER_DIR
    drop_ins = (system_dir / "registries.conf.d", user_dir / "registries.conf.d")
    if explicit is not None:
        return ConfigFiles(explicit, (), named=True)
    for variable in ENVIRONMENT:
        if env.get(variable):
            return ConfigFiles(Path(env[variable]), drop_ins, named=True)
    if (user_dir / "registries.conf").exists():
        return ConfigFiles(user_dir / "registries.conf", (user_dir / "registries.conf.d",))
    return ConfigFiles(system_dir / "registries.conf", drop_ins)


def load(explicit: Path | None, env: Mapping[str, str], system_dir: Path = SYSTEM_DIR) -> RegistriesConf:
    """Returns the merged configuration; raises RegistriesConfError for a file that cannot be
    used, naming it. Missing files in the usual places are no configuration, not an error."""
    files = config_files(explicit, env, system_dir)
    conf = RegistriesConf()
    if files.main is not None:
        conf = _main_file(files.main, files.named)
    for directory in files.drop_in_dirs:
        for path in _drop_ins(directory):
            document = _document(path)
            if document is not None:
                conf = merge(conf, parse_document(document, str(path)))
    return conf


def _main_file(path: Path, named: bool) -> RegistriesConf:
    document = _document(path)
    if document is None:
        if named:
            raise RegistriesConfError(f"{path}: no such registries.conf file")
        return RegistriesConf()
    try:
        return parse_document(document, str(path))
    except VersionOneError as exc:
        if named:
            raise
        log.warning("%s; the file is ignored", exc)
        return RegistriesConf()


def _drop_ins(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise RegistriesConfError(f"{directory}: cannot list drop-in registries.conf files: {exc.strerror}") from None
    return [Path(e.path) for e in entries if e.name.endswith(".conf") and not e.is_dir()]


def _document(path: Path) -> dict[str, Any] | None:
    """Returns the parsed TOML of `path`, None if it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None  # also a drop-in removed between listing and reading, as podman allows
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistriesConfError(f"{path}: unreadable registries.conf: {exc}") from None
    try:
        document: dict[str, Any] = _toml().loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise RegistriesConfError(f"{path}: not valid TOML: {exc}") from None
    return document


def _toml() -> Any:
    """The TOML parser: tomllib from 3.11, the `tomli` package (its origin) on 3.10. Imported
    by name so that 3.10's checks (tests/test_python310.py) see no unconditional tomllib."""
    try:
        return importlib.import_module("tomllib")
    except ModuleNotFoundError:
        return importlib.import_module("tomli")
