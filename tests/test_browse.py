"""`crfs-merge ls|cat|stat|find` and unionfs.api show what the FUSE mount of the same image shows.

The oracle is the real mount, read with the real tools: coreutils `ls -R` and GNU `find` run
inside it, and lstat/readlink/listxattr/read on its paths. The commands run in this process
(main() with stdout captured) for the merge-rule table, and as processes for the rest.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import COMMAND, ImageWriter, Mounter, require
from tests.tarvocab import d, f, hl, sym, wh
from tests.test_mount import RICH_LOWER, RICH_UPPER, UMOCI_CASES
from unionfs import cli
from unionfs.api import open_image

CHECKOUT = Path(__file__).resolve().parent.parent


def run_command(*argv: str) -> tuple[int, bytes, str]:
    """Runs `crfs-merge ARGV` in this process; returns (status, stdout bytes, stderr text)."""
    out, err = io.BytesIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    wrapper = io.TextIOWrapper(out, write_through=True)
    sys.stdout, sys.stderr = wrapper, err
    try:
        status = cli.main(list(argv))
    finally:
        wrapper.flush()
        wrapper.detach()
        sys.stdout, sys.stderr = saved
    return status, out.getvalue(), err.getvalue()


def walk_mount(root: Path) -> list[str]:
    """Every path below `root`, relative, in the mount's listing order."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs.sort(key=os.fsencode)
        for name in [*dirs, *files]:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return found


def lstat_record(root: Path, path: str) -> dict[str, object]:
    full = root / path if path else root
    info = os.lstat(full)
    record: dict[str, object] = {"ino": info.st_ino, "mode": info.st_mode, "nlink": info.st_nlink,
                                 "uid": info.st_uid, "gid": info.st_gid, "size": info.st_size,
                                 "mtime_ns": info.st_mtime_ns,
                                 "rdev": info.st_rdev,
                                 "link_target": os.readlink(full) if stat.S_ISLNK(info.st_mode) else None,
                                 "xattrs": {n: os.getxattr(full, n, follow_symlinks=False).decode("latin-1")
                                            for n in os.listxattr(full, follow_symlinks=False)}}  # fmt: skip
    return record


def tool_output(argv: list[str], cwd: Path) -> bytes:
    return subprocess.run(argv, cwd=cwd, capture_output=True, check=True, env={**os.environ, "LC_ALL": "C"}).stdout


def check_commands_match_the_mount(image: str, root: Path, cache: Path) -> None:
    """ls -R, find, stat --json of every path and cat of every file, against the mount."""
    options = ("--cache-dir", str(cache))
    status, listed, err = run_command("ls", "-R", *options, image)
    assert (status, err) == (0, "")
    assert listed == tool_output(["ls", "-R"], root)
    assert run_command("find", *options, image)[1] == tool_output(["find", "."], root)
    paths = walk_mount(root)
    status, stats, err = run_command("stat", "--json", *options, image, "/", *paths)
    assert (status, err) == (0, "")
    shown = [json.loads(line) for line in stats.splitlines()]
    assert [s["path"] for s in shown] == ["/", *("/" + p for p in paths)]
    for path, record in zip(["", *paths], shown, strict=True):
        expected = lstat_record(root, path)
        assert {k: record[k] for k in expected} == expected, path
    files = [p for p in paths if stat.S_ISREG(os.lstat(root / p).st_mode)]
    if files:
        status, data, err = run_command("cat", *options, image, *files)
        assert (status, err) == (0, "")
        assert data == b"".join((root / p).read_bytes() for p in files)


@pytest.mark.parametrize(("name", "layers", "expected"), UMOCI_CASES, ids=[c[0] for c in UMOCI_CASES])
def test_each_merge_rule_shows_as_the_mount_shows(
    name: str, layers: list, expected: dict[str, str], oci_image: ImageWriter, mount: Mounter, tmp_path: Path
) -> None:  # fmt: skip
    image = oci_image(*layers)
    check_commands_match_the_mount(image, mount(image), tmp_path / "cache")


def test_the_rich_image_shows_as_the_mount_shows(oci_image: ImageWriter, mount: Mounter, tmp_path: Path) -> None:
    image = oci_image(RICH_LOWER, RICH_UPPER)
    root = mount(image)
    check_commands_match_the_mount(image, root, tmp_path / "cache")
    status, long, _ = run_command("ls", "-lR", "--cache-dir", str(tmp_path / "cache"), image, "/usr")
    assert status == 0
    line = next(x for x in long.decode().splitlines() if x.endswith("liby.so -> libx.so.1"))
    assert line.split()[:5] == ["lrwxrwxrwx", "1", "0", "0", str(len("libx.so.1"))]
    device = next(x for x in run_command("ls", "-l", image, "dev")[1].decode().splitlines() if "null" in x)
    assert device.split()[4:6] == ["1,", "3"]  # ls -l shows major, minor for a device's size


