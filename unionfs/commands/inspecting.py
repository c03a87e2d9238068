"""What the commands that read an image without a mount share (ls, cat, stat, find, explain,
layers, diff): the image options of the mount, opening the image, and exit statuses.

They never import libfuse, so they run where /dev/fuse is missing (a CI container)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from registry.errors import ImageError
from unionfs.api.image import ImageView
from unionfs.commands.server_log import configure_terminal
from unionfs.commands.usage import UsageError

log = logging.getLogger("crfs-merge")


def image_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options that say where an image comes from (--cache-dir, --creds, ...)."""
    from unionfs.cli import add_source_options

    parser = argparse.ArgumentParser(prog=f"crfs-merge {prog}", description=description, allow_abbrev=False)
    add_source_options(parser)
    return parser


def open_view(args: argparse.Namespace, image_text: str) -> ImageView:
    """Opens the image named on the command line, with the options `image_parser` added."""
    from unionfs.build import open_image
    from unionfs.cli import settings_from

    settings = settings_from(args)
    return ImageView(open_image(image_text, settings), image_text)


def run(args: argparse.Namespace, work: Callable[[], int]) -> int:
    """Runs a command's work; returns its exit status: its own, 1 when the image, the registry
    or a path fails, 2 for a usage problem, 130 on ^C. A reader that closes the pipe early
    (`| head`) ends the command quietly."""
    from unionfs.cli import credentials

    configure_terminal(args.verbose)
    try:
        args.creds = credentials(args)
        return work()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except UsageError as exc:
        log.error("%s", exc)
        return 2
    except (ImageError, OSError) as exc:
        log.error("%s", exc)
        return 1


def _quiet_stdout() -> None:
    """Points stdout at /dev/null so that Python's flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
