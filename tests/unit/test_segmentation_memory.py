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


def test_the_thumbnail_does_not_depend_on_the_size_of_the_regions_read(slide_path: Path) -> None:
    with openslide.OpenSlide(str(slide_path)) as slide:
        reference = tissue.read_thumbnail_with_coverage(slide, width=1000, height=750, chunk_px=4096)
        for chunk_px in (tissue.THUMBNAIL_CHUNK_PX, 333):  # 333: blocks that do not divide the image
            thumbnail, scanned, level = tissue.read_thumbnail_with_coverage(
                slide, width=1000, height=750, chunk_px=chunk_px
            )
            np.testing.assert_array_equal(thumbnail, reference[0])
            np.testing.assert_array_equal(scanned, reference[1])
            assert level == reference[2]


def test_compositing_blends_only_what_is_not_opaque_and_matches_the_formula() -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, size=(64, 48, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 255  # half the region fully opaque, half with every alpha
    weight = rgba[..., 3:].astype(np.float32) / 255.0
    expected = np.clip(np.rint(rgba[..., :3].astype(np.float32) * weight + 255.0 * (1.0 - weight)), 0, 255)
    result = tissue.composite_on_white(rgba)
    np.testing.assert_array_equal(result, expected.astype(np.uint8))
    assert result.flags.c_contiguous and not np.shares_memory(result, rgba)
    rgba[..., 3] = 0  # nothing scanned: white
    assert (tissue.composite_on_white(rgba) == 255).all()


def test_label_sizes_counted_in_bands_equal_one_bincount(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(4)
    labels, count = ndimage.label(rng.random((301, 257)) < 0.4, structure=np.ones((3, 3), dtype=bool))
    monkeypatch.setattr(tissue, "LABEL_BAND_ROWS", 13)
    np.testing.assert_array_equal(tissue._label_sizes(labels, count), np.bincount(labels.ravel()))
