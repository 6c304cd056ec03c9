"""Find tissue on a slide's thumbnail, so the tiler cuts tiles only where there is something to see.

Method (DESIGN.md section 6), on a thumbnail of about ``thumb_mpp`` um/px (8 by default, 16 at most
for typical slides; bounded to ``max_mask_side`` px per side whatever the slide size):

1. **Pen ink** is found first and excluded everywhere (``ink_mask``). Rule, in HSV on the thumbnail:
   blue ink is hue 190-240 deg with saturation >= 0.45; green ink is hue 75-190 deg with saturation
   >= 0.25; black ink is any pixel whose brightest channel is below 0.25. H&E has no green, its
   hematoxylin blue-violet sits at hue ~245-300 and, averaged with eosin at thumbnail scale, well below
   saturation 0.45; so the rule removes marker strokes but not stained tissue. Ink is dilated by
   ``ink_margin_px`` to take the stroke's anti-aliased halo with it.
2. **Saturation threshold**: Otsu on the HSV saturation of the non-ink pixels, clipped to
   ``[min_saturation, max_saturation_threshold]``. The lower bound is the guard for an empty slide:
   on bare glass the saturation histogram is a single noise peak and Otsu would split the noise; with
   the floor, noise never passes. The upper bound stops Otsu from splitting pale from dark tissue
   when tissue dominates the thumbnail.
3. **Not near-white**: pixels whose darkest channel is at least ``white_level`` are background even if
   slightly coloured (a yellowish glass, JPEG chroma noise).
4. **Morphology**: closing (joins fragments), filling holes smaller than ``max_hole_area_mm2`` (nuclei
   and small gaps; large holes such as fat or lumen stay background), ink removed again (holes filled
   over a stroke inside tissue are ink, not tissue), opening (removes specks and thin slivers), and
   regions smaller than ``min_region_area_mm2`` dropped (dust, debris).

The mask is exported as GeoJSON polygons in level-0 pixel coordinates that QuPath opens as "Tissue"
annotations (``mask_to_geojson``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import openslide

BoolArray = NDArray[np.bool_]
ImageArray = NDArray[np.uint8]

_LEVEL_TOLERANCE = 1.01
_TISSUE_COLOUR = [0, 160, 80]


@dataclass(frozen=True)
class TissueMask:
    """A slide's tissue mask and what maps it back to level-0 pixels and to physical area."""

    mask: BoolArray  # [mask_height, mask_width], True = tissue
    downsample: tuple[float, float]  # level-0 pixels per mask pixel, (x, y)
    mpp0: float  # level-0 um/px the mask was computed for
    area_mm2: float
    polygons: dict[str, Any]  # GeoJSON FeatureCollection, level-0 pixel coordinates
    saturation_threshold: float  # the clipped Otsu threshold used (0.0 when nothing could be tissue)
    ink_fraction: float  # share of thumbnail pixels classed as pen ink
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
    if bool((alpha == 255).all()):
        return np.ascontiguousarray(rgb)
    weight = alpha.astype(np.float32)[..., None] / 255.0
    blended = rgb.astype(np.float32) * weight + 255.0 * (1.0 - weight)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


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
    slide: openslide.OpenSlide, *, width: int, height: int, chunk_px: int = 2048
) -> tuple[ImageArray, int]:
    """The whole slide as an RGB image of ``width`` x ``height``, read block by block.

    ``get_thumbnail`` reads a whole level at once, which for a slide without a coarse level is the
    full-resolution image; here at most about ``chunk_px``^2 level pixels are held at a time. Returns
    the image and the pyramid level it was read from.
    """
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
    for out_y0 in range(0, height, block):
        out_y1 = min(out_y0 + block, height)
        src_y0, src_y1, box_top, box_bottom = _source_span(out_y0, out_y1, per_mask_y, level_height)
        for out_x0 in range(0, width, block):
            out_x1 = min(out_x0 + block, width)
            src_x0, src_x1, box_left, box_right = _source_span(out_x0, out_x1, per_mask_x, level_width)
            region = slide.read_region(
                (round(src_x0 * level_downsample), round(src_y0 * level_downsample)),
                level,
                (src_x1 - src_x0, src_y1 - src_y0),
            )
            rgb = Image.fromarray(composite_on_white(np.asarray(region)))
            resized = rgb.resize(
                (out_x1 - out_x0, out_y1 - out_y0),
                Image.Resampling.BOX,
                box=(box_left, box_top, box_right, box_bottom),
            )
            thumbnail[out_y0:out_y1, out_x0:out_x1] = np.asarray(resized)
    return thumbnail, level


