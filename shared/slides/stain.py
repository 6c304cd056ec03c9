"""Stain normalisation (Macenko, Reinhard): fitted once per slide by the tiler, applied per tile later.

Why fitted per slide: QC and the embedder see one shard at a time, and statistics of one shard (a
corner of fat, a patch of tumour) would normalise neighbouring shards differently. The tiler fits on
pixels of the slide's tissue tiles (a bounded, evenly spread sample) and puts the parameters on every
``TileShard`` (``StainParams``); QC passes them on in ``QcResult``; the embedder calls
:func:`normalize` on each tile before the backbone.

* **Macenko** (Macenko et al. 2009): optical density, drop near-transparent pixels (OD < ``beta``),
  plane of the two main eigenvectors, the stain vectors at the ``alpha`` and ``100 - alpha``
  percentile angles; concentrations by least squares; the 99th percentile concentration per stain.
  ``normalize`` maps the slide's stain vectors and concentration range onto a reference H&E
  (``MACENKO_REFERENCE_*``, the values of the original implementation).
* **Reinhard** (Reinhard et al. 2001, as used for H&E): mean and standard deviation per CIELAB
  channel over tissue pixels, mapped onto ``REINHARD_REFERENCE_*``.

``StainParams``-like means any object with ``method``, ``stain_matrix`` (3x2 row-major),
``max_concentrations``, ``lab_mean`` and ``lab_std`` attributes: the protobuf message, or
:class:`StainFit`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

ImageArray = NDArray[np.uint8]
FloatArray = NDArray[np.float64]

METHODS = ("macenko", "reinhard")
MACENKO_REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MACENKO_REFERENCE_MAX = np.array([1.9705, 1.0308])
REINHARD_REFERENCE_MEAN = np.array([64.0, 28.0, -12.0])  # CIELAB of a typical well-stained H&E tissue
REINHARD_REFERENCE_STD = np.array([14.0, 9.0, 7.0])
_LIGHT = 255.0


class StainParamsLike(Protocol):
    method: str

    @property
    def stain_matrix(self) -> Sequence[float]: ...
    @property
    def max_concentrations(self) -> Sequence[float]: ...
    @property
    def lab_mean(self) -> Sequence[float]: ...
    @property
    def lab_std(self) -> Sequence[float]: ...


@dataclass(frozen=True)
class StainFit:
    """Parameters of one slide's stain normalisation (the fields of the ``StainParams`` event message)."""

    method: str = ""
    stain_matrix: tuple[float, ...] = ()
    max_concentrations: tuple[float, ...] = ()
    lab_mean: tuple[float, ...] = ()
    lab_std: tuple[float, ...] = ()
    pixels_used: int = field(default=0, compare=False)


def _optical_density(rgb: NDArray[np.float64]) -> FloatArray:
    return np.asarray(-np.log((rgb + 1.0) / (_LIGHT + 1.0)))


def tissue_pixels(tile: ImageArray) -> NDArray[np.uint8]:
    """RGB pixels (N, 3) of a tile that are stained tissue: not near-white, not near-black."""
    flat = tile.reshape(-1, 3)
    keep = (flat.min(axis=1) < 220) & (flat.max(axis=1) > 30)
    return np.ascontiguousarray(flat[keep])


def fit_macenko(pixels: NDArray[np.uint8], *, alpha: float = 1.0, beta: float = 0.15) -> StainFit:
    """Macenko stain vectors and 99th-percentile concentrations from RGB pixels (N, 3)."""
    od = _optical_density(pixels.reshape(-1, 3).astype(np.float64))
    od = od[np.all(od > beta, axis=1)]
    if len(od) < 100:
        raise ValueError(f"only {len(od)} stained pixels to fit Macenko on; need at least 100 (no tissue?)")
    _, eigenvectors = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = eigenvectors[:, 1:3]
    plane = plane * np.where(plane[0:1] < 0, -1.0, 1.0)  # point into positive OD
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, alpha), np.percentile(angles, 100 - alpha)
    v1 = plane @ np.array([np.cos(low), np.sin(low)])
    v2 = plane @ np.array([np.cos(high), np.sin(high)])
    # Haematoxylin is the vector with more red absorption (first OD component).
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains = stains / np.linalg.norm(stains, axis=0, keepdims=True)
    concentrations = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    max_c = np.percentile(concentrations, 99, axis=1)
    return StainFit(
        method="macenko",
        stain_matrix=tuple(float(v) for v in stains.ravel()),
        max_concentrations=tuple(float(v) for v in max_c),
        pixels_used=len(od),
    )


