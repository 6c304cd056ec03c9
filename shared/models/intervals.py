"""Confidence intervals for test-set metrics, and the evaluation of one model on the held-out test set.

- **Patients, not slides, are the unit.** Slides of one patient are correlated (same tumour, same staining
  run), so every interval here treats a patient's slides as one cluster.
- **AUC: clustered DeLong** (Obuchowski 1997, DeLong et al. 1988 with patients as clusters; with one slide
  per patient it is DeLong's variance), a normal interval clipped to [0, 1]. When one class is perfectly
  separated the DeLong variance is 0 and the interval would collapse to a point; then an exact bound is
  used instead: the Clopper-Pearson interval of ``n`` successes in ``n`` trials with ``n`` the smaller
  class's patient count (a perfect split of ``n`` independent positive-negative pairs), which is
  ``(alpha/2)^(1/n)`` below 1 (and mirrored for AUC 0).
- **Proportions (sensitivity, specificity, precision, accuracy): Wilson score intervals** on an effective
  count for patient clusters (Kish: ``n_eff = (sum n_i)^2 / sum n_i^2``, the count under full correlation of
  a patient's slides; plain Wilson with one slide per patient). A Wilson interval does not collapse at 0 or
  1: 8 of 8 tumour slides found gives 0.676-1.000, not 1.000-1.000.
- **Everything else (balanced accuracy, F1, Brier, ECE): patient bootstrap stratified by label.** Each
  resample draws, with replacement, as many tumour patients as there are (a patient is positive when any of
  their slides is) and as many normal patients as there are; all slides of a drawn patient come along. So
  every resample holds both classes. The percentile interval of the replicates; the bootstrap interval of
  every metric is kept beside the analytic one (``MetricEstimate.bootstrap_lower``/``bootstrap_upper``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np
from wsitk.shared.models.metrics import (
    METRICS,
    CalibrationBin,
    Confusion,
    FloatArray,
    IntArray,
    LabelsLike,
    PatientsLike,
    RocCurve,
    ScoresLike,
    _check_inputs,
    _check_threshold,
    _json_float,
    _patient_index,
    calibration_bins,
    confusion_matrix,
    point_metrics,
    roc_curve,
    weighted_metrics,
)

# Bootstrap resamples are processed in chunks so that the [resamples, slides] weight matrix stays near this
# many elements (~32 MB of float64) however large the test set is.
_WEIGHT_CHUNK_ELEMENTS = 4_000_000
BoolMask = Any  # a boolean numpy mask over slides


# ----------------------------------------------------------------------------------------------------------
# Patient bootstrap, stratified by label


def patient_strata(labels: LabelsLike, patients: PatientsLike) -> tuple[IntArray, IntArray]:
    """``(index of each slide's patient, label of each patient)``: a patient is positive (1) when any of
    their slides is a tumour slide, else 0."""
    y = np.asarray(labels).astype(bool)
    inverse, n_patients = _patient_index(patients, len(y))
    patient_label = np.zeros(n_patients, dtype=np.int64)
    np.maximum.at(patient_label, inverse, y.astype(np.int64))
    return inverse, patient_label


def _draw_patient_counts(
    n_patients: int, n_resamples: int, seed: int, strata: IntArray | None = None
) -> IntArray:
    """``[resamples, patients]``: how often each patient is drawn. Without ``strata``: ``n_patients`` draws
    with replacement from all patients; with ``strata`` (one stratum id per patient): within each stratum as
    many draws as it has patients, so every resample keeps each stratum's size."""
    rng = np.random.default_rng(seed)
    groups = (
        [np.arange(n_patients)]
        if strata is None
        else [np.flatnonzero(strata == value) for value in np.unique(strata)]
    )
    counts = np.zeros((n_resamples, n_patients), dtype=np.int64)
    for members in groups:
        size = len(members)
        draws = rng.integers(0, size, size=(n_resamples, size))
        offsets = (np.arange(n_resamples, dtype=np.int64) * size)[:, None]
        flat = np.bincount((draws + offsets).ravel(), minlength=n_resamples * size)
        counts[:, members] = flat.reshape(n_resamples, size)
    return counts


def patient_resample_weights(
    patients: PatientsLike, *, n_resamples: int, seed: int = 0, labels: LabelsLike | None = None
) -> IntArray:
    """``[resamples, slides]``: how many times each slide is in each patient-level bootstrap resample.

    All slides of a drawn patient come along, so slides of one patient always share one weight. Without
    ``labels`` each resample draws as many patients as the test set has; with ``labels`` the draw is
    stratified: as many positive patients as there are positive patients, and as many negative ones as
    there are negative ones. ``patient_bootstrap`` uses exactly these weights (same seed, same resamples).
    """
    if labels is None:
        inverse, n_patients = _patient_index(patients, len(patients))
        return _draw_patient_counts(n_patients, n_resamples, seed)[:, inverse]
    inverse, patient_label = patient_strata(labels, patients)
    return _draw_patient_counts(len(patient_label), n_resamples, seed, patient_label)[:, inverse]


@dataclass(frozen=True)
class MetricEstimate:
    """A point estimate on the test set and its confidence interval.

    ``method`` names how the interval was made (``clustered DeLong``, ``exact (perfect separation)``,
    ``Wilson (patient-effective n)``, ``patient bootstrap (stratified)``); ``bootstrap_lower`` /
    ``bootstrap_upper`` always hold the patient-bootstrap percentile interval for comparison.
    ``resamples_used`` bootstrap resamples gave a defined value; ``resamples_skipped`` did not (for
    example precision in a resample without a positive call) and are left out, not counted as 0 or 1.
    """

    point: float
    lower: float
    upper: float
    resamples_used: int = 0
    resamples_skipped: int = 0
    method: str = "patient bootstrap (stratified)"
    bootstrap_lower: float = math.nan
    bootstrap_upper: float = math.nan

    def format(self, digits: int = 3) -> str:
        """``0.962 (0.921-0.993)``; ``n/a`` when undefined; ``0.962 (CI n/a)`` without an interval."""
        if math.isnan(self.point):
            return "n/a"
        point = f"{self.point:.{digits}f}"
        if math.isnan(self.lower) or math.isnan(self.upper):
            return f"{point} (CI n/a)"
        return f"{point} ({self.lower:.{digits}f}-{self.upper:.{digits}f})"

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "point": _json_float(self.point),
            "lower": _json_float(self.lower),
            "upper": _json_float(self.upper),
            "method": self.method,
            "bootstrap_lower": _json_float(self.bootstrap_lower),
            "bootstrap_upper": _json_float(self.bootstrap_upper),
            "resamples_used": self.resamples_used,
            "resamples_skipped": self.resamples_skipped,
        }


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")


