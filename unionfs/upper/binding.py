"""Which image an upper directory belongs to, and one writable mount per upper directory.

An upper directory only means something over the image it was made on: over another image its
whiteouts and copies would change a different tree. So the first mount records the image's id
(the digest of its config, which names every layer's content by its diff_id: the same image
re-compressed or converted to eStargz shows the same tree and keeps its upper directory) in an
xattr of the directory itself, where a commit does not look, and every later mount compares.

Two servers writing one upper directory would each trust their own view of it; the server holds
an flock on the directory for the mount's life, and a second is refused.
"""

from __future__ import annotations

import errno
import logging
import os

from unionfs.commands.mount_lock import EXIT_GRACE_SECONDS, flock_within
from unionfs.commands.usage import UsageError
from unionfs.upper.diff import IMAGE_XATTR

log = logging.getLogger("crfs-merge")


def claim_upper(directory: str, image_id: str, image_text: str) -> tuple[int, bool]:
    """Returns a descriptor holding `directory`'s lock (creating the directory if missing) and
    whether the directory is new to this image; raises UsageError if another mount holds it or
    it belongs to another image."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"--upper {directory}: {exc.strerror}") from None
    try:
        _lock(fd, directory)
        return fd, _bind(fd, directory, image_id, image_text)
    except BaseException:
        os.close(fd)
        raise


def _lock(fd: int, directory: str) -> None:
    if not flock_within(fd, EXIT_GRACE_SECONDS):
        raise UsageError(f"--upper {directory}: another crfs-merge mount is writing to it; "
                         "unmount that one first")  # fmt: skip


def _bind(fd: int, directory: str, image_id: str, image_text: str) -> bool:
    try:
        bound = os.getxattr(fd, IMAGE_XATTR).decode(errors="replace")
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
        bound = ""
    if bound and bound != image_id:
        raise UsageError(f"--upper {directory}: holds changes to image {bound}, not to {image_text} ({image_id}); "
                         "use another upper directory")  # fmt: skip
    if bound:
        return False
    try:
        os.setxattr(fd, IMAGE_XATTR, image_id.encode())
    except OSError as exc:
        log.warning("--upper %s: cannot record its image (%s); it will not be checked next time",
                    directory, exc.strerror)  # fmt: skip
    return True
