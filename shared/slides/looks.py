"""Scanner and stain looks for the synthetic generator: one slide layout, many appearances.

Why: a segmentation or QC rule tuned on one rendering of the generator can quietly depend on that
rendering (glass at exactly 240, pink of one hue, no ink but blue, green and black). Real slides come from
bright and dim scanners, yellow and bluish glass, strong and pale or differently tinted staining, lossy
exports, line scanners that leave faint strip boundaries, and red marker pens. A :class:`ScannerLook`
describes one such appearance; :data:`LOOKS` names a set of them and :func:`random_look` draws
combinations within :data:`RANGES`, so that accuracy is measured across looks, not on one.

How a look changes the pixels (``shared/slides/synth/`` applies it):

* ``white_rgb``: the glass white point, i.e. the illumination. Transmitted light is
  ``white_rgb * exp(-OD)`` for glass and tissue alike, so tissue on yellow glass is yellowish and tissue on
  a dim scanner is darker. ``None``: the generator's reference glass (about RGB 240, neutral).
* ``stain_intensity``: (eosin, haematoxylin) optical-density multipliers, on top of ``SynthSpec.stain_shift``.
* ``stain_hue_deg``: (eosin, haematoxylin) rotations of each stain's OD vector about the grey axis
  (1, 1, 1): the stain's hue changes while its overall absorption (the OD sum) stays, as between dye lots
  and protocols.
* ``jpeg_quality``: the tiles' JPEG quality (replaces ``SynthSpec.jpeg_quality`` when set).
* ``stripe_period_um``, ``stripe_depth``: a line scanner's strip boundaries every ``stripe_period_um``
  level-0 micrometres along x, each a faint darker band (Gaussian profile, sigma ``STRIPE_SIGMA_UM``)
  that removes ``stripe_depth`` of the light at its centre, on glass and tissue alike.
* ``red_ink``: one red marker stroke in addition to the blue, green and black ones (needs
  ``SynthSpec.artefacts``); it is part of the pen truth mask like the others.

The default look (``ScannerLook()``, also ``LOOKS["reference"]``) changes nothing: a spec without a look
gives the same bytes as before looks existed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

#: Half-width (Gaussian sigma, level-0 micrometres) of one strip-boundary band.
STRIPE_SIGMA_UM = 40.0

#: Accepted bounds of every look parameter (validated on construction) and, for random looks, the range
#: they are drawn from (``random_look``; documented in docs/tiling-and-qc.md).
RANGES: dict[str, tuple[float, float]] = {
    "white_rgb": (180.0, 255.0),  # each channel of the glass white point
    "stain_intensity": (0.4, 1.8),  # each of (eosin, haematoxylin)
    "stain_hue_deg": (-30.0, 30.0),  # each of (eosin, haematoxylin)
    "jpeg_quality": (30, 100),
    "stripe_period_um": (200.0, 5000.0),  # 0 = no stripes
    "stripe_depth": (0.0, 0.08),  # share of light lost at a band's centre (0.02 ~ 5 grey levels)
}

#: What random_look draws from (narrower than RANGES where the extremes stop looking like working labs).
RANDOM_RANGES: dict[str, tuple[float, float]] = {
    "white_level": (210.0, 252.0),  # brightest channel of the glass
    "white_tint": (0.90, 1.0),  # each channel relative to the brightest one
    "stain_intensity": (0.6, 1.5),
    "stain_hue_deg": (-20.0, 20.0),
    "jpeg_quality": (50, 95),
    "stripe_period_um": (800.0, 1200.0),
    "stripe_depth": (0.01, 0.03),
}


@dataclass(frozen=True)
class ScannerLook:
    """One scanner and staining appearance; the module docstring says what each field does."""

    name: str = "reference"
    white_rgb: tuple[float, float, float] | None = None
    stain_intensity: tuple[float, float] = (1.0, 1.0)  # (eosin, haematoxylin)
    stain_hue_deg: tuple[float, float] = (0.0, 0.0)  # (eosin, haematoxylin)
    jpeg_quality: int | None = None
    stripe_period_um: float = 0.0
    stripe_depth: float = 0.0
    red_ink: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists: normalise so that a reloaded look equals (and hashes like) the written one.
        if self.white_rgb is not None:
            object.__setattr__(self, "white_rgb", tuple(float(v) for v in self.white_rgb))
        object.__setattr__(self, "stain_intensity", tuple(float(v) for v in self.stain_intensity))
        object.__setattr__(self, "stain_hue_deg", tuple(float(v) for v in self.stain_hue_deg))
        object.__setattr__(self, "stripe_period_um", float(self.stripe_period_um))
        object.__setattr__(self, "stripe_depth", float(self.stripe_depth))
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid ScannerLook {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        low, high = RANGES["white_rgb"]
        if self.white_rgb is not None and (
            len(self.white_rgb) != 3 or not all(low <= v <= high for v in self.white_rgb)
        ):
            problems.append(
                f"white_rgb {self.white_rgb} must be three levels (R, G, B) within {low:g}..{high:g}"
            )
        for name in ("stain_intensity", "stain_hue_deg"):
            value = getattr(self, name)
            low, high = RANGES[name]
            if len(value) != 2 or not all(low <= v <= high for v in value):
                problems.append(
                    f"{name} {value} must be two values (eosin, haematoxylin) within {low:g}..{high:g}"
                )
        low, high = RANGES["jpeg_quality"]
        if self.jpeg_quality is not None and not low <= self.jpeg_quality <= high:
            problems.append(f"jpeg_quality {self.jpeg_quality} must be within {low:g}..{high:g} (or None)")
        low, high = RANGES["stripe_period_um"]
        if self.stripe_period_um != 0.0 and not low <= self.stripe_period_um <= high:
            problems.append(
                f"stripe_period_um {self.stripe_period_um} must be 0 (no stripes) or within {low:g}..{high:g}"
            )
        low, high = RANGES["stripe_depth"]
        if not low <= self.stripe_depth <= high:
            problems.append(f"stripe_depth {self.stripe_depth} must be within {low:g}..{high:g}")
        if (self.stripe_period_um > 0) != (self.stripe_depth > 0):
            problems.append("stripes need both stripe_period_um and stripe_depth (or neither)")
        return problems

    @property
    def is_reference(self) -> bool:
        """True when the look changes no pixel (whatever its name)."""
        return replace(self, name=ScannerLook.name) == ScannerLook()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScannerLook:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ScannerLook fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def hue_rotated(od_vector: np.ndarray, degrees: float) -> np.ndarray:
    """An RGB optical-density vector rotated by ``degrees`` about the grey axis (1, 1, 1)/sqrt(3).

    The component along the grey axis (overall absorption) is kept; only the hue turns. Rodrigues'
    rotation; for the generator's stains every component stays positive up to 180 degrees.
    """
    vector = np.asarray(od_vector, np.float64)
    if degrees == 0.0:
        return vector.astype(np.float32)
    axis = np.full(3, 1 / math.sqrt(3))
    angle = math.radians(degrees)
    rotated = (
        vector * math.cos(angle)
        + np.cross(axis, vector) * math.sin(angle)
        + axis * float(axis @ vector) * (1 - math.cos(angle))
    )
    return rotated.astype(np.float32)


def stripe_od(x_um: np.ndarray, pixel_um: float, period_um: float, depth: float) -> np.ndarray:
    """Optical density of the strip-boundary bands at level-0 positions ``x_um`` (pixel centres).

    Each band is a Gaussian (sigma ``STRIPE_SIGMA_UM``) centred on a multiple of ``period_um``; pixels
    wider than the band average it (the Gaussian is widened by the pixel's box, its integral kept), so
    every pyramid level shows the same band.
    """
    sigma = math.sqrt(STRIPE_SIGMA_UM**2 + pixel_um**2 / 12.0)
    peak = depth * STRIPE_SIGMA_UM / sigma
    offset = np.mod(x_um, period_um)
    distance = np.minimum(offset, period_um - offset)
    loss = peak * np.exp(-0.5 * (distance / sigma) ** 2)
    return np.asarray(-np.log1p(-loss), np.float32)


#: The named looks. The parameters of the tinted glasses and brightnesses are those of real scanners'
#: backgrounds as seen in public slides (bright ~250, dim ~215, yellowish and bluish-grey glass).
LOOKS: dict[str, ScannerLook] = {
    look.name: look
    for look in (
        ScannerLook(),
        ScannerLook("bright", white_rgb=(250.0, 250.0, 250.0)),
        ScannerLook("dim", white_rgb=(215.0, 215.0, 215.0)),
        ScannerLook("yellow-glass", white_rgb=(232.0, 226.0, 212.0)),
        ScannerLook("blue-grey-glass", white_rgb=(200.0, 205.0, 218.0)),
        ScannerLook("strong-stain", stain_intensity=(1.45, 1.45)),
        ScannerLook("pale-stain", stain_intensity=(0.55, 0.6)),
        ScannerLook("rotated-stain", stain_hue_deg=(15.0, -15.0)),
        ScannerLook("low-jpeg", jpeg_quality=50),
        ScannerLook("stripes", stripe_period_um=1000.0, stripe_depth=0.025),
        ScannerLook("red-ink", red_ink=True),
    )
}


def random_look(seed: int) -> ScannerLook:
    """A look drawn from :data:`RANDOM_RANGES`; the same seed gives the same look.

    The glass: brightest channel in ``white_level``, each channel ``white_tint`` of it; the stains:
    intensity and hue per stain; JPEG quality; stripes and red ink each with probability 1/2.
    """
    if seed < 0:
        raise ValueError(f"seed {seed} must be >= 0")
    rng = np.random.default_rng([seed, 31])

    def draw(name: str, count: int) -> tuple[float, ...]:
        low, high = RANDOM_RANGES[name]
        return tuple(round(float(v), 3) for v in rng.uniform(low, high, count))

    level = draw("white_level", 1)[0]
    tint = np.asarray(draw("white_tint", 3))
    white = tuple(round(level * float(v), 1) for v in tint / tint.max())
    intensity, hue = draw("stain_intensity", 2), draw("stain_hue_deg", 2)
    low, high = RANDOM_RANGES["jpeg_quality"]
    quality = int(rng.integers(int(low), int(high) + 1))
    with_stripes, red_ink = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    period, depth = draw("stripe_period_um", 1)[0], draw("stripe_depth", 1)[0]
    return ScannerLook(
        name=f"random-{seed}",
        white_rgb=(white[0], white[1], white[2]),
        stain_intensity=(intensity[0], intensity[1]),
        stain_hue_deg=(hue[0], hue[1]),
        jpeg_quality=quality,
        stripe_period_um=period if with_stripes else 0.0,
        stripe_depth=depth if with_stripes else 0.0,
        red_ink=red_ink,
    )


def look_named(name: str) -> ScannerLook:
    """A named look, or ``random-<seed>`` for :func:`random_look`; ValueError naming the choices."""
    if name in LOOKS:
        return LOOKS[name]
    prefix = "random-"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return random_look(int(name[len(prefix) :]))
    raise ValueError(f"unknown look {name!r}: choose one of {', '.join(LOOKS)} or random-<seed>")
