"""The hard benchmark's building blocks: mimics per slide, slide sizes from tile counts, a held-out site,
fixed splits and label noise. ``cohort.py`` uses them when the matching ``CohortParameters`` are set.

Why: with the plain cohort every model, mean pooling included, separates the classes perfectly, because
tumour covers a large share of the tissue, looks more purple everywhere, slides are small and every test
site is also a training site. The hard cohort removes each shortcut:

* **mimics** in every slide (``MIMIC_SHARES``): lymphoid aggregates and reactive epithelium are as dark
  and nuclear-rich as tumour, necrosis, fat and mucin move the colour mean far more than a small tumour;
* **small tumours** (0.5-5 % of the tissue, drawn log-uniformly, so about a third fall below 1 %) with an
  optionally **subtle** look (stroma like normal, nuclei only moderately changed);
* **real slide sizes**: each slide's size is chosen so that its tissue holds a drawn number of the tiler's
  default tiles (224 px at 0.5 um/px, i.e. 112 um; ``TILER_TILE_UM``), 5,000-30,000 in the full benchmark;
* **a held-out site** (the last one) with the strongest stain shift the generator allows and a scanner
  look of its own (``HELD_OUT_*``); all its patients are ``split=test``, so training never sees it;
* a share of the other sites' patients also fixed to ``test`` (in-distribution test patients), the rest
  ``train``;
* **label noise**: an exact share of the patients has its label flipped in labels.csv (the label column);
  the truth stays in ``true_label`` and cohort.json, so an evaluation can report both.
"""

from __future__ import annotations

import math

import numpy as np
from wsitk.shared.slides.looks import ScannerLook
from wsitk.shared.slides.synth.spec import MIMIC_CLASSES, SynthSpec

#: The tiler's default tile (``Settings.tile_size`` 224 px at ``Settings.target_mpp`` 0.5 um/px), in um.
TILER_TILE_UM = 224 * 0.5

#: Per mimic: (probability that a slide has it, share of the tissue (low, high) when it does).
MIMIC_SHARES: dict[str, tuple[float, tuple[float, float]]] = {
    "lymphoid": (0.8, (0.01, 0.08)),
    "reactive": (0.8, (0.01, 0.08)),
    "necrosis": (0.5, (0.005, 0.04)),
    "fat": (0.6, (0.02, 0.12)),
    "mucin": (0.4, (0.005, 0.05)),
}

#: The held-out site: stain shift near the edges of STAIN_SHIFT_RANGE (0.5..1.6; room is left for a
#: patient factor of up to +-5 %),
#: a colour cast, and a look of its own (yellowish dim glass, rotated stain hues, strong JPEG).
HELD_OUT_STAIN_SHIFT = (1.5, 0.62)
HELD_OUT_ILLUMINATION_OD = (0.02, 0.03, 0.07)
HELD_OUT_LOOK = ScannerLook(
    "held-out-site", white_rgb=(232.0, 222.0, 204.0), stain_hue_deg=(12.0, -12.0), jpeg_quality=60
)

#: The hard benchmark's defaults (``CohortParameters`` fields), used by ``wsi synth --hard`` and
#: ``wsi experiment --benchmark hard``; any of them can be overridden.
HARD_DEFAULTS: dict[str, object] = {
    "slides_per_patient": (1, 3),
    "tumour_patient_ratio": 0.5,
    "tumour_slide_probability": 0.5,
    "tumour_fraction": (0.005, 0.05),
    "tumour_fraction_log": True,
    "tumour_look": "subtle",
    "mimics": True,
    "tiles_per_slide": (5000, 30000),
    "sites": 4,
    "site_stain_shift": 0.15,
    "held_out_site": True,
    "test_fraction": 0.2,
    "label_noise": 0.05,
}


def draw_mimics(rng: np.random.Generator) -> tuple[tuple[str, float], ...]:
    """One slide's mimics: each present with its probability, with a share drawn from its range."""
    chosen = []
    for name in MIMIC_CLASSES:
        probability, (low, high) = MIMIC_SHARES[name]
        present, share = rng.random() < probability, float(rng.uniform(low, high))
        if present:
            chosen.append((name, round(share, 4)))
    return tuple(chosen)


def draw_tiles(rng: np.random.Generator, tiles: tuple[int, int]) -> int:
    """A tile count, log-uniform within the range (inclusive)."""
    low, high = tiles
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def slide_size_for_tiles(tiles: int, seed: int, mpp: float, aspect: float) -> tuple[int, int]:
    """(width, height) such that the slide's tissue (seed ``seed``) holds about ``tiles`` tiler tiles.

    The tissue layout is drawn on a grid of at most 512 cells whose shape depends on the slide's size only
    through rounding, so the tissue share measured on a provisional size carries over; two refinements
    absorb the rounding.
    """
    from wsitk.shared.slides.synth.layout import build_layout

    tile_px = TILER_TILE_UM / mpp
    width = max(256, round(math.sqrt(tiles * tile_px * tile_px * aspect / 0.35)))
    for _ in range(3):
        height = max(256, round(width / aspect))
        layout = build_layout(SynthSpec(width=width, height=height, mpp=mpp, seed=seed))
        share = max(float(layout.tissue_mask.mean()), 0.02)
        width = max(256, round(math.sqrt(tiles * tile_px * tile_px * aspect / share)))
    return width, max(256, round(width / aspect))


def fixed_splits(
    patients: list[tuple[str, str, str]], held_out: str | None, test_fraction: float, seed: int
) -> dict[str, str]:
    """``patient -> "test" | "train"`` from ``(patient, site, label)``: the held-out site's patients are all
    test; of the others a ``test_fraction`` share of each label (at least one when the label has two or
    more patients and the share is positive), drawn at random, and the rest train."""
    rng = np.random.default_rng([seed, 29])
    split = {patient: "test" for patient, site, _ in patients if site == held_out}
    for label in ("tumour", "normal"):
        group = [p for p, site, lab in patients if site != held_out and lab == label]
        take = round(len(group) * test_fraction)
        if take == 0 and test_fraction > 0 and len(group) >= 2:
            take = 1
        chosen = set(rng.permutation(group)[:take].tolist()) if group else set()
        for patient in group:
            split[patient] = "test" if patient in chosen else "train"
    return split


def noisy_patients(patient_ids: list[str], share: float, seed: int) -> set[str]:
    """Exactly ``round(share * patients)`` patients, drawn at random, whose recorded label is flipped."""
    count = round(share * len(patient_ids))
    if count == 0:
        return set()
    rng = np.random.default_rng([seed, 26])
    return {str(p) for p in rng.choice(patient_ids, size=count, replace=False)}
