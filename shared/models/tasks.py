"""Tasks beside tumour/normal: subtyping (K classes) and survival, from the same labels file format.

=========== ======== =================================================================================
column      task     meaning
=========== ======== =================================================================================
``subtype`` subtype  the patient's class (any text; the classes are the distinct values, at least two)
``time``    survival follow-up time (any unit, > 0): to the event, or to the last contact when censored
``event``   survival ``1`` event observed (also ``true``/``yes``/``dead``), ``0`` censored (``false``/``no``/``alive``)
=========== ======== =================================================================================

``slide``, ``patient``, ``site`` and ``split`` mean what they mean for tumour/normal (``labels.py``); the
``label`` column is not needed. The task is ``--task`` when given, else inferred from the header: a
``label`` column means tumour/normal (so every existing labels file reads as before), else ``subtype``, else
``time`` and ``event``. Subtype, time and event belong to the patient: slides of one patient that disagree
are refused.

Splits stay by patient, stratified by the task's **stratum** (the class for subtyping, the event indicator
for survival), with the held-out test set chosen first (``make_task_splits``); each validation fold is
halved by patient into a stopping half and a selection half, again stratified (``split_task_validation``).

Models: the gated-attention MIL with a K-class softmax head (``MultiClassAttentionMIL``, class-weighted
cross-entropy) or with its one output read as a log-risk (``RiskAttentionMIL``, Cox partial likelihood over
mini-batches of bags, ``survival.cox_partial_likelihood_loss``); ``train_task_mil`` trains either.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from wsitk.shared.models.backbones import seeded_torch
from wsitk.shared.models.labels import (
    TEST,
    TRAIN,
    LabelRow,
    LabelsError,
    SplitPlan,
    _assign_folds_by_site,
    _seeded_order,
)
from wsitk.shared.models.mil import EpochRecord, GatedAttentionMIL, TrainedMil, single_threaded_torch

BINARY, SUBTYPE, SURVIVAL = "binary", "subtype", "survival"
TASKS = (BINARY, SUBTYPE, SURVIVAL)
EVENT = {"1", "true", "yes", "dead", "deceased", "event"}
CENSORED = {"0", "false", "no", "alive", "censored"}


@dataclass(frozen=True)
class TaskRow(LabelRow):
    """A labels row of a subtyping or survival file. ``label`` holds the stratum the splits balance: the
    class index (into the run's sorted class names) for subtyping, the event indicator for survival."""

    subtype: str = ""
    time: float = 0.0
    event: int = 0


def _header(path: Path) -> set[str]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc}") from exc
    reader = csv.reader(text.splitlines())
    return {c.strip().lower() for c in next(reader, [])}


def detect_task(path: Path, requested: str | None = None) -> str:
    """The task of a labels file: ``requested`` (checked against the columns), else from the header."""
    columns = _header(path)
    needs = {BINARY: {"label"}, SUBTYPE: {"subtype"}, SURVIVAL: {"time", "event"}}
    if requested:
        if requested not in TASKS:
            raise LabelsError(f"unknown task {requested!r}; choose one of {', '.join(TASKS)}")
        if requested != BINARY and (missing := needs[requested] - columns):
            raise LabelsError(f"{path}: task {requested} needs the column(s) {sorted(missing)}")
        return requested
    for task in (BINARY, SUBTYPE, SURVIVAL):
        if needs[task] <= columns:
            return task
    return BINARY  # read_labels names the missing columns


def _parse_row(number: int, record: dict[str, str], task: str, classes: Sequence[str]) -> TaskRow | str:
    """One labels row as a ``TaskRow``, or what is wrong with it."""
    slide, patient = record.get("slide", ""), record.get("patient", "")
    split = record.get("split", "").lower()
    if not slide or not patient:
        return f"line {number}: slide and patient must not be empty"
    if split not in ("", TEST, TRAIN, "val", "validation", "trainval"):
        return f"line {number}: split {split!r} must be test or train (or empty)"
    fixed = TEST if split == TEST else (TRAIN if split else "")
    common: dict[str, Any] = {"slide": slide, "patient": patient, "site": record.get("site", "")}
    common |= {"fixed_split": fixed, "line": number}
    if task == SUBTYPE:
        subtype = record.get("subtype", "")
        if not subtype:
            return f"line {number}: empty subtype"
        return TaskRow(**common, label=list(classes).index(subtype), subtype=subtype)
    try:
        time = float(record.get("time", ""))
    except ValueError:
        time = math.nan
    if not math.isfinite(time) or time <= 0:
        return f"line {number}: time {record.get('time')!r} must be a positive number"
    event_text = record.get("event", "").lower()
    if event_text not in EVENT | CENSORED:
        return f"line {number}: event {event_text!r} must be 1 (event) or 0 (censored)"
    event = int(event_text in EVENT)
    return TaskRow(**common, label=event, time=time, event=event)


