"""The quality-filter benchmark runs end to end in its quick form (figures come from the full run, see docs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import bench_qc


def test_bench_qc_quick_form_reports_every_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_qc.main(["--workdir", str(tmp_path), "--quick"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["slide"] for r in results] == ["CMU-1-Small-Region.svs", "bench-qc-1600x1200.svs"]
    for result in results:
        assert result["tiles"] == result["decoded"] == 32 and result["shards"] == 1
        assert result["same_with_and_without_table"]
        assert result["accepted"] + sum(result["rejected_by_reason"].values()) == result["tiles"]
        for key in ("decode_tiles_per_s", "qc_tiles_per_s", "qc_direct_tiles_per_s", "table_build_s"):
            assert result[key] > 0
        assert 0 < result["qc_vs_decode"] <= 1.5  # QC includes the decode: it cannot be much faster
