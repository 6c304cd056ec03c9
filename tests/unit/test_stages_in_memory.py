"""Three stages' real handlers chained over the in-memory broker: tiler -> quality-filter -> embedder.

No Kafka, S3 or PostgreSQL: the services' own ``build(settings)`` specs run under ``MemoryRunner``
(the shared delivery policy) against the filesystem object store. The slide is a small synthetic SVS
read by OpenSlide in the tiler's isolated child; the embedder runs the shipped ONNX backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from wsitk.services.embedder.main import build as embedder_spec
from wsitk.services.quality_filter.main import build as qc_spec
from wsitk.services.tiler.main import build as tiler_spec
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.bus.memory import MemoryBroker, MemoryRunner
from wsitk.shared.config import Settings
from wsitk.shared.contracts import new_meta, pb, profile_id
from wsitk.shared.objectstore import FilesystemObjectStore, sha256_file
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import DEADLETTER, EMBEDDINGS, QC_RESULTS, SLIDES_INGESTED, TILE_PLANS, TILE_SHARDS


def _ingested(settings: Settings, store: FilesystemObjectStore, slide: Path) -> Outgoing:
    source = store.put_file_if_absent(settings.uploads_bucket, f"cases/{slide.name}", slide)
    profile = pb.PipelineProfile(target_mpp=0.5, tile_size=224, tiles_per_shard=16, min_tissue_fraction=0.25)
    profile.profile_id = profile_id(profile)
    digest = sha256_file(slide)
    slide_id = digest[:32]
    event = pb.SlideIngested(
        meta=new_meta(service="ingest", slide_id=slide_id, event_parts=["ingested", digest]),
        source=pb.ObjectRef(bucket=source.bucket, key=source.key, size=source.size, sha256=digest),
        profile=profile,
    )
    return Outgoing(SLIDES_INGESTED, slide_id, event)


def test_a_slide_is_tiled_filtered_and_embedded_exactly_once_and_a_redelivery_changes_nothing(
    tmp_path: Path, tiny_models: Path
) -> None:
    slide = tmp_path / "slide.svs"
    generate_slide(slide, SynthSpec(width=4000, height=3000, mpp=0.5, seed=3, tumour_fraction=0.2))
    settings = Settings(
        s3_endpoint=f"file://{tmp_path / 'store'}",
        cache_dir=tmp_path / "cache",
        model_dir=tiny_models,
        isolation_memory_bytes=3 * 1024**3,
    )
    store = FilesystemObjectStore(tmp_path / "store")
    for bucket in (settings.uploads_bucket, settings.artifacts_bucket):
        store.ensure_bucket(bucket)
    broker = MemoryBroker()
    broker.publish([_ingested(settings, store, slide)])

    stages = [MemoryRunner(build(settings), broker) for build in (tiler_spec, qc_spec, embedder_spec)]
    for runner in stages:
        runner.drain()

    (plan,) = broker.events(TILE_PLANS)
    shards = broker.events(TILE_SHARDS)
    qc = broker.events(QC_RESULTS)
    embeddings = broker.events(EMBEDDINGS)
    assert broker.records(DEADLETTER) == []
    assert sorted(s.meta.event_id for s in shards) == sorted({s.meta.event_id for s in shards})
    assert sorted(s.shard_id for s in shards) == sorted(plan.shard_ids) and len(shards) >= 2
    assert len(qc) == len(shards) and len(embeddings) == len(shards)
    accepted = sum(int(r.accepted_count) for r in qc)
    assert 0 < accepted <= plan.total_tiles
    embedded = sum(int(e.tile_count) for e in embeddings)
    assert embedded == accepted
    first = next(e for e in embeddings if e.tile_count)
    with np.load(store._path(first.embeddings.bucket, first.embeddings.key)) as stored:
        matrices = [stored[name] for name in stored.files]
    assert any(m.shape == (first.tile_count, first.dim) and np.isfinite(m).all() for m in matrices)

    # A redelivery of the slide (the tiler crashed before its commit) re-publishes the same events;
    # downstream, the same deterministic ids: nothing new is stored, nothing differs.
    broker.committed[(stages[0].group, SLIDES_INGESTED)] = 0
    stages[0].drain()
    again = broker.events(TILE_SHARDS)[len(shards) :]
    assert sorted(s.meta.event_id for s in again) == sorted(s.meta.event_id for s in shards)
