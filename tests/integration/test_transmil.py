"""TransMIL with Nystrom attention (``shared/models/transmil.py``): what is its own beside the shared
aggregator tests in ``test_aggregators.py`` (registry round trip, learning the toy bags with attention on
tumour tiles, ONNX export, fold ensembles, resumable training all run for ``transmil`` there).

Here: ONNX parity at bag sizes that are not multiples of the landmark count (with and without PPEG) and in
a calibrated ensemble scored through ``MilRunner``, the scorer's loader; the attention vector; order
(in)variance; the Nystrom layer against exact attention; and that no intermediate grows as N x N.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from wsitk.shared.models.aggregators import MilEnsemble, build_aggregator
from wsitk.shared.models.export import export_mil
from wsitk.shared.models.mil import single_threaded_torch
from wsitk.shared.models.runtime import MilRunner
from wsitk.shared.models.transmil import NystromAttention, TransMIL

DIM = 24
SIZES = (1, 7, 333, 5000)  # 7 is the size the export traces with; the others must follow dynamically


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Torch on one thread, as training and ``predict_bags`` run it: on busy shared cores its thread pool
    only waits."""
    with single_threaded_torch():
        yield


def _model(seed: int = 0, **options: Any) -> TransMIL:
    """An untrained TransMIL with a non-trivial input standardisation (raw features are not N(0, 1))."""
    torch.manual_seed(seed)
    model = TransMIL(DIM, hidden=32, landmarks=16, **options)
    with torch.no_grad():
        model.feature_mean.copy_(torch.linspace(-1.0, 2.0, DIM))
        model.feature_scale.copy_(torch.linspace(0.5, 2.0, DIM))
    return model.eval()


def _bag(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((size, DIM)) * 0.8 + 0.5).astype(np.float32)


@pytest.mark.parametrize("ppeg", [False, True])
def test_onnx_export_matches_torch_at_any_bag_size(ppeg: bool, tmp_path: Path) -> None:
    model = _model(ppeg=ppeg)
    path = tmp_path / "transmil.onnx"
    info = export_mil(model, path, in_dim=DIM, model_version="t-1", backbone_id="b", check_sizes=SIZES)
    assert info.checked_bag_sizes == SIZES and info.architecture["name"] == "transmil"
    assert info.max_abs_diff_probability < 1e-5 and info.max_rel_diff_attention < 1e-4
    (features,) = onnx.load(str(path)).graph.input
    assert features.type.tensor_type.shape.dim[0].dim_param == "tiles"  # not fixed to the traced 7
    runner = MilRunner(path)  # ONNX Runtime, CPU provider
    for size in SIZES:
        bag = _bag(size, seed=size)
        with torch.no_grad():
            logit, attention = model(torch.from_numpy(bag))
        probability, got = runner.score(bag)
        assert got.shape == (size,) and abs(probability - torch.sigmoid(logit).item()) < 1e-5
        np.testing.assert_allclose(got, attention.numpy(), rtol=1e-3, atol=1e-7)
        assert abs(float(got.sum()) - 1.0) < 1e-4


def test_calibrated_transmil_ensemble_scores_through_the_scorers_loader(tmp_path: Path) -> None:
    members = [_model(seed) for seed in range(3)]
    ensemble = MilEnsemble(members, calibration=[(1.2, -0.1), (0.8, 0.2), (1.0, 0.0)]).eval()
    path = tmp_path / "ensemble.onnx"  # as training._export_ensemble writes it (5,000 tiles: checked above)
    export_mil(
        ensemble, path, in_dim=DIM, model_version="e-1", backbone_id="b", threshold=0.4, check_sizes=(1, 333)
    )
    runner = MilRunner(path)
    assert runner.metadata["architecture"]["members"][0]["name"] == "transmil"
    for size in (1, 333):
        bag = _bag(size, seed=7).astype(np.float16)  # embeddings are stored as float16
        probability, got = runner.score(bag)
        with torch.no_grad():
            logit, attention = ensemble(torch.from_numpy(bag.astype(np.float32)))
        assert abs(probability - torch.sigmoid(logit).item()) < 1e-5
        np.testing.assert_allclose(got, attention.numpy(), rtol=1e-3, atol=1e-7)