def _patient_problems(rows: Sequence[TaskRow], task: str) -> list[str]:
    """Slides listed twice, and patients whose slides disagree on the outcome or the fixed split."""
    problems = []
    if duplicates := [s for s, n in Counter(r.slide for r in rows).items() if n > 1]:
        problems.append(f"slides listed more than once: {duplicates[:5]}")
    per_patient: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    splits: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        per_patient[row.patient].add((row.subtype, row.time, row.event))
        splits[row.patient].add(row.fixed_split)
    if disagree := [p for p, values in per_patient.items() if len(values) > 1]:
        what = "subtype" if task == SUBTYPE else "time and event"
        problems.append(
            f"patients whose slides have different {what} (they belong to the patient): {disagree[:5]}"
        )
    if conflicting := [p for p, values in splits.items() if len(values) > 1]:
        problems.append(f"patients with slides in different fixed splits: {conflicting[:5]}")
    return problems


def read_task_labels(path: Path, task: str) -> tuple[list[TaskRow], list[str]]:
    """``(rows, classes)`` of a subtyping or survival labels file; every problem with its line number.
    ``classes`` are the sorted subtype names (empty for survival)."""
    if task not in (SUBTYPE, SURVIVAL):
        raise ValueError(f"read_task_labels reads subtype and survival files, not {task!r}")
    detect_task(path, task)
    reader = csv.DictReader(Path(path).read_text(encoding="utf-8-sig").splitlines())
    records: list[tuple[int, dict[str, str]]] = []
    for number, raw in enumerate(reader, start=2):
        record = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        if any(record.values()):
            records.append((number, record))
    classes = sorted({r.get("subtype", "") for _, r in records} - {""}) if task == SUBTYPE else []
    if task == SUBTYPE and len(classes) < 2:
        raise LabelsError(
            f"{path}: subtyping needs at least two classes in the subtype column, got {classes}"
        )
    parsed = [_parse_row(number, record, task, classes) for number, record in records]
    rows = [row for row in parsed if isinstance(row, TaskRow)]
    problems = [row for row in parsed if isinstance(row, str)] + _patient_problems(rows, task)
    if problems:
        raise LabelsError(f"{path}: " + "; ".join(problems))
    if not rows:
        raise LabelsError(f"{path}: no slides listed")
    return rows, classes


# ----------------------------------------------------------------------------------------------------------
# Patient splits stratified by the task's stratum


