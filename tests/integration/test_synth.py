"""The synthetic slide generator writes slides that OpenSlide 4 reads like scanner output, with true ground truth.

Everything here goes through the real OpenSlide and real files: vendor detection, MPP properties, pyramid
levels, associated images, and pixels compared with the recorded masks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy import ndimage
from wsitk.shared.slides import synth
from wsitk.shared.slides.synth import SynthSpec, generate_slide, load_truth, render_patch, render_region


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return (high - low) / np.maximum(high, 1)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average factor x factor blocks (crops the ragged edge)."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    trimmed = image[:h, :w]
    return trimmed.reshape(h // factor, factor, w // factor, factor, *image.shape[2:]).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def tumour_svs(tmp_path_factory: pytest.TempPathFactory) -> synth.SlideTruth:
    path = tmp_path_factory.mktemp("synth") / "tumour.svs"
    spec = SynthSpec(width=5000, height=4000, mpp=0.5, fmt="svs", tumour_fraction=0.25, seed=7, tile_size=240)
    return generate_slide(path, spec)


def test_svs_is_aperio_with_pyramid_mpp_and_associated_images(tumour_svs: synth.SlideTruth) -> None:
    with openslide.OpenSlide(tumour_svs.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert slide.dimensions == (5000, 4000)
        assert slide.level_count == 3
        assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "20"
        assert slide.properties["openslide.level[0].tile-width"] == "240"
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        assert slide.associated_images["label"].size == (400, 400)


def test_svs_carries_identifying_fields_for_deidentification_tests(tumour_svs: synth.SlideTruth) -> None:
    with openslide.OpenSlide(tumour_svs.path) as slide:
        properties = dict(slide.properties)
    assert properties["aperio.Filename"].startswith("PATIENT-")
    assert properties["aperio.Date"].count("/") == 2
    assert "@" in properties["aperio.User"]
    assert properties["aperio.Barcode"]
    # The truth records exactly which properties a de-identifier has to remove.
    assert tumour_svs.identifying_properties
    for key, value in tumour_svs.identifying_properties.items():
        assert properties[key] == value


@pytest.mark.parametrize("mpp, power", [(0.25, "40"), (0.5, "20")])
def test_svs_mpp_and_objective_power(tmp_path: Path, mpp: float, power: str) -> None:
    spec = SynthSpec(width=1500, height=1200, mpp=mpp, fmt="svs", seed=3, with_associated_images=False)
    truth = generate_slide(tmp_path / "slide.svs", spec)
    with openslide.OpenSlide(truth.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == power
        assert slide.level_count == 2
        assert not slide.associated_images


def test_generic_tiff_reports_mpp_from_resolution_tags(tmp_path: Path) -> None:
    spec = SynthSpec(width=3000, height=2500, mpp=0.25, fmt="tiff", seed=4)
    truth = generate_slide(tmp_path / "slide.tiff", spec)
    with openslide.OpenSlide(truth.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count == 2
        assert slide.level_dimensions[1] == (750, 625)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        assert slide.properties["tiff.ResolutionUnit"] == "centimeter"


def test_generic_tiff_without_mpp_has_no_mpp_property(tmp_path: Path) -> None:
    spec = SynthSpec(width=1500, height=1200, fmt="tiff", seed=4, with_mpp=False)
    truth = generate_slide(tmp_path / "slide.tiff", spec)
    with openslide.OpenSlide(truth.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_Y not in slide.properties
        assert openslide.PROPERTY_NAME_OBJECTIVE_POWER not in slide.properties


def test_tissue_in_pixels_matches_truth_mask(tumour_svs: synth.SlideTruth) -> None:
    factor = tumour_svs.mask_downsample // 4  # level 1 pixels per mask cell
    with openslide.OpenSlide(tumour_svs.path) as slide:
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
    tissue_pixels = _block_mean((_saturation(level1) > 0.15).astype(np.float32), factor) > 0.5
    truth = tumour_svs.tissue_mask[: tissue_pixels.shape[0], : tissue_pixels.shape[1]]
    iou = (tissue_pixels & truth).sum() / (tissue_pixels | truth).sum()
    assert 0.1 < tumour_svs.tissue_fraction < 0.9
    assert iou > 0.8, f"tissue IoU {iou:.3f}"
    # Background is near-white with mild noise.
    glass_cells = ndimage.binary_erosion(~tumour_svs.tissue_mask, iterations=3)
    glass_pixels = np.repeat(np.repeat(glass_cells, factor, 0), factor, 1)
    background = level1[glass_pixels[: level1.shape[0], : level1.shape[1]]]
    assert 232 <= background.mean() <= 248
    assert 0.3 < background.std() < 8


def test_tumour_truth_and_tumour_pixels(tumour_svs: synth.SlideTruth) -> None:
    assert tumour_svs.label == "tumour"
    assert tumour_svs.tumour_fraction_actual == pytest.approx(0.25, abs=0.03)
    assert not (tumour_svs.tumour_mask & ~tumour_svs.tissue_mask).any()
    # Tumour regions are visibly different: darker and more haematoxylin-blue than normal tissue.
    factor = tumour_svs.mask_downsample // 4
    with openslide.OpenSlide(tumour_svs.path) as slide:
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
    cells = _block_mean(level1.astype(np.float32), factor)
    shape = cells.shape[:2]
    tumour_cells = ndimage.binary_erosion(tumour_svs.tumour_mask, iterations=2)[: shape[0], : shape[1]]
    normal_cells = ndimage.binary_erosion(tumour_svs.tissue_mask & ~tumour_svs.tumour_mask, iterations=2)[
        : shape[0], : shape[1]
    ]
    tumour_rgb, normal_rgb = cells[tumour_cells].mean(axis=0), cells[normal_cells].mean(axis=0)
    assert tumour_rgb.mean() < normal_rgb.mean() - 25
    assert tumour_rgb[0] < normal_rgb[0] - 40  # less red: more haematoxylin


def test_truth_sidecars_round_trip(tumour_svs: synth.SlideTruth) -> None:
    loaded = load_truth(tumour_svs.path)
    assert loaded.label == tumour_svs.label
    assert loaded.spec == tumour_svs.spec
    assert loaded.mask_downsample == tumour_svs.mask_downsample
    assert np.array_equal(loaded.tissue_mask, tumour_svs.tissue_mask)
    assert np.array_equal(loaded.tumour_mask, tumour_svs.tumour_mask)
    summary = json.loads(tumour_svs.truth_json_path.read_text())
    assert summary["seed"] == 7
    assert summary["tumour_fraction_actual"] == pytest.approx(tumour_svs.tumour_fraction_actual)
    with pytest.raises(FileNotFoundError, match="no ground truth"):
        load_truth(tumour_svs.path.with_name("missing.svs"))


def test_normal_slide_has_no_tumour(tmp_path: Path) -> None:
    truth = generate_slide(tmp_path / "normal.tiff", SynthSpec(width=1500, height=1200, fmt="tiff", seed=9))
    assert truth.label == "normal"
    assert truth.tumour_fraction_actual == 0.0
    assert not truth.tumour_mask.any()
    assert truth.tissue_mask.any()


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    spec = SynthSpec(width=1100, height=1000, fmt="svs", tumour_fraction=0.3, seed=21)
    first = generate_slide(tmp_path / "a.svs", spec)
    second = generate_slide(tmp_path / "b.svs", spec)
    other = generate_slide(
        tmp_path / "c.svs", SynthSpec(width=1100, height=1000, fmt="svs", tumour_fraction=0.3, seed=22)
    )
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()


def test_render_region_equals_stored_tiles(tumour_svs: synth.SlideTruth) -> None:
    """Stored tiles are render_region output up to JPEG loss, at level 0 and at a lower level."""
    ys, xs = np.nonzero(tumour_svs.tumour_mask)
    x0 = int(xs[len(xs) // 2]) * tumour_svs.mask_downsample // 240 * 240
    y0 = int(ys[len(ys) // 2]) * tumour_svs.mask_downsample // 240 * 240
    with openslide.OpenSlide(tumour_svs.path) as slide:
        for level, downsample in ((0, 1), (1, 4)):
            stored = np.asarray(slide.read_region((x0, y0), level, (300, 200)).convert("RGB")).astype(
                np.float32
            )
            rendered = render_region(tumour_svs.spec, x0, y0, 300, 200, downsample).astype(np.float32)
            assert rendered.shape == (200, 300, 3)
            assert rendered.std() > 10
            # JPEG loses fine detail: compare at a scale it keeps, and check the alignment is exact.
            smooth_difference = np.abs(_smooth(stored) - _smooth(rendered)).mean()
            assert smooth_difference < 2.5, f"level {level}: {smooth_difference:.2f}"
            shifted = render_region(tumour_svs.spec, x0 + downsample, y0, 300, 200, downsample)
            assert (
                np.abs(_smooth(stored) - _smooth(shifted.astype(np.float32))).mean() > 2 * smooth_difference
            )


def _smooth(image: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=(1.5, 1.5, 0))


def _dark_blob_areas(patch: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(patch[..., 0] < 140)
    return np.bincount(labels.ravel())[1:] if count else np.zeros(0)


def test_render_patch_kinds_scale_and_determinism() -> None:
    patches = {kind: render_patch(kind, 256, 0.5, np.random.default_rng(1)) for kind in synth.PATCH_KINDS}
    for patch in patches.values():
        assert patch.shape == (256, 256, 3)
        assert patch.dtype == np.uint8
    assert patches["background"].mean() > 230
    assert _saturation(patches["background"]).mean() < 0.05
    assert patches["tumour"].mean() < patches["normal"].mean() - 20 < patches["background"].mean() - 40
    assert np.array_equal(patches["normal"], render_patch("normal", 256, 0.5, np.random.default_rng(1)))
    assert not np.array_equal(patches["normal"], render_patch("normal", 256, 0.5, np.random.default_rng(2)))
    # Physical scale: nuclei at 0.25 um/px are twice as wide in pixels (four times the area) as at 0.5.
    areas_20x = np.concatenate(
        [_dark_blob_areas(render_patch("normal", 512, 0.5, np.random.default_rng(s))) for s in range(3)]
    )
    areas_40x = np.concatenate(
        [_dark_blob_areas(render_patch("normal", 512, 0.25, np.random.default_rng(s))) for s in range(3)]
    )
    ratio = np.median(areas_40x[areas_40x > 3]) / np.median(areas_20x[areas_20x > 3])
    assert 2.8 < ratio < 5.5, ratio
    with pytest.raises(ValueError, match="kind"):
        render_patch("stroma", 64, 0.5, np.random.default_rng(0))


def test_spec_validation_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="tile_size 250 must be a multiple of 16"):
        SynthSpec(tile_size=250)
    with pytest.raises(ValueError, match="with_mpp=False is only possible with fmt='tiff'"):
        SynthSpec(fmt="svs", with_mpp=False)


def test_cohort_via_cli_alternates_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth.add_synth_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path),
            "--count",
            "4",
            "--size",
            "1200x1000",
            "--format",
            "tiff",
            "--tumour-fraction",
            "0.3",
            "--seed",
            "5",
        ]
    )
    assert synth.cli_synth(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert [line.split("\t")[2] for line in lines] == ["tumour", "normal", "tumour", "normal"]
    paths = sorted(tmp_path.glob("*.tiff"))
    assert len(paths) == 4
    seeds = {load_truth(path).seed for path in paths}
    assert len(seeds) == 4
    for path in paths:
        with openslide.OpenSlide(path) as slide:
            assert slide.dimensions == (1200, 1000)
