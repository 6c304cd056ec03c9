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

**How it is computed** (at JPEG-decode speed, one thread; ``tests/benchmarks/bench_qc.py``). Everything a
colour check needs is a function of the averaged pixel's colour and the slide's background:
``colour_codes`` gives ink class, tissue, dark and bright in one byte from the functions of
``optical.py``, and ``colour_table`` tabulates it for all 2^24 colours once per slide background (about a
second; built once ``TABLE_AFTER_PIXELS`` of a slide's tiles have been measured, cached): a 32 KiB table
of 8 x 8 x 8-colour cells answers for the pixels whose cell is uniform (all but a few percent), and only
the mixed cells keep a code per colour (about 2.5 MiB in all, not 16). One
histogram of (tile, sharpness block, code) then gives every share and the tissue blocks. The 2 x 2
averages are rounded half to even as before (``_halve_bytes``); the opening of ink, the dilation of tissue
and the labelling of empty regions run on the stack laid out as one tall image with empty rows between
tiles, so nothing crosses from one tile to the next (OpenCV, one thread); the two Laplacian variances
per block come from block sums of the filtered grey images. Decisions are pinned tile by tile to those
of the earlier float32 implementation (``tests/integration/test_qc_speed_equivalence.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.heap import release_free_memory
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


#: Bits of a pixel's colour code (``colour_codes``): ink class in the low three bits, then flags.
CODE_INK = 0b111
CODE_TISSUE = 1 << 3
CODE_DARK = 1 << 4
CODE_BRIGHT = 1 << 5
#: A slide's colour table (``colour_table``) is built once this many averaged pixels of tiles on its
#: background have been measured in this process (about 2,000 tiles of 224 px); before that, pixels are
#: classified directly. Building a table takes about as long as classifying that many tiles directly
#: instead of through it, and shards of many slides arrive interleaved: only a slide that keeps coming
#: gets one.
TABLE_AFTER_PIXELS = 2000 * 112 * 112
#: Red levels per ``colour_codes`` call while building the table (a divisor of 8).
_BUILD_RED_LEVELS = 2
#: Colour tables kept (about 2.5 MiB each), least recently used dropped first.
TABLES_KEPT = 4
#: ``ColourTable.coarse``'s entry for a cell whose colours do not all have the same code.
MIXED_CELL = 255
_PIXELS_SEEN: dict[tuple[Any, ...], int] = {}


@dataclass(frozen=True)
class ColourTable:
    """``colour_codes`` of every 24-bit colour on one background, stored by cell of 8 x 8 x 8 colours.

    ``coarse``: per cell (the top five bits of each channel, ``red5 << 10 | green5 << 5 | blue5``), the
    code all 512 colours of the cell share, or ``MIXED_CELL`` where they differ: 32 KiB that stay in
    cache and answer for all but a few percent of a tile's pixels. ``slot``: per cell, the row of ``mixed``
    that holds a mixed cell's 512 codes (indexed ``red3 << 6 | green3 << 3 | blue3`` by the low three
    bits), -1 for a uniform cell. Only cells near a boundary of some rule are mixed (about 14 % on the
    default background), so the whole table is about 2.5 MiB instead of the 16 MiB of one byte per colour.
    """

    coarse: NDArray[np.uint8]  # [32768]
    slot: NDArray[np.int32]  # [32768]
    mixed: NDArray[np.uint8]  # [mixed cells, 512]

    @property
    def nbytes(self) -> int:
        return int(self.coarse.nbytes + self.slot.nbytes + self.mixed.nbytes)

    def lookup(self, packed: NDArray[np.uint32]) -> NDArray[np.uint8]:
        """Codes of colours packed as ``red << 16 | green << 8 | blue`` (higher bits ignored)."""
        cell = ((packed >> 9) & 0x7C00) | ((packed >> 6) & 0x3E0) | ((packed >> 3) & 0x1F)
        codes = np.take(self.coarse, cell)
        mixed = np.flatnonzero(codes == MIXED_CELL)
        if len(mixed):
            colour = packed[mixed]
            within = ((colour >> 10) & 0x1C0) | ((colour >> 5) & 0x38) | (colour & 0x7)
            rows = np.take(self.slot, cell[mixed]).astype(np.intp)
            codes[mixed] = self.mixed.reshape(-1)[rows * 512 + within]
        return codes


_TABLES: dict[tuple[Any, ...], ColourTable] = {}


def colour_codes(rgb: ImageArray, background: Background) -> NDArray[np.uint8]:
    """Per pixel of an RGB uint8 image [..., 3]: ink class, tissue, dark and bright, as one code.

    The code is ``optical.classify_ink`` (bits ``CODE_INK``), tissue (``CODE_TISSUE``: density at least
    the slide's tissue threshold and not ink, ``optical.tissue_density``), dark (``CODE_DARK``: less than
    ``DARK_TRANSMISSION`` of the glass's luminance) and bright (``CODE_BRIGHT``: above the glass by
    ``OVEREXPOSED_MARGIN`` in every channel, never when the glass is clipped). It depends on the pixel's
    colour and the slide's background only, which is what lets ``colour_table`` tabulate it.
    """
    image = np.asarray(rgb, dtype=np.uint8)
    density = optical_density(image, background)
    ink = classify_ink(density, background.red_ink_blue_ratio)
    tissue = (tissue_density(density) >= background.tissue_threshold) & (ink == 0)
    white = np.asarray(background.white, dtype=np.float32)
    luminance = image.astype(np.float32) @ _LUMA  # as a matrix product (its rounding decides ties)
    dark = luminance < DARK_TRANSMISSION * float(white @ _LUMA)
    codes = ink | (tissue.astype(np.uint8) << 3) | (dark.astype(np.uint8) << 4)
    if bool((white + OVEREXPOSED_MARGIN <= 255).all()):  # glass already clipped: nothing is brighter
        codes |= np.all(image >= white + OVEREXPOSED_MARGIN, axis=-1).astype(np.uint8) << 5
    return codes


def _table_key(background: Background) -> tuple[Any, ...]:
    return (background.white, background.red_ink_blue_ratio, background.tissue_threshold)


def colour_table(background: Background) -> ColourTable:
    """The ``ColourTable`` of ``background`` (cached: ``TABLES_KEPT`` backgrounds, most recent kept)."""
    key = _table_key(background)
    table = _TABLES.pop(key, None)
    if table is None:
        table = _build_table(background)
        while len(_TABLES) >= TABLES_KEPT:
            _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = table  # re-inserted: the most recently used is last
    return table


def _build_table(background: Background) -> ColourTable:
    """``colour_table``'s table, from ``colour_codes`` itself (so from ``shared/slides/optical.py``'s
    definitions), about a second: ``_BUILD_RED_LEVELS`` red levels per ``colour_codes`` call into a buffer
    of 8 red levels (one row of cells, 512 KiB), whose mixed cells are kept. The float temporaries stay
    about 4 MiB, so a large slide's quality-filter peaks little above a small slide's (docs/throughput.md,
    memory). The heap's free pages are returned before and after (``shared/heap.py``): the build happens
    once per slide, in the middle of a message, beside that message's freed arrays."""
    release_free_memory()
    step = _BUILD_RED_LEVELS
    levels = np.arange(256, dtype=np.uint8)
    row = np.empty(8 << 16, dtype=np.uint8)  # the codes of 8 red levels: one row of 32 x 32 cells
    coarse = np.empty((32, 32, 32), dtype=np.uint8)
    slot = np.full((32, 32, 32), -1, dtype=np.int32)
    mixed: list[NDArray[np.uint8]] = []
    count = 0
    slab = np.empty((step, 256, 256, 3), dtype=np.uint8)
    slab[..., 1] = levels[None, :, None]
    slab[..., 2] = levels[None, None, :]
    for red in range(0, 256, step):
        slab[..., 0] = levels[red : red + step, None, None]
        within = red % 8
        row[within << 16 : (within + step) << 16] = colour_codes(slab, background).reshape(-1)
        if within + step < 8:
            continue
        # cells[r3, g5, g3, b5, b3] -> per cell (g5, b5) its 512 codes in (r3, g3, b3) order
        cells = row.reshape(8, 32, 8, 32, 8).transpose(1, 3, 0, 2, 4).reshape(32, 32, 512)
        lowest, highest = cells.min(axis=2), cells.max(axis=2)
        uniform = lowest == highest
        coarse[red // 8] = np.where(uniform, lowest, MIXED_CELL)
        green5, blue5 = np.nonzero(~uniform)
        slot[red // 8, green5, blue5] = np.arange(count, count + len(green5), dtype=np.int32)
        mixed.append(cells[green5, blue5])
        count += len(green5)
    release_free_memory()
    table = ColourTable(coarse.reshape(-1), slot.reshape(-1), np.concatenate(mixed))
    return table


def _codes_of(half: ImageArray, background: Background, use_table: bool | None) -> NDArray[np.uint8]:
    """``colour_codes`` of the averaged tiles [N, h, w, 3], through the colour tables when they pay."""
    import cv2

    if use_table is None:
        key = _table_key(background)
        if len(_PIXELS_SEEN) > 256:
            _PIXELS_SEEN.clear()
        _PIXELS_SEEN[key] = _PIXELS_SEEN.get(key, 0) + half.size // 3
        use_table = key in _TABLES or _PIXELS_SEEN[key] >= TABLE_AFTER_PIXELS
    if not use_table:
        return colour_codes(half, background)
    rows = half.reshape(-1, half.shape[-2], 3)
    # BGRA bytes read as little-endian uint32 are blue | green << 8 | red << 16 | alpha << 24.
    packed = cv2.cvtColor(rows, cv2.COLOR_RGB2BGRA).view(np.uint32).reshape(-1)
    return colour_table(background).lookup(packed).reshape(half.shape[:-1])


def _halve(image: NDArray[np.float32]) -> NDArray[np.float32]:
    """2 x 2 block means of each image of a stack [N, H, W(, C)] of float32 (odd edges dropped).

    One area resize of the stack laid out as one tall image: blocks never straddle two tiles because each
    tile's height is even. Exact for 8-bit values (a sum of four, times 0.25).
    """
    import cv2

    count, height, width = image.shape[0], image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
    if (height, width) != image.shape[1:3]:
        image = np.ascontiguousarray(image[:, :height, :width])
    tall = image.reshape(count * height, width, *image.shape[3:])
    half = cv2.resize(tall, (width // 2, count * height // 2), interpolation=cv2.INTER_AREA)
    return np.asarray(half, dtype=np.float32).reshape(count, height // 2, width // 2, *image.shape[3:])


def _halve_bytes(stack: ImageArray) -> ImageArray:
    """2 x 2 block means of a stack of RGB uint8 tiles [N, H, W, 3] rounded half to even, as ``np.rint``
    of the exact means (odd edges dropped).

    OpenCV's area resize of 8-bit images rounds a mean of x.5 up; the same resize of the inverted image
    rounds it down. Where the two differ the mean was a tie, and the even of the two is kept.
    """
    import cv2

    count, height, width = stack.shape[0], stack.shape[1] // 2 * 2, stack.shape[2] // 2 * 2
    if (height, width) != stack.shape[1:3]:
        stack = np.ascontiguousarray(stack[:, :height, :width])
    tall = stack.reshape(count * height, width, 3)
    size = (width // 2, count * height // 2)
    up = np.asarray(cv2.resize(tall, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    inverted = cv2.resize(cv2.bitwise_not(tall), size, interpolation=cv2.INTER_AREA)
    down = np.asarray(cv2.bitwise_not(inverted), dtype=np.uint8)
    half = down + ((up - down) & down & 1)
    return half.reshape(count, height // 2, width // 2, 3)


def _laplacian(grey: NDArray[np.float32]) -> NDArray[np.float32]:
    """4-neighbour Laplacian of each image of a stack [N, H, W], zero on the one-pixel border."""
    import cv2

    count, height, width = grey.shape
    lap = cv2.Laplacian(grey.reshape(count * height, width), cv2.CV_32F, ksize=1).reshape(grey.shape)
    lap[:, 0], lap[:, -1], lap[:, :, 0], lap[:, :, -1] = 0.0, 0.0, 0.0, 0.0
    return np.asarray(lap, dtype=np.float32)


def _block_grid(height: int, width: int, blocks: int, *, inner: bool) -> tuple[int, int]:
    """(margin, side) of ``blocks`` x ``blocks`` equal blocks (``inner``: the one-pixel border left out)."""
    margin = 1 if inner and min(height, width) // blocks > 4 else 0
    return margin, (min(height, width) - 2 * margin) // blocks


def _blocks(image: NDArray[Any], blocks: int, *, inner: bool) -> NDArray[np.float32]:
    """[N, blocks, side, blocks, side] view of equal blocks (``inner``: the one-pixel border left out)."""
    margin, side = _block_grid(image.shape[1], image.shape[2], blocks, inner=inner)
    view = np.asarray(image[:, margin : margin + side * blocks, margin : margin + side * blocks], np.float32)
    return view.reshape(image.shape[0], blocks, side, blocks, side)


def _block_variances(lap: NDArray[np.float32], blocks: int) -> NDArray[np.float64]:
    """[N, blocks, blocks] variance of each inner block of each image of a stack [N, H, W]."""
    import cv2

    count, height, width = lap.shape
    margin, side = _block_grid(height, width, blocks, inner=True)
    inner = lap[:, margin : margin + side * blocks, margin : margin + side * blocks]

    def block_sums(values: NDArray[np.float32]) -> NDArray[np.float64]:
        strips = values.reshape(count, blocks, side, blocks * side).sum(axis=2)  # a view: no copy
        return np.asarray(strips.reshape(count, blocks, blocks, side).sum(axis=3, dtype=np.float64))

    flat = lap.reshape(count * height, width)
    squares = np.asarray(cv2.multiply(flat, flat), dtype=np.float32).reshape(lap.shape)
    squares = squares[:, margin : margin + side * blocks, margin : margin + side * blocks]
    pixels = float(side * side)
    mean = block_sums(inner) / pixels
    return np.maximum(block_sums(squares) / pixels - mean * mean, 0.0)


def sharpness(
    tiles: NDArray[Any],
    tissue_blocks: NDArray[np.bool_],
    dense_blocks: Any,
    mpp: float,
) -> NDArray[np.float64]:
    """Per tile of a stack [N, H, W, 3] (RGB): the median sharpness of its tissue blocks (inf when none).

    Each tile is cut into ``BLUR_BLOCKS`` x ``BLUR_BLOCKS`` blocks; a block is tissue when at least half of
    it is (``tissue_blocks``). The grey image is first averaged down to about ``SHARPNESS_MPP`` (finer
    scans are oversampled by the optics, so their finest scale is smooth even in focus). Per block, E0 is
    the variance of the 4-neighbour Laplacian at that scale and E1 the same one octave coarser; sharpness
    is E0 / E1. A block with almost no structure at all (E1 below ``MIN_STRUCTURE``) is given sharpness 0
    when it is dense (mean density at least ``FEATURELESS_MIN_OD``: strong defocus of stained tissue) and
    infinity otherwise (pale, smooth stroma or mucin: nothing to judge). ``dense_blocks(indices)`` gives
    the dense blocks of those tiles; it is only asked about tiles that have such featureless blocks. A
    tile whose median is below ``min_sharpness`` has at least half of its tissue blurred. Tiles without
    a tissue block are not filtered at all.
    """
    import cv2

    medians = np.full(len(tiles), np.inf)
    measured = np.flatnonzero(tissue_blocks.any(axis=(1, 2)))
    if len(measured) == 0:
        return medians
    if len(measured) < len(tiles):
        tiles, tissue_blocks = tiles[measured], tissue_blocks[measured]
    tiles = np.asarray(tiles, dtype=np.float32)
    count, height, width = tiles.shape[:3]
    luma = _LUMA.reshape(1, 3)
    grey = np.asarray(cv2.transform(tiles.reshape(count * height, width, 3), luma), dtype=np.float32)
    grey = grey.reshape(count, height, width)
    factor = 1
    while mpp * factor * 2 <= SHARPNESS_MPP * 1.25 and min(grey.shape[1:]) // 2 >= 64:
        grey = _halve(grey)
        factor *= 2
    fine = _block_variances(_laplacian(grey), BLUR_BLOCKS)
    coarse = _block_variances(_laplacian(_halve(grey)), BLUR_BLOCKS)
    ratio = fine / np.maximum(coarse, 1e-6)
    featureless = (coarse < MIN_STRUCTURE) & tissue_blocks
    ratio[coarse < MIN_STRUCTURE] = np.inf
    judged = np.flatnonzero(featureless.any(axis=(1, 2)))
    if len(judged):
        dense = dense_blocks(measured[judged]) & featureless[judged]
        ratio[judged] = np.where(dense, 0.0, ratio[judged])
    # Median over each tile's tissue blocks: the others sort last as NaN; mean of the two middle values.
    values = np.sort(np.where(tissue_blocks, ratio, np.nan).reshape(count, -1), axis=1)
    present = tissue_blocks.reshape(count, -1).sum(axis=1)  # at least 1
    rows = np.arange(count)
    medians[measured] = (values[rows, (present - 1) // 2] + values[rows, present // 2]) / 2
    return medians


def _spaced(masks: NDArray[Any], gap: int) -> NDArray[np.uint8]:
    """A stack of masks [N, H, W] as one tall uint8 image, ``gap`` empty rows after each tile.

    Morphology of radius ``gap`` on it never carries anything from one tile to the next, and the empty
    rows act as the border outside each tile.
    """
    count, height, width = masks.shape
    tall = np.zeros((count, height + gap, width), dtype=np.uint8)
    tall[:, :height] = masks
    return tall.reshape(-1, width)


def _solid_ink(ink: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Ink labels with isolated specks (narrower than 3 pixels of the averaged grid) removed.

    Marker strokes and smears are solid; a scatter of single ink-coloured pixels is dense stain or a
    few dust-sized specks, which do not make a tile unusable. (A binary opening by a 3 x 3 square,
    outside the tile counting as no ink.)
    """
    import cv2

    if not bool(ink.any()):
        return ink
    count, height, width = ink.shape
    opened = cv2.morphologyEx(
        _spaced(ink != 0, 1),
        cv2.MORPH_OPEN,
        np.ones((3, 3), dtype=np.uint8),
        borderType=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    solid = opened.reshape(count, height + 1, width)[:, :height] != 0
    return np.where(solid, ink, 0).astype(np.uint8)


def _fat_lumens(tissue: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per tile: (number of empty regions of at least ``FAT_MIN_LUMEN_SHARE``, share of the largest).

    Tissue is first dilated by two pixels of the 2 x 2 averaged grid, which closes the gaps that thin,
    faint septa leave between adipocytes. Regions are 4-connected within a tile. A tile with no empty
    pixel has no region; one that is all empty is one region.
    """
    import cv2

    count, height, width = tissue.shape
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    grown = cv2.dilate(
        _spaced(tissue, 2), cross, iterations=2, borderType=cv2.BORDER_CONSTANT, borderValue=0
    ).reshape(count, height + 2, width)[:, :height]
    empty = (grown == 0).view(np.uint8)
    empty_pixels = empty.reshape(count, -1).sum(axis=1)
    counts = (empty_pixels == height * width).astype(np.int64)
    largest = counts.astype(np.float64)
    mixed = np.flatnonzero((empty_pixels > 0) & (empty_pixels < height * width))
    if len(mixed):
        _, _, stats, _ = cv2.connectedComponentsWithStats(_spaced(empty[mixed], 1), connectivity=4)
        owner = mixed[stats[1:, cv2.CC_STAT_TOP] // (height + 1)]
        sizes = stats[1:, cv2.CC_STAT_AREA].astype(np.float64) / float(height * width)
        counts += np.bincount(owner[sizes >= FAT_MIN_LUMEN_SHARE], minlength=count)
        np.maximum.at(largest, owner, sizes)
    return counts, largest


@functools.lru_cache(maxsize=8)
def _block_keys(count: int, height: int, width: int) -> NDArray[np.intp]:
    """[count, height, width]: (tile x cells + block) x 64, block the ``BLUR_BLOCKS`` x ``BLUR_BLOCKS``
    block of the averaged grid a pixel falls in (``BLUR_BLOCKS ** 2`` outside them); add a pixel's colour
    code for its bin in ``_measure``'s one histogram."""
    margin, side = _block_grid(height, width, BLUR_BLOCKS, inner=False)
    ys, xs = np.arange(height)[:, None] - margin, np.arange(width)[None, :] - margin
    inside = (ys >= 0) & (ys < side * BLUR_BLOCKS) & (xs >= 0) & (xs < side * BLUR_BLOCKS)
    block = np.where(inside, (ys // max(side, 1)) * BLUR_BLOCKS + xs // max(side, 1), BLUR_BLOCKS**2)
    keys = (np.arange(count)[:, None, None] * (BLUR_BLOCKS**2 + 1) + block) << 6
    keys.flags.writeable = False
    return np.asarray(keys, dtype=np.intp)


def measure_batch(
    tiles: ImageArray,
    background: Background = DEFAULT_BACKGROUND,
    mpp: float = 0.5,
    *,
    use_table: bool | None = None,
) -> list[dict[str, float]]:
    """Every QC measure of each tile of a stack [N, H, W, 3] (RGB uint8), against the slide's background.

    Tiles are measured independently (no morphology or region crosses from one tile to the next); a stack
    only makes the arithmetic run on many tiles at once. ``use_table``: classify colours through the
    slide's colour table (True), directly (False), or as ``TABLE_AFTER_PIXELS`` says (None); both give
    the same codes.
    """
    import cv2

    stack = np.asarray(tiles, dtype=np.uint8)
    if stack.ndim != 4 or stack.shape[-1] != 3:
        raise ValueError(f"expected a stack of RGB tiles [N, H, W, 3], got shape {stack.shape}")
    if len(stack) == 0:
        return []
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core per process: replicas scale out, not threads
    try:
        return _measure(stack, background, mpp, use_table)
    finally:
        cv2.setNumThreads(threads)


def _measure(
    stack: ImageArray, background: Background, mpp: float, use_table: bool | None
) -> list[dict[str, float]]:

    count = len(stack)
    half_bytes = _halve_bytes(stack)
    codes = _codes_of(half_bytes, background, use_table)
    height, width = codes.shape[1:]
    # Counts per (tile, tissue block, code): every share and the tissue blocks in one pass.
    _, side = _block_grid(height, width, BLUR_BLOCKS, inner=False)
    cells = BLUR_BLOCKS**2 + 1
    keys = _block_keys(count, height, width) + codes
    histogram = np.bincount(keys.reshape(-1), minlength=count * cells * 64).reshape(count, cells, 64)
    per_tile = histogram.sum(axis=1)
    code_values = np.arange(64)
    tissue_codes = (code_values & CODE_TISSUE) != 0
    tissue_count = per_tile[:, tissue_codes].sum(axis=1)
    tissue_blocks = (2 * histogram[:, : BLUR_BLOCKS**2, tissue_codes].sum(axis=2) >= side * side).reshape(
        count, BLUR_BLOCKS, BLUR_BLOCKS
    )
    dark_count = per_tile[:, (code_values & CODE_DARK) != 0].sum(axis=1)
    bright_count = per_tile[:, (code_values & CODE_BRIGHT) != 0].sum(axis=1)
    colour_counts = np.stack(
        [per_tile[:, (code_values & CODE_INK) == code].sum(axis=1) for code in sorted(INK_NAMES)], axis=1
    )
    filled = (codes & CODE_TISSUE) != 0  # tissue or solid ink: what bounds the empty regions
    inked_tiles = np.flatnonzero(colour_counts.sum(axis=1))
    if len(inked_tiles):  # raw ink: keep solid strokes only, which count as pen and are never dark
        solid = _solid_ink((codes[inked_tiles] & CODE_INK).astype(np.uint8, copy=False))
        inked = solid != 0
        colour_counts[inked_tiles] = np.stack(
            [(solid == code).sum(axis=(1, 2)) for code in sorted(INK_NAMES)], axis=1
        )
        dark_count[inked_tiles] = (((codes[inked_tiles] & CODE_DARK) != 0) & ~inked).sum(axis=(1, 2))
        filled[inked_tiles] |= inked
    area = float(height * width)
    lumens, largest = _fat_lumens(filled)

    def dense_blocks(indices: NDArray[np.intp]) -> NDArray[np.bool_]:
        density = tissue_density(optical_density(half_bytes[indices], background))
        return np.asarray(_blocks(density, BLUR_BLOCKS, inner=False).mean(axis=(2, 4)) >= FEATURELESS_MIN_OD)

    ratios = sharpness(stack, tissue_blocks, dense_blocks, mpp)
    results = []
    for index in range(count):
        metrics = {
            "tissue_fraction": round(float(tissue_count[index]) / area, 4),
            "pen_fraction": round(float(colour_counts[index].sum()) / area, 4),
            "dark_fraction": round(float(dark_count[index]) / area, 4),
            "bright_fraction": round(float(bright_count[index]) / area, 4),
            "sharpness": round(min(float(ratios[index]), 99.0), 4),
            "fat_lumens": float(lumens[index]),
            "largest_lumen": round(float(largest[index]), 4),
        }
        if metrics["pen_fraction"] > 0:
            metrics["pen_colour"] = float(sorted(INK_NAMES)[int(np.argmax(colour_counts[index]))])
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
