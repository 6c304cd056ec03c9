"""Labels files and patient-level splits: the part of an evaluation a reviewer checks first.

A labels file is CSV with a header row and one row per slide:

=========== ========= ==========================================================================
column      required  meaning
=========== ========= ==========================================================================
``slide``   yes       the slide: its slide id, its upload key, or the file name of its upload key
``patient`` yes       patient (case) identifier; every split keeps a patient's slides together
``label``   yes       ``tumour``/``normal`` (also ``1``/``0``, ``positive``/``negative``, ``true``/``false``)
``site``    no        contributing site (hospital, scanner); enables site-preserving folds
``split``   no        a fixed split: ``test`` (held out) or ``train`` (cross-validation); per patient
``subtype`` subtyping the patient's class (``wsi train --task subtype``; replaces ``label``)
``time``    survival  follow-up time, > 0 (``wsi train --task survival``; with ``event``, replaces ``label``)
``event``   survival  ``1`` event observed, ``0`` censored
=========== ========= ==========================================================================

A file with a ``label`` column is a tumour/normal file (this module) unless ``--task`` says otherwise;
subtyping and survival files, their splits (stratified by class or by event) and models are in
``tasks.py``.

Splits are always by **patient**, never by slide: slides of one patient share tissue, staining and scanner,
so a slide-level split lets a model recognise the patient instead of the disease and inflates every number.
A held-out test set of patients is set aside first (stratified by patient label: a patient is positive when
any of their slides is); no model, fold or ensemble ever trains or chooses a threshold on it. The remaining
patients are dealt into ``k`` stratified folds. With ``site_preserving`` each site's patients all land in one
fold (Howard et al., Nat. Commun. 2021: otherwise a model can score well by recognising sites whose
case mix differs), which needs at least ``k`` sites.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

POSITIVE = {"tumour", "tumor", "1", "positive", "true", "yes", "cancer"}
NEGATIVE = {"normal", "0", "negative", "false", "no", "benign"}
TEST = "test"
TRAIN = "train"


class LabelsError(ValueError):
    """The labels file or the split request cannot be used as given; the message says how to fix it."""


@dataclass(frozen=True)
class LabelRow:
    slide: str  # as written in the labels file
    patient: str
    label: int  # 1 tumour, 0 normal
    site: str = ""
    fixed_split: str = ""  # "", "test" or "train"
    slide_id: str = ""  # resolved pipeline slide id
    line: int = 0


def read_labels(path: Path) -> list[LabelRow]:
    """Parse and validate a labels file; every problem is reported with its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    columns = {c.strip().lower() for c in (reader.fieldnames or [])}
    missing = {"slide", "patient", "label"} - columns
    if missing:
        raise LabelsError(
            f"{path}: missing column(s) {sorted(missing)}; the header must name slide, patient, label "
            "(optional: site, split)"
        )
    rows: list[LabelRow] = []
    problems: list[str] = []
    for number, raw in enumerate(reader, start=2):
        record = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        slide, patient, label_text = (
            record.get("slide", ""),
            record.get("patient", ""),
            record.get("label", ""),
        )
        split = record.get("split", "").lower()
        if not slide and not patient and not label_text:
            continue  # blank line
        if not slide or not patient:
            problems.append(f"line {number}: slide and patient must not be empty")
            continue
        if label_text.lower() in POSITIVE:
            label = 1
        elif label_text.lower() in NEGATIVE:
            label = 0
        else:
            problems.append(f"line {number}: label {label_text!r} is neither tumour nor normal")
            continue
        if split not in ("", TEST, TRAIN, "val", "validation", "trainval"):
            problems.append(f"line {number}: split {split!r} must be test or train (or empty)")
            continue
        fixed = TEST if split == TEST else (TRAIN if split else "")
        rows.append(LabelRow(slide, patient, label, record.get("site", ""), fixed, line=number))
    duplicates = [s for s, n in Counter(r.slide for r in rows).items() if n > 1]
    if duplicates:
        problems.append(f"slides listed more than once: {duplicates[:5]}")
    by_patient: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_patient[row.patient].add(row.fixed_split)
    conflicting = [p for p, splits in by_patient.items() if len(splits) > 1]
    if conflicting:
        problems.append(
            f"patients with slides in different fixed splits (a patient belongs to one split): {conflicting[:5]}"
        )
    if problems:
        raise LabelsError(f"{path}: " + "; ".join(problems))
    if not rows:
        raise LabelsError(f"{path}: no slides listed")
    return rows


