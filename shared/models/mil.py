"""Multiple-instance learning for slides: the aggregator interface, gated attention MIL and the trainer.

A slide is a *bag* of tile embeddings with one label. An aggregator scores every tile, turns the scores into
attention weights that sum to one over the bag, pools the tiles by those weights and classifies the pooled
vector. The attention weights are what the heatmap and the "top tiles" show.

``MilAggregator`` is what every aggregator shares (input standardisation, its own training loss, a
description that rebuilds it); ``GatedAttentionMIL`` (Ilse, Tomczak and Welling, ICML 2018) is the default
and lives here; the others (CLAM-SB, DSMIL; TransMIL in ``transmil.py``) and fold ensembles live in
``aggregators.py``.

``train_mil`` is deliberately small (one bag per step, Adam, class-weighted loss, early stopping on
validation loss, resumable from a checkpoint): enough to train the shipped default model on synthetic bags
and one fold of a k-fold run. The full training and evaluation workflow (patient splits, k-fold, bootstrap
intervals) builds on it elsewhere.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from wsitk.shared.models.backbones import seeded_torch

CHECKPOINT_FORMAT = "wsitk-mil-checkpoint-v1"


class MilAggregator(nn.Module, abc.ABC):
    """What every slide aggregator provides: ``forward(features [N, D]) -> (logit [], attention [N])``.

    The input is standardised with the ``feature_mean`` / ``feature_scale`` buffers (fitted by
    ``train_mil`` on the training tiles) inside ``forward``, so that the exported ONNX model takes raw
    embedder output and no separate preprocessing step can drift out of sync with the weights.

    ``bag_loss`` is the aggregator's own training objective for one bag, because not every method trains
    on the bag logit alone (CLAM adds an instance-clustering term, DSMIL a max-instance term); the trainer
    only ever calls ``bag_loss``. ``architecture()`` describes the module for model metadata, and
    ``aggregators.build_aggregator(**model.architecture())`` rebuilds a module of identical shape.
    """

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim (the tile feature dimension) must be positive, got {in_dim}")
        self.in_dim = in_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_scale", torch.ones(in_dim))

    def fit_feature_normalisation(self, tiles: np.ndarray) -> None:
        """Set the input standardisation from training tiles ``[M, D]`` (per-dimension mean and 1/std)."""
        tiles64 = np.asarray(tiles, dtype=np.float64)
        mean = tiles64.mean(axis=0)
        std = tiles64.std(axis=0)
        scale = 1.0 / np.maximum(std, 1e-6)
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def fit_feature_normalisation_streamed(self, bags: Iterable[np.ndarray]) -> int:
        """The same standardisation from bags visited one at a time (float64 sums shifted by the first
        bag's mean, so no cancellation), never holding more than one bag in float64: memory is bounded by
        the largest bag, not by the cohort. Returns the number of tiles."""
        shift: np.ndarray | None = None
        total = squares = None
        count = 0
        for bag in bags:
            tiles = np.asarray(bag, dtype=np.float64)
            if shift is None:
                shift = tiles.mean(axis=0)
                total, squares = np.zeros_like(shift), np.zeros_like(shift)
            centred = tiles - shift
            total += centred.sum(axis=0)
            squares += (centred * centred).sum(axis=0)
            count += len(tiles)
        if shift is None or total is None or squares is None or count == 0:
            raise ValueError("no training tiles to standardise the input with")
        offset = total / count
        std = np.sqrt(np.maximum(squares / count - offset * offset, 0.0))
        self.feature_mean.copy_(torch.as_tensor(shift + offset, dtype=torch.float32))
        self.feature_scale.copy_(torch.as_tensor(1.0 / np.maximum(std, 1e-6), dtype=torch.float32))
        return count

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) * self.feature_scale

    @abc.abstractmethod
    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logit [], attention [N])`` for one bag of raw tile features ``[N, D]``."""

    @abc.abstractmethod
    def bag_loss(self, features: torch.Tensor, target: float, weight: float) -> torch.Tensor:
        """The training loss for one bag with label ``target`` (0 or 1), scaled by the class ``weight``."""

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """``{"name": ..., "in_dim": ..., <constructor hyper-parameters>}``, JSON-serialisable."""


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def weighted_bce(logit: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """``weight * BCE(sigmoid(logit), target)`` for a scalar logit: the bag term every aggregator uses."""
    label = torch.tensor(target, dtype=torch.float32)
    return weight * nn.functional.binary_cross_entropy_with_logits(logit, label)


class GatedAttentionMIL(MilAggregator):
    """Gated attention MIL: ``forward(features [N, D]) -> (logit [], attention [N])``.

    Its metadata name stays ``"gated-attention-mil"``, the name every model exported before the other
    aggregators existed carries; ``build_aggregator`` accepts it beside the registry name
    ``"gated-attention"``.
    """

    def __init__(self, in_dim: int, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25) -> None:
        super().__init__(in_dim)
        if hidden < 1 or attn_dim < 1:
            raise ValueError(f"hidden and attn_dim must be positive, got {hidden}, {attn_dim}")
        check_dropout(dropout)
        self.hidden = hidden
        self.attn_dim = attn_dim
        self.dropout = dropout
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attn_dim)  # tanh branch
        self.attention_u = nn.Linear(hidden, attn_dim)  # sigmoid gate
        self.attention_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed(self.standardise(features))  # [N, hidden]
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)  # [N]
        pooled = attention @ hidden  # [hidden]
        logit = self.classifier(pooled).squeeze(-1)  # []
        return logit, attention

    def bag_loss(self, features: torch.Tensor, target: float, weight: float) -> torch.Tensor:
        logit, _ = self(features)
        return weighted_bce(logit, target, weight)

    def architecture(self) -> dict[str, Any]:
        return {
            "name": "gated-attention-mil",
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "attn_dim": self.attn_dim,
            "dropout": self.dropout,
        }


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float | None = None
    val_auc: float | None = None


