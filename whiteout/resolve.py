"""Follow the symlinks of a path inside the image root, as containerd extracts a layer.

containerd's applyNaive resolves the parent of each tar entry with continuity's
fs.RootPath (fs/path.go): every symlink on the way is followed, an absolute target starts
again at the image root, and '..' never climbs above the root; a component that does not
exist yet counts as a directory to be. Past 255 links it fails ("too many links").

This is that algorithm step for step, looped where walkLinks recurses, so that even its
corners agree: a relative target is joined to the directory that holds the link and
cleaned lexically ('x/../y' in a target skips x, link or not), except for a link in the
first component, whose raw target is walked again component by component.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable

MAX_SYMLINKS = 255
"""fs.RootPath gives up once more than this many links have been followed for one path."""

LinkTarget = Callable[[str], "str | None"]
"""Returns the target of the symlink at a clean relative path, or None if that is no symlink."""


class TooManySymlinks(ValueError):
    """A path crosses more than MAX_SYMLINKS links: a loop, in practice."""


def resolve_in_root(path: str, link_target: LinkTarget) -> tuple[str, int]:
    """Returns (clean relative path with every symlink in it followed, links followed).

    Each component of `path`, the last one included, is followed if `link_target` says it
    is a symlink: to resolve only a parent, resolve the parent and join the name. Raises
    TooManySymlinks past MAX_SYMLINKS links.
    """
    walker = _Walker(link_target)
    while path:  # RootPath: walk until a walk follows no link and the path is rooted
        before = walker.followed
        path = walker.walk_links(path)
        if walker.followed == before:
            rooted = _join("/", path)
            if rooted == path:
                break
            path = rooted
    return path.lstrip("/"), walker.followed


class _Walker:
    def __init__(self, link_target: LinkTarget) -> None:
        self.link_target = link_target
        self.followed = 0

    def walk_links(self, path: str) -> str:
        """walkLinks: each component in turn, joined to what the ones before resolved to."""
        parts = [part for part in path.split("/") if part]
        if not parts:
            return "/"
        if path.startswith("/"):
            resolved = "/"
        else:
            resolved, _ = self.walk_link(parts.pop(0))  # a link's target comes back raw
        for part in parts:
            target, is_link = self.walk_link(_join(resolved, part))
            resolved = _join(resolved, target) if is_link and not target.startswith("/") else target
        return resolved

    def walk_link(self, path: str) -> tuple[str, bool]:
        """walkLink: (the link's target as written, True), or (the path rooted, False)."""
        if self.followed > MAX_SYMLINKS:
            raise TooManySymlinks(path)
        path = _join("/", path)
        target = self.link_target(path[1:]) if path != "/" else None
        if target is None:
            return path, False
        self.followed += 1
        return target, True


def _join(*elements: str) -> str:
    """Go's filepath.Join: empty elements dropped, the rest joined with '/' and cleaned."""
    kept = [element for element in elements if element]
    return _clean("/".join(kept)) if kept else ""


def _clean(path: str) -> str:
    """Go's filepath.Clean; posixpath.normpath alone keeps a leading '//'."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned
