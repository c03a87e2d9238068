"""The `crfs` URL: which image, which path inside it. Pure string logic, no fsspec.

    crfs://IMAGE!/PATH      the image in the URL, jar-style: everything before the first '!/'
    crfs://PATH             the image given apart, as the storage option `image=`

IMAGE is any text that `crfs-merge` mounts (`oci:/srv/layout:tag`, `docker-archive:f.tar`,
`localhost:5000/repo:tag`, `docker://...`). A registry reference cannot hold '!'; a layout's
own path may, but then a later '!/' would be as ambiguous, so the first one separates.
"""

from __future__ import annotations

PROTOCOL = "crfs"
SEPARATOR = "!/"


def without_protocol(url: str) -> str:
    """`url` less a leading 'crfs://' or 'crfs::'."""
    for prefix in (f"{PROTOCOL}://", f"{PROTOCOL}::"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def split_url(url: str) -> tuple[str | None, str]:
    """(image or None, clean path inside the image) of a crfs URL or of a bare path.

    The path is relative to the image root, as fsspec's archive file systems name entries:
    no leading or trailing '/', no empty or '.' parts ('' is the root)."""
    rest = without_protocol(url)
    image: str | None = None
    if SEPARATOR in rest:
        image, rest = rest.split(SEPARATOR, 1)
    return image or None, clean_path(rest)


def clean_path(path: str) -> str:
    """'/etc//os-release/' -> 'etc/os-release'. '..' stays: the image resolves it (at the root it stops)."""
    return "/".join(part for part in path.split("/") if part and part != ".")


def make_url(image: str, path: str) -> str:
    """The URL that names `path` of `image`: split_url's inverse."""
    return f"{PROTOCOL}://{image}{SEPARATOR}{clean_path(path)}"
