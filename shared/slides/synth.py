"""Synthetic whole-slide images with ground truth: real pyramidal, tiled, JPEG-compressed TIFF/SVS files.

Why this exists: no public slide archive can be downloaded where the project is built and tested, yet every
stage (tissue detection, tiling at a physical resolution, QC, embedding, MIL training) needs slides that
OpenSlide opens exactly as it opens scanner output. This module writes such slides, streaming tile by tile so
that a 40,000 x 40,000 px slide needs no more memory than a 4,000 px one, and records what is on them (tissue
and tumour masks, the tumour fraction) so that tests and demos can check the pipeline's answers.

How a slide is drawn:

* A coarse **layout** (one grid cell per ``mask_downsample`` level-0 pixels) comes from the seed: a few smooth,
  warped tissue blobs and, for tumour slides, smooth tumour regions inside them, thresholded so that the
  requested fraction of the tissue area is tumour. The layout's masks are the ground truth.
* Every output window (a stored tile, a thumbnail, a standalone patch) is rendered procedurally from the
  layout: signed distances to the region borders are interpolated per pixel and roughened by noise, stain
  concentrations (haematoxylin, eosin) are computed per pixel and turned into RGB through Beer-Lambert optical
  density, so stain-normalisation methods (Macenko, Reinhard) see realistic colour statistics.
* Texture is defined at **physical scale**: noise fields have correlation lengths in micrometres and nuclei
  have radii in micrometres, so the same tissue at 0.25 um/px has nuclei twice as many pixels wide, and a
  pyramid level rendered at 4x the pixel size looks like the downsampled level 0. Nuclei belong to fixed
  cells of the pixel grid, each seeded by (slide seed, downsample, class, cell), so a window's pixels do not
  depend on the order or the size of the windows asked for: slides are byte-for-byte reproducible.
* Normal tissue: pink stroma with fibre texture and sparse small round nuclei. Tumour: denser, larger, darker,
  irregular nuclei on a slightly more purple stroma. The difference is meant to be learnable by a small
  random-weight CNN with attention MIL, which is what the demo trains.

* Site and patient effects (``stain_shift``, ``illumination_od``, ``nucleus_scale``) are off by default. A
  labelled cohort (:func:`generate_labelled_cohort`) uses them so that the slides of one lab share a staining
  and scanner look and the slides of one patient share a tissue look, as real cohorts do: splitting by slide
  instead of by patient then leaks, and models can be checked across sites.
* Scanner and stain looks (``look``, a :class:`~wsitk.shared.slides.looks.ScannerLook`; the named set
  ``LOOKS`` and ``random_look`` live in ``shared/slides/looks.py``): glass white point (the illumination,
  which multiplies tissue too), stain intensity and hue, JPEG quality, strip-boundary stripes, red ink.
  The default look is an exact no-op.

Public entry points: :class:`SynthSpec`, :func:`generate_slide`, :func:`generate_cohort`, :func:`load_truth`,
:func:`render_patch`, :func:`render_region`, :class:`CohortParameters`, :func:`plan_labelled_cohort`,
:func:`generate_labelled_cohort`, and :func:`add_synth_arguments` / :func:`cli_synth` for ``wsi synth``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.artefacts import (
    ARTEFACT_KINDS,
    PEN_COLOURS,
    Artefacts,
    artefact_truth,
    pen_colour_mask,
    plan_artefacts,
    plan_pen_strokes,
    render_with_artefacts,
)
from wsitk.shared.slides.looks import LOOKS, ScannerLook, hue_rotated, look_named, random_look, stripe_od

GENERATOR_VERSION = "wsitk-synth-1"

SlideFormat = Literal["svs", "tiff"]
PatchKind = Literal["background", "normal", "tumour"]
PATCH_KINDS: tuple[str, ...] = ("background", "normal", "tumour")

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int32]

# ---------------------------------------------------------------------------------------------------------
# Appearance constants. Colours are optical densities (OD = -ln(I / 255)) per unit stain concentration, so
# that stains add up the way light absorption does.
# ---------------------------------------------------------------------------------------------------------


def _od(rgb: tuple[float, float, float]) -> NDArray[np.float32]:
    return (-np.log(np.asarray(rgb, dtype=np.float64) / 255.0)).astype(np.float32)


# Eosin at concentration 1 gives pink stroma around RGB (230, 150, 190).
EOSIN_OD = _od((230.0, 150.0, 190.0))
# Haematoxylin at concentration 1, together with some eosin and the glass, gives nuclei around (90, 60, 150).
HAEMATOXYLIN_OD = np.asarray([0.93, 1.12, 0.32], dtype=np.float32)
# Glass and mounting medium: near-white background, RGB about 240 with mild noise.
GLASS_OD = 0.061
GLASS_OD_NOISE = 0.012

# Physical texture scales (micrometres).
GRAIN_SIGMA_UM = 0.35  # per-pixel grain: chromatin, sensor noise
FIBRE_SIGMA_UM = (7.0, 1.1)  # stroma fibres: long along, thin across
COARSE_SIGMA_UM = 14.0  # staining density variation, border roughness
BORDER_ROUGHNESS_UM = 10.0  # amplitude of tissue border irregularity
TISSUE_EDGE_UM = 2.0  # width of the tissue/glass transition
TUMOUR_EDGE_UM = 8.0  # tumour/normal transition is more diffuse than the tissue edge

NUCLEUS_CELL_PX = 256  # nuclei are drawn per cell of this many pixels at the rendered downsample
STAMP_MODE_MIN_RADIUS_PX = 0.75  # below this nuclei are rendered as a coverage field, not as shapes
STAMPS_PER_CLASS = 32
TEXTURE_PERIODS = (512, 500)  # two periodic noise banks with coprime-ish periods: no visible repeats


@dataclass(frozen=True)
class TissueClass:
    """How one kind of tissue looks: its stroma stains and its nuclei, in physical units."""

    name: str
    class_id: int
    stroma_eosin: float  # eosin concentration of the stroma
    stroma_haematoxylin: float  # haematoxylin tint of the stroma (tumour stroma is more purple)
    nuclei_per_um2: float
    radius_um: tuple[float, float]
    aspect: tuple[float, float]  # ellipse axis ratio
    irregularity: tuple[float, float]  # amplitude of harmonic border perturbation
    haematoxylin: tuple[float, float]  # nuclear stain concentration (darkness)

    @property
    def mean_nucleus_area_um2(self) -> float:
        radius = sum(self.radius_um) / 2
        return math.pi * radius * radius * (sum(self.aspect) / 2)


NORMAL = TissueClass(
    name="normal",
    class_id=1,
    stroma_eosin=1.0,
    stroma_haematoxylin=0.03,
    nuclei_per_um2=1 / 160,
    radius_um=(1.5, 2.0),
    aspect=(1.0, 1.35),
    irregularity=(0.0, 0.06),
    haematoxylin=(0.75, 0.95),
)
TUMOUR = TissueClass(
    name="tumour",
    class_id=2,
    stroma_eosin=0.82,
    stroma_haematoxylin=0.16,
    nuclei_per_um2=1 / 55,
    radius_um=(3.0, 4.0),
    aspect=(1.0, 1.6),
    irregularity=(0.1, 0.25),
    haematoxylin=(1.15, 1.5),
)

# Bounds of the site and patient effects. A stain shift beyond 0.5..1.6 or a colour cast beyond a few tenths
# of OD no longer looks like H&E from a working lab; nuclei scaled beyond 0.75..1.3 would blur the
# normal/tumour size difference the demo relies on.
STAIN_SHIFT_RANGE = (0.5, 1.6)
ILLUMINATION_OD_RANGE = (-0.06, 0.25)
NUCLEUS_SCALE_RANGE = (0.75, 1.3)

# ---------------------------------------------------------------------------------------------------------
# Spec and ground truth
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSpec:
    """What slide to make. Everything that changes a pixel is here, so (spec) -> identical file bytes.

    ``fmt="svs"`` writes an Aperio SVS (OpenSlide vendor ``aperio``, ``aperio.MPP`` and ``aperio.AppMag``,
    thumbnail, label and macro images, identifying-looking description fields for de-identification tests);
    ``fmt="tiff"`` writes a generic tiled TIFF (vendor ``generic-tiff``) whose MPP is carried by the TIFF
    resolution tags in centimetres, or by nothing at all when ``with_mpp`` is false.
    """

    width: int = 8000
    height: int = 6000
    mpp: float = 0.5
    fmt: SlideFormat = "svs"
    tumour_fraction: float = 0.0
    seed: int = 0
    tile_size: int = 256
    jpeg_quality: int = 85
    n_tissue_blobs: int = 3
    with_mpp: bool = True
    with_associated_images: bool = True
    stain_jitter: float = 0.06
    artefacts: bool = (
        False  # pen strokes, blurred disks, dark debris, a faint disk (shared/slides/artefacts.py)
    )
    jpeg_tables: bool = False  # Aperio-style: quantisation/Huffman tables once per level (TIFF JPEGTables)
    rgb_coded_jpeg: bool = False  # JPEG coded in RGB, photometric RGB, no Adobe marker (as Aperio can write)
    # Site and patient effects (labelled cohorts). The defaults are exact no-ops: a spec without them gives
    # the same bytes as before they existed.
    stain_shift: tuple[float, float] = (1.0, 1.0)  # (eosin, haematoxylin) OD multipliers: a lab's protocol
    illumination_od: tuple[float, float, float] = (0.0, 0.0, 0.0)  # OD added per RGB channel: scanner cast
    nucleus_scale: float = 1.0  # nuclear radius multiplier of both classes: one patient's look
    # Scanner and stain look (shared/slides/looks.py). The default changes nothing. A look's JPEG quality,
    # when it has one, replaces ``jpeg_quality``; its red ink is drawn even without ``artefacts``.
    look: ScannerLook = field(default_factory=ScannerLook)

    def __post_init__(self) -> None:
        # Truth files store tuples as JSON lists and the look as an object; normalise so that a reloaded
        # spec equals (and hashes like) the one that wrote the slide.
        object.__setattr__(self, "stain_shift", tuple(float(v) for v in self.stain_shift))
        object.__setattr__(self, "illumination_od", tuple(float(v) for v in self.illumination_od))
        if isinstance(self.look, dict):
            object.__setattr__(self, "look", ScannerLook.from_json(self.look))
        if self.look.jpeg_quality is not None:
            object.__setattr__(self, "jpeg_quality", self.look.jpeg_quality)
        problems = []
        if not (64 <= self.width <= 400_000 and 64 <= self.height <= 400_000):
            problems.append(f"width x height {self.width}x{self.height} must each be within 64..400000 px")
        if not 0.05 <= self.mpp <= 20.0:
            problems.append(f"mpp {self.mpp} must be within 0.05..20 um/px (0.5 is 20x, 0.25 is 40x)")
        if self.fmt not in ("svs", "tiff"):
            problems.append(f"fmt {self.fmt!r} must be 'svs' or 'tiff'")
        if not 0.0 <= self.tumour_fraction <= 0.9:
            problems.append(f"tumour_fraction {self.tumour_fraction} must be 0 (normal) or up to 0.9")
        if self.tile_size % 16 or not 64 <= self.tile_size <= 2048:
            problems.append(f"tile_size {self.tile_size} must be a multiple of 16 within 64..2048 (240, 256)")
        if not 10 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality {self.jpeg_quality} must be within 10..100")
        if not 1 <= self.n_tissue_blobs <= 12:
            problems.append(f"n_tissue_blobs {self.n_tissue_blobs} must be within 1..12")
        if self.seed < 0:
            problems.append(f"seed {self.seed} must be >= 0")
        if self.rgb_coded_jpeg and not self.jpeg_tables:
            problems.append("rgb_coded_jpeg needs jpeg_tables (Aperio's RGB-coded tiles share tables)")
        if self.fmt == "svs" and not self.with_mpp:
            problems.append("with_mpp=False is only possible with fmt='tiff' (Aperio always records MPP)")
        problems += self._effect_problems()
        if problems:
            raise ValueError("invalid SynthSpec: " + "; ".join(problems))

    def _effect_problems(self) -> list[str]:
        """What is wrong with the site and patient effects (stain shift, colour cast, nucleus size)."""
        problems = []
        if len(self.stain_shift) != 2 or not all(
            STAIN_SHIFT_RANGE[0] <= v <= STAIN_SHIFT_RANGE[1] for v in self.stain_shift
        ):
            problems.append(
                f"stain_shift {self.stain_shift} must be two factors (eosin, haematoxylin) within "
                f"{STAIN_SHIFT_RANGE[0]}..{STAIN_SHIFT_RANGE[1]} (1.0 = unchanged)"
            )
        if len(self.illumination_od) != 3 or not all(
            ILLUMINATION_OD_RANGE[0] <= v <= ILLUMINATION_OD_RANGE[1] for v in self.illumination_od
        ):
            problems.append(
                f"illumination_od {self.illumination_od} must be three optical densities (R, G, B) within "
                f"{ILLUMINATION_OD_RANGE[0]}..{ILLUMINATION_OD_RANGE[1]} (0 = neutral, 0.05 = 5% darker)"
            )
        if not NUCLEUS_SCALE_RANGE[0] <= self.nucleus_scale <= NUCLEUS_SCALE_RANGE[1]:
            problems.append(
                f"nucleus_scale {self.nucleus_scale} must be within "
                f"{NUCLEUS_SCALE_RANGE[0]}..{NUCLEUS_SCALE_RANGE[1]} (1.0 = unchanged)"
            )
        return problems

    @property
    def label(self) -> str:
        return "tumour" if self.tumour_fraction > 0 else "normal"

    @property
    def objective_power(self) -> int:
        """Nominal objective: 20x at 0.5 um/px, 40x at 0.25 um/px (10 um/px divided by the MPP)."""
        return max(1, round(10.0 / self.mpp))

    def level_downsamples(self) -> list[int]:
        """Level 0, then downsamples 4, 16, ... while the smallest level is still 1024 px or more."""
        downsamples = [1]
        while max(self.width, self.height) // downsamples[-1] >= 1024:
            downsamples.append(downsamples[-1] * 4)
        return downsamples

    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(max(1, self.width // ds), max(1, self.height // ds)) for ds in self.level_downsamples()]


@dataclass
class SlideTruth:
    """What is on a generated slide. Masks are at ``mask_downsample`` (level-0 px per mask cell)."""

    path: Path
    label: str
    tumour_fraction_requested: float
    tumour_fraction_actual: float  # of the tissue area
    tissue_fraction: float  # of the slide area
    mpp: float
    width: int
    height: int
    seed: int
    fmt: str
    mask_downsample: int
    tissue_mask: BoolArray
    tumour_mask: BoolArray
    spec: SynthSpec
    identifying_properties: dict[str, str] = field(default_factory=dict)
    artefact_masks: dict[str, BoolArray] = field(default_factory=dict)  # pen/blur/debris/faint, mask grid
    pen_masks: dict[str, BoolArray] = field(default_factory=dict)  # per pen colour drawn, mask grid

    @property
    def truth_json_path(self) -> Path:
        return truth_json_path(self.path)

    @property
    def mask_path(self) -> Path:
        return mask_path(self.path)


def truth_json_path(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.name + ".truth.json")


def mask_path(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.name + ".mask.npz")


# ---------------------------------------------------------------------------------------------------------
# Layout: where tissue and tumour are, at a coarse grid
# ---------------------------------------------------------------------------------------------------------


def _mask_downsample(width: int, height: int) -> int:
    """Power of two (at least 8) that keeps the layout grid's long side at 512 cells or fewer."""
    downsample = 8
    while max(width, height) / downsample > 512:
        downsample *= 2
    return downsample