def patient_bootstrap(
    labels: LabelsLike,
    probabilities: ScoresLike,
    patients: PatientsLike,
    threshold: float,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    ece_bins: int = 10,
    stratify: bool = True,
) -> dict[str, MetricEstimate]:
    """Point estimate and percentile interval of every metric in ``METRICS``, resampling patients.

    Each of ``n_resamples`` resamples draws patients with replacement (stratified by patient label unless
    ``stratify=False``), stacks all their slides and recomputes every metric at the same ``threshold``. The
    interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the defined
    replicates; with ``n_resamples=0`` the intervals are NaN. Reproducible from ``seed``.
    """
    y, p = _check_inputs(labels, probabilities)
    cut = _check_threshold(threshold)
    inverse, patient_label = patient_strata(y, patients)
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    _check_confidence(confidence)
    point = point_metrics(y, p, cut, ece_bins=ece_bins)
    replicates: dict[str, list[FloatArray]] = {name: [] for name in METRICS}
    if n_resamples:
        patient_counts = _draw_patient_counts(
            len(patient_label), n_resamples, seed, patient_label if stratify else None
        )
        chunk = max(1, _WEIGHT_CHUNK_ELEMENTS // len(p))
        for start in range(0, n_resamples, chunk):
            weights = patient_counts[start : start + chunk][:, inverse].astype(np.float64)
            chunk_values = weighted_metrics(y, p, cut, weights, ece_bins=ece_bins)
            for name in METRICS:
                replicates[name].append(chunk_values[name])
    tail = 100.0 * (1.0 - confidence) / 2.0
    method = "patient bootstrap (stratified)" if stratify else "patient bootstrap"
    estimates: dict[str, MetricEstimate] = {}
    for name in METRICS:
        values = np.concatenate(replicates[name]) if replicates[name] else np.empty(0)
        defined = values[~np.isnan(values)]
        lower, upper = (
            (float(np.percentile(defined, tail)), float(np.percentile(defined, 100.0 - tail)))
            if len(defined)
            else (math.nan, math.nan)
        )
        estimates[name] = MetricEstimate(
            point=point[name],
            lower=lower,
            upper=upper,
            resamples_used=len(defined),
            resamples_skipped=len(values) - len(defined),
            method=method,
            bootstrap_lower=lower,
            bootstrap_upper=upper,
        )
    return estimates


# ----------------------------------------------------------------------------------------------------------
# AUC: clustered DeLong, exact bound on a perfect split


def delong_auc_variance(
    labels: LabelsLike, scores: ScoresLike, patients: PatientsLike
) -> tuple[float, float]:
    """``(AUC, variance of the AUC)`` by DeLong's structural components with patients as clusters
    (Obuchowski 1997). With one slide per patient this is DeLong et al. (1988). The variance is NaN when a
    class has fewer than two patients, and 0 when every positive-negative pair is ordered the same way.

    Rank-based: O(n log n) in the number of slides, no [positives, negatives] matrix.
    """
    y, s = _check_inputs(labels, scores, scores_only=True)
    inverse, n_patients = _patient_index(patients, len(s))
    positive, negative = s[y], s[~y]
    m, n = len(positive), len(negative)
    if m == 0 or n == 0:
        return math.nan, math.nan
    negative_sorted, positive_sorted = np.sort(negative), np.sort(positive)
    below = np.searchsorted(negative_sorted, positive, side="left")
    tied = np.searchsorted(negative_sorted, positive, side="right") - below
    v10 = (below + 0.5 * tied) / n  # per positive slide: share of negatives it beats
    above = m - np.searchsorted(positive_sorted, negative, side="right")
    tied_neg = np.searchsorted(positive_sorted, negative, side="right") - np.searchsorted(
        positive_sorted, negative, side="left"
    )
    v01 = (above + 0.5 * tied_neg) / m  # per negative slide: share of positives above it
    auc = float(v10.mean())
    m_i = np.bincount(inverse[y], minlength=n_patients).astype(np.float64)
    n_i = np.bincount(inverse[~y], minlength=n_patients).astype(np.float64)
    v10_i = np.bincount(inverse[y], weights=v10, minlength=n_patients)
    v01_i = np.bincount(inverse[~y], weights=v01, minlength=n_patients)
    clusters_10, clusters_01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if clusters_10 < 2 or clusters_01 < 2:
        return auc, math.nan
    d10, d01 = v10_i - m_i * auc, v01_i - n_i * auc
    s10 = clusters_10 / ((clusters_10 - 1) * m) * float((d10**2).sum())
    s01 = clusters_01 / ((clusters_01 - 1) * n) * float((d01**2).sum())
    s11 = n_patients / (n_patients - 1) * float((d10 * d01).sum())
    variance = s10 / m + s01 / n + 2.0 * s11 / (m * n)
    return auc, max(0.0, variance)


def auc_interval(
    labels: LabelsLike, scores: ScoresLike, patients: PatientsLike, *, confidence: float = 0.95
) -> tuple[float, float, float, str]:
    """``(AUC, lower, upper, method)``.

    Clustered DeLong normal interval, clipped to [0, 1]. On a perfect split (AUC 1 or 0, where the DeLong
    variance is 0) an exact bound instead: a perfect split of the test set contains ``k`` disjoint,
    independent positive-negative patient pairs all ordered correctly, ``k`` the smaller class's patient
    count; the Clopper-Pearson interval of ``k`` successes in ``k`` trials bounds the probability that a
    random pair is ordered correctly (the AUC) from below by ``(alpha / 2)^(1 / k)``. Conservative, never
    a point.
    """
    _check_confidence(confidence)
    y, s = _check_inputs(labels, scores, scores_only=True)
    auc, variance = delong_auc_variance(y, s, patients)
    if math.isnan(auc):
        return math.nan, math.nan, math.nan, "n/a (one class)"
    inverse, _ = _patient_index(patients, len(s))
    pairs = min(len(np.unique(inverse[y])), len(np.unique(inverse[~y])))
    alpha = 1.0 - confidence
    if auc in (0.0, 1.0):
        bound = (alpha / 2.0) ** (1.0 / pairs)
        lower, upper = (bound, 1.0) if auc == 1.0 else (0.0, 1.0 - bound)
        return auc, lower, upper, "exact (perfect separation)"
    if math.isnan(variance) or variance <= 0.0:
        return auc, math.nan, math.nan, "n/a (too few patients per class)"
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    half = z * math.sqrt(variance)
    return auc, max(0.0, auc - half), min(1.0, auc + half), "clustered DeLong"


# ----------------------------------------------------------------------------------------------------------
# Proportions: Wilson score intervals on a patient-effective count


def wilson_interval(successes: float, trials: float, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / trials`` (trials may be an effective, non-integer
    count); NaN when there are no trials. Never collapses at 0 or 1 (8 of 8 gives 0.676-1.000 at 95 %)."""
    _check_confidence(confidence)
    if trials <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    share = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (share + z * z / (2.0 * trials)) / denominator
    half = z / denominator * math.sqrt(share * (1.0 - share) / trials + z * z / (4.0 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _effective_count(members: BoolMask, inverse: IntArray) -> float:
    """Kish's effective sample size of the slides in ``members`` clustered by patient: ``(sum n_i)^2 / sum
    n_i^2``, the count under full correlation of one patient's slides (equal to the slide count when every
    patient has one slide)."""
    per_patient = np.bincount(inverse[members]).astype(np.float64)
    total = per_patient.sum()
    return float(total * total / (per_patient**2).sum()) if total else 0.0


_PROPORTIONS: Mapping[str, tuple[str, str]] = {
    # metric: (numerator cells, denominator slides)
    "sensitivity": ("tp", "positive"),
    "specificity": ("tn", "negative"),
    "precision": ("tp", "called"),
    "accuracy": ("correct", "all"),
}


def _proportion_intervals(
    y: Any, p: FloatArray, cut: float, inverse: IntArray, confidence: float
) -> dict[str, tuple[float, float]]:
    called = p >= cut
    masks = {"positive": y, "negative": ~y, "called": called, "all": np.ones(len(y), dtype=bool)}
    hits = {"tp": called & y, "tn": ~called & ~y, "correct": called == y}
    intervals: dict[str, tuple[float, float]] = {}
    for metric, (numerator, denominator) in _PROPORTIONS.items():
        members = masks[denominator]
        count = int(members.sum())
        if count == 0:
            intervals[metric] = (math.nan, math.nan)
            continue
        share = float(hits[numerator][members].sum()) / count
        effective = _effective_count(members, inverse)
        intervals[metric] = wilson_interval(share * effective, effective, confidence=confidence)
    return intervals


# ----------------------------------------------------------------------------------------------------------
# Evaluation of one model on the test set


@dataclass(frozen=True)
class Evaluation:
    """One model on the held-out test set: metrics with intervals, confusion, calibration, ROC, cohort size."""

    name: str
    threshold: float
    metrics: Mapping[str, MetricEstimate]
    confusion: Confusion
    calibration: Sequence[CalibrationBin]
    roc: RocCurve
    n_slides: int
    n_patients: int
    n_positive: int
    n_negative: int
    n_bootstrap: int
    seed: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN and infinities become ``None``)."""
        return {
            "name": self.name,
            "threshold": self.threshold,
            "metrics": {name: estimate.to_dict() for name, estimate in self.metrics.items()},
            "confusion": self.confusion.to_dict(),
            "calibration": [item.to_dict() for item in self.calibration],
            "roc": self.roc.to_dict(),
            "n_slides": self.n_slides,
            "n_patients": self.n_patients,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "confidence": self.confidence,
        }


def evaluate(
    labels: LabelsLike,
    probabilities: ScoresLike,
    patients: PatientsLike,
    threshold: float,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    name: str = "",
    confidence: float = 0.95,
    ece_bins: int = 10,
) -> Evaluation:
    """Evaluate one model's test-set probabilities at a threshold chosen beforehand on validation data.

    ``labels``, ``probabilities`` and ``patients`` hold one entry per test slide. Intervals: clustered
    DeLong (or the exact bound on a perfect split) for AUC, Wilson on a patient-effective count for
    sensitivity, specificity, precision and accuracy, and the label-stratified patient bootstrap
    (``n_bootstrap`` resamples from ``seed``) for the rest; the bootstrap interval of every metric is kept
    beside its reported one.
    """
    y, p = _check_inputs(labels, probabilities)
    cut = _check_threshold(threshold)
    inverse, n_patients = _patient_index(patients, len(p))
    metrics = dict(
        patient_bootstrap(
            y, p, patients, cut, n_resamples=n_bootstrap, seed=seed, confidence=confidence, ece_bins=ece_bins
        )
    )
    _, lower, upper, method = auc_interval(y, p, patients, confidence=confidence)
    metrics["auc"] = replace(metrics["auc"], lower=lower, upper=upper, method=method)
    for metric, (low, high) in _proportion_intervals(y, p, cut, inverse, confidence).items():
        metrics[metric] = replace(
            metrics[metric], lower=low, upper=high, method="Wilson (patient-effective n)"
        )
    return Evaluation(
        name=name,
        threshold=cut,
        metrics=metrics,
        confusion=confusion_matrix(y, p, cut),
        calibration=calibration_bins(y, p, ece_bins),
        roc=roc_curve(y, p),
        n_slides=len(p),
        n_patients=n_patients,
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
    )
