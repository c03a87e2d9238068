"""The mount server's life, through the real command: what -v says, the server's log file and
working directory, one server per mountpoint, a dead mount, a server that dies before its
mount is ready, and usage problems (exit status 2)."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import COMMAND, ImageWriter, unmount
from tests.tarvocab import d, f, wh
from unionfs.commands.server_log import BoundedFileHandler

TIMEOUT = 60


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The command's environment: its own state directory (log file, mountpoint locks)."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}


@pytest.fixture
def mountpoints(tmp_path: Path, fuse_works: None) -> Iterator[list[Path]]:
    """Directories to mount on; whatever is mounted there is unmounted afterwards."""
    made: list[Path] = []
    yield made
    for mountpoint in made:
        unmount(mountpoint)
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)  # a dead mount too


def _new_dir(tmp_path: Path, mountpoints: list[Path], name: str = "mnt") -> Path:
    mountpoint = tmp_path / name
    mountpoint.mkdir()
    mountpoints.append(mountpoint)
    return mountpoint


def _run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd)


def _log_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "crfs-merge" / "crfs-merge.log"


def _server_of(mountpoint: Path, command: int) -> int | None:
    """The pid of the process serving `mountpoint` other than the command `command` that
    started it (found by command line, as `ps` would), if there is one yet."""
    for process in Path("/proc").iterdir():
        try:
            argv = (process / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if process.name.isdigit() and int(process.name) != command and os.fsencode(mountpoint) in argv:
            return int(process.name)
    return None


def _wait_for(condition, seconds: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _mount_count(mountpoint: Path) -> int:
    text = Path("/proc/self/mountinfo").read_text()
    return sum(1 for line in text.splitlines() if line.split()[4] == str(mountpoint))


# --- -v and the log file -----------------------------------------------------------------


def test_verbose_mount_logs_each_step(oci_image: ImageWriter, tmp_path: Path, env: dict[str, str],
                                      mountpoints: list[Path]) -> None:  # fmt: skip
    image = oci_image([d("etc"), f("etc/a", b"1" * 5000)], [f("b", b"2"), wh("etc/a")])
    mountpoint = _new_dir(tmp_path, mountpoints)
    first = _run(["-v", "--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)], env)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert any(re.search(r"image sha256:[0-9a-f]{64}, 2 layers", line) for line in lines), lines
    assert sum("blob verified and decompressed" in line for line in lines) == 2, lines
    assert sum(re.search(r"layer \d .*: indexed \d+ entries of [\d.]+ MB in [\d.]+ s", line) is not None
               for line in lines) == 2, lines  # fmt: skip
    assert any(line.startswith("crfs-merge: merged 2 layers") for line in lines), lines
    assert lines[-1] == "crfs-merge: mount ready"
    unmount(mountpoint)
    second = _run(["-v", "--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)], env)
    assert second.returncode == 0, second.stderr
    assert "merged tree loaded from the cache" in second.stderr
    assert second.stderr.splitlines()[-1] == "crfs-merge: mount ready"
    quiet = _run(["--cache-dir", str(tmp_path / "cache"), image, str(_new_dir(tmp_path, mountpoints, "q"))], env)
    assert (quiet.returncode, quiet.stderr) == (0, "")  # without -v, nothing


def test_server_works_from_root_and_logs_an_eio_to_its_file(
    oci_image: ImageWriter, tmp_path: Path, env: dict[str, str], mountpoints: list[Path]
) -> None:
    """Relative paths everywhere, from a directory the server must not keep busy; then a layer
    tar cut short under the mount: the read is EIO and the log file has the line about it."""
    image = oci_image([f("data", os.urandom(1 << 20))])
    work = tmp_path / "work"
    work.mkdir()
    mountpoint = _new_dir(work, mountpoints, "mnt-of-the-cwd-test")
    layout = os.path.relpath(image.split(":")[1], work)
    run = _run(["--cache-dir", "cache", f"oci:{layout}:latest", mountpoint.name], env, cwd=work)
    assert run.returncode == 0, run.stderr
    server = _server_of(Path(mountpoint.name), 0)
    assert server is not None
    assert os.readlink(f"/proc/{server}/cwd") == "/"
    assert os.readlink(f"/proc/{server}/fd/2") == str(_log_path(tmp_path))
    (cached,) = (work / "cache" / "tars").glob("*.tar")
    os.truncate(cached, 4096)
    with pytest.raises(OSError) as raised:
        (mountpoint / "data").read_bytes()
    assert raised.value.errno == errno.EIO
    logged = _log_path(tmp_path).read_text()
    assert re.search(rf"crfs-merge\[{server}\] {re.escape(str(mountpoint))}: ERROR read.*", logged), logged
    assert f"crfs-merge[{server}] {mountpoint}: INFO mount ready" in logged


def test_log_file_option_and_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "server.log"
    handler = BoundedFileHandler(path, "/mnt/x", max_bytes=2000)
    record = logging.LogRecord("crfs-merge", logging.ERROR, __file__, 1, "read(%d,): %s", (7, "x" * 80), None)
    for _ in range(200):
        handler.emit(record)
    assert path.stat().st_size <= 2000 + 200
    assert 2000 <= path.with_name("server.log.1").stat().st_size <= 2000 + 200
    assert path.read_text().splitlines()[-1].endswith(f"/mnt/x: ERROR read(7,): {'x' * 80}")


def test_log_file_can_be_chosen(oci_image: ImageWriter, tmp_path: Path, env: dict[str, str],
                                mountpoints: list[Path]) -> None:  # fmt: skip
    mountpoint = _new_dir(tmp_path, mountpoints)
    chosen = tmp_path / "chosen.log"
    run = _run(["--log-file", str(chosen), "--cache-dir", str(tmp_path / "c"), oci_image([f("a", b"1")]),
                str(mountpoint)], env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert chosen.read_text().endswith(f"{mountpoint}: INFO mount ready\n")
    assert not _log_path(tmp_path).exists()


# --- one server per mountpoint, dead mounts, early deaths ------------------------------------


@pytest.fixture
def silent_registry() -> Iterator[str]:
    """A registry address that accepts connections and never answers: a mount of an image
    there stays in its build until its --timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def _start_stalled(registry: str, mountpoint: Path, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [*COMMAND, "--timeout", "60", "--cache-dir", str(tmp_path / "cache"), f"{registry}/test/slow:1",
               str(mountpoint)]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)


