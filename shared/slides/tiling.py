"""Plan and read tiles at a physical resolution (micrometres per pixel), never at "a pyramid level".

An encoder is trained at one MPP (say 0.5 um/px, "20x"); a tile that shows a different physical field
of view is a different input, so tiles are defined in micrometres: a tile of ``tile_size`` pixels at
``target_mpp`` covers ``tile_size * target_mpp / mpp0`` level-0 pixels. ``plan_tiles`` picks the
coarsest pyramid level that is still at least as fine as the target (so tiles are only ever shrunk,
never enlarged) and how many pixels to read there; ``read_tile`` reads them and resizes to exactly
``tile_size``. Tiles keep level-0 coordinates throughout, the one frame every stage, the heatmap and
QuPath share.

**Scale tolerance.** Real scanners report 0.2457-0.2527 or 0.499-0.504 um/px, almost never exactly 0.25
or 0.5. When a level (or that level decoded at 1/2, 1/4 or 1/8 size, which the fast reader does in the
JPEG's DCT domain) is within ``MPP_TOLERANCE`` of the target, the grid is cut there at exactly
``tile_size`` pixels of that level, without resampling: a 256 px tile for 0.5 um/px on a 0.499 um/px
scan is 256 stored pixels (0.2% less tissue across than asked) instead of 256.5 read as 257 and resized
to 256, which costs a Lanczos pass per tile, softens every tile and keeps the grid off the stored JPEG
tiles. The grid records the tile's true physical scale (``TileGrid.tile_mpp``), and every stage takes
tile geometry from the plan (``tile_size_level0``), never from ``tile_size * target_mpp / mpp0``. The
rule lives here, in the plan, so that the fast reader and the OpenSlide path cut the same tiles.

The grid starts at (0, 0) with a stride of ``tile_size - overlap`` target pixels. Tiles that run past
the right or bottom edge are kept when they hold enough tissue: OpenSlide returns transparent pixels
there, which ``read_tile`` turns into white, the colour of glass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.reader import SlideRejected
from wsitk.shared.slides.tissue import TissueMask, best_level_for_downsample, composite_on_white

if TYPE_CHECKING:
    import openslide

#: How much finer than the scan a target may be (a 0.5 um/px target on a 0.5034 um/px scan is fine,
#: on a 1.0 um/px "10x" scan it would invent detail the encoder never saw).
MAX_UPSAMPLE = 1.1
#: Relative difference between a level's physical scale and the target under which tiles are cut at the
#: level as stored, without resampling (docs/tiling-and-qc.md, "Scale tolerance"). 2% covers the spread of
#: calibrations scanners report for the same nominal objective (0.2457-0.2527 for 40x, 0.499-0.504 for 20x),
#: so that tiles from any of them are cut as stored, while a scan that really differs is still resampled.
MPP_TOLERANCE = 0.02
#: Power-of-two reductions cut without a resize: libjpeg-turbo decodes at 1/2, 1/4, 1/8 in the DCT domain,
#: and OpenSlide's pixels are shrunk by exactly that factor.
EXACT_SCALES = (1, 2, 4, 8)


@dataclass(frozen=True)
class TileGrid:
    """Which tiles to cut from a slide and how to read them; coordinates are level-0 pixels."""

    target_mpp: float
    tile_size: int  # output tile side in pixels, at target_mpp
    overlap: int  # output pixels shared by neighbouring tiles
    mpp0: float
    level: int  # pyramid level to read from
    level_downsample: float
    tile_size_level0: float  # tile side in level-0 pixels
    stride_level0: float
    read_size: int  # pixels to read at ``level`` per tile side, resized to tile_size
    grid_shape: tuple[int, int]  # (rows, columns) of the full grid, tissue or not
    coords: NDArray[np.int64]  # [N, 2] level-0 (x, y) of each kept tile's top-left, row-major
    grid_positions: NDArray[np.int64]  # [N, 2] (column, row) of each kept tile in the full grid
    tissue_fraction: NDArray[np.float32]  # [N] share of each tile's area that the mask calls tissue
    # True physical scale of the output pixels: target_mpp when resampled, the level's own (times
    # exact_scale) when cut without resampling, e.g. 0.499 for a 0.5 target on a 0.499 um/px scan.
    tile_mpp: float
    # Level pixels per output pixel when tiles are cut without resampling (1; 2, 4, 8: an exact power-of-
    # two shrink, DCT-domain in the fast reader); None when they are resampled to target_mpp.
    exact_scale: int | None = None
    mpp_tolerance: float = MPP_TOLERANCE  # the tolerance this grid was planned with

    @property
    def resampled(self) -> bool:
        """Whether tiles are resized by a factor other than an exact power of two."""
        return self.exact_scale is None

    def __len__(self) -> int:
        return len(self.coords)


def _integral_at(
    summed: NDArray[np.int32], xs: NDArray[np.float64], ys: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Integral of the mask over [0, x) x [0, y) for every (y, x) pair, exact at fractional coordinates.

    ``summed`` is the summed-area table with a zero first row and column; for a piecewise-constant
    mask the integral is bilinear inside each cell, so interpolating the table is exact.
    """
    height, width = summed.shape[0] - 1, summed.shape[1] - 1
    xs = np.clip(xs, 0.0, width)
    ys = np.clip(ys, 0.0, height)
    col = np.minimum(np.floor(xs).astype(np.int64), max(width - 1, 0))
    row = np.minimum(np.floor(ys).astype(np.int64), max(height - 1, 0))
    x_weight = xs - col
    y_weight = ys - row
    by_x = summed[:, col] * (1.0 - x_weight) + summed[:, np.minimum(col + 1, width)] * x_weight
    by_xy = (
        by_x[row, :] * (1.0 - y_weight)[:, None] + by_x[np.minimum(row + 1, height), :] * y_weight[:, None]
    )
    return np.asarray(by_xy, dtype=np.float64)


