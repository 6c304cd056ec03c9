"""``wsi train`` and ``wsi evaluate`` for subtyping and survival (``tasks.py``): the run protocol of
``training.py`` with a K-class or risk head.

Training, in the order it runs: read the labels (``tasks.read_task_labels``), resolve slide ids, split
patients (held-out test set first, then ``k`` folds, stratified by class or event), write ``splits.csv``
before anything trains; load the development slides' bags only. Per fold: halve the validation patients
(stopping half for early stopping, selection half for the decisions), train the gated-attention MIL with
its task head on the other folds (``tasks.train_task_mil``), and score the validation fold.

- **Subtyping:** the ensemble is the mean of the fold models' class probabilities; the predicted class is
  the most probable one, so nothing is chosen on validation data beyond the epoch.
- **Survival:** a Cox risk has no fixed origin, so each fold model's log-risk is standardised by its mean
  and standard deviation over its own **training** bags; the ensemble risk is the mean of the standardised
  fold risks, a patient's risk the mean over their slides. The cut point between the low- and high-risk
  groups is the **median of out-of-fold risks of the selection-half patients** (each scored by the one fold
  model that did not train on them), never a test-set quantity.

Evaluation (``evaluate_task_run``, called by ``evaluate_run`` for these runs) scores the held-out test
patients once with the same tile rule as the tumour/normal models and writes ``RUN/evaluation/``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from wsitk.shared.hashing import sha256_file
from wsitk.shared.models.labels import LabelsError, SplitPlan, resolve_slide_ids
from wsitk.shared.models.tasks import (
    SUBTYPE,
    SURVIVAL,
    TaskRow,
    build_task_model,
    make_task_splits,
    predict_task,
    read_task_labels,
    split_task_validation,
    train_task_mil,
)
from wsitk.shared.models.training import (
    RUN_FORMAT,
    Progress,
    RunPaths,
    TrainConfig,
    _write_json,
    new_run_record,
)

if TYPE_CHECKING:
    from wsitk.shared.models.bags import Bag

ARCHITECTURE = "gated-attention"
BATCH_SIZE = 16  # bags per optimiser step: the Cox loss compares the bags of a batch
CUT_POINT_RULE = (
    "median of the out-of-fold risks of the selection-half patients (each scored by the fold model that "
    "did not train on them); the test set never chooses it"
)


def patient_means(values: np.ndarray, patients: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``(patients in first-seen order, the mean of each patient's slide values)``."""
    order: dict[str, list[int]] = {}
    for index, patient in enumerate(patients):
        order.setdefault(patient, []).append(index)
    return list(order), np.array([np.mean(values[idx], axis=0) for idx in order.values()])


