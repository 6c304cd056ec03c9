"""`wsi redrive`: a message dead-lettered for a reason that was then fixed is replayed and completes."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from wsitk.shared.bus.kafka import Outgoing, make_producer, produce_all
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.objectstore import S3ObjectStore
from wsitk.shared.ops import redrive
from wsitk.shared.shards import ShardTile, encode_jpeg, pack_shard
from wsitk.shared.slides.synth import render_patch
from wsitk.shared.topics import TILE_SHARDS

from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e


def test_a_dead_lettered_shard_is_replayed_after_the_fix(pipeline: Pipeline) -> None:
    settings = pipeline.settings()
    slide_id = uuid.uuid4().hex
    key = f"tiles/{slide_id}/run-redrive/s00000.shard"
    event = pb.TileShard(
        meta=new_meta(service="test", slide_id=slide_id, event_parts=["redrive"]),
        tiling_run_id="run-redrive",
        shard_id="s00000",
        shard=pb.ObjectRef(bucket=settings.artifacts_bucket, key=key),
        tile_count=3,
        profile=pb.PipelineProfile(qc_min_tissue_fraction=0.5, qc_min_blur_variance=15.0),
    )

    async def publish() -> None:
        producer = make_producer(settings)
        await producer.start()
        try:
            await produce_all(producer, [Outgoing(TILE_SHARDS, f"{slide_id}/s00000", event)])
        finally:
            await producer.stop()

    # The shard object is missing: quality-filter fails deterministically and dead-letters after 3 attempts.
    asyncio.run(publish())
    pipeline.wait_for(
        lambda: (
            pipeline.query("SELECT count(*) FROM dead_letters WHERE slide_id = %s", (slide_id,))[0][0] == 1
        ),
        120,
        "the shard to be dead-lettered",
    )
    ((service, attempts, error),) = pipeline.query(
        "SELECT service, attempts, error FROM dead_letters WHERE slide_id = %s", (slide_id,)
    )
    assert service == "quality-filter" and attempts == 3 and "NoSuch" in error
    assert pipeline.query("SELECT status, reason_code FROM slides WHERE slide_id = %s", (slide_id,)) == [
        ("failed", "dead-lettered")
    ]

    # The fix: the object appears. Redrive replays the original message once.
    rng = np.random.default_rng(3)
    tiles = [ShardTile(i * 448, 0, encode_jpeg(render_patch("normal", 224, 0.5, rng))) for i in range(3)]
    S3ObjectStore(settings).put_if_absent(
        settings.artifacts_bucket, key, pack_shard({"slide_id": slide_id}, tiles)
    )
    assert asyncio.run(redrive(settings, slide=slide_id)) == 1
    assert asyncio.run(redrive(settings, slide=slide_id)) == 0  # replayed once, not again

    pipeline.wait_for(
        lambda: bool(
            pipeline.query(
                "SELECT 1 FROM stage_progress WHERE slide_id = %s AND stage = 'embedder'", (slide_id,)
            )
        ),
        120,
        "the replayed shard to pass QC and be embedded",
    )
    (accepted,) = pipeline.query("SELECT accepted_count FROM qc_summaries WHERE slide_id = %s", (slide_id,))[
        0
    ]
    assert accepted == 3