def rgb_to_lab(rgb: NDArray[np.float64]) -> FloatArray:
    """sRGB (0-255) to CIELAB (D65), any leading shape."""
    c = rgb / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    matrix = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ matrix.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def lab_to_rgb(lab: FloatArray) -> FloatArray:
    """CIELAB (D65) to sRGB 0-255 (unclipped)."""
    fy = (lab[..., 0] + 16) / 116
    fx = fy + lab[..., 1] / 500
    fz = fy - lab[..., 2] / 200
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f**3 > 216 / 24389, f**3, (116 * f - 16) / (24389 / 27)) * np.array(
        [0.95047, 1.0, 1.08883]
    )
    inverse = np.linalg.inv(
        np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    )
    linear = np.clip(xyz @ inverse.T, 0.0, None)
    c = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.asarray(c * 255.0)


def fit_reinhard(pixels: NDArray[np.uint8]) -> StainFit:
    """CIELAB mean and standard deviation of RGB tissue pixels (N, 3)."""
    flat = pixels.reshape(-1, 3)
    if len(flat) < 100:
        raise ValueError(f"only {len(flat)} tissue pixels to fit Reinhard on; need at least 100 (no tissue?)")
    lab = rgb_to_lab(flat.astype(np.float64))
    return StainFit(
        method="reinhard",
        lab_mean=tuple(float(v) for v in lab.mean(axis=0)),
        lab_std=tuple(float(v) for v in np.maximum(lab.std(axis=0), 1e-3)),
        pixels_used=len(flat),
    )


def fit_stain(
    tiles: Iterable[ImageArray], method: str, *, max_pixels: int = 2_000_000, seed: int = 0
) -> StainFit:
    """Fit ``method`` ("macenko" or "reinhard") on the tissue pixels of ``tiles`` (a per-slide sample).

    At most ``max_pixels`` pixels are kept (a seeded subsample per tile), so memory is bounded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown stain normalisation {method!r}; use one of {', '.join(METHODS)} or ''")
    rng = np.random.default_rng(seed)
    chunks: list[NDArray[np.uint8]] = []
    kept = 0
    per_tile = max_pixels
    for tile in tiles:
        pixels = tissue_pixels(tile)
        if len(pixels) > per_tile // 16:
            pixels = pixels[rng.choice(len(pixels), per_tile // 16, replace=False)]
        chunks.append(pixels)
        kept += len(pixels)
        if kept >= max_pixels:
            break
    pixels = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.uint8)
    return fit_macenko(pixels) if method == "macenko" else fit_reinhard(pixels)


def normalize(tile: ImageArray, params: StainParamsLike) -> ImageArray:
    """``tile`` (RGB uint8 [H, W, 3]) with the slide's stains mapped onto the reference; unchanged when
    ``params.method`` is empty. Raises ``ValueError`` for parameters that do not fit the method."""
    method = params.method
    if not method:
        return tile
    rgb = tile[..., :3].astype(np.float64)
    if method == "macenko":
        stains = np.asarray(params.stain_matrix, dtype=np.float64)
        max_c = np.asarray(params.max_concentrations, dtype=np.float64)
        if stains.size != 6 or max_c.size != 2:
            raise ValueError("macenko StainParams need a 3x2 stain_matrix and 2 max_concentrations")
        od = _optical_density(rgb.reshape(-1, 3))
        concentrations = np.linalg.lstsq(stains.reshape(3, 2), od.T, rcond=None)[0]
        concentrations *= (MACENKO_REFERENCE_MAX / np.maximum(max_c, 1e-6))[:, None]
        out = (_LIGHT + 1.0) * np.exp(-(MACENKO_REFERENCE_STAINS @ concentrations)).T - 1.0
    elif method == "reinhard":
        mean = np.asarray(params.lab_mean, dtype=np.float64)
        std = np.asarray(params.lab_std, dtype=np.float64)
        if mean.size != 3 or std.size != 3:
            raise ValueError("reinhard StainParams need 3 lab_mean and 3 lab_std values")
        lab = rgb_to_lab(rgb.reshape(-1, 3))
        out = lab_to_rgb(
            (lab - mean) / np.maximum(std, 1e-3) * REINHARD_REFERENCE_STD + REINHARD_REFERENCE_MEAN
        )
    else:
        raise ValueError(
            f"unknown stain normalisation method {method!r}; expected one of {', '.join(METHODS)}"
        )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape((*tile.shape[:2], 3))
