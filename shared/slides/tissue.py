"""Find tissue on a slide's thumbnail, so the tiler cuts tiles only where there is something to see.

Tissue is defined once, in ``shared/slides/optical.py``: optical density against the slide's own glass
(its white point, estimated from the thumbnail), with marker ink of every common colour told apart by the
ratios of its channel densities. Tile QC (the quality-filter service) uses the same definition, so a
tile the tiler planned as tissue is measured with the same yardstick downstream.

Method, on a thumbnail of about ``thumb_mpp`` um/px (4 by default, finer for small slides so that the
thumbnail has at least ``min_mask_side`` px on its long side; bounded to ``max_mask_side`` px per side
and ``MAX_MASK_PIXELS`` in all whatever the slide size), read block by block, and classified band by
band (``BAND_ROWS``), so segmentation needs the same memory on a 100,000 px slide as on a 30,000 px one:

1. **Background**: the slide's white point and glass noise (``estimate_background``), from the scanned
   pixels only (outside the scanned area OpenSlide returns transparent pixels, which are not glass).
2. **Ink** of every colour (``optical.ink_mask``), opened (an isolated ink-coloured pixel is dense stain)
   and dilated by ``INK_MARGIN_UM`` to take the stroke's anti-aliased edge and the ink thinned over
   tissue with it, is excluded everywhere.
3. **Strong tissue**: density at least the slide's tissue threshold (``Background.tissue_threshold``:
   0.06 OD, or four glass-noise standard deviations on a noisy scan).
4. **Faint tissue** (hysteresis): regions above ``faint_ratio`` x that threshold are added when they
   touch strong tissue and are no larger than ``faint_max_ratio`` x the strong tissue they touch. Being
   measured against the slide's own glass, glass never reaches the lower threshold however tinted it is;
   the size bound stops a gradient of the illumination from growing into the background regardless.
5. **Morphology**: closing (joins fragments), filling holes smaller than ``max_hole_area_mm2`` (nuclei
   and small gaps; large holes such as fat or lumen stay background), ink removed again, opening
   (removes specks and thin slivers), and regions smaller than ``min_region_area_mm2`` dropped.

The mask is exported as GeoJSON polygons in level-0 pixel coordinates that QuPath opens as "Tissue"
annotations (``mask_to_geojson``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.optical import (
    Background,
    estimate_background,
    ink_continuation,
    ink_mask,
    optical_density,
    tissue_density,
)

if TYPE_CHECKING:
    import openslide

BoolArray = NDArray[np.bool_]
ImageArray = NDArray[np.uint8]

_LEVEL_TOLERANCE = 1.01
_TISSUE_COLOUR = [0, 160, 80]
#: The thumbnail that segmentation works on holds at most this many pixels (2048 x 2048): what it needs
#: in memory is bounded by this, whatever the slide's size (a 16 x 16 mm area at 4 um/px, or a
#: 50 x 50 mm one at 24 um/px, still about 4.6 px across a 0.5 um/px, 224 px tile).
MAX_MASK_PIXELS = 1 << 22
#: Level pixels per side of one region read for the thumbnail. Each read holds the region as RGBA twice
#: (OpenSlide's buffer and its array) and as RGB once: about 12 MiB at 1024 px, four times that at 2048.
#: The thumbnail does not depend on it (regions are resized with their exact boxes).
THUMBNAIL_CHUNK_PX = 1024
#: How far around detected ink the mask also leaves out (micrometres).
INK_MARGIN_UM = 12.0


@dataclass(frozen=True)
class TissueMask:
    """A slide's tissue mask and what maps it back to level-0 pixels and to physical area."""

    mask: BoolArray  # [mask_height, mask_width], True = tissue
    downsample: tuple[float, float]  # level-0 pixels per mask pixel, (x, y)
    mpp0: float  # level-0 um/px the mask was computed for
    area_mm2: float
    polygons: dict[str, Any]  # GeoJSON FeatureCollection, level-0 pixel coordinates
    density_threshold: float  # the optical density from which a pixel was tissue (0.0: nothing could be)
    ink_fraction: float  # share of thumbnail pixels classed as pen ink
    background: Background = field(default_factory=lambda: Background((242.0, 242.0, 242.0)))
    thumbnail: ImageArray | None = field(default=None, repr=False, compare=False)  # RGB, the mask's grid

    @property
    def mask_mpp(self) -> tuple[float, float]:
        return (self.downsample[0] * self.mpp0, self.downsample[1] * self.mpp0)

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())


