"""Evaluation: metrics against hand-computed examples, the patient bootstrap, the baseline, plots, the report.

numpy and matplotlib only (one test compares the AUC with ``mil.binary_auc`` and imports torch for it);
the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from wsitk.shared.models.evaluation import (
    METRICS,
    CohortSummary,
    Evaluation,
    FoldValidation,
    LogisticBaseline,
    Protocol,
    ReportInput,
    SplitSummary,
    aggregate_by_patient,
    auc_interval,
    brier_score,
    calibration_bins,
    confusion_matrix,
    delong_auc_variance,
    evaluate,
    expected_calibration_error,
    fit_logistic_baseline,
    patient_bootstrap,
    patient_resample_weights,
    plot_calibration,
    plot_roc,
    point_metrics,
    render_report,
    roc_auc,
    roc_curve,
    weighted_metrics,
    wilson_interval,
)

# Seven slides, threshold 0.5: tumour 0.9, 0.6 called tumour, 0.4 missed; normal 0.7 called tumour, 0.3,
# 0.2, 0.1 called normal -> tp 2, fn 1, fp 1, tn 3.
HAND_LABELS = [1, 1, 1, 0, 0, 0, 0]
HAND_PROBS = [0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1]


def _cohort(n_patients: int, seed: int, separation: float = 1.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities and patient ids: one label per patient, 1-4 slides each, noisy scores."""
    rng = np.random.default_rng(seed)
    patient_labels = np.arange(n_patients) % 2
    slides = rng.integers(1, 5, size=n_patients)
    labels = np.repeat(patient_labels, slides)
    patients = np.repeat([f"patient-{i:03d}" for i in range(n_patients)], slides)
    logits = separation * (2 * labels - 1) + rng.standard_normal(len(labels))
    return labels, 1.0 / (1.0 + np.exp(-logits)), patients


# ---------------------------------------------------------------------------------------------------------
# Point metrics


