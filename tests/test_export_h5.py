"""``wsi export h5``: a slide's embeddings as the CLAM / TRIDENT features file, never mixing backbones."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from wsitk.services.embedder.engine import EmbeddingEngine, ShardJob
from wsitk.shared.models.export import export_backbone
from wsitk.shared.models.runtime import BackboneRunner
from wsitk.shared.objectstore import FilesystemObjectStore
from wsitk.shared.shards import ShardTile, encode_jpeg, pack_shard

BUCKET = "wsi-artifacts"


def _embed(store: FilesystemObjectStore, model: Path, shard_tiles: dict[str, int]) -> BackboneRunner:
    rng = np.random.default_rng(0)
    jobs = []
    for shard_id, count in shard_tiles.items():
        tiles = [
            ShardTile(
                x=1000 * int(shard_id[-1]) + 64 * i,
                y=32 * i,
                data=encode_jpeg(rng.integers(0, 255, (32, 32, 3), np.uint8)),
            )
            for i in range(count)
        ]
        key = f"tiles/slide-x/run7/{shard_id}.shard"
        header = {"tile_size": 32, "mpp": 0.5, "tile_mpp": 0.499, "tile_size_level0": 64.0}
        store.put_if_absent(BUCKET, key, pack_shard(header, tiles))
        jobs.append(ShardJob("slide-x", "run7", shard_id, BUCKET, key))
    runner = BackboneRunner(model, batch_size=4, prefer=("CPUExecutionProvider",))
    with EmbeddingEngine(runner, store, artifacts_bucket=BUCKET, decode_workers=1) as engine:
        assert not any(isinstance(r, BaseException) for r in engine.run(jobs))
    return runner


def test_h5_export_has_clam_layout_and_refuses_to_mix_backbones(tmp_path: Path) -> None:
    from wsitk.shared.models.features_export import export_slide_h5

    store = FilesystemObjectStore(tmp_path / "store")
    export_backbone("small-cnn", tmp_path / "a.onnx", input_size=32, seed=0)
    runner = _embed(store, tmp_path / "a.onnx", {"s00001": 3, "s00000": 2})
    out = tmp_path / "h5" / "slide-x.h5"
    result = export_slide_h5(store, BUCKET, "slide-x", out)
    assert (result.tiles, result.dim, result.shards, result.backbone_id) == (5, 128, 2, runner.backbone_id)
    with h5py.File(out, "r") as handle:
        features, coords = handle["features"][:], handle["coords"][:]
        assert features.dtype == np.float32 and features.shape == (5, 128)
        assert coords.dtype == np.int64 and coords.shape == (5, 2)
        assert coords[:2, 0].tolist() == [0, 64] and coords[2:, 0].tolist() == [
            1000,
            1064,
            1128,
        ]  # shard order
        attrs = dict(handle["coords"].attrs)
        assert attrs["patch_size"] == 32 and attrs["patch_level"] == 0 and attrs["patch_size_level0"] == 64
        assert attrs["target_mpp"] == 0.5 and attrs["mpp"] == pytest.approx(0.499)  # cut as stored
        assert handle.attrs["backbone_id"] == runner.backbone_id and handle.attrs["tiling_run_id"] == "run7"
    stored = np.load(store._path(BUCKET, f"embeddings/slide-x/run7/{runner.backbone_id}/s00000.npz"))
    np.testing.assert_array_equal(features[:2], stored["features"].astype(np.float32))

    export_backbone("small-cnn", tmp_path / "b.onnx", input_size=32, seed=1)
    other = _embed(store, tmp_path / "b.onnx", {"s00000": 2})
    with pytest.raises(LookupError, match="2 embedding sets"):
        export_slide_h5(store, BUCKET, "slide-x", out)
    chosen = export_slide_h5(store, BUCKET, "slide-x", tmp_path / "b.h5", backbone_id=other.backbone_id)
    assert chosen.tiles == 2 and chosen.backbone_id == other.backbone_id
    with pytest.raises(LookupError, match="is the slide id right"):
        export_slide_h5(store, BUCKET, "no-such-slide", tmp_path / "none.h5")
