"""Scanner and stain looks of the synthetic generator: each look changes the pixels it says it changes, the
default look changes nothing, random looks are reproducible, and the accuracy benchmark's measuring
function runs on a small slide (its figures are asserted elsewhere, see docs/tiling-and-qc.md).
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy import ndimage
from wsitk.shared.slides import synth
from wsitk.shared.slides.artefacts import plan_artefacts
from wsitk.shared.slides.looks import (
    LOOKS,
    RANDOM_RANGES,
    ScannerLook,
    hue_rotated,
    look_named,
    random_look,
)
from wsitk.shared.slides.synth import (
    GLASS_OD,
    Layout,
    Renderer,
    SynthSpec,
    generate_slide,
    load_truth,
    render_region,
)

from tests.benchmarks import bench_looks

REFERENCE_GLASS = 255.0 * np.exp(-GLASS_OD)  # about 240


def _uniform(kind: str, look: ScannerLook | None = None, seed: int = 3) -> Renderer:
    return Renderer(Layout.uniform(kind), 0.5, seed=seed, look=look)


def _mean_rgb(renderer: Renderer, downsample: int = 1, size: int = 256) -> np.ndarray:
    return renderer.render(downsample, 1000, 2000, size, size).reshape(-1, 3).astype(np.float64).mean(axis=0)


# -- the default look changes nothing --------------------------------------------------------------------


def test_reference_look_gives_identical_bytes_and_truth(tmp_path: Path) -> None:
    base = SynthSpec(width=1100, height=1000, seed=21, tumour_fraction=0.3, artefacts=True)
    named = dataclasses.replace(base, look=LOOKS["reference"])
    assert named == base and LOOKS["reference"].is_reference
    first = generate_slide(tmp_path / "a.svs", base)
    second = generate_slide(tmp_path / "b.svs", named)
    assert first.path.read_bytes() == second.path.read_bytes()
    summary = json.loads(first.truth_json_path.read_text())
    assert "look" not in summary["spec"]  # truth files of default slides are as they were
    assert sorted(first.pen_masks) == ["black", "blue", "green"]  # no red without a look asking for it
    assert np.array_equal(load_truth(first.path).pen_masks["blue"], first.pen_masks["blue"])


def test_red_ink_leaves_the_other_artefacts_where_they_were() -> None:
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:40] = True
    plain = plan_artefacts(5, 2500.0, 2000.0, mask, 50.0)
    with_red = plan_artefacts(5, 2500.0, 2000.0, mask, 50.0, extra_pen_colours=("red",))
    assert with_red.pens[:3] == plain.pens
    assert [p.colour for p in with_red.pens] == ["blue", "green", "black", "red"]
    assert (with_red.blur, with_red.debris, with_red.faint) == (plain.blur, plain.debris, plain.faint)


# -- what each look does to the pixels ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bright", "dim", "yellow-glass", "blue-grey-glass"])
def test_glass_takes_the_white_point_and_tissue_is_lit_by_it(name: str) -> None:
    look = LOOKS[name]
    assert look.white_rgb is not None
    white = np.asarray(look.white_rgb)
    glass = _mean_rgb(_uniform("background", look), downsample=4)
    assert np.abs(glass - white).max() < 3.0, (glass, white)
    # The white point is the illumination: tissue is multiplied by the same per-channel factor.
    reference, tinted = _mean_rgb(_uniform("normal")), _mean_rgb(_uniform("normal", look))
    np.testing.assert_allclose(tinted / reference, white / REFERENCE_GLASS, atol=0.015)


def test_yellow_glass_makes_tissue_yellowish() -> None:
    reference = _mean_rgb(_uniform("normal"))
    yellow = _mean_rgb(_uniform("normal", LOOKS["yellow-glass"]))
    # Blue loses most: the red/blue balance of the tissue moves towards yellow.
    assert yellow[0] / yellow[2] > reference[0] / reference[2] * 1.05


def _optical_density(rgb: np.ndarray, white: float = REFERENCE_GLASS) -> np.ndarray:
    return np.asarray(-np.log(np.maximum(rgb.astype(np.float64), 1.0) / white))


def test_stain_intensity_scales_tissue_optical_density() -> None:
    reference = _optical_density(_uniform("normal").render(1, 0, 0, 256, 256)).mean()
    strong = _optical_density(_uniform("normal", LOOKS["strong-stain"]).render(1, 0, 0, 256, 256)).mean()
    pale = _optical_density(_uniform("normal", LOOKS["pale-stain"]).render(1, 0, 0, 256, 256)).mean()
    assert strong / reference == pytest.approx(1.45, rel=0.08)
    assert pale / reference == pytest.approx(0.57, rel=0.1)


def test_hue_rotation_keeps_absorption_and_turns_the_stain() -> None:
    vector = synth.HAEMATOXYLIN_OD
    turned = hue_rotated(vector, 15.0)
    assert turned.sum() == pytest.approx(vector.sum(), rel=1e-5)  # grey component kept
    assert np.linalg.norm(turned) == pytest.approx(np.linalg.norm(vector), rel=1e-5)
    cosine = float(turned @ vector) / float(np.linalg.norm(turned) * np.linalg.norm(vector))
    assert cosine < 0.995
    assert np.array_equal(hue_rotated(vector, 0.0), vector)


def _hue_degrees(rgb: np.ndarray) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(rgb / 255.0))[0]


def test_rotated_stain_changes_the_hue_of_nuclei() -> None:
    reference = _uniform("tumour").render(1, 0, 0, 384, 384)
    rotated = _uniform("tumour", LOOKS["rotated-stain"]).render(1, 0, 0, 384, 384)
    nuclei = ndimage.binary_erosion(reference[..., 0] < 120, iterations=1)  # same nuclei in both renders
    assert nuclei.sum() > 500
    before = _hue_degrees(reference[nuclei].astype(np.float64).mean(axis=0))
    after = _hue_degrees(rotated[nuclei].astype(np.float64).mean(axis=0))
    assert abs(after - before) > 5.0, (before, after)
    # Overall absorption stays: the summed optical density changes by little.
    assert _optical_density(rotated).sum() == pytest.approx(_optical_density(reference).sum(), rel=0.03)


def test_stripes_are_periodic_bands_on_glass_and_tissue() -> None:
    look = LOOKS["stripes"]
    period_px = look.stripe_period_um / 2.0  # rendered at downsample 4: 2 um per pixel
    for kind in ("background", "normal"):
        plain = _uniform(kind).render(4, 0, 0, 1600, 96).astype(np.float64).mean(axis=(0, 2))
        striped = _uniform(kind, look).render(4, 0, 0, 1600, 96).astype(np.float64).mean(axis=(0, 2))
        ratio = striped / plain  # the look multiplies the light: its own profile, without the texture
        centres = (np.arange(4) * period_px).astype(int)
        band = np.concatenate([ratio[max(0, c - 3) : c + 4] for c in centres])
        between = np.concatenate(
            [ratio[c + int(period_px / 2) - 20 : c + int(period_px / 2) + 20] for c in centres[:3]]
        )
        assert between.mean() == pytest.approx(1.0, abs=0.003)
        assert 1 - band.mean() == pytest.approx(look.stripe_depth, rel=0.25), (kind, band.mean())
        # Periodic: the darkest column of each period lies on the strip boundary.
        for start in centres[1:3]:
            window = ratio[start - int(period_px / 2) : start + int(period_px / 2)]
            assert abs(int(np.argmin(window)) - int(period_px / 2)) <= 3
    flat = _uniform("background").render(4, 0, 0, 1600, 96).astype(np.float64).mean(axis=(0, 2))
    assert flat.max() - flat.min() < 2.0  # no stripes without the look


def test_red_ink_is_drawn_red_and_is_in_the_truth(tmp_path: Path) -> None:
    spec = SynthSpec(width=2400, height=1800, fmt="tiff", seed=5, look=LOOKS["red-ink"])
    truth = generate_slide(tmp_path / "red.tiff", spec)  # red ink even without the other artefacts
    red = truth.pen_masks["red"]
    assert red.sum() > 20
    assert list(truth.pen_masks) == ["red"]
    assert np.array_equal(truth.artefact_masks["pen"], red)
    reloaded = load_truth(truth.path)
    assert reloaded.spec == spec and reloaded.spec.look.red_ink
    assert np.array_equal(reloaded.pen_masks["red"], red)
    with openslide.OpenSlide(truth.path) as slide:
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
    factor = truth.mask_downsample // 4
    core = np.repeat(np.repeat(ndimage.binary_erosion(red, iterations=1), factor, 0), factor, 1)
    inked = level1[core[: level1.shape[0], : level1.shape[1]]].astype(np.float64)
    assert len(inked) > 100
    mean = inked.mean(axis=0)
    assert mean[0] > mean[1] + 60 and mean[0] > mean[2] + 50, mean


def test_low_jpeg_look_sets_the_quality_and_shrinks_the_file(tmp_path: Path) -> None:
    base = SynthSpec(width=1100, height=1000, seed=4)
    low = dataclasses.replace(base, look=LOOKS["low-jpeg"])
    assert low.jpeg_quality == LOOKS["low-jpeg"].jpeg_quality == 50
    reference = generate_slide(tmp_path / "ref.svs", base)
    lossy = generate_slide(tmp_path / "low.svs", low)
    assert lossy.path.stat().st_size < 0.8 * reference.path.stat().st_size
    with openslide.OpenSlide(lossy.path) as slide:
        assert "Q=50" in slide.properties["openslide.comment"]
    assert load_truth(lossy.path).spec == low


def test_render_region_shows_the_look() -> None:
    spec = SynthSpec(width=3000, height=2400, seed=2)
    plain = render_region(spec, 0, 0, 200, 150, downsample=4).astype(np.float64)
    dim = render_region(dataclasses.replace(spec, look=LOOKS["dim"]), 0, 0, 200, 150, 4).astype(np.float64)
    assert dim.mean() < plain.mean() - 15


# -- random looks, names, validation -----------------------------------------------------------------------


def test_random_look_is_deterministic_and_within_ranges() -> None:
    looks = [random_look(seed) for seed in range(200)]
    assert looks == [random_look(seed) for seed in range(200)]
    assert len(set(looks)) == 200
    level_low, level_high = RANDOM_RANGES["white_level"]
    for look in looks:
        assert look.white_rgb is not None
        assert level_low - 0.1 <= max(look.white_rgb) <= level_high + 0.1
        assert min(look.white_rgb) >= RANDOM_RANGES["white_tint"][0] * max(look.white_rgb) - 0.1
        for name in ("stain_intensity", "stain_hue_deg"):
            low, high = RANDOM_RANGES[name]
            assert all(low <= v <= high for v in getattr(look, name)), (name, look)
        assert look.jpeg_quality is not None
        assert RANDOM_RANGES["jpeg_quality"][0] <= look.jpeg_quality <= RANDOM_RANGES["jpeg_quality"][1]
        if look.stripe_period_um:
            assert (
                RANDOM_RANGES["stripe_period_um"][0]
                <= look.stripe_period_um
                <= RANDOM_RANGES["stripe_period_um"][1]
            )
    assert 40 < sum(look.red_ink for look in looks) < 160
    assert 40 < sum(look.stripe_period_um > 0 for look in looks) < 160
    assert look_named("random-7") == random_look(7)
    assert look_named("dim") is LOOKS["dim"]


def test_look_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="white_rgb"):
        ScannerLook(white_rgb=(300.0, 240.0, 240.0))
    with pytest.raises(ValueError, match="stripes need both"):
        ScannerLook(stripe_period_um=1000.0)
    with pytest.raises(ValueError, match="unknown look 'sepia'"):
        look_named("sepia")
    with pytest.raises(ValueError, match="unknown ScannerLook fields"):
        SynthSpec(look={"gamma": 2.2})


def test_random_look_round_trips_through_the_truth_file(tmp_path: Path) -> None:
    spec = SynthSpec(width=1200, height=1000, fmt="tiff", seed=8, artefacts=True, look=random_look(3))
    truth = generate_slide(tmp_path / "random.tiff", spec)
    assert load_truth(truth.path).spec == spec
    assert json.loads(truth.truth_json_path.read_text())["spec"]["look"]["name"] == "random-3"


def test_cli_writes_slides_in_the_named_looks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth.add_synth_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path), "--look", "dim,red-ink", "--size", "1200x1000", "--format", "tiff"]
    )
    assert synth.cli_synth(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[-1] for line in lines] == ["look=dim", "look=red-ink"]  # one slide per look
    assert [load_truth(Path(line.split("\t")[0])).spec.look.name for line in lines] == ["dim", "red-ink"]
    assert len(parser.parse_args([str(tmp_path), "--look", "all"]).look) == len(LOOKS)
    random_args = parser.parse_args(
        [str(tmp_path / "r"), "--random-looks", "--count", "1", "--size", "1100x1000"]
    )
    assert synth.cli_synth(random_args) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("look=random-0")  # slide seed 0
    cohort_args = parser.parse_args([str(tmp_path / "c"), "--patients", "2", "--random-looks"])
    assert synth.cli_synth(cohort_args) == 2
    assert "--random-looks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--look", "sepia"])


# -- the accuracy benchmark's measuring function -----------------------------------------------------------


def test_measure_look_reports_segmentation_and_qc(tmp_path: Path) -> None:
    path = bench_looks.make_slide(tmp_path, bench_looks.bench_spec(LOOKS["yellow-glass"], size=(2400, 1800)))
    result = bench_looks.measure_look(path)
    assert result["look"] == "yellow-glass"
    for key in (
        "tissue_iou",
        "pen_inside_mask",
        "faint_kept",
        "glass_rgb",
        "planned_tiles",
        "tiles_assessed",
    ):
        assert key in result
    assert 0.0 <= result["tissue_iou"] <= 1.0
    assert set(result["pen_inside_mask_by_colour"]) == {"blue", "green", "black", "red"}
    assert set(result["qc"]) == set(bench_looks.QC_REASONS)
    for rates in result["qc"].values():
        assert set(rates) == {"tp", "fp", "fn", "precision", "recall"}
    assert result["tiles_assessed"] > 0
    assert np.abs(np.asarray(result["glass_rgb"]) - np.asarray(LOOKS["yellow-glass"].white_rgb)).max() < 4
    table = bench_looks.markdown_table([result])
    assert table.count("\n") == 3 and "yellow-glass" in table


@pytest.mark.parametrize("name", ["blue-grey-glass", "pale-stain", "random-3"])
def test_hard_looks_meet_the_accuracy_bar(tmp_path: Path, name: str) -> None:
    """Tinted dim glass, weak staining, and eosin rotated toward red ink: the bars of docs/tiling-and-qc.md."""
    from wsitk.shared.slides.looks import look_named

    path = bench_looks.make_slide(tmp_path, bench_looks.bench_spec(look_named(name)))
    result = bench_looks.measure_look(path)
    print(f"{name}: IoU {result['tissue_iou']:.3f}, qc {result['qc']}")
    assert result["tissue_iou"] >= bench_looks.MIN_IOU, result["tissue_iou"]
    assert result["pen_inside_mask"] <= 0.05, result["pen_inside_mask_by_colour"]
    pen = result["qc"]["pen"]
    assert pen["precision"] >= 0.9 and pen["recall"] >= 0.8, pen
    assert result["qc"]["blur"]["recall"] >= 0.8, result["qc"]["blur"]
    clean = result["clean_tissue"]
    assert clean["tiles"] > 0 and clean["accepted"] / clean["tiles"] >= 0.95, clean
