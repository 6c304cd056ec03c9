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
    assert [r["dct_scale"] for r in results] == [1, 2]  # 20x aligned, 40x decoded at half size
    for result in results:
        assert result["tiles"] > 0 and result["stored_tiles_involved"] >= result["tiles"] // 4
        for key in (
            "ours_tiles_per_s",
            "openslide_tiles_per_s",
            "raw_decode_output_tiles_per_s",
            "peak_rss_mib",
        ):
            assert result[key] > 0
        assert result["checksum_ratio"] == pytest.approx(1.0, abs=0.02)  # both readers saw the same tiles
