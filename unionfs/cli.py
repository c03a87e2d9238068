"""The crfs-merge command: mount an image as one merged read-only tree, or export it.

    crfs-merge [options] IMAGE DIR       mount; returns once DIR is ready
    crfs-merge --export DEST IMAGE       write the merged tree to a directory or a tar
    crfs-merge convert SRC DST           rewrite an image's layers as eStargz (to a layout or registry)
    crfs-merge commit --upper DIR IMAGE DEST   IMAGE plus a layer made from an upper directory
    crfs-merge cache [prune ...]         show what the cache holds, or prune it (unionfs/commands/cache.py)
    crfs-merge ls|cat|stat|find|explain|layers|diff IMAGE ...   read an image with no mount (INSPECTING)

Caveats:
- The mount is served by a background process (unionfs/commands/server.py says how it starts, logs and
  reports); only one may serve a directory at a time (unionfs/commands/mount_lock.py).
- eStargz layers of registry images are read lazily, so the server keeps its registry
  session (on one event loop thread) for as long as the mount lives; other layers are
  fetched whole before the mount is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import math
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import ImageError
from registry.reference import REGISTRY, ImageReference
from unionfs.commands import server
from unionfs.commands.mount_lock import MountpointError, check_directory, check_mountpoint, lock_mountpoint
from unionfs.commands.server_log import configure_terminal
from unionfs.commands.usage import UsageError

if TYPE_CHECKING:
    from registry.manifest import Platform
    from unionfs.build import MountedImage, Settings

# The command that mounts only parses its arguments and starts the server, which then
# imports the registry client (aiohttp), FUSE and the rest: importing them here too would
# add about 0.15 s to every mount for nothing.

log = logging.getLogger("crfs-merge")
PREFETCH_MODES = ("none", "landmark", "all")
PULL_POLICIES = ("missing", "always")
USAGE = """crfs-merge [options] IMAGE DIR
       crfs-merge --export DEST [options] IMAGE
       crfs-merge convert [options] SRC DST
       crfs-merge commit --upper DIR [options] IMAGE DEST
       crfs-merge ls|cat|stat|find|explain|layers|diff [options] IMAGE ... (no mount; --help each)
       crfs-merge cache [--cache-dir DIR] [prune (--max-size SIZE | --all)]
       crfs-merge --version"""

# Commands that read an image without a mount: command name -> its module in unionfs/commands/.
INSPECTING = {"ls": "browse", "cat": "browse", "stat": "browse", "find": "browse", "explain": "explain",
              "layers": "layers", "diff": "diff"}  # fmt: skip

__all__ = ["UsageError", "main", "parse_options"]


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status (0 ok, 1 failure, 2 usage)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cache"]:
        from unionfs.commands.cache import command

        return command(argv[1:])
    if argv[:1] and argv[0] in INSPECTING:
        return _inspect(argv[0], argv[1:])
    subcommand = argv[0] if argv[:1] in (["convert"], ["commit"]) else ""
    parser = {"convert": _convert_parser, "commit": _commit_parser}.get(subcommand, _parser)()
    args = parser.parse_args(argv[1:] if subcommand else argv)
    configure_terminal(args.verbose)
    try:
        args.creds = credentials(args)
        if subcommand == "convert":
            return _convert(args)
        if subcommand == "commit":
            return _commit(args)
        if args.export:
            return _export(args)
        return _mount(args, argv)
    except KeyboardInterrupt:
        return 130
    except (UsageError, MountpointError) as exc:
        log.error("%s", exc)
        return 2
    except (ImageError, OSError) as exc:
        log.error("%s", exc)
        return 1


def _inspect(name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"unionfs.commands.{INSPECTING[name]}")
    status: int = module.command(name, argv)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crfs-merge",
        usage=USAGE,
        description="Mount a container image as one merged, read-only tree (OCI whiteouts applied).",
        epilog="IMAGE: [docker://]REGISTRY/REPO[:TAG][@DIGEST], oci:PATH[:TAG], docker-archive:FILE[:NAME], "
        "or a path to a layout or an archive. Also: crfs-merge convert --help, crfs-merge cache --help. "
        "Exit status: 0 done, 1 the image or registry failed, 2 a usage problem.",
        allow_abbrev=False,  # `--cred` must not slip past the code that keeps secrets off command lines
    )
    parser.add_argument("operands", nargs="+", metavar="IMAGE DIR", help="image to mount, and where")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="FUSE mount options passed to libfuse, e.g. allow_other")  # fmt: skip
    parser.add_argument("--export", metavar="DEST", help="write the merged tree to DEST (directory, .tar, or -)")
    parser.add_argument("--upper", metavar="DIR", help="mount read-write: every change goes to DIR, in OCI diff "
                        "form (created if missing; bound to IMAGE); `crfs-merge commit` makes it a layer")  # fmt: skip
    parser.add_argument("--prefetch", choices=PREFETCH_MODES, default="landmark",
                        help="eStargz layers: fetch in the background none, the prioritized files (landmark, "
                        "the default), or all")  # fmt: skip
    parser.add_argument("--log-file", type=Path, default=None, metavar="FILE",
                        help="the background server's log (default: $XDG_STATE_HOME/crfs-merge/"
                        "crfs-merge.log)")  # fmt: skip
    for hidden in ("--ready-fd", "--lock-fd", "--creds-fd"):  # from the command to a spawned server
        parser.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    add_source_options(parser)
    return parser


def _convert_parser() -> argparse.ArgumentParser:
    from unionfs.estargz.writer import DEFAULT_CHUNK_SIZE  # the writer is convert's alone

    parser = argparse.ArgumentParser(
        prog="crfs-merge convert",
        description="Rewrite an image's layers as eStargz (lazily pullable) into an OCI layout.",
        allow_abbrev=False,
    )
    parser.add_argument("source", metavar="SRC", help="any image crfs-merge can mount")
    parser.add_argument("dest", metavar="DST", help="oci:PATH[:TAG] (an OCI layout, created or extended), "
                        "or a registry reference to push to")  # fmt: skip
    parser.add_argument("--chunk-size", type=_positive_int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                        help=f"largest chunk of a file (default {DEFAULT_CHUNK_SIZE})")  # fmt: skip
    parser.add_argument("--prefetch-files", default="", metavar="PATH[,PATH...]",
                        help="files to put first, before the prefetch landmark, in their layers")  # fmt: skip
    parser.add_argument("--format", choices=["estargz", "zstd:chunked"], default="estargz", dest="layer_format",
                        help="the lazily pullable layer format to write (default estargz)")  # fmt: skip
    add_source_options(parser)
    return parser


def _commit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crfs-merge commit",
        description="Write IMAGE plus one layer made from an upper directory (OCI diff form) as a new image.",
        allow_abbrev=False,
    )
    parser.add_argument("--upper", required=True, metavar="DIR", help="the upper directory: files, .wh. "
                        "whiteouts, opaque markers, user.containers.override_stat")  # fmt: skip
    parser.add_argument("source", metavar="IMAGE", help="the image DIR was made over")
    parser.add_argument("dest", metavar="DEST", help="oci:PATH[:TAG] (an OCI layout, created or extended), "
                        "or a registry reference to push to")  # fmt: skip
    parser.add_argument("--compression", choices=("gzip", "zstd", "estargz"), default="gzip",
                        help="of the new layer (default gzip)")  # fmt: skip
    parser.add_argument("-m", "--message", default=None, help="the new history entry's comment")
    add_source_options(parser)
    return parser


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Options on where an image comes from, shared by mount, --export and convert."""
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="default: $XDG_CACHE_HOME/crfs-merge")  # fmt: skip
    parser.add_argument("--platform", type=_platform, default=None, metavar="OS/ARCH[/VARIANT]",
                        help="which image of a multi-platform index (default: this machine's)")  # fmt: skip
    parser.add_argument("--creds", metavar="USER[:PASS]",
                        help="registry credentials (else auth files are read); without :PASS, the password is "
                        "asked for on the terminal, or read from stdin with --password-stdin")  # fmt: skip
    parser.add_argument("--password-stdin", action="store_true", help="read the password of --creds USER from stdin")
    parser.add_argument("--tls-verify", type=_boolean, default=True, metavar="BOOL",
                        help="false: allow plain HTTP and unverified TLS (default true)")  # fmt: skip
    parser.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="registry connect and read timeout (default 30)")  # fmt: skip
    parser.add_argument("--registries-conf", type=Path, default=None, metavar="FILE",
                        help="registries.conf(5) for mirrors, remapping, blocking and short names (default: "
                        "podman's: $CONTAINERS_REGISTRIES_CONF, ~/.config/containers/registries.conf or "
                        "/etc/containers/registries.conf, with their registries.conf.d)")  # fmt: skip
    parser.add_argument("--pull", choices=PULL_POLICIES, default="missing",
                        help="registry images: missing (the default) takes what the reference resolved to when "
                        "last used with this cache, asking the registry nothing if the image is all cached; "
                        "always looks the reference up again")  # fmt: skip
    parser.add_argument("--cache-max-size", type=_size, default=None, metavar="SIZE",
                        help="prune unused cache files, oldest first, above SIZE (default 20G)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")


