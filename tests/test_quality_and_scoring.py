"""quality-filter's tile metrics and the scorer's deterministic tile cap."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from wsitk.services.mil_scorer.scorer import subsample
from wsitk.services.quality_filter.handler import assess
from wsitk.shared.contracts import pb
from wsitk.shared.slides.synth import render_patch

PROFILE = pb.PipelineProfile(qc_min_tissue_fraction=0.5)


def test_sharp_tissue_passes_blurred_tissue_and_background_do_not() -> None:
    rng = np.random.default_rng(1)
    tissue = render_patch("normal", 224, 0.5, rng)
    blurred = ndimage.gaussian_filter(tissue.astype(np.float32), sigma=(3, 3, 0)).astype(np.uint8)
    background = render_patch("background", 224, 0.5, rng)
    assert assess(tissue, PROFILE)[0]
    ok, reason, metrics = assess(blurred, PROFILE)
    assert (ok, reason) == (False, "blur") and metrics["sharpness"] < assess(tissue, PROFILE)[2]["sharpness"]
    ok, reason, background_metrics = assess(background, PROFILE)
    assert (ok, reason) == (False, "background")
    assert background_metrics["tissue_fraction"] < 0.2
    assert assess(tissue, PROFILE)[2]["tissue_fraction"] > 0.8


def test_tile_cap_keeps_everything_below_it_and_a_stable_sample_above() -> None:
    assert subsample(10, 20, "slide").tolist() == list(range(10))
    first, again, other = (
        subsample(1000, 100, "slide-a"),
        subsample(1000, 100, "slide-a"),
        subsample(1000, 100, "slide-b"),
    )
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
