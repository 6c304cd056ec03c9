"""``tests/benchmarks/bench_scaling.py``: the figures it derives from the pipeline runs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.benchmarks.bench_scaling import _parse, summarise


def _run(wall: float, span: float, members: dict[str, float], predictions: list[int]) -> dict[str, Any]:
    return {
        "wall_s": wall,
        "stage_first_shard_s": {"tiler": 2.0, "embedder": 3.0},
        "stage_last_shard_s": {"tiler": 2.0 + span, "embedder": 3.0 + span},
        "stage_tiles": {"tiler": 1000, "embedder": 900},
        "member_busy_s": members,
        "predictions_per_slide": {f"slide{i}": count for i, count in enumerate(predictions)},
        "cpu_s_total": 10.0,
    }


def test_rates_efficiency_members_and_predictions() -> None:
    runs = {
        1: _run(40.0, 10.0, {"tiler": 9.0, "embedder": 9.5}, [1, 1]),
        2: _run(30.0, 8.0, {"tiler": 5.0, "tiler-2": 4.0, "embedder": 9.0, "embedder-2": 0.0}, [1, 2]),
    }
    summary = summarise(runs, ["tiler", "embedder"], slides=2)
    one, two = summary["1"], summary["2"]
    assert one["stages"]["tiler"]["tiles_per_s"] == 100.0 and one["stages"]["tiler"]["efficiency"] == 1.0
    assert two["stages"]["tiler"]["tiles_per_s"] == 125.0
    assert two["stages"]["tiler"]["efficiency"] == pytest.approx(125.0 / 200.0, abs=1e-3)
    assert two["stages"]["tiler"]["members_that_worked"] == 2
    assert two["stages"]["embedder"]["members"] == 2 and two["stages"]["embedder"]["members_that_worked"] == 1
    assert one["slides_per_hour"] == 180.0
    assert one["every_slide_one_prediction"] is True
    assert two["every_slide_one_prediction"] is False  # a slide predicted twice is a doubled slide


def test_a_missing_prediction_is_caught_and_bad_counts_are_refused() -> None:
    runs = {1: _run(40.0, 10.0, {"tiler": 9.0}, [1])}
    assert summarise(runs, ["tiler"], slides=2)["1"]["every_slide_one_prediction"] is False
    assert _parse(["--counts", "2,1,2"]).counts == [1, 2]
    with pytest.raises(SystemExit):
        _parse(["--counts", "0"])
    with pytest.raises(SystemExit):
        _parse(["--stages", "recorder"])