def composite_on_white(rgba: NDArray[np.uint8]) -> ImageArray:
    """RGB from OpenSlide's RGBA: transparent (outside the scanned area, past the edge) becomes white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    partial = alpha != 255
    if not bool(partial.any()):
        return np.ascontiguousarray(rgb)
    # Only the pixels that are not fully opaque are blended (in float): an opaque pixel is its own RGB,
    # and a region read at the scan's edge is mostly opaque, so no float copy of the whole region is made.
    out = np.array(rgb, dtype=np.uint8, order="C")
    weight = alpha[partial].astype(np.float32)[:, None] / 255.0
    blended = out[partial].astype(np.float32) * weight + 255.0 * (1.0 - weight)
    out[partial] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def best_level_for_downsample(level_downsamples: list[float], downsample: float) -> int:
    """The coarsest pyramid level that is still at least as fine as ``downsample`` (level-0 px per px).

    So that every later resize only ever shrinks; a 1% tolerance accepts levels such as 4.016 for 4.
    """
    candidates = [
        index for index, value in enumerate(level_downsamples) if value <= downsample * _LEVEL_TOLERANCE
    ]
    return max(candidates, key=lambda index: level_downsamples[index]) if candidates else 0


def _source_span(
    out_start: int, out_stop: int, per_output: float, limit: int
) -> tuple[int, int, float, float]:
    """Level pixels to read for output pixels [out_start, out_stop), and the exact box inside them.

    Clamped to the level: its size is rounded down from level 0's, so the last output pixel may
    reach a fraction of a pixel past it.
    """
    first = min(out_start * per_output, limit - 1e-3)
    last = min(max(out_stop * per_output, first + 1e-3), limit)
    source_start = math.floor(first)
    source_stop = min(max(math.ceil(last), source_start + 1), limit)
    return source_start, source_stop, first - source_start, last - source_start


def read_thumbnail(
    slide: openslide.OpenSlide, *, width: int, height: int, chunk_px: int = THUMBNAIL_CHUNK_PX
) -> tuple[ImageArray, int]:
    """The whole slide as an RGB image of ``width`` x ``height``, read block by block.

    ``get_thumbnail`` reads a whole level at once, which for a slide without a coarse level is the
    full-resolution image; here at most about ``chunk_px``^2 level pixels are held at a time. Returns
    the image and the pyramid level it was read from. Unscanned (transparent) pixels come back white.
    """
    thumbnail, _, level = read_thumbnail_with_coverage(slide, width=width, height=height, chunk_px=chunk_px)
    return thumbnail, level


def read_thumbnail_with_coverage(
    slide: openslide.OpenSlide, *, width: int, height: int, chunk_px: int = THUMBNAIL_CHUNK_PX
) -> tuple[ImageArray, BoolArray, int]:
    """``read_thumbnail`` plus which thumbnail pixels were scanned (at least half opaque)."""
    from PIL import Image

    base_width, base_height = slide.dimensions
    scale_x = base_width / width
    scale_y = base_height / height
    level = best_level_for_downsample(list(slide.level_downsamples), min(scale_x, scale_y))
    level_downsample = float(slide.level_downsamples[level])
    level_width, level_height = slide.level_dimensions[level]
    per_mask_x = scale_x / level_downsample  # level pixels per output pixel
    per_mask_y = scale_y / level_downsample
    block = max(8, int(chunk_px // max(per_mask_x, per_mask_y, 1.0)))
    thumbnail = np.empty((height, width, 3), dtype=np.uint8)
    scanned = np.ones((height, width), dtype=bool)
    for out_y0 in range(0, height, block):
        out_y1 = min(out_y0 + block, height)
        src_y0, src_y1, box_top, box_bottom = _source_span(out_y0, out_y1, per_mask_y, level_height)
        for out_x0 in range(0, width, block):
            out_x1 = min(out_x0 + block, width)
            src_x0, src_x1, box_left, box_right = _source_span(out_x0, out_x1, per_mask_x, level_width)
            region = np.asarray(
                slide.read_region(
                    (round(src_x0 * level_downsample), round(src_y0 * level_downsample)),
                    level,
                    (src_x1 - src_x0, src_y1 - src_y0),
                )
            )
            size = (out_x1 - out_x0, out_y1 - out_y0)
            box = (box_left, box_top, box_right, box_bottom)
            rgb = Image.fromarray(composite_on_white(region))
            resized = rgb.resize(size, Image.Resampling.BOX, box=box)
            thumbnail[out_y0:out_y1, out_x0:out_x1] = np.asarray(resized)
            alpha = region[..., 3]
            if not bool((alpha == 255).all()):
                opaque = Image.fromarray(np.ascontiguousarray(alpha)).resize(
                    size, Image.Resampling.BOX, box=box
                )
                scanned[out_y0:out_y1, out_x0:out_x1] = np.asarray(opaque) >= 128
    return thumbnail, scanned, level


def _padded_morphology(mask: BoolArray, operation: str, iterations: int) -> BoolArray:
    """Binary closing/opening without the image border eroding tissue that touches it."""
    from scipy import ndimage

    if iterations <= 0:
        return mask
    structure = np.ones((3, 3), dtype=bool)
    padded = np.pad(mask, iterations + 1, mode="edge")
    function = ndimage.binary_closing if operation == "close" else ndimage.binary_opening
    result = function(padded, structure=structure, iterations=iterations)
    crop = iterations + 1
    return np.asarray(result[crop:-crop, crop:-crop], dtype=bool)


def _small_components(mask: BoolArray, max_pixels: float) -> BoolArray:
    """Connected components (8-connected) of ``mask`` with fewer than ``max_pixels`` pixels."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask)
    sizes = _label_sizes(labels, count)
    small = sizes < max_pixels
    small[0] = False
    return np.asarray(small[labels], dtype=bool)


