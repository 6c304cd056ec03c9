"""Embedder core: batches fill across shards and slides, outputs per shard, put-if-absent, backbones kept
apart, failures per shard, the stain hook, the batch handler, the torch backend, the uint8-input export,
``wsi model export-backbone`` and the benchmark's smoke form.

Everything runs for real: ONNX Runtime's CPU provider, torch on the CPU, JPEG shards in the filesystem
object store (the same interface as S3). Models are 64 px exports, so the file takes seconds.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wsitk.services.embedder.engine import EmbeddingEngine, ShardEmbedded, ShardJob, padded_batch_size
from wsitk.shared.keys import embedding_key
from wsitk.shared.models.export import export_backbone
from wsitk.shared.models.runtime import BackboneRunner
from wsitk.shared.objectstore import FilesystemObjectStore, StoredObject
from wsitk.shared.shards import Shard, ShardTile, encode_jpeg, pack_shard

BUCKET = "wsi-artifacts"
SIZE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("embed-models")
    export_backbone("small-cnn", directory / "a.onnx", input_size=SIZE, seed=0)
    export_backbone("small-cnn", directory / "b.onnx", input_size=SIZE, seed=1)
    export_backbone("small-cnn", directory / "u8.onnx", input_size=SIZE, seed=0, input_format="uint8-nhwc")
    return directory


class RecordingEncoder:
    """The real runner, with every batch size it is called with recorded."""

    def __init__(self, runner: BackboneRunner) -> None:
        self.runner = runner
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        return self.runner.infer(batch)


def _tiles(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, SIZE // 8, axis=1), SIZE // 8, axis=2)  # smooth: JPEG keeps it close


def _put_shard(store: FilesystemObjectStore, slide: str, shard_id: str, tiles: np.ndarray) -> str:
    key = f"tiles/{slide}/run1/{shard_id}.shard"
    entries = [ShardTile(x=i * 128, y=7 * i, data=encode_jpeg(tile)) for i, tile in enumerate(tiles)]
    header = {"tile_size": SIZE, "mpp": 0.5, "tile_size_level0": 128.0}
    store.put_if_absent(BUCKET, key, pack_shard(header, entries))
    return key


def _decoded(store: FilesystemObjectStore, shard_key: str) -> np.ndarray:
    """Every tile of a stored shard, decoded as the embedder decodes it."""
    return np.stack([tile for _, tile in Shard(store.get_bytes(BUCKET, shard_key)).iter_decoded()])


def _load(store: FilesystemObjectStore, key: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.get_bytes(BUCKET, key))) as data:
        return {name: data[name] for name in data.files}


def test_batches_fill_across_shards_and_slides_and_features_split_back(
    tmp_path: Path, model_dir: Path
) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    runner = BackboneRunner(model_dir / "a.onnx", batch_size=8, prefer=("CPUExecutionProvider",))
    encoder = RecordingEncoder(runner)
    shards = {("slide-a", "s00000"): _tiles(11, 1), ("slide-a", "s00001"): _tiles(6, 2)}
    shards[("slide-b", "s00000")] = _tiles(9, 3)
    masks = [np.ones(11, bool), np.array([1, 0, 1, 1, 0, 1], bool), np.ones(9, bool)]
    jobs = [
        ShardJob(slide, "run1", shard, BUCKET, _put_shard(store, slide, shard, tiles), accepted=mask)
        for ((slide, shard), tiles), mask in zip(shards.items(), masks, strict=True)
    ]
    with EmbeddingEngine(encoder, store, artifacts_bucket=BUCKET, decode_workers=2, chunk_tiles=3) as engine:
        results = engine.run(jobs)
    assert encoder.calls == [8, 8, 8]  # 11 + 4 + 9 = 24 tiles: three full batches, none per shard
    for job, result, tiles, mask in zip(jobs, results, shards.values(), masks, strict=True):
        assert isinstance(result, ShardEmbedded) and result.stored is not None
        assert result.stored.key == embedding_key(job.slide_id, "run1", runner.backbone_id, job.shard_id)
        stored = _load(store, result.stored.key)
        assert stored["features"].dtype == np.float16 and stored["features"].shape == (mask.sum(), 128)
        np.testing.assert_array_equal(stored["coords"][:, 0], np.flatnonzero(mask) * 128)
        assert int(stored["tile_size"]) == SIZE and float(stored["tile_size_level0"]) == 128.0
        serial = runner.embed(
            _decoded(store, job.shard_key)[mask]
        )  # one shard alone, no cross-shard batching
        np.testing.assert_allclose(stored["features"].astype(np.float32), serial, rtol=2e-3, atol=2e-3)
        assert not np.allclose(_tiles(len(tiles), 99)[:1], tiles[:1])


def test_a_partial_last_batch_is_padded_to_a_power_of_two_and_its_padding_discarded(
    tmp_path: Path, model_dir: Path
) -> None:
    encoder = RecordingEncoder(BackboneRunner(model_dir / "a.onnx", batch_size=8))
    store = FilesystemObjectStore(tmp_path / "store")
    tiles = _tiles(11, 5)  # one full batch of 8, then 3 tiles: run as 4 rows, the last one zeros
    job = ShardJob("slide-a", "run1", "s00000", BUCKET, _put_shard(store, "slide-a", "s00000", tiles))
    with EmbeddingEngine(encoder, store, artifacts_bucket=BUCKET, decode_workers=1) as engine:
        (result,) = engine.run([job])
    assert encoder.calls == [8, 4]
    assert isinstance(result, ShardEmbedded) and result.stored is not None
    features = _load(store, result.stored.key)["features"]
    assert features.shape == (11, 128)
    unpadded = encoder.runner.embed(_decoded(store, job.shard_key))
    np.testing.assert_allclose(features.astype(np.float32), unpadded, rtol=2e-3, atol=2e-3)
    assert [padded_batch_size(n, 64) for n in (1, 3, 4, 5, 33, 64, 70)] == [1, 4, 4, 8, 64, 64, 70]


def test_outputs_are_put_if_absent_and_two_backbones_never_mix(tmp_path: Path, model_dir: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    job = ShardJob("slide-a", "run1", "s00000", BUCKET, _put_shard(store, "slide-a", "s00000", _tiles(5, 4)))
    outputs: dict[str, StoredObject] = {}
    for name in ("a", "b", "a"):
        runner = BackboneRunner(model_dir / f"{name}.onnx", batch_size=4, prefer=("CPUExecutionProvider",))
        with EmbeddingEngine(runner, store, artifacts_bucket=BUCKET, decode_workers=1) as engine:
            (result,) = engine.run([job])
        assert isinstance(result, ShardEmbedded) and result.stored is not None
        if name in outputs:  # a redelivery: the stored object stands, same checksum
            assert result.stored.sha256 == outputs[name].sha256
        outputs[name] = result.stored
    assert outputs["a"].key != outputs["b"].key
    assert outputs["a"].key.split("/")[3] != outputs["b"].key.split("/")[3]  # the backbone id is in the key
    features_a, features_b = (_load(store, outputs[n].key)["features"] for n in ("a", "b"))
    assert not np.allclose(features_a, features_b)


def test_a_corrupt_shard_fails_alone_and_empty_shards_are_not_fetched(
    tmp_path: Path, model_dir: Path
) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    good = ShardJob("s", "run1", "s00000", BUCKET, _put_shard(store, "s", "s00000", _tiles(5, 5)))
    store.put_if_absent(BUCKET, "tiles/s/run1/bad.shard", b"not a shard at all")
    bad = ShardJob("s", "run1", "s00001", BUCKET, "tiles/s/run1/bad.shard")
    empty = ShardJob("s", "run1", "s00002", BUCKET, "tiles/s/run1/missing.shard", accepted=np.zeros(4, bool))
    runner = BackboneRunner(model_dir / "a.onnx", batch_size=4, prefer=("CPUExecutionProvider",))
    with EmbeddingEngine(runner, store, artifacts_bucket=BUCKET, decode_workers=1) as engine:
        first, second, third = engine.run([good, bad, empty])
    assert isinstance(first, ShardEmbedded) and first.tile_count == 5
    assert isinstance(second, Exception) and "not a WSI tile shard" in str(second)
    assert isinstance(third, ShardEmbedded) and third.stored is None and third.tile_count == 0


def test_stain_hook_is_applied_only_to_shards_that_carry_stain_params(
    tmp_path: Path, model_dir: Path
) -> None:
    from wsitk.shared.contracts import pb

    store = FilesystemObjectStore(tmp_path / "store")
    tiles = _tiles(4, 6)
    key = _put_shard(store, "s", "s00000", tiles)
    seen: list[str] = []

    def invert(tile: np.ndarray, params: Any) -> np.ndarray:
        seen.append(params.method)
        return 255 - tile

    jobs = [
        ShardJob("s", "run1", "s00000", BUCKET, key, stain=pb.StainParams(method="macenko")),
        ShardJob("t", "run1", "s00000", BUCKET, key, stain=pb.StainParams()),
    ]
    runner = BackboneRunner(model_dir / "a.onnx", batch_size=8, prefer=("CPUExecutionProvider",))
    with EmbeddingEngine(runner, store, artifacts_bucket=BUCKET, stain_normalizer=invert) as engine:
        normalised, plain = engine.run(jobs)
    assert seen == ["macenko"] * 4
    assert isinstance(normalised, ShardEmbedded) and isinstance(plain, ShardEmbedded)
    assert normalised.stored is not None and plain.stored is not None
    assert not np.allclose(
        _load(store, normalised.stored.key)["features"], _load(store, plain.stored.key)["features"]
    )


def test_uint8_input_export_matches_the_float_export(model_dir: Path) -> None:
    floating = BackboneRunner(model_dir / "a.onnx", prefer=("CPUExecutionProvider",))
    raw = BackboneRunner(model_dir / "u8.onnx", prefer=("CPUExecutionProvider",))
    assert raw.raw_uint8_input and not floating.raw_uint8_input
    assert raw.batch_array(3).shape == (3, SIZE, SIZE, 3) and raw.batch_array(3).dtype == np.uint8
    tiles = _tiles(5, 7)
    np.testing.assert_allclose(raw.embed(tiles), floating.embed(tiles), rtol=1e-4, atol=1e-4)
    assert raw.backbone_id != floating.backbone_id  # a different file interface is a different id


def test_torch_backend_rebuilds_the_exported_network_and_agrees(tmp_path: Path, model_dir: Path) -> None:
    from wsitk.shared.models.torch_backend import TorchBackboneRunner

    onnx_runner = BackboneRunner(model_dir / "a.onnx", prefer=("CPUExecutionProvider",))
    torch_runner = TorchBackboneRunner(model_dir / "a.onnx", batch_size=4, device="cpu")
    assert torch_runner.backbone_id == onnx_runner.backbone_id and torch_runner.sha256 == onnx_runner.sha256
    tiles = _tiles(6, 8)
    np.testing.assert_allclose(torch_runner.embed(tiles), onnx_runner.embed(tiles), rtol=1e-3, atol=1e-4)

    import torch
    from wsitk.shared.models.backbones import SmallCNN

    weights = tmp_path / "cnn.pth"
    torch.save(SmallCNN(seed=5).state_dict(), weights)
    export_backbone("small-cnn", tmp_path / "w.onnx", weights=weights, input_size=SIZE)
    torch.save(SmallCNN(seed=6).state_dict(), weights)  # the weights file changed after the export
    with pytest.raises(ValueError, match="not the weights file"):
        TorchBackboneRunner(tmp_path / "w.onnx", device="cpu")


def test_batch_handler_one_event_per_qc_result(tmp_path: Path, model_dir: Path) -> None:
    from wsitk.services.embedder.handler import EmbedderHandler
    from wsitk.shared.bus.runtime import Incoming
    from wsitk.shared.config import Settings
    from wsitk.shared.context import ServiceContext
    from wsitk.shared.contracts import pb
    from wsitk.shared.shards import mask_to_bytes

    store = FilesystemObjectStore(tmp_path / "store")
    (model_dir / "models.json").write_text(json.dumps({"backbone": {"path": "a.onnx"}}))
    settings = Settings(model_dir=model_dir, s3_endpoint=f"file://{tmp_path / 'store'}")
    handler = EmbedderHandler(
        ServiceContext(settings, "embedder", _store=store), batch_size=8, backend="onnxruntime"
    )
    backbone_id = handler.runner.backbone_id

    def message(shard_id: str, mask: np.ndarray, encoder_id: str = "") -> Incoming:
        key = _put_shard(store, "slide-h", shard_id, _tiles(len(mask), int(shard_id[-1])))
        event = pb.QcResult(
            meta=pb.EventMeta(event_id=shard_id, slide_id="slide-h"),
            tiling_run_id="run1",
            shard_id=shard_id,
            shard=pb.ObjectRef(bucket=BUCKET, key=key),
            tile_count=len(mask),
            accepted_count=int(mask.sum()),
            accepted_mask=mask_to_bytes(mask),
            profile=pb.PipelineProfile(encoder_id=encoder_id),
        )
        return Incoming("wsi.qc.results", 0, 0, None, b"", [], event)

    messages = [
        message("s00001", np.ones(5, bool)),
        message("s00002", np.zeros(3, bool)),
        message("s00003", np.ones(2, bool), encoder_id="another-encoder"),
        message("s00004", np.array([1, 0, 1], bool), encoder_id=backbone_id),
    ]
    outcomes = handler.handle_batch(messages)
    assert isinstance(outcomes[2], Exception) and "another-encoder" in str(outcomes[2])
    events = [o[0].message for o in outcomes if not isinstance(o, BaseException)]
    assert [(e.shard_id, e.tile_count) for e in events] == [("s00001", 5), ("s00002", 0), ("s00004", 2)]
    assert all(e.backbone_id == backbone_id and e.backbone_sha256 == handler.runner.sha256 for e in events)
    assert not events[1].HasField("embeddings") and events[0].embeddings.key.endswith("s00001.npz")
    again = handler.handle_batch(messages[:1])  # redelivery: the stored object and its checksum
    assert not isinstance(again[0], BaseException)
    assert again[0][0].message.embeddings.sha256 == events[0].embeddings.sha256


def test_cli_export_backbone_reports_the_difference_to_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsitk.shared.cli import main

    out = tmp_path / "cli.onnx"
    assert (
        main(["model", "export-backbone", "small-cnn", str(out), "--input-size", "32", "--uint8-input"]) == 0
    )
    printed = capsys.readouterr().out
    assert out.is_file() and "max abs difference" in printed
    summary = json.loads(printed[printed.index("{\n") : printed.rindex("}") + 1])
    assert summary["input_format"] == "uint8-nhwc" and summary["max_rel_diff"] <= 1e-3


def test_benchmark_smoke_form_runs_and_reports_both_throughputs() -> None:
    from tests.benchmarks.bench_embedder import _parse, run_benchmark

    report = run_benchmark(_parse(["--smoke"]))
    assert report["bare_tiles_per_s"] > 0 and report["end_to_end_tiles_per_s"] > 0
    assert report["engine"]["tiles"] == report["tiles_embedded"] > 0
    assert report["export"]["max_rel_diff_vs_torch"] <= 1e-3


def test_the_auto_backend_imports_torch_only_where_a_gpu_driver_is_present() -> None:
    script = """
import sys
from wsitk.shared.models.runtime import _torch_cuda_available
nodes = sys.argv[1:]
print(_torch_cuda_available(nodes), "torch" in sys.modules)
"""

    def run(*nodes: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", script, *nodes], capture_output=True, text=True, check=True
        )
        return out.stdout.strip().splitlines()[-1]

    assert run("/no/such/driver") == "False False"  # no driver: no import, about 100 MiB saved
    if importlib.util.find_spec("torch") is not None:  # a driver node (here: any path that exists)
        assert run("/").endswith(" True")  # ... and torch is asked