@dataclass
class TrainedMil:
    """The result of ``train_mil``: the model (eval mode, best epoch restored) and the per-epoch history.

    ``resumed_from_epoch`` is the last epoch a checkpoint had already completed (0: trained from scratch).
    """

    model: MilAggregator
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0


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


def predict_bags(model: nn.Module, bags: Sequence[np.ndarray]) -> np.ndarray:
    """P(tumour) for each bag, with the torch model in eval mode (any aggregator or ``MilEnsemble``)."""
    model.eval()
    with torch.no_grad(), single_threaded_torch():
        logits = [model(torch.as_tensor(np.asarray(b, dtype=np.float32)))[0] for b in bags]
    return torch.sigmoid(torch.stack(logits)).numpy().astype(np.float64)


def _check_bags(bags: Sequence[np.ndarray], labels: Sequence[int], what: str) -> int:
    if len(bags) != len(labels):
        raise ValueError(f"{what}: {len(bags)} bags but {len(labels)} labels")
    if not bags:
        raise ValueError(f"{what}: no bags given")
    shapes = [np.shape(b) for b in bags]  # a shape, not the data: lazily loaded bags stay on disk
    dims = {shape[1] if len(shape) == 2 else -1 for shape in shapes}
    if len(dims) != 1 or -1 in dims:
        raise ValueError(
            f"{what}: every bag must be a 2-D array [tiles, D] with the same D; got D values {dims}"
        )
    if any(shape[0] == 0 for shape in shapes):
        raise ValueError(f"{what}: empty bag (a slide without tiles cannot be used for training)")
    if {int(label) for label in labels} - {0, 1}:
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (tumour)")
    return dims.pop()