class Layout:
    """Signed distances (in grid cells, positive inside) to the tissue and tumour borders on a coarse grid.

    Interpolating a signed distance, rather than a mask, gives smooth borders at any resolution; the masks
    (distance > 0 at cell centres) are the ground truth.
    """

    def __init__(
        self,
        tissue_sdf: FloatArray,
        tumour_sdf: FloatArray | None,
        downsample: float,
        *,
        constant: tuple[float, float] | None = None,
    ) -> None:
        self.tissue_sdf = tissue_sdf
        self.tumour_sdf = tumour_sdf
        self.downsample = downsample
        self.constant = constant  # (tissue, tumour) membership everywhere, for standalone patches

    @classmethod
    def uniform(cls, kind: str) -> Layout:
        tissue, tumour = {"background": (0.0, 0.0), "normal": (1.0, 0.0), "tumour": (1.0, 1.0)}[kind]
        empty = np.zeros((1, 1), np.float32)
        return cls(empty, None, 1.0, constant=(tissue, tumour))

    @property
    def tissue_mask(self) -> BoolArray:
        return np.asarray(self.tissue_sdf > 0)

    @property
    def tumour_mask(self) -> BoolArray:
        if self.tumour_sdf is None:
            return np.zeros_like(self.tissue_mask)
        return np.asarray((self.tumour_sdf > 0) & self.tissue_mask)

    def window_distances(
        self, downsample: int, x0: int, y0: int, width: int, height: int
    ) -> tuple[FloatArray, FloatArray | None]:
        """Signed distances to the tissue and tumour borders, in pixels of the rendered level, for a window."""
        cells_per_px = downsample / self.downsample
        rows = _interpolation_indices(y0, height, cells_per_px, self.tissue_sdf.shape[0])
        cols = _interpolation_indices(x0, width, cells_per_px, self.tissue_sdf.shape[1])
        scale = np.float32(self.downsample / downsample)  # grid cells -> rendered pixels
        tissue = _bilinear(self.tissue_sdf, rows, cols) * scale
        tumour = None
        if self.tumour_sdf is not None:
            tumour = _bilinear(self.tumour_sdf, rows, cols) * scale
        return tissue, tumour

    def point_memberships(
        self,
        downsample: int,
        xs: IntArray,
        ys: IntArray,
        mpp_eff: float,
        roughness_px: FloatArray,
    ) -> tuple[FloatArray, FloatArray]:
        """Tissue and tumour membership (0..1) at pixel positions of the rendered level (for nuclei).

        ``roughness_px`` is the border displacement at those pixels, the same one the stroma gets, so that
        nuclei and stroma agree on where tissue and tumour end.
        """
        if self.constant is not None:
            return (
                np.full(xs.shape, self.constant[0], np.float32),
                np.full(xs.shape, self.constant[1], np.float32),
            )
        from scipy.ndimage import map_coordinates

        scale = self.downsample / downsample
        coords = np.stack([(ys + 0.5) / scale - 0.5, (xs + 0.5) / scale - 0.5])
        tissue_px = map_coordinates(self.tissue_sdf, coords, order=1, mode="nearest") * scale + roughness_px
        tissue = np.clip(0.5 + tissue_px / max(1.0, TISSUE_EDGE_UM / mpp_eff), 0, 1).astype(np.float32)
        if self.tumour_sdf is None:
            return tissue, np.zeros_like(tissue)
        tumour_px = map_coordinates(self.tumour_sdf, coords, order=1, mode="nearest") * scale + roughness_px
        tumour = np.clip(0.5 + tumour_px / max(1.0, TUMOUR_EDGE_UM / mpp_eff), 0, 1).astype(np.float32)
        return tissue, tumour


_Indices = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]


def _interpolation_indices(start: int, count: int, cells_per_px: float, n_cells: int) -> _Indices:
    """For each rendered pixel: the two grid cells around its centre and the weight of the upper one."""
    centres = (np.arange(start, start + count, dtype=np.float64) + 0.5) * cells_per_px - 0.5
    lower = np.floor(centres)
    frac = (centres - lower).astype(np.float32)
    lower_index = lower.astype(np.int64)
    return np.clip(lower_index, 0, n_cells - 1), np.clip(lower_index + 1, 0, n_cells - 1), frac


def _bilinear(grid: FloatArray, rows: _Indices, cols: _Indices) -> FloatArray:
    """Bilinear interpolation of a small grid onto a pixel window (plain indexing: no BLAS, no threads)."""
    row_lo, row_hi, row_frac = rows
    col_lo, col_hi, col_frac = cols
    first, last = int(row_lo.min()), int(row_hi.max())
    block = grid[first : last + 1]
    along_x = block[:, col_lo] * (1 - col_frac) + block[:, col_hi] * col_frac
    lower = along_x[row_lo - first]
    upper = along_x[row_hi - first]
    return np.asarray(lower + (upper - lower) * row_frac[:, None], np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> FloatArray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape), sigma=max(sigma, 0.5), mode="reflect")
    return ((noise - noise.mean()) / (noise.std() + 1e-9)).astype(np.float32)


def _signed_distance(mask: BoolArray) -> FloatArray:
    from scipy.ndimage import distance_transform_edt

    inside = distance_transform_edt(mask)
    outside = distance_transform_edt(~mask)
    # Zero half-way between a tissue cell centre and its nearest background neighbour.
    return np.asarray(inside - outside, np.float32)


def build_layout(spec: SynthSpec) -> Layout:
    """Tissue blobs and tumour regions from the seed. Deterministic, and cheap (a grid of <= 512 cells)."""
    downsample = _mask_downsample(spec.width, spec.height)
    grid_h, grid_w = math.ceil(spec.height / downsample), math.ceil(spec.width / downsample)
    rng = np.random.default_rng([spec.seed, 1])
    ys, xs = np.mgrid[0:grid_h, 0:grid_w].astype(np.float32)
    short_side = min(grid_h, grid_w)
    margin = max(3.0, 0.08 * short_side)
    edge_distance = np.minimum(np.minimum(xs, grid_w - 1 - xs), np.minimum(ys, grid_h - 1 - ys))
    edge_penalty = np.clip((margin - edge_distance) / margin, 0, None) * 3
    tissue = np.zeros((grid_h, grid_w), bool)
    for _attempt in range(20):
        field_value = np.full((grid_h, grid_w), -np.inf, np.float32)
        for _blob in range(spec.n_tissue_blobs):
            centre_x = rng.uniform(0.22, 0.78) * grid_w
            centre_y = rng.uniform(0.22, 0.78) * grid_h
            radius_x = rng.uniform(0.14, 0.30) * short_side * (grid_w / short_side) ** 0.5
            radius_y = rng.uniform(0.14, 0.30) * short_side * (grid_h / short_side) ** 0.5
            angle = rng.uniform(0, math.pi)
            dx, dy = xs - centre_x, ys - centre_y
            along = dx * math.cos(angle) + dy * math.sin(angle)
            across = -dx * math.sin(angle) + dy * math.cos(angle)
            distance = np.sqrt((along / radius_x) ** 2 + (across / radius_y) ** 2)
            field_value = np.maximum(field_value, 1 - distance)
        warp = _smooth_noise(rng, (grid_h, grid_w), 0.06 * short_side)
        field_value = field_value + 0.22 * warp - edge_penalty
        tissue = field_value > 0
        if tissue.mean() > 0.05:
            break
    tissue_sdf = _signed_distance(tissue)
    tumour_sdf = None
    if spec.tumour_fraction > 0:
        tumour_field = _smooth_noise(
            np.random.default_rng([spec.seed, 2]), (grid_h, grid_w), 0.05 * short_side
        )
        threshold = float(np.quantile(tumour_field[tissue], 1 - spec.tumour_fraction))
        region = tumour_field > threshold
        if not (region & tissue).any():  # a tiny fraction on a tiny grid: keep at least the peak cell
            region = tumour_field >= tumour_field[tissue].max()
        tumour_sdf = _signed_distance(region)
    return Layout(tissue_sdf, tumour_sdf, float(downsample))


# ---------------------------------------------------------------------------------------------------------
# Texture: periodic noise banks and nucleus stamps at the physical scale of one rendered downsample
# ---------------------------------------------------------------------------------------------------------


def _periodic_noise(
    rng: np.random.Generator, period: int, sigma_px: tuple[float, float], angle: float
) -> FloatArray:
    """Gaussian-filtered white noise that tiles seamlessly with the given period, unit standard deviation."""
    from scipy import fft

    white = rng.standard_normal((period, period), dtype=np.float32)
    fy = np.fft.fftfreq(period).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(period).astype(np.float32)[None, :]
    along = fx * np.float32(math.cos(angle)) + fy * np.float32(math.sin(angle))
    across = fy * np.float32(math.cos(angle)) - fx * np.float32(math.sin(angle))
    scale = np.float32(-2 * math.pi**2)
    transfer = np.exp(scale * ((sigma_px[0] * along) ** 2 + (sigma_px[1] * across) ** 2))
    noise = fft.irfft2(fft.rfft2(white) * transfer, s=(period, period))
    noise -= noise.mean()
    noise /= noise.std() + 1e-12
    return np.asarray(noise, np.float32)