def test_threshold_metrics_match_a_hand_computed_example() -> None:
    assert confusion_matrix(HAND_LABELS, HAND_PROBS, 0.5).to_dict() == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    metrics = point_metrics(HAND_LABELS, HAND_PROBS, 0.5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    # 12 tumour-normal pairs; the tumour slide scores higher in all but (0.6 < 0.7) and (0.4 < 0.7)
    assert metrics["auc"] == pytest.approx(10 / 12)
    # a slide exactly at the threshold is called tumour
    assert confusion_matrix(HAND_LABELS, HAND_PROBS, 0.6).tp == 2
    assert confusion_matrix(HAND_LABELS, HAND_PROBS, 0.61).tp == 1


def test_auc_counts_ties_as_one_half_and_agrees_with_mil_binary_auc() -> None:
    # pairs: (0.8 vs 0.5) win, (0.8 vs 0.2) win, (0.5 vs 0.5) tie, (0.5 vs 0.2) win -> 3.5 / 4
    assert roc_auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(3.5 / 4)
    pytest.importorskip("torch")
    from wsitk.shared.models.mil import binary_auc

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(binary_auc(labels, scores), abs=1e-12)


def test_roc_curve_points_by_hand_and_area_equals_auc() -> None:
    curve = roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
    # thresholds +inf, 0.9, 0.8 (one tumour and one normal at once), 0.1
    np.testing.assert_allclose(curve.thresholds, [np.inf, 0.9, 0.8, 0.1])
    np.testing.assert_allclose(curve.tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(curve.fpr, [0.0, 0.0, 0.5, 1.0])
    labels, probabilities, _ = _cohort(40, seed=2)
    curve = roc_curve(labels, probabilities)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(roc_auc(labels, probabilities))


def test_brier_ece_and_reliability_bins_by_hand() -> None:
    labels = [1, 0, 1, 0]
    probabilities = [0.9, 0.2, 0.3, 0.35]
    assert brier_score(labels, probabilities) == pytest.approx((0.01 + 0.04 + 0.49 + 0.1225) / 4)
    bins = calibration_bins(labels, probabilities, n_bins=2)
    assert [(b.lower, b.upper, b.count) for b in bins] == [(0.0, 0.5, 3), (0.5, 1.0, 1)]
    assert bins[0].mean_predicted == pytest.approx((0.2 + 0.3 + 0.35) / 3)
    assert bins[0].observed_fraction == pytest.approx(1 / 3)
    assert bins[1].mean_predicted == pytest.approx(0.9)
    assert bins[1].observed_fraction == 1.0
    expected = 3 / 4 * abs(0.85 / 3 - 1 / 3) + 1 / 4 * abs(0.9 - 1.0)
    assert expected_calibration_error(labels, probabilities, n_bins=2) == pytest.approx(expected)
    # probability 1.0 lands in the last bin, not in an eleventh one
    assert calibration_bins([1], [1.0])[-1].count == 1


def test_undefined_metrics_are_nan_and_json_null() -> None:
    labels, probabilities = [1, 0, 0, 1], [0.2, 0.1, 0.3, 0.4]
    metrics = point_metrics(labels, probabilities, threshold=0.9)  # nothing called tumour
    assert math.isnan(metrics["precision"])
    assert metrics["sensitivity"] == 0.0
    assert metrics["f1"] == 0.0  # count form: found none of the tumours
    one_class = point_metrics([0, 0, 0], [0.1, 0.6, 0.2], threshold=0.5)
    for name in ("auc", "sensitivity", "balanced_accuracy"):
        assert math.isnan(one_class[name]), name
    assert one_class["specificity"] == pytest.approx(2 / 3)
    assert np.isnan(roc_curve([0, 0, 0], [0.1, 0.6, 0.2]).tpr).all()

    evaluation = evaluate([0, 0, 0, 0], [0.1, 0.6, 0.2, 0.3], ["a", "a", "b", "c"], 0.5, n_bootstrap=50)
    as_dict = evaluation.to_dict()
    json.dumps(as_dict, allow_nan=False)  # raises on NaN or infinity
    assert as_dict["metrics"]["auc"]["point"] is None
    assert as_dict["metrics"]["auc"]["resamples_skipped"] == 50
    assert as_dict["roc"]["thresholds"][0] is None  # +inf: nothing called tumour
    assert as_dict["n_patients"] == 3


def test_inputs_that_cannot_be_evaluated_are_rejected_with_a_reason() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 probabilities"):
        point_metrics([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="logits"):
        point_metrics([0, 1], [-1.2, 3.0], 0.5)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        point_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="validation"):
        evaluate([0, 1], [0.1, 0.2], ["a", "b"], math.nan)
    with pytest.raises(ValueError, match="no patient id"):
        evaluate([0, 1], [0.1, 0.2], ["a", ""], 0.5)
    with pytest.raises(ValueError, match="patient ids for 2 slides"):
        evaluate([0, 1], [0.1, 0.2], ["a"], 0.5)


# ---------------------------------------------------------------------------------------------------------
# Patient bootstrap


def test_resample_weights_keep_all_slides_of_a_patient_together() -> None:
    patients = ["p1", "p1", "p1", "p2", "p3", "p3", "p4"]
    weights = patient_resample_weights(patients, n_resamples=500, seed=3)
    assert weights.shape == (500, 7)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
    np.testing.assert_array_equal(weights[:, 0], weights[:, 2])
    np.testing.assert_array_equal(weights[:, 4], weights[:, 5])
    # each resample draws four patients with replacement
    per_patient = weights[:, [0, 3, 4, 6]]
    np.testing.assert_array_equal(per_patient.sum(axis=1), 4)
    assert (per_patient == 0).any() and (per_patient >= 2).any()
    assert per_patient.mean(axis=0) == pytest.approx([1.0] * 4, abs=0.15)


def test_weighted_metrics_equal_the_metrics_of_the_stacked_resample() -> None:
    labels, probabilities, patients = _cohort(15, seed=4)
    weights = patient_resample_weights(patients, n_resamples=20, seed=8)
    replicated = weighted_metrics(labels, probabilities, 0.5, weights)
    for row in range(len(weights)):
        stacked = np.repeat(np.arange(len(labels)), weights[row])
        direct = point_metrics(labels[stacked], probabilities[stacked], 0.5)
        for name in METRICS:
            np.testing.assert_allclose(replicated[name][row], direct[name], rtol=1e-12, err_msg=name)


def test_patients_with_identical_slides_give_the_interval_of_one_slide_per_patient() -> None:
    labels, probabilities, _ = _cohort(20, seed=6)
    labels, probabilities = labels[:20], probabilities[:20]
    one_each = [f"patient-{i}" for i in range(20)]
    five_each = np.repeat(one_each, 5)
    single = patient_bootstrap(labels, probabilities, one_each, 0.5, n_resamples=400, seed=1)
    copies = patient_bootstrap(
        np.repeat(labels, 5), np.repeat(probabilities, 5), five_each, 0.5, n_resamples=400, seed=1
    )
    for name in METRICS:
        assert copies[name].lower == pytest.approx(single[name].lower, abs=1e-12), name
        assert copies[name].upper == pytest.approx(single[name].upper, abs=1e-12), name
    # resampling slides as if they were independent would pretend to know five times as much
    by_slide = patient_bootstrap(
        np.repeat(labels, 5),
        np.repeat(probabilities, 5),
        [f"slide-{i}" for i in range(100)],
        0.5,
        n_resamples=400,
        seed=1,
    )
    slide_width = by_slide["auc"].upper - by_slide["auc"].lower
    patient_width = copies["auc"].upper - copies["auc"].lower
    assert slide_width < 0.7 * patient_width


def test_interval_contains_the_point_and_narrows_with_more_patients() -> None:
    widths = []
    for n_patients in (16, 160):
        labels, probabilities, patients = _cohort(n_patients, seed=n_patients)
        estimates = patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=1000, seed=0)
        for name in METRICS:
            estimate = estimates[name]
            assert estimate.lower <= estimate.point <= estimate.upper, (n_patients, name, estimate)
        widths.append(estimates["auc"].upper - estimates["auc"].lower)
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_is_reproducible_from_its_seed() -> None:
    labels, probabilities, patients = _cohort(14, seed=9)
    first = patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=300, seed=7)
    again = patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=300, seed=7)
    other = patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=300, seed=8)
    assert first == again
    assert any(first[name].lower != other[name].lower for name in METRICS)


