"""Survival from slides: the Cox loss of a MIL risk head, Harrell's C-index with a patient-bootstrap
interval, Kaplan-Meier curves and the log-rank test.

- **Cox partial likelihood** (Breslow's handling of tied times) over a mini-batch of bags: the risk set of
  a bag is every bag of the batch whose time is at least its time. A risk is only defined up to a constant,
  so a batch needs several bags and at least one observed event to say anything (``tasks.py`` trains on
  mini-batches of bags).
- **Harrell's C-index**: among comparable pairs (the shorter time is an observed event; on equal times an
  event against a censored time, which survived at least as long), the share where the shorter survivor
  has the higher risk; equal risks count one half. Pairs of two events at the same time are not comparable.
  Weighted by patient-bootstrap counts, so the 2,000 replicates of its interval are a few matrix products.
- **Kaplan-Meier** product-limit estimate and the two-group **log-rank test** (Mantel-Haenszel form, the
  hypergeometric variance with ties), whose statistic is chi-square with one degree of freedom.

numpy (and torch for the loss only); matplotlib imported inside ``plot_kaplan_meier``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from wsitk.shared.models.intervals import MetricEstimate, _draw_patient_counts
from wsitk.shared.models.metrics import FloatArray

if TYPE_CHECKING:
    import torch

_CHUNK_ELEMENTS = 4_000_000  # bootstrap weights processed in chunks of about this many elements


def _survival_inputs(time: Any, event: Any) -> tuple[FloatArray, np.ndarray]:
    t = np.asarray(time, dtype=np.float64)
    e_raw = np.asarray(event)
    if t.ndim != 1 or e_raw.shape != t.shape:
        raise ValueError(f"time and event must be 1-D of one length; got shapes {t.shape} and {e_raw.shape}")
    if len(t) == 0:
        raise ValueError("no survival times given")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("survival times must be finite and non-negative")
    if not np.isin(e_raw, (0, 1)).all():
        raise ValueError("event must be 1 (event observed) or 0 (censored)")
    return t, e_raw.astype(bool)


# ----------------------------------------------------------------------------------------------------------
# The training loss


def cox_partial_likelihood_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Breslow log partial likelihood per observed event: ``-mean over events i of (r_i - log sum
    over {j: t_j >= t_i} exp(r_j))``. Zero (still attached to the graph) when the batch has no event."""
    import torch

    order = torch.argsort(time, descending=True)
    r, t, e = risk[order], time[order], event[order].to(risk.dtype)
    log_cumulative = torch.logcumsumexp(r, dim=0)  # log sum of exp(risk) over the first i+1 (longest) times
    # the risk set of a tied time includes all of its ties: take the cumulative sum at the last tie
    descending = -t.detach().cpu().numpy()
    last = np.searchsorted(descending, descending, side="right") - 1
    log_risk_set = log_cumulative[torch.as_tensor(last, dtype=torch.long)]
    events = e.sum()
    if float(events) == 0.0:
        return (r * 0.0).sum()
    return -((r - log_risk_set) * e).sum() / events


# ----------------------------------------------------------------------------------------------------------
# Harrell's C-index