class TextureBank:
    """Noise channels (grain, fibre, coarse) for one pixel size, sampled by absolute pixel position.

    Each channel is the sum of two seamless periodic fields with different periods, so texture is continuous
    across tiles and never visibly repeats, and sampling it costs a slice.
    """

    CHANNELS = ("grain", "fibre", "coarse")

    def __init__(self, seed: int, mpp_eff: float, pad: int = NUCLEUS_CELL_PX) -> None:
        self.pad = pad
        self.banks: list[tuple[int, FloatArray]] = []
        self.amplitudes = np.ones(len(self.CHANNELS), np.float32)
        sigmas_um = [(GRAIN_SIGMA_UM, GRAIN_SIGMA_UM), FIBRE_SIGMA_UM, (COARSE_SIGMA_UM, COARSE_SIGMA_UM)]
        for bank_index, period in enumerate(TEXTURE_PERIODS):
            rng = np.random.default_rng([seed, 3, bank_index])
            channels = []
            for channel_index, sigma_um in enumerate(sigmas_um):
                sigma_px = (sigma_um[0] / mpp_eff, sigma_um[1] / mpp_eff)
                # Texture finer than a pixel averages out: clamp the filter, shrink the amplitude instead.
                shrink = min(1.0, math.sqrt(sigma_px[0] * sigma_px[1]) / 0.6)
                self.amplitudes[channel_index] = shrink
                clamped = (max(sigma_px[0], 0.6), max(sigma_px[1], 0.6))
                angle = rng.uniform(0, math.pi)
                channels.append(_periodic_noise(rng, period, clamped, angle))
            stacked = np.stack(channels)
            self.banks.append((period, np.pad(stacked, ((0, 0), (0, pad), (0, pad)), mode="wrap")))

    def sample(self, x0: int, y0: int, width: int, height: int) -> FloatArray:
        """(3, height, width) noise, unit variance at full resolution, scaled down where sub-pixel."""
        total = np.zeros((len(self.CHANNELS), height, width), np.float32)
        for period, bank in self.banks:
            oy, ox = y0 % period, x0 % period
            if width <= self.pad and height <= self.pad:
                total += bank[:, oy : oy + height, ox : ox + width]
            else:
                rows = (oy + np.arange(height)) % period
                cols = (ox + np.arange(width)) % period
                total += bank[:, rows[:, None], cols[None, :]]
        total *= (self.amplitudes / math.sqrt(len(self.banks)))[:, None, None]
        return total

    def sample_points(self, channel: int, xs: IntArray, ys: IntArray) -> FloatArray:
        """One channel at arbitrary pixel positions; equals ``sample`` at those pixels."""
        total = np.zeros(xs.shape, np.float32)
        for period, bank in self.banks:
            total += bank[channel, ys % period, xs % period]
        return total * np.float32(self.amplitudes[channel] / math.sqrt(len(self.banks)))


@dataclass
class StampSet:
    """Anti-aliased nucleus shapes for one tissue class at one pixel size, as sparse pixel lists.

    Row k holds stamp k's covered pixels (offsets from the centre, coverage), padded with zero coverage to a
    common length so that many nuclei are drawn with one gather and one bincount.
    """

    offsets_y: NDArray[np.int32]  # (STAMPS_PER_CLASS, pixels)
    offsets_x: NDArray[np.int32]
    coverage: NDArray[np.float32]
    reach: int  # max |offset|: nuclei farther than this from a window cannot touch it


def _make_stamps(tissue_class: TissueClass, mpp_eff: float, seed: int) -> StampSet | None:
    """Nucleus stamps, or None when nuclei are too small in pixels to draw (coverage-field mode)."""
    radius_px = tissue_class.radius_um[0] / mpp_eff
    if radius_px < STAMP_MODE_MIN_RADIUS_PX:
        return None
    rng = np.random.default_rng([seed, 4, tissue_class.class_id])
    max_extent = (
        tissue_class.radius_um[1] / mpp_eff * tissue_class.aspect[1] * (1 + tissue_class.irregularity[1])
    )
    reach = math.ceil(max_extent) + 1
    supersample = 4
    side = 2 * reach + 1
    sub = (np.arange(side * supersample) + 0.5) / supersample - (reach + 0.5)
    sub_y, sub_x = np.meshgrid(sub, sub, indexing="ij")
    stamps: list[tuple[NDArray[np.int32], NDArray[np.int32], NDArray[np.float32]]] = []
    for _ in range(STAMPS_PER_CLASS):
        radius = rng.uniform(*tissue_class.radius_um) / mpp_eff
        aspect = rng.uniform(*tissue_class.aspect)
        angle = rng.uniform(0, math.pi)
        along = sub_x * math.cos(angle) + sub_y * math.sin(angle)
        across = -sub_x * math.sin(angle) + sub_y * math.cos(angle)
        theta = np.arctan2(across * aspect, along)
        perturbation = np.ones_like(theta)
        for harmonic in (2, 3, 5):
            amplitude = rng.uniform(*tissue_class.irregularity) / harmonic * 2
            perturbation = perturbation + amplitude * np.cos(harmonic * theta + rng.uniform(0, 2 * math.pi))
        distance = np.sqrt(
            (along / (radius * math.sqrt(aspect))) ** 2 + (across * math.sqrt(aspect) / radius) ** 2
        )
        inside = (distance <= perturbation).astype(np.float32)
        coverage = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
        nonzero_y, nonzero_x = np.nonzero(coverage > 0.02)
        stamps.append(
            (
                (nonzero_y - reach).astype(np.int32),
                (nonzero_x - reach).astype(np.int32),
                coverage[nonzero_y, nonzero_x].astype(np.float32),
            )
        )
    length = max(len(stamp[2]) for stamp in stamps)
    result = StampSet(
        offsets_y=np.zeros((STAMPS_PER_CLASS, length), np.int32),
        offsets_x=np.zeros((STAMPS_PER_CLASS, length), np.int32),
        coverage=np.zeros((STAMPS_PER_CLASS, length), np.float32),
        reach=reach,
    )
    for index, (offsets_y, offsets_x, coverage) in enumerate(stamps):
        result.offsets_y[index, : len(coverage)] = offsets_y
        result.offsets_x[index, : len(coverage)] = offsets_x
        result.coverage[index, : len(coverage)] = coverage
    return result


@dataclass
class NucleusCell:
    """Nuclei of one tissue class whose centres fall in one grid cell (absolute rendered-level pixels)."""

    xs: IntArray
    ys: IntArray
    stamp: NDArray[np.uint8]
    haematoxylin: NDArray[np.float32]
    keep: NDArray[np.float32]  # uniform draw, compared with the class membership at the centre


# ---------------------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------------------


