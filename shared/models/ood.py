"""Out-of-distribution flags: how far a slide's tile embeddings lie from the embeddings a model was trained on.

Every model version carries a summary of its training tile embeddings (``OodReference``, stored in the
ONNX file's metadata as ``ood``, so a registered version keeps its own): their mean, the top ``k``
principal directions with their variances, and the mean variance left outside them. A tile's distance is
its squared Mahalanobis distance in that PCA model (whitened along the ``k`` directions, the residual
scaled by the residual variance) divided by the dimension, about 1 for a tile like the training tiles.
A slide's score is the median over its tiles, robust to a few odd tiles (pen, folds, debris).

The score is calibrated on validation slides the summary was not fitted on: ``reference_scores`` keeps
their sorted scores, a prediction carries its percentile among them, and a slide is flagged
out-of-distribution above ``limit`` = ``LIMIT_FACTOR`` (4) x the largest validation score. A factor rather
than a percentile: validation sets are small, so their largest score is a low and noisy estimate of the
in-distribution tail, and new slides of the same kind (new patients, sites, stain runs) vary more than
the validation set. Measured with the demo model (``wsi model init-defaults``, trained on rendered
synthetic patches; 8 principal directions): whole synthetic slides from ``wsi synth`` at three sites
scored up to 2.3 x its largest validation score, the real scan ``CMU-1-Small-Region.svs`` 7.4 x
(``docs/training-and-evaluation.md``). With 8 directions (``DEFAULT_COMPONENTS``) the summary stays
stable when the training set has few tiles per dimension; more directions fit the training tiles more
tightly and widen the in-distribution spread.

The summary is fitted from streamed float64 sums (``EmbeddingMoments``), chunk by chunk, so memory is
``D x D`` however many tiles go in. numpy only: the mil-scorer imports this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
OOD_KIND = "tile-embedding-pca-mahalanobis"
OOD_FORMAT_VERSION = 1
LIMIT_FACTOR = 4.0
DEFAULT_COMPONENTS = 8


class EmbeddingMoments:
    """Mean and covariance of tile embeddings from chunks, in float64 sums shifted by the first chunk's
    mean (no catastrophic cancellation when the mean is far from 0); memory ``D x D``."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: FloatArray | None = None
        self.total: FloatArray | None = None
        self.outer: FloatArray | None = None

    def add(self, features: npt.NDArray[Any]) -> None:
        chunk = np.asarray(features, dtype=np.float64)
        if chunk.ndim != 2 or len(chunk) == 0:
            return
        if self.shift is None:
            self.shift = chunk.mean(axis=0)
            self.total = np.zeros(chunk.shape[1])
            self.outer = np.zeros((chunk.shape[1], chunk.shape[1]))
        assert self.total is not None and self.outer is not None
        centred = chunk - self.shift
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred
        self.count += len(chunk)

    def mean_and_covariance(self) -> tuple[FloatArray, FloatArray]:
        if self.count < 2 or self.shift is None or self.total is None or self.outer is None:
            raise ValueError("need at least two tile embeddings to summarise a training set")
        offset = self.total / self.count
        covariance = (self.outer - self.count * np.outer(offset, offset)) / (self.count - 1)
        return self.shift + offset, covariance


@dataclass(frozen=True)
class OodResult:
    score: float
    percentile: float  # share of validation slides scoring at or below this slide (0-1)
    limit: float
    out_of_distribution: bool


@dataclass(frozen=True)
class OodReference:
    """A model's summary of its training tile embeddings and its calibration on validation slides."""

    mean: FloatArray
    components: FloatArray  # [k, D]
    variances: FloatArray  # [k]
    residual_variance: float
    reference_scores: FloatArray  # sorted slide scores of the calibration slides
    limit: float
    training_tiles: int = 0

    def tile_distances(self, features: npt.NDArray[Any]) -> FloatArray:
        """Per tile: squared whitened distance from the training embeddings divided by the dimension."""
        x = np.asarray(features, dtype=np.float64) - self.mean
        projected = x @ self.components.T
        residual = np.maximum((x * x).sum(axis=1) - (projected * projected).sum(axis=1), 0.0)
        distance = (projected * projected / self.variances).sum(axis=1) + residual / self.residual_variance
        return np.asarray(distance / len(self.mean), dtype=np.float64)

    def slide_score(self, features: npt.NDArray[Any]) -> float:
        if len(features) == 0:
            raise ValueError("cannot assess an empty bag")
        return float(np.median(self.tile_distances(features)))

    def assess(self, features: npt.NDArray[Any]) -> OodResult:
        score = self.slide_score(features)
        percentile = float(
            np.searchsorted(self.reference_scores, score, side="right") / len(self.reference_scores)
        )
        return OodResult(score, percentile, self.limit, bool(score > self.limit))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (float32 precision is plenty for the arrays)."""
        return {
            "kind": OOD_KIND,
            "format_version": OOD_FORMAT_VERSION,
            "mean": self.mean.astype(np.float32).tolist(),
            "components": self.components.astype(np.float32).tolist(),
            "variances": self.variances.tolist(),
            "residual_variance": self.residual_variance,
            "reference_scores": self.reference_scores.tolist(),
            "limit": self.limit,
            "limit_rule": f"{LIMIT_FACTOR} x the largest validation slide score",
            "training_tiles": self.training_tiles,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OodReference:
        if data.get("kind") != OOD_KIND or data.get("format_version") != OOD_FORMAT_VERSION:
            raise ValueError(f"not an out-of-distribution summary of kind {OOD_KIND!r}: {data.get('kind')!r}")
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            components=np.asarray(data["components"], dtype=np.float64).reshape(-1, len(data["mean"])),
            variances=np.asarray(data["variances"], dtype=np.float64),
            residual_variance=float(data["residual_variance"]),
            reference_scores=np.sort(np.asarray(data["reference_scores"], dtype=np.float64)),
            limit=float(data["limit"]),
            training_tiles=int(data.get("training_tiles", 0)),
        )


def fit_reference(
    training_chunks: Iterable[npt.NDArray[Any]],
    calibration_bags: Sequence[npt.NDArray[Any]],
    *,
    components: int = DEFAULT_COMPONENTS,
    limit_factor: float = LIMIT_FACTOR,
) -> OodReference:
    """Summarise the training tile embeddings (streamed, any number of chunks) and calibrate the slide
    score on ``calibration_bags`` (validation slides, not part of the training chunks)."""
    moments = EmbeddingMoments()
    for chunk in training_chunks:
        moments.add(chunk)
    mean, covariance = moments.mean_and_covariance()
    dim = len(mean)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    k = max(1, min(components, dim - 1))
    floor = 1e-6 * max(float(values.sum()) / dim, 1e-12)
    residual = float(values[k:].sum() / max(dim - k, 1)) if dim > k else floor
    partial = OodReference(
        mean=mean,
        components=vectors[:, :k].T.copy(),
        variances=values[:k] + floor,
        residual_variance=max(residual, floor),
        reference_scores=np.zeros(1),
        limit=np.inf,
        training_tiles=moments.count,
    )
    if not calibration_bags:
        raise ValueError("calibrating the out-of-distribution score needs validation slides")
    scores = np.sort([partial.slide_score(bag) for bag in calibration_bags])
    return OodReference(
        mean=partial.mean,
        components=partial.components,
        variances=partial.variances,
        residual_variance=partial.residual_variance,
        reference_scores=scores,
        limit=float(limit_factor * scores[-1]),
        training_tiles=moments.count,
    )
