"""The records of two opened images and the answer to "same bytes?" for their files, reading
as few bytes as can be: the same bytes of the same layer (one diff_id, one offset) are equal
unread, as are eStargz files whose chunks have the same digests; only the rest is read, block
by block, and hashed."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Hashable

from unionfs.api.image import READ_BLOCK, FileStat, ImageView
from unionfs.compare.trees import Record, Verdict, hardlink_groups


class ImageSide:
    """One image of a comparison: its records, where each file's bytes are, their digests."""

    def __init__(self, view: ImageView) -> None:
        self.view = view
        self._tree = view.mounted.tree
        source = view.mounted.source
        self._layer_ids = [str(layer.diff_id or layer.digest) for layer in source.layers] if source else []
        self._blob_ids = [str(layer.digest) for layer in source.layers] if source else []
        self._digests: dict[int, str] = {}  # inode -> sha256 of its bytes, for hardlinks read once
        self.hashed_bytes = 0

    def records(self) -> dict[str, Record]:
        """Every path of the merged tree, the root ('') too: its stat, xattrs and hardlink group."""
        stats = {"": self.view.stat("")}
        stats.update((entry.path, entry) for _, dirs, files in self.view.walk() for entry in dirs + files)
        groups = hardlink_groups(stats)
        xattrs = self._tree.xattrs
        return {path: Record(entry, xattrs(entry.ino), groups.get(path, ())) for path, entry in stats.items()}

    def location(self, entry: FileStat) -> Hashable | None:
        """What names the bytes of a regular file across images: its layer's diff_id and its
        offset in that tar, or for a lazily read layer the blob digest and the file's chunks;
        None where the image's layers are not known."""
        stored = self._tree.entry(entry.ino)
        if stored.layer >= len(self._layer_ids):
            return None
        if stored.chunks:
            return ("chunks", self._blob_ids[stored.layer], stored.chunks)
        return ("tar", self._layer_ids[stored.layer], stored.offset)

    def chunk_digests(self, entry: FileStat) -> tuple[tuple[int, int, str], ...] | None:
        """(file offset, size, digest) of each eStargz chunk of a file, if every chunk has a digest."""
        chunks = self._tree.entry(entry.ino).chunks
        if not chunks or not all(chunk.digest for chunk in chunks):
            return None
        return tuple((chunk.file_offset, chunk.size, chunk.digest) for chunk in chunks)

    def digest(self, entry: FileStat) -> str:
        """'sha256:...' of the file's bytes, read block by block (once per inode)."""
        if entry.ino not in self._digests:
            hasher = hashlib.sha256()
            with self.view.open(entry.path) as reader:
                while block := reader.read(READ_BLOCK):
                    hasher.update(block)
                    self.hashed_bytes += len(block)
            self._digests[entry.ino] = "sha256:" + hasher.hexdigest()
        return self._digests[entry.ino]


class ContentJudge:
    """Answers whether a file of the old image and one of the same size in the new image hold
    the same bytes; counts how each answer was found."""

    def __init__(self, old: ImageSide, new: ImageSide) -> None:
        self.old, self.new = old, new
        self.counts: Counter[str] = Counter()

    def __call__(self, a: FileStat, b: FileStat) -> Verdict:
        verdict = self._judge(a, b)
        self.counts[verdict.how] += 1
        return verdict

    def _judge(self, a: FileStat, b: FileStat) -> Verdict:
        if a.size == 0:
            return Verdict(True, "empty")
        where = self.old.location(a)
        if where is not None and where == self.new.location(b):
            return Verdict(True, "location")
        chunks = self.old.chunk_digests(a), self.new.chunk_digests(b)
        if chunks[0] and chunks[1] and [c[:2] for c in chunks[0]] == [c[:2] for c in chunks[1]]:
            return Verdict(chunks[0] == chunks[1], "chunk digests")  # cut alike: the digests decide
        old_digest, new_digest = self.old.digest(a), self.new.digest(b)
        return Verdict(old_digest == new_digest, "sha256", old_digest, new_digest)

    @property
    def hashed_bytes(self) -> int:
        return self.old.hashed_bytes + self.new.hashed_bytes
