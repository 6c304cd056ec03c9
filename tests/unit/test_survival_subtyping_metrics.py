"""The metric code of subtyping and survival against hand-computed values, and the labels format of both
tasks (``tasks.py``) beside the unchanged tumour/normal format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from wsitk.shared.models.labels import LabelsError
from wsitk.shared.models.subtyping import confusion, evaluate_subtyping, macro_auc, weighted_multiclass
from wsitk.shared.models.survival import (
    concordance_index,
    concordance_interval,
    cox_partial_likelihood_loss,
    kaplan_meier,
    logrank_test,
    weighted_concordance,
)
from wsitk.shared.models.tasks import (
    BINARY,
    SUBTYPE,
    SURVIVAL,
    detect_task,
    make_task_splits,
    read_task_labels,
    split_task_validation,
)

# ----------------------------------------------------------------------------------------------------------
# Survival


def test_c_index_with_tied_times_tied_risks_and_censoring_matches_hand_count() -> None:
    times = [2, 4, 4, 6, 8]
    events = [1, 1, 0, 1, 0]
    risk = [5, 3, 3, 4, 1]
    # comparable pairs (shorter time is an event; equal times: event vs censored): 0>1,2,3,4 (4 concordant);
    # 1 vs 2 (tied time, 2 censored; tied risk: 1/2), 1 vs 3 (discordant), 1 vs 4 (concordant); 3 vs 4
    assert concordance_index(times, events, risk) == pytest.approx(6.5 / 8)
    # two events at the same time are not comparable: subject 5 dies at 6 like subject 3
    times6, events6, risk6 = [*times, 6], [*events, 1], [*risk, 2]
    assert concordance_index(times6, events6, risk6) == pytest.approx(9.5 / 11)
    assert math.isnan(concordance_index([1, 2], [0, 0], [1, 2]))  # no event: no comparable pair
    # the bootstrap's weighted form equals the C-index of the data with the units repeated
    weights = np.array([[2, 0, 1, 3, 1, 1]], dtype=np.float64)
    expanded = np.repeat(np.arange(6), weights[0].astype(int))
    expected = concordance_index(
        np.array(times6)[expanded], np.array(events6)[expanded], np.array(risk6)[expanded]
    )
    assert weighted_concordance(times6, events6, risk6, weights)[0] == pytest.approx(expected)


def test_c_index_interval_covers_the_point_and_separates_informative_from_random_risk() -> None:
    rng = np.random.default_rng(0)
    hazard = rng.normal(size=200)
    times = rng.exponential(np.exp(-hazard))
    events = (rng.random(200) < 0.7).astype(int)
    good = concordance_interval(times, events, hazard, n_resamples=500, seed=1)
    assert good.lower < good.point < good.upper and good.lower > 0.6
    noise = concordance_interval(times, events, rng.normal(size=200), n_resamples=500, seed=1)
    assert noise.lower < 0.5 < noise.upper
    assert good.method == "patient bootstrap (stratified by event)" and good.resamples_used == 500


def test_logrank_matches_the_textbook_leukaemia_example() -> None:
    """Freireich et al. 1963, 6-MP vs placebo remission times (weeks); Kleinbaum and Klein, Survival
    Analysis, ch. 2: expected events 19.25 (6-MP) and 10.75 (placebo), variance 6.257, chi-square 16.79,
    p = 4.2e-5 (R's survdiff gives the same)."""
    six_mp = [6, 6, 6, 6, 7, 9, 10, 10, 11, 13, 16, 17, 19, 20, 22, 23, 25, 32, 32, 34, 35]
    six_mp_event = [1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    placebo = [1, 1, 2, 2, 3, 4, 4, 5, 5, 8, 8, 8, 8, 11, 11, 12, 12, 15, 17, 22, 23]
    result = logrank_test(
        six_mp + placebo, six_mp_event + [1] * len(placebo), [0] * len(six_mp) + [1] * len(placebo)
    )
    assert result.observed == (9.0, 21.0)
    assert result.expected[0] == pytest.approx(19.25, abs=0.01)
    assert result.expected[1] == pytest.approx(10.75, abs=0.01)
    assert result.variance == pytest.approx(6.257, abs=0.001)
    assert result.statistic == pytest.approx(16.79, abs=0.01)
    assert result.p_value == pytest.approx(4.17e-5, rel=0.01)


def test_kaplan_meier_product_limit_by_hand() -> None:
    curve = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    # t=1: 4/5; t=2: 3 of 4 at risk survive; t=3: 1 of 2 survives
    np.testing.assert_allclose(curve.times, [0, 1, 2, 3])
    np.testing.assert_allclose(curve.survival, [1.0, 0.8, 0.6, 0.3])
    np.testing.assert_array_equal(curve.at_risk, [5, 5, 4, 2])
    np.testing.assert_allclose(curve.censored, [2, 4])
    assert curve.median() == 3.0


def test_cox_loss_is_the_breslow_partial_likelihood_with_ties() -> None:
    risk = [0.5, -0.2, 1.0, 0.0, 0.3]
    time = [1.0, 2.0, 2.0, 3.0, 2.0]
    event = [1, 1, 0, 1, 1]
    r = np.array(risk)
    # event at t=1: everyone at risk; the two events at t=2 share the risk set {1, 2, 3, 4}; t=3: {3}
    at_two = np.log(np.exp(r[[1, 2, 3, 4]]).sum())
    terms = [r[0] - np.log(np.exp(r).sum()), r[1] - at_two, r[4] - at_two, 0.0]
    expected = -sum(terms) / 4
    loss = cox_partial_likelihood_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    order = [3, 0, 4, 2, 1]  # the order of the batch does not matter
    shuffled = cox_partial_likelihood_loss(
        torch.tensor(risk)[order], torch.tensor(time)[order], torch.tensor(event)[order]
    )
    assert float(shuffled) == pytest.approx(expected, rel=1e-6)
    assert float(
        cox_partial_likelihood_loss(torch.tensor(risk) + 7.0, torch.tensor(time), torch.tensor(event))
    ) == (pytest.approx(expected, rel=1e-5))  # shift-invariant: a risk has no origin
    censored = torch.tensor(risk, requires_grad=True)
    zero = cox_partial_likelihood_loss(censored, torch.tensor(time), torch.zeros(5))
    zero.backward()
    assert float(zero.detach()) == 0.0 and censored.grad is not None


# ----------------------------------------------------------------------------------------------------------
# Subtyping

LABELS = [0, 0, 1, 1, 2, 2]
PROBS = [
    [0.8, 0.1, 0.1],
    [0.4, 0.5, 0.1],
    [0.2, 0.7, 0.1],
    [0.3, 0.3, 0.4],
    [0.1, 0.2, 0.7],
    [0.5, 0.1, 0.4],
]


def test_macro_auc_balanced_accuracy_and_confusion_by_hand() -> None:
    # one-vs-rest: class 0 7/8, class 1 7/8, class 2 7.5/8 (0.4 ties one negative 0.4)
    assert macro_auc(LABELS, PROBS) == pytest.approx((7 + 7 + 7.5) / 24)
    point = weighted_multiclass(LABELS, PROBS, np.ones((1, 6)))
    np.testing.assert_allclose(point["auc"][0], [7 / 8, 7 / 8, 7.5 / 8])
    # argmax: 0, 1, 1, 2, 2, 0: one of two right per class
    np.testing.assert_allclose(point["sensitivity"][0], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(point["specificity"][0], [0.75, 0.75, 0.75])
    assert point["balanced_accuracy"][0] == pytest.approx(0.5)
    assert confusion(LABELS, PROBS) == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    # the weighted form equals the metrics of the repeated slides
    weights = np.array([[2.0, 1.0, 0.0, 3.0, 1.0, 2.0]])
    index = np.repeat(np.arange(6), weights[0].astype(int))
    repeated = weighted_multiclass(np.array(LABELS)[index], np.array(PROBS)[index], np.ones((1, len(index))))
    for key in ("macro_auc", "balanced_accuracy", "accuracy"):
        assert weighted_multiclass(LABELS, PROBS, weights)[key][0] == pytest.approx(repeated[key][0])


def test_subtype_evaluation_resamples_patients_within_each_class() -> None:
    patients = ["a", "a", "b", "c", "d", "e"]
    labels = [0, 0, 1, 1, 2, 2]
    evaluation = evaluate_subtyping(labels, PROBS, patients, ["x", "y", "z"], n_bootstrap=300, seed=0)
    macro = evaluation.overall["macro_auc"]
    assert macro.point == pytest.approx(21.5 / 24) and macro.lower <= macro.point <= macro.upper
    assert macro.resamples_used == 300  # stratified: every resample holds every class
    assert evaluation.per_class["z"]["auc"].method == "clustered DeLong"
    with pytest.raises(ValueError, match="one subtype"):
        evaluate_subtyping([0, 1, 1, 1, 2, 2], PROBS, patients, ["x", "y", "z"], n_bootstrap=0)


# ----------------------------------------------------------------------------------------------------------
# Labels files and splits


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_task_is_inferred_from_the_columns_and_binary_files_read_as_before(tmp_path: Path) -> None:
    binary = _csv(tmp_path / "b.csv", "slide,patient,label,subtype\ns1,p1,tumour,x\n")
    subtype = _csv(
        tmp_path / "s.csv", "slide,patient,subtype,site\ns1,p1,luad,A\ns2,p1,luad,A\ns3,p2,lusc,B\n"
    )
    survival = _csv(tmp_path / "v.csv", "slide,patient,time,event\ns1,p1,12.5,1\ns2,p2,30,censored\n")
    assert detect_task(binary) == BINARY  # a label column keeps the tumour/normal path
    assert detect_task(binary, SUBTYPE) == SUBTYPE
    assert (detect_task(subtype), detect_task(survival)) == (SUBTYPE, SURVIVAL)
    rows, classes = read_task_labels(subtype, SUBTYPE)
    assert classes == ["luad", "lusc"] and [r.label for r in rows] == [0, 0, 1]
    rows, classes = read_task_labels(survival, SURVIVAL)
    assert classes == [] and [(r.time, r.event, r.label) for r in rows] == [(12.5, 1, 1), (30.0, 0, 0)]
    with pytest.raises(LabelsError, match="needs the column"):
        detect_task(subtype, SURVIVAL)


def test_task_labels_are_checked_per_line_and_per_patient(tmp_path: Path) -> None:
    bad = _csv(
        tmp_path / "bad.csv", "slide,patient,time,event\ns1,p1,-3,1\ns2,p2,4,maybe\ns3,p3,5,1\ns4,p3,6,1\n"
    )
    with pytest.raises(LabelsError) as error:
        read_task_labels(bad, SURVIVAL)
    message = str(error.value)
    assert "line 2: time" in message and "line 3: event" in message and "['p3']" in message
    mixed = _csv(tmp_path / "mixed.csv", "slide,patient,subtype\ns1,p1,a\ns2,p1,b\n")
    with pytest.raises(LabelsError, match="different subtype"):
        read_task_labels(mixed, SUBTYPE)


def test_task_splits_keep_patients_together_and_stratify_by_class_or_event(tmp_path: Path) -> None:
    lines = ["slide,patient,subtype"]
    for p in range(36):
        for s in range(1 + p % 2):
            lines.append(f"s{p}-{s},p{p},{'abc'[p % 3]}")
    rows, _ = read_task_labels(_csv(tmp_path / "s.csv", "\n".join(lines) + "\n"), SUBTYPE)
    for seed in range(4):
        plan = make_task_splits(rows, task=SUBTYPE, folds=3, test_fraction=0.25, seed=seed)
        assert all(plan.split_of(r) == plan.patient_split[r.patient] for r in rows)
        for split in {*plan.patient_split.values()}:
            members = {r.patient: r.label for r in rows if plan.split_of(r) == split}
            assert sorted(np.bincount(list(members.values()), minlength=3)) in ([3, 3, 3], [4, 4, 4])
        fold = plan.fold_rows(rows, 0)
        stop, select, shared = split_task_validation(fold, seed, SUBTYPE)
        assert not shared and {r.patient for r in stop}.isdisjoint({r.patient for r in select})
    assert (
        make_task_splits(rows, task=SUBTYPE, seed=1).to_dict()
        == make_task_splits(list(reversed(rows)), task=SUBTYPE, seed=1).to_dict()
    )
    survival = [f"s{p},p{p},{p + 1},{int(p % 3 == 0)}" for p in range(12)]  # 4 patients with an event
    rows, _ = read_task_labels(
        _csv(tmp_path / "v.csv", "slide,patient,time,event\n" + "\n".join(survival)), SURVIVAL
    )
    with pytest.raises(LabelsError, match="with an observed event"):
        make_task_splits(rows, task=SURVIVAL, folds=4, test_fraction=0.25)


def test_site_preserving_task_folds_keep_each_site_in_one_fold(tmp_path: Path) -> None:
    lines = ["slide,patient,time,event,site"]
    for p in range(40):
        lines.append(f"s{p},p{p},{p + 1},{int(p % 2 == 0)},site-{p % 5}")
    rows, _ = read_task_labels(_csv(tmp_path / "v.csv", "\n".join(lines) + "\n"), SURVIVAL)
    plan = make_task_splits(rows, task=SURVIVAL, folds=3, test_fraction=0.2, site_preserving=True)
    folds_of_site: dict[str, set[str]] = {}
    for row in plan.development_rows(rows):
        folds_of_site.setdefault(row.site, set()).add(plan.split_of(row))
    assert all(len(folds) == 1 for folds in folds_of_site.values())
    assert {f for folds in folds_of_site.values() for f in folds} == {"fold-0", "fold-1", "fold-2"}


def test_wsi_train_takes_a_task_and_infers_it_when_left_out() -> None:
    import argparse

    from wsitk.shared.models.training import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert parser.parse_args(["l.csv", "--out", "run", "--task", "survival"]).task == SURVIVAL
    assert parser.parse_args(["l.csv", "--out", "run"]).task is None  # inferred from the columns
    with pytest.raises(SystemExit):
        parser.parse_args(["l.csv", "--out", "run", "--task", "grading"])
