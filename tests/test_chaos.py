"""Short form of the crash-safety harness (tests/chaos.py): a few slides, a few SIGKILLs, through the
real local stack. Every slide must end with exactly one prediction row and one prediction id."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import make_chaos_slides, run_chaos
from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e


def test_killing_services_at_random_loses_and_doubles_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    slides = make_chaos_slides(tmp_path, 4, seed=7)
    report = run_chaos(pipeline, slides, kills=4, seed=7, timeout_s=480)
    print("\n" + report.table())
    assert sum(report.kills.values()) >= 3, "the harness must actually kill services"
    assert report.losses == 0, report.lost_keys
    assert report.duplicates == 0
    assert report.predictions_recorded == report.slides_in == 4
    # Every pipeline service was measured (the viewer runs beside them and is measured too).
    assert {"ingest", "tiler", "quality-filter", "embedder", "mil-scorer", "recorder"} <= set(report.peak_rss)
