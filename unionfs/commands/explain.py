"""`crfs-merge explain IMAGE PATH`: which layer made PATH of the merged tree, what every layer
did to it and why (whiteouts, opaque directories, replacements), with no mount.

Exit status: 0 the path is in the merged tree; 1 it is not (the explanation says which layer
and marker removed it, if one ever had it), or the image failed; 2 a usage problem."""

from __future__ import annotations

import argparse
import logging

from unionfs.commands.inspecting import image_parser, open_view, run

log = logging.getLogger("crfs-merge")
DESCRIPTION = ("Explain PATH of IMAGE's merged tree: the layer (digest, history line) its entry comes from, what "
               "each layer did to it and why, and its hardlink group. Exit status 1 when PATH is not in the "
               "merged tree (the layer and marker that removed it are still shown).")  # fmt: skip


def command(name: str, argv: list[str]) -> int:
    """Runs `crfs-merge explain`; returns its exit status."""
    parser = image_parser(name, DESCRIPTION)
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("path", metavar="PATH", help="a path of the merged tree, with or without a leading /")
    parser.add_argument("--json", action="store_true", help="the explanation as JSON")
    args = parser.parse_args(argv)
    return run(args, lambda: _explain(args))


def _explain(args: argparse.Namespace) -> int:
    from unionfs.provenance.render import explanation_text, to_json

    with open_view(args, args.image) as view:
        report = view.explain(args.path)
    print(to_json(report) if args.json else explanation_text(report))
    if not report.ever_existed:
        log.error("%s: no layer of %s ever had this path", args.path, args.image)
    return 0 if report.exists else 1
