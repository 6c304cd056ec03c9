"""``wsi train``: slide-level MIL models from a labels file and the embeddings the pipeline stored.

The protocol, in the order it runs:

1. Read the labels file (``labels.py``), resolve every row to a pipeline slide id, split patients into a
   held-out **test** set and ``k`` stratified folds (optionally site-preserving). The split is written to
   ``splits.csv`` before anything trains, and the test slides' embeddings are not even loaded here.
2. For each aggregator (``gated-attention`` by default; ``clam-sb``, ``dsmil``, ``transmil`` by name) and
   each fold: the fold's validation patients are split in two by patient, stratified by patient label
   (``split_validation``): a **stopping** half for early stopping and a **selection** half for the
   threshold and the calibration, so no decision is taken on the data that chose the epoch. Train on the
   other folds with class-weighted loss, bag sub-sampling, a fixed seed, early stopping on the stopping
   half's loss, a checkpoint after every epoch (an interrupted run resumes where it stopped); then fit the
   fold model's Platt calibration (``fit_platt``) and choose its threshold on the selection half.
3. The fold models form an ensemble (mean of the members' **calibrated** probabilities, mean attention),
   exported to ONNX and checked against torch. Its threshold is chosen on calibrated out-of-fold
   probabilities (every selection-half slide scored by the one calibrated fold model that did not train on
   it): probabilities of the same kind as the ensemble's output, rather than raw single-model scores
   applied to a mean of several models.
4. The baseline (mean-pooled embeddings + L2 logistic regression) goes through the same folds, halves,
   calibration and threshold rule.

``wsi evaluate RUN`` then scores the held-out test set once (``evaluate_run.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from wsitk.shared.hashing import sha256_file
from wsitk.shared.models.labels import (
    LabelRow,
    LabelsError,
    SplitPlan,
    make_splits,
    read_labels,
    resolve_slide_ids,
    split_summary,
)

if TYPE_CHECKING:
    from wsitk.shared.models.bags import Bag

OOD_TILES_PER_SLIDE = 2000  # tiles per slide in the out-of-distribution summary (a D x D update each)
RUN_FORMAT = 2  # 2: validation folds split into stopping and selection halves; calibrated ensembles
ENSEMBLE_THRESHOLD_RULE = (
    "best balanced accuracy on calibrated out-of-fold validation predictions (selection halves of the "
    "validation folds; early stopping used the other halves)"
)
ARCHITECTURES = ("gated-attention", "clam-sb", "dsmil", "transmil")


@dataclass(frozen=True)
class TrainConfig:
    architectures: tuple[str, ...] = ("gated-attention",)
    folds: int = 5
    test_fraction: float = 0.25
    site_preserving: bool = False
    seed: int = 0
    epochs: int = 40
    patience: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    max_tiles_per_bag: int = 512
    class_weighting: bool = True
    baseline_l2: float = 1.0
    backbone_id: str = ""

    def __post_init__(self) -> None:
        unknown = [a for a in self.architectures if a not in ARCHITECTURES]
        if unknown or not self.architectures:
            raise LabelsError(f"unknown architecture(s) {unknown}; choose from {list(ARCHITECTURES)}")
        if self.epochs < 1 or self.patience < 1 or self.max_tiles_per_bag < 1:
            raise LabelsError("epochs, patience and max tiles per bag must be positive")


@dataclass
class RunPaths:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def splits_csv(self) -> Path:
        return self.root / "splits.csv"

    @property
    def bags(self) -> Path:
        return self.root / "bags"

    def fold_dir(self, architecture: str, fold: int) -> Path:
        return self.root / "models" / architecture / f"fold-{fold}"

    def ensemble_onnx(self, architecture: str) -> Path:
        return self.root / "models" / architecture / "ensemble.onnx"

    def baseline_json(self) -> Path:
        return self.root / "models" / "baseline" / "folds.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"


@dataclass
class FoldResult:
    fold: int
    train_slides: int
    val_slides: int
    val_auc: float | None
    threshold: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    stop_slides: int = 0
    select_slides: int = 0
    selection_shared: bool = False
    calibration: tuple[float, float] = (1.0, 0.0)


@dataclass
class ArchitectureResult:
    architecture: str
    hyper: dict[str, Any]
    folds: list[FoldResult] = field(default_factory=list)
    oof_auc: float | None = None
    ensemble_threshold: float = 0.5
    model_version: str = ""
    onnx: str = ""
    export_check: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Training progress on the terminal: one rewritten line per epoch on a TTY, else a line every few
    epochs and one per fold (so logs of unattended runs stay readable)."""

    def __init__(self, stream: Any = None, every: int = 10) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def epoch(self, prefix: str, record: Any, total: int) -> None:
        line = (
            f"{prefix} epoch {record.epoch:3d}/{total} train loss {record.train_loss:.4f}"
            + (f"  val loss {record.val_loss:.4f}" if record.val_loss is not None else "")
            + (f"  val AUC {record.val_auc:.3f}" if record.val_auc is not None else "")
            + f"  [{time.monotonic() - self.started:6.0f} s]"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif record.epoch % self.every == 0:
            self.stream.write(line + "\n")
            self.stream.flush()


def _run_tag(root: Path) -> str:
    tag = re.sub(r"[^a-z0-9]+", "-", root.resolve().name.lower()).strip("-")
    return tag[:24] or "run"


def write_splits_csv(path: Path, rows: Sequence[LabelRow], plan: SplitPlan) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "slide_id", "patient", "label", "site", "split"])
        for row in sorted(rows, key=lambda r: (plan.split_of(r), r.patient, r.slide)):
            writer.writerow([row.slide, row.slide_id, row.patient, row.label, row.site, plan.split_of(row)])