def resolve_slide_ids(rows: Sequence[LabelRow], sources: Iterable[tuple[str, str]]) -> list[LabelRow]:
    """Fill ``slide_id`` from ``(slide_id, upload_key)`` pairs: a row's ``slide`` may be the slide id, the
    upload key, or the key's file name (when that is unambiguous)."""
    by_id: set[str] = set()
    by_key: dict[str, set[str]] = defaultdict(set)
    by_name: dict[str, set[str]] = defaultdict(set)
    for slide_id, key in sources:
        by_id.add(slide_id)
        by_key[key].add(slide_id)
        by_name[key.rsplit("/", 1)[-1]].add(slide_id)
    resolved, unknown, ambiguous = [], [], []
    for row in rows:
        if row.slide in by_id:
            candidates = {row.slide}
        else:
            candidates = by_key.get(row.slide) or by_name.get(row.slide.rsplit("/", 1)[-1], set())
        if not candidates:
            unknown.append(row.slide)
        elif len(candidates) > 1:
            ambiguous.append(row.slide)
        else:
            resolved.append(replace(row, slide_id=next(iter(candidates))))
    if unknown or ambiguous:
        message = []
        if unknown:
            message.append(
                f"{len(unknown)} slide(s) the pipeline has never ingested: {unknown[:5]} (upload them first, "
                "or check the names: slide id, upload key or its file name)"
            )
        if ambiguous:
            message.append(
                f"{len(ambiguous)} name(s) match several slides: {ambiguous[:5]} (use the upload key or slide id)"
            )
        raise LabelsError("; ".join(message))
    ids = Counter(r.slide_id for r in resolved)
    twice = [s for s, n in ids.items() if n > 1]
    if twice:
        raise LabelsError(
            f"rows that are the same slide (same content uploaded under two names): {twice[:3]}; list each once"
        )
    return resolved


