"""Labels files and patient-level splits: no patient is ever in two splits, classes are stratified,
fixed splits and site-preserving folds are honoured, and bad labels files get readable errors."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest
from wsitk.shared.models.labels import (
    LabelRow,
    LabelsError,
    make_splits,
    read_labels,
    resolve_slide_ids,
    split_summary,
)


def cohort(patients: int = 40, sites: int = 4, slides: int = 3) -> list[LabelRow]:
    rows = []
    for p in range(patients):
        tumour = p % 3 != 0
        for s in range(1 + p % slides):
            rows.append(
                LabelRow(
                    slide=f"cohort-{p:03d}-{s}.svs",
                    patient=f"P{p:04d}",
                    label=int(tumour and s != 1),  # a cancer patient may have normal blocks too
                    site=f"site-{p % sites}",
                    slide_id=f"id-{p:03d}-{s}",
                )
            )
    return rows


@pytest.mark.parametrize("site_preserving", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_patient_is_in_two_splits_and_every_split_has_both_classes(
    seed: int, site_preserving: bool
) -> None:
    rows = cohort()
    plan = make_splits(rows, folds=4, test_fraction=0.25, seed=seed, site_preserving=site_preserving)
    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of_patient[row.patient].add(plan.split_of(row))
    assert all(len(s) == 1 for s in splits_of_patient.values())
    test = plan.test_rows(rows)
    folds = [plan.fold_rows(rows, k) for k in range(4)]
    assert len(test) + sum(len(f) for f in folds) == len(rows)
    test_patients = {r.patient for r in test}
    for k, fold in enumerate(folds):
        fold_patients = {r.patient for r in fold}
        assert fold_patients.isdisjoint(test_patients)
        for j in range(k):
            assert fold_patients.isdisjoint({r.patient for r in folds[j]})
        assert {r.label for r in fold} == {0, 1}
    assert {r.label for r in test} == {0, 1}
    if site_preserving:
        fold_of_site: dict[str, set[str]] = defaultdict(set)
        for row in plan.development_rows(rows):
            fold_of_site[row.site].add(plan.split_of(row))
        assert all(len(f) == 1 for f in fold_of_site.values()), fold_of_site


def test_test_set_is_stratified_by_patient_and_independent_of_row_order() -> None:
    rows = cohort(patients=60)
    plan = make_splits(rows, folds=5, test_fraction=0.25, seed=3)
    shuffled = make_splits(list(reversed(rows)), folds=5, test_fraction=0.25, seed=3)
    assert plan.patient_split == shuffled.patient_split
    patient_label = {r.patient: max(x.label for x in rows if x.patient == r.patient) for r in rows}
    test_patients = {p for p, s in plan.patient_split.items() if s == "test"}
    positives = sum(patient_label[p] for p in test_patients)
    assert len(test_patients) == 15  # 40 tumour + 20 normal patients, a quarter of each
    assert positives == 10
    assert make_splits(rows, folds=5, test_fraction=0.25, seed=4).patient_split != plan.patient_split


def test_fixed_split_column_wins() -> None:
    rows = [
        LabelRow(r.slide, r.patient, r.label, r.site, "test" if r.patient in ("P0001", "P0003") else "train")
        for r in cohort(patients=30)
    ]
    plan = make_splits(rows, folds=3, seed=0)
    assert {p for p, s in plan.patient_split.items() if s == "test"} == {"P0001", "P0003"}


def test_impossible_splits_are_refused_with_a_reason() -> None:
    with pytest.raises(LabelsError, match="at least 5 sites"):
        make_splits(cohort(sites=3), folds=5, site_preserving=True)
    with pytest.raises(LabelsError, match="both classes"):
        make_splits([r for r in cohort() if r.label == 1], folds=3)
    with pytest.raises(LabelsError, match="at least 2 folds"):
        make_splits(cohort(), folds=1)


def test_labels_file_parsing_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "labels.csv"
    good.write_text(
        "slide,patient,label,site,split\n"
        "a.svs,P1,tumour,site-A,\nb.svs,P1,normal,site-A,\nc.svs,P2,0,site-B,test\n\n"
    )
    rows = read_labels(good)
    assert [(r.slide, r.patient, r.label, r.fixed_split) for r in rows] == [
        ("a.svs", "P1", 1, ""),
        ("b.svs", "P1", 0, ""),
        ("c.svs", "P2", 0, "test"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,patient,label\na.svs,P1,maybe\na.svs,P2,tumour\n")
    with pytest.raises(LabelsError, match=r"line 2: label 'maybe'"):
        read_labels(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("slide,label\na.svs,tumour\n")
    with pytest.raises(LabelsError, match="missing column"):
        read_labels(missing)
    split_conflict = tmp_path / "conflict.csv"
    split_conflict.write_text("slide,patient,label,split\na,P1,1,test\nb,P1,0,train\n")
    with pytest.raises(LabelsError, match="different fixed splits"):
        read_labels(split_conflict)


def test_slides_resolve_by_id_key_or_file_name() -> None:
    rows = [LabelRow("abc123", "P1", 1), LabelRow("batch/two.svs", "P2", 0), LabelRow("three.svs", "P3", 0)]
    sources = [("abc123", "x/one.svs"), ("def456", "batch/two.svs"), ("ghi789", "other/three.svs")]
    resolved = resolve_slide_ids(rows, sources)
    assert [r.slide_id for r in resolved] == ["abc123", "def456", "ghi789"]
    with pytest.raises(LabelsError, match="never ingested"):
        resolve_slide_ids([LabelRow("nope.svs", "P1", 1)], sources)
    # the same content uploaded under two names is one slide: listing both would count it twice
    with pytest.raises(LabelsError, match="same slide"):
        resolve_slide_ids(
            [LabelRow("a.svs", "P1", 1), LabelRow("b.svs", "P2", 1)], [("s1", "a.svs"), ("s1", "b.svs")]
        )


def test_split_summary_counts() -> None:
    rows = cohort(patients=24)
    plan = make_splits(rows, folds=3, seed=0)
    summary = split_summary(rows, plan)
    assert sum(v["slides"] for v in summary.values()) == len(rows)
    assert sum(v["patients"] for v in summary.values()) == len({r.patient for r in rows})
    assert Counter(plan.patient_split.values())["test"] == summary["test"]["patients"]