def task_split_summary(
    rows: Sequence[TaskRow], plan: SplitPlan, task: str, classes: Sequence[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for split in sorted({plan.split_of(r) for r in rows}):
        members = [r for r in rows if plan.split_of(r) == split]
        first = {r.patient: r for r in members}
        entry: dict[str, Any] = {
            "slides": len(members),
            "patients": len(first),
            "sites": len({r.site for r in members if r.site}),
        }
        if task == SUBTYPE:
            entry["patients_per_class"] = {c: sum(r.subtype == c for r in first.values()) for c in classes}
        else:
            entry["events"] = sum(r.event for r in first.values())
        summary[split] = entry
    return summary


def _write_task_splits(path: Path, rows: Sequence[TaskRow], plan: SplitPlan, task: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    outcome = ["subtype"] if task == SUBTYPE else ["time", "event"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "slide_id", "patient", *outcome, "site", "split"])
        for row in sorted(rows, key=lambda r: (plan.split_of(r), r.patient, r.slide)):
            values = [row.subtype] if task == SUBTYPE else [row.time, row.event]
            writer.writerow([row.slide, row.slide_id, row.patient, *values, row.site, plan.split_of(row)])


def train_task_run(
    labels_path: Path,
    out: Path,
    config: TrainConfig,
    task: str,
    *,
    sources: Sequence[tuple[str, str]],
    bag_loader: Callable[[Sequence[str]], Mapping[str, Bag]],
    progress: Progress | None = None,
    command: str = "",
) -> dict[str, Any]:
    """The training protocol for ``task`` (``subtype`` or ``survival``) into ``out``; returns ``run.json``."""
    progress = progress or Progress()
    if tuple(config.architectures) != (ARCHITECTURE,):
        raise LabelsError(f"{task} models are gated-attention MIL only; run with --arch {ARCHITECTURE}")
    paths = RunPaths(Path(out))
    read, classes = read_task_labels(labels_path, task)
    rows: list[TaskRow] = [r for r in resolve_slide_ids(read, sources) if isinstance(r, TaskRow)]
    plan = make_task_splits(
        rows,
        task=task,
        folds=config.folds,
        test_fraction=config.test_fraction,
        seed=config.seed,
        site_preserving=config.site_preserving,
    )
    identity = {"format": RUN_FORMAT, "labels_sha256": sha256_file(labels_path), "config": asdict(config)}
    identity["task"] = task
    if paths.run_json.is_file():
        previous = json.loads(paths.run_json.read_text())
        if {k: previous.get(k) for k in identity} != json.loads(json.dumps(identity)):
            raise LabelsError(
                f"{paths.root} holds a training run with another labels file, task or configuration; "
                "train into a new directory (or delete it)"
            )
        progress.say(f"[train] resuming the run in {paths.root}")
    _write_task_splits(paths.splits_csv, rows, plan, task)
    summary = task_split_summary(rows, plan, task, classes)
    for split, counts in summary.items():
        per_class = counts.get("patients_per_class")
        detail = (
            ", ".join(f"{c} {n}" for c, n in per_class.items())
            if per_class
            else f"{counts['events']} with an event"
        )
        progress.say(
            f"[train] {split:7s} {counts['patients']:3d} patients {counts['slides']:3d} slides ({detail})"
        )
    development = plan.development_rows(rows)
    bags = bag_loader([r.slide_id for r in development])
    record = new_run_record(identity, command, labels_path, rows, plan, summary, bags)
    record["classes"] = classes
    in_dim = int(record["in_dim"])
    _write_json(paths.run_json, record)
    folds = [plan.fold_rows(rows, k) for k in range(config.folds)]
    record["models"][ARCHITECTURE] = _train_folds(task, classes, folds, bags, config, paths, progress, in_dim)
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(paths.run_json, record)
    progress.say(
        f"[train] done: {paths.run_json}; evaluate on the held-out test set with `wsi evaluate {paths.root}`"
    )
    return record


def _fit_fold(
    task: str,
    n_classes: int,
    k: int,
    train_rows: Sequence[TaskRow],
    stop_rows: Sequence[TaskRow],
    bags: Mapping[str, Bag],
    config: TrainConfig,
    fold_dir: Path,
    progress: Progress,
) -> tuple[Any, dict[str, Any]]:
    """Train fold ``k``'s model, save ``model.pt`` and ``fold.json``; returns the model and the fold info."""
    import torch

    started = time.monotonic()
    prefix = f"[train] {task} fold {k + 1}"
    name = "macro AUC" if task == SUBTYPE else "C-index"

    def report(record: Any) -> None:
        if record.epoch % 10 == 0:
            metric = "n/a" if record.val_auc is None else f"{record.val_auc:.3f}"
            progress.say(
                f"{prefix} epoch {record.epoch} train loss {record.train_loss:.4f} val {name} {metric}"
            )

    trained = train_task_mil(
        [bags[r.slide_id].features for r in train_rows],
        [r.label for r in train_rows],
        task=task,
        times=[r.time for r in train_rows],
        n_classes=n_classes,
        epochs=config.epochs,
        lr=config.learning_rate,
        seed=config.seed * 1000 + k,
        batch_size=BATCH_SIZE,
        val_bags=[bags[r.slide_id].features for r in stop_rows],
        val_labels=[r.label for r in stop_rows],
        val_times=[r.time for r in stop_rows],
        max_tiles_per_bag=config.max_tiles_per_bag,
        weight_decay=config.weight_decay,
        patience=config.patience,
        class_weighting=config.class_weighting,
        on_epoch=report,
    )
    model = trained.model
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), fold_dir / "model.pt")
    info = {
        "hyper": {
            key: value
            for key, value in model.architecture().items()
            if key not in ("name", "in_dim", "n_classes")
        },
        "best_epoch": trained.best_epoch,
        "epochs_run": len(trained.history),
        "stopped_early": trained.stopped_early,
        "history": [asdict(h) for h in trained.history],
        "seconds": round(time.monotonic() - started, 1),
    }
    _write_json(fold_dir / "fold.json", info)
    return model, info


