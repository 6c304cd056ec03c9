"""The fast tile path: decode the slide's own JPEG tiles with libjpeg-turbo, skipping OpenSlide's per-tile cost.

Why: OpenSlide's ``read_region`` composes every request through a tile cache, cairo and premultiplied
ARGB, which on synthetic 20x tiles costs several times the JPEG decode itself (DESIGN.md section 6).
For the formats whose pyramid levels are plain tiled TIFF directories of baseline JPEG (Aperio SVS
and generic tiled TIFF), this module reads the compressed tiles an output tile covers straight from
the file and decodes them with libjpeg-turbo:

* **Stitch and crop.** An output tile rarely lines up with the stored grid (Aperio stores 240 px
  tiles, a 0.5 um/px tile of 256 px covers 512 px of a 40x level), so every stored tile it touches is
  decoded once (a small byte-bounded LRU cache keeps neighbours' shared tiles) and the box is cut out.
* **DCT-domain scaling.** For 20x from a 40x level, libjpeg-turbo decodes at 1/2 (or 1/4, 1/8) size
  inside the inverse DCT, which is cheaper than a full decode and makes the resize unnecessary.
  imagecodecs' ``jpeg8_decode`` (2026.3) exposes no scaling, so scaled decodes go through simplejpeg
  (``min_factor``, libjpeg-turbo's ``scale_num/scale_denom``; its wheels bundle libjpeg-turbo). It gives
  the same pixels as Pillow's ``draft`` mode, which was used before, in half the time (about 200 us
  instead of 400 us per 240 px tile here: Pillow parses every header in Python and copies the result).
* **Shared JPEG tables.** Aperio writes quantisation and Huffman tables once per level (TIFF tag
  JPEGTables, 347) and abbreviated streams per tile: the tables are passed to the decoder (or spliced
  in front of the stream for Pillow).
* **RGB-coded tiles.** A TIFF whose photometric interpretation is RGB (2) holds JPEG data coded in RGB,
  not YCbCr, usually without a marker that says so; libjpeg would apply the YCbCr transform and tint
  every pixel. The decoder is told the colour space (an Adobe APP14 marker with transform 0 is
  inserted for Pillow), as OpenSlide does.
* **Pass-through.** Where an output tile is exactly one stored tile (no resampling, the tile size equal
  to the stored tile's, on its origin, wholly inside the level), :meth:`FastTileReader.passthrough_jpeg`
  gives the stored compressed bytes as a standalone JPEG (tables and the RGB marker spliced in) so that
  the tiler writes them into its shard without decoding and re-encoding; any JPEG decoder gives the
  pixels ``read_tile`` would.

Everything else (JPEG 2000 Aperio 33003/33005, LZW/deflate TIFF, NDPI, MRXS, BIF with its overlapping
tiles, DICOM, planar or 16-bit data) gets ``None`` from :func:`open_fast_reader` with the reason, and the
tiler uses OpenSlide. Memory is bounded whatever the slide size: the reader holds the tile offset tables
(16 bytes per stored tile), one output tile and at most ``cache_bytes`` of decoded stored tiles.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from wsitk.shared.slides.tiling import TileGrid

#: OpenSlide vendors whose levels are exactly the tiled TIFF directories, in file order.
FAST_VENDORS = ("aperio", "generic-tiff")
#: DCT-domain scale denominators libjpeg-turbo implements cheaply (it has others; these divide tiles).
DCT_SCALES = (8, 4, 2, 1)
#: How much a DCT-scaled read of a resampled grid may fall short of the tile size and still be used (then
#: enlarged by at most this much). Grids within ``tiling.MPP_TOLERANCE`` of a level are cut at an exact
#: DCT scale instead (a 0.2527 um/px scan decodes 256 px at 1/2 for a 0.5 um/px tile, no resize).
MAX_SCALED_SHORTFALL = 0.02
DEFAULT_CACHE_BYTES = 48 * 1024 * 1024

_TIFF_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
_ADOBE_RGB_MARKER = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

ImageArray = NDArray[np.uint8]


@dataclass(frozen=True)
class JpegLevel:
    """One pyramid level stored as tiled baseline JPEG, with where each tile's bytes are."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    offsets: NDArray[np.int64]  # per stored tile, row-major
    byte_counts: NDArray[np.int64]
    tables: bytes | None  # JPEGTables (SOI, DQT, DHT, EOI) shared by the level's tiles, if any
    rgb_coded: bool  # JPEG data coded in RGB (TIFF photometric RGB), not YCbCr

    def scales(self) -> tuple[int, ...]:
        """The DCT scale denominators that split this level's tiles into whole pixels."""
        return tuple(s for s in DCT_SCALES if self.tile_width % s == 0 and self.tile_height % s == 0)


