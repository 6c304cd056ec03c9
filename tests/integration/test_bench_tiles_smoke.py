"""The tile benchmark runs end to end in its quick form (figures come from the full run, see docs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import bench_tiles


def test_bench_tiles_quick_form_reports_every_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_tiles.main(["--workdir", str(tmp_path), "--quick"]) == 0
    results = json.loads(capsys.readouterr().out)
    # 20x aligned; 40x and a 0.2527 um/px 40x decoded at half size; the real 0.499 um/px scan cut as
    # stored at 256 px and, at its own 240 px tiles, passed through.
    assert [(r["slide"].split("-2400")[0], r["tile_size"]) for r in results] == [
        ("bench-20x", 256),
        ("bench-40x", 256),
        ("bench-40x-0.2527", 256),
        ("CMU-1-Small-Region.svs", 256),
        ("CMU-1-Small-Region.svs", 240),
    ]
    assert [r["dct_scale"] for r in results] == [1, 2, 2, 1, 1]
    assert not any(r["resampled"] for r in results)
    assert [round(r["tile_mpp"], 4) for r in results] == [0.5, 0.5, 0.5054, 0.499, 0.499]
    assert results[-1]["tiles_passed_through"] > 0 and results[-2]["tiles_passed_through"] == 0
    for result in results:
        assert result["tiles"] > 0 and result["stored_tiles_involved"] >= result["tiles"] // 4
        for key in (
            "ours_tiles_per_s",
            "openslide_tiles_per_s",
            "raw_decode_output_tiles_per_s",
            "tiler_tiles_per_s",
            "peak_rss_mib",
        ):
            assert result[key] > 0
        assert result["checksum_ratio"] == pytest.approx(1.0, abs=0.02)  # both readers saw the same tiles
