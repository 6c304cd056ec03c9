"""Gated-attention multiple-instance learning (Ilse, Tomczak and Welling, ICML 2018) and a small trainer.

A slide is a *bag* of tile embeddings with one label. The model scores every tile, turns the scores into
attention weights that sum to one over the bag, pools the tiles by those weights and classifies the pooled
vector. The attention weights are what the heatmap and the "top tiles" show.

``train_mil`` is deliberately small (one bag per step, Adam, class-weighted BCE, early stopping on
validation loss): enough to train the shipped default model on synthetic bags. The full training and
evaluation workflow (patient splits, k-fold, bootstrap intervals) builds on it elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from wsitk.shared.models.backbones import seeded_torch


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL: ``forward(features [N, D]) -> (logit [], attention [N])``.

    The input is standardised with the ``feature_mean`` / ``feature_scale`` buffers (fitted by
    ``train_mil`` on the training tiles) so that the exported ONNX model takes raw embedder output and no
    separate preprocessing step can drift out of sync with the weights.
    """

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, in_dim: int, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1 or attn_dim < 1:
            raise ValueError(
                f"in_dim, hidden and attn_dim must be positive, got {in_dim}, {hidden}, {attn_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.hidden = hidden
        self.attn_dim = attn_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_scale", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attn_dim)  # tanh branch
        self.attention_u = nn.Linear(hidden, attn_dim)  # sigmoid gate
        self.attention_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, 1)

    def fit_feature_normalisation(self, tiles: np.ndarray) -> None:
        """Set the input standardisation from training tiles ``[M, D]`` (per-dimension mean and 1/std)."""
        tiles64 = np.asarray(tiles, dtype=np.float64)
        mean = tiles64.mean(axis=0)
        std = tiles64.std(axis=0)
        scale = 1.0 / np.maximum(std, 1e-6)
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed((features - self.feature_mean) * self.feature_scale)  # [N, hidden]
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)  # [N]
        pooled = attention @ hidden  # [hidden]
        logit = self.classifier(pooled).squeeze(-1)  # []
        return logit, attention


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float | None = None
    val_auc: float | None = None


@dataclass
class TrainedMil:
    """The result of ``train_mil``: the model (eval mode, best epoch restored) and the per-epoch history."""

    model: GatedAttentionMIL
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


def binary_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half). Needs both classes present."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative labels")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average_rank, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def choose_threshold(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray
) -> float:
    """The probability threshold with the best balanced accuracy on (validation!) bags.

    Candidates are midpoints between neighbouring distinct scores; among equally good ones the middle one
    is taken, so a cleanly separated validation set gives a threshold in the middle of the gap rather than
    on the edge of one class.
    """
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.all() or (~y).all():
        raise ValueError("choosing a threshold needs validation bags of both classes")
    distinct = np.unique(p)
    candidates = np.concatenate([[0.0], (distinct[:-1] + distinct[1:]) / 2.0, [1.0]])
    predicted = p[None, :] >= candidates[:, None]
    sensitivity = (predicted & y).sum(axis=1) / y.sum()
    specificity = (~predicted & ~y).sum(axis=1) / (~y).sum()
    balanced = (sensitivity + specificity) / 2.0
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread for the block (restoring the previous setting).

    A MIL step is a few tiny matrix products; torch's intra-op thread pool only adds synchronisation to
    them: measured here, one bag-per-step epoch ran 8x faster on one thread than on two busy cores.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def predict_bags(model: GatedAttentionMIL, bags: Sequence[np.ndarray]) -> np.ndarray:
    """P(tumour) for each bag, with the torch model in eval mode."""
    model.eval()
    with torch.no_grad(), single_threaded_torch():
        logits = [model(torch.as_tensor(np.asarray(b, dtype=np.float32)))[0] for b in bags]
    return torch.sigmoid(torch.stack(logits)).numpy().astype(np.float64)


def _check_bags(bags: Sequence[np.ndarray], labels: Sequence[int], what: str) -> int:
    if len(bags) != len(labels):
        raise ValueError(f"{what}: {len(bags)} bags but {len(labels)} labels")
    if not bags:
        raise ValueError(f"{what}: no bags given")
    dims = {np.asarray(b).shape[1] if np.asarray(b).ndim == 2 else -1 for b in bags}
    if len(dims) != 1 or -1 in dims:
        raise ValueError(
            f"{what}: every bag must be a 2-D array [tiles, D] with the same D; got D values {dims}"
        )
    if any(len(b) == 0 for b in bags):
        raise ValueError(f"{what}: empty bag (a slide without tiles cannot be used for training)")
    if {int(label) for label in labels} - {0, 1}:
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (tumour)")
    return dims.pop()