def test_attention_is_the_class_tokens_attention_to_the_tiles_and_sums_to_one() -> None:
    model = _model()
    for size in (1, 2, 15, 16, 17, 1000):  # around the landmark count (16 landmarks, 17 tokens)
        with torch.no_grad():
            logit, attention = model(torch.from_numpy(_bag(size)))
        assert logit.shape == () and attention.shape == (size,) and bool((attention >= 0).all())
        assert abs(float(attention.sum()) - 1.0) < 1e-5
    bag = torch.from_numpy(_bag(50))
    with torch.no_grad():  # recompute layer 2's class-token row by hand: exact softmax, mean over heads
        tiles = model.activation(model.standardise_and_project(bag))
        tokens = torch.cat([model.class_token, tiles])
        tokens = model.norm2(tokens + model.attention1(model.norm1(tokens)))
        query, key, _ = model.attention2.to_qkv(tokens).chunk(3, dim=-1)
        heads, width = model.heads, model.hidden // model.heads
        scores = torch.einsum(
            "hd,lhd->hl", query[0].reshape(heads, width), key.reshape(-1, heads, width)
        ) / math.sqrt(width)
        expected = torch.softmax(scores, dim=-1)[:, 1:].mean(dim=0)
        _, attention = model(bag)
    torch.testing.assert_close(attention, expected / expected.sum())


def test_tile_order_does_not_matter_without_ppeg_and_does_with_it() -> None:
    """Landmarks are means of slabs of tokens sorted along a fixed direction, not of tiles in arrival
    order, so without PPEG a shuffled bag gives the same logit and the same attention per tile. PPEG
    convolves neighbours in the order given: there the order changes the score, by design."""
    bag = torch.from_numpy(_bag(3000))  # far more tokens than landmarks: the approximation is in play
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(1))
    for ppeg in (False, True):
        model = _model(ppeg=ppeg)
        with torch.no_grad():
            logit, attention = model(bag)
            shuffled_logit, shuffled_attention = model(bag[order])
        if not ppeg:
            assert abs(float(logit - shuffled_logit)) < 1e-5
            torch.testing.assert_close(shuffled_attention, attention[order], rtol=1e-4, atol=1e-9)
        else:
            assert abs(float(logit - shuffled_logit)) > 1e-4


def test_nystrom_layer_is_exact_up_to_the_landmark_count_and_close_beyond() -> None:
    torch.manual_seed(0)
    layer = NystromAttention(32, heads=4, landmarks=16, pinv_iterations=20, dropout=0.0).eval()

    def exact(tokens: torch.Tensor) -> torch.Tensor:
        query, key, value = (layer._split(part) for part in layer.to_qkv(tokens).chunk(3, dim=-1))
        weights = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(layer.head_dim), dim=-1)
        return layer.to_out((weights @ value).transpose(0, 1).reshape(-1, 32))

    def relative_error(count: int) -> float:
        tokens = torch.nn.functional.layer_norm(torch.randn(count, 32), (32,))
        with torch.no_grad():
            return float((layer(tokens) - exact(tokens)).norm() / exact(tokens).norm())

    for count in (2, 9, 16):  # every token its own landmark: exact softmax attention
        assert relative_error(count) < 1e-3
    layer.pinv_iterations = 6  # the default: the truncated iteration keeps large bags well-conditioned
    assert relative_error(2000) < 0.25


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


def test_no_intermediate_grows_as_tiles_squared() -> None:
    """A training step (forward and backward) on 20,000 tiles: the largest tensor any operation makes
    (the query-key-value projection, 3 x hidden per token) holds under 100 elements per tile."""
    tiles = 20_000
    torch.manual_seed(0)
    model = build_aggregator("transmil", 64, hidden=32, heads=4, landmarks=16)
    model.train()
    bag = torch.randn(tiles, 64)
    with _LargestTensor() as probe:
        model.bag_loss(bag, 1.0, 1.0).backward()
    assert probe.largest <= 100 * tiles  # N x N would be 20,000 per tile
    with torch.no_grad():
        _, attention = model.eval()(bag)
    assert attention.shape == (tiles,) and abs(float(attention.sum()) - 1.0) < 1e-4


def test_every_option_round_trips_through_the_registry() -> None:
    model = build_aggregator(
        "transmil", 8, hidden=12, heads=3, landmarks=5, pinv_iterations=4, dropout=0.2, ppeg=True
    )
    rebuilt = build_aggregator(**model.architecture())
    assert rebuilt.architecture() == model.architecture() and model.architecture()["ppeg"] is True
    rebuilt.load_state_dict(model.state_dict())  # PPEG's convolutions and the sort direction included
    bag = torch.from_numpy(_bag(40)[:, :8])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(bag), model.eval()(bag))


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"hidden \(30\) must be a multiple of heads \(4\)"):
        build_aggregator("transmil", 8, hidden=30)
    with pytest.raises(ValueError, match="must be positive"):
        build_aggregator("transmil", 8, landmarks=0)
    with pytest.raises(ValueError, match="dropout"):
        build_aggregator("transmil", 8, dropout=1.0)
