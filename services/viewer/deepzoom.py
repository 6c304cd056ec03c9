"""Deep-zoom (DZI) tiles cut from the slide file itself with OpenSlide, for OpenSeadragon.

The pyramid is the DZI one (level ``max_level`` is level 0 of the slide, each level below halves it;
tiles of ``TILE_SIZE`` pixels with ``OVERLAP`` pixels shared with each neighbour, as OpenSlide's own
``DeepZoomGenerator`` cuts them, so the two serve the same tiles). Each tile is read from the slide
level whose downsample is the largest not above the tile's, then resized; colour is converted to sRGB
through the slide's ICC profile when it has one; areas outside the scanned region are white.

Bounded everywhere: slide files come through the evicting local cache (``shared/cache.py``), at most
``open_slides`` slides are open (least recently used closed first) and at most ``cached_tiles``
encoded tiles are kept in memory (LRU). Associated images (label, macro, thumbnail) are never read.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
BACKGROUND = (255, 255, 255)


class TileOutOfRange(ValueError):
    """A level, column or row outside the slide's pyramid (the message says the valid range)."""


@dataclass(frozen=True)
class Pyramid:
    width: int
    height: int

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.max_level - level)
        return max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))

    def grid(self, level: int) -> tuple[int, int]:
        width, height = self.level_size(level)
        return math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)

    def check(self, level: int, col: int, row: int) -> None:
        if not 0 <= level <= self.max_level:
            raise TileOutOfRange(f"level {level} is outside 0..{self.max_level}")
        cols, rows = self.grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileOutOfRange(f"tile {col}_{row} is outside the {cols} x {rows} tiles of level {level}")

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the tile in the pixels of ``level``, overlap included."""
        self.check(level, col, row)
        width, height = self.level_size(level)
        x = col * TILE_SIZE - (OVERLAP if col > 0 else 0)
        y = row * TILE_SIZE - (OVERLAP if row > 0 else 0)
        x_end = min(width, (col + 1) * TILE_SIZE + OVERLAP)
        y_end = min(height, (row + 1) * TILE_SIZE + OVERLAP)
        return x, y, x_end - x, y_end - y

    def dzi(self) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
            f'Overlap="{OVERLAP}" TileSize="{TILE_SIZE}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )


class OpenSlideTiles:
    """One open slide: DZI geometry, the sRGB transform of its ICC profile, tiles as JPEG bytes."""

    def __init__(self, path: Path) -> None:
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        width, height = self._slide.dimensions
        self.pyramid = Pyramid(int(width), int(height))
        self._transform = _srgb_transform(self._slide)
        self.has_icc_profile = self._transform is not None

    def region(self, x0: int, y0: int, size0: int, out_px: int) -> bytes:
        """A square of ``size0`` level-0 pixels at (x0, y0), as a JPEG of ``out_px`` pixels."""
        downsample = max(1.0, size0 / out_px)
        level = self._slide.get_best_level_for_downsample(downsample)
        level_downsample = self._slide.level_downsamples[level]
        read = max(1, round(size0 / level_downsample))
        image = self._slide.read_region((x0, y0), level, (read, read))
        return self._encode(image, (out_px, out_px))

    def tile(self, level: int, col: int, row: int) -> bytes:
        x, y, width, height = self.pyramid.tile_box(level, col, row)
        scale = 2 ** (self.pyramid.max_level - level)
        slide_level = self._slide.get_best_level_for_downsample(scale)
        level_downsample = self._slide.level_downsamples[slide_level]
        level_width, level_height = self._slide.level_dimensions[slide_level]
        # the region in the slide level's pixels, clipped to the level (edge tiles read no padding)
        left, top = x * scale / level_downsample, y * scale / level_downsample
        read_width = min(math.ceil(width * scale / level_downsample), level_width - math.ceil(left))
        read_height = min(math.ceil(height * scale / level_downsample), level_height - math.ceil(top))
        image = self._slide.read_region(
            (x * scale, y * scale), slide_level, (max(1, read_width), max(1, read_height))
        )
        return self._encode(image, (width, height))

    def _encode(self, rgba: Any, size: tuple[int, int]) -> bytes:
        from PIL import Image

        image = Image.new("RGB", rgba.size, BACKGROUND)
        image.paste(rgba, mask=rgba.getchannel("A"))
        if image.size != size:
            # as DeepZoomGenerator scales (same pixels); on levels a few pixels wide `thumbnail` keeps the
            # aspect ratio and may come out a pixel short of the grid, which the tile must fill
            image.thumbnail(size, Image.Resampling.LANCZOS)
            if image.size != size:
                image = image.resize(size, Image.Resampling.LANCZOS)
        if self._transform is not None:
            from PIL import ImageCms

            image = ImageCms.applyTransform(image, self._transform) or image
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def _srgb_transform(slide: Any) -> Any:
    """An ICC profile -> sRGB transform when the slide carries a profile (OpenSlide 4), else None."""
    profile = getattr(slide, "color_profile", None)
    if profile is None:
        return None
    from PIL import ImageCms

    try:
        return ImageCms.buildTransform(
            profile, ImageCms.createProfile("sRGB"), "RGB", "RGB", ImageCms.Intent.PERCEPTUAL
        )
    except ImageCms.PyCMSError:
        return None


class LruCache:
    """A thread-safe least-recently-used map holding at most ``capacity`` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class TileServer:
    """Open slides (LRU) and encoded tiles (LRU) in front of ``slide_path(slide_id) -> Path``.

    An evicted slide is only dropped from the map: a request still reading it keeps it alive, and
    OpenSlide closes it when the last reference goes.
    """

    def __init__(
        self,
        slide_path: Callable[[str], Path],
        *,
        open_slides: int = 8,
        cached_tiles: int = 4096,
        on_cache: Callable[[bool], None] | None = None,
    ) -> None:
        self._slide_path = slide_path
        self._slides = LruCache(open_slides)
        self._tiles = LruCache(cached_tiles)
        self._opening = threading.Lock()
        self._on_cache = on_cache or (lambda _hit: None)

    def slide(self, slide_id: str) -> OpenSlideTiles:
        found: OpenSlideTiles | None = self._slides.get(slide_id)
        if found is not None:
            return found
        with self._opening:  # one download and open per slide, however many tiles ask at once
            found = self._slides.get(slide_id)
            if found is None:
                found = OpenSlideTiles(self._slide_path(slide_id))
                self._slides.put(slide_id, found)
        return found

    def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        key = (slide_id, level, col, row)
        cached: bytes | None = self._tiles.get(key)
        self._on_cache(cached is not None)
        if cached is not None:
            return cached
        data = self.slide(slide_id).tile(level, col, row)
        self._tiles.put(key, data)
        return data
