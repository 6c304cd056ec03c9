"""Segmentation's memory does not grow with the slide: a pixel budget for the thumbnail, classification
band by band, and the background estimated on an even sample of a large thumbnail.

The figures on a 10,000 px and a 100,000 px slide are in docs/throughput.md (``bench_pipeline``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from wsitk.shared.slides import tissue
from wsitk.shared.slides.optical import estimate_background
from wsitk.shared.slides.synth import SynthSpec, generate_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segmentation-memory") / "slide.svs"
    generate_slide(path, SynthSpec(width=4000, height=3000, mpp=0.5, seed=21, tumour_fraction=0.2))
    return path


def test_the_thumbnail_stays_within_its_pixel_budget_and_finds_the_same_tissue(slide_path: Path) -> None:
    with openslide.OpenSlide(str(slide_path)) as slide:
        fine = tissue.segment_tissue(slide, mpp0=0.5)
        budget = 500 * 375 // 4  # a quarter of the 4 um/px thumbnail's pixels
        coarse = tissue.segment_tissue(slide, mpp0=0.5, max_mask_pixels=budget)
    assert fine.mask.shape == (375, 500)
    assert coarse.mask.size <= budget * 1.01  # sides are rounded to whole pixels
    assert coarse.downsample[0] == pytest.approx(2 * fine.downsample[0], rel=0.02)
    # Half the resolution, the same tissue: on this small section (0.66 mm2) one 16 um pixel of edge
    # all round is about 6 % of the area.
    assert coarse.area_mm2 == pytest.approx(fine.area_mm2, rel=0.1)


def test_banded_classification_equals_the_whole_image_at_once(
    slide_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with openslide.OpenSlide(str(slide_path)) as slide:
        thumbnail, scanned, _ = tissue.read_thumbnail_with_coverage(slide, width=500, height=375)
    area = (8 * 0.5 / 1000) ** 2
    whole, threshold, ink = tissue.tissue_mask_from_rgb(thumbnail, pixel_area_mm2=area, scanned=scanned)
    monkeypatch.setattr(tissue, "BAND_ROWS", 7)  # bands that do not divide the image
    banded, threshold_banded, ink_banded = tissue.tissue_mask_from_rgb(
        thumbnail, pixel_area_mm2=area, scanned=scanned
    )
    assert whole.any()
    np.testing.assert_array_equal(banded, whole)
    assert (threshold_banded, ink_banded) == (threshold, ink)


def test_a_large_thumbnails_background_is_estimated_on_an_even_sample(
    slide_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with openslide.OpenSlide(str(slide_path)) as slide:
        thumbnail, scanned, _ = tissue.read_thumbnail_with_coverage(slide, width=1000, height=750)
    full = estimate_background(thumbnail, scanned)
    monkeypatch.setattr(tissue, "MAX_BACKGROUND_PIXELS", 100_000)  # a sample of every 3rd row and column
    sampled = tissue.background_of(thumbnail, scanned)
    assert sampled.white == pytest.approx(full.white, abs=1.0)
    assert sampled.tissue_blue_ratio == pytest.approx(full.tissue_blue_ratio, abs=0.02)
    assert sampled.noise_od == pytest.approx(full.noise_od, abs=0.005)
