"""The pipeline benchmark's one-process half runs in its quick form (the pipeline half is what the
end-to-end tests exercise; figures come from the full run, docs/throughput.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import bench_pipeline


def test_bench_pipeline_quick_one_process_reports_every_stage(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workdir", str(tmp_path), "--quick", "--skip-pipeline", "--models", str(tiny_models)]
    assert bench_pipeline.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{\n") :])  # after any library log lines
    one = report["inprocess"]
    assert report["slides"] == 2 and one["tiles_planned"] > 0
    assert 0 < one["tiles_accepted"] <= one["tiles_planned"]
    assert set(one["stage_seconds"]) == {"ingest", "tiler", "quality-filter", "embedder", "mil-scorer"}
    assert all(rate > 0 for rate in one["stage_tiles_per_s"].values())
    # the stages run one after another inside the wall time; each figure is rounded to 0.01 s, so their
    # sum may exceed the (rounded) wall time by up to half a hundredth per figure
    rounding = 0.005 * (len(one["stage_seconds"]) + 1)
    assert one["wall_s"] + rounding >= sum(one["stage_seconds"].values()) * 0.99