def test_unstratified_resamples_with_one_class_are_skipped_for_auc_and_counted() -> None:
    # one tumour patient among six: about (5/6)^6 = 33 % of resamples draw no tumour at all
    labels = [1, 1, 0, 0, 0, 0, 0, 0]
    probabilities = [0.8, 0.7, 0.6, 0.3, 0.2, 0.4, 0.1, 0.75]
    patients = ["t", "t", "a", "b", "c", "d", "e", "e"]
    estimates = patient_bootstrap(
        labels, probabilities, patients, 0.5, n_resamples=1000, seed=2, stratify=False
    )
    weights = patient_resample_weights(patients, n_resamples=1000, seed=2)
    without_tumour = int((weights[:, 0] == 0).sum())
    assert 200 < without_tumour < 450
    assert estimates["auc"].resamples_skipped == without_tumour
    assert estimates["auc"].resamples_used == 1000 - without_tumour
    assert estimates["sensitivity"].resamples_skipped == without_tumour
    assert estimates["specificity"].resamples_skipped == 0


def test_stratified_bootstrap_keeps_each_class_of_patients_in_every_resample() -> None:
    labels = [1, 1, 0, 0, 0, 0, 0, 0]
    probabilities = [0.8, 0.7, 0.6, 0.3, 0.2, 0.4, 0.1, 0.75]
    patients = ["t", "t", "a", "b", "c", "d", "e", "e"]
    weights = patient_resample_weights(patients, n_resamples=1000, seed=2, labels=labels)
    # the one tumour patient is drawn exactly once every time; the five normal patients five times in all
    np.testing.assert_array_equal(weights[:, 0], 1)
    np.testing.assert_array_equal(weights[:, [2, 3, 4, 5, 6]].sum(axis=1), 5)
    estimates = patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=1000, seed=2)
    assert estimates["auc"].resamples_skipped == 0
    assert estimates["auc"].resamples_used == 1000
    assert estimates["auc"].method == "patient bootstrap (stratified)"
    # a positive patient with a normal slide still counts as positive: strata are patients, not slides
    mixed = patient_resample_weights(["p", "p", "q", "r"], n_resamples=200, seed=0, labels=[1, 0, 0, 0])
    np.testing.assert_array_equal(mixed[:, 0], 1)
    np.testing.assert_array_equal(mixed[:, 0], mixed[:, 1])


def test_two_thousand_resamples_of_thirty_slides_take_well_under_a_second() -> None:
    labels, probabilities, patients = _cohort(12, seed=11)
    labels, probabilities, patients = labels[:30], probabilities[:30], patients[:30]
    patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=50)  # warm-up
    started = time.perf_counter()
    estimates = patient_bootstrap(labels, probabilities, patients, 0.5, n_resamples=2000)
    elapsed = time.perf_counter() - started
    assert estimates["auc"].resamples_used + estimates["auc"].resamples_skipped == 2000
    assert elapsed < 0.5, f"{elapsed:.3f} s"


