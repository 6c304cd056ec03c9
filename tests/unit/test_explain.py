"""Attention explanations: QuPath GeoJSON, heatmap, top-tile mosaic, tiles from shards, ``wsi export``.

Fast and server-free: the object store is the filesystem backend, shards are packed with the real
shard format and JPEG tiles, and the attention maps are written as the mil-scorer writes them.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from PIL import Image
from wsitk.shared.models.explain import (
    ATTENTION_COLORMAP,
    MOSAIC_GAP_PX,
    TILE_CLASS,
    TOP_CLASS,
    ShardSource,
    attention_geojson,
    attention_heatmap,
    attention_ranks,
    load_attention,
    load_top_tiles,
    slide_shard_sources,
    top_tiles_mosaic,
)
from wsitk.shared.objectstore import FilesystemObjectStore
from wsitk.shared.shards import ShardTile, encode_jpeg, pack_shard

BUCKET = "wsi-artifacts"
SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "geojson.schema.json").read_text())


class CountingStore(FilesystemObjectStore):
    """The filesystem store, remembering every object read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get_bytes(self, bucket: str, key: str, version_id: str = "") -> bytes:
        self.reads.append(key)
        return super().get_bytes(bucket, key, version_id)


def _grid(columns: int, rows: int, tile: int) -> np.ndarray:
    return np.array([[c * tile, r * tile] for r in range(rows) for c in range(columns)], dtype=np.int64)


def _attention(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(count, 0.3)).astype(np.float32)


def _nearest_colormap_index(rgb: np.ndarray) -> int:
    distances = np.abs(ATTENTION_COLORMAP.astype(int) - np.asarray(rgb[:3], dtype=int)).sum(axis=1)
    return int(np.argmin(distances))


# -- GeoJSON ---------------------------------------------------------------------------------------