class Renderer:
    """Renders any window of a slide (or of uniform tissue) at an integer downsample of level 0.

    Pixels depend only on (seed, layout, downsample, absolute position), never on the window's size or on
    what was rendered before, so stored tiles, ``render_region`` and neighbouring tiles agree.
    """

    def __init__(
        self,
        layout: Layout,
        mpp: float,
        seed: int,
        stain_scale: tuple[float, float] = (1.0, 1.0),
        *,
        illumination_od: tuple[float, float, float] = (0.0, 0.0, 0.0),
        nucleus_scale: float = 1.0,
        look: ScannerLook | None = None,
    ):
        self.layout = layout
        self.mpp = mpp
        self.seed = seed
        self.look = look or ScannerLook()
        self.eosin_scale, self.haematoxylin_scale = stain_scale
        if self.look.stain_intensity != (1.0, 1.0):
            self.eosin_scale *= self.look.stain_intensity[0]
            self.haematoxylin_scale *= self.look.stain_intensity[1]
        # None when neutral, so that a neutral renderer does not even add zeros (bytes stay as they were).
        self.illumination_od = np.asarray(illumination_od, np.float32) if any(illumination_od) else None
        if self.look.white_rgb is not None:
            # The glass white point is the illumination: an OD offset that takes the reference glass
            # (GLASS_OD) to the look's white, added to glass and tissue alike.
            white_od = -np.log(np.asarray(self.look.white_rgb, np.float64) / 255.0) - GLASS_OD
            self.illumination_od = (np.asarray(illumination_od, np.float64) + white_od).astype(np.float32)
        self.eosin_od, self.haematoxylin_od = EOSIN_OD, HAEMATOXYLIN_OD
        if self.look.stain_hue_deg != (0.0, 0.0):
            self.eosin_od = hue_rotated(EOSIN_OD, self.look.stain_hue_deg[0])
            self.haematoxylin_od = hue_rotated(HAEMATOXYLIN_OD, self.look.stain_hue_deg[1])
        self.normal, self.tumour = NORMAL, TUMOUR
        if nucleus_scale != 1.0:
            self.normal, self.tumour = (
                dataclasses.replace(
                    tissue_class,
                    radius_um=(
                        tissue_class.radius_um[0] * nucleus_scale,
                        tissue_class.radius_um[1] * nucleus_scale,
                    ),
                )
                for tissue_class in (NORMAL, TUMOUR)
            )
        self._banks: OrderedDict[int, TextureBank] = OrderedDict()
        self._stamps: dict[tuple[int, int], StampSet | None] = {}
        self._cells: OrderedDict[tuple[int, int, int, int], NucleusCell] = OrderedDict()
        self._cell_cache_size = 1024

    def cache_rows_of(self, level_width: int) -> None:
        """Keep the nuclei of about three rows of cells of a level this wide: enough for row-major tiling,
        without letting the cache of a very wide slide grow to hundreds of megabytes."""
        self._cell_cache_size = 2 * 3 * (math.ceil(level_width / NUCLEUS_CELL_PX) + 3)

    # -- cached building blocks ------------------------------------------------------------------------

    def _bank(self, downsample: int) -> TextureBank:
        if downsample not in self._banks:
            self._banks[downsample] = TextureBank(self.seed + 7919 * downsample, self.mpp * downsample)
            while len(self._banks) > 2:
                self._banks.popitem(last=False)
        self._banks.move_to_end(downsample)
        return self._banks[downsample]

    def _stamp_set(self, tissue_class: TissueClass, downsample: int) -> StampSet | None:
        key = (tissue_class.class_id, downsample)
        if key not in self._stamps:
            self._stamps[key] = _make_stamps(tissue_class, self.mpp * downsample, self.seed + downsample)
        return self._stamps[key]

    def _cell(self, tissue_class: TissueClass, downsample: int, cell_x: int, cell_y: int) -> NucleusCell:
        key = (tissue_class.class_id, downsample, cell_x, cell_y)
        cached = self._cells.get(key)
        if cached is not None:
            self._cells.move_to_end(key)
            return cached
        rng = np.random.default_rng(
            [self.seed, 5, tissue_class.class_id, downsample, cell_x % 2**32, cell_y % 2**32]
        )
        cell_um = NUCLEUS_CELL_PX * self.mpp * downsample
        count = int(rng.poisson(tissue_class.nuclei_per_um2 * cell_um * cell_um))
        cell = NucleusCell(
            xs=(cell_x * NUCLEUS_CELL_PX + rng.integers(0, NUCLEUS_CELL_PX, count)).astype(np.int32),
            ys=(cell_y * NUCLEUS_CELL_PX + rng.integers(0, NUCLEUS_CELL_PX, count)).astype(np.int32),
            stamp=rng.integers(0, STAMPS_PER_CLASS, count).astype(np.uint8),
            haematoxylin=rng.uniform(*tissue_class.haematoxylin, count).astype(np.float32),
            keep=rng.random(count, dtype=np.float32),
        )
        self._cells[key] = cell
        while len(self._cells) > self._cell_cache_size:
            self._cells.popitem(last=False)
        return cell

    # -- nuclei ----------------------------------------------------------------------------------------

    def _draw_nuclei(
        self,
        tissue_class: TissueClass,
        stamps: StampSet,
        downsample: int,
        window: tuple[int, int, int, int],
        coverage_sum: NDArray[np.float64],
        haematoxylin_sum: NDArray[np.float64],
    ) -> None:
        x0, y0, width, height = window
        reach = stamps.reach
        cells_x = range((x0 - reach) // NUCLEUS_CELL_PX, (x0 + width + reach) // NUCLEUS_CELL_PX + 1)
        cells_y = range((y0 - reach) // NUCLEUS_CELL_PX, (y0 + height + reach) // NUCLEUS_CELL_PX + 1)
        cells = [self._cell(tissue_class, downsample, cx, cy) for cy in cells_y for cx in cells_x]
        xs = np.concatenate([c.xs for c in cells])
        ys = np.concatenate([c.ys for c in cells])
        near = (
            (xs >= x0 - reach) & (xs < x0 + width + reach) & (ys >= y0 - reach) & (ys < y0 + height + reach)
        )
        if not near.any():
            return
        xs, ys = xs[near], ys[near]
        stamp = np.concatenate([c.stamp for c in cells])[near]
        haematoxylin = np.concatenate([c.haematoxylin for c in cells])[near]
        keep = np.concatenate([c.keep for c in cells])[near]
        mpp_eff = self.mpp * downsample
        roughness = self._bank(downsample).sample_points(2, xs, ys) * np.float32(
            BORDER_ROUGHNESS_UM / mpp_eff
        )
        tissue, tumour = self.layout.point_memberships(downsample, xs, ys, mpp_eff, roughness)
        membership = tissue * (tumour if tissue_class.class_id == TUMOUR.class_id else 1 - tumour)
        chosen = keep < membership
        if not chosen.any():
            return
        xs, ys, stamp, haematoxylin = xs[chosen] - x0, ys[chosen] - y0, stamp[chosen], haematoxylin[chosen]
        pixel_y = ys[:, None] + stamps.offsets_y[stamp]
        pixel_x = xs[:, None] + stamps.offsets_x[stamp]
        coverage = stamps.coverage[stamp]
        inside = (pixel_y >= 0) & (pixel_y < height) & (pixel_x >= 0) & (pixel_x < width) & (coverage > 0)
        flat = (pixel_y * width + pixel_x)[inside]
        weights = coverage[inside]
        coverage_sum += np.bincount(flat, weights, minlength=width * height)
        weighted_haematoxylin = (coverage * haematoxylin[:, None])[inside]
        haematoxylin_sum += np.bincount(flat, weighted_haematoxylin, minlength=width * height)

    @staticmethod
    def _coverage_field(
        tissue_class: TissueClass, mpp_eff: float, grain: FloatArray
    ) -> tuple[FloatArray, float]:
        """Expected nuclear coverage per pixel where nuclei are sub-pixel, with counting noise."""
        mean_coverage = 1 - math.exp(-tissue_class.nuclei_per_um2 * tissue_class.mean_nucleus_area_um2)
        pixel_area = mpp_eff * mpp_eff
        spread = math.sqrt(
            mean_coverage * (1 - mean_coverage) * min(1.0, tissue_class.mean_nucleus_area_um2 / pixel_area)
        )
        coverage = np.clip(mean_coverage + spread * grain, 0, 1).astype(np.float32)
        return coverage, float(np.mean(tissue_class.haematoxylin))

    # -- the window ------------------------------------------------------------------------------------

    def render(
        self,
        downsample: int,
        x0: int,
        y0: int,
        width: int,
        height: int,
        stain_scale: tuple[float, float] | None = None,
    ) -> NDArray[np.uint8]:
        """RGB uint8 (height, width, 3) of the window at pixel (x0, y0) of the level with this downsample.

        ``stain_scale`` (eosin, haematoxylin strength) overrides the renderer's per-slide staining.
        """
        eosin_scale, haematoxylin_scale = stain_scale or (self.eosin_scale, self.haematoxylin_scale)
        mpp_eff = self.mpp * downsample
        noise = self._bank(downsample).sample(x0, y0, width, height)
        grain, fibre, coarse = noise[0], noise[1], noise[2]
        optical_density = np.empty((height, width, 3), np.float32)
        glass = GLASS_OD + GLASS_OD_NOISE * grain
        optical_density[...] = glass[..., None]

        tissue, tumour = self._memberships(downsample, x0, y0, width, height, mpp_eff, coarse)
        if tissue is not None and not tissue.any():
            return self._to_rgb(optical_density, downsample, x0)
        tissue_weight = np.float32(1.0) if tissue is None else tissue
        tumour_weight = np.float32(0.0) if tumour is None else tumour

        stroma_eosin = NORMAL.stroma_eosin + (TUMOUR.stroma_eosin - NORMAL.stroma_eosin) * tumour_weight
        stroma_haem = (
            NORMAL.stroma_haematoxylin
            + (TUMOUR.stroma_haematoxylin - NORMAL.stroma_haematoxylin) * tumour_weight
        )
        eosin = stroma_eosin * (1 + 0.12 * coarse + 0.22 * fibre + 0.05 * grain)

        coverage_sum = np.zeros(width * height, np.float64)
        haematoxylin_sum = np.zeros(width * height, np.float64)
        for tissue_class, weight in (
            (self.normal, tissue_weight * (1 - tumour_weight)),
            (self.tumour, tissue_weight * tumour_weight),
        ):
            if not np.any(weight):
                continue
            stamps = self._stamp_set(tissue_class, downsample)
            if stamps is not None:
                self._draw_nuclei(
                    tissue_class, stamps, downsample, (x0, y0, width, height), coverage_sum, haematoxylin_sum
                )
            else:
                field_coverage, field_haem = self._coverage_field(tissue_class, mpp_eff, grain)
                weighted = (field_coverage * weight).ravel()
                coverage_sum += weighted
                haematoxylin_sum += weighted * field_haem
        nuclear_coverage = np.minimum(coverage_sum, 1.0).reshape(height, width).astype(np.float32)
        nuclear_haem = (haematoxylin_sum / np.maximum(coverage_sum, 1e-6)).reshape(height, width)
        nuclear_haem = nuclear_haem.astype(np.float32) * (1 + 0.18 * grain)

        eosin = eosin * (1 - 0.55 * nuclear_coverage) * (tissue_weight * eosin_scale)
        haematoxylin = stroma_haem * (1 + 0.3 * coarse) * tissue_weight + nuclear_coverage * nuclear_haem
        haematoxylin = np.maximum(haematoxylin, 0) * haematoxylin_scale
        optical_density += np.maximum(eosin, 0)[..., None] * self.eosin_od
        optical_density += haematoxylin[..., None] * self.haematoxylin_od
        return self._to_rgb(optical_density, downsample, x0)

    def _to_rgb(self, optical_density: FloatArray, downsample: int, x0: int) -> NDArray[np.uint8]:
        """RGB from optical density, after the scanner's colour cast and white point and its strip
        boundaries (they darken or tint glass and tissue alike)."""
        if self.illumination_od is not None:
            optical_density += self.illumination_od
        if self.look.stripe_period_um > 0:
            pixel_um = self.mpp * downsample
            x_um = (np.arange(x0, x0 + optical_density.shape[1], dtype=np.float64) + 0.5) * pixel_um
            bands = stripe_od(x_um, pixel_um, self.look.stripe_period_um, self.look.stripe_depth)
            optical_density += bands[None, :, None]
        return _to_rgb(optical_density)

    def _memberships(
        self, downsample: int, x0: int, y0: int, width: int, height: int, mpp_eff: float, coarse: FloatArray
    ) -> tuple[FloatArray | None, FloatArray | None]:
        """Per-pixel tissue and tumour membership (0..1), or None where the layout is uniform."""
        if self.layout.constant is not None:
            tissue_value, tumour_value = self.layout.constant
            tissue = np.full((height, width), tissue_value, np.float32)
            tumour = np.full((height, width), tumour_value, np.float32)
            return tissue, tumour
        tissue_px, tumour_px = self.layout.window_distances(downsample, x0, y0, width, height)
        roughness = BORDER_ROUGHNESS_UM / mpp_eff
        tissue = np.clip(0.5 + (tissue_px + roughness * coarse) / max(1.0, TISSUE_EDGE_UM / mpp_eff), 0, 1)
        if tumour_px is None:
            return tissue, None
        tumour = np.clip(0.5 + (tumour_px + roughness * coarse) / max(1.0, TUMOUR_EDGE_UM / mpp_eff), 0, 1)
        return tissue, tumour


def _to_rgb(optical_density: FloatArray) -> NDArray[np.uint8]:
    intensity = np.exp(-optical_density)
    intensity *= 255.0
    intensity += 0.5
    np.clip(intensity, 0, 255, out=intensity)
    return intensity.astype(np.uint8)


def _stain_scale(seed: int, jitter: float) -> tuple[float, float]:
    """Per-slide staining strength, as real batches vary: tests stain normalisation a little."""
    rng = np.random.default_rng([seed, 6])
    return float(1 + rng.uniform(-jitter, jitter)), float(1 + rng.uniform(-jitter, jitter))


def _slide_renderer(spec: SynthSpec, layout: Layout | None = None) -> Renderer:
    eosin, haematoxylin = _stain_scale(spec.seed, spec.stain_jitter)
    eosin_shift, haematoxylin_shift = spec.stain_shift
    return Renderer(
        layout or build_layout(spec),
        spec.mpp,
        spec.seed,
        (eosin * eosin_shift, haematoxylin * haematoxylin_shift),  # x 1.0 is exact: default bytes unchanged
        illumination_od=spec.illumination_od,
        nucleus_scale=spec.nucleus_scale,
        look=spec.look,
    )


# ---------------------------------------------------------------------------------------------------------
# Public rendering helpers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _patch_renderer(kind: str, mpp: float) -> Renderer:
    return Renderer(Layout.uniform(kind), mpp, seed=0x5EED)


def render_patch(kind: str, size_px: int, mpp: float, rng: np.random.Generator) -> NDArray[np.uint8]:
    """A standalone (size_px, size_px, 3) uint8 patch of "background", "normal" or "tumour" tissue.

    Same look as slide tiles at that MPP (same stains, same nuclei, same physical scale); the patch position
    in an endless texture and a mild staining variation are drawn from ``rng``, so a seeded generator gives
    reproducible training bags without writing whole slides.
    """
    if kind not in PATCH_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(PATCH_KINDS)}")
    if not 8 <= size_px <= 4096:
        raise ValueError(f"size_px {size_px} must be within 8..4096")
    if not 0.05 <= mpp <= 20:
        raise ValueError(f"mpp {mpp} must be within 0.05..20 um/px")
    renderer = _patch_renderer(kind, round(float(mpp), 6))
    x0, y0 = (int(v) for v in rng.integers(0, 2**24, 2))
    eosin_scale, haematoxylin_scale = (float(v) for v in 1 + rng.uniform(-0.06, 0.06, 2))
    return renderer.render(1, x0, y0, size_px, size_px, stain_scale=(eosin_scale, haematoxylin_scale))


def render_region(
    spec: SynthSpec, x0: int, y0: int, width: int, height: int, downsample: int = 1
) -> NDArray[np.uint8]:
    """Pixels of the slide ``spec`` describes, without writing it: (height, width, 3) uint8.

    Like OpenSlide's ``read_region``, (x0, y0) is in level-0 pixels and (width, height) in pixels of the
    output downsample. At a pyramid downsample (1, 4, 16...) and a position on that level's pixel grid the
    result equals the decoded stored tiles up to JPEG loss.
    """
    if downsample < 1 or width < 1 or height < 1:
        raise ValueError("downsample, width and height must be positive")
    return _slide_renderer(spec).render(downsample, x0 // downsample, y0 // downsample, width, height)


# ---------------------------------------------------------------------------------------------------------
# Writing slides
# ---------------------------------------------------------------------------------------------------------

_APERIO_HEADER = "Aperio Image Library v12.0.15"
_FIRST_NAMES = ("JANE", "JOHN", "MARIA", "WEI", "AMIR", "OLGA", "KOFI", "LENA")
_LAST_NAMES = ("DOE", "SMITH", "GARCIA", "MULLER", "TANAKA", "NOWAK", "OKAFOR", "ROSSI")


def identifying_fields(seed: int) -> dict[str, str]:
    """Person- and case-identifying fields of the kind scanners embed; material for de-identification tests."""
    rng = np.random.default_rng([seed, 8])
    first, last = (
        _FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))],
        _LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))],
    )
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hour, minute, second = int(rng.integers(7, 19)), int(rng.integers(60)), int(rng.integers(60))
    return {
        "Filename": f"PATIENT-{last}-{first}-{100 + seed % 900}",
        "Date": f"{month:02d}/{day:02d}/26",
        "Time": f"{hour:02d}:{minute:02d}:{second:02d}",
        "Time Zone": "GMT+01:00",
        "User": f"{first.lower()}.{last.lower()}@example-hospital.org",
        "ScanScope ID": f"SS{1000 + seed % 9000}",
        "Barcode": f"S26-{10000 + seed % 90000}-A1",
    }


