"""Dependency outages: PostgreSQL stopped for 30 s, the S3 endpoint unreachable for 30 s, the broker
frozen for 30 s. The services retry with backoff, report not-ready, recover by themselves, dead-letter
nothing and lose nothing."""

from __future__ import annotations

import os
import signal
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from wsitk.shared.stack import start_component, stop_component

from tests.conftest import Pipeline
from tests.e2e.test_e2e_pipeline import all_terminal, make_slides

pytestmark = pytest.mark.e2e
OUTAGE_S = 30


def run_through_outage(
    pipeline: Pipeline,
    tmp_path: Path,
    name: str,
    cut: Callable[[], None],
    restore: Callable[[], None],
    watch: str,
) -> list[bool]:
    """Upload slides, cut a dependency while they are in flight, restore it; return `watch`'s readiness samples."""
    keys = []
    for path in make_slides(tmp_path, 2, seed=zlib.crc32(name.encode()) % 10_000):
        key = f"outage-{name}/{path.name}"
        pipeline.upload(path, key)
        keys.append(key)
    pipeline.wait_for(lambda: len(pipeline.statuses(keys)) == len(keys), 120, "the slides to be ingested")
    readiness = []
    cut()
    try:
        until = time.monotonic() + OUTAGE_S
        while time.monotonic() < until:
            try:
                readiness.append(pipeline.ready(watch))
            except OSError:
                readiness.append(False)
            time.sleep(2)
    finally:
        restore()
    pipeline.wait_for(
        lambda: all_terminal(pipeline, keys), 300, f"every slide to finish after the {name} outage"
    )
    assert set(pipeline.statuses(keys).values()) == {"predicted"}
    slide_ids = [
        sid
        for (sid,) in pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = ANY(%s)", (keys,))
    ]
    counts = dict(
        pipeline.query(
            "SELECT slide_id, count(*) FROM predictions WHERE slide_id = ANY(%s) GROUP BY 1", (slide_ids,)
        )
    )
    assert counts == dict.fromkeys(slide_ids, 1)
    assert (
        pipeline.query("SELECT count(*) FROM dead_letters WHERE slide_id = ANY(%s)", (slide_ids,))[0][0] == 0
    )
    assert all(pipeline.pids().values()), "a service died during the outage"
    pipeline.wait_for(lambda: pipeline.ready(watch), 60, f"{watch} to report ready again")
    return readiness


def test_postgres_down_for_30_seconds(pipeline: Pipeline, tmp_path: Path) -> None:
    state_dir = pipeline.stack.state_dir
    readiness = run_through_outage(
        pipeline,
        tmp_path,
        "postgres",
        cut=lambda: stop_component(state_dir, "postgres"),
        restore=lambda: start_component(state_dir, "postgres"),
        watch="recorder",
    )
    assert False in readiness, "the recorder kept reporting ready while PostgreSQL was down"


def test_s3_unreachable_for_30_seconds(pipeline: Pipeline, tmp_path: Path) -> None:
    proxy = pipeline.s3_proxy
    readiness = run_through_outage(
        pipeline, tmp_path, "s3", cut=proxy.cut, restore=proxy.restore, watch="tiler"
    )
    # The tiler may or may not have had S3 work during the cut; the slides' outcome above is the guarantee.
    assert readiness


def test_broker_frozen_for_30_seconds(pipeline: Pipeline, tmp_path: Path) -> None:
    broker_pid = pipeline.stack.pids["broker"]
    run_through_outage(
        pipeline,
        tmp_path,
        "broker",
        cut=lambda: os.kill(broker_pid, signal.SIGSTOP),
        restore=lambda: os.kill(broker_pid, signal.SIGCONT),
        watch="recorder",
    )
