"""``wsi export h5``: a slide's embeddings as the CLAM / TRIDENT features file, never mixing backbones."""

from __future__ import annotations

import json
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
        # no tiling manifest: described at level 0, where CLAM reads the tile's 64 level-0 pixels
        assert attrs["patch_size"] == 64 and attrs["patch_level"] == 0 and attrs["patch_size_level0"] == 64
        assert attrs["patch_size_target"] == 32
        assert attrs["target_mpp"] == 0.5 and attrs["mpp"] == pytest.approx(0.499)  # cut as stored
        assert (attrs["level0_magnification"], attrs["target_magnification"]) == (40, 20)
        assert handle.attrs["backbone_id"] == runner.backbone_id and handle.attrs["tiling_run_id"] == "run7"
    # the tiler's manifest says the tiles were cut at stored level 1 without resampling: CLAM reads them there
    manifest = {"level": 1, "resampled": False, "level0_mpp": 0.2495}
    store.put_if_absent(BUCKET, "tiles/slide-x/run7/manifest.json", json.dumps(manifest).encode())
    export_slide_h5(store, BUCKET, "slide-x", tmp_path / "at-level.h5")
    with h5py.File(tmp_path / "at-level.h5", "r") as handle:
        attrs = dict(handle["coords"].attrs)
        assert (attrs["patch_level"], attrs["patch_size"], attrs["patch_size_level0"]) == (1, 32, 64)
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


def _clam_field_of_view(attrs: dict[str, float], level_downsamples: list[float]) -> float:
    """What CLAM's Whole_Slide_Bag_FP reads: read_region(coord, patch_level, (patch_size, patch_size)),
    i.e. patch_size pixels of level patch_level, in level-0 pixels."""
    return attrs["patch_size"] * level_downsamples[int(attrs["patch_level"])]


@pytest.mark.parametrize(
    ("case", "level0_mpp", "downsamples", "read_level", "resampled", "tile_mpp", "expected"),
    [
        # 20x scan, 20x tiles cut at level 0: everything in one frame
        ("20x", 0.5, [1.0, 4.0, 16.0], 0, False, 0.5, (0, 224, 224, 20, 20)),
        # real 20x scanner (0.499 um/px) within the tolerance: cut as stored, true mpp kept
        ("20x-0.499", 0.499, [1.0, 4.0, 16.0], 0, False, 0.499, (0, 224, 224, 20, 20)),
        # 40x scan with a stored 2x level: 20x tiles cut at level 1
        ("40x-with-20x-level", 0.25, [1.0, 2.0, 8.0], 1, False, 0.5, (1, 224, 448, 40, 20)),
        # 40x Aperio (levels 1x, 4x, 16x): 20x tiles resampled from level 0; CLAM reads 443 px at level 0
        ("40x-aperio", 0.2527, [1.0, 4.0, 16.0], 0, True, 0.5, (0, 443, 443, 40, 20)),
    ],
)
def test_coords_attributes_mean_what_clam_and_trident_read(
    case: str,
    level0_mpp: float,
    downsamples: list[float],
    read_level: int,
    resampled: bool,
    tile_mpp: float,
    expected: tuple[int, int, int, int, int],
) -> None:
    from wsitk.shared.models.features_export import coords_attributes

    tile_size = 224
    # the tiler's geometry: a tile of tile_size pixels at tile_mpp covers this many level-0 pixels
    tile_size_level0 = tile_size * tile_mpp / level0_mpp
    attrs = coords_attributes(
        tile_size=tile_size,
        tile_size_level0=tile_size_level0,
        target_mpp=0.5,
        tile_mpp=tile_mpp,
        read_level=read_level,
        resampled=resampled,
    )
    got = (
        attrs["patch_level"],
        attrs["patch_size"],
        attrs["patch_size_level0"],
        attrs["level0_magnification"],
        attrs["target_magnification"],
    )
    assert got == expected, case
    # CLAM: the region it reads is the tile's field of view (to the pixel)
    assert abs(_clam_field_of_view(attrs, downsamples) - tile_size_level0) < 1.0, case
    # TRIDENT: patch_size_level0 is the level-0 side; its own relation holds whenever the frames coincide
    assert abs(attrs["patch_size_level0"] - tile_size_level0) < 1.0
    trident_side0 = (
        attrs["patch_size_target"] * attrs["level0_magnification"] // attrs["target_magnification"]
    )
    assert abs(trident_side0 - tile_size_level0) <= 0.02 * tile_size_level0 + 1
    if not resampled:  # cut at a stored level: CLAM's patch_size is TRIDENT's target-frame patch_size too
        assert attrs["patch_size"] == attrs["patch_size_target"]
        trident = attrs["patch_size"] * attrs["level0_magnification"] // attrs["target_magnification"]
        assert trident == attrs["patch_size_level0"]
