#!/usr/bin/env python3
"""Build the image of the seed bug (google/crfs "Whiteouts don't work with overlayfs").

Lower layer: an /etc tree. Upper layer: etc/network/.wh..wh..opq, etc/network/newfile and
etc/.wh.localtime. Mounted with crfs-merge, etc/ must show no localtime and no
.wh. names, and etc/network must hold only newfile.

    python3 examples/build_seed_image.py /tmp/crfs-seed   # writes an OCI layout there
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from registry.layout_writer import write_layout

MTIME = 1_600_000_000  # fixed, so the image (and its digests) are the same on every build


def _tar(members: list[tuple[str, bytes | str | None]]) -> bytes:
    """Members are (name, content): bytes a file, str a symlink target, None a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif isinstance(content, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, content, 0o777
            else:
                info.size, info.mode = len(content), 0o640 if name.endswith("shadow") else 0o644
            archive.addfile(info, io.BytesIO(content) if isinstance(content, bytes) else None)
    return buffer.getvalue()


LOWER = [
    ("etc/", None),
    ("etc/group", b"root:x:0:\n"),
    ("etc/hostname", b"seed\n"),
    ("etc/hosts", b"127.0.0.1 localhost\n"),
    ("etc/localtime", b"TZif2 UTC\n"),
    ("etc/mtab", "/proc/mounts"),
    ("etc/network/", None),
    ("etc/network/if-down.d/", None),
    ("etc/network/if-post-down.d/", None),
    ("etc/network/if-pre-up.d/", None),
    ("etc/network/if-up.d/", None),
    ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    ("etc/resolv.conf", b"nameserver 127.0.0.53\n"),
    ("etc/shadow", b"root:*:19000:0:99999:7:::\n"),
]
UPPER = [
    ("etc/", None),
    ("etc/network/", None),
    ("etc/network/newfile", b"added by the upper layer\n"),
    ("etc/network/.wh..wh..opq", b""),
    ("etc/.wh.localtime", b""),
]


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/crfs-seed")
    write_layout(target, [_tar(LOWER), _tar(UPPER)])
    print(f"oci:{target}")


if __name__ == "__main__":
    main()
