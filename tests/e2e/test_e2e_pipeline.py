"""End to end, through the real local stack: slides uploaded through the S3 API become exactly one
recorded prediction each, bad slides a readable rejection, also when a service is SIGKILLed mid-run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from wsitk.shared.ops import read_public_events
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import PREDICTIONS, SLIDES_REJECTED

from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e
TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


def make_slides(folder: Path, count: int, seed: int) -> list[Path]:
    paths = []
    for index in range(count):
        tumour = index % 2 == 0
        fmt = "svs" if index % 3 != 1 else "tiff"
        path = folder / f"case-{seed}-{index}.{fmt}"
        generate_slide(
            path,
            SynthSpec(
                width=3000,
                height=2400,
                mpp=0.5,
                fmt=fmt,
                seed=seed + index,
                tumour_fraction=0.3 if tumour else 0.0,
            ),
        )
        paths.append(path)
    return paths


def public_events(pipeline: Pipeline, topic: str) -> list[dict]:
    async def collect() -> list[dict]:
        events = read_public_events(pipeline.settings(), [topic], idle_timeout_s=3.0)
        return [body async for _, _, body in events if "meta" in body]  # skip others' undecodable records

    return asyncio.run(collect())


def all_terminal(pipeline: Pipeline, keys: list[str]) -> bool:
    statuses = pipeline.statuses(keys)
    return len(statuses) == len(keys) and set(statuses.values()) <= TERMINAL


def test_slides_become_exactly_one_prediction_each_and_a_bad_slide_a_readable_rejection(
    pipeline: Pipeline, fixtures_dir: Path, tmp_path: Path
) -> None:
    slides = make_slides(tmp_path, 3, seed=100)
    keys = []
    for path in slides:
        key = f"e2e/basic/{path.name}"
        pipeline.upload(path, key)
        keys.append(key)
    bad_key = "e2e/basic/unreadable.svs"
    pipeline.upload(fixtures_dir / "unreadable.svs", bad_key)

    pipeline.wait_for(
        lambda: all_terminal(pipeline, [*keys, bad_key]), 300, "every slide to reach an outcome"
    )

    statuses = pipeline.statuses([*keys, bad_key])
    assert statuses[bad_key] == "rejected"
    assert all(statuses[k] == "predicted" for k in keys), statuses

    rows = pipeline.query(
        "SELECT src.upload_key, count(p.*) FROM slide_sources src LEFT JOIN predictions p USING (slide_id) "
        "WHERE src.upload_key = ANY(%s) GROUP BY src.upload_key",
        (keys,),
    )
    assert dict(rows) == dict.fromkeys(keys, 1)

    ((reason_code, reason),) = pipeline.query(
        "SELECT s.reason_code, s.status_reason FROM slides s JOIN slide_sources src USING (slide_id) "
        "WHERE src.upload_key = %s",
        (bad_key,),
    )
    assert reason_code == "unreadable-pixels"
    assert "Bogus marker length" in reason and bad_key in reason  # names the upload and OpenSlide's own error

    slide_ids = {
        sid
        for (sid,) in pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = ANY(%s)", (keys,))
    }
    predictions = [e for e in public_events(pipeline, PREDICTIONS) if e["meta"]["slide_id"] in slide_ids]
    ids_per_slide = {
        sid: {e["prediction_id"] for e in predictions if e["meta"]["slide_id"] == sid} for sid in slide_ids
    }
    assert all(len(ids) == 1 for ids in ids_per_slide.values()), ids_per_slide
    assert {e["label"] for e in predictions} <= {"tumour", "normal"}

    rejected = [e for e in public_events(pipeline, SLIDES_REJECTED) if e.get("upload_key") == bad_key]
    assert rejected and rejected[0]["reason_code"] == "unreadable-pixels"

    # Nothing left in flight: no attempt still counted, nothing dead-lettered.
    assert pipeline.query("SELECT count(*) FROM delivery_attempts")[0][0] == 0
    assert (
        pipeline.query("SELECT count(*) FROM dead_letters WHERE slide_id = ANY(%s)", (list(slide_ids),))[0][0]
        == 0
    )
    # The public views answer for people who query instead of consume.
    assert (
        pipeline.query("SELECT count(*) FROM v_predictions WHERE slide_id = ANY(%s)", (list(slide_ids),))[0][
            0
        ]
        == 3
    )


@pytest.mark.parametrize("victim", ["embedder", "tiler"])
def test_a_service_killed_mid_run_loses_and_doubles_nothing(
    pipeline: Pipeline, tmp_path: Path, victim: str
) -> None:
    slides = make_slides(tmp_path, 3, seed=200 if victim == "embedder" else 300)
    keys = []
    for path in slides:
        key = f"e2e/kill-{victim}/{path.name}"
        pipeline.upload(path, key)
        keys.append(key)

    def victim_busy() -> bool:
        stage = {"embedder": "quality-filter", "tiler": "ingest"}[victim]
        rows = pipeline.query(
            "SELECT count(*) FROM slides s JOIN slide_sources src USING (slide_id) "
            "WHERE src.upload_key = ANY(%s) AND (s.stage = %s OR s.status = 'tiled')",
            (keys, stage),
        )
        return rows[0][0] > 0

    pipeline.wait_for(victim_busy, 180, f"work to reach the {victim}")
    pid = pipeline.pids()[victim]
    assert pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    assert pipeline.pids()[victim] is None
    pipeline.start((victim,))

    pipeline.wait_for(
        lambda: all_terminal(pipeline, keys), 360, "every slide to reach an outcome after the kill"
    )
    rows = pipeline.query(
        "SELECT src.upload_key, count(p.*) FROM slide_sources src LEFT JOIN predictions p USING (slide_id) "
        "WHERE src.upload_key = ANY(%s) GROUP BY src.upload_key",
        (keys,),
    )
    assert Counter(dict(rows)) == Counter(dict.fromkeys(keys, 1))