def _tiff_tag(page: object, code: int) -> object:
    tag = page.tags.get(code)  # type: ignore[attr-defined]
    return None if tag is None else tag.value


def _jpeg_level(page: object) -> tuple[JpegLevel | None, str]:
    """A tifffile page as a ``JpegLevel``, or None and why the fast path cannot read it."""
    p = page  # tifffile.TiffPage; untyped library
    if not p.is_tiled:  # type: ignore[attr-defined]
        return None, "the level is not tiled"
    compression = int(p.compression)  # type: ignore[attr-defined]
    if compression != _TIFF_JPEG:
        return None, f"its tiles use TIFF compression {compression}, not baseline JPEG (7)"
    photometric = int(p.photometric)  # type: ignore[attr-defined]
    if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return None, f"photometric interpretation {photometric} is neither RGB nor YCbCr"
    if p.samplesperpixel != 3 or p.bitspersample != 8 or int(p.planarconfig) != 1:  # type: ignore[attr-defined]
        return None, "the level is not 8-bit interleaved RGB"
    if getattr(p, "imagedepth", 1) not in (0, 1):
        return None, "the level is a volume (tile depth > 1)"
    height, width = int(p.imagelength), int(p.imagewidth)  # type: ignore[attr-defined]
    tile_height, tile_width = int(p.tilelength), int(p.tilewidth)  # type: ignore[attr-defined]
    tables = _tiff_tag(p, 347)
    return (
        JpegLevel(
            width=width,
            height=height,
            tile_width=tile_width,
            tile_height=tile_height,
            tiles_across=math.ceil(width / tile_width),
            offsets=np.asarray(p.dataoffsets, dtype=np.int64),  # type: ignore[attr-defined]
            byte_counts=np.asarray(p.databytecounts, dtype=np.int64),  # type: ignore[attr-defined]
            tables=bytes(tables) if isinstance(tables, bytes | bytearray) and tables else None,
            rgb_coded=photometric == _PHOTOMETRIC_RGB,
        ),
        "",
    )


def _splice_tables(data: bytes, tables: bytes | None, rgb_coded: bool) -> bytes:
    """A complete JPEG stream from an abbreviated one: tables first, Adobe RGB marker when RGB-coded."""
    if not data.startswith(b"\xff\xd8"):
        return data
    head = b"\xff\xd8"
    if rgb_coded:
        head += _ADOBE_RGB_MARKER
    body = data[2:]
    if rgb_coded and body.startswith(b"\xff\xe0"):  # a JFIF marker would force YCbCr: drop it
        body = body[2 + int.from_bytes(body[2:4], "big") :]
    if tables and tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9"):
        head += tables[2:-2]
    return head + body


def decode_jpeg_tile(data: bytes, tables: bytes | None, *, rgb_coded: bool, scale: int = 1) -> ImageArray:
    """Decode one stored tile to RGB uint8, at 1/``scale`` size through libjpeg-turbo's DCT scaling."""
    if scale == 1:
        from imagecodecs import jpeg8_decode

        image = np.asarray(
            jpeg8_decode(data, tables=tables, colorspace="RGB" if rgb_coded else None, outcolorspace="RGB")
        )
    else:
        import simplejpeg

        stream = _splice_tables(data, tables, rgb_coded)
        height, width = simplejpeg.decode_jpeg_header(stream)[:2]
        # libjpeg warnings (such as extraneous bytes before a marker) do not fail the tile; errors do.
        image = simplejpeg.decode_jpeg(
            stream,
            "RGB",
            min_height=height // scale,
            min_width=width // scale,
            min_factor=scale,
            strict=False,
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3]


