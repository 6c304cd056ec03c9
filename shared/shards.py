"""Tile shards: hundreds of JPEG tiles of one slide packed into one object.

Never one object per tile. The layout is deliberately simple so any language can read it::

    b"WSISHRD1" | uint32 little-endian header length | header (UTF-8 JSON) | tile bytes...

The header holds the shard's identity, the tile geometry (``tile_size`` pixels at ``mpp``
micrometres per pixel, ``tile_size_level0`` in level-0 pixels) and, per tile, its level-0
top-left ``x``/``y`` and the ``offset``/``length`` of its JPEG bytes in the payload.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"WSISHRD1"
_HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ShardFormatError(ValueError):
    """The bytes are not a tile shard (truncated, wrong magic, bad header)."""


@dataclass
class ShardTile:
    x: int
    y: int
    data: bytes


def pack_shard(header: dict[str, Any], tiles: Iterable[ShardTile]) -> bytes:
    """Pack tiles (already JPEG-encoded) and a header dict into shard bytes."""
    payload = io.BytesIO()
    entries = []
    for tile in tiles:
        entries.append(
            {"x": int(tile.x), "y": int(tile.y), "offset": payload.tell(), "length": len(tile.data)}
        )
        payload.write(tile.data)
    full = {**header, "format": 1, "encoding": header.get("encoding", "jpeg"), "tiles": entries}
    head = json.dumps(full, separators=(",", ":")).encode()
    return MAGIC + _HEADER_LEN.pack(len(head)) + head + payload.getvalue()


class Shard:
    """A parsed shard; tiles are decoded on demand."""

    def __init__(self, data: bytes) -> None:
        if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
            raise ShardFormatError("not a WSI tile shard (bad magic or truncated header)")
        (head_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + 4
        if head_len > MAX_HEADER_BYTES or start + head_len > len(data):
            raise ShardFormatError(f"shard header length {head_len} is out of range (object truncated?)")
        try:
            self.header: dict[str, Any] = json.loads(data[start : start + head_len])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShardFormatError(f"shard header is not JSON: {exc}") from exc
        self._payload = memoryview(data)[start + head_len :]
        self.tiles: list[dict[str, int]] = self.header.get("tiles", [])
        for entry in self.tiles:
            if entry["offset"] + entry["length"] > len(self._payload):
                raise ShardFormatError("shard payload is shorter than its header says (object truncated?)")

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def coords(self) -> np.ndarray:
        """Level-0 top-left corners, shape [N, 2] (x, y)."""
        return np.array([[t["x"], t["y"]] for t in self.tiles], dtype=np.int64).reshape(-1, 2)

    def tile_bytes(self, index: int) -> bytes:
        entry = self.tiles[index]
        return bytes(self._payload[entry["offset"] : entry["offset"] + entry["length"]])

    def decode(self, index: int) -> np.ndarray:
        """One tile as uint8 [H, W, 3] (libjpeg-turbo through imagecodecs)."""
        from imagecodecs import jpeg8_decode

        image = np.asarray(jpeg8_decode(self.tile_bytes(index)))
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return image[:, :, :3]

    def decode_stack(self, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray | None:
        """Tiles ``indices`` as one uint8 stack [n, H, W, 3], decoded straight into ``out`` when it holds
        at least n tiles of their size (a new array otherwise); None when they are not all RGB of one size
        (then decode them one by one).
        """
        from imagecodecs import jpeg8_decode

        if not indices:
            return None
        first = self.decode(indices[0])
        if out is None or out.shape[1:] != first.shape or len(out) < len(indices) or out.dtype != np.uint8:
            out = np.empty((len(indices), *first.shape), dtype=np.uint8)
        out[0] = first
        for position, index in enumerate(indices[1:], start=1):
            try:
                jpeg8_decode(self.tile_bytes(index), out=out[position])
            except ValueError:  # a grey or differently sized tile: not one stack
                return None
        return out[: len(indices)]

    def iter_decoded(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for index in range(len(self)) if indices is None else indices:
            yield index, self.decode(index)


def encode_jpeg(tile: np.ndarray, quality: int = 90) -> bytes:
    from imagecodecs import jpeg8_encode

    return bytes(jpeg8_encode(np.ascontiguousarray(tile[:, :, :3]), level=quality))


def mask_to_bytes(mask: np.ndarray) -> bytes:
    """Boolean mask -> bytes, bit i little-endian within each byte."""
    return np.packbits(mask.astype(bool), bitorder="little").tobytes()


def mask_from_bytes(data: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=count).astype(bool)
