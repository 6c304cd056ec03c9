"""``wsi evaluate RUN`` for subtyping and survival runs: the held-out test patients, scored once.

Every fold model and the fold ensemble of the run are scored on the test slides, with the mil-scorer's tile
rule (``tile_rule.py``) as for tumour/normal. Writes ``RUN/evaluation/``: ``report.md``, ``metrics.json``,
``test_predictions.csv`` and the figures.

- **Subtyping:** per class one-vs-rest AUC (clustered DeLong), sensitivity, specificity, precision; macro
  AUC, balanced accuracy and accuracy with a patient bootstrap stratified by class (``subtyping.py``); the
  confusion matrix; ``roc.png`` with one one-vs-rest ROC curve per class of the ensemble.
- **Survival** (per patient: the mean of their slides' risks): Harrell's C-index with a patient bootstrap
  stratified by event; the test patients split at the cut point the training run chose on out-of-fold
  validation risks into a low- and a high-risk group, their Kaplan-Meier curves (``km.png``) and the
  log-rank test (``survival.py``).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from wsitk.shared.models.labels import LabelsError, SplitPlan
from wsitk.shared.models.task_run import ARCHITECTURE, CUT_POINT_RULE, load_task_models, patient_means
from wsitk.shared.models.tasks import SUBTYPE, TaskRow, predict_task
from wsitk.shared.models.tile_rule import DEFAULT_MAX_TILES, dropped_tiles, tiles_to_score
from wsitk.shared.models.tile_rule import RULE as TILE_RULE
from wsitk.shared.models.training import RunPaths

if TYPE_CHECKING:
    from wsitk.shared.models.bags import Bag
    from wsitk.shared.models.intervals import MetricEstimate

ENSEMBLE = f"{ARCHITECTURE} ensemble"
LIMITATIONS = (
    "Numbers from a generated cohort describe the method and the code, not clinical performance. The "
    "intervals resample test patients, not the training process (seeds, folds)."
)


def evaluate_task_run(
    root: Path,
    run: Mapping[str, Any],
    *,
    bag_loader: Callable[[Sequence[str]], Mapping[str, Bag]],
    n_bootstrap: int = 2000,
    seed: int = 0,
    progress: Callable[[str], object] = print,
    command: str = "",
    max_tiles_per_slide: int = DEFAULT_MAX_TILES,
) -> dict[str, Any]:
    paths = RunPaths(Path(root))
    task = str(run["task"])
    rows = [TaskRow(**r) for r in run["rows"]]
    plan = SplitPlan.from_dict(run["split"])
    test_rows = plan.test_rows(rows)
    if not test_rows:
        raise LabelsError("the run has no held-out test patients (test fraction 0); nothing to evaluate")
    progress(
        f"[evaluate] {task}: {len({r.patient for r in test_rows})} test patients, {len(test_rows)} slides"
    )
    bags = bag_loader([r.slide_id for r in test_rows])
    keys = ("target_mpp", "tile_size", "stain_method")
    if odd := [
        r.slide for r in test_rows if any(bags[r.slide_id].profile.get(k) != run["profile"][k] for k in keys)
    ]:
        raise LabelsError(f"test slides {odd[:5]} were tiled with another profile than the training slides")
    kept = [tiles_to_score(bags[r.slide_id].coords, max_tiles_per_slide) for r in test_rows]
    features = [bags[r.slide_id].float32()[keep] for r, keep in zip(test_rows, kept, strict=True)]
    dropped = dropped_tiles([len(bags[r.slide_id].features) for r in test_rows], max_tiles_per_slide)
    members = load_task_models(paths, run)
    model_info = run["models"][ARCHITECTURE]
    outputs: dict[str, np.ndarray] = {}
    for fold, member in zip(model_info["folds"], members, strict=True):
        raw = predict_task(member, features, task)
        if task != SUBTYPE:
            mean, scale = fold["standardisation"]
            raw = (raw - mean) / scale
        outputs[f"{ARCHITECTURE} fold {fold['fold'] + 1}"] = raw
    outputs = {ENSEMBLE: np.mean(list(outputs.values()), axis=0), **outputs}
    out = paths.evaluation
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "run": paths.root.name,
        "task": task,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "scoring_rule": {"rule": TILE_RULE, **dropped.to_dict()},
    }
    lines = _header(paths, run, test_rows, command, dropped.describe())
    if task == SUBTYPE:
        lines += _subtyping(run, test_rows, outputs, metrics, out, n_bootstrap, seed, progress)
    else:
        lines += _survival(run, test_rows, outputs, metrics, out, n_bootstrap, seed, progress)
    lines += ["", "## Limitations", "", LIMITATIONS]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_predictions(out / "test_predictions.csv", test_rows, kept, outputs, run)
    progress(f"[evaluate] report: {out / 'report.md'}")
    return metrics


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _header(
    paths: RunPaths, run: Mapping[str, Any], test_rows: Sequence[TaskRow], command: str, scoring: str
) -> list[str]:
    config = run["config"]
    summary = run["split_summary"]
    task = run["task"]
    what = "patients per class" if task == SUBTYPE else "patients with an event"
    split_rows = []
    for split, entry in summary.items():
        per_class = entry.get("patients_per_class")
        detail = ", ".join(f"{c} {n}" for c, n in per_class.items()) if per_class else entry.get("events")
        split_rows.append([split, entry["patients"], entry["slides"], detail])
    head = (
        "K-class gated-attention MIL, softmax cross-entropy weighted by inverse class frequency"
        if task == SUBTYPE
        else "gated-attention MIL with a risk head, Cox partial likelihood (Breslow ties) over mini-batches of "
        "16 bags"
    )
    return [
        f"# {task.capitalize()} evaluation: {paths.root.name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        + "".join(f"; `{c}`" for c in (run.get("command", ""), command) if c)
        + ".",
        "",
        "## Methods",
        "",
        f"Model: {head}; {config['folds']} folds of patients (stratified by "
        + ("class" if task == SUBTYPE else "event")
        + f"), {config['test_fraction']:.0%} of patients held out for testing, at most {config['epochs']} epochs "
        f"with early stopping (patience {config['patience']}) on the stopping half of each validation fold, "
        f"learning rate {config['learning_rate']}, seeds `seed*1000 + fold` from seed {config['seed']}. The "
        "ensemble is the mean of the fold models"
        + (
            "' class probabilities; the predicted class is the most probable one."
            if task == SUBTYPE
            else "' log-risks, each standardised by its mean and SD over its own training bags; a patient's "
            f"risk is the mean over their slides. Risk groups: cut point = {CUT_POINT_RULE}."
        ),
        "",
        f"Tiles scored per slide: {TILE_RULE}, as the mil-scorer; {scoring}.",
        "",
        *_table(["split", "patients", "slides", what], split_rows),
        "",
    ]


def _fmt(estimate: MetricEstimate) -> str:
    return estimate.format()


def _subtyping(
    run: Mapping[str, Any],
    test_rows: Sequence[TaskRow],
    outputs: Mapping[str, np.ndarray],
    metrics: dict[str, Any],
    out: Path,
    n_bootstrap: int,
    seed: int,
    progress: Callable[[str], object],
) -> list[str]:
    from wsitk.shared.models.plots import plot_roc
    from wsitk.shared.models.subtyping import evaluate_subtyping

    classes = list(run["classes"])
    labels = np.array([r.label for r in test_rows])
    patients = [r.patient for r in test_rows]
    evaluations = [
        evaluate_subtyping(labels, probs, patients, classes, n_bootstrap=n_bootstrap, seed=seed, name=name)
        for name, probs in outputs.items()
    ]
    # patient level: a patient's class probabilities are the mean over their slides
    patient_ids, patient_probs = patient_means(outputs[ENSEMBLE], patients)
    first = {r.patient: r.label for r in test_rows}
    per_patient = evaluate_subtyping(
        [first[p] for p in patient_ids],
        patient_probs,
        patient_ids,
        classes,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    metrics["classes"] = classes
    metrics["models"] = {e.name: e.to_dict() for e in evaluations}
    metrics["patient_level"] = {ENSEMBLE: per_patient.to_dict()}
    overall = ("macro_auc", "balanced_accuracy", "accuracy")
    lines = ["## Results (held-out test set, slides; 95 % intervals)", ""]
    lines += _table(
        ["model", "macro AUC", "balanced accuracy", "accuracy"],
        [[e.name, *(_fmt(e.overall[k]) for k in overall)] for e in evaluations]
        + [[f"{ENSEMBLE}, per patient (mean of slides)", *(_fmt(per_patient.overall[k]) for k in overall)]],
    )
    ensemble = evaluations[0]
    lines += ["", f"### Per class ({ENSEMBLE}, one-vs-rest)", ""]
    lines += _table(
        ["class", "test slides", "AUC", "sensitivity (recall)", "specificity", "precision"],
        [
            [
                c,
                ensemble.class_slides[c],
                *(_fmt(ensemble.per_class[c][k]) for k in ("auc", "sensitivity", "specificity", "precision")),
            ]
            for c in classes
        ],
    )
    lines += ["", f"### Confusion matrix ({ENSEMBLE}; rows true, columns predicted)", ""]
    lines += _table(
        ["true \\ predicted", *classes],
        [[c, *row] for c, row in zip(classes, ensemble.confusion, strict=True)],
    )
    lines += [
        "",
        "Intervals: per-class AUC clustered DeLong (patients as clusters; the exact bound on a perfect "
        "split); per-class sensitivity, specificity and precision Wilson on the patient-effective count; "
        f"macro AUC, balanced accuracy and accuracy the percentile interval of {n_bootstrap} patient "
        "bootstrap resamples stratified by class.",
    ]
    probs = outputs[ENSEMBLE]
    plot_roc(
        {c: (labels == i, probs[:, i]) for i, c in enumerate(classes)},
        out / "roc.png",
        title=f"One-vs-rest ROC, {ENSEMBLE}, held-out test set",
    )
    lines += ["", f"![One-vs-rest ROC curves ({ENSEMBLE})](roc.png)"]
    progress(
        f"[evaluate] {ENSEMBLE}: macro AUC {_fmt(ensemble.overall['macro_auc'])}  balanced accuracy "
        f"{_fmt(ensemble.overall['balanced_accuracy'])}"
    )
    return lines


def _survival(
    run: Mapping[str, Any],
    test_rows: Sequence[TaskRow],
    outputs: Mapping[str, np.ndarray],
    metrics: dict[str, Any],
    out: Path,
    n_bootstrap: int,
    seed: int,
    progress: Callable[[str], object],
) -> list[str]:
    from wsitk.shared.models.survival import concordance_interval, logrank_test, plot_kaplan_meier

    first = {r.patient: r for r in test_rows}
    slide_patients = [r.patient for r in test_rows]
    table, models = [], {}
    for name, values in outputs.items():
        patients, risks = patient_means(values, slide_patients)
        times = np.array([first[p].time for p in patients])
        events = np.array([first[p].event for p in patients])
        c_index = concordance_interval(times, events, risks, n_resamples=n_bootstrap, seed=seed)
        models[name] = {"c_index": c_index.to_dict(), "patients": len(patients), "events": int(events.sum())}
        table.append([name, len(patients), int(events.sum()), _fmt(c_index)])
        if name == ENSEMBLE:
            ensemble = (patients, times, events, risks, c_index)
    patients, times, events, risks, c_index = ensemble
    cut = float(run["models"][ARCHITECTURE]["cut_point"])
    high = (risks > cut).astype(int)
    groups = {"low risk": high == 0, "high risk": high == 1}
    logrank = logrank_test(times, events, high) if 0 < high.sum() < len(high) else None
    models[ENSEMBLE]["risk_groups"] = {
        "cut_point": cut,
        "cut_point_from": CUT_POINT_RULE,
        "high_risk_patients": int(high.sum()),
        "low_risk_patients": int(len(high) - high.sum()),
        "logrank": None if logrank is None else logrank.to_dict(),
    }
    metrics["models"] = models
    p_text = "n/a (one group empty)" if logrank is None else f"{logrank.p_value:.2g}"
    plot_kaplan_meier(
        {name: (times[mask], events[mask]) for name, mask in groups.items() if mask.any()},
        out / "km.png",
        title=f"Kaplan-Meier by predicted risk group, {ENSEMBLE}",
        note=f"log-rank p = {p_text}",
    )
    lines = ["## Results (held-out test set, patients; 95 % intervals)", ""]
    lines += _table(["model", "patients", "events", "C-index"], table)
    lines += ["", f"### Risk groups ({ENSEMBLE}, cut point {cut:.3f} from validation)", ""]
    rows = []
    for index, (name, mask) in enumerate(groups.items()):
        observed = "" if logrank is None else f"{logrank.observed[index]:.0f}"
        expected = "" if logrank is None else f"{logrank.expected[index]:.1f}"
        rows.append([name, int(mask.sum()), int(events[mask].sum()), observed, expected])
    lines += _table(["group", "patients", "events", "observed", "expected (log-rank)"], rows)
    statistic = "n/a" if logrank is None else f"{logrank.statistic:.2f}"
    lines += [
        "",
        f"Log-rank chi-square {statistic} (1 df), p = {p_text}. C-index interval: percentile interval of "
        f"{n_bootstrap} patient bootstrap resamples stratified by event.",
        "",
        f"![Kaplan-Meier curves of the predicted risk groups ({ENSEMBLE})](km.png)",
    ]
    progress(f"[evaluate] {ENSEMBLE}: C-index {_fmt(c_index)}  log-rank p {p_text}")
    return lines


def _write_predictions(
    path: Path,
    test_rows: Sequence[TaskRow],
    kept: Sequence[np.ndarray],
    outputs: Mapping[str, np.ndarray],
    run: Mapping[str, Any],
) -> None:
    subtype = run["task"] == SUBTYPE
    columns: list[str] = []
    for name in outputs:
        columns += [f"{name} P({c})" for c in run["classes"]] if subtype else [f"{name} risk"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        outcome = ["subtype"] if subtype else ["time", "event"]
        writer.writerow(["slide", "slide_id", "patient", "site", *outcome, "tiles_scored", *columns])
        for i, row in enumerate(test_rows):
            values = [f"{v:.6f}" for name in outputs for v in np.atleast_1d(outputs[name][i])]
            truth = [row.subtype] if subtype else [row.time, row.event]
            writer.writerow([row.slide, row.slide_id, row.patient, row.site, *truth, len(kept[i]), *values])
