"""Out-of-distribution flags: the training-embedding summary, its calibration, and the demo model flagging a
real scan it was never trained on while synthetic slides of its own kind pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wsitk.shared.models.ood import EmbeddingMoments, OodReference, fit_reference

from tests.conftest import Pipeline

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real"


def test_streamed_moments_equal_the_direct_mean_and_covariance_far_from_zero() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.normal(1000.0, 2.0, (5000, 6)) @ rng.normal(size=(6, 6))  # a mean far from 0
    moments = EmbeddingMoments()
    for start in range(0, len(tiles), 333):
        moments.add(tiles[start : start + 333].astype(np.float16).astype(np.float64))
    mean, covariance = moments.mean_and_covariance()
    reference = tiles.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(mean, reference.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(covariance, np.cov(reference, rowvar=False), rtol=1e-7, atol=1e-7)


def test_shifted_slides_are_flagged_and_the_summary_survives_a_json_round_trip() -> None:
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(64, 64))

    def slide(shift: float, tiles: int = 200) -> np.ndarray:
        return (rng.normal(size=(tiles, 64)) @ basis + shift).astype(np.float16)

    reference = fit_reference((slide(0.0, 500) for _ in range(8)), [slide(0.0) for _ in range(10)])
    assert reference.training_tiles == 4000
    assert np.all(np.diff(reference.reference_scores) >= 0) and len(reference.reference_scores) == 10
    same = [reference.assess(slide(0.0)) for _ in range(30)]
    assert not any(result.out_of_distribution for result in same)
    assert 0.5 < np.median([result.score for result in same]) < 2.0  # about 1 for tiles like training
    shifted = reference.assess(slide(25.0))
    assert shifted.out_of_distribution and shifted.percentile == 1.0 and shifted.score > shifted.limit
    again = OodReference.from_dict(reference.to_dict())
    assert again.assess(slide(25.0)).out_of_distribution
    assert again.slide_score(same_bag := slide(0.0)) == pytest.approx(
        reference.slide_score(same_bag), rel=1e-4
    )


def _slide_features(path: Path, backbone: object) -> np.ndarray:
    import openslide
    from wsitk.shared.slides.tiling import iter_tiles, plan_tiles
    from wsitk.shared.slides.tissue import segment_tissue

    slide = openslide.OpenSlide(str(path))
    mpp0 = float(slide.properties["openslide.mpp-x"])
    grid = plan_tiles(
        *slide.dimensions,
        mpp0,
        segment_tissue(slide, mpp0=mpp0),
        target_mpp=0.5,
        tile_size=224,
        min_tissue_fraction=0.5,
        level_downsamples=list(slide.level_downsamples),
    )
    tiles = np.stack([tile for _, tile in iter_tiles(slide, grid)])
    return np.asarray(backbone.embed(tiles))  # type: ignore[attr-defined]


def test_demo_model_flags_the_real_scan_and_passes_synthetic_slides(
    tiny_models: Path, tmp_path: Path
) -> None:
    from wsitk.shared.models.runtime import BackboneRunner, MilRunner
    from wsitk.shared.slides.synth.cohort import generate_labelled_cohort

    backbone = BackboneRunner(tiny_models / "backbone-small-cnn.onnx", prefer=("CPUExecutionProvider",))
    mil = MilRunner(tiny_models / "mil-default.onnx")
    assert mil.ood is not None and mil.ood.limit > mil.ood.reference_scores[-1]

    real = mil.ood.assess(_slide_features(REAL / "CMU-1-Small-Region.svs", backbone))
    assert real.out_of_distribution, real
    assert real.score > 2 * real.limit  # not a borderline call

    generate_labelled_cohort(
        tmp_path / "cohort", patients=3, slides_per_patient=(1, 1), size=(2400, 1800), sites=3, seed=5
    )
    slides = sorted((tmp_path / "cohort").glob("*.svs"))
    results = [mil.ood.assess(_slide_features(path, backbone)) for path in slides]
    flagged = [path.name for path, result in zip(slides, results, strict=True) if result.out_of_distribution]
    assert len(slides) >= 3 and not flagged, (flagged, [r.score for r in results], mil.ood.limit)
    assert max(r.score for r in results) < real.score / 2


@pytest.mark.e2e
def test_pipeline_marks_the_real_scan_out_of_distribution_in_event_database_and_status(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    import uuid

    from wsitk.shared.ops import format_table, slide_table
    from wsitk.shared.slides.synth.cohort import generate_labelled_cohort

    tag = uuid.uuid4().hex[:8]
    cohort = generate_labelled_cohort(
        tmp_path / "c", patients=1, slides_per_patient=(1, 1), size=(2000, 1600), seed=3
    )
    uploads = {
        f"ood-{tag}/CMU-1-Small-Region.svs": REAL / "CMU-1-Small-Region.svs",
        f"ood-{tag}/synthetic.svs": cohort.slide_path(cohort.slides[0]),
    }
    for key, path in uploads.items():
        pipeline.upload(path, key)
    keys = list(uploads)
    pipeline.wait_for(
        lambda: set(pipeline.statuses(keys).values()) == {"predicted"} and len(pipeline.statuses(keys)) == 2,
        300,
        "both slides to be predicted",
    )
    rows = pipeline.query(
        "SELECT s.upload_key, p.out_of_distribution, p.ood_score, p.ood_percentile, p.ood_limit "
        "FROM v_predictions p JOIN slide_sources s USING (slide_id) WHERE s.upload_key LIKE %s",
        (f"ood-{tag}/%",),
    )
    flags = {
        key.rsplit("/", 1)[-1]: (flag, score, percentile, limit)
        for key, flag, score, percentile, limit in rows
    }
    real_flag, real_score, real_percentile, limit = flags["CMU-1-Small-Region.svs"]
    assert real_flag is True and real_score > limit > 0 and real_percentile == 1.0
    synthetic_flag, synthetic_score, _, _ = flags["synthetic.svs"]
    assert synthetic_flag is False and synthetic_score < limit
    table = format_table(slide_table(pipeline.settings(), limit=200)).splitlines()
    assert any("CMU-1-Small-Region.svs" in line and "OUT OF DISTRIBUTION" in line for line in table)
    assert not any("synthetic.svs" in line and "OUT OF DISTRIBUTION" in line for line in table)
