"""`crfs-merge ls|cat|stat|find IMAGE ...`: the merged tree as a mount shows it, with no mount.

Their output follows the tools they are named after where a script would rely on it: `ls -R`
and `find` print what coreutils' `ls -R` and GNU find print when run inside the mount (names in
byte order, which is the mount's listing order), `cat` writes the bytes and goes on past a bad
operand. `ls -l` shows numeric owners, as `ls -ln` does: the image's /etc/passwd is not this
machine's. Names are written as the bytes they are.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

from unionfs.api.image import FileStat, ImageView
from unionfs.commands.inspecting import image_parser, open_view, run

TYPE_LETTERS = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "c": stat.S_IFCHR, "b": stat.S_IFBLK,
                "p": stat.S_IFIFO, "s": stat.S_IFSOCK}  # fmt: skip
DESCRIPTIONS = {
    "ls": "List a directory of IMAGE's merged tree, with no mount.",
    "cat": "Write files of IMAGE's merged tree to stdout (symlinks followed inside the image), with no mount.",
    "stat": "Show the metadata of paths of IMAGE's merged tree, with no mount.",
    "find": "List the paths below PATH in IMAGE's merged tree, optionally filtered, with no mount.",
}


def command(name: str, argv: list[str]) -> int:
    """Runs `crfs-merge ls|cat|stat|find`; returns its exit status."""
    parser = image_parser(name, DESCRIPTIONS[name])
    parser.add_argument("image", metavar="IMAGE")
    {"ls": _ls_arguments, "cat": _cat_arguments, "stat": _stat_arguments, "find": _find_arguments}[name](parser)
    args = parser.parse_args(argv)
    work = {"ls": _ls, "cat": _cat, "stat": _stat, "find": _find}[name]

    def opened() -> int:
        with open_view(args, args.image) as view:
            return work(view, args, sys.stdout.buffer)

    return run(args, opened)


# ------------------------------------------------------------ ls


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=".", metavar="PATH", help="a directory or file (default: the root)")
    parser.add_argument("-l", dest="long", action="store_true", help="mode, links, uid, gid, size, mtime (UTC)")
    parser.add_argument("-R", dest="recursive", action="store_true", help="list subdirectories too, as ls -R")
    parser.add_argument("--json", action="store_true", help="one JSON object per entry (JSON lines)")


def _ls(view: ImageView, args: argparse.Namespace, out: BinaryIO) -> int:
    top = view.stat(args.path, follow_symlinks=not args.long)
    if not top.is_dir:
        _write_listing(out, args.path.encode(), [top], args, name_of=lambda _: os.fsencode(args.path))
        return 0
    if not args.recursive:
        _write_listing(out, None, view.scandir(top.path), args)
        return 0
    first = True
    for directory, subdirectories, others in view.walk(top.path):
        entries = sorted([*subdirectories, *others], key=lambda e: os.fsencode(e.path))
        shown = _shown_path(args.path, top.path, directory)
        _write_listing(out, shown, entries, args, separate=not first)
        first = False
    return 0


def _shown_path(operand: str, top: str, directory: str) -> bytes:
    """A directory as `ls -R OPERAND` names it: the operand, then the path below it."""
    below = directory[len(top) :].lstrip("/") if top else directory
    base = operand.rstrip("/") or "/"
    if not below:
        return os.fsencode(base)
    return os.fsencode(base + below if base.endswith("/") else f"{base}/{below}")


NameOf = Callable[[FileStat], bytes]


def _base_name(entry: FileStat) -> bytes:
    return os.fsencode(entry.path.rpartition("/")[2])


def _write_listing(out: BinaryIO, heading: bytes | None, entries: list[FileStat], args: argparse.Namespace,
                   separate: bool = False, name_of: NameOf = _base_name) -> None:  # fmt: skip
    if args.json:
        for entry in entries:
            out.write(json.dumps(_json_of(entry)).encode() + b"\n")
        return
    lines = _long_lines(entries, name_of) if args.long else [name_of(e) for e in entries]
    if heading is not None and args.recursive:
        out.write((b"\n" if separate else b"") + heading + b":\n")
    out.write(b"".join(line + b"\n" for line in lines))


def _long_lines(entries: list[FileStat], name_of: NameOf) -> list[bytes]:
    """`ls -ln` columns, right-aligned per listing; devices show major, minor for a size."""
    rows = [(stat.filemode(e.mode), str(e.nlink), str(e.uid), str(e.gid), _size_column(e), _utc(e.mtime_ns))
            for e in entries]  # fmt: skip
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    lines = []
    for entry, row in zip(entries, rows, strict=True):
        columns = " ".join(value.rjust(widths[i]) if i else value for i, value in enumerate(row[:5]))
        line = f"{columns} {row[5]} ".encode() + name_of(entry)
        if entry.link_target is not None:
            line += b" -> " + os.fsencode(entry.link_target)
        lines.append(line)
    return lines


def _size_column(entry: FileStat) -> str:
    if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
        return f"{os.major(entry.rdev)}, {os.minor(entry.rdev)}"
    return str(entry.size)


def _utc(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime_ns // 1_000_000_000))


def _json_of(entry: FileStat) -> dict[str, object]:
    return {"path": "/" + entry.path, **{k: v for k, v in entry.to_dict().items() if k != "path"}}


# ------------------------------------------------------------ cat


def _cat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files to write, in order")


def _cat(view: ImageView, args: argparse.Namespace, out: BinaryIO) -> int:
    status = 0
    for path in args.paths:
        try:
            view.copy_to(path, out)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            _complain(f"cat: {path}: {exc.strerror}")
            status = 1
    return status


# ------------------------------------------------------------ stat


def _stat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("-L", "--dereference", action="store_true", help="follow a symlink (inside the image)")
    parser.add_argument("--json", action="store_true", help="one JSON object per path (JSON lines)")


def _stat(view: ImageView, args: argparse.Namespace, out: BinaryIO) -> int:
    status = 0
    for path in args.paths:
        try:
            info = view.stat(path, follow_symlinks=args.dereference)
            xattrs = view.xattrs(info.path or "/")
        except OSError as exc:
            _complain(f"stat: {path}: {exc.strerror}")
            status = 1
            continue
        if args.json:
            record = {**_json_of(info), "xattrs": {k: v.decode("latin-1") for k, v in xattrs.items()}}
            out.write(json.dumps(record).encode() + b"\n")
        else:
            out.write(_stat_text(info, xattrs))
    return status


def _stat_text(info: FileStat, xattrs: Mapping[str, bytes]) -> bytes:
    lines = [f"  File: /{info.path}" + (f" -> {info.link_target}" if info.link_target is not None else ""),
             f"  Type: {info.kind}  Size: {info.size}  Inode: {info.ino}  Links: {info.nlink}"
             + (f"  Device: {os.major(info.rdev)},{os.minor(info.rdev)}" if info.rdev else ""),
             f"Access: ({stat.S_IMODE(info.mode):04o}/{stat.filemode(info.mode)})  Uid: {info.uid}  Gid: {info.gid}",
             f"Modify: {_utc(info.mtime_ns)} ({info.mtime_ns} ns)"]  # fmt: skip
    lines += [f" Xattr: {name}={value!r}" for name, value in sorted(xattrs.items())]
    return os.fsencode("\n".join(lines) + "\n")


# ------------------------------------------------------------ find


def _find_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=".", metavar="PATH", help="where to start (default: the root)")
    parser.add_argument("-name", dest="name", metavar="GLOB", help="the last component matches GLOB")
    parser.add_argument("-path", dest="glob", metavar="GLOB", help="the path as printed matches GLOB")
    parser.add_argument("-type", dest="type", choices=sorted(TYPE_LETTERS), help="f, d, l, c, b, p or s")
    parser.add_argument("-maxdepth", dest="maxdepth", type=int, default=None, metavar="N")
    parser.add_argument("--json", action="store_true", help="one JSON object per path (JSON lines)")


def _find(view: ImageView, args: argparse.Namespace, out: BinaryIO) -> int:
    top = view.stat(args.path)
    for shown, entry in _below(view, args.path, top, args.maxdepth):
        if _matches(shown, entry, args):
            out.write(json.dumps(_json_of(entry)).encode() + b"\n" if args.json else os.fsencode(shown) + b"\n")
    return 0


def _below(view: ImageView, shown: str, entry: FileStat, maxdepth: int | None) -> Iterator[tuple[str, FileStat]]:
    """(path as find prints it, entry), depth first in listing order, never through symlinks."""
    stack = [(shown, entry, 0)]
    while stack:
        shown, entry, depth = stack.pop()
        yield shown, entry
        if entry.is_dir and (maxdepth is None or depth < maxdepth):
            prefix = shown if shown.endswith("/") else shown + "/"
            children = view.scandir(entry.path or "/")
            stack.extend((prefix + c.path.rpartition("/")[2], c, depth + 1) for c in reversed(children))


def _matches(shown: str, entry: FileStat, args: argparse.Namespace) -> bool:
    if args.type is not None and stat.S_IFMT(entry.mode) != TYPE_LETTERS[args.type]:
        return False
    if args.name is not None and not fnmatch.fnmatchcase(shown.rstrip("/").rpartition("/")[2] or shown, args.name):
        return False
    return args.glob is None or fnmatch.fnmatchcase(shown, args.glob)


def _complain(message: str) -> None:
    sys.stderr.write(f"crfs-merge {message}\n")