def tissue_fractions(
    mask: TissueMask, xs: NDArray[np.float64], ys: NDArray[np.float64], side_level0: float
) -> NDArray[np.float64]:
    """Tissue share of every tile of the grid ``ys`` x ``xs`` (level-0 top-left corners, square tiles).

    Area outside the slide counts as non-tissue, so an edge tile is judged on its whole area.
    """
    downsample_x, downsample_y = mask.downsample
    # Pixel counts are exact in int32 (the mask is bounded, ``tissue.MAX_MASK_PIXELS``), at half the
    # memory of float64 and with no second table: the running sums are taken in place.
    summed = np.zeros((mask.mask.shape[0] + 1, mask.mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(mask.mask, axis=0, dtype=np.int32, out=summed[1:, 1:])
    np.cumsum(summed[1:, 1:], axis=1, out=summed[1:, 1:])
    x0, x1 = xs / downsample_x, (xs + side_level0) / downsample_x
    y0, y1 = ys / downsample_y, (ys + side_level0) / downsample_y
    tissue = (
        _integral_at(summed, x1, y1)
        - _integral_at(summed, x0, y1)
        - _integral_at(summed, x1, y0)
        + _integral_at(summed, x0, y0)
    )
    tile_area = (side_level0 / downsample_x) * (side_level0 / downsample_y)
    return np.clip(tissue / tile_area, 0.0, 1.0)


def exact_cut(
    mpp0: float, level_downsamples: list[float], target_mpp: float, tolerance: float = MPP_TOLERANCE
) -> tuple[int, int] | None:
    """(level, scale) at which ``target_mpp`` tiles are cut without resampling, or None.

    First a level whose own scale is within ``tolerance`` (relative) of the target, the closest if
    several; else the level tiles would be read from anyway (the coarsest at least as fine as the
    target) when it is within tolerance after a 1/2, 1/4 or 1/8 reduction (40x to 20x). Never a finer
    level than that one, so the tolerance never makes a tile read more pixels than resampling would.
    """
    ratios = [mpp0 * downsample / target_mpp for downsample in level_downsamples]
    close = [index for index, ratio in enumerate(ratios) if abs(ratio - 1.0) <= tolerance]
    if close:
        return min(close, key=lambda index: abs(ratios[index] - 1.0)), 1
    level = best_level_for_downsample(level_downsamples, target_mpp / mpp0)
    for scale in EXACT_SCALES[1:]:
        if abs(ratios[level] * scale - 1.0) <= tolerance:
            return level, scale
    return None


def plan_tiles(
    width: int,
    height: int,
    mpp0: float,
    mask: TissueMask,
    *,
    target_mpp: float,
    tile_size: int,
    overlap: int = 0,
    min_tissue_fraction: float,
    level_downsamples: list[float],
    mpp_tolerance: float = MPP_TOLERANCE,
) -> TileGrid:
    """Tiles of ``tile_size`` px at ``target_mpp`` whose tissue share is at least ``min_tissue_fraction``.

    Within ``mpp_tolerance`` of a level's scale (see ``exact_cut``) the tiles are that level's pixels
    as stored, at the level's true scale (``TileGrid.tile_mpp``); otherwise they are resampled to
    ``target_mpp``. A tile with no tissue at all is never kept, even with ``min_tissue_fraction=0``. Raises
    ``SlideRejected("resolution-too-low")`` when the slide is scanned coarser than the target allows
    (``MAX_UPSAMPLE``), and ``ValueError`` for arguments that cannot describe a tiling.
    """
    if mpp0 <= 0 or target_mpp <= 0 or tile_size <= 0 or width <= 0 or height <= 0:
        raise ValueError(
            f"need positive sizes and resolutions, got {width}x{height} px, mpp0={mpp0}, "
            f"target_mpp={target_mpp}, tile_size={tile_size}"
        )
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} for tile_size {tile_size}")
    if not level_downsamples:
        raise ValueError("level_downsamples is empty; pass the slide's level_downsamples (level 0 is 1.0)")
    mask_width = mask.mask.shape[1] * mask.downsample[0]
    mask_height = mask.mask.shape[0] * mask.downsample[1]
    if abs(mask_width - width) > 0.01 * width + 1 or abs(mask_height - height) > 0.01 * height + 1:
        raise ValueError(
            f"the tissue mask covers {mask_width:.0f}x{mask_height:.0f} level-0 px but the slide is "
            f"{width}x{height}; segment this slide's tissue before planning its tiles"
        )
    scale = target_mpp / mpp0  # level-0 pixels per output pixel
    if scale * MAX_UPSAMPLE < 1.0:
        raise SlideRejected(
            "resolution-too-low",
            f"the slide is scanned at {mpp0:g} um/px, coarser than the target {target_mpp:g} um/px of this "
            "pipeline profile; rescan it at a higher magnification or use a profile whose target_mpp is "
            f"at least {mpp0:g}.",
        )
    exact = exact_cut(mpp0, level_downsamples, target_mpp, mpp_tolerance)
    if exact is not None:
        level, exact_scale = exact
        level_downsample = float(level_downsamples[level])
        read_size = tile_size * exact_scale  # stored pixels, exactly; coordinates land on level pixels
        tile_size_level0 = read_size * level_downsample
        stride_level0 = (tile_size - overlap) * exact_scale * level_downsample
        tile_mpp = mpp0 * level_downsample * exact_scale
    else:
        level = best_level_for_downsample(level_downsamples, scale)
        level_downsample = float(level_downsamples[level])
        tile_size_level0 = tile_size * scale
        stride_level0 = (tile_size - overlap) * scale
        read_size = max(1, round(tile_size_level0 / level_downsample))
        tile_mpp = target_mpp
    columns = math.ceil(width / stride_level0)
    rows = math.ceil(height / stride_level0)
    xs = np.rint(np.arange(columns) * stride_level0)
    ys = np.rint(np.arange(rows) * stride_level0)
    fractions = tissue_fractions(mask, xs, ys, tile_size_level0)
    keep_rows, keep_columns = np.nonzero((fractions >= min_tissue_fraction) & (fractions > 0))
    return TileGrid(
        target_mpp=target_mpp,
        tile_size=tile_size,
        overlap=overlap,
        mpp0=mpp0,
        level=level,
        level_downsample=level_downsample,
        tile_size_level0=tile_size_level0,
        stride_level0=stride_level0,
        read_size=read_size,
        grid_shape=(rows, columns),
        coords=np.stack([xs[keep_columns], ys[keep_rows]], axis=1).astype(np.int64).reshape(-1, 2),
        grid_positions=np.stack([keep_columns, keep_rows], axis=1).astype(np.int64).reshape(-1, 2),
        tissue_fraction=fractions[keep_rows, keep_columns].astype(np.float32),
        tile_mpp=tile_mpp,
        exact_scale=None if exact is None else exact[1],
        mpp_tolerance=mpp_tolerance,
    )


def read_tile(slide: openslide.OpenSlide, grid: TileGrid, x: int, y: int) -> NDArray[np.uint8]:
    """The tile whose level-0 top-left is (x, y): RGB uint8 [tile_size, tile_size, 3], glass white.

    Reads ``read_size`` pixels at ``grid.level`` (one tile's worth, never a whole level) and shrinks them
    with Lanczos (antialiased) when they are more than ``tile_size`` (resampled grids, and an exact 1/2,
    1/4, 1/8 cut, which the fast reader does in the DCT domain instead).
    """
    from PIL import Image

    region = slide.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size))
    rgb = composite_on_white(np.asarray(region))
    if grid.read_size != grid.tile_size:
        resized = Image.fromarray(rgb).resize((grid.tile_size, grid.tile_size), Image.Resampling.LANCZOS)
        rgb = np.asarray(resized)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _inside_pixels(
    tile_side: int, grid: TileGrid, x: int, y: int, slide_size: tuple[int, int]
) -> tuple[int, int]:
    """How many output columns and rows of the tile at (x, y) lie on the slide."""
    width, height = slide_size
    scale = tile_side / grid.tile_size_level0  # output pixels per level-0 pixel
    return math.floor((width - x) * scale), math.floor((height - y) * scale)


