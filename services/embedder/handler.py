"""embedder: the accepted tiles of each QC'd shard become float16 embeddings in the object store.

One ``ShardEmbedding`` per ``QcResult``, empty shards included. Embeddings are stored per shard as
an ``.npz`` (``features`` float16 [N, D], ``coords`` int64 [N, 2] level-0 top-left corners),
put-if-absent under a key that names the backbone, so a redelivery re-publishes what is stored and a
slide embedded with two backbones never mixes. Every event names the backbone id and the checksum of
its ONNX file. A shard whose profile pins another encoder than the one loaded is refused.
"""

from __future__ import annotations

import io
from functools import cached_property
from pathlib import Path

import numpy as np
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.bus.runtime import Incoming
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.errors import PermanentError
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import MODEL_INFO, TILES
from wsitk.shared.shards import Shard, mask_from_bytes
from wsitk.shared.topics import EMBEDDINGS

SERVICE = "embedder"
log = get_logger()


def backbone_path(ctx: ServiceContext) -> Path:
    manifest = ctx.model_manifest()
    rel = manifest.get("backbone", {}).get("path", "backbone-small-cnn.onnx")
    path = Path(rel) if Path(rel).is_absolute() else Path(ctx.settings.model_dir) / rel
    if not path.is_file():
        raise PermanentError(
            "model-missing",
            f"backbone model {path} not found: run `wsi model init-defaults` or set WSI_MODEL_DIR",
        )
    return path


class EmbedderHandler:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    @cached_property
    def runner(self):  # type: ignore[no-untyped-def]  # onnxruntime is imported lazily
        from wsitk.shared.models.runtime import BackboneRunner

        runner = BackboneRunner(backbone_path(self.ctx), batch_size=32)
        MODEL_INFO.labels(SERVICE, "backbone", runner.backbone_id).set(1)
        log.info("backbone loaded", backbone_id=runner.backbone_id, providers=runner.providers)
        return runner

    def handle(self, message: Incoming) -> list[Outgoing]:
        event = message.event
        assert isinstance(event, pb.QcResult)
        runner = self.runner
        if event.profile.encoder_id and event.profile.encoder_id != runner.backbone_id:
            raise PermanentError(
                "encoder-mismatch",
                f"this slide's profile pins encoder {event.profile.encoder_id}, but this embedder runs "
                f"{runner.backbone_id}; run an embedder with that encoder, or `wsi rescore` with a new profile",
            )
        slide_id = event.meta.slide_id
        bucket = self.ctx.settings.artifacts_bucket
        key = f"embeddings/{slide_id}/{event.tiling_run_id}/{runner.backbone_id}/{event.shard_id}.npz"
        ref = pb.ObjectRef()
        count = 0
        if event.accepted_count > 0:
            stored = self.ctx.store.stat(bucket, key)
            if stored is None:
                stored = self.ctx.store.put_if_absent(bucket, key, self._embed(event))
            with np.load(io.BytesIO(self.ctx.store.get_bytes(bucket, key))) as data:
                count = int(data["features"].shape[0])
            ref = pb.ObjectRef(bucket=stored.bucket, key=stored.key, size=stored.size, sha256=stored.sha256)
        out = pb.ShardEmbedding(
            meta=new_meta(
                service=SERVICE,
                slide_id=slide_id,
                event_parts=["embedding", event.tiling_run_id, event.shard_id, runner.backbone_id],
                correlation_id=event.meta.correlation_id,
            ),
            tiling_run_id=event.tiling_run_id,
            shard_id=event.shard_id,
            tile_count=count,
            dim=runner.output_dim,
            backbone_id=runner.backbone_id,
            backbone_sha256=runner.sha256,
            profile=event.profile,
        )
        if count:
            out.embeddings.CopyFrom(ref)
        return [Outgoing(EMBEDDINGS, slide_id, out)]

    def _embed(self, event: pb.QcResult) -> bytes:
        shard = Shard(self.ctx.store.get_bytes(event.shard.bucket, event.shard.key))
        keep = np.flatnonzero(mask_from_bytes(event.accepted_mask, event.tile_count))
        tiles = np.stack([tile for _, tile in shard.iter_decoded(keep.tolist())])
        features = self.runner.embed(tiles).astype(np.float16)
        TILES.labels(SERVICE, "embedded").inc(len(features))
        buffer = io.BytesIO()
        np.savez(buffer, features=features, coords=shard.coords[keep])
        return buffer.getvalue()
