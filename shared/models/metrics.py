"""Slide-level metrics of a binary classifier at a threshold: the one weighted implementation behind point
estimates and patient-bootstrap replicates, the ROC curve, calibration bins.

Undefined is NaN, never a made-up number: precision with no predicted positive, sensitivity without a
tumour slide, specificity and balanced accuracy without both classes, AUC and the ROC curve with one class
only. F1 uses the count form ``2 tp / (2 tp + fp + fn)``, so a model that finds no tumour among tumour
slides scores 0, not n/a. A slide is called positive when its probability is ``>= threshold`` (as in
``mil.choose_threshold``).

Every metric here is computed from weighted sums (confusion counts, squared errors, calibration-bin sums, and
AUC from weighted rank counts): weight ``k`` means a slide is in a resample ``k`` times, so 2000 bootstrap
resamples are one ``[resamples, slides]`` weight matrix and a few matrix products rather than 2000 Python
loops (``intervals.py``). The point estimates use the same code with all weights 1.

numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
LabelsLike = Sequence[int] | Sequence[bool] | npt.NDArray[Any]
ScoresLike = Sequence[float] | npt.NDArray[Any]
PatientsLike = Sequence[str] | Sequence[int] | npt.NDArray[Any]

METRICS: tuple[str, ...] = (
    "auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "accuracy",
    "brier",
    "ece",
)
"""Metric names, in report order. ``sensitivity`` is recall; ``precision`` is the positive predictive value."""

METRIC_LABELS: Mapping[str, str] = {
    "auc": "AUC",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "f1": "F1",
    "accuracy": "Accuracy",
    "brier": "Brier",
    "ece": "ECE",
}


# ----------------------------------------------------------------------------------------------------------
# Input checking


def _check_inputs(
    labels: LabelsLike, probabilities: ScoresLike, *, scores_only: bool = False
) -> tuple[BoolArray, FloatArray]:
    """Labels as booleans and probabilities as float64, after checking them; ``scores_only`` (AUC, ROC)
    accepts any finite scores, e.g. logits, since only their order matters."""
    y_raw = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if y_raw.ndim != 1 or p.ndim != 1:
        raise ValueError(
            f"labels and probabilities must be 1-D (one value per slide); got shapes {y_raw.shape} and {p.shape}"
        )
    if len(y_raw) != len(p):
        raise ValueError(f"{len(y_raw)} labels but {len(p)} probabilities: give one of each per slide")
    if len(p) == 0:
        raise ValueError("no slides to evaluate")
    if y_raw.dtype != np.bool_ and not np.isin(y_raw, (0, 1)).all():
        raise ValueError(
            f"labels must be 0 (normal) or 1 (tumour); got values {sorted(set(y_raw.tolist()))[:6]}"
        )
    if not np.isfinite(p).all():
        raise ValueError("probabilities (scores) must be finite; found NaN or infinity")
    if not scores_only and ((p < 0.0).any() or (p > 1.0).any()):
        raise ValueError(
            "probabilities must be finite and within [0, 1]; pass P(tumour), not logits "
            "(apply a sigmoid first)"
        )
    return y_raw.astype(bool), p


def _check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"threshold must be a probability in [0, 1], got {threshold!r}; choose it on validation "
            "predictions (e.g. mil.choose_threshold), never on the test set"
        )
    return value


def _patient_index(patients: PatientsLike, n_slides: int) -> tuple[IntArray, int]:
    """``(index of each slide's patient in 0..P-1, P)``; ids are compared as strings."""
    ids = [str(patient) for patient in patients]
    if len(ids) != n_slides:
        raise ValueError(f"{len(ids)} patient ids for {n_slides} slides: give each slide its patient id")
    missing = [i for i, (raw, text) in enumerate(zip(patients, ids, strict=True)) if raw is None or not text]
    if missing:
        raise ValueError(
            f"slides {missing[:5]} have no patient id; every slide needs one, or its patient cannot be "
            "resampled as a unit (use the slide id when the patient is truly unknown)"
        )
    unique, inverse = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    return inverse.astype(np.int64), len(unique)


# ----------------------------------------------------------------------------------------------------------
# Weighted metrics: the one implementation behind point estimates and bootstrap replicates


def _bin_index(probabilities: FloatArray, n_bins: int) -> IntArray:
    """Equal-width bins on [0, 1]; the last bin is closed so that probability 1.0 falls into it."""
    if n_bins < 1:
        raise ValueError(f"need at least one calibration bin, got {n_bins}")
    index = np.floor(probabilities * n_bins).astype(np.int64)
    return np.clip(index, 0, n_bins - 1)


def _bin_sums(
    weights: FloatArray, y: BoolArray, p: FloatArray, n_bins: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per resample and bin: total weight, weighted sum of probabilities, weighted number of tumour slides."""
    onehot = np.zeros((len(p), n_bins), dtype=np.float64)
    onehot[np.arange(len(p)), _bin_index(p, n_bins)] = 1.0
    counts = weights @ onehot
    sum_predicted = weights @ (onehot * p[:, None])
    sum_observed = weights @ (onehot * y[:, None])
    return counts, sum_predicted, sum_observed


def _weighted_auc(weights: FloatArray, y: BoolArray, p: FloatArray) -> FloatArray:
    """Mann-Whitney AUC per row of ``weights`` (ties count one half); NaN where a class has no weight.

    With slides sorted by score and grouped by equal score, a tumour slide beats the normal weight in all
    lower groups and ties with half the normal weight in its own group.
    """
    order = np.argsort(p, kind="mergesort")
    _, starts = np.unique(p[order], return_index=True)
    sorted_weights = weights[:, order]
    positive = np.add.reduceat(sorted_weights * y[order], starts, axis=1)
    negative = np.add.reduceat(sorted_weights * ~y[order], starts, axis=1)
    negative_below = np.cumsum(negative, axis=1) - negative
    wins = (positive * (negative_below + 0.5 * negative)).sum(axis=1)
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def weighted_metrics(
    labels: LabelsLike,
    probabilities: ScoresLike,
    threshold: float,
    weights: npt.NDArray[Any],
    *,
    ece_bins: int = 10,
) -> dict[str, FloatArray]:
    """Every metric of ``METRICS`` (plus the confusion counts ``tp fp tn fn``) for each row of ``weights``.

    ``weights`` is ``[resamples, slides]``: weight ``k`` means the slide is in that resample ``k`` times
    (0: left out). All weights 1 is the test set itself. Returns arrays of shape ``[resamples]``; NaN where
    a metric is undefined for that resample (see the module docstring).
    """
    y, p = _check_inputs(labels, probabilities)
    cut = _check_threshold(threshold)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != len(p):
        raise ValueError(f"weights must be [resamples, {len(p)} slides], got shape {w.shape}")
    predicted = p >= cut
    tp = w @ (predicted & y).astype(np.float64)
    fp = w @ (predicted & ~y).astype(np.float64)
    tn = w @ (~predicted & ~y).astype(np.float64)
    fn = w @ (~predicted & y).astype(np.float64)
    total = tp + fp + tn + fn
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    counts, sum_predicted, sum_observed = _bin_sums(w, y, p, ece_bins)
    # ECE = sum over bins of (bin weight / total) * |mean predicted - observed fraction|
    #     = sum over bins of |sum predicted - sum observed| / total.
    ece = _ratio(np.abs(sum_predicted - sum_observed).sum(axis=1), counts.sum(axis=1))
    return {
        "auc": _weighted_auc(w, y, p),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2.0 * tp, 2.0 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, total),
        "brier": _ratio(w @ (p - y) ** 2, total),
        "ece": ece,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def point_metrics(
    labels: LabelsLike, probabilities: ScoresLike, threshold: float, *, ece_bins: int = 10
) -> dict[str, float]:
    """The metrics of ``METRICS`` on the given slides at ``threshold`` (NaN where undefined)."""
    n_slides = len(np.asarray(probabilities))
    values = weighted_metrics(labels, probabilities, threshold, np.ones((1, n_slides)), ece_bins=ece_bins)
    return {name: float(values[name][0]) for name in METRICS}


# ----------------------------------------------------------------------------------------------------------
# Single metrics and curves


@dataclass(frozen=True)
class Confusion:
    """Slide counts at a threshold: tumour called tumour (tp), normal called tumour (fp), and so on."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def confusion_matrix(labels: LabelsLike, probabilities: ScoresLike, threshold: float) -> Confusion:
    """Counts of slides by true label and by prediction (``probability >= threshold`` is tumour)."""
    n_slides = len(np.asarray(probabilities))
    values = weighted_metrics(labels, probabilities, threshold, np.ones((1, n_slides)))
    return Confusion(*(round(float(values[key][0])) for key in ("tp", "fp", "tn", "fn")))


def roc_auc(labels: LabelsLike, scores: ScoresLike) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half); NaN when only one class is present.

    ``scores`` may be probabilities or any finite scores (logits): only their order matters.

    Agrees with ``mil.binary_auc`` (which raises instead of returning NaN) without importing torch.
    """
    y, p = _check_inputs(labels, scores, scores_only=True)
    return float(_weighted_auc(np.ones((1, len(p))), y, p)[0])


@dataclass(frozen=True)
class RocCurve:
    """ROC points, from (0, 0) to (1, 1). ``thresholds[i]`` gives point i when slides with
    ``score >= thresholds[i]`` are called tumour; the first threshold is +inf (nothing called tumour).
    With one class only, the rate of the missing class is NaN."""

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray

    def to_dict(self) -> dict[str, list[float | None]]:
        return {
            "fpr": _json_list(self.fpr),
            "tpr": _json_list(self.tpr),
            "thresholds": _json_list(self.thresholds),
        }


def roc_curve(labels: LabelsLike, scores: ScoresLike) -> RocCurve:
    """One ROC point per distinct score (plus the origin); the trapezoid area under it equals ``roc_auc``."""
    y, p = _check_inputs(labels, scores, scores_only=True)
    order = np.argsort(-p, kind="mergesort")
    descending = p[order]
    # the last slide of every group of equal scores: the threshold moves past the whole group at once
    group_ends = np.flatnonzero(np.r_[descending[1:] != descending[:-1], True])
    true_positives = np.cumsum(y[order])[group_ends].astype(np.float64)
    false_positives = np.cumsum(~y[order])[group_ends].astype(np.float64)
    n_pos, n_neg = float(y.sum()), float((~y).sum())
    tpr = np.r_[0.0, true_positives] / n_pos if n_pos else np.full(len(group_ends) + 1, np.nan)
    fpr = np.r_[0.0, false_positives] / n_neg if n_neg else np.full(len(group_ends) + 1, np.nan)
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=np.r_[np.inf, descending[group_ends]])


def brier_score(labels: LabelsLike, probabilities: ScoresLike) -> float:
    """Mean squared difference between P(tumour) and the 0/1 label (0 is perfect; always predicting 0.5 is 0.25)."""
    return point_metrics(labels, probabilities, 0.5)["brier"]


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a reliability diagram. ``mean_predicted`` and ``observed_fraction`` are NaN when empty."""

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_fraction: float

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "lower": self.lower,
            "upper": self.upper,
            "count": self.count,
            "mean_predicted": _json_float(self.mean_predicted),
            "observed_fraction": _json_float(self.observed_fraction),
        }


