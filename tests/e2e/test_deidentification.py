"""Identifying content embedded in a slide (file name, date, time, user, scanner id, barcode in the
Aperio description; label and macro images) never leaves ingest: not in any event on any topic, not
in any service's log, not in any stored artifact."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from wsitk.shared.bus.kafka import make_consumer
from wsitk.shared.objectstore import S3ObjectStore
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import topic_table

from tests.conftest import Pipeline
from tests.e2e.test_e2e_pipeline import all_terminal

pytestmark = pytest.mark.e2e


async def every_record_value(pipeline: Pipeline) -> list[bytes]:
    consumer = make_consumer(pipeline.settings(), [], None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = [
            TopicPartition(name, p)
            for name in topic_table()
            for p in consumer.partitions_for_topic(name) or []
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        values: list[bytes] = []
        idle = 0
        while idle < 6:
            batch = await consumer.getmany(timeout_ms=500)
            records = [r for rs in batch.values() for r in rs]
            idle = 0 if records else idle + 1
            values += [(r.value or b"") + b"".join(v for _, v in r.headers or []) for r in records]
        return values
    finally:
        await consumer.stop()


def test_identifying_fields_never_leave_ingest(pipeline: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "identified.svs"
    truth = generate_slide(
        path, SynthSpec(width=2400, height=2000, mpp=0.5, fmt="svs", seed=4242, tumour_fraction=0.2)
    )
    secrets = {v for v in truth.identifying_properties.values() if len(v) >= 6}
    assert secrets, "the synthetic slide must carry identifying fields to test against"
    raw = path.read_bytes()
    assert all(s.encode() in raw for s in secrets)  # they are really in the file
    key = f"deid-{uuid.uuid4().hex[:8]}/case.svs"
    pipeline.upload(path, key)
    pipeline.wait_for(lambda: all_terminal(pipeline, [key]), 180, "the slide to be processed")
    assert pipeline.statuses([key]) == {key: "predicted"}

    leaks = []
    for value in asyncio.run(every_record_value(pipeline)):
        leaks += [s for s in secrets if s.encode() in value]
    assert not leaks, f"identifying values in events: {sorted(set(leaks))}"

    for log in (pipeline.home / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f"identifying values in {log.name}"

    (slide_id,) = pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = %s", (key,))[0]
    store = S3ObjectStore(pipeline.settings())
    bucket = pipeline.settings().artifacts_bucket
    artifacts = [o for o in store.list_keys(bucket) if slide_id in o.key]
    assert artifacts, "the slide produced artifacts"
    for obj in artifacts:
        data = store.get_bytes(bucket, obj.key)
        assert not [s for s in secrets if s.encode() in data], f"identifying values in {obj.key}"
    (metadata,) = pipeline.query("SELECT metadata::text FROM slides WHERE slide_id = %s", (slide_id,))[0]
    assert not [s for s in secrets if s in metadata]
    assert "label" in metadata and "macro" in metadata  # associated images named, never carried