def read_run(root: Path) -> dict[str, Any]:
    path = RunPaths(Path(root)).run_json
    if not path.is_file():
        raise LabelsError(f"{root} holds no training run (no run.json); train one with `wsi train`")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def run_rows(run: Mapping[str, Any]) -> tuple[list[LabelRow], SplitPlan]:
    rows = [LabelRow(**r) for r in run["rows"]]
    return rows, SplitPlan.from_dict(run["split"])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)


def _check_profiles(bags: Mapping[str, Bag]) -> dict[str, Any]:
    """Every training slide must come from one backbone and one tiling profile (MPP, tile size, stain)."""
    keys = ("target_mpp", "tile_size", "stain_method")
    seen = {tuple(b.profile.get(k) for k in keys) for b in bags.values()}
    if len(seen) > 1:
        raise LabelsError(
            f"the labelled slides were tiled with different profiles {sorted(seen)} (target_mpp, tile_size, "
            "stain_method); a model is trained on one profile: re-process them under one profile"
        )
    first = next(iter(bags.values()))
    return {"backbone_id": first.backbone_id, **{k: first.profile.get(k) for k in keys}}


def train_run(
    labels_path: Path,
    out: Path,
    config: TrainConfig,
    *,
    sources: Sequence[tuple[str, str]],
    bag_loader: Callable[[Sequence[str]], Mapping[str, Bag]],
    progress: Progress | None = None,
    command: str = "",
    task: str | None = None,
) -> dict[str, Any]:
    """Run the whole training protocol into ``out``; returns the run record (also ``out/run.json``).

    ``sources`` are the pipeline's ``(slide_id, upload_key)`` pairs; ``bag_loader`` fetches bags for slide
    ids (``load_bags`` against the pipeline's stores, or anything else in tests). It is only ever asked for
    development (non-test) slides. ``task`` (``binary``, ``subtype``, ``survival``; inferred from the
    labels file's columns when None) sends subtyping and survival to ``task_run.train_task_run``.
    """
    from wsitk.shared.models.tasks import BINARY, detect_task

    if (chosen := detect_task(labels_path, task)) != BINARY:
        from wsitk.shared.models.task_run import train_task_run

        return train_task_run(
            labels_path,
            out,
            config,
            chosen,
            sources=sources,
            bag_loader=bag_loader,
            progress=progress,
            command=command,
        )
    progress = progress or Progress()
    paths = RunPaths(Path(out))
    rows = resolve_slide_ids(read_labels(labels_path), sources)
    plan = make_splits(
        rows,
        folds=config.folds,
        test_fraction=config.test_fraction,
        seed=config.seed,
        site_preserving=config.site_preserving,
    )
    identity = {
        "format": RUN_FORMAT,
        "labels_sha256": sha256_file(labels_path),
        "config": asdict(config),
    }
    if paths.run_json.is_file():
        previous = json.loads(paths.run_json.read_text())
        if {k: previous.get(k) for k in identity} != json.loads(json.dumps(identity)):
            raise LabelsError(
                f"{paths.root} holds a training run with another labels file or configuration; "
                "train into a new directory (or delete it)"
            )
        progress.say(f"[train] resuming the run in {paths.root}")
    write_splits_csv(paths.splits_csv, rows, plan)
    summary = split_summary(rows, plan)
    for split, counts in summary.items():
        progress.say(
            f"[train] {split:7s} {counts['patients']:3d} patients {counts['slides']:3d} slides "
            f"({counts['tumour_slides']} tumour)"
        )
    development = plan.development_rows(rows)
    bags = bag_loader([r.slide_id for r in development])
    record = new_run_record(identity, command, labels_path, rows, plan, summary, bags)
    in_dim = int(record["in_dim"])
    expected_profile = record["profile"]
    record["cohort"]["tumour_slides"] = sum(r.label for r in rows)
    record["cohort"]["tiles_per_slide"] = _tile_stats([bags[r.slide_id] for r in development])
    _write_json(paths.run_json, record)

    folds = [plan.fold_rows(rows, k) for k in range(config.folds)]
    ood = _fit_ood_reference(folds, bags, config)
    record["ood"] = {
        "training_tiles": ood.training_tiles,
        "calibration_slides": len(ood.reference_scores),
        "limit": ood.limit,
    }
    progress.say(
        f"[train] out-of-distribution summary of {ood.training_tiles} training tiles, calibrated on "
        f"{len(ood.reference_scores)} validation slides: limit {ood.limit:.2f}"
    )
    for architecture in config.architectures:
        result = _train_architecture(architecture, folds, bags, config, paths, progress, in_dim)
        _export_ensemble(
            architecture, result, config, paths, expected_profile, in_dim, record, progress, ood.to_dict()
        )
        record["models"][architecture] = asdict(result)
        _write_json(paths.run_json, record)

    progress.say("[train] baseline: mean-pooled embeddings + L2 logistic regression, same folds")
    record["baseline"] = _train_baseline(folds, development, bags, config, paths)
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(paths.run_json, record)
    progress.say(
        f"[train] done: {paths.run_json}; evaluate on the held-out test set with `wsi evaluate {paths.root}`"
    )
    return record