# ---------------------------------------------------------------------------------------------------------
# Analytic intervals: clustered DeLong, the exact bound on a perfect split, Wilson


def test_delong_variance_matches_the_pairwise_definition_with_one_slide_per_patient() -> None:
    rng = np.random.default_rng(21)
    labels = np.r_[np.ones(9, dtype=int), np.zeros(13, dtype=int)]
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    auc, variance = delong_auc_variance(labels, scores, [f"p{i}" for i in range(len(labels))])
    positive, negative = scores[labels == 1], scores[labels == 0]
    psi = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = v10.var(ddof=1) / len(positive) + v01.var(ddof=1) / len(negative)
    assert auc == pytest.approx(roc_auc(labels, scores), abs=1e-12)
    assert variance == pytest.approx(expected, rel=1e-10)


def test_delong_counts_a_patient_once_however_many_copies_of_a_slide() -> None:
    rng = np.random.default_rng(22)
    labels = np.r_[np.ones(10, dtype=int), np.zeros(12, dtype=int)]
    scores = rng.normal(labels * 1.0, 1.0)
    _, single = delong_auc_variance(labels, scores, [f"p{i}" for i in range(22)])
    copies = np.repeat([f"p{i}" for i in range(22)], 5)
    _, clustered = delong_auc_variance(np.repeat(labels, 5), np.repeat(scores, 5), copies)
    _, naive = delong_auc_variance(np.repeat(labels, 5), np.repeat(scores, 5), [str(i) for i in range(110)])
    assert clustered == pytest.approx(single, rel=1e-10)
    assert naive < 0.3 * clustered  # slides taken as independent would claim five times the evidence


def test_delong_interval_covers_the_true_auc_about_as_often_as_it_claims() -> None:
    # binormal scores: true AUC = Phi(shift / sqrt(2)) = 0.76 for shift 1
    true_auc = 0.5 * (1.0 + math.erf(1.0 / 2.0))
    rng = np.random.default_rng(23)
    hits = 0
    for _ in range(400):
        labels = np.r_[np.ones(25, dtype=int), np.zeros(35, dtype=int)]
        scores = rng.normal(labels * 1.0, 1.0)
        _, lower, upper, method = auc_interval(labels, scores, [str(i) for i in range(60)])
        assert method == "clustered DeLong"
        hits += lower <= true_auc <= upper
    assert 0.90 <= hits / 400 <= 0.99


def test_perfect_split_gives_an_exact_bound_instead_of_a_point() -> None:
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.85, 0.7, 0.95, 0.1, 0.2, 0.3, 0.15, 0.25, 0.05]
    patients = ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]  # 4 tumour and 6 normal patients
    auc, lower, upper, method = auc_interval(labels, scores, patients)
    assert (auc, upper, method) == (1.0, 1.0, "exact (perfect separation)")
    assert lower == pytest.approx(0.025 ** (1 / 4))  # Clopper-Pearson lower bound of 4 of 4
    flipped = auc_interval(labels, [1.0 - x for x in scores], patients)
    assert flipped[:3] == (0.0, 0.0, pytest.approx(1.0 - 0.025 ** (1 / 4)))
    result = evaluate(labels, scores, patients, 0.5, n_bootstrap=300)
    assert result.metrics["auc"].format() == f"1.000 ({0.025**0.25:.3f}-1.000)"
    # the bootstrap interval of the same split is the degenerate 1.000-1.000 the analytic one replaces
    assert result.metrics["auc"].bootstrap_lower == result.metrics["auc"].bootstrap_upper == 1.0
    sensitivity = result.metrics["sensitivity"]
    assert sensitivity.point == 1.0 and sensitivity.upper == 1.0 and sensitivity.lower < 0.75
    assert sensitivity.method == "Wilson (patient-effective n)"


