"""Slide artefacts with ground truth for the synthetic generator: pen marks, blur, dark debris, faint tissue.

Why: tissue segmentation and tile QC are only trustworthy when measured, and measuring needs slides on
which we know exactly where a marker stroke, an out-of-focus patch, a fold of dark debris or a weakly
stained fragment lies. Artefacts are defined in level-0 micrometres, so every pyramid level shows the
same artefact at its own resolution, and :func:`artefact_truth` rasterises them onto the layout grid as
boolean masks (the ground truth written beside the slide).

* **pen**: blue, green and black marker strokes (thick polylines) laid over glass and tissue alike, and
  red ones on request (``extra_pen_colours``; a scanner look's ``red_ink``); ink multiplies the light like
  a filter, as on a real slide.
* **blur**: disks inside tissue where the image is Gaussian-blurred (sigma ``BLUR_SIGMA_UM``), like a
  scanner focus miss; rendered from a padded window so the blur has no seams at tile borders.
* **debris**: dark brown ellipses (folds, dust, pigment) that QC should call under-exposed/dark.
* **faint**: a disk of tissue whose stains are at ``FAINT_STAIN`` of their strength (pale staining,
  thin sections); it is still tissue, and segmentation should keep it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

ImageArray = NDArray[np.uint8]
BoolArray = NDArray[np.bool_]

PEN_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (35, 65, 175),
    "green": (40, 150, 70),
    "black": (28, 28, 32),
    "red": (200, 40, 50),
}
#: The colours every artefact slide gets one stroke of; others (red) only when asked for, drawn from their
#: own seeded stream so that slides without them keep their bytes.
STANDARD_PEN_COLOURS = ("blue", "green", "black")
PEN_OPACITY = 0.9
BLUR_SIGMA_UM = 4.0
DEBRIS_COLOUR = (70, 50, 40)
FAINT_STAIN = 0.3
ARTEFACT_KINDS = ("pen", "blur", "debris", "faint")


@dataclass(frozen=True)
class PenStroke:
    colour: str
    points_um: tuple[tuple[float, float], ...]
    width_um: float


@dataclass(frozen=True)
class Disk:
    x_um: float
    y_um: float
    radius_um: float


@dataclass(frozen=True)
class Artefacts:
    """Everything drawn on top of a slide, in level-0 micrometres."""

    pens: tuple[PenStroke, ...] = ()
    blur: tuple[Disk, ...] = ()
    debris: tuple[Disk, ...] = ()
    faint: tuple[Disk, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.pens or self.blur or self.debris or self.faint)


def plan_artefacts(
    seed: int,
    width_um: float,
    height_um: float,
    tissue_mask: BoolArray,
    mask_downsample_um: float,
    *,
    extra_pen_colours: tuple[str, ...] = (),
) -> Artefacts:
    """A seeded set: one stroke of each standard pen colour, two blurred disks, one debris spot and one faint
    disk, the last three centred on tissue (``tissue_mask`` cells of ``mask_downsample_um`` micrometres),
    plus one stroke of each of ``extra_pen_colours`` (see :func:`plan_pen_strokes`)."""
    rng = np.random.default_rng([seed, 11])
    on_tissue = _tissue_sampler(rng, tissue_mask, mask_downsample_um)
    pens = [_pen_stroke(rng, colour, width_um, height_um, on_tissue) for colour in STANDARD_PEN_COLOURS]
    short_um = min(width_um, height_um)
    blur = tuple(Disk(*on_tissue(), radius_um=max(120.0, 0.08 * short_um)) for _ in range(2))
    debris = (Disk(*on_tissue(), radius_um=max(60.0, 0.04 * short_um)),)
    faint = (Disk(*on_tissue(), radius_um=max(150.0, 0.09 * short_um)),)
    extra = plan_pen_strokes(seed, extra_pen_colours, width_um, height_um, tissue_mask, mask_downsample_um)
    return Artefacts(pens=(*pens, *extra), blur=blur, debris=debris, faint=faint)


def plan_pen_strokes(
    seed: int,
    colours: tuple[str, ...],
    width_um: float,
    height_um: float,
    tissue_mask: BoolArray,
    mask_downsample_um: float,
) -> tuple[PenStroke, ...]:
    """One stroke per colour, crossing tissue, from a seeded stream of its own (adding red to a slide
    leaves its other artefacts where they were)."""
    unknown = [colour for colour in colours if colour not in PEN_COLOURS]
    if unknown:
        raise ValueError(f"pen colours {unknown} are not among {', '.join(PEN_COLOURS)}")
    rng = np.random.default_rng([seed, 12])
    on_tissue = _tissue_sampler(rng, tissue_mask, mask_downsample_um)
    return tuple(_pen_stroke(rng, colour, width_um, height_um, on_tissue) for colour in colours)


def _tissue_sampler(
    rng: np.random.Generator, tissue_mask: BoolArray, mask_downsample_um: float
) -> Callable[[], tuple[float, float]]:
    """A function drawing the centre (micrometres) of a random tissue cell (the mask's centre if none)."""
    rows, cols = np.nonzero(tissue_mask)
    if len(rows) == 0:
        rows, cols = np.array([tissue_mask.shape[0] // 2]), np.array([tissue_mask.shape[1] // 2])

    def on_tissue() -> tuple[float, float]:
        pick = int(rng.integers(len(rows)))
        return (float(cols[pick]) + 0.5) * mask_downsample_um, (float(rows[pick]) + 0.5) * mask_downsample_um

    return on_tissue


def _pen_stroke(
    rng: np.random.Generator,
    colour: str,
    width_um: float,
    height_um: float,
    on_tissue: Callable[[], tuple[float, float]],
) -> PenStroke:
    """A two-segment stroke from a random point through a tissue point, as a hand marks a region."""
    short_um = min(width_um, height_um)
    start = (rng.uniform(0.05, 0.95) * width_um, rng.uniform(0.05, 0.95) * height_um)
    angle = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.25, 0.45) * short_um
    middle = on_tissue()
    end = (middle[0] + length * math.cos(angle), middle[1] + length * math.sin(angle))
    return PenStroke(colour, (start, middle, end), width_um=max(40.0, 0.025 * short_um))


def _segment_distance(
    xs: NDArray[np.float64], ys: NDArray[np.float64], a: tuple[float, float], b: tuple[float, float]
) -> NDArray[np.float64]:
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = max(dx * dx + dy * dy, 1e-12)
    t = np.clip(((xs - a[0]) * dx + (ys - a[1]) * dy) / length2, 0.0, 1.0)
    return np.asarray(np.hypot(xs - (a[0] + t * dx), ys - (a[1] + t * dy)))


def _pen_coverage(
    stroke: PenStroke, xs: NDArray[np.float64], ys: NDArray[np.float64], px_um: float
) -> NDArray[np.float64]:
    distance = np.full(np.broadcast(xs, ys).shape, np.inf)
    for a, b in zip(stroke.points_um[:-1], stroke.points_um[1:], strict=True):
        distance = np.minimum(distance, _segment_distance(xs, ys, a, b))
    return np.asarray(np.clip(0.5 + (stroke.width_um / 2 - distance) / max(px_um, 1e-9), 0.0, 1.0))


def _disk_coverage(
    disk: Disk, xs: NDArray[np.float64], ys: NDArray[np.float64], px_um: float
) -> NDArray[np.float64]:
    distance = np.hypot(xs - disk.x_um, ys - disk.y_um)
    return np.asarray(np.clip(0.5 + (disk.radius_um - distance) / max(px_um, 1e-9), 0.0, 1.0))


def _window_um(
    x0: int, y0: int, width: int, height: int, px_um: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    xs = (np.arange(x0, x0 + width, dtype=np.float64) + 0.5) * px_um
    ys = (np.arange(y0, y0 + height, dtype=np.float64) + 0.5) * px_um
    return xs[None, :], ys[:, None]


def _touches(disk: Disk, x0: int, y0: int, width: int, height: int, px_um: float, margin_um: float) -> bool:
    reach = disk.radius_um + margin_um
    return (
        x0 * px_um - reach <= disk.x_um <= (x0 + width) * px_um + reach
        and y0 * px_um - reach <= disk.y_um <= (y0 + height) * px_um + reach
    )


def render_with_artefacts(
    render: Callable[[int, int, int, int], ImageArray],
    artefacts: Artefacts,
    px_um: float,
    x0: int,
    y0: int,
    width: int,
    height: int,
    *,
    white_rgb: tuple[float, float, float] | None = None,
) -> ImageArray:
    """Render the window (pixels of a level whose pixels are ``px_um`` wide) and draw the artefacts.

    ``render(x0, y0, width, height)`` gives the clean pixels of any window of that level. ``white_rgb`` is
    the slide's glass white point (a scanner look's): faint staining is weakened relative to it rather
    than to pure white (None: relative to 255, as before looks existed).
    """
    from scipy.ndimage import gaussian_filter

    sigma_px = BLUR_SIGMA_UM / px_um
    pad = math.ceil(3 * sigma_px)
    blurred_here = [d for d in artefacts.blur if _touches(d, x0, y0, width, height, px_um, 0.0)]
    if blurred_here and sigma_px >= 0.3:
        padded = render(x0 - pad, y0 - pad, width + 2 * pad, height + 2 * pad).astype(np.float32)
        blurred = gaussian_filter(padded, sigma=(sigma_px, sigma_px, 0), mode="nearest")
        clean = padded[pad : pad + height, pad : pad + width]
        smooth = blurred[pad : pad + height, pad : pad + width]
        xs, ys = _window_um(x0, y0, width, height, px_um)
        weight = np.zeros((height, width), np.float64)
        for disk in blurred_here:
            weight = np.maximum(weight, _disk_coverage(disk, xs, ys, px_um))
        image = clean + (smooth - clean) * weight[..., None].astype(np.float32)
    else:
        image = render(x0, y0, width, height).astype(np.float32)
    xs, ys = _window_um(x0, y0, width, height, px_um)
    for disk in artefacts.faint:
        if _touches(disk, x0, y0, width, height, px_um, 0.0):
            weight = _disk_coverage(disk, xs, ys, px_um)[..., None]
            if white_rgb is None:
                faded = 255.0 * np.power(np.clip(image / 255.0, 1e-4, 1.0), FAINT_STAIN)
            else:
                white = np.asarray(white_rgb, np.float32)
                faded = white * np.power(np.clip(image / white, 1e-4, 1.0), FAINT_STAIN)
            image = image + (faded - image) * weight.astype(np.float32)
    for disk in artefacts.debris:
        if _touches(disk, x0, y0, width, height, px_um, 0.0):
            weight = _disk_coverage(disk, xs, ys, px_um)[..., None]
            dark = image * (np.asarray(DEBRIS_COLOUR, np.float32) / 255.0)
            image = image + (dark - image) * weight.astype(np.float32)
    for stroke in artefacts.pens:
        coverage = _pen_coverage(stroke, xs, ys, px_um)
        if coverage.any():
            weight = (PEN_OPACITY * coverage)[..., None].astype(np.float32)
            inked = image * (np.asarray(PEN_COLOURS[stroke.colour], np.float32) / 255.0)
            image = image + (inked - image) * weight
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def artefact_truth(artefacts: Artefacts, shape: tuple[int, int], cell_um: float) -> dict[str, BoolArray]:
    """Ground-truth masks (``pen``, ``blur``, ``debris``, ``faint``) on a grid of ``cell_um`` cells."""
    xs, ys = _window_um(0, 0, shape[1], shape[0], cell_um)
    masks = {kind: np.zeros(shape, dtype=bool) for kind in ARTEFACT_KINDS}
    for stroke in artefacts.pens:
        masks["pen"] |= _pen_coverage(stroke, xs, ys, 1e-6) >= 0.5
    for kind, disks in (("blur", artefacts.blur), ("debris", artefacts.debris), ("faint", artefacts.faint)):
        for disk in disks:
            masks[kind] |= _disk_coverage(disk, xs, ys, 1e-6) >= 0.5
    return masks


def pen_colour_mask(artefacts: Artefacts, colour: str, shape: tuple[int, int], cell_um: float) -> BoolArray:
    """Cells covered by strokes of one pen colour (for per-colour recall)."""
    xs, ys = _window_um(0, 0, shape[1], shape[0], cell_um)
    mask = np.zeros(shape, dtype=bool)
    for stroke in artefacts.pens:
        if stroke.colour == colour:
            mask |= _pen_coverage(stroke, xs, ys, 1e-6) >= 0.5
    return mask