class FastTileReader:
    """Reads regions of an Aperio or generic tiled TIFF from its JPEG tiles; see the module docstring.

    Not thread-safe (one cache per reader); open one per worker. Use as a context manager, or ``close``.
    """

    def __init__(self, path: Path, levels: Sequence[JpegLevel | None], *, cache_bytes: int) -> None:
        self.path = Path(path)
        self.levels = list(levels)
        self.cache_bytes = cache_bytes
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], ImageArray] = OrderedDict()
        self._cached_bytes = 0
        self.stored_tiles_decoded = 0

    def __enter__(self) -> FastTileReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()
        self._cached_bytes = 0

    def supports(self, grid: TileGrid) -> bool:
        """Whether ``grid``'s level is stored as tiled JPEG (else read this grid through OpenSlide)."""
        return 0 <= grid.level < len(self.levels) and self.levels[grid.level] is not None

    def scale_for(self, grid: TileGrid) -> int:
        """The DCT scale to decode ``grid``'s level at: the grid's own exact scale when it was cut without
        resampling, else the largest whose decode still covers the tile (within ``MAX_SCALED_SHORTFALL``)."""
        level = self.levels[grid.level]
        if level is None:
            raise ValueError(f"level {grid.level} of {self.path.name} is not stored as tiled JPEG")
        if grid.exact_scale is not None and grid.exact_scale in level.scales():
            return grid.exact_scale
        for scale in level.scales():
            if grid.read_size / scale >= grid.tile_size * (1.0 - MAX_SCALED_SHORTFALL):
                return scale
        return 1

    def stored_tile_bytes(self, level_index: int, column: int, row: int) -> bytes:
        """The compressed bytes of one stored tile, exactly as in the file."""
        level = self.levels[level_index]
        assert level is not None
        index = row * level.tiles_across + column
        return os.pread(self._fd, int(level.byte_counts[index]), int(level.offsets[index]))

    def passthrough_jpeg(self, grid: TileGrid, x: int, y: int) -> bytes | None:
        """The tile at level-0 (``x``, ``y``) as the stored tile's own compressed bytes, made a standalone
        JPEG, when the output tile is exactly one stored tile; else None (decode it with ``read_tile``).

        Exactly: cut without resampling at scale 1, ``tile_size`` equal to the stored tile's width and
        height, the tile's origin on a stored tile's, the stored tile wholly inside the level (edge tiles
        are padded in the file) and present (not sparse).
        """
        if grid.exact_scale != 1 or not self.supports(grid):
            return None
        level = self.levels[grid.level]
        assert level is not None
        if not grid.tile_size == level.tile_width == level.tile_height:
            return None
        level_x, level_y = round(x / grid.level_downsample), round(y / grid.level_downsample)
        if level_x % level.tile_width or level_y % level.tile_height:
            return None
        column, row = level_x // level.tile_width, level_y // level.tile_height
        if level_x + level.tile_width > level.width or level_y + level.tile_height > level.height:
            return None
        if level.byte_counts[row * level.tiles_across + column] == 0:
            return None
        return _splice_tables(self.stored_tile_bytes(grid.level, column, row), level.tables, level.rgb_coded)

    def _decoded(self, level_index: int, column: int, row: int, scale: int) -> ImageArray | None:
        key = (level_index, column, row) if scale == 1 else (level_index * 16 + scale, column, row)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        level = self.levels[level_index]
        assert level is not None
        if level.byte_counts[row * level.tiles_across + column] == 0:  # sparse: never scanned
            return None
        tile = decode_jpeg_tile(
            self.stored_tile_bytes(level_index, column, row),
            level.tables,
            rgb_coded=level.rgb_coded,
            scale=scale,
        )
        self.stored_tiles_decoded += 1
        self._cache[key] = tile
        self._cached_bytes += tile.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        return tile

    def read_region(
        self, level_index: int, x: int, y: int, width: int, height: int, *, scale: int = 1
    ) -> ImageArray:
        """RGB of the box (``x``, ``y``, ``width``, ``height``) in pixels of the level decoded at
        1/``scale``, i.e. pixels of the scaled level; white where the box runs past the level."""
        level = self.levels[level_index]
        if level is None:
            raise ValueError(f"level {level_index} of {self.path.name} is not stored as tiled JPEG")
        if scale not in level.scales():
            raise ValueError(f"scale 1/{scale} does not divide the {level.tile_width} px tiles of this level")
        tile_w, tile_h = level.tile_width // scale, level.tile_height // scale
        valid_w, valid_h = math.ceil(level.width / scale), math.ceil(level.height / scale)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, valid_w), min(y + height, valid_h)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), 255, dtype=np.uint8)
        pieces = []
        covered = (x0, y0, x1, y1) == (x, y, x + width, y + height)  # no part past the level
        for row in range(y0 // tile_h, (y1 - 1) // tile_h + 1):
            for column in range(x0 // tile_w, (x1 - 1) // tile_w + 1):
                tile = self._decoded(level_index, column, row, scale)
                if tile is None or tile.shape[0] < tile_h or tile.shape[1] < tile_w:
                    covered = False  # a sparse (never scanned) or short tile leaves white
                if tile is not None:
                    pieces.append((column * tile_w, row * tile_h, tile))
        # Every pixel is written when the box is inside the level and its tiles are whole: skip the fill.
        out = (
            np.empty((height, width, 3), np.uint8) if covered else np.full((height, width, 3), 255, np.uint8)
        )
        for left, top, tile in pieces:
            ix0, ix1 = max(x0, left), min(x1, left + tile_w, left + tile.shape[1])
            iy0, iy1 = max(y0, top), min(y1, top + tile_h, top + tile.shape[0])
            if ix1 > ix0 and iy1 > iy0:
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[
                    iy0 - top : iy1 - top, ix0 - left : ix1 - left
                ]
        return out

    def read_tile(self, grid: TileGrid, x: int, y: int) -> ImageArray:
        """The tile of ``grid`` whose level-0 top-left is (``x``, ``y``): like ``tiling.read_tile``."""
        scale = self.scale_for(grid)
        level_x = x / grid.level_downsample
        level_y = y / grid.level_downsample
        size = max(1, round(grid.read_size / scale))
        rgb = self.read_region(
            grid.level, round(level_x / scale), round(level_y / scale), size, size, scale=scale
        )
        if size != grid.tile_size:
            from PIL import Image

            resized = Image.fromarray(rgb).resize((grid.tile_size, grid.tile_size), Image.Resampling.LANCZOS)
            rgb = np.asarray(resized)
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def iter_tiles(
        self, grid: TileGrid, indices: Iterable[int] | None = None
    ) -> Iterator[tuple[int, ImageArray]]:
        for index in range(len(grid)) if indices is None else indices:
            x, y = grid.coords[index]
            yield int(index), self.read_tile(grid, int(x), int(y))


def open_fast_reader(
    path: Path,
    vendor: str,
    level_dimensions: Sequence[tuple[int, int]],
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> tuple[FastTileReader | None, str]:
    """A fast reader for the slide at ``path`` as OpenSlide sees it (``vendor``, its level sizes), or
    ``(None, why not)`` when the tiler must use OpenSlide. Levels the fast path cannot decode are None
    inside a returned reader (``FastTileReader.supports`` says so per grid)."""
    import tifffile

    if vendor not in FAST_VENDORS:
        return None, f"vendor {vendor!r} is not one whose levels are plain tiled TIFF directories"
    try:
        with tifffile.TiffFile(path) as tiff:
            levels: list[JpegLevel | None] = []
            reasons = []
            tiled: list[Any] = [page for page in tiff.pages if getattr(page, "is_tiled", False)]
            for index, (width, height) in enumerate(level_dimensions):
                matches = [p for p in tiled if (int(p.imagewidth), int(p.imagelength)) == (width, height)]
                if not matches:
                    levels.append(None)
                    reasons.append(f"level {index}: no tiled directory of {width}x{height}")
                    continue
                level, why = _jpeg_level(matches[0])
                levels.append(level)
                if level is None:
                    reasons.append(f"level {index}: {why}")
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as error:
        return None, f"tifffile cannot index its tiles ({error})"
    if all(level is None for level in levels):
        return None, "; ".join(reasons) or "no level is stored as tiled JPEG"
    return FastTileReader(Path(path), levels, cache_bytes=cache_bytes), "; ".join(reasons)
