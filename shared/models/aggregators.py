"""Slide aggregators beside gated attention MIL (CLAM-SB, DSMIL; TransMIL lives in ``transmil.py``), the
registry that builds them by name, and fold ensembles.

Every aggregator has the interface of ``mil.MilAggregator``: ``forward(features [N, D]) -> (logit [],
attention [N])`` on raw embedder output (standardised inside by the ``feature_mean`` / ``feature_scale``
buffers), its own ``bag_loss`` for ``train_mil`` and an ``architecture()`` that ``build_aggregator``
rebuilds from. All of them export to ONNX with ``export.export_mil`` for any bag size: what depends on the
number of tiles in Python (top-k sizes) happens only in the training losses, never in ``forward``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from wsitk.shared.models.mil import GatedAttentionMIL, MilAggregator, check_dropout, weighted_bce
from wsitk.shared.models.transmil import TransMIL


def _require_positive(**sizes: int) -> None:
    if bad := {name: value for name, value in sizes.items() if value < 1}:
        raise ValueError(f"layer sizes must be positive, got {bad}")


class ClamSB(MilAggregator):
    """CLAM, single attention branch (Lu et al., Nature Biomedical Engineering 2021), binary tumour/normal.

    Bag path: ``fc`` D -> hidden (ReLU, dropout), gated attention (one branch, as in ``GatedAttentionMIL``),
    attention pooling, and a bag classifier giving one logit for P(tumour) (CLAM's two-class softmax
    reduced to the equivalent single logit).

    Instance clustering, the part that makes it CLAM: one instance classifier per class (two logits each:
    "evidence of this class" or not) on the hidden tile features. For a training bag of class ``c``,
    classifier ``c`` learns to call the ``k`` most-attended tiles positive and the ``k`` least-attended
    negative (cross-entropy), which pushes the shared tile features to separate what attention picks from
    what it ignores, a useful signal when slide labels are few. ``k = min(k_sample, N // 2)`` so the two
    sets never overlap; a one-tile bag has no instance term. The loss of one bag is
    ``weight * (bag_weight * BCE(bag) + (1 - bag_weight) * CE(instances))``: the class weight scales the
    whole bag, instance term included, since both come from that one slide.

    This is CLAM's non-subtyping mode: its out-of-class term (the classifiers of the *other* classes also
    calling a bag's most-attended tiles negative) assumes the classes exclude each other on one slide, as
    cancer subtypes do; a tumour slide also holds normal tissue, so CLAM itself leaves that term off for
    tumour-vs-normal tasks, and so does this class. The instance classifiers are used in training only;
    ``forward`` (and so the ONNX model) is the bag path.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        attn_dim: int = 64,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
    ) -> None:
        super().__init__(in_dim)
        _require_positive(hidden=hidden, attn_dim=attn_dim, k_sample=k_sample)
        check_dropout(dropout)
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight is the share of the bag loss in [0, 1], got {bag_weight}")
        self.hidden = hidden
        self.attn_dim = attn_dim
        self.dropout = dropout
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attn_dim)  # tanh branch
        self.attention_u = nn.Linear(hidden, attn_dim)  # sigmoid gate
        self.attention_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, 1)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(2)])  # normal, tumour

    def _bag_path(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logit [], attention [N], hidden tile features [N, hidden])``."""
        hidden = self.embed(self.standardise(features))
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        logit = self.classifier(attention @ hidden).squeeze(-1)
        return logit, attention, hidden

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, attention, _ = self._bag_path(features)
        return logit, attention

    def instance_loss(
        self, hidden: torch.Tensor, attention: torch.Tensor, label: int, k: int
    ) -> torch.Tensor:
        """CE of the bag class's instance classifier: top-``k`` attended tiles positive, bottom-``k`` negative."""
        # the ranking only selects tiles: no gradient flows into attention through this term, as in CLAM
        ranking = attention.detach()
        top = torch.topk(ranking, k).indices
        bottom = torch.topk(-ranking, k).indices
        targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
        logits = self.instance_classifiers[label](hidden[torch.cat([top, bottom])])
        return functional.cross_entropy(logits, targets)

    def bag_loss(self, features: torch.Tensor, target: float, weight: float) -> torch.Tensor:
        logit, attention, hidden = self._bag_path(features)
        bag_term = weighted_bce(logit, target, 1.0)
        k = min(self.k_sample, len(features) // 2)
        if k == 0:
            return weight * bag_term
        instance_term = self.instance_loss(hidden, attention, round(target), k)
        return weight * (self.bag_weight * bag_term + (1.0 - self.bag_weight) * instance_term)

    def architecture(self) -> dict[str, Any]:
        return {
            "name": "clam-sb",
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "attn_dim": self.attn_dim,
            "dropout": self.dropout,
            "k_sample": self.k_sample,
            "bag_weight": self.bag_weight,
        }


class DSMIL(MilAggregator):
    """Dual-stream MIL (Li, Li and Eliceiri, CVPR 2021) for one class (tumour).

    Tiles are embedded (D -> hidden, ReLU, dropout). Stream one, an instance classifier hidden -> 1, scores
    every tile; the best-scoring tile is the *critical instance*. Stream two projects every tile to a query
    ``q_i`` (two layers, tanh, as DSMIL's non-linear query) and attends by similarity to the critical
    instance: ``attention = softmax_i(<q_i, q_crit> / sqrt(q_dim))``; the bag embedding
    ``sum_i attention_i * v_i`` (``v_i`` the embedded tile itself, DSMIL's default) goes to a bag classifier.
    So attention marks tiles that look like the most suspicious one, which is what the heatmap shows.

    Training loss (``bag_loss``): ``0.5 * BCE(max instance logit) + 0.5 * BCE(bag logit)``, times the class
    weight. ``forward`` returns as logit the mean of the max-instance logit and the bag logit, a single
    score that uses both streams as the loss does (DSMIL's own evaluation averages the two streams too, on
    probabilities; averaging logits keeps the output a logit, and the order of bags hardly changes).
    """

    def __init__(self, in_dim: int, hidden: int = 128, q_dim: int = 64, dropout: float = 0.25) -> None:
        super().__init__(in_dim)
        _require_positive(hidden=hidden, q_dim=q_dim)
        check_dropout(dropout)
        self.hidden = hidden
        self.q_dim = q_dim
        self.dropout = dropout
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.instance_classifier = nn.Linear(hidden, 1)
        self.query = nn.Sequential(nn.Linear(hidden, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.bag_classifier = nn.Linear(hidden, 1)

    def streams(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(max instance logit [], bag logit [], attention [N])``."""
        hidden = self.embed(self.standardise(features))  # [N, hidden]
        instance_logits = self.instance_classifier(hidden).squeeze(-1)  # [N]
        max_logit, critical = torch.max(instance_logits, dim=0)  # N = 1 is fine: index 0
        queries = self.query(hidden)  # [N, q_dim]
        similarity = (queries @ queries[critical]) / math.sqrt(self.q_dim)  # [N]
        attention = torch.softmax(similarity, dim=0)
        bag_logit = self.bag_classifier(attention @ hidden).squeeze(-1)
        return max_logit, bag_logit, attention

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        max_logit, bag_logit, attention = self.streams(features)
        return (max_logit + bag_logit) / 2.0, attention

    def bag_loss(self, features: torch.Tensor, target: float, weight: float) -> torch.Tensor:
        max_logit, bag_logit, _ = self.streams(features)
        return weight * 0.5 * (weighted_bce(max_logit, target, 1.0) + weighted_bce(bag_logit, target, 1.0))

    def architecture(self) -> dict[str, Any]:
        return {
            "name": "dsmil",
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "q_dim": self.q_dim,
            "dropout": self.dropout,
        }


AGGREGATORS: dict[str, type[MilAggregator]] = {
    "gated-attention": GatedAttentionMIL,
    "clam-sb": ClamSB,
    "dsmil": DSMIL,
    "transmil": TransMIL,  # in transmil.py: a transformer over the bag, Nystrom attention
}
# names found in model metadata that mean a registry entry: exported gated attention models say this
_ALIASES = {"gated-attention-mil": "gated-attention"}


def build_aggregator(name: str, in_dim: int, **hyper: Any) -> MilAggregator:
    """A freshly initialised aggregator; ``build_aggregator(**model.architecture())`` rebuilds ``model``'s shape.

    Unknown names and options are refused with the choices, rather than a TypeError from a constructor.
    """
    key = _ALIASES.get(name, name)
    if key not in AGGREGATORS:
        raise ValueError(f"unknown MIL aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    cls = AGGREGATORS[key]
    options = [option for option in inspect.signature(cls).parameters if option != "in_dim"]
    if unknown := sorted(set(hyper) - set(options)):
        raise ValueError(f"MIL aggregator {key!r} has no option {unknown}; its options are {options}")
    return cls(in_dim, **hyper)


class MilEnsemble(nn.Module):
    """Fold models of one architecture as one model: ``forward(features) -> (logit, attention [N])``.

    The probability is the mean of the members' probabilities (returned as its logit, computed in log
    space so that confident members do not overflow), the attention the mean of their attentions (still
    summing to one). Each member standardises the input with its own fold's statistics, so the ensemble
    takes raw features like any aggregator and exports with ``export_mil``; its ``feature_mean`` /
    ``feature_scale`` (the members' average) only serve to build realistic check inputs there.
    """

    calibration_scale: torch.Tensor
    calibration_shift: torch.Tensor

    def __init__(
        self, members: Sequence[MilAggregator], calibration: Sequence[tuple[float, float]] | None = None
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member model")
        if not all(isinstance(member, MilAggregator) for member in members):
            kinds = sorted({type(member).__name__ for member in members})
            raise ValueError(f"ensemble members must be MIL aggregators (see AGGREGATORS); got {kinds}")
        shapes = {json.dumps(member.architecture(), sort_keys=True) for member in members}
        if len(shapes) != 1:
            raise ValueError(
                "ensemble members must share one architecture (fold models trained with the same "
                f"settings); got {sorted(shapes)}"
            )
        self.members = nn.ModuleList(members)
        self.in_dim = members[0].in_dim
        # Platt calibration per member, P = sigmoid(scale * logit + shift), fitted on the member's own
        # validation data (``training.fit_platt``); identity when not given. The mean of calibrated members
        # is a probability of the same kind as each calibrated member's out-of-fold probability, on which
        # the ensemble's threshold is chosen.
        pairs = [(1.0, 0.0)] * len(members) if calibration is None else list(calibration)
        if len(pairs) != len(members):
            raise ValueError(f"{len(pairs)} calibration pairs for {len(members)} ensemble members")
        self.calibrated = calibration is not None
        self.register_buffer("calibration_scale", torch.tensor([float(a) for a, _ in pairs]))
        self.register_buffer("calibration_shift", torch.tensor([float(b) for _, b in pairs]))

    def _member_list(self) -> list[MilAggregator]:
        return [member for member in self.members if isinstance(member, MilAggregator)]

    @property
    def feature_mean(self) -> torch.Tensor:
        return torch.stack([member.feature_mean for member in self._member_list()]).mean(dim=0)

    @property
    def feature_scale(self) -> torch.Tensor:
        spread = torch.stack([1.0 / member.feature_scale for member in self._member_list()]).mean(dim=0)
        return 1.0 / spread

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [member(features) for member in self.members]
        logits = torch.stack([logit for logit, _ in outputs])  # [members]
        logits = logits * self.calibration_scale + self.calibration_shift
        attention = torch.stack([attention for _, attention in outputs]).mean(dim=0)  # [N]
        # logit(mean p) = log(sum sigmoid(l)) - log(sum sigmoid(-l)); log sigmoid(x) = -softplus(-x)
        log_tumour = torch.logsumexp(-functional.softplus(-logits), dim=0)
        log_normal = torch.logsumexp(-functional.softplus(logits), dim=0)
        return log_tumour - log_normal, attention

    def architecture(self) -> dict[str, Any]:
        return {
            "name": "ensemble",
            "members": [member.architecture() for member in self._member_list()],
            "combine": "mean-probability",
        } | (
            {
                "combine": "mean-calibrated-probability",
                "calibration": [
                    [float(a), float(b)]
                    for a, b in zip(self.calibration_scale, self.calibration_shift, strict=True)
                ],
            }
            if self.calibrated
            else {}
        )
