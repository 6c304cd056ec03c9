"""The tiler publishes a slide's plan, then each shard as it is stored, while the rest are still cut:
quality-filter and the embedder start on a large slide long before its last tile is read.

The handler runs for real here (its isolated child, OpenSlide, the filesystem object store); only the
producer is a recorder, standing in for ``Incoming.emit`` of the Kafka runtime.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from wsitk.services.tiler.handler import TilerHandler
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.bus.runtime import Incoming
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb, profile_id
from wsitk.shared.objectstore import FilesystemObjectStore, sha256_file
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import SLIDES_INGESTED, TILE_PLANS, TILE_SHARDS


def _ingested(
    tmp_path: Path, seed: int = 8, handler: TilerHandler | None = None
) -> tuple[TilerHandler, pb.SlideIngested]:
    slide = tmp_path / f"slide-{seed}.svs"
    generate_slide(slide, SynthSpec(width=8000, height=6000, mpp=0.5, seed=seed, tumour_fraction=0.2))
    if handler is None:
        settings = Settings(cache_dir=tmp_path / "cache", isolation_memory_bytes=3 * 1024**3)
        store = FilesystemObjectStore(tmp_path / "store")
        for bucket in (settings.uploads_bucket, settings.artifacts_bucket):
            store.ensure_bucket(bucket)
        handler = TilerHandler(ServiceContext(settings, "tiler", store))
    settings, store = handler.ctx.settings, handler.ctx.store
    source = store.put_file_if_absent(settings.uploads_bucket, f"cases/{slide.name}", slide)
    profile = pb.PipelineProfile(target_mpp=0.5, tile_size=224, tiles_per_shard=8, min_tissue_fraction=0.25)
    profile.profile_id = profile_id(profile)
    digest = sha256_file(slide)
    event = pb.SlideIngested(
        meta=new_meta(service="ingest", slide_id=digest[:32], event_parts=["ingested", digest]),
        source=pb.ObjectRef(bucket=source.bucket, key=source.key, size=source.size, sha256=digest),
        profile=profile,
    )
    return handler, event


def _ids(outputs: list[Outgoing]) -> list[str]:
    return [str(o.message.meta.event_id) for o in outputs if o.message is not None]


def test_plan_and_shards_go_out_while_the_slide_is_cut_each_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsitk.services.tiler import handler as tiler

    monkeypatch.setattr(tiler, "EARLY_POLL_S", 0.01)  # this small slide is cut in a fraction of a second
    handler, event = _ingested(tmp_path)
    early: list[tuple[float, Outgoing]] = []
    message = Incoming(SLIDES_INGESTED, 0, 0, b"", event.SerializeToString(), [], event)
    message.emit = lambda outputs: early.extend((time.monotonic(), o) for o in outputs)
    returned = handler.handle(message)
    finished = time.monotonic()

    # Everything the tiler has to say about the slide, published once: early or in the handler's return.
    everything = handler._events(event, early[0][1].message.tiling_run_id, _stored_manifest(handler, event))
    published = [o for _, o in early] + returned
    assert sorted(_ids(published)) == sorted(_ids(everything))
    assert len(set(_ids(published))) == len(published)
    # The plan first, then shards in order; shards well before the last tile was cut.
    assert early[0][1].topic == TILE_PLANS
    shard_indices = [o.message.shard_index for _, o in early if o.topic == TILE_SHARDS]
    print(f"{len(shard_indices)} shards published early")
    assert shard_indices == sorted(shard_indices) and len(shard_indices) >= 1
    total = len([o for o in everything if o.topic == TILE_SHARDS])
    assert total >= 10
    assert early[0][0] < finished - 0.05, "the plan went out only when the slide was done"

    # Published early or not, the shard events are the ones a redelivery re-publishes from the manifest.
    again = handler.handle(Incoming(SLIDES_INGESTED, 0, 1, b"", event.SerializeToString(), [], event))
    assert _ids(again) == _ids(everything)


def test_without_a_runtime_everything_is_returned_slide_after_slide(tmp_path: Path) -> None:
    handler = None
    for seed in (8, 9):  # the decoder child outlives each slide's tiling (it is reused for the next)
        handler, event = _ingested(tmp_path, seed, handler)
        message = Incoming(SLIDES_INGESTED, 0, seed, b"", event.SerializeToString(), [], event)
        outputs = handler.handle(message)
        assert outputs[0].topic == TILE_PLANS
        assert len([o for o in outputs if o.topic == TILE_SHARDS]) >= 10


def _stored_manifest(handler: TilerHandler, event: pb.SlideIngested) -> dict:
    import json

    from wsitk.shared.contracts import tiling_run_id

    run_id = tiling_run_id(event.meta.slide_id, event.profile)
    bucket = handler.ctx.settings.artifacts_bucket
    return json.loads(
        handler.ctx.store.get_bytes(bucket, f"tiles/{event.meta.slide_id}/{run_id}/manifest.json")
    )
