"""`crfs-merge layers IMAGE`: per layer its digest, size, history line, entries added, changed
and removed, and the file bytes that later layers hide or replace; the image's efficiency.
With --ci, a gate as `dive --ci`: exit status 3 when a threshold is crossed.

Exit status: 0 done (with --ci: every threshold holds); 1 the image failed; 2 a usage
problem; 3 (--ci) a threshold is crossed, each one named on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from unionfs.commands.cache import size_argument
from unionfs.commands.inspecting import image_parser, open_view, run

THRESHOLD_CROSSED = 3
DESCRIPTION = ("Show what each layer of IMAGE adds, changes and removes, and the file bytes later layers hide "
               "(wasted, as dive shows it), with the image's efficiency. --ci gates on them: exit status 3 when "
               "a threshold is crossed.")  # fmt: skip


def command(name: str, argv: list[str]) -> int:
    """Runs `crfs-merge layers`; returns its exit status."""
    parser = image_parser(name, DESCRIPTION)
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.add_argument("--ci", action="store_true", help="check the thresholds below; exit status 3 if one is crossed")
    parser.add_argument("--lowest-efficiency", type=_fraction, default=None, metavar="RATIO",
                        help="--ci: fail below this efficiency (default 0.9, as dive; 0 switches it off)")  # fmt: skip
    parser.add_argument("--highest-wasted-bytes", type=size_argument, default=None, metavar="SIZE",
                        help="--ci: fail above this many wasted bytes, e.g. 20M (default: no limit)")  # fmt: skip
    parser.add_argument("--highest-user-wasted-percent", type=_fraction, default=None, metavar="RATIO",
                        help="--ci: fail when wasted bytes exceed this share of the bytes above the first layer: "
                        "0.1 or 10%% (default 0.1, as dive; 1 switches it off in practice)")  # fmt: skip
    args = parser.parse_args(argv)
    given = {name: value for name, value in (("lowest_efficiency", args.lowest_efficiency),
             ("highest_wasted_bytes", args.highest_wasted_bytes),
             ("highest_user_wasted_fraction", args.highest_user_wasted_percent)) if value is not None}  # fmt: skip
    if given and not args.ci:
        parser.error("the thresholds are options of --ci: crfs-merge layers --ci --lowest-efficiency 0.95 IMAGE")
    return run(args, lambda: _layers(args, given))


def _layers(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from unionfs.provenance.render import layers_text, to_json
    from unionfs.provenance.report import Thresholds, crossed

    with open_view(args, args.image) as view:
        report = view.layers()
    print(to_json(report) if args.json else layers_text(report))
    if not args.ci:
        return 0
    failures = crossed(report, Thresholds(**given))
    for failure in failures:
        print(f"crfs-merge layers --ci: FAIL: {failure}", file=sys.stderr)
    if failures:
        return THRESHOLD_CROSSED
    print("crfs-merge layers --ci: PASS", file=sys.stderr)
    return 0


def _fraction(text: str) -> float:
    """A ratio for argparse: 0.9, or 90%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no ratio (0.9 or 90%)") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: a ratio is not negative")
    return value
