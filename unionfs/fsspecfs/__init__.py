"""fsspec's `crfs` protocol: a container image's merged tree as a read-only file system.

Registered through the `fsspec.specs` entry point (setup.cfg), so that with crfs-merge and
fsspec installed (`pip install crfs-merge[fsspec]`) no import is needed:

    import fsspec
    fs = fsspec.filesystem("crfs", image="oci:/srv/layout:tag")
    print(fs.cat("etc/os-release").decode())
    fsspec.open("crfs://localhost:5000/app:1!/srv/data.csv", "rt")

Importing this package imports fsspec; unionfs.api, under it, does not need fsspec.
"""

from unionfs.fsspecfs.filesystem import CrfsFileSystem

__all__ = ["CrfsFileSystem"]