def calibration_bins(labels: LabelsLike, probabilities: ScoresLike, n_bins: int = 10) -> list[CalibrationBin]:
    """Equal-width bins on [0, 1]: per bin the slide count, mean predicted P(tumour), fraction truly tumour."""
    y, p = _check_inputs(labels, probabilities)
    counts, sum_predicted, sum_observed = _bin_sums(np.ones((1, len(p))), y, p, n_bins)
    mean_predicted = _ratio(sum_predicted[0], counts[0])
    observed = _ratio(sum_observed[0], counts[0])
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return [
        CalibrationBin(
            lower=float(edges[k]),
            upper=float(edges[k + 1]),
            count=round(float(counts[0, k])),
            mean_predicted=float(mean_predicted[k]),
            observed_fraction=float(observed[k]),
        )
        for k in range(n_bins)
    ]


def expected_calibration_error(labels: LabelsLike, probabilities: ScoresLike, n_bins: int = 10) -> float:
    """ECE: the slide-weighted mean of |mean predicted - observed fraction| over equal-width bins."""
    return point_metrics(labels, probabilities, 0.5, ece_bins=n_bins)["ece"]


# ----------------------------------------------------------------------------------------------------------
# JSON helpers


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_list(values: FloatArray) -> list[float | None]:
    return [_json_float(float(value)) for value in values]


def aggregate_by_patient(
    labels: LabelsLike, probabilities: ScoresLike, patients: PatientsLike
) -> tuple[BoolArray, FloatArray, list[str]]:
    """Patient-level ``(labels, scores, patient ids)``: a patient is tumour when any of their slides is, and
    scores the largest probability of their slides, so at a slide threshold a patient is called tumour
    exactly when one of their slides is (the rule a pathologist applies to a case)."""
    y, p = _check_inputs(labels, probabilities)
    inverse, n_patients = _patient_index(patients, len(p))
    ids = np.unique(np.asarray([str(patient) for patient in patients], dtype=str))
    patient_label = np.zeros(n_patients, dtype=bool)
    np.logical_or.at(patient_label, inverse, y)
    patient_score = np.full(n_patients, -np.inf)
    np.maximum.at(patient_score, inverse, p)
    return patient_label, patient_score, [str(patient) for patient in ids]