def _bag_loss(model: GatedAttentionMIL, bag: torch.Tensor, label: float, weight: float) -> torch.Tensor:
    logit, _ = model(bag)
    target = torch.tensor(label, dtype=torch.float32)
    return weight * nn.functional.binary_cross_entropy_with_logits(logit, target)


def train_mil(
    bags: Sequence[np.ndarray],
    labels: Sequence[int],
    *,
    epochs: int = 40,
    lr: float = 2e-4,
    seed: int = 0,
    val_bags: Sequence[np.ndarray] | None = None,
    val_labels: Sequence[int] | None = None,
    max_tiles_per_bag: int = 512,
    weight_decay: float = 1e-4,
    patience: int = 8,
    hidden: int = 128,
    attn_dim: int = 64,
    dropout: float = 0.25,
) -> TrainedMil:
    """Train a ``GatedAttentionMIL`` on bags of tile features, one bag per step, reproducibly from ``seed``.

    Each epoch visits the bags in a seeded random order; a bag larger than ``max_tiles_per_bag`` is
    sub-sampled (a fresh random subset each epoch: cheap augmentation, bounded memory). The loss is BCE
    weighted by inverse class frequency, so an unbalanced cohort does not teach "always normal". With
    validation bags, training stops after ``patience`` epochs without a lower validation loss and the best
    epoch's weights are restored; the validation bags only ever choose the epoch, never a gradient.
    """
    in_dim = _check_bags(bags, labels, "training set")
    y = np.asarray(labels, dtype=np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"training needs both classes; got {n_pos} tumour and {n_neg} normal bags")
    validation: tuple[Sequence[np.ndarray], np.ndarray] | None = None
    if val_bags is not None and val_labels is not None and len(val_bags) > 0:
        if _check_bags(val_bags, val_labels, "validation set") != in_dim:
            raise ValueError("validation bags have a different feature dimension from the training bags")
        validation = (val_bags, np.asarray(val_labels, dtype=np.float64))
    class_weight = {1: len(y) / (2.0 * n_pos), 0: len(y) / (2.0 * n_neg)}
    rng = np.random.default_rng(seed)

    with seeded_torch(seed), single_threaded_torch():
        model = GatedAttentionMIL(in_dim, hidden=hidden, attn_dim=attn_dim, dropout=dropout)
        model.fit_feature_normalisation(np.concatenate([np.asarray(b) for b in bags]))
        optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        train_tensors = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in bags]
        history: list[EpochRecord] = []
        best_state = copy.deepcopy(model.state_dict())
        best_loss, best_epoch, stale = float("inf"), 0, 0
        for epoch in range(1, epochs + 1):
            model.train()
            total = 0.0
            for index in rng.permutation(len(train_tensors)):
                bag = train_tensors[index]
                if len(bag) > max_tiles_per_bag:
                    bag = bag[torch.as_tensor(rng.choice(len(bag), max_tiles_per_bag, replace=False))]
                loss = _bag_loss(model, bag, float(y[index]), class_weight[int(y[index])])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item()
            train_loss = total / len(train_tensors)
            if validation is None:
                history.append(EpochRecord(epoch, train_loss))
                best_epoch = epoch
                continue
            val_loss, val_auc = _evaluate(model, *validation)
            history.append(EpochRecord(epoch, train_loss, val_loss, val_auc))
            if val_loss < best_loss - 1e-6:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= patience:
                    break
        if validation is not None:
            model.load_state_dict(best_state)
    model.eval()
    return TrainedMil(
        model=model, history=history, best_epoch=best_epoch, stopped_early=len(history) < epochs
    )


def _evaluate(
    model: GatedAttentionMIL, bags: Sequence[np.ndarray], labels: np.ndarray
) -> tuple[float, float | None]:
    """Mean (unweighted) BCE and AUC on held-out bags; AUC is None when they hold one class only."""
    probabilities = np.clip(predict_bags(model, bags), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities)))
    auc = binary_auc(labels, probabilities) if 0 < labels.sum() < len(labels) else None
    return loss, auc
