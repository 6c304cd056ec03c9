"""The evaluation report: Markdown that reads like a paper's methods and results sections."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from wsitk.shared.models.intervals import Evaluation
from wsitk.shared.models.metrics import METRIC_LABELS

DEFAULT_THRESHOLD_RULE = "best balanced accuracy on out-of-fold validation predictions"

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
    scoring: str = ""  # which tiles of a slide were scored, and what that dropped
    patient_evaluations: Sequence[Evaluation] = ()  # the same models with slides aggregated per patient


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
        "stopping on the loss of one half of the fold's validation patients (split by patient, stratified "
        "by label; the other half chose the threshold and the calibration; a fold too small to split uses "
        f"all of them for both, as the run records) (patience {protocol.early_stopping_patience} epochs); "
        "bags larger than "
        f"{protocol.max_tiles_per_bag} tiles were sub-sampled to that many tiles each epoch; the loss was "
        + ("weighted by inverse class frequency." if protocol.class_weighting else "not class-weighted.")
    )
    lines.append("")
    lines.append(
        f"Threshold: {protocol.threshold_rule}; test labels were never used to choose it. "
        "A slide is called tumour when its probability is at or above the threshold."
    )
    if report.scoring:
        lines += ["", report.scoring]
    lines.append("")
    lines.append(
        "Evaluation: on the test set, AUC (Mann-Whitney), sensitivity, specificity, precision (PPV), F1, "
        "balanced accuracy at the threshold, Brier score and expected calibration error (ECE, "
        + "/".join(str(n) for n in sorted(ece_bins))
        + " equal-width bins). Confidence intervals treat a patient's slides as one cluster. AUC: DeLong's "
        "variance with patients as clusters (Obuchowski 1997), a normal interval clipped to [0, 1]; on a "
        "perfect split, where that variance is 0, the exact Clopper-Pearson bound of k correctly ordered "
        "independent tumour-normal patient pairs (k the smaller class's patient count) instead. Sensitivity, "
        "specificity, precision and accuracy: Wilson score intervals on the patient-effective count "
        "(Kish: (sum n_i)^2 / sum n_i^2 over the patients' slide counts n_i). Balanced accuracy, F1, Brier "
        "and ECE: a patient bootstrap stratified by patient label (tumour and normal patients drawn with "
        f"replacement separately, all slides of a drawn patient together): {bootstrap}. Resamples in which a "
        "metric is undefined (e.g. precision when no slide was called tumour) are left out of that "
        "metric's interval; metrics.json keeps the bootstrap interval of every metric beside the reported "
        "one. Baseline: each slide's tile embeddings mean-pooled, standardised, L2-regularised logistic "
        "regression."
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
    lines += _patient_table(report.patient_evaluations, ci)
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


def _patient_table(evaluations: Sequence[Evaluation], ci: str) -> list[str]:
    if not evaluations:
        return []
    names = ("auc", "sensitivity", "specificity")
    header = ["Model", *(f"{METRIC_LABELS[name]} ({ci})" for name in names), "Patients (tumour)"]
    rows = [
        [item.name, *(item.metrics[name].format() for name in names), f"{item.n_slides} ({item.n_positive})"]
        for item in evaluations
    ]
    return [
        "",
        "### Patient level (held-out test set)",
        "",
        "A patient is tumour when any of their slides is; a patient's score is the largest probability of "
        "their slides, so at each model's slide threshold a patient is called tumour exactly when one of "
        "their slides is. Each patient is one unit (plain DeLong and Wilson intervals).",
        "",
        *_table(header, rows),
    ]


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
