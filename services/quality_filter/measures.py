"""What quality-filter measures on one tile, and the decision it takes from the measures.

Every colour measure uses the slide's own background (``shared/slides/optical.py``: the tiler estimates
the white point on the thumbnail and records it in each shard's header), so that no rule depends on how
bright the glass of one scanner is. Colour measures are taken on the tile averaged over 2 x 2 blocks
(the decision is about shares of the tile, which averaging does not move), sharpness on the full tile.

Checks, in this order (the first that fails names the reason; counts by reason go to the recorder):

1. ``pen``: share of marker ink of any colour (blue, green, red, black: ``optical.classify_ink``) above
   ``max_pen_fraction``. First, because ink is dense and would otherwise pass as tissue.
2. ``underexposed``: share of pixels that are not ink and pass less than a quarter of the glass's
   luminance (folds, debris, a dark scan; nuclei pass about a third, so dense tumour does not trip it)
   above ``max_dark_fraction``.
3. ``overexposed``: share of pixels brighter than the glass itself in every channel (by more than
   ``OVEREXPOSED_MARGIN`` levels: clipped highlights, lamp flashes, lost detail) above
   ``max_bright_fraction``. On a slide whose glass is already clipped at 255 nothing can be brighter, and
   the check cannot fire.

   When more than one of checks 1-3 fails, the defect covering the largest share of the tile names it.
4. ``fat``: a tile at least ``FAT_MIN_EMPTY_SHARE`` empty whose empty area is split into lumens by thin
   septa (at least ``FAT_MIN_LUMENS`` empty regions of ``FAT_MIN_LUMEN_SHARE`` of the tile or more, none
   larger than ``FAT_MAX_LUMEN_SHARE``): adipose tissue; glass at the edge of tissue is one large region. Policy: fat is tissue, but carries little of what cancer
   models look at, so it is kept out of bags by default and named apart from glass; a profile with
   ``qc_keep_fat`` accepts it (it then skips the tissue minimum and goes on to the blur check).
5. ``background``: tissue share (density at least the slide's tissue threshold, ink excluded) below
   ``min_tissue_fraction``. 0.15 by default: tiles at the edge of tissue with a fair share of it are kept.
6. ``blur``: sharpness below ``min_sharpness``. Sharpness is the ratio of the image's energy at the
   finest scale (4-neighbour Laplacian at full resolution) to its energy one octave coarser (the same on
   the 2 x 2 averaged tile), in tissue. Defocus removes fine detail first, so the ratio falls with blur,
   while smooth stroma and mucin, which have little contrast at any scale, keep the ratio of an in-focus
   image (and pure noise reads as sharp). A tile with too little structure to judge
   (``MIN_STRUCTURE`` energy at the coarser scale) is not called blurred.

A limit of 0 in a profile means "the default" for every limit (``QcThresholds.from_profile``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.optical import (
    DEFAULT_BACKGROUND,
    INK_NAMES,
    Background,
    classify_ink,
    optical_density,
    tissue_density,
)

ImageArray = NDArray[np.uint8]

#: Levels above the glass, in every channel, from which a pixel is over-exposed.
OVEREXPOSED_MARGIN = 6
#: A pixel passing less than this share of the glass's luminance is dark (under-exposed).
DARK_TRANSMISSION = 0.25
FAT_MIN_LUMENS = 3
FAT_MIN_LUMEN_SHARE = 0.01
FAT_MAX_LUMEN_SHARE = 0.5
FAT_MIN_EMPTY_SHARE = 0.6
#: Variance of the coarse-scale Laplacian (0-255 grey) below which a block has almost no structure.
MIN_STRUCTURE = 20.0
#: Sharpness is measured on tiles averaged down to about this resolution (um/px).
SHARPNESS_MPP = 0.5
#: Blur is judged per block of the tile, this many to a side.
BLUR_BLOCKS = 4
#: A featureless block this dense (mean density) is strongly defocused tissue, not smooth stroma or mucin.
FEATURELESS_MIN_OD = 0.1
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class QcThresholds:
    """The QC limits of one profile; defaults where the profile leaves a field at 0 or lacks it."""

    min_tissue_fraction: float = 0.15
    min_sharpness: float = 0.15
    max_pen_fraction: float = 0.05
    max_dark_fraction: float = 0.5
    max_bright_fraction: float = 0.5
    keep_fat: bool = False

    @classmethod
    def from_profile(cls, profile: Any) -> QcThresholds:
        """Limits from a ``PipelineProfile``: a field at 0 (or absent) takes the default, for every limit."""
        defaults = cls()
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name == "keep_fat":
                values["keep_fat"] = bool(getattr(profile, "qc_keep_fat", False))
                continue
            value = float(getattr(profile, f"qc_{spec.name}", 0.0) or 0.0)
            values[spec.name] = value if value > 0 else getattr(defaults, spec.name)
        return cls(**values)


def _halve(image: NDArray[Any]) -> NDArray[np.float32]:
    """2 x 2 block means over the last two image axes of a stack [N, H, W(, C)] (odd edges dropped)."""
    height, width = image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
    view = np.asarray(image[:, :height, :width], dtype=np.float32)
    return (view[:, 0::2, 0::2] + view[:, 1::2, 0::2] + view[:, 0::2, 1::2] + view[:, 1::2, 1::2]) * 0.25


def _laplacian(grey: NDArray[np.float32]) -> NDArray[np.float32]:
    """4-neighbour Laplacian of each image of a stack [N, H, W], zero on the one-pixel border."""
    lap = np.zeros_like(grey)
    lap[:, 1:-1, 1:-1] = (
        grey[:, :-2, 1:-1]
        + grey[:, 2:, 1:-1]
        + grey[:, 1:-1, :-2]
        + grey[:, 1:-1, 2:]
        - 4.0 * grey[:, 1:-1, 1:-1]
    )
    return lap


def _blocks(image: NDArray[Any], blocks: int, *, inner: bool) -> NDArray[np.float32]:
    """[N, blocks, side, blocks, side] view of equal blocks (``inner``: the one-pixel border left out)."""
    margin = 1 if inner and min(image.shape[1:3]) // blocks > 4 else 0
    side = (min(image.shape[1:3]) - 2 * margin) // blocks
    view = np.asarray(image[:, margin : margin + side * blocks, margin : margin + side * blocks], np.float32)
    return view.reshape(image.shape[0], blocks, side, blocks, side)


def sharpness(
    tiles: ImageArray, density_half: NDArray[np.float32], tissue_half: NDArray[np.bool_], mpp: float
) -> NDArray[np.float64]:
    """Per tile of a stack [N, H, W, 3]: the median sharpness of its tissue blocks (inf when none).

    Each tile is cut into ``BLUR_BLOCKS`` x ``BLUR_BLOCKS`` blocks; a block is tissue when at least half of
    it is. The grey image is first averaged down to about ``SHARPNESS_MPP`` (finer scans are oversampled
    by the optics, so their finest scale is smooth even in focus). Per block, E0 is the variance of the
    4-neighbour Laplacian at that scale and E1 the same one octave coarser; sharpness is E0 / E1.
    A block with almost no structure at all (E1 below ``MIN_STRUCTURE``) is given sharpness 0 when it is
    dense (mean density at least ``FEATURELESS_MIN_OD``: strong defocus of stained tissue) and infinity
    otherwise (pale, smooth stroma or mucin: nothing to judge). A tile whose median is below
    ``min_sharpness`` has at least half of its tissue blurred.
    """
    grey = np.asarray(tiles, dtype=np.float32) @ _LUMA
    factor = 1
    while mpp * factor * 2 <= SHARPNESS_MPP * 1.25 and min(grey.shape[1:]) // 2 >= 64:
        grey = _halve(grey)
        factor *= 2
    fine = _blocks(_laplacian(grey), BLUR_BLOCKS, inner=True).var(axis=(2, 4))
    coarse = _blocks(_laplacian(_halve(grey)), BLUR_BLOCKS, inner=True).var(axis=(2, 4))
    tissue_blocks = _blocks(tissue_half, BLUR_BLOCKS, inner=False).mean(axis=(2, 4)) >= 0.5
    dense = _blocks(density_half, BLUR_BLOCKS, inner=False).mean(axis=(2, 4)) >= FEATURELESS_MIN_OD
    ratio = fine / np.maximum(coarse, 1e-6)
    ratio = np.where(coarse < MIN_STRUCTURE, np.where(dense, 0.0, np.inf), ratio)
    medians = np.full(len(ratio), np.inf)
    for index in np.flatnonzero(tissue_blocks.any(axis=(1, 2))):
        medians[index] = float(np.median(ratio[index][tissue_blocks[index]]))
    return medians


def _plane(structure_2d: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """A 2-D structuring element as a 3-D one that never connects two tiles of a stack."""
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = structure_2d
    return plane


_SQUARE = _plane(np.ones((3, 3), dtype=bool))
_CROSS = _plane(np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool))


def _solid_ink(ink: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Ink labels with isolated specks (narrower than 3 pixels of the averaged grid) removed.

    Marker strokes and smears are solid; a scatter of single ink-coloured pixels is dense stain or a
    few dust-sized specks, which do not make a tile unusable.
    """
    from scipy import ndimage

    if not bool(ink.any()):
        return ink
    solid = ndimage.binary_opening(ink != 0, structure=_SQUARE)
    return np.where(solid, ink, 0).astype(np.uint8)


