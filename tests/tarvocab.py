"""A tiny vocabulary for test layers, so cases read like the spec:

tar_of(d("etc/"), f("etc/hosts", b"..."), wh("etc/motd"), opq("var/cache/"))
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Member:
    name: str
    type: bytes
    data: bytes = b""
    mode: int = 0o644
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0
    mtime: int = MTIME


def d(name: str, mode: int = 0o755, **kw: object) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def f(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> Member:
    return Member(name, tarfile.REGTYPE, data=data, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> Member:
    return Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)  # type: ignore[arg-type]


def hl(name: str, target: str, **kw: object) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def wh(path: str) -> Member:
    """The whiteout of `path`: an empty file `.wh.<name>` beside it."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return f(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def opq(directory: str) -> Member:
    """The opaque marker of `directory`."""
    return f(directory.rstrip("/") + "/.wh..wh..opq" if directory.strip("/") else ".wh..wh..opq")


def dev(name: str, kind: str, major: int, minor: int) -> Member:
    return Member(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode=0o600, devmajor=major, devminor=minor)


def fifo(name: str) -> Member:
    return Member(name, tarfile.FIFOTYPE, mode=0o600)


def tar_of(*members: Member) -> bytes:
    """Returns a PAX tar holding `members` in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.mode, info.linkname = m.type, m.mode, m.linkname
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.devmajor, info.devminor = m.devmajor, m.devminor
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in m.xattrs.items()}
            info.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(m.data) if info.size else None)
    return buffer.getvalue()