def test_wilson_interval_by_known_values_and_patient_clustering() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(8, 8) == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    # ten tumour slides from two patients carry the evidence of two slides, not ten
    labels, scores = [1] * 10 + [0] * 4, [0.9] * 9 + [0.1] + [0.1] * 4
    by_patient = evaluate(labels, scores, ["a"] * 5 + ["b"] * 5 + ["c", "d", "e", "f"], 0.5, n_bootstrap=0)
    by_slide = evaluate(labels, scores, [str(i) for i in range(14)], 0.5, n_bootstrap=0)
    assert by_slide.metrics["sensitivity"].lower == pytest.approx(wilson_interval(9, 10)[0])
    assert by_patient.metrics["sensitivity"].lower == pytest.approx(wilson_interval(1.8, 2)[0])
    assert by_patient.metrics["sensitivity"].lower < by_slide.metrics["sensitivity"].lower - 0.2
    assert by_patient.to_dict()["metrics"]["sensitivity"]["method"] == "Wilson (patient-effective n)"


def test_patient_level_takes_the_most_suspicious_slide_of_each_patient() -> None:
    labels = [0, 1, 0, 0, 0, 1]
    probabilities = [0.2, 0.9, 0.1, 0.6, 0.3, 0.4]
    patients = ["b", "b", "a", "c", "c", "d"]
    patient_labels, scores, ids = aggregate_by_patient(labels, probabilities, patients)
    assert ids == ["a", "b", "c", "d"]
    assert patient_labels.tolist() == [False, True, False, True]
    assert scores.tolist() == [0.1, 0.9, 0.6, 0.4]
    result = evaluate(patient_labels, scores, ids, 0.5, n_bootstrap=0)
    assert result.n_slides == 4 and (result.confusion.tp, result.confusion.fp) == (1, 1)


# ---------------------------------------------------------------------------------------------------------
# Baseline


def _gaussian_bags(n_bags: int, shift: float, seed: int, dim: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n_bags) % 2
    bags = [
        rng.standard_normal((int(rng.integers(5, 30)), dim)) + shift * label * np.eye(dim)[0]
        for label in labels
    ]
    return bags, labels


def test_baseline_separates_shifted_gaussians_and_survives_a_json_round_trip() -> None:
    train_bags, train_labels = _gaussian_bags(40, shift=1.5, seed=0)
    test_bags, test_labels = _gaussian_bags(60, shift=1.5, seed=1)
    baseline = fit_logistic_baseline(train_bags, train_labels)
    assert baseline.converged
    probabilities = baseline.predict(test_bags)
    # as good as the oracle that knows the signal is the mean of feature 0, despite 7 noise features
    oracle = roc_auc(test_labels, [bag[:, 0].mean() for bag in test_bags])
    assert roc_auc(test_labels, probabilities) > max(0.9, oracle - 0.03)
    # the shifted dimension carries the signal
    assert abs(baseline.weights[0]) > 3 * np.max(np.abs(baseline.weights[1:]))
    restored = LogisticBaseline.from_dict(json.loads(json.dumps(baseline.to_dict())))
    np.testing.assert_array_equal(restored.predict(test_bags), probabilities)
    with pytest.raises(ValueError, match="another backbone"):
        baseline.predict([np.zeros((3, 5))])


def test_baseline_fit_is_the_regularised_optimum_and_stays_finite_on_separable_data() -> None:
    bags, labels = _gaussian_bags(20, shift=25.0, seed=2)  # perfectly separable
    norms = []
    for l2 in (0.1, 1.0, 10.0):
        baseline = fit_logistic_baseline(bags, labels, l2=l2)
        assert baseline.converged and np.isfinite(baseline.weights).all()
        norms.append(float(np.linalg.norm(baseline.weights)))
        # first-order optimality, checked independently of the solver: class-weighted residuals balance
        # the penalty, and the unpenalised intercept makes the weighted residuals sum to zero
        features = np.stack([bag.mean(axis=0) for bag in bags])
        standardised = (features - baseline.feature_mean) / baseline.feature_scale
        residual = baseline.predict(bags) - labels
        class_weight = np.where(labels == 1, 20 / (2 * labels.sum()), 20 / (2 * (20 - labels.sum())))
        gradient = standardised.T @ (class_weight * residual) + l2 * baseline.weights
        assert np.max(np.abs(gradient)) < 1e-6
        assert abs(float(class_weight @ residual)) < 1e-6
    assert norms[0] > norms[1] > norms[2]
    with pytest.raises(ValueError, match="l2 must be a positive"):
        fit_logistic_baseline(bags, labels, l2=0.0)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_baseline(bags[:1], labels[:1])