def test_a_second_command_onto_a_directory_being_mounted_refuses(
    silent_registry: str, tmp_path: Path, env: dict[str, str], mountpoints: list[Path]
) -> None:
    mountpoint = _new_dir(tmp_path, mountpoints)
    first = _start_stalled(silent_registry, mountpoint, tmp_path, env)
    try:
        _wait_for(lambda: _server_of(mountpoint, first.pid) is not None)
        server = _server_of(mountpoint, first.pid)
        second = _run(["--cache-dir", str(tmp_path / "cache"), f"{silent_registry}/test/slow:1", str(mountpoint)], env)
        assert second.returncode == 2
        refusal = f"crfs-merge: {mountpoint}: crfs-merge server {server} is already mounting or serving it\n"
        assert second.stderr == refusal
    finally:
        first.kill()
        if (server := _server_of(mountpoint, first.pid)) is not None:
            os.kill(server, signal.SIGKILL)
        first.wait(TIMEOUT)


def test_commands_started_together_mount_once(oci_image: ImageWriter, tmp_path: Path, env: dict[str, str],
                                              mountpoints: list[Path]) -> None:  # fmt: skip
    image = oci_image([f("a", b"1")])
    for attempt in range(4):
        mountpoint = _new_dir(tmp_path, mountpoints, f"m{attempt}")
        cache = ["--cache-dir", str(tmp_path / f"cache{attempt}")]  # each pair builds from scratch
        both = [subprocess.Popen([*COMMAND, *cache, image, str(mountpoint)], stderr=subprocess.PIPE, text=True,
                                 env=env) for _ in range(2)]  # fmt: skip
        statuses = sorted(p.wait(TIMEOUT) for p in both)
        errors = "".join(p.stderr.read() for p in both if p.stderr)
        assert statuses == [0, 2], errors
        assert "is already mounting or serving it" in errors or "something is already mounted there" in errors
        assert _mount_count(mountpoint) == 1


