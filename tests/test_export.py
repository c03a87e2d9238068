"""--export writes the same merged tree as the mount, for machines without FUSE."""

from __future__ import annotations

import gzip
import io
import os
import pty
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from tests.conftest import COMMAND, ImageWriter, Mounter
from tests.tarvocab import d, f, hl, opq, sym, wh
from tests.tree_walk import describe_tree

LOWER = [d("etc/"), f("etc/a", b"a", mode=0o600, uid=7, gid=8), f("etc/b", b"b"), hl("etc/c", "etc/a"),
         sym("etc/l", "a"), d("var/cache/"), f("var/cache/x", b"x")]  # fmt: skip
UPPER = [wh("etc/b"), opq("var/cache"), f("var/cache/y", b"y", xattrs={"user.k": "v"})]


def _export(image: str, dest: Path, tmp_path: Path) -> None:
    subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "cache"), "--export", str(dest), image],
                   check=True, capture_output=True, timeout=60)  # fmt: skip


def test_directory_export_equals_the_mount(oci_image: ImageWriter, mount: Mounter, tmp_path: Path) -> None:
    image = oci_image(LOWER, UPPER)
    _export(image, tmp_path / "out", tmp_path)
    exported = describe_tree(tmp_path / "out", skip_dir_mtime=True)
    assert exported == describe_tree(mount(image), skip_dir_mtime=True)
    assert exported["etc/a"][-1] == ("etc/a", "etc/c")


def test_tar_export_lists_the_merged_tree(oci_image: ImageWriter, tmp_path: Path) -> None:
    _export(oci_image(LOWER, UPPER), tmp_path / "out.tar", tmp_path)
    with tarfile.open(tmp_path / "out.tar") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == ["etc", "etc/a", "etc/c", "etc/l", "var", "var/cache", "var/cache/y"]
        assert members["etc/c"].islnk() and members["etc/c"].linkname == "etc/a"
        assert (members["etc/a"].uid, members["etc/a"].mode) == (7, 0o600)
        assert members["var/cache/y"].pax_headers["SCHILY.xattr.user.k"] == "v"
        assert archive.extractfile("var/cache/y").read() == b"y"  # type: ignore[union-attr]


def test_export_refuses_a_non_empty_directory(oci_image: ImageWriter, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("mine")
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--export", str(tmp_path / "busy"),
                          oci_image(LOWER)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and "not empty" in run.stderr
    assert (tmp_path / "busy" / "keep").read_text() == "mine"


# --- compressed archives, refusals, progress ----------------------------------------------

BIG = [d("data/"), f("data/blob", bytes(range(256)) * 4096), *LOWER]  # 1 MiB, for the progress line


def _read_back(path: Path) -> bytes:
    """Returns the tar stream inside an exported archive, decompressed by the reference
    libraries (gzip, zstandard)."""
    raw = path.read_bytes()
    if path.name.endswith((".tar.gz", ".tgz")):
        assert raw[:2] == b"\x1f\x8b"
        return gzip.decompress(raw)
    if path.name.endswith((".tar.zst", ".tzst")):
        assert raw[:4] == b"\x28\xb5\x2f\xfd"
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as reader:
            return reader.read()
    return raw


def _listing(tar: bytes) -> list[tuple[object, ...]]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return [(m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.pax_headers,
                 archive.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
                for m in archive.getmembers()]  # fmt: skip


@pytest.mark.parametrize("name", ["out.tar.gz", "out.tgz", "out.tar.zst", "out.tzst"])
def test_compressed_export_holds_the_plain_tar(name: str, oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(LOWER, UPPER)
    _export(image, tmp_path / "plain.tar", tmp_path)
    _export(image, tmp_path / name, tmp_path)
    assert (tmp_path / name).is_file()
    plain = (tmp_path / "plain.tar").read_bytes()
    assert _read_back(tmp_path / name) == plain
    assert _listing(plain) == _listing(_read_back(tmp_path / name))
    assert len(_listing(plain)) == 7


def _refused(command: list[str]) -> str:
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["out.tar", "out.tar.gz", "out.tar.zst"])
def test_export_refuses_to_overwrite_a_file(name: str, oci_image: ImageWriter, tmp_path: Path) -> None:
    (tmp_path / name).write_text("mine")
    line = _refused([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--export", str(tmp_path / name),
                     oci_image(LOWER)])  # fmt: skip
    assert line == f"crfs-merge: --export {tmp_path / name}: file exists; remove it first or choose another name"
    assert (tmp_path / name).read_text() == "mine"


def _on_terminal(command: list[str], stream: str) -> tuple[int, str, str]:
    """Runs `command` with its `stream` ('stdout' or 'stderr') on a new pseudo-terminal and the
    other on a pipe; returns the exit status, what the terminal showed, and the pipe's text."""
    master, slave = pty.openpty()
    other = "stderr" if stream == "stdout" else "stdout"
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **{stream: slave, other: subprocess.PIPE})
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the last holder of the terminal closed it
            break
        if not data:
            break
        shown += data
    os.close(master)
    out, errors = process.communicate(timeout=60)
    return process.returncode, shown.decode(), (out if stream == "stderr" else errors).decode()


def test_export_refuses_to_write_a_tar_to_a_terminal(oci_image: ImageWriter, tmp_path: Path) -> None:
    status, shown, errors = _on_terminal([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--export", "-",
                                          oci_image(LOWER)], "stdout")  # fmt: skip
    assert (status, shown) == (2, "")
    assert errors.splitlines() == [
        "crfs-merge: --export -: stdout is a terminal; pipe the tar (| tar -t) or redirect it (> image.tar)"
    ]


def test_export_to_a_pipe_is_a_tar(oci_image: ImageWriter, tmp_path: Path) -> None:
    run = subprocess.run([*COMMAND, "--cache-dir", str(tmp_path / "c"), "--export", "-", oci_image(LOWER)],
                         capture_output=True, timeout=60)  # fmt: skip
    assert run.returncode == 0 and run.stderr == b""
    names = ["etc", "etc/a", "etc/b", "etc/c", "etc/l", "var", "var/cache", "var/cache/x"]
    assert [m[0] for m in _listing(run.stdout)] == names


PROGRESS = re.compile(r"crfs-merge: (\w[\w ]*?) +([\d.]+) / ([\d.]+) MB")


@pytest.mark.parametrize("dest", ["out.tar", "out-dir"])
def test_export_shows_progress_on_a_terminal_only(dest: str, oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(BIG)
    command = [*COMMAND, "--cache-dir", str(tmp_path / "c"), "--export", str(tmp_path / dest), image]
    status, shown, _ = _on_terminal(command, "stderr")
    assert status == 0, shown
    assert PROGRESS.findall(shown)[-1] == ("exporting", "1.0", "1.0")  # 1 MiB and 3 bytes: all of it
    shutil.rmtree(tmp_path / dest, ignore_errors=True) if (tmp_path / dest).is_dir() else (tmp_path / dest).unlink()
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == ""


def test_convert_shows_progress_on_a_terminal_only(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image(BIG, UPPER)
    command = [*COMMAND, "convert", "--cache-dir", str(tmp_path / "c"), image, f"oci:{tmp_path / 'converted'}:a"]
    status, shown, digest = _on_terminal(command, "stderr")
    assert status == 0, shown
    doing, done, total = PROGRESS.findall(shown)[-1]
    assert doing == "converting layers" and done == total and float(total) > 1.0
    assert digest.startswith(f"oci:{tmp_path / 'converted'}:a: sha256:")
    run = subprocess.run([*command[:-1], f"oci:{tmp_path / 'converted'}:b"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0 and run.stderr == ""