def _aperio_description(spec: SynthSpec, size_line: str) -> str:
    fields = {
        "AppMag": str(spec.objective_power),
        "StripeWidth": "2040",
        **identifying_fields(spec.seed),
        "MPP": f"{spec.mpp:.4f}",
        "Left": "25.0",
        "Top": "18.0",
        "LineCameraSkew": "0",
        "Focus Offset": "0.000000",
        "ImageID": str(100000 + spec.seed),
        "OriginalWidth": str(spec.width),
        "OriginalHeight": str(spec.height),
        "Exposure Time": "109",
        "Exposure Scale": "0.000001",
        "DisplayColor": "0",
        "ICC Profile": "ScanScope v1",
        "Generator": GENERATOR_VERSION,
    }
    return f"{_APERIO_HEADER} \r\n{size_line}|" + "|".join(
        f"{key} = {value}" for key, value in fields.items()
    )


def _tile_iterator(
    renderer: Renderer,
    downsample: int,
    level_size: tuple[int, int],
    tile_size: int,
    on_tile: Callable[[], None],
    artefacts: Artefacts | None = None,
) -> Iterator[NDArray[np.uint8]]:
    width, height = level_size
    renderer.cache_rows_of(width)

    def clean(x0: int, y0: int, window_w: int, window_h: int) -> NDArray[np.uint8]:
        return renderer.render(downsample, x0, y0, window_w, window_h)

    for tile_y in range(0, height, tile_size):
        for tile_x in range(0, width, tile_size):
            if artefacts is None or artefacts.is_empty:
                tile = clean(tile_x, tile_y, tile_size, tile_size)
            else:
                px_um = renderer.mpp * downsample
                tile = render_with_artefacts(
                    clean,
                    artefacts,
                    px_um,
                    tile_x,
                    tile_y,
                    tile_size,
                    tile_size,
                    white_rgb=renderer.look.white_rgb,
                )
            on_tile()
            yield tile


_DQT, _DHT, _SOS, _APP0, _APP14, _SOF0, _SOF1 = 0xDB, 0xC4, 0xDA, 0xE0, 0xEE, 0xC0, 0xC1


def _numbered_components(segment: bytes, first: int, stride: int) -> bytes:
    """A SOF or SOS segment with component ids 0, 1, 2, as Aperio writes them (libjpeg writes 'R', 'G', 'B' for RGB data,
    which would tell a decoder the colour space; Aperio's RGB-coded tiles do not)."""
    data = bytearray(segment)
    count = data[first - 1]
    for index in range(count):
        data[first + index * stride] = index
    return bytes(data)


def split_jpeg_tables(stream: bytes, *, drop_colour_markers: bool = False) -> tuple[bytes, bytes]:
    """(tables, abbreviated stream) of a baseline JPEG: DQT and DHT move into a tables-only stream
    (SOI, tables, EOI), as TIFF's JPEGTables tag holds them. ``drop_colour_markers`` also removes the
    JFIF and Adobe markers and numbers the components 0, 1, 2, so that only the TIFF photometric tag
    says how the data is coded."""
    if not stream.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG stream (no SOI marker)")
    tables, rest = [b"\xff\xd8"], [b"\xff\xd8"]
    position = 2
    while position < len(stream):
        if stream[position] != 0xFF:
            raise ValueError(f"corrupt JPEG stream: no marker at byte {position}")
        marker = stream[position + 1]
        if marker == _SOS:
            if drop_colour_markers:
                length = int.from_bytes(stream[position + 2 : position + 4], "big")
                rest.append(_numbered_components(stream[position : position + 2 + length], 5, 2))
                rest.append(stream[position + 2 + length :])
            else:
                rest.append(stream[position:])
            break
        length = int.from_bytes(stream[position + 2 : position + 4], "big")
        segment = stream[position : position + 2 + length]
        if marker in (_DQT, _DHT):
            tables.append(segment)
        elif drop_colour_markers and marker in (_SOF0, _SOF1):
            rest.append(_numbered_components(segment, 10, 3))
        elif not (drop_colour_markers and marker in (_APP0, _APP14)):
            rest.append(segment)
        position += 2 + length
    tables.append(b"\xff\xd9")
    return b"".join(tables), b"".join(rest)


class _TileEncoder:
    """Encodes tiles itself (instead of tifffile) for the Aperio variants: shared tables, RGB-coded."""

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec
        self.tables: bytes | None = None

    def encode(self, tile: NDArray[np.uint8]) -> bytes:
        from imagecodecs import jpeg8_encode

        rgb_coded = self.spec.rgb_coded_jpeg
        stream = bytes(
            jpeg8_encode(
                tile,
                level=self.spec.jpeg_quality,
                colorspace="RGB",
                outcolorspace="RGB" if rgb_coded else "YCBCR",
                subsampling="444" if rgb_coded else "420",
            )
        )
        if not self.spec.jpeg_tables:
            return stream
        tables, abbreviated = split_jpeg_tables(stream, drop_colour_markers=rgb_coded)
        if self.tables is None:
            self.tables = tables
        elif tables != self.tables:
            raise ValueError("libjpeg produced different tables for two tiles; cannot share JPEGTables")
        return abbreviated

    def level_tables(self, first_tile: NDArray[np.uint8]) -> bytes | None:
        """The tables every tile of a level will use (encoded once from its first tile)."""
        if not self.spec.jpeg_tables:
            return None
        self.encode(first_tile)
        return self.tables


def _label_image(spec: SynthSpec) -> NDArray[np.uint8]:
    """A slide label: case number, a name and a barcode-like stripe pattern, as scanners photograph them."""
    from PIL import Image, ImageDraw

    fields = identifying_fields(spec.seed)
    image = Image.new("RGB", (400, 400), (250, 250, 246))
    draw = ImageDraw.Draw(image)
    draw.text((20, 20), fields["Barcode"], fill=(10, 10, 10))
    draw.text((20, 50), fields["Filename"], fill=(10, 10, 10))
    draw.text((20, 80), fields["Date"], fill=(10, 10, 10))
    rng = np.random.default_rng([spec.seed, 9])
    x = 20
    while x < 380:
        bar = int(rng.integers(2, 7))
        if rng.random() < 0.55:
            draw.rectangle((x, 140, x + bar - 1, 360), fill=(0, 0, 0))
        x += bar
    return np.asarray(image)


