"""The encoder registry: each foundation-model family at reduced size against an independent
implementation, strict checkpoint loading, ONNX export, a shard embedded end to end, and full-size layouts.

Reduced size: two blocks of width 64 (CONCH's pooler 32), the family's own patch size, input size,
register tokens, position-embedding layout, MLP kind and pooling, so every tensor keeps its exact name.
Random weights in the checkpoint's naming are written to a file in the family's format, loaded through
the registry and compared with ``transformers``' DINOv2 (``tests/encoder_reference.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from wsitk.shared.models.encoders import ENCODERS, CheckpointError, EncoderSpec, build_encoder
from wsitk.shared.models.export import export_backbone
from wsitk.shared.models.runtime import BackboneRunner

from tests.encoder_reference import hf_model, random_checkpoint, reference_forward

VIT_FAMILIES = [name for name, spec in ENCODERS.items() if spec.vit is not None]
# Families whose files are safetensors in these tests; the others are written as torch .bin files.
SAFETENSORS = {"phikon-v2", "virchow2", "h-optimus-1"}
AGREEMENT = 1e-4  # max |project - transformers| on outputs of order 1


def _reduced(name: str, monkeypatch: pytest.MonkeyPatch) -> EncoderSpec:
    spec = ENCODERS[name].reduced()
    monkeypatch.setitem(ENCODERS, spec.name, spec)
    return spec


def _write_checkpoint(
    spec: EncoderSpec, directory: Path, seed: int = 0
) -> tuple[Path, dict[str, torch.Tensor]]:
    if spec.layout == "hf-dinov2":  # the file transformers itself writes for a Dinov2Model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = {k: v.clone() for k, v in hf_model(spec).state_dict().items()}
            state = {k: v + 0.1 * torch.randn_like(v) for k, v in state.items()}  # non-trivial biases
    else:
        state = random_checkpoint(spec.checkpoint_layout(), seed)
    if spec.name.removesuffix("-reduced") in SAFETENSORS:
        path = directory / f"{spec.name}.safetensors"
        save_file(state, str(path))
    else:
        path = directory / f"{spec.name}.bin"
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_family_matches_transformers_and_exports_to_onnx(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _reduced(family, monkeypatch)
    weights, state = _write_checkpoint(spec, tmp_path)
    model = build_encoder(spec.name, weights)
    tiles = torch.randn(3, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tiles)
        theirs = reference_forward(spec, state)(tiles)
        unrelated = build_encoder(spec.name, None, seed=3)(tiles)
    assert ours.shape == (3, spec.output_dim)
    difference = float((ours - theirs).abs().max())
    print(
        f"{family}: max |project - transformers| = {difference:.2e} (outputs up to {float(theirs.abs().max()):.2f})"
    )
    assert difference < AGREEMENT
    assert float((ours - unrelated).abs().max()) > 1e-2  # the file's weights were used

    info = export_backbone(spec.name, tmp_path / f"{family}.onnx", weights=weights)
    print(f"{family}: ONNX vs torch max abs {info.max_abs_diff:.2e}, relative {info.max_rel_diff:.2e}")
    assert info.max_rel_diff <= 1e-3 and info.output_dim == spec.output_dim
    assert (info.input_size, info.tile_size, info.target_mpp) == (
        spec.input_size,
        spec.tile_size,
        spec.target_mpp,
    )
    assert (info.mean, info.std, info.encoder) == (spec.mean, spec.std, spec.name)
    runner = BackboneRunner(tmp_path / f"{family}.onnx", batch_size=2, prefer=("CPUExecutionProvider",))
    raw = np.random.default_rng(2).integers(0, 256, (3, spec.tile_size, spec.tile_size, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(runner.preprocess(raw))).numpy()
    np.testing.assert_allclose(runner.embed(raw), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_fp16_uint8_export_of_a_vit_agrees_and_big_models_store_weights_externally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsitk.shared.models.export as export_module

    spec = _reduced("uni2-h", monkeypatch)
    weights, _ = _write_checkpoint(spec, tmp_path)
    half = export_backbone(
        spec.name, tmp_path / "half.onnx", weights=weights, fp16=True, input_format="uint8-nhwc"
    )
    assert half.fp16 and half.max_rel_diff <= 5e-2
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)  # as for a ViT-g: graph + one data file
    big = export_backbone(spec.name, tmp_path / "out" / "big.onnx", weights=weights)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.onnx", "big.onnx.data"]
    assert big.external_data == "big.onnx.data" and big.max_rel_diff <= 1e-3
    small = BackboneRunner(tmp_path / "out" / "big.onnx", prefer=("CPUExecutionProvider",))
    tiles = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    full = export_backbone(spec.name, tmp_path / "full.onnx", weights=weights)
    np.testing.assert_allclose(
        small.embed(tiles),
        BackboneRunner(full.path, prefer=("CPUExecutionProvider",)).embed(tiles),
        atol=1e-5,
    )


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_a_shard_is_embedded_end_to_end_with_a_registered_encoder(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsitk.services.embedder.engine import EmbeddingEngine, ShardEmbedded, ShardJob
    from wsitk.shared.objectstore import FilesystemObjectStore
    from wsitk.shared.shards import Shard, ShardTile, encode_jpeg, pack_shard
    from wsitk.shared.slides.synth import render_patch

    spec = _reduced(family, monkeypatch)  # CONCH: 512 px tiles, resized to 448 by the embedder
    weights, _ = _write_checkpoint(spec, tmp_path)
    info = export_backbone(spec.name, tmp_path / "encoder.onnx", weights=weights, input_format="uint8-nhwc")
    store = FilesystemObjectStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    tiles = [
        render_patch(kind, spec.tile_size, spec.target_mpp, rng) for kind in ("normal", "tumour", "normal")
    ]
    entries = [ShardTile(x=spec.tile_size * i, y=0, data=encode_jpeg(tile)) for i, tile in enumerate(tiles)]
    header = {"tile_size": spec.tile_size, "mpp": spec.target_mpp, "tile_size_level0": 2.0 * spec.tile_size}
    store.put_if_absent("art", "tiles/s/run/s0.shard", pack_shard(header, entries))
    runner = BackboneRunner(info.path, batch_size=2, prefer=("CPUExecutionProvider",))
    with EmbeddingEngine(runner, store, artifacts_bucket="art", decode_workers=1) as engine:
        (result,) = engine.run([ShardJob("s", "run", "s0", "art", "tiles/s/run/s0.shard")])
    assert isinstance(result, ShardEmbedded) and result.stored is not None and result.tile_count == 3
    assert f"/{info.backbone_id}/" in result.stored.key
    import io

    with np.load(io.BytesIO(store.get_bytes("art", result.stored.key))) as data:
        features = data["features"].astype(np.float32)
    decoded = np.stack(
        [tile for _, tile in Shard(store.get_bytes("art", "tiles/s/run/s0.shard")).iter_decoded()]
    )
    model = build_encoder(spec.name, weights)
    with torch.no_grad():
        expected = model(torch.from_numpy(runner_preprocess(decoded, spec))).numpy()
    assert features.shape == (3, spec.output_dim)
    np.testing.assert_allclose(features, expected, atol=2e-2 * np.abs(expected).max())  # float16 storage

    from wsitk.shared.models.torch_backend import TorchBackboneRunner  # the GPU backend, here on the CPU

    rebuilt = TorchBackboneRunner(info.path, batch_size=2, device="cpu", cuda_graphs=False)
    assert rebuilt.backbone_id == runner.backbone_id
    np.testing.assert_allclose(rebuilt.embed(decoded), runner.embed(decoded), rtol=1e-3, atol=1e-4)


def runner_preprocess(tiles: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    from wsitk.shared.models.runtime import preprocess_tiles

    return preprocess_tiles(tiles, spec.input_size, spec.mean, spec.std)


def test_wrong_checkpoints_are_refused_with_a_readable_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uni, hopt, phikon = (_reduced(n, monkeypatch) for n in ("uni", "h-optimus-0", "phikon-v2"))
    uni_file, uni_state = _write_checkpoint(uni, tmp_path)

    with pytest.raises(CheckpointError) as other_family:  # another family's file
        build_encoder(hopt.name, uni_file)
    message = str(other_family.value)
    assert "is not a h-optimus-0-reduced checkpoint" in message and "missing 1 tensors: reg_token" in message
    assert "patch_embed.proj.weight [64, 3, 16, 16] (expected [64, 3, 14, 14])" in message
    assert "It matches the layout of uni-reduced" in message and "0 register tokens" in message

    with pytest.raises(CheckpointError, match=r"embeddings\.cls_token.*unexpected .*: cls_token"):
        build_encoder(phikon.name, uni_file)  # a timm file where a Dinov2Model file is expected

    renamed = dict(uni_state)
    renamed["blocks.1.attn.qkv_renamed.weight"] = renamed.pop("blocks.1.attn.qkv.weight")
    torch.save(renamed, tmp_path / "renamed.bin")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: blocks\.1\.attn\.qkv\.weight; unexpected"):
        build_encoder(uni.name, tmp_path / "renamed.bin")

    reshaped = dict(uni_state, **{"norm.weight": torch.ones(32)})
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(CheckpointError, match=r"norm\.weight \[32\] \(expected \[64\]\)"):
        build_encoder(uni.name, tmp_path / "reshaped.safetensors")

    save_file(uni_state, str(tmp_path / "full.safetensors"))
    for source in (uni_file, tmp_path / "full.safetensors"):
        truncated = tmp_path / f"truncated{source.suffix}"
        truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        with pytest.raises(CheckpointError, match=r"cannot be read .* is the download complete"):
            build_encoder(uni.name, truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_encoder(uni.name, tmp_path / "absent.bin")


def _hf_full_layout_as_timm(spec: EncoderSpec) -> dict[str, tuple[int, ...]]:
    """transformers' own full-size model (on the meta device), its shapes renamed to timm names."""
    vit = spec.vit
    assert vit is not None
    with torch.device("meta"):
        hf = hf_model(spec)
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    dim, registers, grid = vit.embed_dim, vit.reg_tokens, spec.input_size // vit.patch_size
    if spec.layout == "hf-dinov2":
        return shapes
    stored_grid = vit.grid
    out = {
        "cls_token": shapes["embeddings.cls_token"],
        "pos_embed": (1, stored_grid**2 + (0 if vit.no_embed_class else 1 + registers), dim),
        "patch_embed.proj.weight": shapes["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": shapes["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": shapes["layernorm.weight"],
        "norm.bias": shapes["layernorm.bias"],
    }
    assert shapes["embeddings.position_embeddings"] == (1, grid * grid + 1, dim)
    if registers:
        out["reg_token"] = shapes["embeddings.register_tokens"]
    mlp = ("weights_in", "weights_out") if vit.mlp == "swiglu-packed" else ("fc1", "fc2")
    for i in range(vit.depth):
        layer = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q = shapes[f"{layer}attention.attention.query.{kind}"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = (3 * q[0], *q[1:])
            out[f"blocks.{i}.attn.proj.{kind}"] = shapes[f"{layer}attention.output.dense.{kind}"]
            for norm in ("norm1", "norm2"):
                out[f"blocks.{i}.{norm}.{kind}"] = shapes[f"{layer}{norm}.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = shapes[f"{layer}mlp.{mlp[0]}.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = shapes[f"{layer}mlp.{mlp[1]}.{kind}"]
        out[f"blocks.{i}.ls1.gamma"] = shapes[f"{layer}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = shapes[f"{layer}layer_scale2.lambda1"]
    return out


# Published facts per family: (output dim, parameters in millions (+-1 %), distinctive tensors).
PUBLISHED: dict[str, tuple[int, float, dict[str, tuple[int, ...]]]] = {
    "uni": (1024, 303.4, {"pos_embed": (1, 197, 1024), "blocks.23.mlp.fc1.weight": (4096, 1024)}),
    "uni2-h": (
        1536,
        681.4,
        {"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536), "blocks.0.mlp.fc2.weight": (1536, 4096)},
    ),
    "virchow2": (
        2560,
        631.2,
        {"reg_token": (1, 4, 1280), "pos_embed": (1, 261, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280)},
    ),
    "h-optimus-0": (
        1536,
        1134.8,
        {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536), "blocks.39.mlp.fc1.weight": (8192, 1536)},
    ),
    "h-optimus-1": (1536, 1134.8, {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536)}),
    "prov-gigapath": (
        1536,
        1135.0,
        {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16)},
    ),
    "phikon-v2": (
        1024,
        303.4,
        {"embeddings.position_embeddings": (1, 197, 1024), "embeddings.mask_token": (1, 1024)},
    ),
    "conch-v1.5": (
        768,
        306.1,
        {"trunk.pos_embed": (1, 197, 1024), "attn_pool_contrast.to_kv.weight": (1536, 1024)},
    ),
}


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_full_size_layout_names_and_shapes_without_allocating(family: str) -> None:
    spec = ENCODERS[family]
    layout = spec.checkpoint_layout()  # built on the meta device
    output_dim, millions, tensors = PUBLISHED[family]
    assert spec.output_dim == output_dim
    assert abs(sum(math.prod(s) for s in layout.values()) / 1e6 - millions) < 0.01 * millions
    for name, shape in tensors.items():
        assert layout[name] == shape, name
    trunk = {k.removeprefix("trunk."): v for k, v in layout.items() if not k.startswith(("attn_pool", "ln_"))}
    assert trunk == _hf_full_layout_as_timm(spec)  # transformers' full-size model has the same tensors
    with torch.device("meta"):
        model = spec.make_module()
        model.set_input_size(spec.input_size)
        out = model(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert tuple(out.shape) == (2, output_dim)


def test_registry_entries_state_their_facts() -> None:
    for name, spec in ENCODERS.items():
        assert spec.name == name and spec.input_size >= 224 and spec.tile_size >= spec.input_size
        assert spec.target_mpp == 0.5 and spec.files and spec.licence and spec.pooling and spec.resize
        assert spec.layout in {"timm", "hf-dinov2", "torchvision", "project"}
    assert ENCODERS["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert (ENCODERS["conch-v1.5"].input_size, ENCODERS["conch-v1.5"].tile_size) == (448, 512)


def test_export_backbone_command_registers_the_encoder_and_the_profile_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsitk.shared.cli import main
    from wsitk.shared.config import Settings
    from wsitk.shared.context import ServiceContext
    from wsitk.shared.models.defaults import load_manifest

    spec = _reduced("conch-v1.5", monkeypatch)
    weights, _ = _write_checkpoint(spec, tmp_path)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "models.json").write_text(
        json.dumps({"backbone": {"path": "old.onnx", "backbone_id": "old-1"}})
    )
    monkeypatch.setenv("WSI_MODEL_DIR", str(model_dir))
    assert main(["model", "export-backbone", spec.name, "--weights", str(weights)]) == 0
    printed = capsys.readouterr().out
    assert "registered" in printed and "train and register a MIL model" in printed
    manifest = load_manifest(model_dir)
    assert manifest is not None
    backbone = manifest["backbone"]
    assert backbone["encoder"] == spec.name and backbone["path"] == f"backbone-{spec.name}.onnx"
    assert (backbone["tile_size"], backbone["input_size"], backbone["target_mpp"]) == (512, 448, 0.5)
    assert manifest["previous_backbones"][0]["backbone_id"] == "old-1"
    runner = BackboneRunner(model_dir / backbone["path"], prefer=("CPUExecutionProvider",))
    assert runner.backbone_id == backbone["backbone_id"]

    settings = Settings(model_dir=model_dir, tile_size=224, target_mpp=0.25)
    profile_tiles = ServiceContext(settings, "ingest").profile_geometry()
    assert profile_tiles == (512, 0.5)  # the encoder's, not the settings'
