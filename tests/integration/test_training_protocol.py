"""The training protocol without the pipeline: validation folds split into a stopping half and a selection
half, Platt-calibrated fold models, and the ensemble threshold chosen on calibrated out-of-fold
probabilities, the same kind of score the exported ensemble produces.

``wsi train`` and ``wsi evaluate`` run here on in-memory Gaussian bags (no stack), a few seconds each;
``tests/e2e/test_model_lifecycle.py`` runs them against the live pipeline.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wsitk.shared.models.bags import Bag
from wsitk.shared.models.labels import LabelRow
from wsitk.shared.models.mil import choose_threshold, predict_bags
from wsitk.shared.models.training import (
    ENSEMBLE_THRESHOLD_RULE,
    Progress,
    RunPaths,
    TrainConfig,
    fit_platt,
    load_fold_models,
    run_rows,
    split_validation,
    train_run,
)

DIM = 12


def _rows(patients: int, slides_per_patient: int = 2) -> list[LabelRow]:
    rows = []
    for p in range(patients):
        tumour = p % 2 == 0
        for s in range(1 + p % slides_per_patient):
            rows.append(
                LabelRow(
                    slide=f"s-{p:02d}-{s}.svs",
                    patient=f"P{p:02d}",
                    label=int(tumour and s == 0),
                    slide_id=f"id-{p:02d}-{s}",
                )
            )
    return rows


def test_validation_halves_are_disjoint_by_patient_stratified_and_reproducible() -> None:
    rows = _rows(10)
    stop, select, shared = split_validation(rows, seed=3)
    assert not shared
    assert {r.patient for r in stop}.isdisjoint({r.patient for r in select})
    assert sorted(r.slide_id for r in stop + select) == sorted(r.slide_id for r in rows)
    tumour_patients = [{r.patient for r in half if r.label} for half in (stop, select)]
    assert [len(x) for x in tumour_patients] in ([2, 3], [3, 2])  # five tumour patients, split evenly
    assert {r.label for r in select} == {0, 1}
    assert split_validation(rows, seed=3) == (stop, select, False)
    assert split_validation(rows, seed=4) != (stop, select, False)
    # one tumour and one normal patient cannot make two halves with a threshold: shared, and said so
    tiny = _rows(2)
    assert split_validation(tiny, seed=0) == (tiny, tiny, True)


def test_platt_scaling_recovers_a_known_calibration_and_stays_finite_on_a_perfect_split() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 20_000)
    labels = rng.random(20_000) < 1.0 / (1.0 + np.exp(-(0.5 * logits - 1.0)))
    scale, shift = fit_platt(logits, labels.astype(int), l2=1e-3)
    assert scale == pytest.approx(0.5, abs=0.05) and shift == pytest.approx(-1.0, abs=0.08)
    scale, shift = fit_platt([-3.0, -2.0, 2.5, 4.0], [0, 0, 1, 1])
    assert 1.0 < scale < 5.0 and abs(shift) < 1.0  # sharper, but finite: the identity prior holds it


def _bags(rows: Sequence[LabelRow], seed: int) -> dict[str, Bag]:
    rng = np.random.default_rng(seed)
    bags = {}
    for row in rows:
        tiles = int(rng.integers(20, 40))
        features = rng.normal(0.0, 1.0, (tiles, DIM))
        if row.label:
            focus = rng.choice(tiles, size=4, replace=False)
            features[focus, 0] += 4.0  # a small focus of tumour tiles
        bags[row.slide_id] = Bag(
            row.slide_id,
            "run-1",
            "backbone-x",
            features.astype(np.float16),
            np.zeros((tiles, 2), dtype=np.int64),
            {"target_mpp": 0.5, "tile_size": 224, "stain_method": ""},
        )
    return bags


def test_ensemble_threshold_is_chosen_on_calibrated_out_of_fold_scores_of_the_selection_halves(
    tmp_path: Path,
) -> None:
    from wsitk.shared.models.aggregators import MilEnsemble
    from wsitk.shared.models.evaluate_run import evaluate_run
    from wsitk.shared.models.runtime import MilRunner

    rows = _rows(28)
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "label"])
        writer.writerows([r.slide, r.patient, r.label] for r in rows)
    all_bags = _bags(rows, seed=1)
    asked: list[list[str]] = []

    def loader(slide_ids: Sequence[str]) -> Mapping[str, Bag]:
        asked.append(list(slide_ids))
        return {s: all_bags[s] for s in slide_ids}

    config = TrainConfig(folds=3, epochs=6, patience=3, max_tiles_per_bag=64, test_fraction=0.25, seed=2)
    out = tmp_path / "run"
    record = train_run(
        labels_csv,
        out,
        config,
        sources=[(r.slide_id, f"study/{r.slide}") for r in rows],
        bag_loader=loader,
        progress=Progress(stream=open(tmp_path / "log.txt", "w")),  # noqa: SIM115
    )
    model = record["models"]["gated-attention"]
    paths = RunPaths(out)
    members = load_fold_models(paths, "gated-attention", 3, DIM)
    rows_run, plan = run_rows(record)
    oof_labels, oof_calibrated = [], []
    for fold, member in zip(model["folds"], members, strict=True):
        val_rows = plan.fold_rows(rows_run, fold["fold"])
        stop, select, shared = split_validation(val_rows, config.seed * 1000 + fold["fold"])
        assert not shared and (fold["stop_slides"], fold["select_slides"]) == (len(stop), len(select))
        scale, shift = fold["calibration"]
        assert (scale, shift) != (1.0, 0.0)
        probs = np.clip(
            predict_bags(member, [all_bags[r.slide_id].float32() for r in select]), 1e-7, 1 - 1e-7
        )
        logits = np.log(probs) - np.log1p(-probs)
        oof_calibrated += list(1.0 / (1.0 + np.exp(-(scale * logits + shift))))
        oof_labels += [r.label for r in select]
        # the fold's own threshold comes from the selection half too (raw probabilities, as it is applied)
        assert fold["threshold"] == pytest.approx(
            choose_threshold([r.label for r in select], probs), abs=1e-6
        )
    assert model["ensemble_threshold"] == pytest.approx(
        choose_threshold(oof_labels, oof_calibrated), abs=1e-6
    )

    # the exported ensemble is the mean of the calibrated members: the kind of score the threshold was chosen on
    test_ids = [r["slide_id"] for r in record["rows"] if r["slide_id"] not in asked[0]]
    test_bags = [all_bags[s].float32() for s in test_ids]
    calibrated_members = []
    for fold, member in zip(model["folds"], members, strict=True):
        probs = np.clip(predict_bags(member, test_bags), 1e-7, 1 - 1e-7)
        scale, shift = fold["calibration"]
        calibrated_members.append(1.0 / (1.0 + np.exp(-(scale * np.log(probs / (1 - probs)) + shift))))
    runner = MilRunner(out / model["onnx"])
    # the exported model carries its out-of-distribution summary, calibrated on the selection halves
    assert runner.ood is not None
    assert len(runner.ood.reference_scores) == record["ood"]["calibration_slides"] > 0
    assert not runner.ood.assess(test_bags[0]).out_of_distribution
    assert runner.ood.assess(test_bags[0] + 40.0).out_of_distribution
    onnx = np.array([runner.score(b)[0] for b in test_bags])
    np.testing.assert_allclose(onnx, np.mean(calibrated_members, axis=0), atol=1e-4)
    ensemble = MilEnsemble(members, calibration=[tuple(f["calibration"]) for f in model["folds"]])
    assert ensemble.architecture()["combine"] == "mean-calibrated-probability"
    assert (
        json.loads((out / "models" / "baseline" / "folds.json").read_text())["ensemble_threshold_from"]
        == ENSEMBLE_THRESHOLD_RULE
    )

    metrics = evaluate_run(
        out, bag_loader=loader, n_bootstrap=200, progress=lambda _: None, max_tiles_per_slide=30
    )
    assert asked[1] == test_ids  # evaluation asks for the test slides only, training never did
    ensemble_auc = metrics["models"]["gated-attention ensemble"]["metrics"]["auc"]
    assert ensemble_auc["method"] in ("clustered DeLong", "exact (perfect separation)")
    assert ensemble_auc["lower"] < ensemble_auc["upper"]
    # the scorer's tile rule, applied and reported: what production does not score is visible here
    counts = [len(all_bags[s].features) for s in test_ids]
    assert metrics["scoring_rule"]["slides_over_cap"] == sum(c > 30 for c in counts) > 0
    assert metrics["scoring_rule"]["tiles_dropped"] == sum(max(0, c - 30) for c in counts)
    with (out / "evaluation" / "test_predictions.csv").open() as handle:
        scored = [(int(r["tiles"]), int(r["tiles_scored"])) for r in csv.DictReader(handle)]
    assert scored == [(c, min(c, 30)) for c in counts]
    report = (out / "evaluation" / "report.md").read_text()
    assert "were not scored, as in production" in report
    # patient level: one unit per test patient, for the ensemble and the baseline
    test_patients = {r["patient"] for r in record["rows"] if r["slide_id"] in test_ids}
    for name in ("gated-attention ensemble", "baseline: mean-pool + LR"):
        assert metrics["patient_level"][name]["n_slides"] == len(test_patients)
    assert "### Patient level" in report
    assert "calibrated out-of-fold" in report and "Wilson" in report


def test_tile_rule_keeps_a_focus_in_proportion_and_is_independent_of_tile_order() -> None:
    from wsitk.shared.models.tile_rule import dropped_tiles, tiles_to_score

    side = 224
    grid = np.stack(np.meshgrid(np.arange(250), np.arange(200), indexing="ij"), -1).reshape(-1, 2) * side
    focus = (np.abs(grid[:, 0] / side - 40) < 7) & (np.abs(grid[:, 1] / side - 150) < 7)  # 13 x 13 tiles
    keep = tiles_to_score(grid, 20_000)
    assert len(keep) == 20_000 and np.all(np.diff(keep) > 0)
    expected = focus.sum() * 20_000 / len(grid)  # 169 * 0.4 = 68
    assert 0.6 * expected < focus[keep].sum() < 1.4 * expected
    # the same slide tiled with its shards in another order keeps the same tiles
    order = np.random.default_rng(1).permutation(len(grid))
    again = tiles_to_score(grid[order], 20_000)
    assert {tuple(xy) for xy in grid[order][again]} == {tuple(xy) for xy in grid[keep]}
    assert tiles_to_score(grid[:500], 20_000).tolist() == list(range(500))
    summary = dropped_tiles([50_000, 500, 20_001], 20_000)
    assert (summary.slides_over_cap, summary.tiles_dropped) == (2, 30_001)


# ---------------------------------------------------------------------------------------------------------
# Cohort scale: bags read from disk one at a time, the normalisation streamed


def test_training_on_bags_read_from_disk_gives_the_weights_of_bags_in_memory(tmp_path: Path) -> None:
    import torch
    from wsitk.shared.models.bags import BagFiles
    from wsitk.shared.models.mil import train_mil

    rng = np.random.default_rng(5)
    labels = [i % 2 for i in range(10)]
    bags: list[np.ndarray] = []
    for label in labels:
        tiles = rng.normal(3.0, 2.0, (int(rng.integers(30, 700)), DIM))
        tiles[:5, 0] += 4.0 * label
        bags.append(tiles.astype(np.float16))
    paths = []
    for index, bag in enumerate(bags):
        paths.append(tmp_path / f"bag-{index}.npy")
        np.save(paths[-1], bag)

    class CountingFiles(BagFiles):
        reads = 0

        def __getitem__(self, index: Any) -> Any:
            CountingFiles.reads += 1
            return super().__getitem__(index)

    on_disk = CountingFiles(paths)
    kwargs = {"epochs": 3, "seed": 4, "max_tiles_per_bag": 64, "lr": 1e-3}
    from_disk = train_mil(on_disk[2:], labels[2:], val_bags=on_disk[:2], val_labels=labels[:2], **kwargs)
    in_memory = train_mil(bags[2:], labels[2:], val_bags=bags[:2], val_labels=labels[:2], **kwargs)
    for name, tensor in in_memory.model.state_dict().items():
        torch.testing.assert_close(from_disk.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    CountingFiles.reads = 0
    train_mil(CountingFiles(paths[2:]), labels[2:], **kwargs)
    assert CountingFiles.reads >= 8 * 3  # every bag read again in every epoch: nothing kept in memory

    # the streamed standardisation equals the one over all tiles at once
    stacked = np.concatenate(bags[2:]).astype(np.float64)
    mean = in_memory.model.feature_mean.numpy()
    np.testing.assert_allclose(mean, stacked.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(1.0 / in_memory.model.feature_scale.numpy(), stacked.std(axis=0), rtol=1e-5)


def test_cohort_training_benchmark_quick_form_reports_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.benchmarks import bench_cohort_training

    assert bench_cohort_training.main(["--workdir", str(tmp_path), "--quick"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["slides"], result["tiles_per_slide"], result["dim"]) == (60, 2000, 256)
    assert result["bytes_on_disk"] >= 60 * 2000 * 256 * 2
    assert 0 < result["peak_rss_gb"] < 4.0 and result["train_s"] > 0


@pytest.mark.slow
def test_cohort_training_at_a_tenth_of_tcga_scale_stays_under_four_gigabytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """100 slides x 15,000 tiles x 1,024 dims (3 GB float16; 5.5 GB as float32). The full scale:
    ``python -m tests.benchmarks.bench_cohort_training --workdir DIR`` (docs/training-and-evaluation.md)."""
    from tests.benchmarks import bench_cohort_training

    assert bench_cohort_training.main(["--workdir", str(tmp_path), "--scale", "0.1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cohort_float32_gb"] > 5.0
    assert result["peak_rss_gb"] < 4.0
