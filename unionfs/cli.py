"""The crfs-merge command: mount an image as one merged read-only tree, or export it.

    crfs-merge [options] IMAGE DIR       mount; returns once DIR is ready
    crfs-merge --export DEST IMAGE       write the merged tree to a directory or a tar
    crfs-merge convert SRC DST           rewrite an image's layers as eStargz (to a layout or registry)

Caveats:
- Without -f the command forks a server process, before any thread exists (libfuse's own
  daemonize forks after setup, which is unsafe once threads run); the server reports back
  through a pipe once the kernel has the mount, and the command then exits 0. With --creds
  the server is a fresh interpreter instead, started without the secret on its command line.
- eStargz layers of registry images are read lazily, so the server keeps its registry
  session (on one event loop thread) for as long as the mount lives; other layers are
  fetched whole before the mount is ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from registry.errors import ImageError
from registry.reference import ImageReference
from unionfs.estargz_writer import DEFAULT_CHUNK_SIZE

if TYPE_CHECKING:
    from unionfs.build import MountedImage, Settings

# The command that mounts only parses its arguments and starts the server, which then
# imports the registry client (aiohttp), FUSE and the rest: importing them here too would
# add about 0.15 s to every mount for nothing.

log = logging.getLogger("crfs-merge")
READY = b"ready\n"
CREDS_VARIABLE = "CRFS_MERGE_CREDS"  # how --creds reaches the server: never on a command line
MOUNT_APPEAR_SECONDS = 10.0
PREFETCH_MODES = ("none", "landmark", "all")


class UsageError(Exception):
    """A problem with the command line or the machine, found before any work."""


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status (0 ok, 1 failure, 2 usage)."""
    argv = sys.argv[1:] if argv is None else argv
    converting = bool(argv) and argv[0] == "convert"
    args = (_convert_parser() if converting else _parser()).parse_args(argv[1:] if converting else argv)
    logging.basicConfig(format="crfs-merge: %(message)s", level=logging.WARNING)
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # ours only: not mfusepy's or asyncio's
    try:
        if converting:
            return _convert(args)
        if args.export:
            return _export(args)
        return _mount(args, argv)
    except UsageError as exc:
        print(f"crfs-merge: {exc}", file=sys.stderr)
        return 2
    except (ImageError, OSError) as exc:
        print(f"crfs-merge: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crfs-merge",
        description="Mount a container image as one merged, read-only tree (OCI whiteouts applied).",
        epilog="IMAGE: [docker://]REGISTRY/REPO[:TAG][@DIGEST], oci:PATH[:TAG], docker-archive:FILE[:NAME], "
        "or a path to a layout or an archive. Also: crfs-merge convert --help",
    )
    parser.add_argument("operands", nargs="+", metavar="IMAGE [DIR]", help="image to mount, and where")
    parser.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="FUSE mount options, e.g. allow_other")  # fmt: skip
    parser.add_argument("--export", metavar="DEST", help="write the merged tree to DEST (directory, .tar, or -)")
    parser.add_argument("--prefetch", choices=PREFETCH_MODES, default="landmark",
                        help="eStargz layers: fetch in the background none, the prioritized files (landmark, "
                        "the default), or all")  # fmt: skip
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    _add_source_options(parser)
    return parser


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crfs-merge convert",
        description="Rewrite an image's layers as eStargz (lazily pullable) into an OCI layout.",
    )
    parser.add_argument("source", metavar="SRC", help="any image crfs-merge can mount")
    parser.add_argument("dest", metavar="DST", help="oci:PATH[:TAG] (an OCI layout, created or extended), "
                        "or a registry reference to push to")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                        help=f"largest chunk of a file (default {DEFAULT_CHUNK_SIZE})")  # fmt: skip
    parser.add_argument("--prefetch-files", default="", metavar="PATH[,PATH...]",
                        help="files to put first, before the prefetch landmark, in their layers")  # fmt: skip
    _add_source_options(parser)
    return parser


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """Options on where an image comes from, shared by mount, --export and convert."""
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $XDG_CACHE_HOME/crfs-merge")
    parser.add_argument("--platform", default=None, help="os/arch[/variant] of a multi-platform image")
    parser.add_argument("--creds", metavar="USER[:PASS]", help="registry credentials (else auth files are read)")
    parser.add_argument("--tls-verify", type=_boolean, default=True, metavar="BOOL",
                        help="false: allow plain HTTP and unverified TLS (default true)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="registry connect and read timeout (default 30)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def _settings(args: argparse.Namespace) -> Settings:
    from registry.auth import Credentials
    from registry.manifest import Platform
    from registry.options import RemoteOptions
    from unionfs.build import Settings
    from unionfs.layer_store import default_cache_dir

    creds = args.creds or os.environ.pop(CREDS_VARIABLE, None)
    return Settings(
        cache_dir=args.cache_dir or default_cache_dir(),
        platform=Platform.parse(args.platform) if args.platform else Platform.host(),
        remote=RemoteOptions(Credentials.parse(creds) if creds else None, args.tls_verify, args.timeout),
        prefetch=getattr(args, "prefetch", "landmark"),
    )


def _open_image(args: argparse.Namespace, image_text: str) -> MountedImage:
    from unionfs.build import open_image

    return open_image(image_text, _settings(args))


def _convert(args: argparse.Namespace) -> int:
    from unionfs.convert import convert

    files = [p for p in args.prefetch_files.split(",") if p]
    digest = convert(args.source, args.dest, _settings(args), args.chunk_size, files)
    print(f"{args.dest}: {digest}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from unionfs.export import export
    from unionfs.progress import terminal_progress

    if len(args.operands) != 1:
        raise UsageError("--export DEST takes exactly one IMAGE")
    _check_export_dest(args.export)
    image = _open_image(args, args.operands[0])
    try:
        export(image, args.export, terminal_progress(sys.stderr, "exporting"))
    finally:
        image.close()
    return 0


def _check_export_dest(dest: str) -> None:
    """Refuses, before any work, what would overwrite a file or fill a terminal with a tar."""
    from unionfs.export import archive_compression

    if dest == "-" and sys.stdout.isatty():
        raise UsageError("--export -: stdout is a terminal; pipe the tar (| tar -t) or redirect it (> image.tar)")
    if archive_compression(dest) is not None and os.path.lexists(dest):
        raise UsageError(f"--export {dest}: file exists; remove it first or choose another name")


def _mount(args: argparse.Namespace, argv: list[str]) -> int:
    if len(args.operands) != 2:
        raise UsageError("usage: crfs-merge [options] IMAGE DIR (or --export DEST IMAGE)")
    image_text, mountpoint = args.operands
    ImageReference.parse(image_text)  # a bad reference fails here, before any process starts
    options = parse_options(args.options)
    _preflight(mountpoint)
    if args.foreground:
        return _serve(args, image_text, mountpoint, options)
    if args.creds is not None:
        return _spawn_server(argv, mountpoint)
    return _fork_server(args, image_text, mountpoint, options)


def parse_options(values: list[str]) -> dict[str, str | bool]:
    """Returns `-o a,b=c` values as {'a': True, 'b': 'c'}; 'ro' is implied, 'rw' refused."""
    options: dict[str, str | bool] = {}
    for item in (o for value in values for o in value.split(",") if o):
        key, sep, value = item.partition("=")
        if key == "rw":
            raise UsageError("the mount is read-only; -o rw is not supported")
        options[key] = value if sep else True
    return options


def _preflight(mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: mountpoint is not an existing directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint}: something is already mounted there")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module, or use --export")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise UsageError("fusermount3 is not installed (Debian/Ubuntu: apt-get install fuse3), or use --export")


def _spawn_server(argv: list[str], mountpoint: str) -> int:
    """Starts `crfs-merge -f` in its own session and waits until its mount is ready."""
    read_end, write_end = os.pipe()
    argv, secret = _without_creds(argv)
    command = [sys.executable, "-m", "unionfs.cli", "--foreground", "--ready-fd", str(write_end), *argv]
    env = {**os.environ, **({CREDS_VARIABLE: secret} if secret else {})}
    child = subprocess.Popen(command, pass_fds=(write_end,), stdin=subprocess.DEVNULL, env=env,
                             stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    os.close(write_end)
    return _await_ready(read_end, mountpoint, child.wait, child.terminate)


def _fork_server(args: argparse.Namespace, image_text: str, mountpoint: str, options: dict[str, str | bool]) -> int:
    """Serves the mount from a forked child in its own session; waits until it is ready."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os._exit(_run_server(args, image_text, mountpoint, options, write_end))
    os.close(write_end)

    def wait() -> int:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    return _await_ready(read_end, mountpoint, wait, lambda: os.kill(pid, signal.SIGTERM))


def _run_server(args: argparse.Namespace, image_text: str, mountpoint: str, options: dict[str, str | bool],
                ready_fd: int) -> int:  # fmt: skip
    """The forked server's whole life; returns its exit status (it must never return into
    the parent's code: the caller exits with this)."""
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        args.ready_fd = ready_fd
        return _serve(args, image_text, mountpoint, options)
    except (ImageError, OSError) as exc:
        print(f"crfs-merge: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        logging.exception("crfs-merge: the server failed")
        return 1
    finally:
        sys.stderr.flush()


def _await_ready(read_end: int, mountpoint: str, wait: Callable[[], int], stop: Callable[[], None]) -> int:
    """Returns 0 once the server says its mount is ready; else the server's exit status."""
    try:
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.readline() == READY
    except KeyboardInterrupt:
        stop()  # the user gave up waiting: the server must not mount behind their back
        wait()
        return 130
    if not ready:
        return wait() or 1
    deadline = time.monotonic() + MOUNT_APPEAR_SECONDS
    while not os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


def _without_creds(argv: list[str]) -> tuple[list[str], str | None]:
    """Returns argv less `--creds VALUE` (which `ps` would show), and that value."""
    kept: list[str] = []
    secret = None
    items = iter(argv)
    for item in items:
        if item == "--creds":
            secret = next(items, None)
        elif item.startswith("--creds="):
            secret = item.split("=", 1)[1]
        else:
            kept.append(item)
    return kept, secret


def _serve(args: argparse.Namespace, image_text: str, mountpoint: str, options: dict[str, str | bool]) -> int:
    from unionfs.fuse_ops import mount

    image = _open_image(args, image_text)
    mount(image, mountpoint, options, on_ready=lambda: _report_ready(args.ready_fd))
    return 0


def _report_ready(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    os.write(ready_fd, READY)
    os.close(ready_fd)
    # The parent has exited and its terminal may be gone: stop writing to it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