def test_the_seed_example_as_processes(mount: Mounter, tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "build_seed_image.py"
    subprocess.run([sys.executable, str(example), str(tmp_path / "seed")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(example.parent.parent)})  # fmt: skip
    image = f"oci:{tmp_path / 'seed'}"
    root = mount(image)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    run = subprocess.run([*COMMAND, "ls", "-R", *cache, image], capture_output=True, check=True, cwd=tmp_path)
    assert run.stdout == tool_output(["ls", "-R"], root)
    run = subprocess.run([*COMMAND, "cat", *cache, image, "/etc/hosts", "etc/passwd"], capture_output=True)
    assert run.stdout == (root / "etc/hosts").read_bytes() + (root / "etc/passwd").read_bytes()
    run = subprocess.run([*COMMAND, "find", *cache, image, "etc", "-type", "f", "-name", "h*"], capture_output=True,
                         check=True)  # fmt: skip
    assert run.stdout == tool_output(["find", "etc", "-type", "f", "-name", "h*"], root)


def test_paths_resolve_inside_the_image_and_errors_are_a_mounts(oci_image: ImageWriter, tmp_path: Path) -> None:
    image = oci_image([d("etc/"), f("etc/os-release", b"ID=test\n"), sym("etc/escape", "../../../../etc/passwd"),
                       sym("abs", "/etc"), sym("loop", "loop"), sym("up", "..")],
                      [wh("etc/gone"), hl("etc/hard", "etc/os-release")])  # fmt: skip
    with open_image(image, cache_dir=tmp_path / "cache") as view:
        assert view.read("/abs/os-release") == b"ID=test\n"
        assert view.read("up/up/etc/../etc/hard") == b"ID=test\n"
        assert view.resolve("etc/escape") == "etc/passwd"  # '..' stops at the image root
        assert view.stat("abs").is_symlink and view.stat("abs", follow_symlinks=True).is_dir
        assert view.stat("etc/hard").nlink == 2
        for path, number in (("etc/escape", "ENOENT"), ("loop", "ELOOP"), ("etc", "EISDIR"),
                             ("etc/os-release/x", "ENOTDIR")):  # fmt: skip
            with pytest.raises(OSError) as caught:
                view.read(path)
            assert caught.value.errno == getattr(__import__("errno"), number), path
        with view.open("etc/os-release") as reader:
            reader.seek(3)
            assert reader.read(2) == b"te"
    status, _, err = run_command("cat", "--cache-dir", str(tmp_path / "cache"), image, "etc/escape")
    assert status == 1 and "etc/escape: No such file or directory" in err
    status, _, err = run_command("stat", "--cache-dir", str(tmp_path / "cache"), image, "nowhere")
    assert status == 1 and "nowhere: No such file or directory" in err


def test_every_command_works_where_dev_fuse_is_missing(oci_image: ImageWriter, tmp_path: Path) -> None:
    """A CI container has no /dev/fuse: the commands run in a mount namespace whose /dev is a
    tmpfs with only null, zero and urandom in it."""
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare for a namespace")
    image = oci_image([d("etc/"), f("etc/os-release", b"ID=test\n"), f("etc/gone", b"x")], [wh("etc/gone")])
    other = oci_image([d("etc/"), f("etc/os-release", b"ID=other\n")])
    cache = str(tmp_path / "cache")
    steps = [["ls", "-lR", image], ["cat", image, "etc/os-release"], ["stat", image, "etc/os-release"],
             ["find", image, "-type", "f"], ["diff", image, other], ["explain", image, "etc/gone"],
             ["layers", "--ci", "--lowest-efficiency", "0.5", image]]  # fmt: skip
    script = ["set -e", "mount -t tmpfs none /dev",
              *(f"mknod -m 666 /dev/{n} c 1 {m}" for n, m in (("null", 3), ("zero", 5), ("urandom", 9))),
              "test ! -e /dev/fuse", "set +e"]  # fmt: skip
    for step in steps:
        words = " ".join(_quoted(w) for w in [*COMMAND, step[0], "--cache-dir", cache, *step[1:]])
        script.append(f"{words} > {tmp_path / step[0]}.out; echo $? >> {tmp_path / 'statuses'}")
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(CHECKOUT)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    statuses = (tmp_path / "statuses").read_text().split()
    # diff: 1 is "they differ"; explain: 1 is "not in the merged tree", with the reason
    assert statuses == ["0", "0", "0", "0", "1", "1", "0"], run.stderr
    assert (tmp_path / "cat.out").read_bytes() == b"ID=test\n"
    assert (tmp_path / "diff.out").read_text().splitlines()[-1].startswith("M /etc/os-release: ")
    assert "by whiteout 'etc/.wh.gone' in layer 1" in (tmp_path / "explain.out").read_text()
    assert "efficiency" in (tmp_path / "layers.out").read_text()


def _quoted(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"
