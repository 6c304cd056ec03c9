"""Test-set AUC per site: does a model hold up on a site it never saw?

A pooled test AUC can hide a site where the model fails (a scanner or stain it was not trained on). This
module splits the held-out test predictions (``RUN/evaluation/test_predictions.csv``) by the labels file's
``site`` column and gives every headline model's AUC with its 95 % interval per site (clustered DeLong as
for the pooled AUC, or the exact bound on a perfect split; ``n/a`` when a site has one class only).

With ``true_labels`` (slide -> 0/1, e.g. the ``true_label`` column of a synthetic cohort with label noise)
the same table is given a second time against them, so that label noise in the test set can be told apart
from model error. ``held_out_site`` marks a site that no training patient came from.

:func:`add_site_breakdown` writes ``by_site.json`` beside the predictions and puts a "Results by site"
section into ``report.md`` (replacing the one a previous call wrote).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from wsitk.shared.models.intervals import auc_interval

ALL_SITES = "all test sites"
_START, _END = "<!-- by-site -->", "<!-- /by-site -->"
_FIXED_COLUMNS = ("slide", "slide_id", "patient", "site", "label", "tiles", "tiles_scored")


def _auc(labels: np.ndarray, scores: np.ndarray, patients: list[str]) -> dict[str, Any]:
    if labels.min(initial=1) == labels.max(initial=0):
        return {"point": None, "lower": None, "upper": None, "method": "n/a (one class)"}
    point, lower, upper, method = auc_interval(labels, scores, patients)

    def clean(value: float) -> float | None:
        return None if math.isnan(value) else round(float(value), 4)

    return {"point": clean(point), "lower": clean(lower), "upper": clean(upper), "method": method}


def site_breakdown(
    predictions_csv: Path,
    *,
    true_labels: Mapping[str, int] | None = None,
    held_out_site: str | None = None,
) -> dict[str, Any]:
    """Per-site (and pooled) AUC of every headline model (fold models left out); {} without sites."""
    with Path(predictions_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not any(row["site"] for row in rows):
        return {}
    models = [c for c in rows[0] if c not in _FIXED_COLUMNS and " fold " not in c]
    label_sets = {"labels file": {row["slide"]: int(row["label"]) for row in rows}}
    if true_labels is not None:
        label_sets["true labels"] = {row["slide"]: int(true_labels[row["slide"]]) for row in rows}
    sites = sorted({row["site"] for row in rows})
    result: dict[str, Any] = {"held_out_site": held_out_site, "models": models, "labels": {}}
    for source, labels_of in label_sets.items():
        table: dict[str, Any] = {}
        for site in [*sites, ALL_SITES]:
            members = [row for row in rows if site in (ALL_SITES, row["site"])]
            labels = np.array([labels_of[row["slide"]] for row in members])
            patients = [row["patient"] for row in members]
            table[site] = {
                "slides": len(members),
                "patients": len(set(patients)),
                "tumour_slides": int(labels.sum()),
                "auc": {
                    model: _auc(labels, np.array([float(row[model]) for row in members]), patients)
                    for model in models
                },
            }
        result["labels"][source] = table
    return result


def _format(auc: Mapping[str, Any]) -> str:
    if auc["point"] is None:
        return "n/a"
    if auc["lower"] is None or auc["upper"] is None:
        return f"{auc['point']:.3f} (CI n/a)"
    return f"{auc['point']:.3f} ({auc['lower']:.3f}-{auc['upper']:.3f})"


def render_site_section(breakdown: Mapping[str, Any]) -> str:
    """Markdown: one table per label source, sites as columns, models as rows."""
    held_out = breakdown.get("held_out_site")
    lines = [_START, "### Results by site (held-out test set)", ""]
    lines.append(
        "AUC (95 % CI) of each model on the test slides of each site. "
        + (
            f"**{held_out}** is a held-out site: no training or validation patient came from it."
            if held_out
            else "Every site here also contributed training patients."
        )
    )
    for source, table in breakdown["labels"].items():
        sites = list(table)
        headings = [
            f"{site}{' (held out)' if site == held_out else ''}: {info['slides']} slides, "
            f"{info['patients']} patients, {info['tumour_slides']} tumour"
            for site, info in table.items()
        ]
        lines += ["", f"Against the {source}:", ""]
        lines.append("| Model | " + " | ".join(headings) + " |")
        lines.append("|---|" + "|".join("---" for _ in sites) + "|")
        for model in breakdown["models"]:
            cells = [_format(table[site]["auc"][model]) for site in sites]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append(_END)
    return "\n".join(lines) + "\n"


def add_site_breakdown(
    evaluation_dir: Path,
    *,
    true_labels: Mapping[str, int] | None = None,
    held_out_site: str | None = None,
) -> dict[str, Any]:
    """Compute the breakdown from ``test_predictions.csv``, write ``by_site.json`` and the report section."""
    evaluation_dir = Path(evaluation_dir)
    breakdown = site_breakdown(
        evaluation_dir / "test_predictions.csv", true_labels=true_labels, held_out_site=held_out_site
    )
    if not breakdown:
        return {}
    (evaluation_dir / "by_site.json").write_text(json.dumps(breakdown, indent=2) + "\n")
    report_path = evaluation_dir / "report.md"
    if report_path.is_file():
        report = report_path.read_text()
        section = render_site_section(breakdown)
        if _START in report and _END in report:
            before, rest = report.split(_START, 1)
            report = before + section.rstrip("\n") + rest.split(_END, 1)[1]
        elif "\n## Limitations" in report:
            before, after = report.split("\n## Limitations", 1)
            report = before.rstrip("\n") + "\n\n" + section + "\n## Limitations" + after
        else:
            report = report.rstrip("\n") + "\n\n" + section
        report_path.write_text(report)
    return breakdown