def new_run_record(
    identity: Mapping[str, Any],
    command: str,
    labels_path: Path,
    rows: Sequence[Any],
    plan: SplitPlan,
    summary: Mapping[str, Any],
    bags: Mapping[str, Bag],
) -> dict[str, Any]:
    """The start of ``run.json`` for every task: identity, command, rows, split, the development bags'
    profile and feature dimension, the cohort's size; ``models`` empty until trained."""
    return {
        **identity,
        "command": command,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "labels_file": Path(labels_path).name,
        "rows": [asdict(r) for r in rows],
        "split": plan.to_dict(),
        "split_summary": summary,
        "profile": _check_profiles(bags),
        "in_dim": int(next(iter(bags.values())).features.shape[1]),
        "cohort": {
            "slides": len(rows),
            "patients": len({r.patient for r in rows}),
            "sites": sorted({r.site for r in rows if r.site}),
        },
        "models": {},
    }


def _train_baseline(
    folds: Sequence[Sequence[LabelRow]],
    development: Sequence[LabelRow],
    bags: Mapping[str, Bag],
    config: TrainConfig,
    paths: RunPaths,
) -> dict[str, Any]:
    """The mean-pool + logistic-regression baseline through the same folds, halves, calibration and
    threshold rule; writes its fold models and returns the summary for ``run.json``."""
    from wsitk.shared.models.evaluation import fit_logistic_baseline
    from wsitk.shared.models.mil import binary_auc, choose_threshold

    baseline_folds = []
    oof: dict[str, float] = {}
    oof_calibrated: dict[str, tuple[int, float]] = {}
    for k, val_rows in enumerate(folds):
        train_rows = [r for j, f in enumerate(folds) if j != k for r in f]
        _, select_rows, shared = split_validation(val_rows, config.seed * 1000 + k)
        model = fit_logistic_baseline(
            [bags[r.slide_id].features for r in train_rows],
            [r.label for r in train_rows],
            l2=config.baseline_l2,
            class_weighting=config.class_weighting,
        )
        val_probs = model.predict([bags[r.slide_id].features for r in val_rows])
        val_labels = [r.label for r in val_rows]
        for row, p in zip(val_rows, val_probs, strict=True):
            oof[row.slide_id] = float(p)
        select_labels = [r.label for r in select_rows]
        select_probs = np.array([oof[r.slide_id] for r in select_rows])
        calibration = fit_platt(_logit(select_probs), select_labels)
        for row, p in zip(select_rows, _calibrated(select_probs, calibration), strict=True):
            oof_calibrated[row.slide_id] = (row.label, float(p))
        baseline_folds.append(
            {
                "fold": k,
                "model": model.to_dict(),
                "threshold": choose_threshold(select_labels, select_probs),
                "calibration": list(calibration),
                "val_auc": _auc_or_none(binary_auc, val_labels, val_probs),
                "val_slides": len(val_rows),
                "select_slides": len(select_rows),
                "selection_shared": shared,
            }
        )
    dev_labels = [r.label for r in development]
    dev_oof = [oof[r.slide_id] for r in development]
    baseline = {
        "folds": baseline_folds,
        "oof_auc": _auc_or_none(binary_auc, dev_labels, dev_oof),
        "ensemble_threshold": choose_threshold(
            [label for label, _ in oof_calibrated.values()], [p for _, p in oof_calibrated.values()]
        ),
        "ensemble_threshold_from": ENSEMBLE_THRESHOLD_RULE,
        "l2": config.baseline_l2,
    }
    _write_json(paths.baseline_json(), baseline)
    return {k: v for k, v in baseline.items() if k != "folds"} | {
        "folds": [{k: v for k, v in f.items() if k != "model"} for f in baseline_folds]
    }


