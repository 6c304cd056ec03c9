"""Short form of the crash-safety harness (tests/chaos.py): a few slides through the real local stack
while each of the six services is SIGKILLed once, only while it holds work in flight (two of the kills
between producing a batch's outputs and committing its offsets). Every slide must end with exactly
one prediction row and one prediction id, and the kills must have made the services redeliver."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import SERVICES, make_chaos_slides, run_chaos
from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e


def test_killing_services_mid_work_loses_and_doubles_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    slides = make_chaos_slides(tmp_path, 4, seed=7)
    report = run_chaos(pipeline, slides, kills=6, timeout_s=600, kill_wait_s=120)
    print("\n" + report.table())
    assert not report.missed, f"kills that found no work in flight: {report.missed}"
    assert {k.service for k in report.landed} == set(SERVICES), "every service type is killed mid-work"
    assert {k.moment for k in report.landed} == {"in-flight", "before-commit"}
    assert sum(report.runtime_redeliveries.values()) > 0, "no kill made a service see its work again"
    assert report.losses == 0, report.lost_keys
    assert report.duplicates == 0
    assert report.dead_letters == 0
    assert report.predictions_recorded == report.slides_in == 4
    assert not any(report.left_in_flight.values()), report.left_in_flight
    # Every pipeline service was measured (the viewer runs beside them and is measured too).
    assert set(SERVICES) <= set(report.peak_rss)