def _hsv(rgb: ImageArray) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Hue in degrees [0, 360), saturation and value in [0, 1]."""
    values = rgb.astype(np.float32) / 255.0
    red, green, blue = values[..., 0], values[..., 1], values[..., 2]
    brightest = values.max(axis=-1)
    darkest = values.min(axis=-1)
    spread = brightest - darkest
    safe_spread = np.where(spread > 0, spread, 1.0)
    hue = np.where(
        brightest == red,
        ((green - blue) / safe_spread) % 6.0,
        np.where(brightest == green, (blue - red) / safe_spread + 2.0, (red - green) / safe_spread + 4.0),
    )
    hue = np.where(spread > 0, hue * 60.0, 0.0).astype(np.float32)
    saturation = np.where(brightest > 0, spread / np.where(brightest > 0, brightest, 1.0), 0.0)
    return hue, saturation.astype(np.float32), brightest


def ink_mask(rgb: ImageArray, *, black_value: float = 0.25, black_max_saturation: float = 1.0) -> BoolArray:
    """Pixels of blue, green or black marker pen (the rule is in the module docstring).

    ``black_value`` is the brightness below which a pixel counts as black ink: 0.25 on a thumbnail,
    where nuclei are averaged away; tile QC at full resolution uses a lower one, and a saturation
    ceiling that keeps brown debris and folds (saturated) apart from black ink (near neutral).
    """
    hue, saturation, value = _hsv(rgb)
    blue = (hue >= 190.0) & (hue <= 240.0) & (saturation >= 0.45)
    green = (hue >= 75.0) & (hue < 190.0) & (saturation >= 0.25)
    black = (value < black_value) & (saturation <= black_max_saturation)
    return np.asarray(blue | green | black, dtype=bool)


def otsu_threshold(values: NDArray[np.float32], *, bins: int = 256) -> float:
    """Otsu's threshold for values in [0, 1] (between-class variance maximised over a histogram)."""
    if values.size == 0:
        return 0.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    cumulative_mass = np.cumsum(counts * centres)
    mean_low = cumulative_mass / np.maximum(weight_low, 1.0)
    mean_high = (cumulative_mass[-1] - cumulative_mass) / np.maximum(weight_high, 1.0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


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
    sizes = np.bincount(labels.ravel())
    small = sizes < max_pixels
    small[0] = False
    return np.asarray(small[labels], dtype=bool)


def tissue_mask_from_rgb(
    rgb: ImageArray,
    *,
    pixel_area_mm2: float,
    min_region_area_mm2: float = 0.05,
    max_hole_area_mm2: float = 0.25,
    min_saturation: float = 0.05,
    max_saturation_threshold: float = 0.20,
    white_level: int = 220,
    ink_margin_px: int = 2,
    closing_iterations: int = 2,
    opening_iterations: int = 1,
    faint_ratio: float = 0.5,
) -> tuple[BoolArray, float, float]:
    """Tissue mask of a thumbnail; returns (mask, saturation threshold, ink fraction).

    ``pixel_area_mm2`` is the physical area of one thumbnail pixel, so that the area limits mean the
    same on every slide whatever its resolution. Steps and rules are in the module docstring.
    """
    from scipy import ndimage

    _, saturation, _ = _hsv(rgb)
    ink = ink_mask(rgb)
    ink_fraction = float(ink.mean()) if ink.size else 0.0
    near_white = rgb.min(axis=-1) >= white_level
    candidates = ~ink & ~near_white
    if not bool((saturation[candidates] >= min_saturation).any()):
        return np.zeros(rgb.shape[:2], dtype=bool), 0.0, ink_fraction
    threshold = otsu_threshold(saturation[~ink])
    threshold = min(max(threshold, min_saturation), max_saturation_threshold)
    tissue = candidates & (saturation >= threshold)
    if faint_ratio > 0:
        # Pale tissue (weak staining) sits well below a threshold that strong tissue set: accept regions
        # above a lower threshold too, if they are solid (opening) and large enough to be tissue.
        low = max(min_saturation, faint_ratio * threshold)
        faint = _padded_morphology(candidates & (saturation >= low) & ~tissue, "open", 1)
        labels, count = ndimage.label(faint)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            touching = np.unique(labels[ndimage.binary_dilation(tissue, iterations=2) & faint])
            keep = sizes >= min_region_area_mm2 / pixel_area_mm2  # hysteresis: large on its own,
            keep[touching] = True  # or continuing strong tissue
            keep[0] = False
            tissue |= keep[labels]
    tissue = _padded_morphology(tissue, "close", closing_iterations)
    holes = ndimage.binary_fill_holes(tissue) & ~tissue
    tissue |= _small_components(holes, max_hole_area_mm2 / pixel_area_mm2)
    if ink_margin_px > 0 and bool(ink.any()):
        ink = ndimage.binary_dilation(ink, structure=np.ones((3, 3), dtype=bool), iterations=ink_margin_px)
    tissue &= ~ink
    tissue = _padded_morphology(tissue, "open", opening_iterations)
    tissue &= ~_small_components(tissue, min_region_area_mm2 / pixel_area_mm2)
    return np.asarray(tissue, dtype=bool), float(threshold), ink_fraction


def segment_tissue(
    slide: openslide.OpenSlide,
    *,
    mpp0: float,
    thumb_mpp: float = 8.0,
    min_region_area_mm2: float = 0.05,
    max_hole_area_mm2: float = 0.25,
    max_mask_side: int = 4096,
    chunk_px: int = 2048,
) -> TissueMask:
    """Segment the tissue of an open slide whose level-0 resolution is ``mpp0`` um/px.

    The thumbnail is read at about ``thumb_mpp`` um/px (coarser when that would exceed
    ``max_mask_side`` pixels per side), block by block, so memory stays bounded for any slide size.
    """
    if mpp0 <= 0 or thumb_mpp <= 0:
        raise ValueError(f"mpp0 and thumb_mpp must be positive, got mpp0={mpp0}, thumb_mpp={thumb_mpp}")
    base_width, base_height = slide.dimensions
    downsample = max(thumb_mpp / mpp0, max(base_width, base_height) / max_mask_side, 1.0)
    mask_width = max(1, round(base_width / downsample))
    mask_height = max(1, round(base_height / downsample))
    thumbnail, _ = read_thumbnail(slide, width=mask_width, height=mask_height, chunk_px=chunk_px)
    downsample_x = base_width / mask_width
    downsample_y = base_height / mask_height
    pixel_area_mm2 = downsample_x * downsample_y * mpp0 * mpp0 / 1e6
    mask, threshold, ink_fraction = tissue_mask_from_rgb(
        thumbnail,
        pixel_area_mm2=pixel_area_mm2,
        min_region_area_mm2=min_region_area_mm2,
        max_hole_area_mm2=max_hole_area_mm2,
    )
    return TissueMask(
        mask=mask,
        downsample=(downsample_x, downsample_y),
        mpp0=mpp0,
        area_mm2=float(mask.sum()) * pixel_area_mm2,
        polygons=mask_to_geojson(mask, (downsample_x, downsample_y), pixel_area_mm2=pixel_area_mm2),
        saturation_threshold=threshold,
        ink_fraction=ink_fraction,
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
    labels, _ = ndimage.label(clean)
    region_sizes = np.bincount(labels.ravel())
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
