"""The one definition of tissue and marker ink: optical density against the slide's own glass.

Brightfield microscopy measures how much light the specimen absorbs. A pixel's optical density (OD) in
channel c is ``log10(white_c / pixel_c)``, where ``white`` is the colour of bare glass *on that slide*.
Measured that way, tissue means the same on a bright scanner (glass at 250), a dim one (glass at 215),
on yellow, grey or blue-tinted glass, and under the faint stitching stripes some scanners leave: no rule
here or in tissue segmentation or tile QC depends on how bright glass is. Both
``shared/slides/tissue.py`` (segmentation on a thumbnail) and the quality-filter service (tile QC) use
the functions below and nothing else to decide what is tissue and what is ink.

**The slide's background** (``estimate_background``): the brightest well-populated mode of the
thumbnail's brightness histogram (bare glass is the brightest large population of pixels in brightfield;
it is a narrow peak, tissue is a broad hill), its per-channel median is the white point, and the spread
of the density of those pixels is the glass noise. Pixels outside the scanned area (transparent in
OpenSlide) are left out. When no mode holds ``MIN_GLASS_SHARE`` of the pixels (a thumbnail filled with
tissue), the white point is the 99.5th percentile per channel instead (``source="brightest"``).

**Tissue density** (``tissue_density``): the largest of the three channel densities. Eosin absorbs mostly
green and haematoxylin red and green, so the largest channel is the one that sees pale stroma first.
A pixel is tissue when its density reaches ``TISSUE_OD`` (or four glass-noise standard deviations on a
noisy scan, whichever is higher). 0.06 OD is 13 % of the light absorbed: JPEG noise on glass is about
0.005-0.01, the palest dermal stroma of the real Aperio fixture about 0.07-0.1.

**Marker ink** (``classify_ink``) is told apart from haematoxylin and eosin by the *ratios* of its channel
densities, which do not depend on how thick the stroke or how bright the glass is:

=========  =================================================================  ==========================
colour     rule (OD ratios of the pixel)                                      H&E for comparison
=========  =================================================================  ==========================
green      green is the least absorbed channel: G < 0.75 x min(R, B)          H and E both absorb green
           (also teal and blue-green markers)                                 most or as much as red
blue       R >= 1.3 x G and B < G                                             haematoxylin R/G 0.8-1.2
                                                                              (also bluish counterstains)
red        B >= 0.7 x G and R < 0.4 x G, with G >= 0.3                        eosin B/G 0.1-0.62
black      every channel >= 0.3 (50 % transmission) and max <= 1.35 x min     nuclei: max/min >= 1.8
=========  =================================================================  ==========================

Each rule also needs a density of at least ``INK_MIN_OD`` so that glass noise has no colour. The red
ratios come from the labelled real tiles in ``../shared/fixtures/real/tiles`` (red marker B/G 0.76-0.93,
real eosin and red blood cells B/G below 0.66 at their 95th percentile) and from the synthetic looks of
``wsi synth``; the margins are stated in docs/tiling-and-qc.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

ImageArray = NDArray[np.uint8]
FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]

#: Density (log10, largest channel) from which a pixel is tissue.
TISSUE_OD = 0.06
#: Noise floor: a pixel is tissue only if also this many glass-noise standard deviations above glass.
NOISE_SIGMAS = 4.0
#: A histogram mode must hold this share of the (scanned) pixels to count as glass.
MIN_GLASS_SHARE = 0.02
#: Densities below which a pixel has no colour worth classifying as ink.
INK_MIN_OD = 0.12
#: Darker than this in every channel (log10 OD) and nearly neutral: black ink.
BLACK_MIN_OD = 0.3

#: Red ink passes red and absorbs green and blue alike: its blue/green ratio is at least this, and at least
#: ``RED_INK_MARGIN`` above the slide's own tissue (an eosin that absorbs blue moves the limit up).
RED_INK_MIN_BLUE_RATIO = 0.7
RED_INK_MARGIN = 0.15

INK_NONE, INK_BLUE, INK_GREEN, INK_RED, INK_BLACK = 0, 1, 2, 3, 4
INK_NAMES = {INK_BLUE: "blue", INK_GREEN: "green", INK_RED: "red", INK_BLACK: "black"}


@dataclass(frozen=True)
class Background:
    """The colour of bare glass on one slide, and how noisy it is in density units."""

    white: tuple[float, float, float]
    noise_od: float = 0.01
    source: str = "glass-mode"  # "glass-mode", "brightest", or "default" (a tile without its slide)
    #: Median blue/green density ratio of the slide's stained tissue (its eosin's hue, in effect).
    tissue_blue_ratio: float = 0.55

    def to_dict(self) -> dict[str, Any]:
        return {
            "white": [round(float(v), 2) for v in self.white],
            "noise_od": round(float(self.noise_od), 5),
            "source": self.source,
            "tissue_blue_ratio": round(float(self.tissue_blue_ratio), 4),
        }

    @property
    def red_ink_blue_ratio(self) -> float:
        """The blue/green ratio from which a dense, red-passing pixel is red ink on this slide."""
        return max(RED_INK_MIN_BLUE_RATIO, self.tissue_blue_ratio + RED_INK_MARGIN)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Background:
        """The background a shard header or plan recorded; the default one when it recorded none."""
        if not data or len(data.get("white", ())) != 3:
            return DEFAULT_BACKGROUND
        red, green, blue = (float(v) for v in data["white"])
        return cls(
            (red, green, blue),
            float(data.get("noise_od", 0.01)),
            str(data.get("source", "")),
            float(data.get("tissue_blue_ratio", 0.55)),
        )

    @property
    def tissue_threshold(self) -> float:
        """The density from which a pixel is tissue on this slide."""
        return max(TISSUE_OD, NOISE_SIGMAS * self.noise_od)

    def lut(self) -> FloatArray:
        """[3, 256] density of each 8-bit value in each channel (log10, clipped at 0: brighter than glass)."""
        return _density_lut(self.white)


#: Used only for a tile that arrives without its slide's background (shards written before it was
#: recorded, or tiles QC'd on their own): a typical brightfield glass. Nothing decides on it where the
#: slide's own background is known.
DEFAULT_BACKGROUND = Background((242.0, 242.0, 242.0), 0.01, "default")

_LUT_CACHE: dict[tuple[float, float, float], FloatArray] = {}
_CHANNEL_OFFSETS = np.array([0, 256, 512], dtype=np.uint16)


def _density_lut(white: tuple[float, float, float]) -> FloatArray:
    key = (round(white[0], 2), round(white[1], 2), round(white[2], 2))
    table = _LUT_CACHE.get(key)
    if table is None:
        values = np.arange(256, dtype=np.float64)
        table = np.stack([np.maximum(np.log10((w + 1.0) / (values + 1.0)), 0.0) for w in key]).astype(
            np.float32
        )
        if len(_LUT_CACHE) > 64:
            _LUT_CACHE.clear()
        _LUT_CACHE[key] = table
    return table


def optical_density(rgb: ImageArray, background: Background) -> FloatArray:
    """[..., 3] float32 density per channel of an RGB uint8 image against the slide's glass."""
    table = background.lut().reshape(-1)  # channel c's entry for value v is at 256 c + v
    image = np.asarray(rgb, dtype=np.uint8)
    return np.asarray(table[image + _CHANNEL_OFFSETS], dtype=np.float32)


