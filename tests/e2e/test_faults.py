"""Faults beyond a dead process, short forms (long forms: ``python -m tests.chaos --fault ...``, see
docs/reliability.md): a slow object store, a full local disk, the broker connection cut mid-produce,
and the database restarted inside the recorder's open transaction. Each runs slides through the six
services on the real local stack and asserts what the system promises under that fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import faults
from tests.chaos import ChaosReport, make_chaos_slides
from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e
MEMORY_BOUND = 1024 * 2**20  # per service process tree; the load test's largest tree is about 430 MiB


def assert_promises_kept(report: ChaosReport, slides: int) -> None:
    print("\n" + report.table())
    assert report.losses == 0, report.lost_keys
    assert report.duplicates == 0
    assert report.predictions_recorded == report.slides_in == slides
    assert report.dead_letters == 0, "an infrastructure fault dead-lettered work"
    assert not any(report.left_in_flight.values()), report.left_in_flight
    assert max(report.peak_rss.values()) < MEMORY_BOUND, report.peak_rss


def figure(report: ChaosReport, label: str) -> str:
    return dict(report.extra)[label]


def test_slow_object_store_costs_time_not_data(pipeline: Pipeline, tmp_path: Path) -> None:
    slides = make_chaos_slides(tmp_path, 2, seed=31)
    report = faults.slow_object_store(pipeline, slides, latency_s=1.0, seconds=12, timeout_s=300)
    assert_promises_kept(report, 2)
    delayed = int(figure(report, "S3 requests delayed").split()[0])
    assert delayed >= 5, "the slow proxy did not slow the services' S3 requests"
    assert all(pipeline.pids().values()), "a service died while the object store was slow"


def test_full_cache_disk_waits_with_a_reason_naming_the_disk_and_recovers(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    slides = make_chaos_slides(tmp_path, 1, seed=37)
    report = faults.full_cache_disk(pipeline, slides, hold_s=4, timeout_s=300)
    assert_promises_kept(report, 1)
    waits = dict(item.split() for item in figure(report, "waits logged ('local disk full')").split(", "))
    assert int(waits["ingest"]) >= 1, "ingest did not report the full disk"
    assert int(waits["tiler"]) >= 1, "the tiler did not report the full disk"
    assert figure(report, "not ready while full") == "ingest True, tiler True"
    assert figure(report, "ready once space returned") == "True"
    cache = Path(pipeline.env["WSI_CACHE_DIR"]).resolve()
    ingest_log = (pipeline.home / "logs" / "ingest.log").read_text()
    assert f"local disk full: the slide cache {cache}/ingest has" in ingest_log
    tiler_log = (pipeline.home / "logs" / "tiler.log").read_text()
    assert f"local disk full: the tiler's work folder {cache} has" in tiler_log


def test_broker_connection_cut_mid_produce_loses_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    # large enough that its shard events go out over a second or more, not in one burst the probe misses
    slides = make_chaos_slides(tmp_path, 1, seed=41, size=(16000, 12000))
    report = faults.broker_cut_mid_produce(pipeline, slides, cuts=2, timeout_s=300)
    assert_promises_kept(report, 1)
    assert int(figure(report, "cuts mid-produce (tiler)").split()[0]) >= 1, "no cut landed mid-produce"
    shards, _, planned = figure(report, "shard events recorded").split()[:3]
    assert shards == planned and int(planned) > 1


def test_database_restart_inside_the_recorders_transaction(pipeline: Pipeline, tmp_path: Path) -> None:
    slides = make_chaos_slides(tmp_path, 1, seed=43)
    report = faults.database_restart_mid_transaction(pipeline, slides, timeout_s=300)
    assert figure(report, "recorder transaction open at the restart") == "yes"
    assert_promises_kept(report, 1)