class _Version(argparse.Action):
    """--version: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("crfs-merge")
        except PackageNotFoundError:
            number = "(not installed)"
        print(f"crfs-merge {number}")
        parser.exit()


def _size(text: str) -> int:
    from unionfs.commands.cache import size_argument  # only when the option is given

    return size_argument(text)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def _platform(text: str) -> str:
    """An os/arch[/variant] that parses (kept as text: Settings parses it again)."""
    if len(parts := text.split("/")) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(f"expected os/arch[/variant], not {text!r}")
    return text


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def credentials(args: argparse.Namespace) -> str | None:
    """Returns the `USER:PASS` to use, asking for a missing password (on the terminal, or
    from stdin with --password-stdin), or None for none given."""
    creds_fd = getattr(args, "creds_fd", None)
    if creds_fd is not None:  # a spawned server: the command sent them through a pipe
        with os.fdopen(creds_fd, "rb") as pipe:
            return pipe.read().decode()
    if args.password_stdin and (args.creds is None or ":" in args.creds):
        raise UsageError("--password-stdin needs --creds USER (with no :PASS)")
    if args.creds is None or ":" in args.creds:
        return args.creds
    if args.password_stdin:
        return f"{args.creds}:{sys.stdin.readline().rstrip(chr(10))}"
    if not sys.stdin.isatty():
        raise UsageError(f"--creds {args.creds}: no password given and no terminal to ask for it; "
                         "use --creds USER:PASS, or --password-stdin")  # fmt: skip
    try:
        return f"{args.creds}:{getpass.getpass(f'Password for {args.creds}: ')}"
    except EOFError:
        raise UsageError(f"--creds {args.creds}: no password given") from None


def settings_from(args: argparse.Namespace) -> Settings:
    from registry.auth import Credentials
    from registry.options import RemoteOptions
    from unionfs.build import Settings

    return Settings(
        cache_dir=_cache_dir(args),
        platform=_platform_of(args),
        remote=RemoteOptions(Credentials.parse(args.creds) if args.creds else None, args.tls_verify, args.timeout,
                             registries_conf=server.absolute(args.registries_conf) if args.registries_conf else None),
        prefetch=getattr(args, "prefetch", "landmark"),
        pull=getattr(args, "pull", "missing"),
        **({"cache_max_bytes": args.cache_max_size} if args.cache_max_size is not None else {}),
    )


def _cache_dir(args: argparse.Namespace) -> Path:
    from unionfs.storage import default_cache_dir

    return server.absolute(args.cache_dir or default_cache_dir())  # the server leaves its cwd


def _platform_of(args: argparse.Namespace) -> Platform:
    from registry.manifest import Platform

    return Platform.parse(args.platform) if args.platform else Platform.host()


def _open_image(args: argparse.Namespace, image_text: str) -> MountedImage:
    from unionfs.build import open_image

    return open_image(image_text, settings_from(args))


def _convert(args: argparse.Namespace) -> int:
    from unionfs.commands.convert import convert

    files = [p for p in args.prefetch_files.split(",") if p]
    digest = convert(args.source, args.dest, settings_from(args), args.chunk_size, files, args.layer_format)
    print(f"{args.dest}: {digest}")
    return 0


def _commit(args: argparse.Namespace) -> int:
    from unionfs.commands.commit import commit
    from unionfs.upper.diff import UpperDirError

    try:
        digest = commit(args.upper, args.source, args.dest, settings_from(args), args.compression, args.message)
    except UpperDirError as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.dest}: {digest}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from unionfs.commands.export import export
    from unionfs.commands.progress import terminal_progress

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
    from unionfs.commands.export import archive_compression

    if dest == "-" and sys.stdout.isatty():
        raise UsageError("--export -: stdout is a terminal; pipe the tar (| tar -t) or redirect it (> image.tar)")
    if archive_compression(dest) is not None and os.path.lexists(dest):
        raise UsageError(f"--export {dest}: file exists; remove it first or choose another name")


def _mount(args: argparse.Namespace, argv: list[str]) -> int:
    if len(args.operands) != 2:
        raise UsageError("usage: crfs-merge [options] IMAGE DIR (or --export DEST IMAGE)")
    image_text, mountpoint = args.operands
    ImageReference.parse(image_text)  # a bad reference fails here, before any process starts
    options = parse_options(args.options, writable=args.upper is not None)
    if args.upper is not None:
        args.upper = os.path.abspath(args.upper)
    if args.ready_fd is not None:  # a spawned server: the command checked all, and passed the lock down
        return _serve(args, image_text, mountpoint, options)
    _preflight(mountpoint)
    args.log_file = server.choose_log_file(args.log_file, args.foreground)
    lock_fd = lock_mountpoint(mountpoint)  # a crfs-merge server already there is named by its pid
    check_mountpoint(mountpoint)
    if args.foreground:
        return _serve(args, image_text, mountpoint, options)
    return server.start(args, argv, image_text, mountpoint, options, lock_fd, _serve)


def parse_options(values: list[str], writable: bool = False) -> dict[str, str | bool]:
    """Returns `-o a,b=c` values as {'a': True, 'b': 'c'}; without --upper, 'ro' is implied
    and 'rw' refused."""
    options: dict[str, str | bool] = {}
    for item in (o for value in values for o in value.split(",") if o):
        key, sep, value = item.partition("=")
        if key == "rw" and not writable:
            raise UsageError("the mount is read-only; -o rw is not supported (--upper DIR mounts read-write)")
        if key in ("rw", "ro") and writable:
            continue
        options[key] = value if sep else True
    return options


def _preflight(mountpoint: str) -> None:
    check_directory(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module, or use --export")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise UsageError("fusermount3 is not installed (Debian/Ubuntu: apt-get install fuse3), or use --export")
    from unionfs.fuse import libfuse  # here, not at the top: nothing else of the command needs libfuse

    if libfuse.locate() is None:
        raise UsageError(f"{libfuse.INSTALL_HINT}, or use --export")


def _serve(args: argparse.Namespace, image_text: str, mountpoint: str, options: dict[str, str | bool]) -> int:
    """The server's work, in the foreground or in the background: returns once unmounted."""
    importing = _import_registry_client(args, image_text)
    from unionfs.fuse.ops import check_options, mount

    mountpoint = os.path.abspath(mountpoint)  # the server leaves the caller's directory
    server.prepare(args, mountpoint)
    check_options(options)  # before the image is built: a refused option is a usage error
    if importing is not None:
        importing.join()
    image = _open_image(args, image_text)
    if args.upper is not None:
        return _serve_writable(args, image, image_text, mountpoint, options)
    server.detach(args)
    mount(image, mountpoint, options, on_ready=lambda: server.report_ready(args))
    log.info("unmounted")
    return 0