def tile_inside_slide(grid: TileGrid, x: int, y: int, slide_size: tuple[int, int]) -> bool:
    """Whether the tile at (x, y) lies wholly on the slide (``fill_outside_slide`` leaves it as read)."""
    inside_x, inside_y = _inside_pixels(grid.tile_size, grid, x, y, slide_size)
    return inside_x >= grid.tile_size and inside_y >= grid.tile_size


def fill_outside_slide(
    tile: NDArray[np.uint8],
    grid: TileGrid,
    x: int,
    y: int,
    slide_size: tuple[int, int],
    white: tuple[float, float, float],
) -> NDArray[np.uint8]:
    """The tile with the part past the slide's right or bottom edge painted the slide's glass colour.

    Readers return white (255) past the edge, which is neither glass nor tissue; painted as glass, an edge
    tile is measured like any other tile at the edge of tissue instead of as over-exposed.
    """
    inside_x, inside_y = _inside_pixels(tile.shape[1], grid, x, y, slide_size)
    if inside_x >= tile.shape[1] and inside_y >= tile.shape[0]:
        return tile
    painted = tile.copy()
    colour = np.asarray(np.rint(white), dtype=np.uint8)
    painted[:, max(inside_x, 0) :] = colour
    painted[max(inside_y, 0) :, :] = colour
    return painted


def iter_tiles(
    slide: openslide.OpenSlide, grid: TileGrid, indices: Iterable[int] | None = None
) -> Iterator[tuple[int, NDArray[np.uint8]]]:
    """Yield (tile index, tile) for ``indices`` into ``grid.coords`` (all tiles when None), one at a time."""
    for index in range(len(grid)) if indices is None else indices:
        x, y = grid.coords[index]
        yield int(index), read_tile(slide, grid, int(x), int(y))