# ---------------------------------------------------------------------------------------------------------
# Plots and report


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_plots_write_png_files(tmp_path: Path) -> None:
    labels, probabilities, _ = _cohort(30, seed=12)
    curves = {
        "attention MIL": (labels, probabilities),
        "baseline": (labels, np.clip(probabilities + 0.1, 0, 1)),
    }
    roc_path = plot_roc(curves, tmp_path / "figs" / "roc.png", operating_points={"attention MIL": 0.5})
    calibration_path = plot_calibration(curves, tmp_path / "calibration.png", bins=10)
    for path in (roc_path, calibration_path):
        width, height = _png_size(path)
        assert 400 <= width <= 2000 and 400 <= height <= 2000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_roc({}, tmp_path / "empty.png")


def _report(evaluations: list[Evaluation], plots: dict[str, str]) -> ReportInput:
    return ReportInput(
        title="Tumour vs normal: test-set evaluation",
        generated_at="2026-01-01T00:00:00Z",
        command_line="wsi train evaluate --folds 5",
        cohort=CohortSummary(
            slides=120,
            patients=60,
            sites=3,
            splits=[SplitSummary("development", 96, 48, 40), SplitSummary("test", 24, 12, 11)],
        ),
        protocol=Protocol(
            test_fraction=0.2,
            k_folds=5,
            site_preserving=True,
            seeds=[0],
            architecture={
                "model": "gated attention MIL",
                "hidden": 128,
                "attention dim": 64,
                "dropout": 0.25,
            },
            epochs=40,
            early_stopping_patience=8,
            max_tiles_per_bag=512,
            class_weighting=True,
        ),
        evaluations=evaluations,
        folds=[FoldValidation(1, "gated attention", 19, 0.91234, 0.4321, 12)],
        plots=plots,
        limitations="Synthetic cohort; a single scanner.",
    )


def test_report_has_the_intervals_the_baseline_and_prints_undefined_as_na() -> None:
    labels, probabilities, patients = _cohort(24, seed=13)
    model = evaluate(labels, probabilities, patients, 0.5, n_bootstrap=300, name="gated-attention ensemble")
    baseline = evaluate(
        labels,
        np.clip(probabilities * 0.3, 0, 1),
        patients,
        0.9,
        n_bootstrap=300,
        name="baseline: mean-pool + LR",
    )
    assert math.isnan(baseline.metrics["precision"].point)  # nothing reaches 0.9
    text = render_report(_report([model, baseline], {"ROC curves": "roc.png"}))

    def table_rows(section: str) -> dict[str, str]:
        body = text.split(section, 1)[1].split("###", 1)[0]
        return {line.split("|")[1].strip(): line for line in body.splitlines() if line.startswith("| ")}

    rows = table_rows("### Held-out test set")
    auc = model.metrics["auc"]
    assert f"{auc.point:.3f} ({auc.lower:.3f}-{auc.upper:.3f})" in rows["gated-attention ensemble"]
    assert model.metrics["specificity"].format() in rows["gated-attention ensemble"]
    assert "baseline: mean-pool + LR" in rows
    baseline_cells = [cell.strip() for cell in rows["baseline: mean-pool + LR"].split("|")[1:-1]]
    assert baseline_cells[5] == "n/a"  # precision column
    assert baseline_cells[-1] == "0.900"  # the threshold given, not one picked from test labels
    fold = table_rows("### Cross-validation")["1"]
    assert "0.912" in fold and "0.432" in fold and "| 12 |" in fold
    confusion = table_rows("### Confusion matrices")["gated-attention ensemble"]
    tp, fn, fp, tn = (model.confusion.tp, model.confusion.fn, model.confusion.fp, model.confusion.tn)
    assert confusion.endswith(f"| {tp} | {fn} | {fp} | {tn} |")
    assert "![ROC curves](roc.png)" in text
    assert "Synthetic cohort; a single scanner." in text
    assert "out-of-fold validation predictions" in text
    assert "300 resamples" in text
    assert text.index("## Methods") < text.index("## Results") < text.index("## Limitations")


def test_report_refuses_absolute_plot_paths() -> None:
    labels, probabilities, patients = _cohort(10, seed=14)
    evaluation = evaluate(labels, probabilities, patients, 0.5, n_bootstrap=0, name="m")
    assert "(CI n/a)" in render_report(_report([evaluation], {}))
    with pytest.raises(ValueError, match="relative"):
        render_report(_report([evaluation], {"ROC": "/home/someone/roc.png"}))
