"""Normalise tar member names into paths relative to the image root."""

from __future__ import annotations


def clean_path(name: str) -> str | None:
    """Returns `name` as a clean relative path ('' is the root), or None if it escapes the root.

    Leading '/' and './' are dropped (as tar does without --absolute-names), empty and '.'
    components vanish, and '..' is resolved lexically. A '..' that would climb above the root
    makes the whole name invalid: the caller skips the entry with a warning.
    """
    split = name.split("/")
    if "" not in split and "." not in split and ".." not in split:
        return name  # already clean, as nearly every name is: no loop, and no new string
    parts: list[str] = []
    for part in split:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def parent_and_name(path: str) -> tuple[str, str]:
    """Returns (parent, basename) of a clean path; the root's parent is ''."""
    parent, _, name = path.rpartition("/")
    return parent, name