def test_a_mount_whose_server_was_killed_is_named(oci_image: ImageWriter, tmp_path: Path, env: dict[str, str],
                                                  mountpoints: list[Path]) -> None:  # fmt: skip
    image = oci_image([f("a", b"1")])
    mountpoint = _new_dir(tmp_path, mountpoints)
    args = ["--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)]
    assert _run(args, env).returncode == 0
    assert (mountpoint / "a").read_bytes() == b"1"  # the kernel now keeps the root's attributes
    server = _server_of(mountpoint, 0)
    assert server is not None
    os.kill(server, signal.SIGKILL)
    _wait_for(lambda: not Path(f"/proc/{server}").exists())
    again = _run(args, env)
    assert again.returncode == 2
    gone = "the crfs-merge server for this directory is gone (transport endpoint is not connected)"
    assert again.stderr == f"crfs-merge: {mountpoint}: {gone}; `fusermount3 -u {mountpoint}` clears it\n"
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert _run(args, env).returncode == 0
    assert (mountpoint / "a").read_bytes() == b"1"


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGSEGV])
def test_a_server_that_dies_before_the_mount_is_ready_is_reported(
    signal_number: int, silent_registry: str, tmp_path: Path, env: dict[str, str], mountpoints: list[Path]
) -> None:
    mountpoint = _new_dir(tmp_path, mountpoints)
    command = _start_stalled(silent_registry, mountpoint, tmp_path, env)
    try:
        _wait_for(lambda: _server_of(mountpoint, command.pid) is not None)
        server = _server_of(mountpoint, command.pid)
        assert server is not None
        os.kill(server, signal_number)
        assert command.wait(TIMEOUT) == 1
    finally:
        command.kill()
    assert command.stderr is not None
    name = signal.Signals(signal_number).name
    assert command.stderr.read() == (f"crfs-merge: {mountpoint}: the server was killed by {name} before the mount "
                                     f"was ready; its log: {_log_path(tmp_path)}\n")  # fmt: skip
    assert not os.path.ismount(mountpoint)


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-o", "nonsense"], "-o nonsense: libfuse does not accept it"),
        (["-o", "max_read=many"], "-o max_read=many: libfuse does not accept it"),
        (["-o", "allow_other,kernel_cache"], "-o kernel_cache: an option of libfuse's high-level API"),
        (["-o", "attr_timeout=5"], "-o attr_timeout=5: an option of libfuse's high-level API"),
    ],
    ids=["unknown", "bad-value", "kernel_cache", "attr_timeout"],
)
def test_options_libfuse_refuses_are_usage_errors(options: list[str], message: str, oci_image: ImageWriter,
                                                  tmp_path: Path, env: dict[str, str],
                                                  mountpoints: list[Path]) -> None:  # fmt: skip
    mountpoint = _new_dir(tmp_path, mountpoints)
    run = _run([*options, "--cache-dir", str(tmp_path / "cache"), oci_image([f("a", b"1")]), str(mountpoint)], env)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"crfs-merge: {message}") and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "cache").exists()  # refused before any layer was read
    foreground = _run(["-f", *options, "--cache-dir", str(tmp_path / "cache"), oci_image([f("a", b"1")]),
                       str(mountpoint)], env)  # fmt: skip
    assert (foreground.returncode, foreground.stderr) == (2, run.stderr)