def tissue_density(density: FloatArray) -> FloatArray:
    """The largest channel density of each pixel (what decides tissue)."""
    largest = np.maximum(np.maximum(density[..., 0], density[..., 1]), density[..., 2])
    return np.asarray(largest, dtype=np.float32)


def classify_ink(density: FloatArray, red_blue_ratio: float = RED_INK_MIN_BLUE_RATIO) -> NDArray[np.uint8]:
    """Per pixel: ``INK_NONE`` or the marker colour (``INK_BLUE`` ...); rules in the module docstring.

    ``red_blue_ratio`` is the slide's red-ink limit (``Background.red_ink_blue_ratio``).
    """
    red, green, blue = density[..., 0], density[..., 1], density[..., 2]
    largest = np.maximum(np.maximum(red, green), blue)
    smallest = np.minimum(np.minimum(red, green), blue)
    coloured = largest >= INK_MIN_OD
    labels = np.zeros(density.shape[:-1], dtype=np.uint8)
    labels[coloured & (green < 0.75 * np.minimum(red, blue))] = INK_GREEN
    labels[coloured & (red >= 1.3 * green) & (blue < green) & (labels == 0)] = INK_BLUE
    red_ink = (green >= 0.3) & (blue >= red_blue_ratio * green) & (red < 0.4 * green) & (labels == 0)
    labels[red_ink] = INK_RED
    labels[(smallest >= BLACK_MIN_OD) & (largest <= 1.35 * smallest)] = INK_BLACK
    return labels