def _fat_lumens(tissue: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per tile: (number of empty regions of at least ``FAT_MIN_LUMEN_SHARE``, share of the largest).

    Tissue is first dilated by two pixels of the 2 x 2 averaged grid, which closes the gaps that thin,
    faint septa leave between adipocytes. Regions are 4-connected within a tile.
    """
    from scipy import ndimage

    empty = ~ndimage.binary_dilation(tissue, structure=_CROSS, iterations=2)
    labels, _ = ndimage.label(empty, structure=_CROSS)
    sizes = np.bincount(labels.ravel()).astype(np.float64) / float(np.prod(tissue.shape[1:]))
    counts = np.zeros(len(tissue), dtype=np.int64)
    largest = np.zeros(len(tissue), dtype=np.float64)
    # Labels are numbered in scan order and never span two tiles, so each tile holds a contiguous range.
    last = labels.reshape(len(tissue), -1).max(axis=1)
    first = 1
    for index, top in enumerate(last):
        if top >= first:
            region_sizes = sizes[first : top + 1]
            counts[index] = int((region_sizes >= FAT_MIN_LUMEN_SHARE).sum())
            largest[index] = float(region_sizes.max())
            first = int(top) + 1
    return counts, largest


def measure_batch(
    tiles: ImageArray, background: Background = DEFAULT_BACKGROUND, mpp: float = 0.5
) -> list[dict[str, float]]:
    """Every QC measure of each tile of a stack [N, H, W, 3] (RGB uint8), against the slide's background.

    Tiles are measured independently (no morphology or region crosses from one tile to the next); a stack
    only makes the arithmetic run on many tiles at once.
    """
    stack = np.asarray(tiles, dtype=np.uint8)
    if stack.ndim != 4 or stack.shape[-1] != 3:
        raise ValueError(f"expected a stack of RGB tiles [N, H, W, 3], got shape {stack.shape}")
    if len(stack) == 0:
        return []
    half = np.rint(_halve(stack)).astype(np.uint8)
    density = optical_density(half, background)
    ink = classify_ink(density, background.red_ink_blue_ratio)
    density_max = tissue_density(density)
    tissue = (density_max >= background.tissue_threshold) & (ink == 0)
    ink = _solid_ink(ink)
    inked = ink != 0
    white = np.asarray(background.white, dtype=np.float32)
    luminance = half.astype(np.float32) @ _LUMA
    dark = ((luminance < DARK_TRANSMISSION * float(white @ _LUMA)) & ~inked).mean(axis=(1, 2))
    if bool((white + OVEREXPOSED_MARGIN <= 255).all()):
        bright = np.all(half >= white + OVEREXPOSED_MARGIN, axis=-1).mean(axis=(1, 2))
    else:  # glass already clipped: nothing can be brighter than it
        bright = np.zeros(len(stack))
    lumens, largest = _fat_lumens(tissue | inked)
    ratios = sharpness(stack, density_max, tissue, mpp)
    tissue_share = tissue.mean(axis=(1, 2))
    pen_share = inked.mean(axis=(1, 2))
    colours = np.stack([(ink == code).sum(axis=(1, 2)) for code in sorted(INK_NAMES)], axis=1)
    results = []
    for index in range(len(stack)):
        metrics = {
            "tissue_fraction": round(float(tissue_share[index]), 4),
            "pen_fraction": round(float(pen_share[index]), 4),
            "dark_fraction": round(float(dark[index]), 4),
            "bright_fraction": round(float(bright[index]), 4),
            "sharpness": round(min(float(ratios[index]), 99.0), 4),
            "fat_lumens": float(lumens[index]),
            "largest_lumen": round(float(largest[index]), 4),
        }
        if metrics["pen_fraction"] > 0:
            metrics["pen_colour"] = float(sorted(INK_NAMES)[int(np.argmax(colours[index]))])
        results.append(metrics)
    return results


def measure(
    tile: ImageArray, background: Background = DEFAULT_BACKGROUND, mpp: float = 0.5
) -> dict[str, float]:
    """Every QC measure of one RGB uint8 tile, against the slide's background (``measure_batch``)."""
    return measure_batch(np.asarray(tile, dtype=np.uint8)[None], background, mpp)[0]


def ink_colour_name(metrics: dict[str, float]) -> str:
    """The dominant ink colour recorded in a tile's metrics ("" when there is none)."""
    return INK_NAMES.get(int(metrics.get("pen_colour", 0)), "")


def is_fat(metrics: dict[str, float]) -> bool:
    return (
        metrics["fat_lumens"] >= FAT_MIN_LUMENS
        and metrics["largest_lumen"] <= FAT_MAX_LUMEN_SHARE
        and 1.0 - metrics["tissue_fraction"] - metrics["pen_fraction"] >= FAT_MIN_EMPTY_SHARE
    )


def decide(metrics: dict[str, float], limits: QcThresholds) -> tuple[bool, str]:
    """(accepted, reason or "") from a tile's measures; the order of checks is the module docstring's."""
    over = [
        (metrics["pen_fraction"], "pen", metrics["pen_fraction"] > limits.max_pen_fraction),
        (metrics["dark_fraction"], "underexposed", metrics["dark_fraction"] > limits.max_dark_fraction),
        (metrics["bright_fraction"], "overexposed", metrics["bright_fraction"] > limits.max_bright_fraction),
    ]
    failing = [(share, reason) for share, reason, failed in over if failed]
    if failing:  # the defect that covers most of the tile names it (pen first on a tie)
        return False, max(failing, key=lambda item: item[0])[1]
    fat = is_fat(metrics)
    if fat and not limits.keep_fat:
        return False, "fat"
    if not fat and metrics["tissue_fraction"] < limits.min_tissue_fraction:
        return False, "background"
    if metrics["sharpness"] < limits.min_sharpness:
        return False, "blur"
    return True, ""


def assess(
    tile: ImageArray,
    limits: QcThresholds | Any,
    background: Background = DEFAULT_BACKGROUND,
    mpp: float = 0.5,
) -> tuple[bool, str, dict[str, float]]:
    """(accepted, reason or "", metrics) for one RGB uint8 tile of ``mpp`` um/px."""
    thresholds = limits if isinstance(limits, QcThresholds) else QcThresholds.from_profile(limits)
    metrics = measure(tile, background, mpp)
    accepted, reason = decide(metrics, thresholds)
    return accepted, reason, metrics