def test_a_mount_libfuse_cannot_make_is_a_usage_error(oci_image: ImageWriter, tmp_path: Path, env: dict[str, str],
                                                      mountpoints: list[Path]) -> None:  # fmt: skip
    """-o blkdev passes libfuse's option parser, then the mount itself fails (our fsname is no
    block device; fusermount3 refuses it to users): status 2, libfuse's reason, then ours."""
    mountpoint = _new_dir(tmp_path, mountpoints)
    run = _run(["-o", "blkdev", "--cache-dir", str(tmp_path / "cache"), oci_image([f("a", b"1")]), str(mountpoint)],
               env)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1] == f"crfs-merge: {mountpoint}: the mount failed (the line above says why)"
    assert len(run.stderr.splitlines()) == 2 and not os.path.ismount(mountpoint)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_positive_and_finite(value: str, tmp_path: Path, env: dict[str, str]) -> None:
    for args in (["--timeout", value, "oci:/x", str(tmp_path)], ["convert", "--timeout", value, "oci:/x", "oci:/y"]):
        run = _run(args, env)
        assert run.returncode == 2
        assert "argument --timeout: expected a" in run.stderr and "seconds" in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--platform", "nonsense", "oci:/x", "/"], "argument --platform: expected os/arch[/variant], not 'nonsense'"),
        (["--platform", "linux/", "oci:/x", "/"], "argument --platform: expected os/arch[/variant], not 'linux/'"),
        (["convert", "--chunk-size", "0", "oci:/x", "oci:/y"], "argument --chunk-size: expected a positive whole"),
        (["convert", "--chunk-size", "-5", "oci:/x", "oci:/y"], "argument --chunk-size: expected a positive whole"),
    ],
    ids=["platform-one-part", "platform-empty-arch", "chunk-size-zero", "chunk-size-negative"],
)
def test_malformed_option_values_are_usage_errors(args: list[str], message: str, env: dict[str, str]) -> None:
    run = _run(args, env)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr.splitlines()[-1], run.stderr


def test_version_and_usage(tmp_path: Path, env: dict[str, str]) -> None:
    from importlib.metadata import version

    run = _run(["--version"], env)
    assert (run.returncode, run.stdout) == (0, f"crfs-merge {version('crfs-merge')}\n")
    usage = _run(["--help"], env).stdout.split("\n\n")[0]
    assert usage == ("usage: crfs-merge [options] IMAGE DIR\n       crfs-merge --export DEST [options] IMAGE\n"
                     "       crfs-merge convert [options] SRC DST\n"
                     "       crfs-merge commit --upper DIR [options] IMAGE DEST\n"
                     "       crfs-merge ls|cat|stat|find|explain|layers|diff [options] IMAGE ... "
                     "(no mount; --help each)\n"
                     "       crfs-merge cache [--cache-dir DIR] [prune (--max-size SIZE | --all)]\n"
                     "       crfs-merge --version")  # fmt: skip
    for args in (["oci:/x"], ["oci:/x", str(tmp_path), "extra"], ["--creds"], ["--cred", "a:b", "oci:/x", "d"]):
        run = _run(args, env)
        assert run.returncode == 2, (args, run.stderr)
        assert "Traceback" not in run.stderr


def test_creds_without_a_password_and_no_terminal_is_a_usage_error(tmp_path: Path, env: dict[str, str]) -> None:
    run = subprocess.run([*COMMAND, "--creds", "alice", "127.0.0.1:1/x/y:z", str(tmp_path)], capture_output=True,
                         text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr == ("crfs-merge: --creds alice: no password given and no terminal to ask for it; use "
                          "--creds USER:PASS, or --password-stdin\n")  # fmt: skip
    mixed = _run(["--creds", "alice:x", "--password-stdin", "127.0.0.1:1/x/y:z", str(tmp_path)], env)
    assert (mixed.returncode, mixed.stderr) == (2, "crfs-merge: --password-stdin needs --creds USER (with no :PASS)\n")


def test_an_unwritable_state_directory_still_mounts(oci_image: ImageWriter, tmp_path: Path,
                                                    mountpoints: list[Path]) -> None:  # fmt: skip
    """No log file and no lock where the home is read-only: a warning for each, and the mount;
    a --log-file that cannot be written is a usage error."""
    env = {**os.environ, "XDG_STATE_HOME": "/proc/crfs-merge-nowhere"}
    image = oci_image([f("a", b"1")])
    mountpoint = _new_dir(tmp_path, mountpoints)
    run = _run(["--cache-dir", str(tmp_path / "cache"), image, str(mountpoint)], env)
    assert run.returncode == 0, run.stderr
    assert (mountpoint / "a").read_bytes() == b"1"
    warnings = run.stderr.splitlines()
    assert len(warnings) == 2, warnings
    assert "cannot write the server's log" in warnings[0] and "cannot lock" in warnings[1]
    unmount(mountpoint)
    refused = _run(["--log-file", "/proc/crfs-merge-nowhere/log", image, str(mountpoint)], env)
    assert refused.returncode == 2
    assert refused.stderr == "crfs-merge: --log-file /proc/crfs-merge-nowhere/log: No such file or directory\n"