def _train_folds(
    task: str,
    classes: Sequence[str],
    folds: Sequence[Sequence[TaskRow]],
    bags: Mapping[str, Bag],
    config: TrainConfig,
    paths: RunPaths,
    progress: Progress,
    in_dim: int,
) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"hyper": {}, "folds": []}
    oof_rows: list[TaskRow] = []
    oof_values: list[Any] = []
    for k, val_rows in enumerate(folds):
        fold_dir = paths.fold_dir(ARCHITECTURE, k)
        train_rows = [r for j, f in enumerate(folds) if j != k for r in f]
        stop_rows, select_rows, shared = split_task_validation(val_rows, config.seed * 1000 + k, task)
        prefix = f"[train] {task} fold {k + 1}/{len(folds)}"
        train_bags = [bags[r.slide_id].features for r in train_rows]
        if (fold_dir / "fold.json").is_file() and (fold_dir / "model.pt").is_file():
            info = json.loads((fold_dir / "fold.json").read_text())
            model = build_task_model(task, in_dim, len(classes), **info["hyper"])
            model.load_state_dict(torch.load(fold_dir / "model.pt", weights_only=True))
            progress.say(f"{prefix}: already trained (resumed run)")
        else:
            progress.say(
                f"{prefix}: {len(train_rows)} training slides, {len(stop_rows)} for early stopping, "
                f"{len(select_rows)} for selection" + (" (too few patients: shared)" if shared else "")
            )
            model, info = _fit_fold(
                task, len(classes), k, train_rows, stop_rows, bags, config, fold_dir, progress
            )
        fold: dict[str, Any] = {
            "fold": k,
            "train_slides": len(train_rows),
            "val_slides": len(val_rows),
            "stop_slides": len(stop_rows),
            "select_slides": len(select_rows),
            "selection_shared": shared,
            **{key: info[key] for key in ("best_epoch", "epochs_run", "stopped_early", "seconds")},
        }
        select_out = predict_task(model, [bags[r.slide_id].features for r in select_rows], task)
        if task == SURVIVAL:
            train_risk = predict_task(model, train_bags, task)
            mean, scale = float(train_risk.mean()), float(max(train_risk.std(), 1e-6))
            fold["standardisation"] = [mean, scale]
            select_out = (select_out - mean) / scale
        oof_rows += select_rows
        oof_values += list(select_out)
        fold["selection_metric"] = _oof_metric(task, select_rows, np.asarray(select_out))
        result["folds"].append(fold)
        result["hyper"] = info["hyper"]
        metric = fold["selection_metric"]
        progress.say(
            f"{prefix}: best epoch {info['best_epoch']} of {info['epochs_run']}, selection-half "
            + ("macro AUC" if task == SUBTYPE else "C-index")
            + (f" {metric:.3f}" if metric is not None else " n/a")
        )
    values = np.asarray(oof_values)
    result["oof_metric"] = _oof_metric(task, oof_rows, values)
    if task == SURVIVAL:
        _, risks = patient_means(values, [r.patient for r in oof_rows])
        result["cut_point"] = float(np.median(risks))
        result["cut_point_from"] = CUT_POINT_RULE
        result["oof_patients"] = len(risks)
    progress.say(
        f"[train] {task}: out-of-fold (selection halves) "
        + ("macro AUC" if task == SUBTYPE else "C-index")
        + (f" {result['oof_metric']:.3f}" if result["oof_metric"] is not None else " n/a")
        + (f", risk cut point {result['cut_point']:.3f}" if task == SURVIVAL else "")
    )
    return result


def _oof_metric(task: str, rows: Sequence[TaskRow], values: np.ndarray) -> float | None:
    """Macro AUC of slides (subtyping) or C-index of patients (survival); None when undefined."""
    import math

    if not len(rows):
        return None
    if task == SUBTYPE:
        from wsitk.shared.models.subtyping import macro_auc

        value = macro_auc([r.label for r in rows], values)
    else:
        from wsitk.shared.models.survival import concordance_index

        patients, risks = patient_means(values, [r.patient for r in rows])
        first = {r.patient: r for r in rows}
        value = concordance_index(
            [first[p].time for p in patients], [first[p].event for p in patients], risks
        )
    return None if math.isnan(value) else float(value)


def load_task_models(paths: RunPaths, run: Mapping[str, Any]) -> list[Any]:
    import torch

    models = []
    for fold in run["models"][ARCHITECTURE]["folds"]:
        fold_dir = paths.fold_dir(ARCHITECTURE, fold["fold"])
        info = json.loads((fold_dir / "fold.json").read_text())
        model = build_task_model(run["task"], int(run["in_dim"]), len(run["classes"]), **info["hyper"])
        model.load_state_dict(torch.load(fold_dir / "model.pt", weights_only=True))
        models.append(model.eval())
    return models
