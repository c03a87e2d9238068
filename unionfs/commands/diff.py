"""`crfs-merge diff IMAGE_A IMAGE_B`: the paths added, removed and changed from one image's
merged tree to another's, and what changed, without a mount.

Exit status as diff(1) and cmp(1) give it: 0 the trees are equal, 1 they differ, 2 trouble
(the command line, an image, the registry or the cache failed), so that `if crfs-merge diff
...` reads as it does with diff. (The other inspecting commands use 1 for an image error;
here 1 must mean "different".)
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

from registry.errors import ImageError
from unionfs.commands.inspecting import image_parser, open_view, run
from unionfs.compare import Change, ContentJudge, FieldChange, ImageSide, compare

log = logging.getLogger("crfs-merge")
SAME, DIFFERENT, TROUBLE = 0, 1, 2
SHORT_DIGEST = 12  # hex digits of a content digest in the text output


def command(name: str, argv: list[str]) -> int:
    args = parser(name).parse_args(argv)
    return run(args, lambda: _diff_or_trouble(args))


def parser(name: str = "diff") -> argparse.ArgumentParser:
    parser = image_parser(name, "Paths added (A), removed (D) and modified (M) from IMAGE_A's merged tree to "
                          "IMAGE_B's. Exit status: 0 equal, 1 different, 2 trouble.")  # fmt: skip
    parser.add_argument("image_a", metavar="IMAGE_A")
    parser.add_argument("image_b", metavar="IMAGE_B")
    parser.add_argument("--json", action="store_true", help="one JSON document: changes, how files were compared")
    parser.add_argument("--ignore-mtime", action="store_true", help="do not compare mtimes (rebuilt images)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit status says")
    parser.set_defaults(prefetch="none")  # read what the comparison asks for, nothing ahead
    return parser


def _diff_or_trouble(args: argparse.Namespace) -> int:
    try:
        return diff(args)
    except BrokenPipeError:
        raise  # run() ends quietly
    except (ImageError, OSError) as exc:
        log.error("%s", exc)
        return TROUBLE


def diff(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        old, new = (ImageSide(stack.enter_context(open_view(args, text))) for text in (args.image_a, args.image_b))
        judge = ContentJudge(old, new)
        changes = list(compare(old.records(), new.records(), judge, args.ignore_mtime))
        if args.json:
            print(json.dumps(report(args, old, new, changes, judge), indent=2))
        elif not args.quiet:
            for change in changes:
                print(text_line(change))
    return DIFFERENT if changes else SAME


# ---------------------------------------------------------------- text


def text_line(change: Change) -> str:
    """`A /path`, `D /path` or `M /path: size 10 -> 12, content`."""
    line = f"{change.status} {printable(shown_path(change.path))}"
    return f"{line}: {', '.join(describe(f) for f in change.fields)}" if change.fields else line


def describe(change: FieldChange) -> str:
    name, old, new = change.name, change.old, change.new
    if name == "content":
        return "content" if old is None else f"content {_short(old)} -> {_short(new)}"
    if name == "xattrs":
        return "xattrs " + " ".join(_xattr_changes(old, new))  # type: ignore[arg-type]
    if name == "hardlinks":
        return f"hardlinks {_group(old)} -> {_group(new)}"  # type: ignore[arg-type]
    if name == "mode":
        return f"mode {old:04o} -> {new:04o}"
    if name == "mtime":
        return f"mtime {_time(old)} -> {_time(new)}"  # type: ignore[arg-type]
    if name == "target":
        return f"target {printable(str(old))} -> {printable(str(new))}"
    return f"{name} {old} -> {new}"


def _short(digest: object) -> str:
    return str(digest)[: len("sha256:") + SHORT_DIGEST]


def _xattr_changes(old: dict[str, bytes], new: dict[str, bytes]) -> Iterable[str]:
    for name in sorted(old.keys() | new.keys()):
        mark = "+" if name not in old else "-" if name not in new else "~" if old[name] != new[name] else ""
        if mark:
            yield mark + printable(name)


def _group(paths: tuple[str, ...]) -> str:
    return ",".join(printable(shown_path(p)) for p in paths) if paths else "none"


def _time(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc)
    fraction = f".{ns % 10**9:09d}".rstrip("0").rstrip(".")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def shown_path(path: str) -> str:
    return "/" + path


def printable(text: str) -> str:
    """`text` with bytes that are not UTF-8 (fsdecode's surrogates) as \\xNN and control
    characters escaped, so that one path is one line whatever its name."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# ---------------------------------------------------------------- JSON


def report(args: argparse.Namespace, old: ImageSide, new: ImageSide, changes: list[Change],
           judge: ContentJudge) -> dict[str, Any]:  # fmt: skip
    """The --json document."""
    checks = dict(judge.counts)
    checks["size"] = sum(1 for c in changes for f in c.fields if f.name == "content" and f.old is None)
    return {
        "a": {"image": args.image_a, "id": old.view.id},
        "b": {"image": args.image_b, "id": new.view.id},
        "equal": not changes,
        "changes": [change_json(change) for change in changes],
        "content_checks": checks,
        "hashed_bytes": judge.hashed_bytes,
    }


def change_json(change: Change) -> dict[str, Any]:
    document: dict[str, Any] = {"path": shown_path(change.path), "status": change.status, "kind": change.kind}
    if change.fields:
        document["fields"] = {f.name: {"old": _json_value(f.old), "new": _json_value(f.new)} for f in change.fields}
    return document


def _json_value(value: object) -> object:
    if isinstance(value, dict):
        return {name: _xattr_json(data) for name, data in value.items()}
    if isinstance(value, tuple):
        return [shown_path(p) for p in value]
    return value


def _xattr_json(data: bytes) -> object:
    """An xattr value as text when it is UTF-8, else {"hex": ...}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": data.hex()}


if __name__ == "__main__":
    sys.exit(command("diff", sys.argv[1:]))
