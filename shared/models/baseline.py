"""The baseline beside every model: each slide's tile embeddings mean-pooled, standardised, and an
L2-regularised logistic regression. If attention MIL does not beat it, the attention is not what makes the
predictions work. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from wsitk.shared.models.metrics import FloatArray, LabelsLike

BASELINE_KIND = "mean-pool-logistic-regression"
_BASELINE_FORMAT_VERSION = 1

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