def _import_registry_client(args: argparse.Namespace, image_text: str) -> threading.Thread | None:
    """For a registry image, starts importing aiohttp on a thread of its own, while this one
    imports the FUSE side, and returns the thread: of aiohttp's 0.1-0.15 s, a third is loading
    the system's CA certificates (twice), which OpenSSL does with the GIL let go. The two
    imports load no module in common, so neither waits on the other's import lock; the
    caller joins the thread before it imports anything more. Not when --pull missing finds
    the image recorded: then the mount may need no registry before it is ready, and aiohttp's
    import, on the same GIL, would only hold up the rest."""
    reference = ImageReference.parse(image_text)
    if reference.transport != REGISTRY or _has_record(args, reference):
        return None

    def load() -> None:
        with contextlib.suppress(ImportError):  # said where it is needed, by the registry client
            import aiohttp  # noqa: F401

    thread = threading.Thread(target=load, name="crfs-merge-import", daemon=True)
    thread.start()
    return thread


def _has_record(args: argparse.Namespace, reference: ImageReference) -> bool:
    """--pull missing and a record of the reference: the mount may need no registry before ready."""
    from unionfs.storage.resolutions import record_path

    return args.pull == "missing" and record_path(_cache_dir(args), reference.remote(), _platform_of(args)).exists()


def _serve_writable(args: argparse.Namespace, image: MountedImage, image_text: str, mountpoint: str,
                    options: dict[str, str | bool]) -> int:  # fmt: skip
    """Serves `image` read-write over the upper directory `args.upper`."""
    from unionfs.fuse import writable
    from unionfs.fuse.ops import worker_threads
    from unionfs.upper.binding import claim_upper
    from unionfs.upper.overlay import WritableTree
    from unionfs.upper.store import UpperStore

    lock_fd, new = claim_upper(args.upper, image.image_id, image_text)
    os.umask(0)  # every mode is set as the program asked; the kernel applied its umask already
    try:
        tree = WritableTree(image.tree, image.content, UpperStore(os.fsencode(args.upper)), show_root=new)
        server.detach(args)

        def ready() -> None:
            server.report_ready(args)
            image.start_prefetch()

        writable.mount(tree, mountpoint, options, ready, image.close, worker_threads(image))
    finally:
        os.close(lock_fd)
    log.info("unmounted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
