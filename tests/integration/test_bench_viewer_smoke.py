"""The viewer benchmark's smoke form: both tile servers answer every tile, and serve the same pixels."""

from __future__ import annotations

from pathlib import Path


def test_viewer_benchmark_runs_and_both_servers_cut_the_same_tiles(tmp_path: Path) -> None:
    from tests.benchmarks.bench_viewer import _slide, measure

    slide = _slide(tmp_path, (1500, 1200))
    result = measure(slide, tmp_path, count=30, clients=4)
    for server in ("viewer", "deepzoom"):
        for phase in ("cold", "warm"):
            assert result[server][phase]["tiles"] == 30
            assert result[server][phase]["tiles_per_s"] > 0
    assert result["mean_abs_pixel_difference"] < 0.5