def split_validation(rows: Sequence[LabelRow], seed: int) -> tuple[list[LabelRow], list[LabelRow], bool]:
    """``(stopping rows, selection rows, shared)``: a validation fold's patients split in two, by patient
    and stratified by patient label (positive when any slide is), from ``seed``. Within each class the
    shuffled patients alternate between the halves, the selection half first (it needs both classes for a
    threshold). When the fold is too small for that (no patient left for stopping, or a selection half
    without both slide classes), both halves are the whole fold and ``shared`` is True, which the run
    records."""
    by_patient: dict[str, list[LabelRow]] = {}
    for row in rows:
        by_patient.setdefault(row.patient, []).append(row)
    rng = np.random.default_rng(seed)
    stop: list[LabelRow] = []
    select: list[LabelRow] = []
    for label in (1, 0):
        patients = sorted(p for p, members in by_patient.items() if max(r.label for r in members) == label)
        for position, index in enumerate(rng.permutation(len(patients))):
            (select if position % 2 == 0 else stop).extend(by_patient[patients[int(index)]])
    if not stop or len({r.label for r in select}) < 2:
        return list(rows), list(rows), True
    return stop, select, False


def _logit(probabilities: Any) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    return np.asarray(np.log(p) - np.log1p(-p), dtype=np.float64)


