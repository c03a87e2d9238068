"""Fetching the TOC of a zstd:chunked layer (the chunks are read by unionfs/estargz/lazy.py's
LazyLayer, given this format's chunk decoder)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from registry.cache_files import write_atomically
from registry.deferred_client import BlobReader
from registry.digest import Digest
from registry.errors import ImageError, LayerFormatError
from registry.source import Layer
from unionfs.estargz.toc import LayerToc
from unionfs.storage.sealed import DamagedCacheFile, drop_damaged, seal, unseal
from unionfs.zstdchunked.toc import (
    FOOTER_SIZES,
    SKIPPABLE_HEADER,
    TocPosition,
    check_footer,
    decompress_toc,
    footer_follows_toc,
    parse_toc,
    toc_payload,
    toc_position,
)

log = logging.getLogger("crfs-merge")
TOC_FORMAT = 1  # CACHE/toc/zstd-chunked/v1/ALGO-HEX.toc: the compressed TOC, sealed


def cached_toc_path(layer: Layer, toc_dir: Path) -> Path:
    return toc_dir / "zstd-chunked" / f"v{TOC_FORMAT}" / f"{layer.key}.toc"


async def fetch_toc(client: BlobReader, layer: Layer, number: int, toc_dir: Path) -> LayerToc | None:
    """Returns the layer's TOC if its annotations say it is zstd:chunked, else None (it is
    then read whole).

    The TOC frame and the footer come in one closed-range request when the footer follows
    the TOC (older writers), else in two at once. A TOC that does not hash to the
    annotation's checksum, or a footer that disagrees with it, is an error: the layer is not
    what its manifest says. An earlier mount's copy in `toc_dir` is checked the same way."""
    position = toc_position(layer)
    if position is None or layer.digest is None:
        return None
    what = f"TOC of zstd:chunked layer {layer.digest}"
    cached = cached_toc_path(layer, toc_dir)
    compressed = _load_cached(cached, layer, position, what)
    if compressed is None:
        compressed = await _fetch_compressed_toc(client, layer.digest, layer.window.size, position)
        Digest.parse(position.checksum).check_bytes(compressed, f"{what} (manifest-checksum annotation)")
        _save(cached, layer, compressed)
    try:
        return parse_toc(decompress_toc(compressed, position), number, position)
    except LayerFormatError as exc:
        raise LayerFormatError(f"{what}: {exc}") from None


async def _fetch_compressed_toc(client: BlobReader, blob: Digest, size: int, position: TocPosition) -> bytes:
    if footer_follows_toc(position, size):
        both = await client.read_range(blob, position.frame_start, size - 1)
        check_footer(both, position)
        return toc_payload(both[: position.end - position.frame_start], position)
    tail = SKIPPABLE_HEADER + max(FOOTER_SIZES)
    frame, footer = await asyncio.gather(client.read_range(blob, position.frame_start, position.end - 1),
                                         client.read_range(blob, max(0, size - tail), size - 1))  # fmt: skip
    check_footer(footer, position)
    return toc_payload(frame, position)


def _load_cached(path: Path, layer: Layer, position: TocPosition, what: str) -> bytes | None:
    """Returns the compressed TOC an earlier mount saved, if whole and still matching the
    annotation; a damaged one is removed, with a warning, and fetched again."""
    try:
        compressed = bytes(unseal(layer.key, path.read_bytes()))
        return Digest.parse(position.checksum).check_bytes(compressed, what)
    except FileNotFoundError:
        return None
    except (OSError, DamagedCacheFile, ImageError) as exc:
        drop_damaged(path, exc, "fetching the TOC again", log.warning)
        return None


def _save(path: Path, layer: Layer, compressed: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, seal(layer.key, compressed), f"the TOC of layer {layer.digest}")
    except OSError as exc:  # a full or read-only cache costs the next mount a request or two
        log.warning("cannot save the TOC of layer %s to %s: %s", layer.digest, path, exc.strerror)
