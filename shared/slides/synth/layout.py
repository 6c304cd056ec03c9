"""Layout: where tissue and tumour are on a synthetic slide, at a coarse grid (the ground truth masks)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.synth.spec import (
    TISSUE_EDGE_UM,
    TUMOUR_EDGE_UM,
    BoolArray,
    FloatArray,
    IntArray,
    SynthSpec,
)

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
        mimic_sdfs: dict[str, FloatArray] | None = None,
    ) -> None:
        self.tissue_sdf = tissue_sdf
        self.tumour_sdf = tumour_sdf
        self.downsample = downsample
        self.constant = constant  # (tissue, tumour) membership everywhere, for standalone patches
        # Mimic regions (shared/slides/synth/mimics.py), in compositing order; empty without mimics.
        self.mimic_sdfs: dict[str, FloatArray] = dict(mimic_sdfs or {})

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

    @property
    def mimic_masks(self) -> dict[str, BoolArray]:
        """Each mimic's region at the cell centres: inside tissue, outside tumour and earlier mimics."""
        taken = self.tumour_mask.copy()
        masks = {}
        for name, sdf in self.mimic_sdfs.items():
            masks[name] = np.asarray((sdf > 0) & self.tissue_mask & ~taken)
            taken |= masks[name]
        return masks

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
    layout = Layout(tissue_sdf, tumour_sdf, float(downsample))
    if spec.mimics:
        from wsitk.shared.slides.synth.mimics import mimic_sdfs

        layout.mimic_sdfs = mimic_sdfs(spec, layout.tissue_mask, layout.tumour_mask, short_side)
    return layout
