"""TransMIL (Shao et al., NeurIPS 2021) for whole slides of 5,000-100,000 tiles: a transformer over the bag.

Tiles are embedded (D -> hidden, ReLU, dropout), a learned class token is put in front, and two
transformer layers (pre-LayerNorm, residual) let every tile exchange information with every other; the
class token's final state, after a LayerNorm, is classified to one logit. Unlike attention pooling the
tiles see each other before the slide is scored, which is the point of TransMIL.

**Attention at slide scale.** Full self-attention over ``L = N + 1`` tokens holds ``L x L`` scores per
head: 30,000 tiles would need 3.6 GB per head in float32, 100,000 tiles 40 GB. So, as in TransMIL:

- Layer 1 uses **Nystrom attention** (Xiong et al., AAAI 2021). ``m`` landmarks (``landmarks``, default
  64; fewer when the bag has fewer tokens) are segment means of the queries and of the keys, and
  ``softmax(Q K^T) V`` is approximated by ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V``, the
  pseudo-inverse by ``pinv_iterations`` (6) Newton-Schulz style iterations (Razavi et al. 2014), as
  Nystromformer and TransMIL do. Memory and time are ``O(heads * L * m)``: no ``L x L`` matrix exists.
  Where TransMIL averages segments of consecutive tokens in tile order, here the tokens are first sorted
  by their projection on a fixed random direction (``sort_direction``, a buffer stored with the weights),
  so each segment is a slab of similar tokens and the landmarks are cluster centres rather than averages of
  unrelated tiles; the order the tiles arrive in then no longer matters (below). With ``L <= m`` every
  token is its own landmark and the layer computes exact softmax attention (up to the iterated inverse).
  TransMIL's Nystrom layer also adds a convolution over the values in token order (kernel 33); it is left
  out for the reason PPEG is off by default (below).
- Layer 2 feeds the classifier through the class token only, so only the class token's query is needed:
  its attention ``softmax(q_cls K^T / sqrt(d))`` over all tokens is computed **exactly**, in
  ``O(heads * L)`` memory; the other tokens' outputs of that layer would be discarded, so they are not
  computed (TransMIL computes and drops them).

**Attention vector** (for heatmaps): the class token's exact attention to the tiles in layer 2, averaged
over heads, without its attention to itself and renormalised to sum to one over the ``N`` tiles. These are
the weights with which the tiles entered the representation that was classified.

**PPEG.** TransMIL's position encoding reshapes the tokens, in the order they come, into a square (padded
with repeated tokens) and adds three depthwise convolutions (7x7, 5x5, 3x3). In this pipeline the order of
a bag's tiles is not spatial: training draws a random subset in random order each epoch, and the scorer
concatenates shards in the order they are stored. A convolution over neighbours in that order mixes
unrelated tiles, so PPEG is off by default (``ppeg=False``); the model is then invariant to the order of
the tiles (the logit is unchanged and the attention vector is permuted with the tiles, up to float
rounding). ``ppeg=True`` adds it as TransMIL does (tile order, square of side ``ceil(sqrt(N))`` padded
with zero tokens that are dropped after the convolutions, all with tensor operations so the ONNX model
takes any bag size); use it only for bags whose tiles come in a spatial (raster) order.

**Cost.** About ``heads * L * (3 * m + d)`` floats for the layer-1 kernels plus a few ``L x hidden``
activations, linear in ``N``; the standardisation is folded into the first linear layer, so no standardised
copy of the input is made. With the defaults (hidden 128, 4 heads, 64 landmarks) a forward pass over 30,000
tiles of 1,024 dimensions raised peak memory by about 250 MB above the 117 MB input (measurements in
``docs/training-and-evaluation.md``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional
from wsitk.shared.models.mil import MilAggregator, check_dropout, weighted_bce


def _bag_size(tokens: torch.Tensor) -> torch.Tensor:
    """The number of rows of ``tokens`` as an int64 tensor: an ONNX ``Shape`` when exported, never a
    Python int, so everything computed from it follows the bag size of each call."""
    return torch.ones_like(tokens[:, 0], dtype=torch.int64).sum()


def _arange(end: torch.Tensor) -> torch.Tensor:
    """``0 .. end - 1`` for an int64 tensor ``end``: exported as an ONNX ``Range`` that follows the bag size
    (torch's type stubs only list Python numbers for ``end``; at run time a tensor is what keeps it dynamic)."""
    return torch.arange(cast(int, end), device=end.device)


def moore_penrose_iterations(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate pseudo-inverse of each square ``matrix [..., m, m]`` by the iteration of Razavi et al.

    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z0 = A^T / (max row sum * max column sum)``
    (absolute values), which converges for any ``A`` with that start; plain matrix products, so it exports
    to ONNX and runs as a few ``m x m`` products. Few iterations on purpose: the landmark kernel of a large
    bag is ill-conditioned, and its exact pseudo-inverse amplifies that (measured: 6 iterations approximate
    attention better than 30 there), so TransMIL's 6 also act as a regulariser."""
    size = torch.arange(matrix.shape[-1], device=matrix.device)
    identity = (size[:, None] == size[None, :]).to(matrix.dtype)
    absolute = matrix.abs()
    row = absolute.sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    column = absolute.sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    inverse = matrix.transpose(-1, -2) / (row * column)
    for _ in range(iterations):
        product = matrix @ inverse
        inner = 7 * identity - product
        inner = 15 * identity - product @ inner
        inverse = 0.25 * inverse @ (13 * identity - product @ inner)
    return inverse


class NystromAttention(nn.Module):
    """Multi-head self-attention over ``tokens [L, dim]`` with ``m`` landmarks (see the module docstring)."""

    sort_direction: torch.Tensor

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        direction = torch.randn(dim)
        self.register_buffer("sort_direction", direction / direction.norm())

    def _split(self, projected: torch.Tensor) -> torch.Tensor:
        """``[L, heads * d] -> [heads, L, d]``."""
        return projected.reshape(-1, self.heads, self.head_dim).transpose(0, 1)

    def segment_means(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[m, L]``: row ``j`` averages the ``j``-th of ``m = min(landmarks, L)`` equal slabs of tokens
        sorted along ``sort_direction``; no row is empty, and the sizes differ by at most one."""
        count = _bag_size(tokens)
        segments = torch.clamp(count, max=self.landmarks)
        order = torch.argsort(tokens @ self.sort_direction)  # rank -> token
        rank = torch.zeros_like(order).scatter(0, order, _arange(count))
        segment_of = torch.div(rank * segments, count, rounding_mode="floor")  # [L]
        index = _arange(segments)
        members = (index[:, None] == segment_of[None, :]).to(tokens.dtype)  # [m, L]
        return members / members.sum(dim=1, keepdim=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query, key, value = (self._split(part) for part in self.to_qkv(tokens).chunk(3, dim=-1))
        query = query / math.sqrt(self.head_dim)
        means = self.segment_means(tokens)  # [m, L]
        query_landmarks, key_landmarks = means @ query, means @ key  # [heads, m, d]
        to_landmarks = torch.softmax(query @ key_landmarks.transpose(-1, -2), dim=-1)  # [heads, L, m]
        among = torch.softmax(query_landmarks @ key_landmarks.transpose(-1, -2), dim=-1)  # [heads, m, m]
        from_landmarks = torch.softmax(query_landmarks @ key.transpose(-1, -2), dim=-1)  # [heads, m, L]
        mixed = (to_landmarks @ moore_penrose_iterations(among, self.pinv_iterations)) @ (
            from_landmarks @ value
        )  # [heads, L, d]
        return self.to_out(mixed.transpose(0, 1).reshape(-1, self.heads * self.head_dim))


class ClassTokenAttention(nn.Module):
    """The class token's exact multi-head attention over all tokens: ``(update [dim], weights [heads, L])``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.heads * self.head_dim
        weight = self.to_qkv.weight  # rows: query, key, value
        query = (tokens[0] @ weight[:dim].T).reshape(self.heads, 1, self.head_dim)
        key = (tokens @ weight[dim : 2 * dim].T).reshape(-1, self.heads, self.head_dim).transpose(0, 1)
        value = (tokens @ weight[2 * dim :].T).reshape(-1, self.heads, self.head_dim).transpose(0, 1)
        scores = (query @ key.transpose(-1, -2)).squeeze(1) / math.sqrt(self.head_dim)  # [heads, L]
        weights = torch.softmax(scores, dim=-1)
        update = (weights.unsqueeze(1) @ value).reshape(dim)
        return self.to_out(update), weights


class PPEG(nn.Module):
    """TransMIL's pyramid position encoding on the tile tokens ``[N, dim]`` in the order given.

    The tokens fill a square of side ``ceil(sqrt(N))`` row by row (zero tokens after the last tile), the
    square goes through ``x + conv7(x) + conv5(x) + conv3(x)`` (depthwise, same padding) and the first ``N``
    positions are read back. Side and padding are computed with tensor operations from the bag size."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim) for size in (7, 5, 3)]
        )

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        count = _bag_size(tiles)
        side = torch.ceil(torch.sqrt(count.to(tiles.dtype))).to(torch.int64)
        side = side + (side * side < count).to(torch.int64)  # should float rounding ever fall short
        position = _arange(side * side)
        inside = (position < count).to(tiles.dtype).unsqueeze(1)
        square = tiles[torch.clamp(position, max=count - 1)] * inside  # [side^2, dim], zeros after N
        width = cast(int, side)  # a tensor at run time, so that the exported Reshape follows the bag size
        grid = square.transpose(0, 1).reshape(1, -1, width, width)
        mixed = grid + sum((conv(grid) for conv in self.convs), torch.zeros_like(grid))
        flat = mixed.reshape(tiles.shape[1], -1).transpose(0, 1)  # [side^2, dim]
        return flat[_arange(count)]


class TransMIL(MilAggregator):
    """TransMIL with Nystrom attention: ``forward(features [N, D]) -> (logit [], attention [N])``.

    See the module docstring for the attention approximation, the attention vector and PPEG. Options:
    ``hidden`` (token width, a multiple of ``heads``), ``heads``, ``landmarks`` (Nystrom ``m``),
    ``pinv_iterations``, ``dropout`` (after the embedding and on each attention output) and ``ppeg``.
    The loss is the class-weighted BCE of the logit, as for gated attention MIL.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        heads: int = 4,
        landmarks: int = 64,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        ppeg: bool = False,
    ) -> None:
        super().__init__(in_dim)
        if min(hidden, heads, landmarks, pinv_iterations) < 1:
            raise ValueError(
                "hidden, heads, landmarks and pinv_iterations must be positive, got "
                f"{hidden}, {heads}, {landmarks}, {pinv_iterations}"
            )
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        check_dropout(dropout)
        self.hidden = hidden
        self.heads = heads
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.dropout = dropout
        self.ppeg = bool(ppeg)
        self.project = nn.Linear(in_dim, hidden)
        self.activation = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.class_token = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.norm1 = nn.LayerNorm(hidden)
        self.attention1 = NystromAttention(hidden, heads, landmarks, pinv_iterations, dropout)
        self.position = PPEG(hidden) if self.ppeg else None
        self.norm2 = nn.LayerNorm(hidden)
        self.attention2 = ClassTokenAttention(hidden, heads, dropout)
        self.norm_out = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, 1)

    def standardise_and_project(self, features: torch.Tensor) -> torch.Tensor:
        """``linear(standardise(features))`` with the standardisation folded into the weights, so that no
        standardised copy of the ``N x D`` input is ever made (at 30,000 x 1,024 tiles that is 120 MB)."""
        weight = self.project.weight * self.feature_scale  # [hidden, D]
        return functional.linear(features, weight, self.project.bias - weight @ self.feature_mean)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiles = self.activation(self.standardise_and_project(features))  # [N, hidden]
        tokens = torch.cat([self.class_token, tiles], dim=0)  # [L = N + 1, hidden]
        tokens = tokens + self.attention1(self.norm1(tokens))
        if self.position is not None:
            tokens = torch.cat([tokens[:1], self.position(tokens[1:])], dim=0)
        update, weights = self.attention2(self.norm2(tokens))
        summary = self.norm_out(tokens[0] + update)
        logit = self.classifier(summary).squeeze(-1)
        to_tiles = weights[:, 1:].mean(dim=0)  # [N]: the class token's attention to each tile
        return logit, to_tiles / to_tiles.sum()

    def bag_loss(self, features: torch.Tensor, target: float, weight: float) -> torch.Tensor:
        logit, _ = self(features)
        return weighted_bce(logit, target, weight)

    def architecture(self) -> dict[str, Any]:
        return {
            "name": "transmil",
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "heads": self.heads,
            "landmarks": self.landmarks,
            "pinv_iterations": self.pinv_iterations,
            "dropout": self.dropout,
            "ppeg": self.ppeg,
        }