@dataclass
class SplitPlan:
    """Where every patient went: ``test`` or a fold number ``0..folds-1``."""

    folds: int
    seed: int
    test_fraction: float
    site_preserving: bool
    patient_split: dict[str, str] = field(default_factory=dict)  # patient -> "test" | "fold-<i>"

    def split_of(self, row: LabelRow) -> str:
        return self.patient_split[row.patient]

    def test_rows(self, rows: Sequence[LabelRow]) -> list[LabelRow]:
        return [r for r in rows if self.patient_split[r.patient] == TEST]

    def fold_rows(self, rows: Sequence[LabelRow], fold: int) -> list[LabelRow]:
        return [r for r in rows if self.patient_split[r.patient] == f"fold-{fold}"]

    def development_rows(self, rows: Sequence[LabelRow]) -> list[LabelRow]:
        return [r for r in rows if self.patient_split[r.patient] != TEST]

    def to_dict(self) -> dict[str, object]:
        return {
            "folds": self.folds,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "site_preserving": self.site_preserving,
            "patient_split": dict(sorted(self.patient_split.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SplitPlan:
        return cls(
            folds=int(data["folds"]),  # type: ignore[call-overload]
            seed=int(data["seed"]),  # type: ignore[call-overload]
            test_fraction=float(data["test_fraction"]),  # type: ignore[arg-type]
            site_preserving=bool(data["site_preserving"]),
            patient_split=dict(data["patient_split"]),  # type: ignore[call-overload]
        )


def _patient_table(rows: Sequence[LabelRow]) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    labels: dict[str, int] = {}
    sites: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for row in rows:
        labels[row.patient] = max(labels.get(row.patient, 0), row.label)
        sites.setdefault(row.patient, row.site)
        fixed.setdefault(row.patient, row.fixed_split)
    return labels, sites, fixed


def _seeded_order(items: Iterable[str], seed: int, salt: str) -> list[str]:
    """A seeded permutation that does not depend on input order or Python's hash seed."""
    return sorted(items, key=lambda item: hashlib.sha256(f"{seed}|{salt}|{item}".encode()).hexdigest())


def make_splits(
    rows: Sequence[LabelRow],
    *,
    folds: int = 5,
    test_fraction: float = 0.25,
    seed: int = 0,
    site_preserving: bool = False,
) -> SplitPlan:
    """Assign every patient to the held-out test set or one of ``folds`` cross-validation folds.

    A fixed ``split`` column wins for the patients that have one; the others are split here. Both the test
    set and each fold are stratified by patient label, and the assignment depends only on the patient ids,
    labels, sites and the seed (not on row order).
    """
    if folds < 2:
        raise LabelsError(f"need at least 2 folds for cross-validation, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise LabelsError(f"test fraction {test_fraction} must be within [0, 1)")
    labels, sites, fixed = _patient_table(rows)
    plan = SplitPlan(folds, seed, test_fraction, site_preserving)
    free = {p for p in labels if not fixed[p]}
    for patient, split in fixed.items():
        if split == TEST:
            plan.patient_split[patient] = TEST
    if not any(split == TEST for split in fixed.values()) and test_fraction > 0:
        for label in (0, 1):
            group = _seeded_order([p for p in free if labels[p] == label], seed, f"test-{label}")
            take = round(len(group) * test_fraction)
            if take == 0 and len(group) >= 2:
                take = 1  # every class is represented in the test set
            for patient in group[:take]:
                plan.patient_split[patient] = TEST
    development = [p for p in labels if plan.patient_split.get(p) != TEST]
    if site_preserving:
        _assign_folds_by_site(plan, development, labels, sites, seed)
    else:
        for label in (0, 1):
            group = _seeded_order([p for p in development if labels[p] == label], seed, f"fold-{label}")
            offset = int(hashlib.sha256(f"{seed}|offset-{label}".encode()).hexdigest(), 16) % folds
            for index, patient in enumerate(group):
                plan.patient_split[patient] = f"fold-{(index + offset) % folds}"
    _check_plan(plan, labels)
    return plan


def _assign_folds_by_site(
    plan: SplitPlan, patients: Sequence[str], labels: Mapping[str, int], sites: Mapping[str, str], seed: int
) -> None:
    by_site: dict[str, list[str]] = defaultdict(list)
    for patient in patients:
        if not sites[patient]:
            raise LabelsError(
                f"site-preserving folds need a site for every patient; {patient} has none (add a site column)"
            )
        by_site[sites[patient]].append(patient)
    if len(by_site) < plan.folds:
        raise LabelsError(
            f"site-preserving {plan.folds}-fold cross-validation needs at least {plan.folds} sites outside the "
            f"test set; there are {len(by_site)} ({sorted(by_site)}). Use fewer folds or ordinary folds"
        )
    # Biggest sites first, each to the fold with the fewest patients so far (so every fold gets a site),
    # ties broken towards the fold whose tumour share it moves closest to the overall share.
    counts = np.zeros((plan.folds, 2))
    overall = sum(labels[p] for p in patients) / max(len(patients), 1)
    order = sorted(by_site, key=lambda s: (-len(by_site[s]), _seeded_order([s], seed, "site")[0]))
    for site in order:
        members = by_site[site]
        add = np.array([sum(1 for p in members if labels[p] == c) for c in (0, 1)], dtype=np.float64)

        def cost(fold: int, add: np.ndarray = add) -> tuple[float, float]:
            after = counts[fold] + add
            return float(counts[fold].sum()), abs(float(after[1] / after.sum()) - overall)

        best = min(range(plan.folds), key=cost)
        counts[best] += add
        for patient in members:
            plan.patient_split[patient] = f"fold-{best}"


def _check_plan(plan: SplitPlan, labels: Mapping[str, int]) -> None:
    """Refuse splits that cannot be evaluated honestly (a class missing in the test set or a fold)."""
    splits: dict[str, Counter[int]] = defaultdict(Counter)
    for patient, split in plan.patient_split.items():
        splits[split][labels[patient]] += 1
    problems = []
    for split, count in sorted(splits.items()):
        if count[0] == 0 or count[1] == 0:
            problems.append(f"{split} has {count[1]} tumour and {count[0]} normal patients")
    for fold in range(plan.folds):
        if f"fold-{fold}" not in splits:
            problems.append(f"fold-{fold} is empty")
    if problems:
        raise LabelsError(
            "the split cannot be evaluated: " + "; ".join(problems) + ". Every split needs patients of both "
            "classes: add patients, use fewer folds, or change the test fraction"
        )


def split_summary(rows: Sequence[LabelRow], plan: SplitPlan) -> dict[str, dict[str, int]]:
    """Slides, patients and tumour slides per split, for the report."""
    summary: dict[str, dict[str, int]] = {}
    for split in sorted({plan.split_of(r) for r in rows}):
        members = [r for r in rows if plan.split_of(r) == split]
        summary[split] = {
            "slides": len(members),
            "patients": len({r.patient for r in members}),
            "tumour_slides": sum(r.label for r in members),
            "sites": len({r.site for r in members if r.site}),
        }
    return summary