#: Rows of a label image counted at a time by ``_label_sizes``.
LABEL_BAND_ROWS = 256


def _label_sizes(labels: NDArray[np.int32], count: int) -> NDArray[np.int64]:
    """Pixels per label 0..count, counted band by band: ``np.bincount`` of the whole image would first
    copy the int32 labels to int64, twice the label image again (32 MiB on a 2048 x 2048 mask)."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    for start in range(0, labels.shape[0], LABEL_BAND_ROWS):
        sizes += np.bincount(labels[start : start + LABEL_BAND_ROWS].ravel(), minlength=count + 1)
    return sizes


def _connected_to(candidates: BoolArray, seeds: BoolArray) -> BoolArray:
    """The 8-connected regions of ``candidates`` that touch ``seeds``."""
    from scipy import ndimage

    labels, count = ndimage.label(candidates | seeds, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(seeds)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[seeds])] = True
    keep[0] = False
    return np.asarray(keep[labels], dtype=bool)


def _faint_regions(strong: BoolArray, faint: BoolArray, *, max_ratio: float, min_pixels: float) -> BoolArray:
    """Faint regions that continue strong tissue and are no larger than ``max_ratio`` x what they touch.

    Each faint region (8-connected) is compared with the total area of the strong regions it touches
    (within two pixels); faint regions touching nothing are not tissue.
    """
    from scipy import ndimage

    eight = np.ones((3, 3), dtype=bool)
    if not bool(faint.any()):
        return np.zeros_like(strong)
    # The strong regions first (their labels freed once dilated), then the faint ones: two label images
    # at a time rather than three.
    strong_labels, strong_count = ndimage.label(strong, structure=eight)
    if strong_count == 0:
        return np.zeros_like(strong)
    strong_sizes = _label_sizes(strong_labels, strong_count).astype(np.float64)
    reach = ndimage.grey_dilation(strong_labels, size=(5, 5))  # the strong label within two pixels
    del strong_labels
    faint_labels, faint_count = ndimage.label(faint, structure=eight)
    overlap = (faint_labels > 0) & (reach > 0)
    pairs = np.unique(np.stack([faint_labels[overlap], reach[overlap]]), axis=1)
    touched_area = np.zeros(faint_count + 1, dtype=np.float64)
    np.add.at(touched_area, pairs[0], strong_sizes[pairs[1]])
    faint_sizes = _label_sizes(faint_labels, faint_count).astype(np.float64)
    keep = (touched_area > 0) & (faint_sizes <= max_ratio * np.maximum(touched_area, min_pixels))
    keep[0] = False
    return np.asarray(keep[faint_labels], dtype=bool)


#: Thumbnail rows classified at a time: the per-channel densities of a band are the only float arrays,
#: so memory does not grow with the thumbnail beyond its boolean masks.
BAND_ROWS = 256
#: The background is estimated on at most about this many thumbnail pixels (an even, strided sample).
MAX_BACKGROUND_PIXELS = 1 << 21


def background_of(rgb: ImageArray, valid: BoolArray | None = None) -> Background:
    """``estimate_background`` on the thumbnail, or on an even strided sample of it when it is large.

    The glass mode and the stain's hue are statistics of millions of pixels; a sample of two million
    gives the same values, and keeps the estimate's float arrays bounded on the largest slides.
    """
    step = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / MAX_BACKGROUND_PIXELS)))
    if step == 1:
        return estimate_background(rgb, valid)
    return estimate_background(rgb[::step, ::step], None if valid is None else valid[::step, ::step])


def _pixel_classes(
    rgb: ImageArray, background: Background, threshold: float, low: float
) -> tuple[BoolArray, BoolArray, BoolArray, BoolArray]:
    """Per pixel, band by band: (density >= threshold, density >= low, ink, possible ink continuation)."""
    height, width = rgb.shape[:2]
    strong = np.zeros((height, width), dtype=bool)
    weak = np.zeros((height, width), dtype=bool)
    ink = np.zeros((height, width), dtype=bool)
    continuation = np.zeros((height, width), dtype=bool)
    for top in range(0, height, BAND_ROWS):
        rows = slice(top, min(top + BAND_ROWS, height))
        per_channel = optical_density(rgb[rows], background)
        density = tissue_density(per_channel)
        strong[rows] = density >= threshold
        weak[rows] = density >= low
        ink[rows] = ink_mask(per_channel, background.red_ink_blue_ratio)
        continuation[rows] = ink_continuation(per_channel)
    return strong, weak, ink, continuation


def tissue_mask_from_rgb(
    rgb: ImageArray,
    *,
    pixel_area_mm2: float,
    background: Background | None = None,
    scanned: BoolArray | None = None,
    min_region_area_mm2: float = 0.05,
    max_hole_area_mm2: float = 0.25,
    ink_margin_px: int | None = None,
    closing_iterations: int = 2,
    opening_iterations: int = 1,
    faint_ratio: float = 0.25,
    faint_max_ratio: float = 1.0,
) -> tuple[BoolArray, float, float]:
    """Tissue mask of a thumbnail; returns (mask, density threshold, ink fraction).

    ``pixel_area_mm2`` is the physical area of one thumbnail pixel, so that the area limits mean the
    same on every slide whatever its resolution; ``background`` is estimated from the thumbnail when not
    given; ``scanned`` marks pixels inside the scanned area. Steps and rules are in the module docstring.
    """
    from scipy import ndimage

    valid = np.ones(rgb.shape[:2], dtype=bool) if scanned is None else np.asarray(scanned, dtype=bool)
    background = background or background_of(rgb, valid)
    threshold = background.tissue_threshold
    low = max(faint_ratio * threshold, 3.0 * background.noise_od) if faint_ratio > 0 else threshold
    strong, weak, ink, continuation = _pixel_classes(rgb, background, threshold, low)
    ink &= valid
    ink = _padded_morphology(ink, "open", 1)  # single ink-coloured pixels are dense stain, not strokes
    if bool(ink.any()):  # ink thinned over tissue, connected to a stroke, is ink too
        ink |= _connected_to(continuation & valid, ink)
    del continuation
    ink_fraction = float(ink.mean()) if ink.size else 0.0
    min_region_px = min_region_area_mm2 / pixel_area_mm2
    tissue = valid & ~ink & strong
    if not bool(tissue.any()):
        return np.zeros(rgb.shape[:2], dtype=bool), 0.0, ink_fraction
    if faint_ratio > 0:
        faint = _padded_morphology(valid & ~ink & ~tissue & weak, "open", 1)
        tissue |= _faint_regions(tissue, faint, max_ratio=faint_max_ratio, min_pixels=min_region_px)
    tissue = _padded_morphology(tissue, "close", closing_iterations)
    holes = ndimage.binary_fill_holes(tissue) & ~tissue
    tissue |= _small_components(holes, max_hole_area_mm2 / pixel_area_mm2)
    if ink_margin_px is None:  # about INK_MARGIN_UM: a stroke's anti-aliased edge, or ink thinned over tissue
        ink_margin_px = max(1, round(INK_MARGIN_UM / (1000.0 * math.sqrt(pixel_area_mm2))))
    if ink_margin_px > 0 and bool(ink.any()):
        ink = ndimage.binary_dilation(ink, structure=np.ones((3, 3), dtype=bool), iterations=ink_margin_px)
    tissue &= ~ink & valid
    tissue = _padded_morphology(tissue, "open", opening_iterations)
    tissue &= ~_small_components(tissue, min_region_px)
    return np.asarray(tissue, dtype=bool), float(threshold), ink_fraction


def segment_tissue(
    slide: openslide.OpenSlide,
    *,
    mpp0: float,
    thumb_mpp: float = 4.0,
    min_region_area_mm2: float = 0.05,
    max_hole_area_mm2: float = 0.25,
    min_mask_side: int = 256,
    max_mask_side: int = 4096,
    max_mask_pixels: int = MAX_MASK_PIXELS,
    chunk_px: int = THUMBNAIL_CHUNK_PX,
) -> TissueMask:
    """Segment the tissue of an open slide whose level-0 resolution is ``mpp0`` um/px.

    The thumbnail is read at about ``thumb_mpp`` um/px (finer when the slide is small, so that its long
    side has ``min_mask_side`` px, never finer than level 0; coarser when it would exceed
    ``max_mask_side`` pixels per side or ``max_mask_pixels`` in all), block by block, so memory stays
    bounded for any slide size: segmentation of the largest slides costs what it costs on a slide of
    about 16 x 16 mm at 4 um/px.
    """
    if mpp0 <= 0 or thumb_mpp <= 0:
        raise ValueError(f"mpp0 and thumb_mpp must be positive, got mpp0={mpp0}, thumb_mpp={thumb_mpp}")
    base_width, base_height = slide.dimensions
    long_side = max(base_width, base_height)
    downsample = min(thumb_mpp / mpp0, long_side / min_mask_side)
    budget = math.sqrt(base_width * base_height / max_mask_pixels)  # the pixel budget's downsample
    downsample = max(downsample, long_side / max_mask_side, budget, 1.0)
    mask_width = max(1, round(base_width / downsample))
    mask_height = max(1, round(base_height / downsample))
    thumbnail, scanned, _ = read_thumbnail_with_coverage(
        slide, width=mask_width, height=mask_height, chunk_px=chunk_px
    )
    downsample_x = base_width / mask_width
    downsample_y = base_height / mask_height
    pixel_area_mm2 = downsample_x * downsample_y * mpp0 * mpp0 / 1e6
    background = background_of(thumbnail, scanned)
    mask, threshold, ink_fraction = tissue_mask_from_rgb(
        thumbnail,
        pixel_area_mm2=pixel_area_mm2,
        background=background,
        scanned=scanned,
        min_region_area_mm2=min_region_area_mm2,
        max_hole_area_mm2=max_hole_area_mm2,
    )
    return TissueMask(
        mask=mask,
        downsample=(downsample_x, downsample_y),
        mpp0=mpp0,
        area_mm2=float(mask.sum()) * pixel_area_mm2,
        polygons=mask_to_geojson(mask, (downsample_x, downsample_y), pixel_area_mm2=pixel_area_mm2),
        density_threshold=threshold,
        ink_fraction=ink_fraction,
        background=background,
        thumbnail=thumbnail,
    )


def _remove_pinches(mask: BoolArray) -> BoolArray:
    """Fill one pixel of every 2x2 diagonal pattern, so that every traced ring is simple.

    Two pixels touching only at a corner would make a ring touch itself, which GeoJSON readers
    (shapely, QuPath's JTS) call invalid. Filling adds at most a pixel per such corner.
    """
    result = mask.copy()
    while True:
        top_left, top_right = result[:-1, :-1], result[:-1, 1:]
        bottom_left, bottom_right = result[1:, :-1], result[1:, 1:]
        falling = top_left & bottom_right & ~top_right & ~bottom_left
        rising = top_right & bottom_left & ~top_left & ~bottom_right
        if not (falling.any() or rising.any()):
            return result
        result[:-1, 1:] |= falling
        result[:-1, :-1] |= rising


def _boundary_edges(mask: BoolArray) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Directed pixel-edge boundary segments (start, end as (x, y) vertices) and their pixel index.

    Each edge is oriented with the tissue pixel on its right-hand side on screen (y down), which makes
    outer rings positive in the shoelace formula and holes negative.
    """
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    starts, ends, pixels = [], [], []
    # (neighbour offset, start vertex offset, end vertex offset) per side of a pixel at (row, col).
    sides = (
        ((-1, 0), (0, 0), (1, 0)),  # top: left to right
        ((1, 0), (1, 1), (0, 1)),  # bottom: right to left
        ((0, -1), (0, 1), (0, 0)),  # left: bottom to top
        ((0, 1), (1, 0), (1, 1)),  # right: top to bottom
    )
    height, width = mask.shape
    for (d_row, d_col), (sx, sy), (ex, ey) in sides:
        neighbour = padded[1 + d_row : 1 + d_row + height, 1 + d_col : 1 + d_col + width]
        rows, cols = np.nonzero(inner & ~neighbour)
        starts.append(np.stack([cols + sx, rows + sy], axis=1))
        ends.append(np.stack([cols + ex, rows + ey], axis=1))
        pixels.append(rows * width + cols)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(pixels)


def _trace_rings(mask: BoolArray) -> list[tuple[NDArray[np.int64], int]]:
    """Closed rings (vertices without the closing repeat, collinear points removed) with a pixel index."""
    starts, ends, pixels = _boundary_edges(mask)
    if len(starts) == 0:
        return []
    stride = mask.shape[1] + 1
    start_keys = starts[:, 1] * stride + starts[:, 0]
    end_keys = ends[:, 1] * stride + ends[:, 0]
    order = np.argsort(start_keys, kind="stable")
    next_edge = order[np.searchsorted(start_keys[order], end_keys)]
    visited = np.zeros(len(starts), dtype=bool)
    rings = []
    for first in range(len(starts)):
        if visited[first]:
            continue
        chain = []
        edge = first
        while not visited[edge]:
            visited[edge] = True
            chain.append(edge)
            edge = int(next_edge[edge])
        indices = np.asarray(chain)
        directions = ends[indices] - starts[indices]
        turns = np.any(directions != np.roll(directions, 1, axis=0), axis=1)
        rings.append((starts[indices[turns]], int(pixels[first])))
    return rings


def _signed_area(vertices: NDArray[np.float64]) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0


def mask_to_geojson(
    mask: BoolArray, downsample: tuple[float, float], *, pixel_area_mm2: float | None = None
) -> dict[str, Any]:
    """Tissue regions as a GeoJSON FeatureCollection of Polygons in level-0 pixel coordinates.

    One Feature per connected region, outer ring first (counter-clockwise in the numbers, as RFC 7946
    asks), then its holes; rings closed; properties as QuPath expects for an annotation classified
    "Tissue". The outline follows pixel edges of the mask (a staircase at mask resolution).
    """
    from scipy import ndimage

    clean = _remove_pinches(mask)
    labels, count = ndimage.label(clean)
    region_sizes = _label_sizes(labels, count)
    rings_by_region: dict[int, list[tuple[float, list[list[float]]]]] = {}
    for vertices, pixel in _trace_rings(clean):
        scaled = vertices.astype(np.float64) * np.asarray(downsample, dtype=np.float64)
        area = _signed_area(scaled)
        coordinates = [[round(float(x), 2), round(float(y), 2)] for x, y in scaled]
        coordinates.append(coordinates[0])
        region = int(labels.ravel()[pixel])
        rings_by_region.setdefault(region, []).append((area, coordinates))
    features = []
    for region in sorted(rings_by_region):
        rings = sorted(rings_by_region[region], key=lambda ring: -ring[0])  # the outer ring is the largest
        properties: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": "Tissue", "color": _TISSUE_COLOUR},
            "isLocked": False,
        }
        if pixel_area_mm2 is not None:
            properties["area_mm2"] = round(int(region_sizes[region]) * pixel_area_mm2, 6)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring for _, ring in rings]},
                "properties": properties,
            }
        )
    return {"type": "FeatureCollection", "features": features}