def fit_platt(
    logits: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *, l2: float = 1.0
) -> tuple[float, float]:
    """Platt scaling ``P = sigmoid(scale * logit + shift)`` fitted by Newton's method on held-out scores.

    The penalty ``l2 / 2 * ((scale - 1)^2 + shift^2)`` pulls towards the identity, so a handful of cleanly
    separated validation slides gives a finite, modest sharpening instead of an infinite scale.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.shape != y.shape or z.ndim != 1 or len(z) == 0:
        raise ValueError(f"fit_platt needs one logit per label; got shapes {z.shape} and {y.shape}")
    design = np.stack([z, np.ones_like(z)], axis=1)
    prior = np.array([1.0, 0.0])
    beta = prior.copy()
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ beta)))
        gradient = design.T @ (p - y) + l2 * (beta - prior)
        hessian = (design.T * (p * (1.0 - p))) @ design + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta = beta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def _calibrated(probabilities: Any, calibration: tuple[float, float]) -> np.ndarray:
    scale, shift = calibration
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * (scale * _logit(probabilities) + shift))), dtype=np.float64)


def _fit_ood_reference(
    folds: Sequence[Sequence[LabelRow]], bags: Mapping[str, Bag], config: TrainConfig
) -> Any:
    """The models' out-of-distribution summary (``ood.py``): fitted on the development slides outside every
    selection half, calibrated on the selection halves (slides the summary did not see). When every fold
    was too small to split, on all development slides for both (the calibration is then in-sample)."""
    from wsitk.shared.models.ood import fit_reference

    calibration: list[LabelRow] = []
    for k, val_rows in enumerate(folds):
        _, select_rows, shared = split_validation(val_rows, config.seed * 1000 + k)
        if not shared:
            calibration.extend(select_rows)
    held = {r.slide_id for r in calibration}
    fitted = [r for fold in folds for r in fold if r.slide_id not in held]
    if not calibration or not fitted:
        fitted = calibration = [r for fold in folds for r in fold]

    def sample(features: np.ndarray) -> np.ndarray:  # evenly spaced tiles: a bounded cost per slide
        return features[:: max(1, len(features) // OOD_TILES_PER_SLIDE)]

    return fit_reference(
        (sample(bags[r.slide_id].features) for r in fitted), [bags[r.slide_id].features for r in calibration]
    )


def _tile_stats(bags: Sequence[Bag]) -> dict[str, float]:
    counts = np.array([len(b.features) for b in bags], dtype=np.float64)
    return {"min": float(counts.min()), "median": float(np.median(counts)), "max": float(counts.max())}


def _auc_or_none(auc: Callable[..., float], labels: Sequence[int], probs: Any) -> float | None:
    return float(auc(labels, probs)) if 0 < sum(labels) < len(labels) else None


def _train_architecture(
    architecture: str,
    folds: Sequence[Sequence[LabelRow]],
    bags: Mapping[str, Bag],
    config: TrainConfig,
    paths: RunPaths,
    progress: Progress,
    in_dim: int,
) -> ArchitectureResult:
    import torch
    from wsitk.shared.models.aggregators import build_aggregator
    from wsitk.shared.models.mil import binary_auc, choose_threshold, predict_bags, train_mil

    result = ArchitectureResult(architecture, hyper={})
    oof: dict[str, float] = {}
    oof_calibrated: dict[str, tuple[int, float]] = {}
    for k, val_rows in enumerate(folds):
        fold_dir = paths.fold_dir(architecture, k)
        train_rows = [r for j, f in enumerate(folds) if j != k for r in f]
        # float16 as stored: train_mil and predict_bags widen one bag (or its sampled tiles) at a time
        train_bags = [bags[r.slide_id].features for r in train_rows]
        val_bags = [bags[r.slide_id].features for r in val_rows]
        val_labels = [r.label for r in val_rows]
        stop_rows, select_rows, shared = split_validation(val_rows, config.seed * 1000 + k)
        prefix = f"[train] {architecture} fold {k + 1}/{len(folds)}"
        done = fold_dir / "fold.json"
        started = time.monotonic()
        if done.is_file() and (fold_dir / "model.pt").is_file():
            fold_info = json.loads(done.read_text())
            model = build_aggregator(architecture, in_dim, **fold_info["hyper"])
            model.load_state_dict(torch.load(fold_dir / "model.pt", weights_only=True))
            model.eval()
            progress.say(f"{prefix}: already trained (resumed run)")
        else:
            progress.say(
                f"{prefix}: {len(train_rows)} training slides, {len(val_rows)} validation slides "
                + (
                    "(too few patients to split: stopping and selection share them)"
                    if shared
                    else f"({len(stop_rows)} for early stopping, {len(select_rows)} for the threshold)"
                )
            )
            fold_dir.mkdir(parents=True, exist_ok=True)
            trained = train_mil(
                train_bags,
                [r.label for r in train_rows],
                epochs=config.epochs,
                lr=config.learning_rate,
                seed=config.seed * 1000 + k,
                val_bags=[bags[r.slide_id].features for r in stop_rows],
                val_labels=[r.label for r in stop_rows],
                max_tiles_per_bag=config.max_tiles_per_bag,
                weight_decay=config.weight_decay,
                patience=config.patience,
                architecture=architecture,
                class_weighting=config.class_weighting,
                on_epoch=lambda record, p=prefix: progress.epoch(p, record, config.epochs),
                checkpoint_path=fold_dir / "checkpoint.pt",
            )
            model = trained.model
            torch.save(model.state_dict(), fold_dir / "model.pt")
            fold_info = {
                "hyper": {k2: v for k2, v in model.architecture().items() if k2 not in ("name", "in_dim")},
                "best_epoch": trained.best_epoch,
                "epochs_run": len(trained.history),
                "stopped_early": trained.stopped_early,
                "history": [asdict(h) for h in trained.history],
                "seconds": round(time.monotonic() - started, 1),
            }
            _write_json(done, fold_info)
        val_probs = predict_bags(model, val_bags)
        val_auc = _auc_or_none(binary_auc, val_labels, val_probs)
        for row, p in zip(val_rows, val_probs, strict=True):
            oof[row.slide_id] = float(p)
        select_labels = [r.label for r in select_rows]
        select_probs = np.array([oof[r.slide_id] for r in select_rows])
        threshold = choose_threshold(select_labels, select_probs)
        calibration = fit_platt(_logit(select_probs), select_labels)
        for row, p in zip(select_rows, _calibrated(select_probs, calibration), strict=True):
            oof_calibrated[row.slide_id] = (row.label, float(p))
        result.hyper = fold_info["hyper"]
        result.folds.append(
            FoldResult(
                fold=k,
                train_slides=len(train_rows),
                val_slides=len(val_rows),
                val_auc=val_auc,
                threshold=threshold,
                best_epoch=int(fold_info["best_epoch"]),
                epochs_run=int(fold_info["epochs_run"]),
                stopped_early=bool(fold_info["stopped_early"]),
                seconds=float(fold_info["seconds"]),
                stop_slides=len(stop_rows),
                select_slides=len(select_rows),
                selection_shared=shared,
                calibration=calibration,
            )
        )
        progress.say(
            f"{prefix}: best epoch {fold_info['best_epoch']} of {fold_info['epochs_run']}, validation AUC "
            + (f"{val_auc:.3f}" if val_auc is not None else "n/a (one class)")
            + f", threshold {threshold:.3f}"
        )
    development = [r for f in folds for r in f]
    labels = [r.label for r in development]
    probs = [oof[r.slide_id] for r in development]
    result.oof_auc = _auc_or_none(binary_auc, labels, probs)
    result.ensemble_threshold = choose_threshold(
        [label for label, _ in oof_calibrated.values()], [p for _, p in oof_calibrated.values()]
    )
    return result


def load_fold_models(paths: RunPaths, architecture: str, folds: int, in_dim: int) -> list[Any]:
    import torch
    from wsitk.shared.models.aggregators import build_aggregator

    models = []
    for k in range(folds):
        fold_dir = paths.fold_dir(architecture, k)
        info = json.loads((fold_dir / "fold.json").read_text())
        model = build_aggregator(architecture, in_dim, **info["hyper"])
        model.load_state_dict(torch.load(fold_dir / "model.pt", weights_only=True))
        models.append(model.eval())
    return models


def _export_ensemble(
    architecture: str,
    result: ArchitectureResult,
    config: TrainConfig,
    paths: RunPaths,
    expected_profile: Mapping[str, Any],
    in_dim: int,
    record: Mapping[str, Any],
    progress: Progress,
    ood: Mapping[str, Any] | None = None,
) -> None:
    from wsitk.shared.models.aggregators import MilEnsemble
    from wsitk.shared.models.export import export_mil, state_dict_sha256

    ensemble = MilEnsemble(
        load_fold_models(paths, architecture, config.folds, in_dim),
        calibration=[fold.calibration for fold in result.folds],
    ).eval()
    version = f"{architecture}-{_run_tag(paths.root)}-{state_dict_sha256(ensemble)[:8]}"
    info = export_mil(
        ensemble,
        paths.ensemble_onnx(architecture),
        in_dim=in_dim,
        model_version=version,
        backbone_id=str(expected_profile["backbone_id"]),
        threshold=result.ensemble_threshold,
        extra_meta={
            "profile": dict(expected_profile),
            "training": {
                "labels_file": record["labels_file"],
                "labels_sha256": record["labels_sha256"],
                "folds": config.folds,
                "seed": config.seed,
                "threshold_from": ENSEMBLE_THRESHOLD_RULE,
                "oof_auc": result.oof_auc,
            },
            **({"ood": dict(ood)} if ood else {}),
        },
        seed=config.seed,
    )
    result.model_version = version
    result.onnx = str(paths.ensemble_onnx(architecture).relative_to(paths.root))
    result.export_check = {
        "max_abs_diff_probability": info.max_abs_diff_probability,
        "max_rel_diff_attention": info.max_rel_diff_attention,
        "checked_bag_sizes": list(info.checked_bag_sizes),
    }
    progress.say(
        f"[train] {architecture}: out-of-fold AUC "
        + (f"{result.oof_auc:.3f}" if result.oof_auc is not None else "n/a")
        + f", ensemble threshold {result.ensemble_threshold:.3f}; exported {version} "
        f"(ONNX vs torch: probability within {info.max_abs_diff_probability:.1e})"
    )


# -- command line ----------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "labels", type=Path, help="CSV: slide, patient, label | subtype | time, event [, site, split]"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory (resumes if it holds this run)"
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        default=["gated-attention"],
        help=f"aggregator(s): {', '.join(ARCHITECTURES)} or 'all' (default gated-attention)",
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="patients held out for testing")
    parser.add_argument("--site-preserving", action="store_true", help="each site's patients in one fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=8, help="early stopping: epochs without improvement")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-tiles", type=int, default=512, help="bag sub-sampling cap per training step")
    parser.add_argument("--no-class-weights", action="store_true", help="do not weight the loss by class")
    parser.add_argument("--backbone", default="", help="when slides were embedded with several backbones")
    parser.add_argument(
        "--task",
        choices=("binary", "subtype", "survival"),
        default=None,
        help="default: from the labels columns (label: binary; subtype; time and event: survival)",
    )


def cli_train(args: argparse.Namespace) -> int:
    from wsitk.shared.config import load_settings
    from wsitk.shared.db import records
    from wsitk.shared.db.connection import Database
    from wsitk.shared.models.bags import load_bags
    from wsitk.shared.objectstore import open_store

    architectures = ARCHITECTURES if args.arch == ["all"] else tuple(args.arch)
    try:
        config = TrainConfig(
            architectures=tuple(architectures),
            folds=args.folds,
            test_fraction=args.test_fraction,
            site_preserving=args.site_preserving,
            seed=args.seed,
            epochs=args.epochs,
            patience=args.patience,
            learning_rate=args.lr,
            max_tiles_per_bag=args.max_tiles,
            class_weighting=not args.no_class_weights,
            backbone_id=args.backbone,
        )
        settings = load_settings()
        db = Database(settings.dsn())
        store = open_store(settings)
        sources = records.upload_keys(db)
        progress = Progress()
        paths = RunPaths(args.out)

        def loader(slide_ids: Sequence[str]) -> Mapping[str, Bag]:
            return load_bags(
                db, store, slide_ids, backbone_id=args.backbone, cache_dir=paths.bags, progress=progress.say
            )

        train_run(
            args.labels,
            args.out,
            config,
            sources=sources,
            bag_loader=loader,
            progress=progress,
            command="wsi train " + " ".join(sys.argv[2:]),
            task=args.task,
        )
    except LabelsError as error:
        print(f"wsi train: {error}", file=sys.stderr)
        return 2
    return 0
