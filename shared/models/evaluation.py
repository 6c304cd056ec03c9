"""Test-set evaluation of slide classifiers: metrics with patient-level intervals, a baseline, plots, a report.

DESIGN.md section 7 asks for what reviewers of a pathology classifier ask for:

- **The threshold comes from validation data.** ``evaluate`` takes a threshold (chosen beforehand on
  validation predictions, e.g. by ``mil.choose_threshold``) and never picks one from test labels; a
  threshold tuned on the test set makes sensitivity and specificity look better than they will be.
- **Intervals treat patients, not slides, as the unit** and do not collapse on a perfect split: clustered
  DeLong for AUC (an exact bound when a class is perfectly separated), Wilson intervals for proportions,
  a label-stratified patient bootstrap for the rest (``intervals.py``).
- **A simple baseline beside every model** (``baseline.py``).

This module is the one import for callers; the code lives along its seams: ``metrics.py`` (weighted
metrics, ROC, calibration), ``intervals.py`` (bootstrap, DeLong, Wilson, ``evaluate``), ``baseline.py``,
``plots.py`` (matplotlib imported inside the functions) and ``report.py``. numpy only at import time.
"""

from __future__ import annotations

from wsitk.shared.models.baseline import BASELINE_KIND, LogisticBaseline, fit_logistic_baseline
from wsitk.shared.models.intervals import (
    Evaluation,
    MetricEstimate,
    auc_interval,
    delong_auc_variance,
    evaluate,
    patient_bootstrap,
    patient_resample_weights,
    patient_strata,
    wilson_interval,
)
from wsitk.shared.models.metrics import (
    METRIC_LABELS,
    METRICS,
    CalibrationBin,
    Confusion,
    RocCurve,
    aggregate_by_patient,
    brier_score,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    point_metrics,
    roc_auc,
    roc_curve,
    weighted_metrics,
)
from wsitk.shared.models.plots import plot_calibration, plot_roc
from wsitk.shared.models.report import (
    DEFAULT_THRESHOLD_RULE,
    CohortSummary,
    FoldValidation,
    Protocol,
    ReportInput,
    SplitSummary,
    render_report,
)

__all__ = [
    "BASELINE_KIND",
    "DEFAULT_THRESHOLD_RULE",
    "METRICS",
    "METRIC_LABELS",
    "CalibrationBin",
    "CohortSummary",
    "Confusion",
    "Evaluation",
    "FoldValidation",
    "LogisticBaseline",
    "MetricEstimate",
    "Protocol",
    "ReportInput",
    "RocCurve",
    "SplitSummary",
    "aggregate_by_patient",
    "auc_interval",
    "brier_score",
    "calibration_bins",
    "confusion_matrix",
    "delong_auc_variance",
    "evaluate",
    "expected_calibration_error",
    "fit_logistic_baseline",
    "patient_bootstrap",
    "patient_resample_weights",
    "patient_strata",
    "plot_calibration",
    "plot_roc",
    "point_metrics",
    "render_report",
    "roc_auc",
    "roc_curve",
    "weighted_metrics",
    "wilson_interval",
]
