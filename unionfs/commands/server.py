"""The mount's server process: started by the command, ready when the kernel has the mount.

Without -f the command forks a server process, before any thread exists (libfuse's own
daemonize forks after setup, which is unsafe once threads run); the server reports back through
a pipe once the kernel has the mount, and the command then exits 0. With --creds the server is
a fresh interpreter instead, so that the secret is not on its command line: it reads the
secret from a pipe (`--creds-fd`), and inherits the mountpoint's lock (`--lock-fd`).

The server logs to the caller's terminal until the mount is ready and to its log file
(--log-file) throughout; once ready, its stderr goes to that file too, and it works from `/`,
as libfuse's daemonize does, so it does not keep the caller's directory busy. A server that
dies before the mount is ready is reported by the command in one line: how it died and where
its log is.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from registry.errors import ImageError
from unionfs.commands.mount_lock import record_owner
from unionfs.commands.server_log import attach_log_file, default_log_path, leave_the_terminal, open_log
from unionfs.commands.usage import UsageError

log = logging.getLogger("crfs-merge")
READY = b"ready\n"
MOUNT_APPEAR_SECONDS = 10.0
# Statuses after which the server has already said why, on the terminal and in its log.
EXPLAINED_STATUSES = (1, 2)

Serve = Callable[[argparse.Namespace, str, str, dict[str, "str | bool"]], int]


def start(args: argparse.Namespace, argv: list[str], image_text: str, mountpoint: str,
          options: dict[str, str | bool], lock_fd: int | None, serve: Serve) -> int:  # fmt: skip
    """Starts the server of `mountpoint` (holding `lock_fd`); returns once its mount is ready,
    with the command's exit status."""
    if args.creds is not None:
        return _spawn_server(args, argv, lock_fd)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os._exit(_run_forked(args, image_text, mountpoint, options, write_end, lock_fd, serve))
    os.close(write_end)
    if lock_fd is not None:
        os.close(lock_fd)  # the server's copy holds the lock from now on

    def wait() -> int:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    return _await_ready(read_end, args, wait, lambda: os.kill(pid, signal.SIGTERM))


def _spawn_server(args: argparse.Namespace, argv: list[str], lock_fd: int | None) -> int:
    """Starts `crfs-merge -f` in its own session, the secret through a pipe, and waits."""
    import subprocess  # only here: a forked server (no --creds) never needs it

    read_end, write_end = os.pipe()
    secret_read, secret_write = os.pipe()
    os.write(secret_write, args.creds.encode())  # a few bytes: the pipe's buffer takes them
    os.close(secret_write)
    passed = [write_end, secret_read] + ([] if lock_fd is None else [lock_fd])
    command = [sys.executable, "-m", "unionfs.cli", "--foreground", "--ready-fd", str(write_end),
               "--creds-fd", str(secret_read), *([] if lock_fd is None else ["--lock-fd", str(lock_fd)]),
               *([] if args.log_file is None else ["--log-file", str(args.log_file)]),
               *without_secrets(argv, "--log-file")]  # fmt: skip
    child = subprocess.Popen(command, pass_fds=passed, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    if lock_fd is not None:
        record_owner(lock_fd, child.pid)
    for fd in passed:
        os.close(fd)
    return _await_ready(read_end, args, child.wait, child.terminate)


def without_secrets(argv: list[str], *also: str) -> list[str]:
    """Returns argv less `--creds VALUE` (which `ps` would show), `--password-stdin`, and
    the options `also` (each with its value)."""
    with_values = ("--creds", *also)
    kept: list[str] = []
    items = iter(argv)
    for item in items:
        if item in with_values:
            next(items, None)
        elif not item.startswith(tuple(f"{name}=" for name in with_values)) and item != "--password-stdin":
            kept.append(item)
    return kept


def _run_forked(args: argparse.Namespace, image_text: str, mountpoint: str, options: dict[str, str | bool],
                ready_fd: int, lock_fd: int | None, serve: Serve) -> int:  # fmt: skip
    """The forked server's whole life; returns its exit status (it must never return into
    the parent's code: the caller exits with this)."""
    try:
        os.setsid()
        if lock_fd is not None:
            record_owner(lock_fd, os.getpid())
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        args.ready_fd = ready_fd
        return serve(args, image_text, mountpoint, options)
    except UsageError as exc:
        log.error("%s", exc)
        return 2
    except (ImageError, OSError) as exc:
        log.error("%s", exc)
        return 1
    except BaseException:
        log.exception("the server failed")
        return 1
    finally:
        sys.stderr.flush()


def prepare(args: argparse.Namespace, mountpoint: str) -> None:
    """Sets up a server before it builds anything: its log file, and for a background server
    the lock it inherited (kept from any program it may run)."""
    if args.lock_fd is not None:
        os.set_inheritable(args.lock_fd, False)
    if args.log_file is not None:
        attach_log_file(args.log_file, mountpoint)


def detach(args: argparse.Namespace) -> None:
    """For a background server, once its image is open: works from `/` (paths it still needs
    are absolute by now) so that the caller's directory is not kept busy."""
    if args.ready_fd is not None:
        os.chdir("/")


def report_ready(args: argparse.Namespace) -> None:
    """Tells the waiting command that the mount is ready; from then on, writes to the log."""
    log.info("mount ready")
    if args.ready_fd is None:
        return
    os.write(args.ready_fd, READY)
    os.close(args.ready_fd)
    args.ready_fd = None
    leave_the_terminal(args.log_file)


def _await_ready(read_end: int, args: argparse.Namespace, wait: Callable[[], int], stop: Callable[[], None]) -> int:
    """Returns 0 once the server says its mount is ready; else the exit status, having said
    how the server ended if it did not say so itself."""
    mountpoint = args.operands[1]
    try:
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.readline() == READY
    except KeyboardInterrupt:
        stop()  # the user gave up waiting: the server must not mount behind their back
        wait()
        return 130
    if not ready:
        status = wait()
        if status in EXPLAINED_STATUSES:
            return status
        where = f"its log: {args.log_file}" if args.log_file else "it had no log file"
        log.error("%s: the server %s before the mount was ready; %s", mountpoint, describe_exit(status), where)
        return 1
    deadline = time.monotonic() + MOUNT_APPEAR_SECONDS
    while not os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


def describe_exit(status: int) -> str:
    """Returns how a process ended, from a status as subprocess gives it (-N: signal N)."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        return f"was killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"was killed by signal {-status}"


def choose_log_file(given: Path | None, foreground: bool) -> Path | None:
    """Returns the server's log file, absolute (the server leaves its directory): `given`, or
    for a background server the default one. Warns and returns None if the default cannot be
    written (a read-only home); raises UsageError if `given` cannot."""
    if given is None and foreground:
        return None
    path = absolute(given or default_log_path())
    try:
        os.close(open_log(path))
    except OSError as exc:
        if given is not None:
            raise UsageError(f"--log-file {given}: {exc.strerror}") from None
        log.warning("%s: cannot write the server's log (%s); it will log nowhere", path, exc.strerror)
        return None
    return path


def absolute(path: str | Path) -> Path:
    """Returns `path` made absolute against the current directory, without resolving links."""
    return Path(os.path.abspath(path))
