"""Subtyping and survival end to end on generated cohorts with a known truth (``simulate.py``): bags read
from files, trained by ``training.train_run`` and evaluated by ``evaluate_run.evaluate_run``, the functions
``wsi train`` and ``wsi evaluate`` call. Each test fails if the model learned nothing: the held-out
C-index and macro AUC must be well above chance with their lower bounds above it too.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from wsitk.shared.models.evaluate_run import evaluate_run
from wsitk.shared.models.simulate import file_bag_loader, generate_cohort
from wsitk.shared.models.task_run import patient_means
from wsitk.shared.models.training import Progress, TrainConfig, train_run


def _train_and_evaluate(
    tmp_path: Path, task: str, **cohort: object
) -> tuple[dict, dict, list[list[str]], dict]:
    generated = generate_cohort(tmp_path / "cohort", task, **cohort)
    loader = file_bag_loader(generated.bags_dir)
    config = TrainConfig(folds=3, epochs=25, patience=8, learning_rate=2e-3, test_fraction=0.25, seed=0)
    record = train_run(
        generated.labels_csv,
        tmp_path / "run",
        config,  # the task comes from the labels columns, as with `wsi train`
        sources=generated.sources(),
        bag_loader=loader,
        progress=Progress(stream=io.StringIO()),
    )
    metrics = evaluate_run(tmp_path / "run", bag_loader=loader, n_bootstrap=500, progress=lambda _: None)
    return record, metrics, loader.asked, generated.truth


def test_survival_from_a_cohort_with_known_hazards(tmp_path: Path) -> None:
    record, metrics, asked, truth = _train_and_evaluate(tmp_path, "survival", patients=150)
    assert record["task"] == "survival" and record["classes"] == []
    test_ids = {
        r["slide_id"] for r in record["rows"] if record["split"]["patient_split"][r["patient"]] == "test"
    }
    assert test_ids.isdisjoint(asked[0]) and set(asked[1]) == test_ids  # training never loaded a test slide
    ensemble = metrics["models"]["gated-attention ensemble"]
    c_index = ensemble["c_index"]
    assert c_index["point"] > 0.7, c_index
    assert c_index["lower"] > 0.5 and c_index["lower"] < c_index["point"] < c_index["upper"]
    assert c_index["point"] <= truth["oracle_c_index"] + 0.1  # not better than the true hazard, beyond noise
    groups = ensemble["risk_groups"]
    # the cut point is the median of the selection halves' out-of-fold risks, from training, not the test set
    model = record["models"]["gated-attention"]
    assert groups["cut_point"] == model["cut_point"]
    assert model["oof_patients"] < len({r["patient"] for r in record["rows"]}) * 0.75
    assert groups["high_risk_patients"] > 0 and groups["low_risk_patients"] > 0
    assert groups["logrank"]["p_value"] < 0.05
    evaluation = tmp_path / "run" / "evaluation"
    assert (evaluation / "km.png").stat().st_size > 10_000
    report = (evaluation / "report.md").read_text()
    assert "C-index" in report and "Log-rank chi-square" in report and "(km.png)" in report
    with (evaluation / "test_predictions.csv").open() as handle:
        predicted = list(csv.DictReader(handle))
    assert {r["slide_id"] for r in predicted} == test_ids
    risks = np.array([float(r["gated-attention ensemble risk"]) for r in predicted])
    patients, per_patient = patient_means(risks, [r["patient"] for r in predicted])
    assert len(patients) == ensemble["patients"]
    assert int((per_patient > groups["cut_point"]).sum()) == groups["high_risk_patients"]


def test_subtyping_from_a_cohort_with_known_classes(tmp_path: Path) -> None:
    record, metrics, _, _ = _train_and_evaluate(tmp_path, "subtype", patients=90, share=(0.03, 0.08))
    assert record["task"] == "subtype" and record["classes"] == ["type-A", "type-B", "type-C"]
    for split in record["split_summary"].values():  # stratified by class: 30 patients per class
        assert sorted(split["patients_per_class"].values()) in ([7, 8, 8], [7, 7, 8], [8, 8, 8], [7, 7, 7])
    ensemble = metrics["models"]["gated-attention ensemble"]
    macro = ensemble["metrics"]["macro_auc"]
    assert macro["point"] > 0.85 and macro["lower"] > 0.7, macro
    assert macro["method"] == "patient bootstrap (stratified by class)"
    balanced = ensemble["metrics"]["balanced_accuracy"]
    assert balanced["point"] > 0.6 and balanced["lower"] > 1 / 3  # chance is 1/3
    assert sum(map(sum, ensemble["confusion"])) == ensemble["n_slides"]
    for name in record["classes"]:
        assert ensemble["per_class"][name]["auc"]["point"] > 0.8
    report = (tmp_path / "run" / "evaluation" / "report.md").read_text()
    test_patients = {
        r["patient"] for r in record["rows"] if record["split"]["patient_split"][r["patient"]] == "test"
    }
    per_patient = metrics["patient_level"]["gated-attention ensemble"]
    assert per_patient["n_slides"] == per_patient["n_patients"] == len(test_patients)
    assert per_patient["metrics"]["macro_auc"]["point"] > 0.85
    assert "### Confusion matrix" in report and "balanced accuracy" in report and "(roc.png)" in report
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["models"]["gated-attention"]["oof_metric"] > 0.85


def test_train_refuses_other_architectures_for_the_new_tasks(tmp_path: Path) -> None:
    from wsitk.shared.models.labels import LabelsError

    generated = generate_cohort(tmp_path / "cohort", "subtype", patients=12, tiles=(5, 8))
    with pytest.raises(LabelsError, match="gated-attention MIL only"):
        train_run(
            generated.labels_csv,
            tmp_path / "run",
            TrainConfig(architectures=("clam-sb",)),
            sources=generated.sources(),
            bag_loader=file_bag_loader(generated.bags_dir),
            progress=Progress(stream=io.StringIO()),
        )