def _ring_area(ring: list[list[float]]) -> float:
    """Shoelace formula: positive for a counter-clockwise ring in the numeric (x, y) plane."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def test_schema_is_valid_and_rejects_what_rfc7946_forbids() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    square = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
    good: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": {}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}, "properties": None},
            {
                "type": "Feature",
                "geometry": {"type": "MultiPolygon", "coordinates": [[square]]},
                "properties": {},
            },
        ],
    }
    assert validator.is_valid(good)
    bad_variants = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square[:3]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, "4"]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}},
        {"type": "Feature", "geometry": {"type": "Circle", "coordinates": [3, 4]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}, "properties": 5},
    ]
    for variant in bad_variants:
        assert not validator.is_valid({"type": "FeatureCollection", "features": [variant]}), variant
    assert not validator.is_valid({"type": "FeatureCollection"})
    assert not validator.is_valid({**good, "bbox": [0, 0, 1]})


def test_geojson_is_rfc7946_and_carries_what_qupath_reads() -> None:
    tile = 512
    coords = _grid(6, 4, tile) + np.array([1000, 2000])
    attention = _attention(len(coords))
    attention[[3, 7]] = attention[5]  # ties share a scaled value but keep distinct ranks
    collection = attention_geojson(
        coords,
        attention,
        tile,
        slide_id="slide-a",
        model_version="mil-v1",
        probability=0.83,
        top_k_highlight=5,
    )

    jsonschema.Draft202012Validator(SCHEMA).validate(collection)
    assert json.loads(json.dumps(collection, allow_nan=False)) == collection
    features = collection["features"]
    assert len(features) == len(coords)

    by_corner = {(int(x), int(y)): i for i, (x, y) in enumerate(coords)}
    seen = set()
    for feature in features:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and len(feature["geometry"]["coordinates"]) == 1
        assert len(ring) == 5 and ring[0] == ring[-1], "rings must be closed"
        assert _ring_area(ring) == pytest.approx(tile * tile), "exterior ring must be CCW in the (x, y) plane"
        x, y = ring[0]
        assert {tuple(p) for p in ring} == {(x, y), (x + tile, y), (x + tile, y + tile), (x, y + tile)}
        index = by_corner[(x, y)]
        seen.add(index)
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["isLocked"] is True
        assert isinstance(props["name"], str) and props["name"]
        colour = props["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        classification = props["classification"]
        assert classification["name"] in {TOP_CLASS, TILE_CLASS}
        assert len(classification["color"]) == 3 and all(isinstance(c, int) for c in classification["color"])
        measurements = props["measurements"]
        assert set(measurements) == {"attention", "attention_rank", "attention_scaled"}
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in measurements.values())
        assert measurements["attention"] == pytest.approx(float(attention[index]), rel=1e-6)
        assert 0.0 <= measurements["attention_scaled"] <= 1.0
    assert seen == set(range(len(coords))), "one feature per tile"

    ids = [feature["id"] for feature in features]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)
    again = attention_geojson(coords, attention, tile, slide_id="slide-a", model_version="mil-v1")
    assert [f["id"] for f in again["features"]] == ids, "ids are deterministic"
    other_model = attention_geojson(coords, attention, tile, slide_id="slide-a", model_version="mil-v2")
    assert not set(ids) & {f["id"] for f in other_model["features"]}

    ranks = [f["properties"]["measurements"]["attention_rank"] for f in features]
    assert ranks == list(range(1, len(coords) + 1)), "features come highest attention first"
    weights = [f["properties"]["measurements"]["attention"] for f in features]
    assert weights == sorted(weights, reverse=True)
    scaled = [f["properties"]["measurements"]["attention_scaled"] for f in features]
    assert scaled == sorted(scaled, reverse=True) and scaled[0] == 1.0 and scaled[-1] == 0.0
    top = [f for f in features if f["properties"]["classification"]["name"] == TOP_CLASS]
    assert len(top) == 5 and top == features[:5]
    hot = [_nearest_colormap_index(np.array(f["properties"]["color"])) for f in features]
    assert hot == sorted(hot, reverse=True) and hot[0] > hot[-1], "tile colour follows attention"

    assert collection["bbox"] == [1000, 2000, 1000 + 6 * tile, 2000 + 4 * tile]
    assert collection["wsi"]["slide_id"] == "slide-a" and collection["wsi"]["model_version"] == "mil-v1"
    assert collection["wsi"]["probability"] == pytest.approx(0.83)
    assert collection["wsi"]["tiles"] == len(coords)


def test_geojson_refuses_inputs_that_cannot_be_tiles() -> None:
    coords = _grid(2, 1, 100)
    with pytest.raises(ValueError, match="one weight per tile"):
        attention_geojson(coords, [1.0], 100, slide_id="s", model_version="m")
    with pytest.raises(ValueError, match="NaN"):
        attention_geojson(coords, [np.nan, 1.0], 100, slide_id="s", model_version="m")
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        attention_geojson(np.zeros((2, 3)), [0.5, 0.5], 100, slide_id="s", model_version="m")
    with pytest.raises(ValueError, match="positive"):
        attention_geojson(coords, [0.5, 0.5], 0, slide_id="s", model_version="m")


def test_attention_ranks_spread_heavy_tails_and_share_ties() -> None:
    rank, scaled = attention_ranks([0.9, 0.01, 0.05, 0.04])
    assert rank.tolist() == [1, 4, 2, 3]
    assert scaled.tolist() == pytest.approx([1.0, 0.0, 2 / 3, 1 / 3])  # min-max would put 3 of 4 near 0
    rank, scaled = attention_ranks([0.25, 0.25, 0.25, 0.25])
    assert rank.tolist() == [1, 2, 3, 4] and scaled.tolist() == [0.5] * 4
    _, scaled = attention_ranks([0.1, 0.3, 0.3, 0.3])
    assert scaled[1] == scaled[2] == scaled[3] and scaled[0] == 0.0


def test_colormap_matches_inferno_and_gets_lighter() -> None:
    import matplotlib

    reference = np.rint(matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(ATTENTION_COLORMAP.astype(float) - reference).max() <= 8  # 17 anchors, linear between
    luminance = ATTENTION_COLORMAP.astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > -0.5), "lightness must rise with attention"


# -- heatmap ---------------------------------------------------------------------------------------


def test_heatmap_paints_hot_tiles_hotter_and_leaves_untiled_area_clear() -> None:
    tile = 500
    coords = np.array([[0, 0], [500, 0], [1000, 0], [0, 500], [1500, 1500]])
    attention = np.array([0.6, 0.1, 0.15, 0.1, 0.05], dtype=np.float32)
    png = attention_heatmap(coords, attention, tile, 4000, 3000, max_side=400)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGBA" and image.size == (400, 300)
    pixels = np.asarray(image)
    hot, cold = pixels[25, 25], pixels[175, 175]  # centres of the 0.6 tile and the 0.05 tile
    assert hot[3] == 255 and cold[3] == 255
    assert _nearest_colormap_index(hot) > _nearest_colormap_index(cold)
    assert pixels[280, 380, 3] == 0 and pixels[25, 175, 3] == 0, "untiled area is transparent"

    thumbnail = np.full((77, 123, 3), 200, dtype=np.uint8)
    blended = np.asarray(
        Image.open(
            io.BytesIO(
                attention_heatmap(coords, attention, tile, 4000, 3000, thumbnail=thumbnail, max_side=400)
            )
        )
    )
    assert blended.shape == (300, 400, 3)
    assert blended[280, 380].tolist() == [200, 200, 200], "the thumbnail shows where there are no tiles"
    assert blended[25, 25].tolist() != [200, 200, 200]


def test_heatmap_of_a_huge_slide_is_bounded_and_keeps_hot_spots() -> None:
    tile = 256  # about 0.65 output pixels at max_side 512 on a 200,000 px wide slide
    rng = np.random.default_rng(1)
    scattered = np.unique(rng.integers(4, 700, size=(3000, 2)) * tile, axis=0)
    neighbours = np.array([[0, 0], [tile, 0], [0, tile], [tile, tile]])  # all four touch output pixel (0, 0)
    coords = np.concatenate([neighbours, scattered])
    attention = np.full(len(coords), 1e-5, dtype=np.float32)
    attention[0] = 0.5
    png = attention_heatmap(coords, attention, tile, 200_000, 180_000, max_side=512)
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.shape == (461, 512, 4)
    assert _nearest_colormap_index(image[0, 0]) == 255, "the hottest tile wins the pixel it shares"
    assert _nearest_colormap_index(image[0, 1]) < 200


# -- mosaic ----------------------------------------------------------------------------------------


def test_mosaic_orders_tiles_by_attention_on_the_expected_grid() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    tiles = [np.full((64, 64, 3), colour, dtype=np.uint8) for colour in colours]
    attention = [0.05, 0.4, 0.1, 0.2, 0.15, 0.1]
    tile_px, columns = 48, 4
    plain = np.asarray(
        Image.open(
            io.BytesIO(top_tiles_mosaic(tiles, attention, columns=columns, tile_px=tile_px, captions=False))
        )
    )
    assert plain.shape == (2 * tile_px + MOSAIC_GAP_PX, columns * tile_px + (columns - 1) * MOSAIC_GAP_PX, 3)
    expected_order = [1, 3, 4, 2, 5, 0]  # by attention, ties in input order
    for position, index in enumerate(expected_order):
        left = (position % columns) * (tile_px + MOSAIC_GAP_PX)
        top = (position // columns) * (tile_px + MOSAIC_GAP_PX)
        cell = plain[top : top + tile_px, left : left + tile_px]
        assert (cell == colours[index]).all(), f"cell {position} should hold tile {index}"
    assert (plain[tile_px + MOSAIC_GAP_PX :, 2 * (tile_px + MOSAIC_GAP_PX) :] == 255).all(), "empty cells"

    captioned = np.asarray(
        Image.open(io.BytesIO(top_tiles_mosaic(tiles, attention, columns=columns, tile_px=tile_px)))
    )
    corner = captioned[:12, :30]
    assert (corner == 0).all(axis=2).any() and (corner > 200).all(axis=2).any(), "caption drawn"
    assert (captioned[-4:, columns * tile_px - 4 :] == plain[-4:, columns * tile_px - 4 :]).all()

    jpeg = Image.open(io.BytesIO(top_tiles_mosaic(tiles[:3], attention[:3], image_format="jpeg")))
    assert jpeg.format == "JPEG" and jpeg.size == (3 * 224 + 2 * MOSAIC_GAP_PX, 224)
    with pytest.raises(ValueError, match="one per tile"):
        top_tiles_mosaic(tiles, attention[:2])


# -- tiles from shards -----------------------------------------------------------------------------


def _tile_pixels(x: int, y: int, size: int = 32) -> np.ndarray:
    """A smooth tile whose colour encodes its position (JPEG keeps it within a few levels)."""
    base = np.array([(x // 64) * 37 % 200 + 20, (y // 64) * 53 % 200 + 20, 128], dtype=np.float64)
    ramp = np.linspace(0, 30, size)[None, :, None]
    return np.clip(base + ramp, 0, 255).astype(np.uint8) * np.ones((size, 1, 1), dtype=np.uint8)


def _write_slide(
    store: FilesystemObjectStore, slide: str, run: str, *, shards: int = 3, per_shard: int = 4
) -> np.ndarray:
    """Shards as the tiler keys them, embeddings npz as the embedder writes them (first tile rejected by QC)."""
    coords = _grid(shards * per_shard, 1, 64)
    header = {"slide_id": slide, "tile_size": 32, "mpp": 0.5, "tile_size_level0": 64.0, "level": 0}
    for index in range(shards):
        chunk = coords[index * per_shard : (index + 1) * per_shard]
        tiles = [
            ShardTile(int(x), int(y), encode_jpeg(_tile_pixels(int(x), int(y)), quality=95)) for x, y in chunk
        ]
        shard_id = f"s{index:05d}"
        store.put_if_absent(
            BUCKET,
            f"tiles/{slide}/{run}/{shard_id}.shard",
            pack_shard({**header, "shard_id": shard_id}, tiles),
        )
        buffer = io.BytesIO()
        np.savez(
            buffer,
            features=np.zeros((per_shard - 1, 8), np.float16),
            coords=chunk[1:],
            tile_size=np.int64(32),
        )
        store.put_if_absent(BUCKET, f"embeddings/{slide}/{run}/bb-1/{shard_id}.npz", buffer.getvalue())
    return coords


def test_load_top_tiles_fetches_only_the_shards_holding_them(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    coords = _write_slide(store, "slide-a", "run1")
    sources = slide_shard_sources(store, BUCKET, "slide-a", "run1")
    assert [s.key.rsplit("/", 1)[1] for s in sources] == ["s00000.shard", "s00001.shard", "s00002.shard"]
    assert all(s.coords is not None and len(s.coords) == 3 for s in sources)
    assert not any(key.endswith(".shard") for key in store.reads), "indexing reads no shard"

    store.reads.clear()
    wanted = coords[[6, 5]]  # both in shard 1, asked out of order
    tiles = load_top_tiles(store, sources, wanted)
    assert store.reads == ["tiles/slide-a/run1/s00001.shard"]
    for tile, (x, y) in zip(tiles, wanted, strict=True):
        expected = _tile_pixels(int(x), int(y)).astype(int)
        assert tile.shape == (32, 32, 3) and tile.dtype == np.uint8
        assert np.abs(tile.astype(int) - expected).mean() < 3
    assert np.abs(tiles[0].astype(int) - tiles[1].astype(int)).mean() > 10, "distinct tiles, right order"

    store.reads.clear()
    load_top_tiles(store, sources, coords[[1, 11]])
    assert sorted(store.reads) == ["tiles/slide-a/run1/s00000.shard", "tiles/slide-a/run1/s00002.shard"]

    unindexed = [ShardSource(s.bucket, s.key) for s in sources]
    store.reads.clear()
    load_top_tiles(store, unindexed, coords[[2]])
    assert store.reads == ["tiles/slide-a/run1/s00000.shard"], "unindexed shards: stop once found"

    store.reads.clear()
    with pytest.raises(LookupError, match=r"1 of 1 wanted tiles .* \(3 fetched\)"):
        load_top_tiles(store, unindexed, [[99_999, 0]])
    with pytest.raises(LookupError, match="no tile shards"):
        slide_shard_sources(store, BUCKET, "slide-a", "run-other")


# -- wsi export geojson / heatmap / mosaic ---------------------------------------------------------


def _store_attention(
    store: FilesystemObjectStore, slide: str, run: str, model: str, coords: np.ndarray
) -> np.ndarray:
    attention = _attention(len(coords), seed=len(model))
    buffer = io.BytesIO()
    np.savez(buffer, coords=coords, attention=attention, tile_size_level0=64)  # as the mil-scorer writes it
    store.put_if_absent(BUCKET, f"attention/{slide}/{run}/{model}.npz", buffer.getvalue())
    return attention


def test_cli_exports_geojson_heatmap_and_mosaic_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsitk.shared.models.cli import add_export_arguments, cli_export

    parser = argparse.ArgumentParser(prog="wsi export")
    add_export_arguments(parser)

    def main(argv: list[str]) -> int:  # ``wsi export ...`` as shared/cli.py wires it
        return cli_export(parser.parse_args(argv[1:]))

    monkeypatch.setenv("WSI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WSI_S3_ENDPOINT", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("WSI_ARTIFACTS_BUCKET", BUCKET)
    store = FilesystemObjectStore(tmp_path / "store")
    coords = _write_slide(store, "slide-a", "run1")
    kept = np.delete(coords, [0, 4, 8], axis=0)  # the QC-accepted tiles the scorer saw
    attention = _store_attention(store, "slide-a", "run1", "mil-v1", kept)
    manifest = {"width": 1200, "height": 300, "shards": []}
    store.put_if_absent(BUCKET, "tiles/slide-a/run1/manifest.json", json.dumps(manifest).encode())
    out = tmp_path / "out"

    assert main(["export", "geojson", "slide-a", "--out", str(out), "--top-k", "3"]) == 0
    collection = json.loads((out / "slide-a.geojson").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(collection)
    assert len(collection["features"]) == len(kept)
    assert collection["wsi"]["tiling_run_id"] == "run1" and collection["wsi"]["model_version"] == "mil-v1"
    first = collection["features"][0]
    assert first["geometry"]["coordinates"][0][0] == kept[int(np.argmax(attention))].tolist()
    assert sum(f["properties"]["classification"]["name"] == TOP_CLASS for f in collection["features"]) == 3
    assert json.loads(capsys.readouterr().out)["path"] == str(out / "slide-a.geojson")

    assert main(["export", "heatmap", "slide-a", "--out", str(out), "--max-side", "240"]) == 0
    heatmap = Image.open(out / "slide-a.heatmap.png")
    assert heatmap.size == (240, 60) and heatmap.mode == "RGBA", "sized from the tiler's manifest"
    thumbnails = tmp_path / "thumbs"
    thumbnails.mkdir()
    Image.new("RGB", (120, 30), (10, 200, 10)).save(thumbnails / "slide-a.png")
    assert (
        main(["export", "heatmap", "slide-a", "--out", str(out / "t"), "--thumbnail", str(thumbnails)]) == 0
    )
    over_thumbnail = np.asarray(Image.open(out / "t" / "slide-a.heatmap.png"))
    assert over_thumbnail.shape == (256, 1024, 3) and over_thumbnail[128, 1015].tolist() == [10, 200, 10]

    assert main(["export", "mosaic", "slide-a", "--out", str(out), "--top-k", "2", "--tile-px", "32"]) == 0
    mosaic = Image.open(out / "slide-a.top-tiles.png")
    assert mosaic.size == (2 * 32 + MOSAIC_GAP_PX, 32)
    capsys.readouterr()

    _store_attention(store, "slide-a", "run1", "mil-v2", kept)
    assert main(["export", "geojson", "slide-a", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "--tiling-run run1 --model mil-v1" in error and "--tiling-run run1 --model mil-v2" in error
    assert main(["export", "geojson", "slide-a", "--out", str(out / "v2"), "--model", "mil-v2"]) == 0
    assert json.loads((out / "v2" / "slide-a.geojson").read_text())["wsi"]["model_version"] == "mil-v2"

    capsys.readouterr()
    assert main(["export", "geojson", "slide-zz", "--out", str(out)]) == 1
    assert "has it been scored" in capsys.readouterr().err
    assert not (out / "slide-zz.geojson").exists()


def test_load_attention_reads_what_the_scorer_stores(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    coords = _grid(3, 2, 64)
    attention = _store_attention(store, "slide-b", "run9", "mil-v1", coords)
    loaded = load_attention(store, BUCKET, "slide-b")
    assert (loaded.tiling_run_id, loaded.model_version, loaded.tile_size_level0) == ("run9", "mil-v1", 64.0)
    np.testing.assert_array_equal(loaded.coords, coords)
    np.testing.assert_array_equal(loaded.attention, attention)
    with pytest.raises(LookupError, match="stored"):
        load_attention(store, BUCKET, "slide-b", model_version="mil-v7")