def make_task_splits(
    rows: Sequence[LabelRow],
    *,
    task: str,
    folds: int = 5,
    test_fraction: float = 0.25,
    seed: int = 0,
    site_preserving: bool = False,
) -> SplitPlan:
    """Held-out test patients, then ``folds`` cross-validation folds, each stratified by the patient's
    stratum (``row.label``: class or event); a fixed ``split`` column wins. Depends only on patient ids,
    strata, sites and the seed. Refused when the test set lacks a class (subtyping) or two events (survival),
    or a fold lacks two classes or an event."""
    if folds < 2:
        raise LabelsError(f"need at least 2 folds for cross-validation, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise LabelsError(f"test fraction {test_fraction} must be within [0, 1)")
    strata: dict[str, int] = {}
    sites: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for row in rows:
        strata.setdefault(row.patient, row.label)
        sites.setdefault(row.patient, row.site)
        fixed.setdefault(row.patient, row.fixed_split)
    plan = SplitPlan(folds, seed, test_fraction, site_preserving)
    values = sorted(set(strata.values()))
    for patient, split in fixed.items():
        if split == TEST:
            plan.patient_split[patient] = TEST
    if TEST not in fixed.values() and test_fraction > 0:
        for value in values:
            group = [p for p in strata if strata[p] == value and not fixed[p]]
            group = _seeded_order(group, seed, f"{task}-test-{value}")
            take = round(len(group) * test_fraction)
            if take == 0 and len(group) >= 2:
                take = 1
            for patient in group[:take]:
                plan.patient_split[patient] = TEST
    development = [p for p in strata if plan.patient_split.get(p) != TEST]
    if site_preserving:
        _assign_folds_by_site(plan, development, {p: int(strata[p] > 0) for p in development}, sites, seed)
    else:
        for value in values:
            group = _seeded_order(
                [p for p in development if strata[p] == value], seed, f"{task}-fold-{value}"
            )
            offset = int(hashlib.sha256(f"{seed}|{task}-offset-{value}".encode()).hexdigest(), 16) % folds
            for index, patient in enumerate(group):
                plan.patient_split[patient] = f"fold-{(index + offset) % folds}"
    _check_task_plan(plan, strata, task, len(values))
    return plan


def _check_task_plan(plan: SplitPlan, strata: dict[str, int], task: str, n_values: int) -> None:
    members: dict[str, Counter[int]] = defaultdict(Counter)
    for patient, split in plan.patient_split.items():
        members[split][strata[patient]] += 1
    problems = [f"fold-{k} is empty" for k in range(plan.folds) if f"fold-{k}" not in members]
    for split, count in sorted(members.items()):
        if task == SUBTYPE and split == TEST and len(count) < n_values:
            problems.append(f"the test set holds {len(count)} of the {n_values} classes")
        elif task == SUBTYPE and len(count) < 2:
            problems.append(f"{split} holds one class only")
        elif task == SURVIVAL and count[1] < (2 if split == TEST else 1):
            problems.append(f"{split} has {count[1]} patients with an observed event")
    if problems:
        raise LabelsError(
            "the split cannot be evaluated: " + "; ".join(problems) + ". Add patients, use fewer folds, or "
            "change the test fraction"
        )


def split_task_validation(
    rows: Sequence[LabelRow], seed: int, task: str
) -> tuple[list[Any], list[Any], bool]:
    """``(stopping rows, selection rows, shared)``: a validation fold's patients halved by patient and
    stratified by stratum (shuffled patients of each stratum alternate, selection half first). Both halves
    are the whole fold (``shared``) when a half would be empty, or, for survival, hold no event."""
    by_patient: dict[str, list[LabelRow]] = defaultdict(list)
    for row in rows:
        by_patient[row.patient].append(row)
    rng = np.random.default_rng(seed)
    stop: list[LabelRow] = []
    select: list[LabelRow] = []
    for value in sorted({members[0].label for members in by_patient.values()}, reverse=True):
        patients = sorted(p for p, members in by_patient.items() if members[0].label == value)
        for position, index in enumerate(rng.permutation(len(patients))):
            (select if position % 2 == 0 else stop).extend(by_patient[patients[int(index)]])
    too_small = not stop or len({r.patient for r in select}) < 2
    if task == SURVIVAL:
        too_small = too_small or not any(r.label for r in stop) or not any(r.label for r in select)
    if too_small:
        return list(rows), list(rows), True
    return stop, select, False


# ----------------------------------------------------------------------------------------------------------
# Models and training


class MultiClassAttentionMIL(GatedAttentionMIL):
    """Gated attention MIL with a K-class head: ``forward(features [N, D]) -> (logits [K], attention [N])``."""

    def __init__(
        self, in_dim: int, n_classes: int = 3, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, hidden, attn_dim, dropout)
        if n_classes < 2:
            raise ValueError(f"a K-class head needs K >= 2, got {n_classes}")
        self.n_classes = n_classes
        self.classifier = nn.Linear(hidden, n_classes)

    def bag_loss(self, features: torch.Tensor, target: float, weight: float) -> torch.Tensor:
        logits, _ = self(features)
        return weight * functional.cross_entropy(logits[None], torch.tensor([int(target)]))

    def architecture(self) -> dict[str, Any]:
        return super().architecture() | {
            "name": "gated-attention-mil-multiclass",
            "n_classes": self.n_classes,
        }


class RiskAttentionMIL(GatedAttentionMIL):
    """Gated attention MIL whose one output is a log-risk (higher: shorter survival expected), trained with
    the Cox partial likelihood over mini-batches of bags (a risk is only defined relative to others)."""

    def architecture(self) -> dict[str, Any]:
        return super().architecture() | {"name": "gated-attention-mil-risk"}


def build_task_model(task: str, in_dim: int, n_classes: int = 0, **hyper: Any) -> GatedAttentionMIL:
    if task == SUBTYPE:
        return MultiClassAttentionMIL(in_dim, n_classes=n_classes, **hyper)
    if task == SURVIVAL:
        return RiskAttentionMIL(in_dim, **hyper)
    raise ValueError(f"no task model for {task!r}")


def predict_task(model: nn.Module, bags: Sequence[np.ndarray], task: str) -> np.ndarray:
    """Class probabilities ``[bags, K]`` (subtyping) or log-risks ``[bags]`` (survival)."""
    model.eval()
    with torch.no_grad(), single_threaded_torch():
        outputs = torch.stack([model(torch.as_tensor(np.asarray(b, dtype=np.float32)))[0] for b in bags])
    if task == SUBTYPE:
        return torch.softmax(outputs, dim=1).numpy().astype(np.float64)
    return outputs.numpy().astype(np.float64)


def _task_loss(
    task: str,
    outputs: torch.Tensor,
    labels: np.ndarray,
    times: np.ndarray | None,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    from wsitk.shared.models.survival import cox_partial_likelihood_loss

    if task == SUBTYPE:
        target = torch.as_tensor(labels, dtype=torch.long)
        losses = functional.cross_entropy(outputs, target, reduction="none")
        return (losses * weight[target]).mean() if weight is not None else losses.mean()
    assert times is not None
    return cox_partial_likelihood_loss(
        outputs, torch.as_tensor(times, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32)
    )


def _validation_metric(
    task: str, outputs: np.ndarray, labels: np.ndarray, times: np.ndarray | None
) -> float | None:
    if task == SUBTYPE:
        from wsitk.shared.models.subtyping import macro_auc

        value = macro_auc(labels, outputs)
    else:
        from wsitk.shared.models.survival import concordance_index

        value = concordance_index(times, labels, outputs)
    return None if math.isnan(value) else float(value)


def _class_weight(labels: np.ndarray, n_classes: int, class_weighting: bool) -> torch.Tensor | None:
    """Inverse class frequency ``n / (K n_c)``; every class must have bags."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if len(counts) != n_classes or (counts == 0).any():
        raise ValueError(f"subtype training needs bags of all {n_classes} classes; counts {counts.tolist()}")
    return (
        torch.as_tensor(len(labels) / (n_classes * counts), dtype=torch.float32) if class_weighting else None
    )


def _validate(
    model: nn.Module, task: str, bags: Sequence[np.ndarray], labels: np.ndarray, times: np.ndarray | None
) -> tuple[float, float | None]:
    """Unweighted validation loss (cross-entropy; the Cox loss of all bags at once) and macro AUC or C-index."""
    outputs = predict_task(model, bags, task)
    logits = outputs if task == SURVIVAL else np.log(np.clip(outputs, 1e-12, 1.0))
    with torch.no_grad():
        loss = float(_task_loss(task, torch.as_tensor(logits, dtype=torch.float32), labels, times, None))
    return loss, _validation_metric(task, outputs, labels, times)


def _check_task_inputs(
    task: str, bags: Sequence[np.ndarray], labels: Sequence[int], times: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    y = np.asarray(labels, dtype=np.int64)
    t = None if times is None else np.asarray(times, dtype=np.float64)
    if len(bags) != len(y) or not len(y) or (task == SURVIVAL and (t is None or len(t) != len(y))):
        raise ValueError("give one label (and for survival one time) per bag, and at least one bag")
    if task == SURVIVAL and not y.any():
        raise ValueError("survival training needs at least one observed event")
    dims = {np.shape(b)[1] for b in bags}
    if len(dims) != 1:
        raise ValueError(f"every bag needs the same feature dimension; got {sorted(dims)}")
    in_dim = dims.pop()
    return y, t, in_dim


def _train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    task: str,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    times: np.ndarray | None,
    weight: torch.Tensor | None,
    rng: np.random.Generator,
    batch_size: int,
    max_tiles_per_bag: int,
) -> float:
    """One pass over the bags in mini-batches, in a seeded random order; the mean batch loss."""
    model.train()
    losses = []
    order = rng.permutation(len(bags))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if task == SURVIVAL and not labels[batch].any():
            continue  # a Cox batch without an event has no likelihood term
        outputs = []
        for index in batch:
            bag = bags[int(index)]
            if len(bag) > max_tiles_per_bag:
                bag = bag[rng.choice(len(bag), max_tiles_per_bag, replace=False)]
            outputs.append(model(torch.as_tensor(np.asarray(bag, dtype=np.float32)))[0])
        batch_times = None if times is None else times[batch]
        loss = _task_loss(task, torch.stack(outputs), labels[batch], batch_times, weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else math.nan


def train_task_mil(
    bags: Sequence[np.ndarray],
    labels: Sequence[int],
    *,
    task: str,
    times: Sequence[float] | None = None,
    n_classes: int = 0,
    epochs: int = 40,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 16,
    val_bags: Sequence[np.ndarray] | None = None,
    val_labels: Sequence[int] | None = None,
    val_times: Sequence[float] | None = None,
    max_tiles_per_bag: int = 512,
    weight_decay: float = 1e-4,
    patience: int = 8,
    class_weighting: bool = True,
    hyper: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainedMil:
    """Train a subtyping or survival MIL model on mini-batches of ``batch_size`` bags, reproducibly.

    Subtyping: ``labels`` are class indices, the loss the cross-entropy weighted by inverse class frequency
    (``class_weighting``). Survival: ``labels`` are event indicators and ``times`` the follow-up times, the
    loss the Cox partial likelihood of the batch (a batch without an event is skipped). Each epoch visits
    the bags in a seeded random order; a bag larger than ``max_tiles_per_bag`` is sub-sampled afresh each
    epoch. With validation bags, training stops after ``patience`` epochs without a lower validation loss
    (cross-entropy; the Cox loss over all validation bags at once) and the best epoch's weights are restored;
    ``EpochRecord.val_auc`` holds the validation macro AUC or C-index.
    """
    if task not in (SUBTYPE, SURVIVAL):
        raise ValueError(f"train_task_mil trains subtype or survival models, not {task!r}")
    y, t, in_dim = _check_task_inputs(task, bags, labels, times)
    weight = _class_weight(y, n_classes, class_weighting) if task == SUBTYPE else None
    validation = None
    if val_bags is not None and val_labels is not None and len(val_bags):
        val_t = None if val_times is None else np.asarray(val_times, dtype=np.float64)
        validation = (val_bags, np.asarray(val_labels, dtype=np.int64), val_t)
    rng = np.random.default_rng(seed)
    history: list[EpochRecord] = []
    with seeded_torch(seed), single_threaded_torch():
        model = build_task_model(task, in_dim, n_classes, **(hyper or {}))
        model.fit_feature_normalisation_streamed(bags)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        best_state, best_loss, best_epoch, stale = copy.deepcopy(model.state_dict()), math.inf, 0, 0
        for epoch in range(1, epochs + 1):
            train_loss = _train_epoch(
                model, optimiser, task, bags, y, t, weight, rng, batch_size, max_tiles_per_bag
            )
            record = EpochRecord(epoch, train_loss)
            if validation is None:
                best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
            else:
                val_loss, metric = _validate(model, task, *validation)
                record = EpochRecord(epoch, train_loss, val_loss, metric)
                if val_loss < best_loss - 1e-6:
                    best_loss, best_epoch, stale = val_loss, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if stale >= patience:
                break
        model.load_state_dict(best_state)
    model.eval()
    return TrainedMil(
        model=model, history=history, best_epoch=best_epoch, stopped_early=len(history) < epochs
    )
