"""crfs-merge's Python API: an image's merged tree, read without a mount.

    from unionfs.api import open_image

    with open_image("oci:/path/layout:tag") as image:
        print(image.read("etc/os-release").decode())
        for directory, subdirectories, files in image.walk("usr/share"):
            ...

The fsspec file system (protocol `crfs`) is built on it: unionfs/fsspecfs/.
"""

from unionfs.api.image import FileStat, ImageView, open_image

__all__ = ["FileStat", "ImageView", "open_image"]