def _concordance_matrix(
    time: FloatArray, event: np.ndarray, risk: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """``(comparable [n, n], concordant [n, n])``: pair (i, j) is comparable when i's time is shorter and
    an event (or equal, i an event and j censored); concordant when then i's risk is higher (ties 0.5)."""
    shorter = time[:, None] < time[None, :]
    tied_censored = (time[:, None] == time[None, :]) & ~event[None, :]
    comparable = (event[:, None] & (shorter | tied_censored)).astype(np.float64)
    order = np.sign(risk[:, None] - risk[None, :])
    concordant = comparable * (0.5 * (order + 1.0))
    return comparable, concordant


def concordance_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's C of ``risk`` (higher: shorter survival expected); NaN without a comparable pair."""
    t, e = _survival_inputs(time, event)
    r = np.asarray(risk, dtype=np.float64)
    if r.shape != t.shape:
        raise ValueError(f"{len(r)} risks for {len(t)} times")
    comparable, concordant = _concordance_matrix(t, e, r)
    pairs = comparable.sum()
    return float(concordant.sum() / pairs) if pairs > 0 else math.nan


def weighted_concordance(time: Any, event: Any, risk: Any, weights: FloatArray) -> FloatArray:
    """C-index per row of ``weights`` ``[resamples, n]``: unit ``i`` counted ``weights[b, i]`` times (a
    pair of copies counts ``w_i * w_j``; a unit never pairs with its own copies)."""
    t, e = _survival_inputs(time, event)
    comparable, concordant = _concordance_matrix(t, e, np.asarray(risk, dtype=np.float64))
    w = np.asarray(weights, dtype=np.float64)
    numerator = ((w @ concordant) * w).sum(axis=1)
    denominator = ((w @ comparable) * w).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def concordance_interval(
    time: Any,
    event: Any,
    risk: Any,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> MetricEstimate:
    """C-index of one value per **patient**, with the percentile interval of a patient bootstrap stratified
    by event (each resample draws as many patients with an event as there are, and as many censored ones),
    so every resample keeps the share of observed events."""
    t, e = _survival_inputs(time, event)
    point = concordance_index(t, e, risk)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    values: list[FloatArray] = []
    if n_resamples > 0:
        counts = _draw_patient_counts(len(t), n_resamples, seed, e.astype(np.int64))
        chunk = max(1, _CHUNK_ELEMENTS // (len(t) * len(t)))
        for start in range(0, n_resamples, chunk):
            values.append(weighted_concordance(t, e, risk, counts[start : start + chunk].astype(np.float64)))
    replicates = np.concatenate(values) if values else np.empty(0)
    defined = replicates[~np.isnan(replicates)]
    tail = 100.0 * (1.0 - confidence) / 2.0
    lower, upper = (
        (float(np.percentile(defined, tail)), float(np.percentile(defined, 100.0 - tail)))
        if len(defined)
        else (math.nan, math.nan)
    )
    return MetricEstimate(
        point=point,
        lower=lower,
        upper=upper,
        resamples_used=len(defined),
        resamples_skipped=len(replicates) - len(defined),
        method="patient bootstrap (stratified by event)",
        bootstrap_lower=lower,
        bootstrap_upper=upper,
    )


# ----------------------------------------------------------------------------------------------------------
# Kaplan-Meier and the log-rank test


@dataclass(frozen=True)
class KaplanMeier:
    """The product-limit estimate as a step function: ``survival[i]`` holds from ``times[i]`` on
    (``times[0] = 0``, ``survival[0] = 1``); ``censored`` are the censoring times (ticks on the plot)."""

    times: FloatArray
    survival: FloatArray
    at_risk: np.ndarray
    censored: FloatArray

    def median(self) -> float:
        """The first time the estimate drops to 0.5 or below; NaN when it never does."""
        below = np.flatnonzero(self.survival <= 0.5)
        return float(self.times[below[0]]) if len(below) else math.nan


def kaplan_meier(time: Any, event: Any) -> KaplanMeier:
    t, e = _survival_inputs(time, event)
    event_times = np.unique(t[e])
    survival = [1.0]
    at_risk = [len(t)]
    current = 1.0
    for moment in event_times:
        n = int((t >= moment).sum())
        d = int((e & (t == moment)).sum())
        current *= 1.0 - d / n
        survival.append(current)
        at_risk.append(n)
    return KaplanMeier(
        times=np.concatenate([[0.0], event_times]),
        survival=np.asarray(survival),
        at_risk=np.asarray(at_risk),
        censored=np.sort(t[~e]),
    )


@dataclass(frozen=True)
class LogRank:
    """Two-group log-rank test: observed and expected events per group, the variance of group 1's
    observed-minus-expected, the chi-square statistic (1 degree of freedom) and its p-value."""

    observed: tuple[float, float]
    expected: tuple[float, float]
    variance: float
    statistic: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "observed": list(self.observed),
            "expected": list(self.expected),
            "variance": self.variance,
            "statistic": self.statistic,
            "p_value": self.p_value,
        }


def logrank_test(time: Any, event: Any, group: Any) -> LogRank:
    """Log-rank test of two groups (``group`` 0 or 1 per subject), from the events at each distinct event
    time: expected events of group 1 ``d n1 / n``, hypergeometric variance ``d (n1/n)(1 - n1/n)(n - d)/(n - 1)``."""
    t, e = _survival_inputs(time, event)
    g = np.asarray(group)
    if g.shape != t.shape or not np.isin(g, (0, 1)).all():
        raise ValueError("group must be 0 or 1 for every subject")
    g1 = g.astype(bool)
    if g1.all() or (~g1).all():
        raise ValueError("the log-rank test needs subjects in both groups")
    observed1 = expected1 = variance = 0.0
    for moment in np.unique(t[e]):
        risk = t >= moment
        n, n1 = float(risk.sum()), float((risk & g1).sum())
        dying = e & (t == moment)
        d, d1 = float(dying.sum()), float((dying & g1).sum())
        observed1 += d1
        expected1 += d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1.0 - n1 / n) * (n - d) / (n - 1.0)
    total = float(e.sum())
    statistic = (observed1 - expected1) ** 2 / variance if variance > 0 else math.nan
    p_value = math.erfc(math.sqrt(statistic / 2.0)) if not math.isnan(statistic) else math.nan
    return LogRank(
        observed=(total - observed1, observed1),
        expected=(total - expected1, expected1),
        variance=variance,
        statistic=statistic,
        p_value=p_value,
    )


def plot_kaplan_meier(
    groups: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[int] | np.ndarray]],
    path: Path | str,
    title: str = "Kaplan-Meier, held-out test set",
    *,
    note: str = "",
) -> Path:
    """One Kaplan-Meier step curve per group (censoring ticks, number of patients in the legend), with
    ``note`` (e.g. the log-rank p-value) in the corner, saved as PNG at ``path``."""
    from wsitk.shared.models.plots import _new_figure, _save

    if not groups:
        raise ValueError("nothing to plot: give at least one group as {name: (times, events)}")
    figure = _new_figure(6.0, 4.6)
    axes = figure.add_subplot()
    for name, (times, events) in groups.items():
        curve = kaplan_meier(times, events)
        end = float(np.max(np.asarray(times, dtype=np.float64)))
        x = np.concatenate([curve.times, [end]])
        y = np.concatenate([curve.survival, [curve.survival[-1]]])
        (line,) = axes.step(x, y, where="post", linewidth=1.6, label=f"{name} (n={len(times)})")
        if len(curve.censored):
            index = np.searchsorted(curve.times, curve.censored, side="right") - 1
            axes.plot(curve.censored, curve.survival[index], "|", color=line.get_color(), markersize=8)
    axes.set(ylim=(-0.02, 1.02), xlabel="Time", ylabel="Survival probability", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    if note:
        axes.text(0.02, 0.04, note, transform=axes.transAxes, fontsize="small")
    return _save(figure, path)