def _hyper_parameters(
    hidden: int | None, attn_dim: int | None, dropout: float | None, arch_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The aggregator's constructor options: ``arch_options`` plus the older keyword shortcuts."""
    shortcuts = {
        name: value
        for name, value in (("hidden", hidden), ("attn_dim", attn_dim), ("dropout", dropout))
        if value is not None
    }
    options = dict(arch_options or {})
    if reserved := sorted(options.keys() & {"name", "in_dim"}):
        raise ValueError(
            f"arch_options may not set {reserved}: the architecture is chosen by `architecture` and the "
            "input dimension comes from the bags"
        )
    if twice := sorted(shortcuts.keys() & options.keys()):
        raise ValueError(f"{twice} given both as keyword arguments and in arch_options; give each once")
    return {**shortcuts, **options}


@dataclass
class _Progress:
    """Everything besides model, optimiser and random streams that a resumed run needs to continue."""

    best_state: dict[str, torch.Tensor]
    epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_loss: float = float("inf")
    stale: int = 0
    stopped: bool = False


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
    hidden: int | None = None,
    attn_dim: int | None = None,
    dropout: float | None = None,
    architecture: str = "gated-attention",
    arch_options: Mapping[str, Any] | None = None,
    class_weighting: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_path: Path | None = None,
) -> TrainedMil:
    """Train a MIL aggregator on bags of tile features, one bag per step, reproducibly from ``seed``.

    ``architecture`` is a name from ``aggregators.AGGREGATORS`` and ``arch_options`` its constructor
    options; ``hidden``, ``attn_dim`` and ``dropout`` are shortcuts for the same options (left out, the
    aggregator's defaults apply). Each epoch visits the bags in a seeded random order; a bag larger than
    ``max_tiles_per_bag`` is sub-sampled (a fresh random subset each epoch: cheap augmentation, bounded
    memory). The loss is the aggregator's ``bag_loss``, weighted by inverse class frequency unless
    ``class_weighting`` is off, so an unbalanced cohort does not teach "always normal". With validation
    bags, training stops after ``patience`` epochs without a lower validation loss and the best epoch's
    weights are restored; the validation bags only ever choose the epoch, never a gradient.

    ``on_epoch`` is called with each epoch's record (a progress display; an exception it raises stops
    training, after the checkpoint of that epoch was saved). With ``checkpoint_path`` the complete training
    state (weights, optimiser, both random streams, history, best epoch, early-stopping counter) is written
    there atomically after every epoch; a later call with the same data and settings resumes from it and
    ends with exactly the weights an uninterrupted run would have, and a call after a finished run returns
    at once. A checkpoint from different data or settings is refused, never silently overwritten.
    """
    from wsitk.shared.models.aggregators import build_aggregator  # that module builds on this one

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
    hyper = _hyper_parameters(hidden, attn_dim, dropout, arch_options)
    if class_weighting:
        class_weight = {1: len(y) / (2.0 * n_pos), 0: len(y) / (2.0 * n_neg)}
    else:
        class_weight = {1: 1.0, 0: 1.0}
    rng = np.random.default_rng(seed)

    with seeded_torch(seed), single_threaded_torch():
        model = build_aggregator(architecture, in_dim, **hyper)
        model.fit_feature_normalisation_streamed(bags)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        progress = _Progress(best_state=copy.deepcopy(model.state_dict()))
        checkpoint: _Checkpoint | None = None
        if checkpoint_path is not None:
            settings = {
                "architecture": model.architecture(),
                "epochs": epochs,
                "lr": lr,
                "seed": seed,
                "max_tiles_per_bag": max_tiles_per_bag,
                "weight_decay": weight_decay,
                "patience": patience,
                "class_weighting": class_weighting,
                "data_sha256": _bags_digest((bags, labels), validation or ([], [])),
            }
            checkpoint = _Checkpoint(Path(checkpoint_path), settings)
            progress = checkpoint.resume(model, optimiser, rng) or progress
        resumed_from_epoch = progress.epoch
        while progress.epoch < epochs and not progress.stopped:
            progress.epoch += 1
            train_loss = _train_epoch(model, optimiser, bags, y, class_weight, rng, max_tiles_per_bag)
            record = _record_epoch(model, progress, train_loss, validation, patience)
            if checkpoint is not None:
                checkpoint.save(model, optimiser, rng, progress)
            if on_epoch is not None:
                on_epoch(record)
        if validation is not None:
            model.load_state_dict(progress.best_state)
    model.eval()
    return TrainedMil(
        model=model,
        history=progress.history,
        best_epoch=progress.best_epoch,
        stopped_early=len(progress.history) < epochs,
        resumed_from_epoch=resumed_from_epoch,
    )


def _train_epoch(
    model: MilAggregator,
    optimiser: torch.optim.Optimizer,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    class_weight: Mapping[int, float],
    rng: np.random.Generator,
    max_tiles_per_bag: int,
) -> float:
    """One pass over the training bags in a random order; returns the mean training loss.

    A bag is fetched when its step comes (a lazily loaded bag is read from disk then), sub-sampled first
    and only then widened to float32, so a step holds at most one bag's sampled tiles in float32.
    """
    model.train()
    total = 0.0
    for index in rng.permutation(len(bags)):
        bag = bags[index]
        if len(bag) > max_tiles_per_bag:
            bag = bag[rng.choice(len(bag), max_tiles_per_bag, replace=False)]
        tiles = torch.as_tensor(np.asarray(bag, dtype=np.float32))
        label = int(labels[index])
        loss = model.bag_loss(tiles, float(label), class_weight[label])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total += loss.item()
    return total / len(bags)


