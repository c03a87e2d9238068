"""Which libfuse this process uses: one libfuse 3, found by its soname, loaded once and shared
by mfusepy (whose ABI structures unionfs/fuse/lowlevel.py uses) and by unionfs/fuse/lowlevel.py itself.

mfusepy, left to itself, looks for libfuse 2 (`libfuse.so.2`) before libfuse 3, so a machine
with both installed (AppImages need libfuse2) would give it the wrong one. It honours
FUSE_LIBRARY_PATH, so `load` sets that before it imports mfusepy: both then dlopen the same
name, which maps one library. The struct layouts that differ between libfuse 3 releases are
chosen here from the version the loaded library reports (`layout`), never from headers seen at
some other time.
"""

from __future__ import annotations

import _ctypes
import ctypes
import ctypes.util
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

# libfuse 3.17 and later are libfuse3.so.4 (Debian 13, Ubuntu 25.10); 3.0 to 3.16 are .so.3.
SONAMES = ("libfuse3.so.4", "libfuse3.so.3")
INSTALL_HINT = "libfuse 3 is not installed (Debian/Ubuntu: apt-get install fuse3, which brings libfuse3-3 or -4)"
LIBRARY_VARIABLE = "FUSE_LIBRARY_PATH"  # mfusepy's name for the library to load

Version = tuple[int, int, int]


class LibfuseMissing(OSError):
    """No libfuse 3 can be loaded; the message names the package to install."""


@dataclass(frozen=True)
class Layout:
    """The parts of libfuse's ABI that moved between 3.x releases and that lowlevel.py uses."""

    file_info_bits: tuple[str, ...]
    """The one-bit fields of struct fuse_file_info, in declaration order (after `flags`)."""
    buf_has_mem_size: bool
    """struct fuse_buf ends with `size_t mem_size` (3.17 and later)."""

    def bit(self, name: str) -> int:
        """Returns the position of one-bit field `name` in its bit-field word (0 = declared first)."""
        return self.file_info_bits.index(name)


def layout(version: Version) -> Layout:
    """Returns the ABI layout of libfuse `version` (major, minor, hotfix), from include/
    fuse_common.h of each release: 3.14.1 put `parallel_direct_writes` after `keep_cache`,
    which moved every later bit (libfuse issue 1029); 3.17 moved it to the end again and added
    fuse_buf's `mem_size`."""
    head = ("writepage", "direct_io", "keep_cache")
    tail = ("flush", "nonseekable", "flock_release", "cache_readdir", "noflush")
    bits: tuple[str, ...]
    if (3, 14, 1) <= version < (3, 17, 0):
        bits = (*head, "parallel_direct_writes", *tail)
    elif version >= (3, 17, 0):
        bits = (*head, *tail, "parallel_direct_writes")
    else:
        bits = (*head, *tail)  # noflush from 3.11 on: a bit older releases leave as padding
    return Layout(file_info_bits=bits, buf_has_mem_size=version >= (3, 17, 0))


def parse_version(text: str) -> Version | None:
    """Returns (major, minor, hotfix) from fuse_pkgversion()'s "3.14.1" (hotfix 0 if absent)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    major, minor, hotfix = match.groups()
    return int(major), int(minor), int(hotfix or 0)


def library_version(lib: ctypes.CDLL) -> Version:
    """Returns the version that loaded library `lib` reports: fuse_pkgversion() names the hotfix,
    which matters (3.14.0 and 3.14.1 differ); fuse_version() (major * 100 + minor) otherwise."""
    pkgversion = getattr(lib, "fuse_pkgversion", None)
    if pkgversion is not None:
        pkgversion.restype = ctypes.c_char_p
        parsed = parse_version((pkgversion() or b"").decode("ascii", "replace"))
        if parsed is not None:
            return parsed
    number = int(lib.fuse_version())
    return (number // 100, number % 100, 0) if number >= 100 else (number // 10, number % 10, 0)


def candidates() -> Iterator[str]:
    """Yields the names to try to dlopen, best first: the user's FUSE_LIBRARY_PATH, then the
    libfuse 3 sonames, then whatever ldconfig calls "fuse3". ldconfig is asked last and only
    then: find_library runs `ldconfig -p` in a child process, 10 ms of every mount's start."""
    tried: set[str] = set()
    for name in (os.environ.get(LIBRARY_VARIABLE, ""), *SONAMES):
        if name and name not in tried:
            tried.add(name)
            yield name
    found = ctypes.util.find_library("fuse3")
    if found and found not in tried:
        yield found


def _open_libfuse3(name: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    if hasattr(lib, "fuse_session_new") and library_version(lib)[0] == 3:
        return lib
    _ctypes.dlclose(lib._handle)  # e.g. FUSE_LIBRARY_PATH naming libfuse 2: do not keep it mapped
    return None


def locate() -> str | None:
    """Returns the name of the first loadable libfuse 3 (it stays loaded), or None."""
    for name in candidates():
        if _open_libfuse3(name) is not None:
            return name
    return None


@dataclass(frozen=True)
class Libfuse:
    """The one libfuse 3 of this process."""

    name: str
    lib: ctypes.CDLL
    version: Version
    layout: Layout
    mfusepy: ModuleType


@functools.cache
def load() -> Libfuse:
    """Returns the process's libfuse 3, loading it and then mfusepy on the first call; raises
    LibfuseMissing if there is none."""
    name = locate()
    if name is None:
        raise LibfuseMissing(INSTALL_HINT)
    os.environ[LIBRARY_VARIABLE] = name  # read by mfusepy at import, and by our child processes
    import mfusepy

    lib = ctypes.CDLL(name)  # the handle mfusepy's dlopen of the same name returned
    version = library_version(lib)
    if mfusepy.fuse_version_major != 3 or mfusepy.fuse_version_minor != version[1]:
        # mfusepy was imported before this module chose (by someone else's import): its
        # structures would describe another library.
        raise LibfuseMissing(f"mfusepy loaded libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}, "
                             f"not {name}: import unionfs.fuse.libfuse first")  # fmt: skip
    return Libfuse(name, lib, version, layout(version), mfusepy)
