"""ROC and calibration figures of test-set predictions (matplotlib imported inside the functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from wsitk.shared.models.metrics import (
    LabelsLike,
    ScoresLike,
    calibration_bins,
    expected_calibration_error,
    point_metrics,
    roc_auc,
    roc_curve,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