def _record_epoch(
    model: MilAggregator,
    progress: _Progress,
    train_loss: float,
    validation: tuple[Sequence[np.ndarray], np.ndarray] | None,
    patience: int,
) -> EpochRecord:
    """Validate (if there are validation bags), keep the best weights and count epochs without progress."""
    if validation is None:
        record = EpochRecord(progress.epoch, train_loss)
        progress.best_epoch = progress.epoch
    else:
        val_loss, val_auc = _evaluate(model, *validation)
        record = EpochRecord(progress.epoch, train_loss, val_loss, val_auc)
        if val_loss < progress.best_loss - 1e-6:
            progress.best_loss, progress.best_epoch, progress.stale = val_loss, progress.epoch, 0
            progress.best_state = copy.deepcopy(model.state_dict())
        else:
            progress.stale += 1
            progress.stopped = progress.stale >= patience
    progress.history.append(record)
    return record


def _evaluate(model: nn.Module, bags: Sequence[np.ndarray], labels: np.ndarray) -> tuple[float, float | None]:
    """Mean (unweighted) BCE and AUC on held-out bags; AUC is None when they hold one class only."""
    probabilities = np.clip(predict_bags(model, bags), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities)))
    auc = binary_auc(labels, probabilities) if 0 < labels.sum() < len(labels) else None
    return loss, auc


def _bags_digest(*bag_sets: tuple[Sequence[np.ndarray], Sequence[int] | np.ndarray]) -> str:
    """A digest of bags and labels: a checkpoint only resumes a run on the very same data."""
    digest = hashlib.sha256()
    for bags, labels in bag_sets:
        digest.update(f"set|{len(bags)}|".encode())
        for bag, label in zip(bags, labels, strict=True):
            array = np.ascontiguousarray(bag, dtype=np.float32)
            digest.update(f"{array.shape}|{int(label)}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class _Checkpoint:
    """The training state of one ``train_mil`` run in one file, replaced atomically after every epoch.

    ``settings`` (architecture, optimiser and schedule settings, a digest of the data) identify the run; a
    file written by another run is refused with the settings that differ. Besides weights and optimiser
    state it holds both random streams: numpy's drives the bag order and sub-sampling, torch's the dropout
    masks, and a resumed run must draw the same numbers as an uninterrupted one.
    """

    def __init__(self, path: Path, settings: Mapping[str, Any]) -> None:
        self.path = path
        # the stored copy went through pickle, so compare JSON-normalised values (tuples -> lists)
        self.settings: dict[str, Any] = json.loads(json.dumps(settings, default=repr))

    def resume(
        self, model: MilAggregator, optimiser: torch.optim.Optimizer, rng: np.random.Generator
    ) -> _Progress | None:
        """Load the saved state into ``model``, ``optimiser`` and ``rng``; None when there is no file."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"cannot read the training checkpoint {self.path} ({error}); delete it to train from scratch"
            ) from error
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{self.path} is not a MIL training checkpoint ({CHECKPOINT_FORMAT}); pass another "
                "checkpoint_path or delete the file"
            )
        stored = saved["settings"]
        if stored != self.settings:
            differing = sorted(
                k for k in stored.keys() | self.settings.keys() if stored.get(k) != self.settings.get(k)
            )
            raise ValueError(
                f"{self.path} holds the checkpoint of a different training run (it differs in "
                f"{', '.join(differing)}); delete it to start over, or pass another checkpoint_path"
            )
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        rng.bit_generator.state = saved["numpy_rng"]
        torch.set_rng_state(saved["torch_rng"])
        return _Progress(
            best_state=saved["best_state"],
            epoch=saved["epoch"],
            history=[EpochRecord(**record) for record in saved["history"]],
            best_epoch=saved["best_epoch"],
            best_loss=saved["best_loss"],
            stale=saved["stale"],
            stopped=saved["stopped"],
        )

    def save(
        self,
        model: MilAggregator,
        optimiser: torch.optim.Optimizer,
        rng: np.random.Generator,
        progress: _Progress,
    ) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "settings": self.settings,
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "best_state": progress.best_state,
            "epoch": progress.epoch,
            "history": [asdict(record) for record in progress.history],
            "best_epoch": progress.best_epoch,
            "best_loss": progress.best_loss,
            "stale": progress.stale,
            "stopped": progress.stopped,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        staged = Path(name)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(payload, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(staged, self.path)
        finally:
            staged.unlink(missing_ok=True)
