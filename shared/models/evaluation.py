"""Test-set evaluation of slide classifiers: metrics with patient-bootstrap intervals, a baseline, plots, a report.

DESIGN.md section 7 asks for what reviewers of a pathology classifier ask for:

- **The threshold comes from validation data.** ``evaluate`` takes a threshold (chosen beforehand, e.g. by
  ``mil.choose_threshold`` on out-of-fold validation predictions) and never picks one from test labels;
  a threshold tuned on the test set makes sensitivity and specificity look better than they will be.
- **Intervals resample patients, not slides.** Slides of one patient are correlated (same tumour, same
  staining run), so resampling slides pretends there is more independent evidence than there is and
  gives intervals that are too narrow. ``patient_bootstrap`` draws patients with replacement and every
  slide of a drawn patient comes along. The interval is the percentile interval of the resampled metric.
- **A simple baseline beside every model.** ``fit_logistic_baseline`` mean-pools each slide's tile
  embeddings and fits an L2-regularised logistic regression: if attention MIL does not beat it, the
  attention is not what makes the predictions work.

Undefined is NaN, never a made-up number: precision with no predicted positive, sensitivity without a
tumour slide, specificity and balanced accuracy without both classes, AUC and the ROC curve with one class
only. The report prints NaN as "n/a"; ``Evaluation.to_dict`` writes it as JSON ``null``. F1 uses the
count form ``2 tp / (2 tp + fp + fn)``, so a model that finds no tumour among tumour slides scores 0, not
n/a. A slide is called positive when its probability is ``>= threshold`` (as in ``choose_threshold``).

How the bootstrap stays fast: a resample that draws patient ``k`` twice holds each of that patient's slides
twice, which is the same as giving those slides weight 2. Every metric here is computed from weighted sums
(confusion counts, squared errors, calibration-bin sums, and AUC from weighted rank counts), so 2000
resamples are one ``[resamples, slides]`` weight matrix and a few matrix products rather than 2000 Python
loops. ``weighted_metrics`` is that computation; the point estimates use it with all weights 1, so the point
and the interval come from the same code.

numpy only (no torch, scikit-learn or scipy): importing this module is cheap; matplotlib is imported inside
the plotting functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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

DEFAULT_THRESHOLD_RULE = "best balanced accuracy on out-of-fold validation predictions"
BASELINE_KIND = "mean-pool-logistic-regression"
_BASELINE_FORMAT_VERSION = 1
# Bootstrap resamples are processed in chunks so that the [resamples, slides] weight matrix stays near this
# many elements (~32 MB of float64) however large the test set is.
_WEIGHT_CHUNK_ELEMENTS = 4_000_000


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
# Patient bootstrap


def _draw_patient_counts(n_patients: int, n_resamples: int, seed: int) -> IntArray:
    """``[resamples, patients]``: how often each patient is drawn when drawing ``n_patients`` with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    offsets = (np.arange(n_resamples, dtype=np.int64) * n_patients)[:, None]
    flat = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_patients)
    return flat.reshape(n_resamples, n_patients).astype(np.int64)


def patient_resample_weights(patients: PatientsLike, *, n_resamples: int, seed: int = 0) -> IntArray:
    """``[resamples, slides]``: how many times each slide is in each patient-level bootstrap resample.

    Each resample draws as many patients as the test set has, with replacement; all slides of a drawn
    patient come along, so slides of one patient always share one weight. ``patient_bootstrap`` uses
    exactly these weights (same seed, same resamples).
    """
    inverse, n_patients = _patient_index(patients, len(patients))
    return _draw_patient_counts(n_patients, n_resamples, seed)[:, inverse]