def ink_mask(density: FloatArray, red_blue_ratio: float = RED_INK_MIN_BLUE_RATIO) -> BoolArray:
    """Pixels of marker ink of any colour."""
    return np.asarray(classify_ink(density, red_blue_ratio) != INK_NONE, dtype=bool)


def ink_continuation(density: FloatArray) -> BoolArray:
    """Pixels that may be ink thinned or mixed with tissue: haematoxylin-like or neutral and dense.

    Not ink on their own (haematoxylin looks the same); segmentation counts them as ink only where they
    are connected to pixels ``classify_ink`` calls ink (blue marker over pink eosin mixes to purple).
    """
    red, green, blue = density[..., 0], density[..., 1], density[..., 2]
    largest = np.maximum(np.maximum(red, green), blue)
    haematoxylin_like = (largest >= INK_MIN_OD) & (red >= 0.7 * green) & (blue < green)
    blue_as_green = (largest >= 0.3) & (blue >= 0.95 * green)  # green or red ink mixed with tissue
    return np.asarray(haematoxylin_like | blue_as_green, dtype=bool)


def estimate_background(rgb: ImageArray, valid: BoolArray | None = None) -> Background:
    """The slide's glass colour and noise from a thumbnail (method in the module docstring).

    ``valid`` marks the pixels that were scanned (OpenSlide's alpha); the others are left out.
    """
    pixels = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    if valid is not None:
        pixels = pixels[np.asarray(valid, dtype=bool).reshape(-1)]
    if len(pixels) == 0:
        return DEFAULT_BACKGROUND
    brightness = pixels.astype(np.uint16).sum(axis=1) // 3
    counts = np.bincount(brightness, minlength=256).astype(np.float64)
    window = np.convolve(counts, np.ones(7), mode="same")  # mass within +-3 levels of each level
    significant = window >= MIN_GLASS_SHARE * len(pixels)
    peaks = [
        level
        for level in range(255, 31, -1)
        if significant[level]
        and window[level] >= window[max(level - 1, 0)]
        and window[level] >= window[min(level + 1, 255)]
    ]
    if peaks:
        mode = peaks[0]
        near = np.abs(brightness.astype(np.int32) - mode) <= 3
        glass = pixels[near]
        white = np.median(glass, axis=0).astype(np.float64)
        source = "glass-mode"
    else:
        white = np.percentile(pixels, 99.5, axis=0).astype(np.float64)
        glass = pixels[np.all(pixels >= white - 6, axis=1)]
        source = "brightest"
    white = np.maximum(white, 1.0)
    background = Background((float(white[0]), float(white[1]), float(white[2])), 0.0, source)
    tissue_ratio = _tissue_blue_ratio(optical_density(pixels[None], background)[0])
    noise = 0.01
    if len(glass) >= 16:
        glass_density = tissue_density(optical_density(glass, background)[None])[0]
        # Pixels brighter than the median have density 0 (clipped), so the spread is read off the
        # darker half: its 84th percentile is one standard deviation for Gaussian noise.
        noise = float(np.percentile(glass_density, 84)) if glass_density.size else 0.01
    return Background(background.white, max(noise, 0.002), source, tissue_ratio)


def _tissue_blue_ratio(density: FloatArray) -> float:
    """Median blue/green density of clearly stained, clearly not green/blue/black-ink pixels (0.55 if none).

    A median: red ink would have to cover more of the slide than its tissue to move it.
    """
    green, blue = density[..., 1], density[..., 2]
    labels = classify_ink(density, red_blue_ratio=1e6)
    stained = (tissue_density(density) >= 2 * TISSUE_OD) & (labels == INK_NONE) & (green > 0)
    if int(stained.sum()) < 50:
        return 0.55
    return float(np.median(blue[stained] / green[stained]))