def _macro_image(spec: SynthSpec, renderer: Renderer) -> NDArray[np.uint8]:
    """Photograph of the whole glass: the label on the left, the tissue overview on the right."""
    from PIL import Image

    overview_height = 400
    overview_width = max(16, round(spec.width * overview_height / spec.height))
    overview = _render_overview(spec, renderer, (overview_width, overview_height))
    label = _label_image(spec)

    label_small = np.asarray(Image.fromarray(label).resize((overview_height, overview_height)))
    macro = np.concatenate([label_small, overview], axis=1)
    return np.ascontiguousarray(macro[:, : (macro.shape[1] // 16) * 16])


def _render_overview(spec: SynthSpec, renderer: Renderer, size: tuple[int, int]) -> NDArray[np.uint8]:
    """The whole slide at ``size`` (about 1024 px or less): rendered in strips at the nearest integer
    downsample, then resized, so that memory stays bounded whatever the slide size."""
    from PIL import Image

    downsample = max(1, math.floor(min(spec.width / size[0], spec.height / size[1])))
    width, height = math.ceil(spec.width / downsample), math.ceil(spec.height / downsample)
    overview = np.empty((height, width, 3), np.uint8)
    for strip_y in range(0, height, NUCLEUS_CELL_PX):
        strip_height = min(NUCLEUS_CELL_PX, height - strip_y)
        overview[strip_y : strip_y + strip_height] = renderer.render(
            downsample, 0, strip_y, width, strip_height
        )
    return np.asarray(Image.fromarray(overview).resize(size, Image.Resampling.BOX))


class _Progress:
    """Counts rendered tiles and reports the fraction done to a callback at most every ``interval_s``."""

    def __init__(self, total_tiles: int, callback: Callable[[float], None] | None, interval_s: float = 3.0):
        self.total = max(1, total_tiles)
        self.done = 0
        self.callback = callback
        self.interval_s = interval_s
        self.last_report = time.monotonic()

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None and time.monotonic() - self.last_report >= self.interval_s:
            self.last_report = time.monotonic()
            self.callback(self.done / self.total)


def generate_slide(
    path: Path, spec: SynthSpec, *, progress: Callable[[float], None] | None = None
) -> SlideTruth:
    """Write the slide ``spec`` describes to ``path`` (streaming, bounded memory) plus its ground truth.

    Writes ``<path>.truth.json`` and ``<path>.mask.npz`` beside the slide. ``progress`` receives the fraction
    of tiles done every few seconds, for big slides. Existing files are overwritten. The slide is written
    under a temporary name and renamed when complete, so a watcher never picks up half a slide.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = build_layout(spec)
    renderer = _slide_renderer(spec, layout)
    artefacts = _artefacts_for(spec, layout)
    encoder = _TileEncoder(spec) if spec.jpeg_tables else None
    downsamples = spec.level_downsamples()
    level_sizes = spec.level_dimensions()
    tile = spec.tile_size
    total_tiles = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_sizes)
    counter = _Progress(total_tiles, progress)
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": spec.jpeg_quality},
        "metadata": None,
        "maxworkers": 1,
    }
    if spec.fmt == "tiff" and spec.with_mpp:
        pixels_per_cm = 1e4 / spec.mpp
        common["resolution"] = (pixels_per_cm, pixels_per_cm)
        common["resolutionunit"] = "CENTIMETER"

    partial_path = path.with_name(f".{path.name}.partial")
    with tifffile.TiffWriter(partial_path, bigtiff=spec.width * spec.height > 2**31) as writer:
        for index, (downsample, (level_w, level_h)) in enumerate(zip(downsamples, level_sizes, strict=True)):
            if spec.fmt == "svs":
                size_line = (
                    f"{spec.width}x{spec.height} [0,100 {spec.width}x{spec.height}] ({tile}x{tile}) "
                    f"JPEG/RGB Q={spec.jpeg_quality}"
                    if index == 0
                    else f"{spec.width}x{spec.height} -> {level_w}x{level_h} - ({tile}x{tile}) "
                    f"JPEG/RGB Q={spec.jpeg_quality}"
                )
                description = _aperio_description(spec, size_line)
            else:
                description = f"WSI Toolkit synthetic slide ({GENERATOR_VERSION}) level {index}"
            tiles = _tile_iterator(renderer, downsample, (level_w, level_h), tile, counter.tick, artefacts)
            level_args = dict(common)
            if encoder is not None:  # pre-encoded tiles: tifffile writes the bytes and the tags as told
                first = next(tiles)
                level_args["jpegtables"] = encoder.level_tables(first)
                if spec.rgb_coded_jpeg:
                    level_args["compressionargs"] = {"outcolorspace": "RGB"}
                    level_args["subsampling"] = (1, 1)
                level_tiles: Iterator[Any] = (encoder.encode(t) for t in itertools.chain([first], tiles))
            else:
                level_tiles = tiles
            writer.write(
                level_tiles,
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=description,
                subfiletype=0 if index == 0 else 1 if spec.fmt == "tiff" else 0,
                **level_args,
            )
            if index == 0 and spec.fmt == "svs" and spec.with_associated_images:
                _write_thumbnail(writer, spec, renderer, common)
        if spec.fmt == "svs" and spec.with_associated_images:
            header = f"{_APERIO_HEADER}\r\n"
            label = _label_image(spec)
            writer.write(
                label,
                photometric="rgb",
                compression="lzw",
                subfiletype=1,
                metadata=None,
                description=f"{header}label {label.shape[1]}x{label.shape[0]}",
            )
            macro = _macro_image(spec, renderer)
            writer.write(
                macro,
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                rowsperstrip=16,
                subfiletype=9,
                metadata=None,
                description=f"{header}macro {macro.shape[1]}x{macro.shape[0]}",
            )
    partial_path.replace(path)
    truth = _truth_from_layout(path, spec, layout, artefacts)
    _write_truth(truth)
    if progress is not None:
        progress(1.0)
    return truth


def _write_thumbnail(writer: Any, spec: SynthSpec, renderer: Renderer, common: dict[str, Any]) -> None:
    """Aperio's second directory: a stripped overview of about 1024 px (OpenSlide's "thumbnail")."""
    downsample = max(1, math.ceil(max(spec.width, spec.height) / 1024))
    width, height = max(1, spec.width // downsample), max(1, spec.height // downsample)
    thumbnail = _render_overview(spec, renderer, (width, height))
    size_line = f"{spec.width}x{spec.height} -> {width}x{height} - "
    writer.write(
        thumbnail,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        rowsperstrip=16,
        metadata=None,
        description=_aperio_description(spec, size_line),
        maxworkers=common["maxworkers"],
    )


def _artefacts_for(spec: SynthSpec, layout: Layout) -> Artefacts | None:
    extra_pens = ("red",) if spec.look.red_ink else ()
    geometry = (
        spec.width * spec.mpp,
        spec.height * spec.mpp,
        layout.tissue_mask,
        layout.downsample * spec.mpp,
    )
    if spec.artefacts:
        return plan_artefacts(spec.seed, *geometry, extra_pen_colours=extra_pens)
    if extra_pens:  # a look's red ink on a slide without the other artefacts
        return Artefacts(pens=plan_pen_strokes(spec.seed, extra_pens, *geometry))
    return None


def _truth_from_layout(
    path: Path, spec: SynthSpec, layout: Layout, artefacts: Artefacts | None = None
) -> SlideTruth:
    tissue, tumour = layout.tissue_mask, layout.tumour_mask
    tissue_cells = int(tissue.sum())
    actual = float(tumour.sum() / tissue_cells) if tissue_cells else 0.0
    return SlideTruth(
        path=path,
        label="tumour" if spec.tumour_fraction > 0 and tumour.any() else "normal",
        tumour_fraction_requested=spec.tumour_fraction,
        tumour_fraction_actual=actual,
        tissue_fraction=float(tissue.mean()),
        mpp=spec.mpp,
        width=spec.width,
        height=spec.height,
        seed=spec.seed,
        fmt=spec.fmt,
        mask_downsample=int(layout.downsample),
        tissue_mask=tissue,
        tumour_mask=tumour,
        spec=spec,
        identifying_properties=(
            {f"aperio.{k}": v for k, v in identifying_fields(spec.seed).items()} if spec.fmt == "svs" else {}
        ),
        artefact_masks=(
            {} if artefacts is None else artefact_truth(artefacts, tissue.shape, layout.downsample * spec.mpp)
        ),
        pen_masks=(
            {}
            if artefacts is None
            else {
                colour: pen_colour_mask(artefacts, colour, tissue.shape, layout.downsample * spec.mpp)
                for colour in PEN_COLOURS
                if any(stroke.colour == colour for stroke in artefacts.pens)
            }
        ),
    )


def _write_truth(truth: SlideTruth) -> None:
    summary = {
        "generator": GENERATOR_VERSION,
        "slide": truth.path.name,
        "label": truth.label,
        "tumour_fraction_requested": truth.tumour_fraction_requested,
        "tumour_fraction_actual": truth.tumour_fraction_actual,
        "tissue_fraction": truth.tissue_fraction,
        "mpp": truth.mpp,
        "width": truth.width,
        "height": truth.height,
        "seed": truth.seed,
        "fmt": truth.fmt,
        "mask_downsample": truth.mask_downsample,
        "level_dimensions": truth.spec.level_dimensions(),
        "identifying_properties": truth.identifying_properties,
        "spec": _spec_json(truth.spec),
    }
    truth.truth_json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    with truth.mask_path.open("wb") as handle:
        arrays: dict[str, NDArray[Any]] = {
            "tissue": truth.tissue_mask,
            "tumour": truth.tumour_mask,
            "downsample": np.asarray(truth.mask_downsample),
            **{f"artefact_{kind}": mask for kind, mask in truth.artefact_masks.items()},
            **{f"pen_{colour}": mask for colour, mask in truth.pen_masks.items()},
        }
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def _spec_json(spec: SynthSpec) -> dict[str, Any]:
    """The spec as JSON; without the look when it is the default, so truth files stay as they were."""
    summary = dataclasses.asdict(spec)
    if spec.look == ScannerLook():
        del summary["look"]
    return summary


def load_truth(path: Path) -> SlideTruth:
    """Read back the ground truth written beside a generated slide (``<path>.truth.json`` and ``.mask.npz``)."""
    path = Path(path)
    json_path, npz_path = truth_json_path(path), mask_path(path)
    if not json_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(
            f"no ground truth for {path}: expected {json_path.name} and {npz_path.name} beside it "
            "(only slides written by generate_slide have one)"
        )
    summary = json.loads(json_path.read_text())
    with np.load(npz_path) as masks:
        tissue, tumour = masks["tissue"].astype(bool), masks["tumour"].astype(bool)
        artefact_masks = {
            kind: masks[f"artefact_{kind}"].astype(bool)
            for kind in ARTEFACT_KINDS
            if f"artefact_{kind}" in masks.files
        }
        pen_masks = {
            colour: masks[f"pen_{colour}"].astype(bool)
            for colour in PEN_COLOURS
            if f"pen_{colour}" in masks.files
        }
    return SlideTruth(
        path=path,
        label=summary["label"],
        tumour_fraction_requested=summary["tumour_fraction_requested"],
        tumour_fraction_actual=summary["tumour_fraction_actual"],
        tissue_fraction=summary["tissue_fraction"],
        mpp=summary["mpp"],
        width=summary["width"],
        height=summary["height"],
        seed=summary["seed"],
        fmt=summary["fmt"],
        mask_downsample=summary["mask_downsample"],
        tissue_mask=tissue,
        tumour_mask=tumour,
        spec=SynthSpec(**summary["spec"]),
        identifying_properties=summary.get("identifying_properties", {}),
        artefact_masks=artefact_masks,
        pen_masks=pen_masks,
    )


def generate_cohort(
    out_dir: Path,
    n_slides: int,
    *,
    tumour_ratio: float = 0.5,
    seed: int = 0,
    size: tuple[int, int] = (8000, 6000),
    fmt: SlideFormat = "svs",
    mpp: float = 0.5,
    tumour_fraction: float = 0.2,
    with_mpp: bool = True,
    tile_size: int | None = None,
    artefacts: bool = False,
    jpeg_tables: bool = False,
    rgb_coded_jpeg: bool = False,
    looks: tuple[ScannerLook, ...] = (),
    random_looks: bool = False,
    progress: Callable[[Path, float], None] | None = None,
    on_slide: Callable[[SlideTruth], None] | None = None,
) -> list[SlideTruth]:
    """Write ``n_slides`` slides into ``out_dir`` with labels spread evenly (tumour, normal, ...).

    Slide i gets the seed ``seed * 1000 + i``, so cohorts with different seeds never share a slide. File
    names do not reveal the label (the pipeline must not be able to read the answer off the upload key).
    Slide i gets the scanner look ``looks[i % len(looks)]``, or with ``random_looks`` its own
    ``random_look(slide seed)``; neither: the reference look.
    """
    if n_slides < 0:
        raise ValueError(f"n_slides {n_slides} must be >= 0")
    if looks and random_looks:
        raise ValueError("give either looks or random_looks, not both")
    if not 0.0 <= tumour_ratio <= 1.0:
        raise ValueError(f"tumour_ratio {tumour_ratio} must be within 0..1")
    out_dir = Path(out_dir)
    truths = []
    extension = "svs" if fmt == "svs" else "tiff"
    for index in range(n_slides):
        is_tumour = math.ceil((index + 1) * tumour_ratio - 1e-9) > math.ceil(index * tumour_ratio - 1e-9)
        slide_seed = seed * 1000 + index
        spec = SynthSpec(
            width=size[0],
            height=size[1],
            mpp=mpp,
            fmt=fmt,
            tumour_fraction=tumour_fraction if is_tumour else 0.0,
            seed=slide_seed,
            tile_size=tile_size or (240 if fmt == "svs" else 256),
            with_mpp=with_mpp,
            artefacts=artefacts,
            jpeg_tables=jpeg_tables,
            rgb_coded_jpeg=rgb_coded_jpeg,
            look=(
                random_look(slide_seed)
                if random_looks
                else looks[index % len(looks)]
                if looks
                else ScannerLook()
            ),
        )
        slide_path = out_dir / f"synth-{slide_seed:06d}.{extension}"
        callback = None if progress is None else functools.partial(progress, slide_path)
        truth = generate_slide(slide_path, spec, progress=callback)
        truths.append(truth)
        if on_slide is not None:
            on_slide(truth)
    return truths


# ---------------------------------------------------------------------------------------------------------
# Labelled cohorts: patients, sites, slides (training and evaluation data for patient-level splits)
# ---------------------------------------------------------------------------------------------------------

CohortFormat = Literal["svs", "tiff", "mixed"]
LABELS_CSV = "labels.csv"
COHORT_JSON = "cohort.json"
LABELS_COLUMNS = ("slide", "patient", "label", "site", "tumour_fraction")
MAX_SITES = 26  # site-A .. site-Z
MAX_SLIDES_PER_PATIENT = 50
# Blocks of one patient are usually cut and stained in one batch: less slide-to-slide stain variation than
# between the unrelated slides of generate_cohort (0.06), so that the patient's own look dominates.
COHORT_SLIDE_STAIN_JITTER = 0.03


@dataclass(frozen=True)
class CohortParameters:
    """What labelled cohort to make; :func:`generate_labelled_cohort` documents each field.

    Validated on construction, naming every bad value at once; (parameters) -> the same cohort, byte for byte.
    """

    patients: int
    slides_per_patient: tuple[int, int] = (1, 3)  # inclusive
    tumour_patient_ratio: float = 0.5
    tumour_slide_probability: float = 0.7  # other slides of a tumour patient
    tumour_fraction: tuple[float, float] = (0.05, 0.4)  # of the tissue area, per tumour slide
    sites: int = 3
    site_stain_shift: float = 0.15
    site_tint: float = 0.03
    patient_variation: float = 0.1
    size: tuple[int, int] = (8000, 6000)
    fmt: CohortFormat = "svs"
    mpp: float = 0.5
    artefacts: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        # Lists (from JSON) become tuples; a range may be given as one number ("exactly this").
        for name in ("slides_per_patient", "tumour_fraction"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value, value) if isinstance(value, int | float) else tuple(value))
        object.__setattr__(self, "size", tuple(self.size))
        problems = self._count_problems() + self._appearance_problems()
        if problems:
            raise ValueError("invalid labelled cohort: " + "; ".join(problems))

    def _count_problems(self) -> list[str]:
        problems: list[str] = []
        if not 1 <= self.patients <= 10_000:
            problems.append(f"patients {self.patients} must be within 1..10000")
        _check_range(
            "slides_per_patient", self.slides_per_patient, 1, MAX_SLIDES_PER_PATIENT, problems, "1-3"
        )
        _check_range("tumour_fraction", self.tumour_fraction, 0.01, 0.9, problems, "0.05-0.4")
        if not 0.0 <= self.tumour_patient_ratio <= 1.0:
            problems.append(f"tumour_patient_ratio {self.tumour_patient_ratio} must be within 0..1")
        if not 0.0 <= self.tumour_slide_probability <= 1.0:
            problems.append(f"tumour_slide_probability {self.tumour_slide_probability} must be within 0..1")
        if not 1 <= self.sites <= MAX_SITES:
            problems.append(f"sites {self.sites} must be within 1..{MAX_SITES}")
        if self.seed < 0:
            problems.append(f"seed {self.seed} must be >= 0")
        return problems

    def _appearance_problems(self) -> list[str]:
        problems: list[str] = []
        if not 0.0 <= self.site_stain_shift <= 0.4:
            problems.append(
                f"site_stain_shift {self.site_stain_shift} must be within 0..0.4 (0.15 = up to +-15% stain)"
            )
        if not 0.0 <= self.site_tint <= 0.1:
            problems.append(f"site_tint {self.site_tint} must be within 0..0.1 (optical density of the cast)")
        if not 0.0 <= self.patient_variation <= 0.2:
            problems.append(f"patient_variation {self.patient_variation} must be within 0..0.2")
        if self.fmt not in ("svs", "tiff", "mixed"):
            problems.append(
                f"fmt {self.fmt!r} must be 'svs', 'tiff' or 'mixed' (each slide svs or tiff at random)"
            )
        if len(self.size) != 2:
            problems.append(f"size {self.size!r} must be (width, height)")
        else:
            try:  # size and mpp are checked (and the problems worded) once, by SynthSpec
                SynthSpec(width=self.size[0], height=self.size[1], mpp=self.mpp)
            except ValueError as error:
                problems.append(str(error).removeprefix("invalid SynthSpec: "))
        return problems


@dataclass(frozen=True)
class CohortSite:
    """One scanner and lab: every slide it produces shares its stain shift and colour cast."""

    name: str  # "site-A"
    stain_shift: tuple[float, float]  # (eosin, haematoxylin) OD multipliers of the lab's staining protocol
    illumination_od: tuple[float, float, float]  # the scanner's colour cast, OD per RGB channel


@dataclass(frozen=True)
class CohortPatient:
    """One patient: a diagnosis, a site, and a look that all of the patient's slides share."""

    patient_id: str  # "P0007"
    site: str
    label: str  # "tumour" or "normal": the patient's diagnosis
    stain_factor: tuple[float, float]  # on top of the site's shift: the patient's blocks, stained together
    nucleus_scale: float  # nuclear size of this patient's tissue (both classes)


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a labelled cohort: its file name, whose it is, and the spec that draws it."""

    file_name: str  # "cohort-7-0003.svs": says nothing about label, patient or site
    patient: str
    site: str
    spec: SynthSpec

    @property
    def label(self) -> str:
        return self.spec.label


@dataclass
class Cohort:
    """A planned (and, after :func:`generate_labelled_cohort`, written) labelled cohort.

    ``truths`` maps file names to the ground truth of the slides written so far; labels.csv is made from
    those truths, so it states what is on the slides rather than what was asked for.
    """

    out_dir: Path
    parameters: CohortParameters
    sites: list[CohortSite]
    patients: list[CohortPatient]
    slides: list[CohortSlide]
    truths: dict[str, SlideTruth] = field(default_factory=dict)

    @property
    def labels_path(self) -> Path:
        return self.out_dir / LABELS_CSV

    @property
    def summary_path(self) -> Path:
        return self.out_dir / COHORT_JSON

    def slide_path(self, slide: CohortSlide) -> Path:
        return self.out_dir / slide.file_name

    def label_rows(self) -> list[dict[str, str]]:
        """Rows of labels.csv (sorted by slide name), from the written slides' ground truth."""
        rows = []
        for slide in sorted(self.slides, key=lambda s: s.file_name):
            truth = self.truths.get(slide.file_name)
            if truth is None:
                raise RuntimeError(f"slide {slide.file_name} has not been written yet: no label to report")
            rows.append(
                {
                    "slide": slide.file_name,
                    "patient": slide.patient,
                    "label": truth.label,
                    "site": slide.site,
                    "tumour_fraction": f"{truth.tumour_fraction_actual:.4f}",
                }
            )
        return rows


def _check_range(
    name: str, value: tuple[float, float], low: float, high: float, problems: list[str], example: str
) -> None:
    if len(value) != 2:
        problems.append(f"{name} {value!r} must be a (low, high) pair, e.g. {example}")
    elif not low <= value[0] <= value[1] <= high:
        problems.append(
            f"{name} {value[0]}-{value[1]} must satisfy {low} <= low <= high <= {high}, e.g. {example}"
        )


def _site_names(count: int) -> list[str]:
    return [f"site-{chr(ord('A') + index)}" for index in range(count)]


def _spread_offsets(rng: np.random.Generator, count: int, spread: float) -> list[float]:
    """``count`` offsets spread evenly over -spread..spread (ends included), jittered a little, in random
    order: sites always differ visibly however the seed falls (independent uniform draws can put two
    sites' stains on top of each other), and the extremes of the range do occur. One site: near 0."""
    if count == 1:
        return [float(rng.uniform(-0.25, 0.25)) * spread]
    step = 2 * spread / (count - 1)
    centres = [-spread + step * int(position) for position in rng.permutation(count)]
    jitter = rng.uniform(-0.15, 0.15, count) * step
    return [float(np.clip(centre + jitter[i], -spread, spread)) for i, centre in enumerate(centres)]


def _plan_sites(seed: int, count: int, stain_shift: float, tint: float) -> list[CohortSite]:
    rng = np.random.default_rng([seed, 21])
    eosin = _spread_offsets(rng, count, stain_shift)
    haematoxylin = _spread_offsets(rng, count, stain_shift)
    sites = []
    for index, name in enumerate(_site_names(count)):
        # Scanners differ in lamp brightness (they rarely over-expose: 0..tint darker) and white balance.
        brightness = float(rng.uniform(0.0, tint))
        cast = rng.uniform(-0.5 * tint, 0.5 * tint, 3)
        sites.append(
            CohortSite(
                name=name,
                stain_shift=(round(1 + eosin[index], 4), round(1 + haematoxylin[index], 4)),
                illumination_od=(
                    round(brightness + float(cast[0]), 4),
                    round(brightness + float(cast[1]), 4),
                    round(brightness + float(cast[2]), 4),
                ),
            )
        )
    return sites


def _plan_patients(
    seed: int, count: int, tumour_patient_ratio: float, sites: list[CohortSite], variation: float
) -> list[CohortPatient]:
    """Diagnoses shuffled over the patient ids; sites dealt round-robin within each diagnosis, so every
    site gets about as many patients, and about the same share of tumour patients, as every other one
    (site is not a shortcut to the label)."""
    rng = np.random.default_rng([seed, 22])
    n_tumour = math.floor(count * tumour_patient_ratio + 0.5)
    labels = np.asarray(["tumour"] * n_tumour + ["normal"] * (count - n_tumour))[rng.permutation(count)]
    site_of = [""] * count
    next_site = int(rng.integers(len(sites)))
    for diagnosis in ("tumour", "normal"):
        members = [index for index in range(count) if labels[index] == diagnosis]
        dealt = [sites[(next_site + k) % len(sites)].name for k in range(len(members))]
        next_site = (next_site + len(members)) % len(sites)
        for index, site in zip(members, rng.permutation(dealt).tolist(), strict=True):
            site_of[index] = str(site)
    patients = []
    for index in range(count):
        eosin, haematoxylin = (float(v) for v in 1 + rng.uniform(-variation / 2, variation / 2, 2))
        patients.append(
            CohortPatient(
                patient_id=f"P{index + 1:04d}",
                site=site_of[index],
                label=str(labels[index]),
                stain_factor=(round(eosin, 4), round(haematoxylin, 4)),
                nucleus_scale=round(float(1 + rng.uniform(-variation, variation)), 4),
            )
        )
    return patients


def plan_labelled_cohort(out_dir: Path, parameters: CohortParameters) -> Cohort:
    """Decide every site, patient and slide of a labelled cohort, without writing anything.

    Separate from :func:`generate_labelled_cohort` so that callers (and tests) can inspect a plan cheaply.
    Sites, patients and slides draw from separate seeded streams.
    """
    sites = _plan_sites(parameters.seed, parameters.sites, parameters.site_stain_shift, parameters.site_tint)
    patients = _plan_patients(
        parameters.seed,
        parameters.patients,
        parameters.tumour_patient_ratio,
        sites,
        parameters.patient_variation,
    )
    slides = _plan_slides(parameters, {site.name: site for site in sites}, patients)
    return Cohort(Path(out_dir), parameters, sites, patients, slides)


def _plan_slides(
    parameters: CohortParameters, sites: dict[str, CohortSite], patients: list[CohortPatient]
) -> list[CohortSlide]:
    rng = np.random.default_rng([parameters.seed, 23])
    low, high = parameters.slides_per_patient
    drafts: list[tuple[CohortPatient, float]] = []  # (patient, tumour fraction or 0)
    for patient in patients:
        n_slides = int(rng.integers(low, high + 1))
        is_tumour = [False] * n_slides
        if patient.label == "tumour":
            # At least one block shows the tumour; the others do with some probability, as in real cases
            # where margins and distant blocks are often tumour-free.
            certain = int(rng.integers(n_slides))
            is_tumour = [
                k == certain or bool(rng.random() < parameters.tumour_slide_probability)
                for k in range(n_slides)
            ]
        for tumour in is_tumour:
            fraction = round(float(rng.uniform(*parameters.tumour_fraction)), 4) if tumour else 0.0
            drafts.append((patient, fraction))
    # Shuffled, so that neither file names nor their order group a patient's slides together.
    order = rng.permutation(len(drafts))
    slide_seeds = rng.choice(2**31, size=len(drafts), replace=False)
    # "mixed": each slide's format at random, not per site: the file extension must not reveal the site.
    formats: list[SlideFormat] = (
        [parameters.fmt] * len(drafts)
        if parameters.fmt != "mixed"
        else [
            "svs" if heads else "tiff"
            for heads in np.random.default_rng([parameters.seed, 24]).random(len(drafts)) < 0.5
        ]
    )
    digits = max(4, len(str(len(drafts) - 1)))
    slides = []
    for index, draft_index in enumerate(order.tolist()):
        patient, fraction = drafts[draft_index]
        site = sites[patient.site]
        spec = SynthSpec(
            width=parameters.size[0],
            height=parameters.size[1],
            mpp=parameters.mpp,
            fmt=formats[index],
            tumour_fraction=fraction,
            seed=int(slide_seeds[index]),
            tile_size=240 if formats[index] == "svs" else 256,
            stain_jitter=COHORT_SLIDE_STAIN_JITTER,
            artefacts=parameters.artefacts,
            stain_shift=(
                round(site.stain_shift[0] * patient.stain_factor[0], 4),
                round(site.stain_shift[1] * patient.stain_factor[1], 4),
            ),
            illumination_od=site.illumination_od,
            nucleus_scale=patient.nucleus_scale,
        )
        name = f"cohort-{parameters.seed}-{index:0{digits}d}.{formats[index]}"
        slides.append(CohortSlide(name, patient.patient_id, site.name, spec))
    return slides


def generate_labelled_cohort(
    out_dir: Path,
    *,
    patients: int,
    slides_per_patient: tuple[int, int] = (1, 3),
    tumour_patient_ratio: float = 0.5,
    tumour_slide_probability: float = 0.7,
    tumour_fraction: tuple[float, float] = (0.05, 0.4),
    sites: int = 3,
    site_stain_shift: float = 0.15,
    site_tint: float = 0.03,
    patient_variation: float = 0.1,
    size: tuple[int, int] = (8000, 6000),
    fmt: CohortFormat = "svs",
    mpp: float = 0.5,
    artefacts: bool = False,
    seed: int = 0,
    progress: Callable[[Path, float], None] | None = None,
    on_slide: Callable[[CohortSlide, SlideTruth], None] | None = None,
) -> Cohort:
    """Write a labelled cohort into ``out_dir``: slides with truth files, ``labels.csv`` and ``cohort.json``.

    Why: model training and evaluation must split by patient and check robustness across sites, and no
    public archive can be downloaded here. This cohort has what makes those checks meaningful:

    * **patients** (``P0001``...) with 1..n slides each (``slides_per_patient``, inclusive). A share
      ``tumour_patient_ratio`` of the patients has cancer: at least one of their slides shows tumour, each
      other one does with ``tumour_slide_probability``, and the rest are normal tissue, as blocks of a
      cancer case often are. Normal patients have only normal slides. Each tumour slide's tumour share of
      the tissue area is drawn from ``tumour_fraction`` (low, high), down to small foci of 0.05.
    * a **patient look**: a stain factor (+-``patient_variation``/2) and a nuclear size
      (+-``patient_variation``) that all slides of a patient share, so that splitting by slide instead of by
      patient leaks and inflates results, as it does with real data.
    * **sites** (``site-A``...; scanner + lab): patients are dealt to sites evenly, within each diagnosis.
      Each site's stain shift (eosin and haematoxylin OD x (1 +- up to ``site_stain_shift``), spread over
      the range) and colour cast (up to ``site_tint`` OD) is drawn once and applies to all its slides;
      ``fmt="mixed"`` makes each slide svs or tiff at random (not per site: the file extension must not
      reveal the site).

    File names (``cohort-<seed>-<index>.<ext>``, in shuffled order) reveal neither label, patient nor site.
    ``labels.csv`` (columns slide, patient, label, site, tumour_fraction) takes label and tumour fraction
    from each written slide's ground truth, and lists this cohort's slides only (other files in ``out_dir``
    are left alone). ``cohort.json`` records the parameters, counts per label and site, each site's shift
    and cast, each patient's look and slides, and each slide's seed. The same arguments give identical
    files. Slides are streamed by
    :func:`generate_slide` one at a time (bounded memory); ``progress(path, fraction)`` reports big slides
    and ``on_slide(slide, truth)`` each finished one. Raises ValueError, naming every bad argument.
    """
    parameters = CohortParameters(
        patients=patients,
        slides_per_patient=slides_per_patient,
        tumour_patient_ratio=tumour_patient_ratio,
        tumour_slide_probability=tumour_slide_probability,
        tumour_fraction=tumour_fraction,
        sites=sites,
        site_stain_shift=site_stain_shift,
        site_tint=site_tint,
        patient_variation=patient_variation,
        size=size,
        fmt=fmt,
        mpp=mpp,
        artefacts=artefacts,
        seed=seed,
    )
    cohort = plan_labelled_cohort(out_dir, parameters)
    cohort.out_dir.mkdir(parents=True, exist_ok=True)
    for slide in cohort.slides:
        path = cohort.slide_path(slide)
        callback = None if progress is None else functools.partial(progress, path)
        truth = generate_slide(path, slide.spec, progress=callback)
        cohort.truths[slide.file_name] = truth
        if on_slide is not None:
            on_slide(slide, truth)
    _write_cohort_files(cohort)
    return cohort


def _write_cohort_files(cohort: Cohort) -> None:
    """labels.csv and cohort.json, each written under a temporary name and renamed when complete."""
    import csv
    import io

    rows = cohort.label_rows()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LABELS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _replace_text(cohort.labels_path, text.getvalue())

    def counts(selected: list[dict[str, str]]) -> dict[str, int]:
        return {label: sum(row["label"] == label for row in selected) for label in ("tumour", "normal")}

    def patient_counts(site: str | None) -> dict[str, int]:
        chosen = [p for p in cohort.patients if site is None or p.site == site]
        return {label: sum(p.label == label for p in chosen) for label in ("tumour", "normal")}

    slides_of: dict[str, list[str]] = {}
    for slide in cohort.slides:
        slides_of.setdefault(slide.patient, []).append(slide.file_name)
    summary = {
        "generator": GENERATOR_VERSION,
        "kind": "labelled-cohort",
        "seed": cohort.parameters.seed,
        "parameters": dataclasses.asdict(cohort.parameters),
        "labels": LABELS_CSV,
        "counts": {
            "patients": patient_counts(None),
            "slides": counts(rows),
            "per_site": {
                site.name: {
                    "patients": patient_counts(site.name),
                    "slides": counts([row for row in rows if row["site"] == site.name]),
                }
                for site in cohort.sites
            },
        },
        "sites": {
            site.name: {
                "stain_shift": list(site.stain_shift),
                "illumination_od": list(site.illumination_od),
            }
            for site in cohort.sites
        },
        "patients": {
            patient.patient_id: {
                "site": patient.site,
                "label": patient.label,
                "stain_factor": list(patient.stain_factor),
                "nucleus_scale": patient.nucleus_scale,
                "slides": sorted(slides_of.get(patient.patient_id, [])),
            }
            for patient in cohort.patients
        },
        "slides": {
            slide.file_name: {
                "patient": slide.patient,
                "site": slide.site,
                "label": cohort.truths[slide.file_name].label,
                "seed": slide.spec.seed,
                "tumour_fraction_requested": slide.spec.tumour_fraction,
                "tumour_fraction_actual": cohort.truths[slide.file_name].tumour_fraction_actual,
            }
            for slide in sorted(cohort.slides, key=lambda s: s.file_name)
        },
    }
    _replace_text(cohort.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _replace_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


# ---------------------------------------------------------------------------------------------------------
# CLI glue (`wsi synth`)
# ---------------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must look like WIDTHxHEIGHT, e.g. 8000x6000"
        ) from None
    return width, height


def _split_range(text: str, what: str, example: str) -> tuple[str, str]:
    parts = [part.strip() for part in text.split("-")]
    if len(parts) == 1 and parts[0]:
        return parts[0], parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"{what} {text!r} must be a number or a range LOW-HIGH, e.g. {example}")


def _parse_fraction_range(text: str) -> tuple[float, float]:
    """``0.2`` or ``0.05-0.4``; bounds are checked where they are used, with the other arguments."""
    low, high = _split_range(text, "tumour fraction", "0.2 or 0.05-0.4")
    try:
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tumour fraction {text!r} must be a number or a range LOW-HIGH, e.g. 0.2 or 0.05-0.4"
        ) from None