@dataclass(frozen=True)
class MetricEstimate:
    """A point estimate on the test set and its bootstrap percentile interval.

    ``resamples_used`` resamples gave a defined value; ``resamples_skipped`` did not (for AUC: resamples
    that drew patients of one class only) and are left out of the interval, not counted as 0 or 1.
    """

    point: float
    lower: float
    upper: float
    resamples_used: int = 0
    resamples_skipped: int = 0

    def format(self, digits: int = 3) -> str:
        """``0.962 (0.921-0.993)``; ``n/a`` when undefined; ``0.962 (CI n/a)`` without an interval."""
        if math.isnan(self.point):
            return "n/a"
        point = f"{self.point:.{digits}f}"
        if math.isnan(self.lower) or math.isnan(self.upper):
            return f"{point} (CI n/a)"
        return f"{point} ({self.lower:.{digits}f}-{self.upper:.{digits}f})"

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "point": _json_float(self.point),
            "lower": _json_float(self.lower),
            "upper": _json_float(self.upper),
            "resamples_used": self.resamples_used,
            "resamples_skipped": self.resamples_skipped,
        }


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
) -> dict[str, MetricEstimate]:
    """Point estimate and percentile interval of every metric in ``METRICS``, resampling patients.

    Each of ``n_resamples`` resamples draws patients with replacement (as many as there are), stacks all
    their slides and recomputes every metric at the same ``threshold``. The interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the defined replicates; with
    ``n_resamples=0`` the intervals are NaN. Reproducible from ``seed``.
    """
    y, p = _check_inputs(labels, probabilities)
    cut = _check_threshold(threshold)
    inverse, n_patients = _patient_index(patients, len(p))
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    point = point_metrics(y, p, cut, ece_bins=ece_bins)
    replicates: dict[str, list[FloatArray]] = {name: [] for name in METRICS}
    if n_resamples:
        patient_counts = _draw_patient_counts(n_patients, n_resamples, seed)
        chunk = max(1, _WEIGHT_CHUNK_ELEMENTS // len(p))
        for start in range(0, n_resamples, chunk):
            weights = patient_counts[start : start + chunk][:, inverse].astype(np.float64)
            chunk_values = weighted_metrics(y, p, cut, weights, ece_bins=ece_bins)
            for name in METRICS:
                replicates[name].append(chunk_values[name])
    tail = 100.0 * (1.0 - confidence) / 2.0
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
        )
    return estimates


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

    ``labels``, ``probabilities`` and ``patients`` hold one entry per test slide. Intervals come from
    ``patient_bootstrap`` (``n_bootstrap`` patient resamples from ``seed``).
    """
    y, p = _check_inputs(labels, probabilities)
    cut = _check_threshold(threshold)
    _, n_patients = _patient_index(patients, len(p))
    metrics = patient_bootstrap(
        y, p, patients, cut, n_resamples=n_bootstrap, seed=seed, confidence=confidence, ece_bins=ece_bins
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


# ----------------------------------------------------------------------------------------------------------
# Baseline: mean-pooled embeddings + L2-regularised logistic regression


def _mean_pool(bags: Sequence[npt.NDArray[Any]], what: str, dim: int | None = None) -> FloatArray:
    if len(bags) == 0:
        raise ValueError(f"{what}: no bags given")
    pooled = []
    for index, bag in enumerate(bags):
        tiles = np.asarray(bag, dtype=np.float64)
        if tiles.ndim != 2 or len(tiles) == 0:
            raise ValueError(
                f"{what}: bag {index} must be a non-empty 2-D array [tiles, features], got shape {tiles.shape}"
            )
        if dim is not None and tiles.shape[1] != dim:
            raise ValueError(
                f"{what}: bag {index} has {tiles.shape[1]} features per tile but the baseline was fitted on "
                f"{dim}; were these embeddings made with another backbone?"
            )
        pooled.append(tiles.mean(axis=0))
    dims = {len(vector) for vector in pooled}
    if len(dims) != 1:
        raise ValueError(f"{what}: bags have different feature dimensions {sorted(dims)}")
    features = np.stack(pooled)
    if not np.isfinite(features).all():
        raise ValueError(f"{what}: embeddings contain NaN or infinite values")
    return features


def _sigmoid(z: FloatArray) -> FloatArray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|, unlike 1 / (1 + exp(-z))


@dataclass(frozen=True)
class LogisticBaseline:
    """A fitted mean-pool + logistic-regression baseline: standardisation, weights, and how the fit went."""

    feature_mean: FloatArray
    feature_scale: FloatArray
    weights: FloatArray
    intercept: float
    l2: float
    class_weighting: bool
    n_iterations: int = 0
    converged: bool = True

    def decision_function(self, bags: Sequence[npt.NDArray[Any]]) -> FloatArray:
        """The logit of P(tumour) for each bag."""
        features = _mean_pool(bags, "baseline prediction", dim=len(self.weights))
        standardised = (features - self.feature_mean) / self.feature_scale
        return np.asarray(standardised @ self.weights + self.intercept, dtype=np.float64)

    def predict(self, bags: Sequence[npt.NDArray[Any]]) -> FloatArray:
        """P(tumour) for each bag (a bag is one slide's ``[tiles, features]`` embeddings)."""
        return _sigmoid(self.decision_function(bags))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: save with ``json.dumps``, load with ``LogisticBaseline.from_dict(json.loads(...))``."""
        return {
            "kind": BASELINE_KIND,
            "format_version": _BASELINE_FORMAT_VERSION,
            "feature_mean": self.feature_mean.tolist(),
            "feature_scale": self.feature_scale.tolist(),
            "weights": self.weights.tolist(),
            "intercept": self.intercept,
            "l2": self.l2,
            "class_weighting": self.class_weighting,
            "n_iterations": self.n_iterations,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogisticBaseline:
        if data.get("kind") != BASELINE_KIND or data.get("format_version") != _BASELINE_FORMAT_VERSION:
            raise ValueError(
                f"not a saved baseline of kind {BASELINE_KIND!r} version {_BASELINE_FORMAT_VERSION}: got "
                f"kind {data.get('kind')!r} version {data.get('format_version')!r}"
            )
        arrays = {
            key: np.asarray(data[key], dtype=np.float64)
            for key in ("feature_mean", "feature_scale", "weights")
        }
        if len({array.shape for array in arrays.values()}) != 1 or arrays["weights"].ndim != 1:
            raise ValueError(
                "saved baseline is inconsistent: feature_mean, feature_scale and weights must be lists of "
                f"equal length, got {[array.shape for array in arrays.values()]}"
            )
        return cls(
            **arrays,
            intercept=float(data["intercept"]),
            l2=float(data["l2"]),
            class_weighting=bool(data["class_weighting"]),
            n_iterations=int(data.get("n_iterations", 0)),
            converged=bool(data.get("converged", True)),
        )


def fit_logistic_baseline(
    bags: Sequence[npt.NDArray[Any]],
    labels: LabelsLike,
    *,
    l2: float = 1.0,
    class_weighting: bool = True,
    max_iterations: int = 100,
    tolerance: float = 1e-8,
) -> LogisticBaseline:
    """Fit the mean-pool baseline: average each bag's tiles, standardise, L2-regularised logistic regression.

    The objective is ``sum_i c_i * logloss_i + l2 / 2 * |w|^2`` (intercept not penalised), i.e. ``l2`` is
    ``1 / C`` of scikit-learn's ``LogisticRegression``. With ``class_weighting`` the class weights are
    ``n / (2 n_class)`` (scikit-learn's "balanced", as ``train_mil`` weights its loss). Minimised by Newton's
    method with backtracking; the objective is strictly convex, so this converges in a handful of steps.
    ``l2`` must be positive: on separable data (common with a few dozen slides) the unregularised weights
    grow without bound. Features constant in training get scale 1 (not a tiny floor that would blow up
    small differences at prediction time); their weight is then 0.
    """
    features = _mean_pool(bags, "baseline training set")
    y_raw = np.asarray(labels)
    if y_raw.shape != (len(features),):
        raise ValueError(f"{len(features)} bags but labels of shape {y_raw.shape}: give one label per bag")
    if y_raw.dtype != np.bool_ and not np.isin(y_raw, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (tumour)")
    y = y_raw.astype(np.float64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"the baseline needs both classes; got {n_pos} tumour and {n_neg} normal bags")
    if not (math.isfinite(l2) and l2 > 0.0):
        raise ValueError(f"l2 must be a positive number (1.0 is a sensible default), got {l2!r}")

    mean = features.mean(axis=0)
    std = features.std(axis=0)
    scale = np.where(std > 1e-12, std, 1.0)
    design = np.hstack([(features - mean) / scale, np.ones((len(y), 1))])
    sample_weight = (
        np.where(y == 1.0, len(y) / (2.0 * n_pos), len(y) / (2.0 * n_neg))
        if class_weighting
        else np.ones(len(y))
    )
    penalty = np.r_[np.full(features.shape[1], l2), 0.0]

    def objective(beta: FloatArray) -> float:
        z = design @ beta
        log_loss = np.logaddexp(0.0, z) - y * z  # -log P(label) for a logit z, without overflow
        return float(sample_weight @ log_loss + 0.5 * penalty @ beta**2)

    beta = np.zeros(design.shape[1])
    current = objective(beta)
    converged, iterations = False, 0
    while iterations < max_iterations:
        iterations += 1
        probability = _sigmoid(design @ beta)
        gradient = design.T @ (sample_weight * (probability - y)) + penalty * beta
        curvature = sample_weight * probability * (1.0 - probability)
        hessian = (design.T * curvature) @ design + np.diag(penalty + 1e-10 * len(y))
        step = np.linalg.solve(hessian, gradient)
        size, candidate = 1.0, objective(beta - step)
        while candidate > current - 1e-4 * size * float(gradient @ step) and size > 1e-10:
            size /= 2.0
            candidate = objective(beta - size * step)
        beta = beta - size * step
        improvement, current = current - candidate, candidate
        if np.max(np.abs(size * step)) < tolerance or improvement <= tolerance * max(1.0, abs(current)):
            converged = True
            break
    return LogisticBaseline(
        feature_mean=mean,
        feature_scale=scale,
        weights=beta[:-1].copy(),
        intercept=float(beta[-1]),
        l2=float(l2),
        class_weighting=class_weighting,
        n_iterations=iterations,
        converged=converged,
    )


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib imported here only)

Curves = Mapping[str, tuple[LabelsLike, ScoresLike]]


def _new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas, outside pyplot: no display, no global figure list to leak into or
    close, and no dependency on the process-wide backend setting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path | str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


def _check_curves(curves: Curves) -> None:
    if not curves:
        raise ValueError("nothing to plot: give at least one model as {name: (labels, probabilities)}")


def plot_roc(
    curves: Curves,
    path: Path | str,
    title: str = "ROC curves, held-out test set",
    *,
    operating_points: Mapping[str, float] | None = None,
) -> Path:
    """One ROC line per model (AUC in the legend) and the chance diagonal, saved as PNG at ``path``.

    ``operating_points`` (model name -> threshold) marks where each model's chosen threshold sits.
    """
    _check_curves(curves)
    figure = _new_figure(5.5, 5.2)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (labels, probabilities) in curves.items():
        curve = roc_curve(labels, probabilities)
        auc = roc_auc(labels, probabilities)
        auc_text = "n/a" if math.isnan(auc) else f"{auc:.3f}"
        (line,) = axes.plot(curve.fpr, curve.tpr, linewidth=1.6, label=f"{name} (AUC {auc_text})")
        if operating_points and name in operating_points:
            rates = point_metrics(labels, probabilities, operating_points[name])
            axes.plot(
                [1.0 - rates["specificity"]], [rates["sensitivity"]], marker="o", color=line.get_color()
            )
    axes.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity (false-positive rate)",
        ylabel="Sensitivity (true-positive rate)",
        title=title,
    )
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_calibration(
    curves: Curves,
    path: Path | str,
    bins: int = 10,
    title: str = "Calibration, held-out test set",
) -> Path:
    """Reliability diagram (mean predicted vs observed fraction per bin, one line per model, the perfect
    diagonal) above a histogram of the predicted probabilities (slide counts), saved as PNG at ``path``."""
    _check_curves(curves)
    figure = _new_figure(5.5, 6.8)
    reliability, histogram = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    reliability.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, (labels, probabilities) in curves.items():
        table = [item for item in calibration_bins(labels, probabilities, bins) if item.count > 0]
        ece = expected_calibration_error(labels, probabilities, bins)
        (line,) = reliability.plot(
            [item.mean_predicted for item in table],
            [item.observed_fraction for item in table],
            marker="o",
            linewidth=1.4,
            label=f"{name} (ECE {ece:.3f})",
        )
        histogram.hist(
            np.asarray(probabilities, dtype=np.float64),
            bins=edges,
            histtype="step",
            linewidth=1.4,
            color=line.get_color(),
        )
    reliability.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="Observed fraction of tumour slides", title=title)
    reliability.grid(alpha=0.3)
    reliability.legend(loc="best", fontsize="small")
    histogram.set(xlabel="Predicted P(tumour)", ylabel="Slides")
    histogram.grid(alpha=0.3)
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class SplitSummary:
    """One split of the cohort (e.g. "development", "test"); ``positives`` counts tumour slides."""

    name: str
    slides: int
    patients: int
    positives: int


@dataclass(frozen=True)
class CohortSummary:
    slides: int
    patients: int
    sites: int
    splits: Sequence[SplitSummary] = ()


@dataclass(frozen=True)
class Protocol:
    """How the models were trained and thresholds chosen, as the methods section states it."""

    test_fraction: float
    k_folds: int
    site_preserving: bool
    seeds: Sequence[int]
    architecture: Mapping[str, object]
    epochs: int
    early_stopping_patience: int
    max_tiles_per_bag: int
    class_weighting: bool
    threshold_rule: str = DEFAULT_THRESHOLD_RULE


@dataclass(frozen=True)
class FoldValidation:
    """One fold model on its validation patients."""

    fold: int
    model: str
    n_val_slides: int
    val_auc: float
    threshold: float
    best_epoch: int


@dataclass(frozen=True)
class ReportInput:
    """Everything ``render_report`` writes. ``plots`` maps a caption to a file name relative to the report."""

    title: str
    generated_at: str
    command_line: str
    cohort: CohortSummary
    protocol: Protocol
    evaluations: Sequence[Evaluation]
    folds: Sequence[FoldValidation] = ()
    plots: Mapping[str, str] = field(default_factory=dict)
    limitations: str = ""


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(item) for item in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(_cell(item) for item in row) + " |" for row in rows)
    return lines


def _check_relative(path: str) -> None:
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute():
        raise ValueError(
            f"plot path {path!r} is absolute; give it relative to the report so the report can be moved"
        )


def _methods(report: ReportInput) -> list[str]:
    cohort, protocol = report.cohort, report.protocol
    split_rows = [[split.name, split.slides, split.patients, split.positives] for split in cohort.splits]
    architecture = (
        ", ".join(f"{key} = {value}" for key, value in protocol.architecture.items()) or "not given"
    )
    seeds = ", ".join(str(seed) for seed in protocol.seeds) or "not given"
    resampling = sorted({(item.n_bootstrap, item.confidence, item.seed) for item in report.evaluations})
    if any(n for n, _, _ in resampling):
        bootstrap = "; ".join(
            f"{n} resamples, {confidence:.0%} percentile intervals, seed {seed}"
            for n, confidence, seed in resampling
        )
    else:
        bootstrap = "not run (no intervals)"
    ece_bins = {len(item.calibration) for item in report.evaluations}
    lines = ["## Methods", "", "### Cohort", ""]
    lines.append(
        f"The cohort holds {cohort.slides} slides from {cohort.patients} patients at {cohort.sites} sites. "
        "Splits are by patient: no patient has slides in more than one split. "
        "Positives are tumour slides."
    )
    if split_rows:
        lines += ["", *_table(["Split", "Slides", "Patients", "Positives"], split_rows)]
    lines += ["", "### Protocol", ""]
    lines.append(
        f"A held-out test set of {protocol.test_fraction:.0%} of patients was set aside before any training; "
        f"no fold model or ensemble was trained or tuned on it. The remaining patients were split into "
        f"{protocol.k_folds} stratified folds by patient"
        + (", keeping each site's patients within one fold" if protocol.site_preserving else "")
        + f". Seed(s): {seeds}."
    )
    lines.append("")
    lines.append(
        f"Architecture: {architecture}. Models were trained for at most {protocol.epochs} epochs with early "
        f"stopping on validation loss (patience {protocol.early_stopping_patience} epochs); bags larger than "
        f"{protocol.max_tiles_per_bag} tiles were sub-sampled to that many tiles each epoch; the loss was "
        + ("weighted by inverse class frequency." if protocol.class_weighting else "not class-weighted.")
    )
    lines.append("")
    lines.append(
        f"Threshold: {protocol.threshold_rule}; test labels were never used to choose it. "
        "A slide is called tumour when its probability is at or above the threshold."
    )
    lines.append("")
    lines.append(
        "Evaluation: on the test set, AUC (Mann-Whitney), sensitivity, specificity, precision (PPV), F1, "
        "balanced accuracy at the threshold, Brier score and expected calibration error (ECE, "
        + "/".join(str(n) for n in sorted(ece_bins))
        + " equal-width bins). Confidence intervals resample patients with replacement (all slides of a "
        f"drawn patient together): {bootstrap}. Resamples in which a metric is undefined (e.g. AUC when only "
        "one class was drawn) are left out of that metric's interval. "
        "Baseline: each slide's tile embeddings mean-pooled, standardised, L2-regularised logistic regression."
    )
    return lines


def _results(report: ReportInput) -> list[str]:
    confidence = {item.confidence for item in report.evaluations}
    ci = f"{next(iter(confidence)):.0%} CI" if len(confidence) == 1 else "CI"
    columns = ["auc", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "brier"]
    header = ["Model", *(f"{METRIC_LABELS[name]} ({ci})" for name in columns), "ECE", "Threshold"]
    rows = [
        [
            item.name,
            *(item.metrics[name].format() for name in columns),
            _number(item.metrics["ece"].point),
            _number(item.threshold),
        ]
        for item in report.evaluations
    ]
    lines = ["## Results", "", "### Held-out test set", ""]
    sizes = sorted(
        {(item.n_slides, item.n_patients, item.n_positive, item.n_negative) for item in report.evaluations}
    )
    for slides, patients, positive, negative in sizes:
        lines.append(
            f"Test set: {slides} slides from {patients} patients ({positive} tumour, {negative} normal)."
        )
    lines += ["", *_table(header, rows), ""]
    lines.append("n/a: undefined on this test set (e.g. precision when no slide is called tumour).")
    for item in report.evaluations:
        skipped = [
            f"{METRIC_LABELS[name]} {estimate.resamples_skipped}"
            for name, estimate in item.metrics.items()
            if estimate.resamples_skipped
        ]
        if skipped:
            lines.append(
                f"{item.name}: resamples left out of an interval (metric undefined there), of {item.n_bootstrap}: "
                + ", ".join(skipped)
                + "."
            )
    if report.folds:
        lines += ["", "### Cross-validation (validation folds)", ""]
        fold_rows = [
            [
                fold.fold,
                fold.model,
                fold.n_val_slides,
                _number(fold.val_auc),
                _number(fold.threshold),
                fold.best_epoch,
            ]
            for fold in report.folds
        ]
        lines += _table(
            ["Fold", "Model", "Validation slides", "Validation AUC", "Threshold", "Best epoch"], fold_rows
        )
    lines += ["", "### Confusion matrices (test set)", ""]
    lines += _table(
        ["Model", "TP", "FN", "FP", "TN"],
        [
            [item.name, item.confusion.tp, item.confusion.fn, item.confusion.fp, item.confusion.tn]
            for item in report.evaluations
        ],
    )
    lines.append("")
    lines.append(
        "TP: tumour called tumour; FN: tumour called normal; FP: normal called tumour; TN: normal called normal."
    )
    lines += ["", "### Calibration (test set)", ""]
    lines += _calibration_table(report.evaluations)
    return lines


def _calibration_table(evaluations: Sequence[Evaluation]) -> list[str]:
    """Bins as rows, models as columns; a cell is "observed / mean predicted (n)"."""
    layouts = {
        tuple((item.lower, item.upper) for item in evaluation.calibration) for evaluation in evaluations
    }
    if len(layouts) != 1:
        return [f"{item.name}: ECE {_number(item.metrics['ece'].point)}" for item in evaluations]
    edges = next(iter(layouts))
    rows = []
    for k, (lower, upper) in enumerate(edges):
        cells = []
        for evaluation in evaluations:
            item = evaluation.calibration[k]
            cells.append(
                "-"
                if item.count == 0
                else f"{item.observed_fraction:.2f} / {item.mean_predicted:.2f} ({item.count})"
            )
        rows.append([f"{lower:.1f}-{upper:.1f}", *cells])
    lines = _table(["Predicted P(tumour)", *(item.name for item in evaluations)], rows)
    lines.append("")
    lines.append(
        "Cells: observed fraction of tumour slides / mean predicted probability (slides in the bin); "
        "'-': no slide in the bin. A calibrated model has the two numbers close."
    )
    return lines


def render_report(report: ReportInput) -> str:
    """The evaluation as Markdown that reads like a paper's methods and results (numbers as ``0.962 (0.921-0.993)``)."""
    if not report.evaluations:
        raise ValueError("the report needs at least one test-set evaluation")
    for path in report.plots.values():
        _check_relative(path)
    lines = [f"# {report.title}", ""]
    lines.append(f"Generated {report.generated_at} by `{report.command_line}`.")
    lines += ["", *_methods(report), "", *_results(report)]
    if report.plots:
        lines += ["", "### Figures", ""]
        for caption, path in report.plots.items():
            lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
        lines.pop()
    lines += ["", "## Limitations", "", report.limitations.strip() or "n/a"]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------
# JSON helpers


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_list(values: FloatArray) -> list[float | None]:
    return [_json_float(float(value)) for value in values]
