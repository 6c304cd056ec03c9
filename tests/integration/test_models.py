"""Models: torch -> ONNX export agrees with torch, the ONNX Runtime wrappers, MIL training, default models.

Everything runs for real (torch, the ONNX exporter, ONNX Runtime's CPU provider); inputs are small so the
file stays well under a minute on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from wsitk.shared.models.backbones import BACKBONES, SmallCNN, TruncatedResNet50
from wsitk.shared.models.defaults import (
    BACKBONE_FILE,
    MANIFEST_FILE,
    MIL_FILE,
    DefaultModelRecipe,
    init_default_models,
)
from wsitk.shared.models.export import ExportValidationError, export_backbone, export_mil
from wsitk.shared.models.mil import (
    GatedAttentionMIL,
    TrainedMil,
    binary_auc,
    choose_threshold,
    predict_bags,
    train_mil,
)
from wsitk.shared.models.runtime import (
    BackboneRunner,
    MilRunner,
    available_providers,
    create_session,
    read_model_metadata,
    sha256_file,
)


def _uint8_tiles(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def _onnx_features(path: Path, batch: np.ndarray) -> np.ndarray:
    session = create_session(path, prefer=("CPUExecutionProvider",))
    return session.run(["features"], {"tiles": batch})[0]


def _relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_small_cnn_export_matches_torch_for_batches_of_one_and_three(tmp_path: Path) -> None:
    info = export_backbone("small-cnn", tmp_path / "small.onnx", seed=3)
    assert info.backbone_id.startswith("small-cnn-") and len(info.backbone_id) == len("small-cnn-") + 12
    assert info.output_dim == 128 and info.max_rel_diff <= 1e-3
    assert info.sha256 == sha256_file(tmp_path / "small.onnx")
    torch_model = BACKBONES["small-cnn"].build(None, 3)
    for count in (1, 3):
        batch = np.random.default_rng(count).standard_normal((count, 3, 224, 224)).astype(np.float32)
        with torch.no_grad():
            want = torch_model(torch.from_numpy(batch)).numpy()
        got = _onnx_features(tmp_path / "small.onnx", batch)
        assert got.shape == (count, 128)
        assert _relative_difference(got, want) < 1e-3
    runner = BackboneRunner(tmp_path / "small.onnx")
    assert read_model_metadata(runner.session) == info.metadata()
    assert runner.metadata["weights_source"] == "random-init(seed=3)"


def test_backbone_weights_are_seeded_and_id_tracks_weights_and_preprocessing(tmp_path: Path) -> None:
    first = export_backbone("small-cnn", tmp_path / "a.onnx", input_size=64, seed=0)
    again = export_backbone("small-cnn", tmp_path / "b.onnx", input_size=64, seed=0)
    other_seed = export_backbone("small-cnn", tmp_path / "c.onnx", input_size=64, seed=1)
    other_size = export_backbone("small-cnn", tmp_path / "d.onnx", input_size=96, seed=0)
    assert first.backbone_id == again.backbone_id and first.weights_sha256 == again.weights_sha256
    assert other_seed.backbone_id != first.backbone_id and other_seed.weights_sha256 != first.weights_sha256
    assert other_size.backbone_id != first.backbone_id and other_size.weights_sha256 == first.weights_sha256


def test_truncated_resnet50_loads_a_torchvision_state_dict_and_exports(tmp_path: Path) -> None:
    donor = TruncatedResNet50(seed=7)
    state = {f"module.{k}": v for k, v in donor.state_dict().items()}
    state["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)  # a full ResNet50 has these: ignored
    state["fc.weight"] = torch.zeros(1000, 2048)
    weights = tmp_path / "resnet50.pth"
    torch.save(state, weights)

    info = export_backbone("resnet50-trunc", tmp_path / "r50.onnx", weights=weights, input_size=64)
    assert info.output_dim == 1024 and info.max_rel_diff <= 1e-3
    assert info.weights_source == "resnet50.pth" and info.weights_sha256 == sha256_file(weights)
    loaded = TruncatedResNet50(weights).eval()
    batch = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = loaded(torch.from_numpy(batch)).numpy()
        unrelated = TruncatedResNet50(seed=0).eval()(torch.from_numpy(batch[:1])).numpy()
    assert _relative_difference(unrelated, want[:1]) > 1e-2  # the file's weights, not the seed's, were used
    for count in (1, 3):
        got = _onnx_features(tmp_path / "r50.onnx", batch[:count])
        assert got.shape == (count, 1024)
        assert _relative_difference(got, want[:count]) < 1e-3


def test_resnet50_refuses_a_state_dict_of_another_network(tmp_path: Path) -> None:
    weights = tmp_path / "wrong.pth"
    torch.save(SmallCNN().state_dict(), weights)
    with pytest.raises(ValueError, match="not a torchvision-compatible ResNet50"):
        TruncatedResNet50(weights)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TruncatedResNet50(tmp_path / "missing.pth")


def test_fp16_export_keeps_a_float32_interface_and_agrees_within_tolerance(tmp_path: Path) -> None:
    info = export_backbone("small-cnn", tmp_path / "half.onnx", input_size=64, fp16=True)
    assert info.fp16 and info.tolerance == 5e-2 and info.max_rel_diff <= 5e-2
    runner = BackboneRunner(tmp_path / "half.onnx")
    features = runner.embed(_uint8_tiles(3, 64))
    assert features.dtype == np.float32 and features.shape == (3, 128) and np.isfinite(features).all()


class ShapeDependentNet(nn.Module):
    """Takes a branch on the batch size: tracing bakes the branch in, so the export must be refused."""

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        pooled = tiles.mean(dim=(2, 3))
        return pooled if tiles.shape[0] <= 2 else pooled * 2.0


def test_export_that_disagrees_with_torch_is_refused_and_not_written(tmp_path: Path) -> None:
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportValidationError, match="differs from torch"):
        export_backbone(f"{__name__}:ShapeDependentNet", target, input_size=32)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown backbone"):
        export_backbone("no-such-backbone", target)


def test_import_path_backbone_is_exported_under_its_class_name(tmp_path: Path) -> None:
    info = export_backbone("wsitk.shared.models.backbones:SmallCNN", tmp_path / "x.onnx", input_size=32)
    assert info.name == "smallcnn" and info.backbone_id.startswith("smallcnn-")


def _seeded_mil(in_dim: int) -> GatedAttentionMIL:
    torch.manual_seed(5)
    model = GatedAttentionMIL(in_dim, hidden=32, attn_dim=16)
    model.fit_feature_normalisation(np.random.default_rng(0).normal(3.0, 2.0, (200, in_dim)))
    return model.eval()


def test_mil_export_matches_torch_for_several_bag_sizes(tmp_path: Path) -> None:
    model = _seeded_mil(24)
    info = export_mil(
        model,
        tmp_path / "mil.onnx",
        in_dim=24,
        model_version="test-v1",
        backbone_id="small-cnn-abc",
        threshold=0.3,
        extra_meta={"note": "test"},
    )
    assert info.checked_bag_sizes == (1, 5, 5000)
    runner = MilRunner(tmp_path / "mil.onnx")
    assert (runner.model_version, runner.backbone_id, runner.threshold, runner.in_dim) == (
        "test-v1",
        "small-cnn-abc",
        0.3,
        24,
    )
    assert (
        runner.metadata["architecture"]["name"] == "gated-attention-mil" and runner.metadata["note"] == "test"
    )
    rng = np.random.default_rng(1)
    for size in (1, 7, 5000):
        bag = rng.normal(3.0, 2.0, (size, 24)).astype(np.float32)
        with torch.no_grad():
            logit, attention = model(torch.from_numpy(bag))
        probability, got_attention = runner.score(bag)
        assert abs(probability - torch.sigmoid(logit).item()) < 1e-5
        assert got_attention.shape == (size,)
        assert abs(float(got_attention.sum()) - 1.0) < 1e-4
        assert np.max(np.abs(got_attention - attention.numpy())) < 1e-3 * float(attention.max())
    half_probability, _ = runner.score(bag.astype(np.float16))
    assert abs(half_probability - probability) < 1e-2
    with pytest.raises(ValueError, match=r"expects features \[N, 24\]"):
        runner.score(np.zeros((3, 128), dtype=np.float32))
    with pytest.raises(ValueError, match="empty bag"):
        runner.score(np.zeros((0, 24), dtype=np.float32))


def test_backbone_runner_resizes_other_tile_sizes_and_batches(tmp_path: Path) -> None:
    export_backbone("small-cnn", tmp_path / "b64.onnx", input_size=64)
    runner = BackboneRunner(tmp_path / "b64.onnx", batch_size=2)
    assert (runner.input_size, runner.output_dim, runner.target_mpp) == (64, 128, 0.5)
    assert runner.sha256 == sha256_file(tmp_path / "b64.onnx") and runner.backbone_id.startswith("small-cnn-")

    tiles = _uint8_tiles(5, 100)
    preprocessed = runner.preprocess(tiles)
    assert preprocessed.shape == (5, 3, 64, 64) and preprocessed.dtype == np.float32
    flat = np.full((1, 100, 100, 3), (200, 120, 180), dtype=np.uint8)  # a resized flat colour stays flat
    expected = (np.array([200, 120, 180]) / 255.0 - np.array(runner.mean)) / np.array(runner.std)
    np.testing.assert_allclose(runner.preprocess(flat)[0].mean(axis=(1, 2)), expected, atol=1e-5)
    assert float(runner.preprocess(flat).std(axis=(2, 3)).max()) < 1e-5

    features = runner.embed(tiles)  # three batches of at most two
    assert features.shape == (5, 128) and features.dtype == np.float32
    direct = runner.session.run(["features"], {"tiles": preprocessed})[0]
    np.testing.assert_allclose(features, direct, rtol=1e-4, atol=1e-5)
    assert runner.embed(np.zeros((0, 64, 64, 3), dtype=np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="uint8"):
        runner.embed(tiles.astype(np.float32))


def test_create_session_uses_only_offered_providers_without_warnings(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    export_backbone("small-cnn", tmp_path / "s.onnx", input_size=32)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = create_session(tmp_path / "s.onnx", intra_op_threads=1)
    stderr = capfd.readouterr().err
    assert "CPUExecutionProvider" in available_providers()
    if "CUDAExecutionProvider" not in available_providers():
        assert session.get_providers() == ["CPUExecutionProvider"]
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            create_session(tmp_path / "s.onnx", prefer=("CUDAExecutionProvider",))
    assert [str(w.message) for w in caught] == []
    assert "[W:onnxruntime" not in stderr and "[E:onnxruntime" not in stderr
    with pytest.raises(FileNotFoundError, match="init-defaults"):
        create_session(tmp_path / "missing.onnx")


def test_runtime_module_does_not_import_torch() -> None:
    code = (
        "import sys, wsitk.shared.models.runtime; sys.exit('torch' in sys.modules or 'onnx' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _gaussian_bags(count: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """Normal tiles ~ N(0, 1); a tumour bag also holds 10-30 % tiles shifted by +3 in four of 16 dims."""
    bags, labels = [], []
    for index in range(count):
        label = index % 2
        size = int(rng.integers(10, 31))
        bag = rng.standard_normal((size, 16))
        if label:
            positives = max(1, round(size * rng.uniform(0.1, 0.3)))
            bag[:positives, :4] += 3.0
        bags.append(bag[rng.permutation(size)].astype(np.float32))
        labels.append(label)
    return bags, labels


def test_train_mil_separates_held_out_bags_reproducibly() -> None:
    rng = np.random.default_rng(0)
    train_bags, train_labels = _gaussian_bags(40, rng)
    val_bags, val_labels = _gaussian_bags(16, rng)
    test_bags, test_labels = _gaussian_bags(30, rng)

    def train() -> TrainedMil:
        return train_mil(
            train_bags, train_labels, epochs=12, lr=1e-3, seed=1, val_bags=val_bags, val_labels=val_labels
        )

    trained = train()
    assert 1 <= trained.best_epoch <= len(trained.history) <= 12
    assert trained.history[-1].val_loss is not None
    test_probabilities = predict_bags(trained.model, test_bags)
    assert binary_auc(test_labels, test_probabilities) > 0.9
    np.testing.assert_array_equal(predict_bags(train().model, test_bags), test_probabilities)  # seeded
    with pytest.raises(ValueError, match="both classes"):
        train_mil(train_bags[:1], [0], epochs=1)


def test_auc_and_threshold_helpers() -> None:
    assert binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert binary_auc([0, 1], [0.5, 0.5]) == 0.5
    assert 0.4 < choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9]) < 0.6


def test_init_default_models_builds_consistent_models_and_is_idempotent(tmp_path: Path) -> None:
    recipe = DefaultModelRecipe(
        input_size=64,
        train_bags=12,
        val_bags=8,
        min_tiles_per_bag=6,
        max_tiles_per_bag=10,
        train_pool=(24, 12, 6),
        val_pool=(16, 8, 4),
        epochs=6,
    )
    lines: list[str] = []
    manifest = init_default_models(tmp_path, seed=2, progress=lines.append, recipe=recipe)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()) == manifest
    backbone, mil = BackboneRunner(tmp_path / BACKBONE_FILE), MilRunner(tmp_path / MIL_FILE)
    assert backbone.backbone_id == mil.backbone_id == manifest["backbone"]["backbone_id"]
    assert mil.model_version == manifest["mil"]["model_version"]
    assert mil.model_version.startswith("gamil-synthetic-v1-")
    assert manifest["training"]["val_bags"] == 8 and 0.0 <= manifest["training"]["val_auc"] <= 1.0
    probability, attention = mil.score(backbone.embed(_uint8_tiles(4, 64)))
    assert 0.0 <= probability <= 1.0 and attention.shape == (4,)
    # The encoder takes raw uint8 tiles and normalises in its graph: the embedder's prepared batches are a
    # quarter of float32 NCHW's size (its bounded queue, docs/throughput.md).
    assert manifest["backbone"]["input_format"] == "uint8-nhwc" and backbone.raw_uint8_input
    assert backbone.batch_array(8).dtype == np.uint8 and backbone.batch_array(8).shape == (8, 64, 64, 3)

    stamp = (tmp_path / MIL_FILE).stat().st_mtime_ns
    lines.clear()
    assert init_default_models(tmp_path, seed=2, progress=lines.append, recipe=recipe) == manifest
    assert "nothing to do" in lines[0] and (tmp_path / MIL_FILE).stat().st_mtime_ns == stamp

    (tmp_path / MIL_FILE).write_bytes(b"truncated")
    rebuilt = init_default_models(tmp_path, seed=2, progress=lines.append, recipe=recipe)
    assert rebuilt["mil"]["sha256"] == sha256_file(tmp_path / MIL_FILE)
    assert rebuilt["mil"]["model_version"] == manifest["mil"]["model_version"]  # seeded: same model again


def test_the_uint8_default_encoder_embeds_real_tiles_as_the_float32_export_does(tmp_path: Path) -> None:
    """The default encoder now takes raw uint8 tiles and normalises in its graph: on the real scan's
    224 px tiles and the labelled real tiles (``../shared/fixtures/real``) it must give the embeddings of
    the same weights exported with a float32 input and normalised outside."""
    from tests import qc_reference

    if not qc_reference.CMU.is_file():
        pytest.fail(f"real fixture missing: {qc_reference.CMU} (../shared/fixtures/real beside the repo)")
    real = [
        case
        for case in qc_reference.cmu_cases() + qc_reference.real_tile_cases()
        if case.tile.shape[0] == 224
    ]
    tiles = np.stack([case.tile for case in real])
    assert len(tiles) >= 20
    as_uint8 = export_backbone("small-cnn", tmp_path / "u8.onnx", seed=0, input_format="uint8-nhwc")
    as_float = export_backbone("small-cnn", tmp_path / "f32.onnx", seed=0)
    assert as_uint8.weights_state_sha256 == as_float.weights_state_sha256
    uint8_runner, float_runner = BackboneRunner(tmp_path / "u8.onnx"), BackboneRunner(tmp_path / "f32.onnx")
    assert uint8_runner.raw_uint8_input and not float_runner.raw_uint8_input
    uint8_features, float_features = uint8_runner.embed(tiles), float_runner.embed(tiles)
    scale = np.abs(float_features).max()
    assert np.abs(uint8_features - float_features).max() <= 1e-4 * scale