def _parse_count_range(text: str) -> tuple[int, int]:
    """``2`` or ``1-3`` (inclusive)."""
    low, high = _split_range(text, "slides per patient", "2 or 1-3")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"slides per patient {text!r} must be a whole number or a range LOW-HIGH, e.g. 2 or 1-3"
        ) from None


def _parse_looks(text: str) -> tuple[ScannerLook, ...]:
    """``all``, or comma-separated look names (``shared/slides/looks.py``)."""
    if text.strip() == "all":
        return tuple(LOOKS.values())
    try:
        return tuple(look_named(name.strip()) for name in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``wsi synth OUTDIR``: unrelated slides (``--count``) or a labelled cohort (``--patients``)."""
    parser.add_argument(
        "outdir", type=Path, help="folder to write the slides and their .truth.json/.mask.npz"
    )
    parser.add_argument(
        "--count", type=int, default=None, help="number of unrelated slides (default 4; without --patients)"
    )
    parser.add_argument("--size", type=_parse_size, default=(8000, 6000), help="WIDTHxHEIGHT of level 0")
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=("svs", "tiff", "mixed"),
        default="svs",
        help="slide format; 'mixed' (with --patients): each slide svs or tiff at random",
    )
    parser.add_argument("--mpp", type=float, default=0.5, help="um per pixel: 0.5 = 20x, 0.25 = 40x")
    parser.add_argument(
        "--tumour-fraction",
        type=_parse_fraction_range,
        default=None,
        metavar="FRACTION[-MAX]",
        help="fraction of the tissue area that is tumour on tumour slides (default 0.2); with --patients "
        "a range LOW-HIGH to draw from (default 0.05-0.4)",
    )
    parser.add_argument(
        "--tumour-ratio",
        type=float,
        default=None,
        help="share of tumour slides (default 0.5; without --patients)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tile-size", type=int, default=None, help="stored tile size (240 for svs, 256 tiff)"
    )
    parser.add_argument("--no-mpp", action="store_true", help="tiff only: write no resolution (MPP) at all")
    parser.add_argument(
        "--artefacts",
        action="store_true",
        help="draw pen strokes (blue, green, black; red too with a look's red ink), blurred disks, dark debris "
        "and faint tissue, with truth masks",
    )
    parser.add_argument(
        "--jpeg-tables",
        action="store_true",
        help="store JPEG tables once per level (TIFF JPEGTables), as Aperio does",
    )
    parser.add_argument(
        "--rgb-jpeg",
        action="store_true",
        help="RGB-coded JPEG tiles (photometric RGB, no colour marker); implies --jpeg-tables",
    )
    looks = parser.add_mutually_exclusive_group()
    looks.add_argument(
        "--look",
        type=_parse_looks,
        default=None,
        metavar="NAME[,NAME...]|all",
        help=f"scanner/stain look(s), cycled over the slides: {', '.join(LOOKS)}, random-<seed>, or 'all' "
        "(then --count defaults to one slide per look); see docs/tiling-and-qc.md",
    )
    looks.add_argument(
        "--random-looks",
        action="store_true",
        help="each slide gets a random look (glass tint and brightness, stain intensity and hue, JPEG "
        "quality, stripes, red ink) drawn from its seed",
    )
    cohort = parser.add_argument_group(
        "labelled cohort",
        "--patients N writes a cohort for patient-level training and evaluation: patients with one or more "
        "slides each, spread over sites (scanner + lab) with their own staining, plus labels.csv "
        "(slide, patient, label, site, tumour_fraction) and cohort.json",
    )
    cohort.add_argument("--patients", type=int, default=None, help="number of patients (cohort mode)")
    cohort.add_argument(
        "--slides-per-patient",
        type=_parse_count_range,
        default=None,
        metavar="N[-MAX]",
        help="slides per patient, a number or an inclusive range (default 1-3)",
    )
    cohort.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    cohort.add_argument(
        "--site-stain-shift",
        type=float,
        default=None,
        help="each site's stain strength differs by up to this share (default 0.15)",
    )
    cohort.add_argument(
        "--tumour-patient-ratio",
        type=float,
        default=None,
        help="share of patients with tumour (default 0.5); their other slides are tumour with p=0.7",
    )


_SLIDES_ONLY = {
    "count": "--count",
    "tumour_ratio": "--tumour-ratio",
    "tile_size": "--tile-size",
    "look": "--look",
}
_SLIDES_ONLY_FLAGS = {
    "no_mpp": "--no-mpp",
    "jpeg_tables": "--jpeg-tables",
    "rgb_jpeg": "--rgb-jpeg",
    "random_looks": "--random-looks",
}
_COHORT_ONLY = {
    "slides_per_patient": "--slides-per-patient",
    "sites": "--sites",
    "site_stain_shift": "--site-stain-shift",
    "tumour_patient_ratio": "--tumour-patient-ratio",
}


def cli_synth(args: argparse.Namespace) -> int:
    """Run ``wsi synth``: one line per slide on stdout, progress of big slides on stderr.

    Without ``--patients``: ``--count`` unrelated slides, labels alternating. With it: a labelled cohort
    (:func:`generate_labelled_cohort`), and the path of its labels.csv as the last line.
    """
    try:
        if args.patients is None:
            _cli_slides(args)
        else:
            _cli_cohort(args)
    except ValueError as error:
        print(f"wsi synth: {error}", file=sys.stderr)
        return 2
    return 0


def _report_progress(path: Path, fraction: float) -> None:
    print(f"  {path.name}: {fraction:5.1%}", file=sys.stderr, flush=True)


def _cli_slides(args: argparse.Namespace) -> None:
    misplaced = [flag for name, flag in _COHORT_ONLY.items() if getattr(args, name) is not None]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} only apply to a labelled cohort: add --patients N")
    if args.fmt == "mixed":
        raise ValueError("--format mixed only applies to a labelled cohort: add --patients N")
    tumour_fraction = 0.2
    if args.tumour_fraction is not None:
        low, high = args.tumour_fraction
        if low != high:
            raise ValueError(
                f"--tumour-fraction {low}-{high}: a range only applies to a labelled cohort "
                "(add --patients N); without it give one number, e.g. 0.2"
            )
        tumour_fraction = low

    def report_slide(truth: SlideTruth) -> None:
        look = "" if truth.spec.look == ScannerLook() else f"\tlook={truth.spec.look.name}"
        print(
            f"{truth.path}\t{truth.width}x{truth.height}\t{truth.label}\t"
            f"tumour={truth.tumour_fraction_actual:.3f}{look}",
            flush=True,
        )

    looks = args.look or ()
    count = args.count if args.count is not None else len(looks) if len(looks) > 1 else 4
    generate_cohort(
        args.outdir,
        count,
        tumour_ratio=0.5 if args.tumour_ratio is None else args.tumour_ratio,
        seed=args.seed,
        size=args.size,
        fmt=args.fmt,
        mpp=args.mpp,
        tumour_fraction=tumour_fraction,
        with_mpp=not args.no_mpp,
        tile_size=args.tile_size,
        artefacts=args.artefacts,
        jpeg_tables=args.jpeg_tables or args.rgb_jpeg,
        rgb_coded_jpeg=args.rgb_jpeg,
        looks=looks,
        random_looks=args.random_looks,
        progress=_report_progress,
        on_slide=report_slide,
    )


def _cli_cohort(args: argparse.Namespace) -> None:
    misplaced = [flag for name, flag in _SLIDES_ONLY.items() if getattr(args, name) is not None]
    misplaced += [flag for name, flag in _SLIDES_ONLY_FLAGS.items() if getattr(args, name)]
    if misplaced:
        hint = " (use --tumour-patient-ratio)" if "--tumour-ratio" in misplaced else ""
        raise ValueError(f"{', '.join(misplaced)} do not apply with --patients{hint}")

    def report_slide(slide: CohortSlide, truth: SlideTruth) -> None:
        print(
            f"{truth.path}\t{truth.width}x{truth.height}\t{truth.label}\t{slide.patient}\t{slide.site}\t"
            f"tumour={truth.tumour_fraction_actual:.3f}",
            flush=True,
        )

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    cohort = generate_labelled_cohort(
        args.outdir,
        patients=args.patients,
        slides_per_patient=given(args.slides_per_patient, (1, 3)),
        tumour_patient_ratio=given(args.tumour_patient_ratio, 0.5),
        tumour_fraction=given(args.tumour_fraction, (0.05, 0.4)),
        sites=given(args.sites, 3),
        site_stain_shift=given(args.site_stain_shift, 0.15),
        size=args.size,
        fmt=args.fmt,
        mpp=args.mpp,
        artefacts=args.artefacts,
        seed=args.seed,
        progress=_report_progress,
        on_slide=report_slide,
    )
    print(f"labels: {cohort.labels_path}", flush=True)
