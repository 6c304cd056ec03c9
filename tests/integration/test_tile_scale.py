"""Tiles are cut at a physical resolution: the same tissue scanned at 40x (0.25 um/px) and at 20x
(0.5 um/px), tiled at 0.5 um/px by the real tiler, shows nuclei of the same size in pixels. Tiling
by pyramid level instead (no resize from 40x) would make them about four times larger in area."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format
from scipy import ndimage
from wsitk.services.tiler.handler import tile_slide
from wsitk.shared.contracts import pb
from wsitk.shared.shards import Shard
from wsitk.shared.slides.synth import SynthSpec, generate_slide


def mean_nucleus_area_px(tiles: list[np.ndarray]) -> float:
    areas = []
    for tile in tiles:
        grey = tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        labels, count = ndimage.label(grey < 120)
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            areas.extend(sizes[sizes >= 4].tolist())
    assert len(areas) > 50, "too few nuclei found to compare"
    return float(np.median(areas))


def tiles_of(path: Path, work: Path) -> tuple[dict, list[np.ndarray]]:
    profile = pb.PipelineProfile(target_mpp=0.5, tile_size=224, tiles_per_shard=64, min_tissue_fraction=0.9)
    work.mkdir()
    plan = tile_slide(str(path), json_format.MessageToJson(profile), str(work), "scale-test")
    assert isinstance(plan, dict), plan
    tiles = []
    for shard in plan["shards"][:2]:
        data = Shard((work / f"{shard['shard_id']}.shard").read_bytes())
        tiles += [tile for _, tile in data.iter_decoded()]
    return plan, tiles


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_nuclei_have_the_same_size_in_pixels_at_40x_and_20x(tmp_path: Path, fmt: str) -> None:
    slide20 = tmp_path / f"s20.{fmt}"
    slide40 = tmp_path / f"s40.{fmt}"
    generate_slide(slide20, SynthSpec(width=3000, height=2400, mpp=0.5, fmt=fmt, seed=5))
    generate_slide(slide40, SynthSpec(width=6000, height=4800, mpp=0.25, fmt=fmt, seed=5))
    plan20, tiles20 = tiles_of(slide20, tmp_path / "t20")
    plan40, tiles40 = tiles_of(slide40, tmp_path / "t40")
    assert plan20["level0_mpp"] == pytest.approx(0.5, rel=0.01) and plan40["level0_mpp"] == pytest.approx(
        0.25, rel=0.01
    )
    assert plan20["tile_size_level0"] == pytest.approx(224) and plan40["tile_size_level0"] == pytest.approx(
        448
    )
    assert all(t.shape == (224, 224, 3) for t in tiles20 + tiles40)
    ratio = mean_nucleus_area_px(tiles40) / mean_nucleus_area_px(tiles20)
    print(
        json.dumps(
            {"fmt": fmt, "nucleus_area_ratio_40x_over_20x": round(ratio, 3), "reader": plan40.get("reader")}
        )
    )
    assert 0.7 < ratio < 1.4, ratio
