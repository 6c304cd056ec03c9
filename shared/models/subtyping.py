"""Metrics of a K-class slide classifier (subtyping), with patient-bootstrap intervals.

A slide's predicted class is the one with the highest probability (no threshold to choose). Per class,
one-vs-rest: AUC (with the clustered DeLong interval of ``intervals.auc_interval``), sensitivity (recall),
specificity and precision (Wilson intervals on the patient-effective count, as for tumour/normal). Over classes: **macro AUC** (the unweighted mean of the one-vs-rest AUCs),
**balanced accuracy** (the mean recall), accuracy, and the confusion matrix (rows true, columns predicted).

Intervals of macro AUC, balanced accuracy and accuracy come from a patient bootstrap **stratified by class**: each
resample draws, with replacement, as many patients of each class as the test set has, and all slides of a
drawn patient come along; the percentile interval of the replicates. A patient has one class (the labels
reader refuses a patient whose slides disagree), so the strata are well defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from wsitk.shared.models.intervals import (
    MetricEstimate,
    _draw_patient_counts,
    _effective_count,
    auc_interval,
    wilson_interval,
)
from wsitk.shared.models.metrics import FloatArray, _patient_index, _ratio, _weighted_auc

_CHUNK_ELEMENTS = 4_000_000


def _inputs(labels: Any, probabilities: Any) -> tuple[np.ndarray, FloatArray]:
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"need labels [n] and probabilities [n, K]; got shapes {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no slides to evaluate")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be class indices 0..{p.shape[1] - 1}")
    return y.astype(np.int64), p


def weighted_multiclass(labels: Any, probabilities: Any, weights: FloatArray) -> dict[str, FloatArray]:
    """Every metric per row of ``weights`` ``[resamples, n]``: per-class arrays ``auc``, ``sensitivity``,
    ``specificity``, ``precision`` of shape ``[resamples, K]`` and ``macro_auc``, ``balanced_accuracy``,
    ``accuracy`` of shape ``[resamples]``. NaN where undefined (a class without weight)."""
    y, p = _inputs(labels, probabilities)
    w = np.asarray(weights, dtype=np.float64)
    k = p.shape[1]
    predicted = np.argmax(p, axis=1)
    auc = np.stack([_weighted_auc(w, y == c, p[:, c]) for c in range(k)], axis=1)
    sensitivity = np.empty((len(w), k))
    specificity = np.empty((len(w), k))
    precision = np.empty((len(w), k))
    for c in range(k):
        truth, called = y == c, predicted == c
        sensitivity[:, c] = _ratio(w @ (truth & called), w @ truth)
        specificity[:, c] = _ratio(w @ (~truth & ~called), w @ ~truth)
        precision[:, c] = _ratio(w @ (truth & called), w @ called)
    with np.errstate(invalid="ignore"):
        macro = np.where(np.isnan(auc).any(axis=1), np.nan, auc.mean(axis=1))
        balanced = np.where(np.isnan(sensitivity).any(axis=1), np.nan, sensitivity.mean(axis=1))
    accuracy = _ratio(w @ (predicted == y), w.sum(axis=1))
    return {
        "auc": auc,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "macro_auc": macro,
        "balanced_accuracy": balanced,
        "accuracy": accuracy,
    }


def confusion(labels: Any, probabilities: Any) -> list[list[int]]:
    """``[true class][predicted class]`` slide counts, the prediction being the most probable class."""
    y, p = _inputs(labels, probabilities)
    table = np.zeros((p.shape[1], p.shape[1]), dtype=np.int64)
    np.add.at(table, (y, np.argmax(p, axis=1)), 1)
    return table.tolist()


def macro_auc(labels: Any, probabilities: Any) -> float:
    """The unweighted mean of the one-vs-rest AUCs (NaN when a class is absent)."""
    y, p = _inputs(labels, probabilities)
    return float(weighted_multiclass(y, p, np.ones((1, len(y))))["macro_auc"][0])


@dataclass(frozen=True)
class SubtypeEvaluation:
    """One model on the test set: overall and per-class metrics with intervals, and the confusion matrix."""

    name: str
    classes: Sequence[str]
    overall: dict[str, MetricEstimate]
    per_class: dict[str, dict[str, MetricEstimate]]  # class -> metric -> estimate
    confusion: list[list[int]]
    n_slides: int
    n_patients: int
    class_slides: dict[str, int] = field(default_factory=dict)
    n_bootstrap: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "metrics": {name: estimate.to_dict() for name, estimate in self.overall.items()},
            "per_class": {
                c: {name: estimate.to_dict() for name, estimate in metrics.items()}
                for c, metrics in self.per_class.items()
            },
            "confusion": self.confusion,
            "n_slides": self.n_slides,
            "n_patients": self.n_patients,
            "class_slides": dict(self.class_slides),
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
        }


def _percentiles(values: FloatArray, confidence: float) -> tuple[float, float, int, int]:
    defined = values[~np.isnan(values)]
    if not len(defined):
        return math.nan, math.nan, 0, len(values)
    tail = 100.0 * (1.0 - confidence) / 2.0
    return (
        float(np.percentile(defined, tail)),
        float(np.percentile(defined, 100.0 - tail)),
        len(defined),
        len(values) - len(defined),
    )


def _wilson_per_class(
    y: np.ndarray, p: FloatArray, c: int, inverse: np.ndarray, confidence: float
) -> dict[str, tuple[float, float]]:
    """Wilson intervals of class ``c``'s one-vs-rest sensitivity, specificity and precision on the
    patient-effective count of their slides (as ``intervals.py`` does for tumour/normal): they do not
    collapse at 0 or 1 the way a bootstrap does."""
    truth, called = y == c, np.argmax(p, axis=1) == c
    cells = {"sensitivity": (truth, called), "specificity": (~truth, ~called), "precision": (called, truth)}
    intervals: dict[str, tuple[float, float]] = {}
    for key, (members, hits) in cells.items():
        if not members.any():
            intervals[key] = (math.nan, math.nan)
            continue
        effective = _effective_count(members, inverse)
        share = float(hits[members].mean())
        intervals[key] = wilson_interval(share * effective, effective, confidence=confidence)
    return intervals


def evaluate_subtyping(
    labels: Any,
    probabilities: Any,
    patients: Sequence[str],
    classes: Sequence[str],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    name: str = "",
) -> SubtypeEvaluation:
    """Evaluate class probabilities ``[slides, K]`` of the test slides (``labels`` class indices)."""
    y, p = _inputs(labels, probabilities)
    if p.shape[1] != len(classes):
        raise ValueError(f"{p.shape[1]} probability columns for {len(classes)} classes")
    inverse, n_patients = _patient_index(patients, len(y))
    patient_class = np.full(n_patients, -1, dtype=np.int64)
    patient_class[inverse] = y
    if np.any(patient_class[inverse] != y):
        raise ValueError("a patient's slides have different classes; a patient has one subtype")
    point = weighted_multiclass(y, p, np.ones((1, len(y))))
    replicates: dict[str, list[FloatArray]] = {key: [] for key in point}
    if n_bootstrap > 0:
        counts = _draw_patient_counts(n_patients, n_bootstrap, seed, patient_class)
        chunk = max(1, _CHUNK_ELEMENTS // max(len(y), 1))
        for start in range(0, n_bootstrap, chunk):
            weights = counts[start : start + chunk][:, inverse].astype(np.float64)
            for key, value in weighted_multiclass(y, p, weights).items():
                replicates[key].append(value)
    joined = {
        key: np.concatenate(parts) if parts else np.empty((0, *point[key].shape[1:]))
        for key, parts in replicates.items()
    }
    method = "patient bootstrap (stratified by class)"

    def estimate(key: str, column: int | None = None) -> MetricEstimate:
        value = point[key][0] if column is None else point[key][0, column]
        draws = joined[key] if column is None else joined[key][:, column]
        lower, upper, used, skipped = _percentiles(draws, confidence)
        return MetricEstimate(float(value), lower, upper, used, skipped, method, lower, upper)

    overall = {key: estimate(key) for key in ("macro_auc", "balanced_accuracy", "accuracy")}
    per_class: dict[str, dict[str, MetricEstimate]] = {}
    for c, class_name in enumerate(classes):
        metrics = {key: estimate(key, c) for key in ("auc", "sensitivity", "specificity", "precision")}
        if 0 < int((y == c).sum()) < len(y):
            auc, lower, upper, auc_method = auc_interval(y == c, p[:, c], patients, confidence=confidence)
            bootstrap = metrics["auc"]
            metrics["auc"] = MetricEstimate(
                auc,
                lower,
                upper,
                bootstrap.resamples_used,
                bootstrap.resamples_skipped,
                auc_method,
                bootstrap.bootstrap_lower,
                bootstrap.bootstrap_upper,
            )
        for key, (low, high) in _wilson_per_class(y, p, c, inverse, confidence).items():
            metrics[key] = replace(metrics[key], lower=low, upper=high, method="Wilson (patient-effective n)")
        per_class[class_name] = metrics
    return SubtypeEvaluation(
        name=name,
        classes=list(classes),
        overall=overall,
        per_class=per_class,
        confusion=confusion(y, p),
        n_slides=len(y),
        n_patients=n_patients,
        class_slides={c: int((y == i).sum()) for i, c in enumerate(classes)},
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
