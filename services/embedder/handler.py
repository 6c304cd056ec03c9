"""embedder: the accepted tiles of each QC'd shard become float16 embeddings in the object store.

The work itself is in ``engine.py`` (no Kafka there); this module turns a consumed batch of ``QcResult``
events into engine jobs and the engine's results into events. One ``ShardEmbedding`` per ``QcResult``,
empty shards included. Embeddings are stored per shard as
an ``.npz`` (``features`` float16 [N, D], ``coords`` int64 [N, 2] level-0 top-left corners),
put-if-absent under a key that names the backbone, so a redelivery re-publishes what is stored and a
slide embedded with two backbones never mixes. Every event names the backbone id and the checksum of
its ONNX file. A shard whose profile pins another encoder than the one loaded is refused.
"""

from __future__ import annotations

import io
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from wsitk.services.embedder.engine import EmbeddingEngine, ShardJob
from wsitk.shared.bus.delivery import Incoming
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.errors import PermanentError
from wsitk.shared.keys import object_ref
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import MODEL_INFO, TILES
from wsitk.shared.objectstore import StoredObject
from wsitk.shared.shards import mask_from_bytes
from wsitk.shared.topics import EMBEDDINGS

if TYPE_CHECKING:
    from wsitk.shared.models.runtime import TileEncoder

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
    """Embeds the QC results of a consumed batch together, so model batches fill across shards and slides.

    ``handle_batch`` is the runtime's ``batch_handler``: it runs in a worker thread while the partitions
    are paused (the consumer keeps heartbeating however long the batch takes) and returns one outcome per
    message, an exception for a message whose shard failed. Settings (see ``main.build``): ``batch_size``
    tiles per model call, ``decode_workers`` and ``prefetch_batches`` for the preparation pool, ``backend``
    (``auto``, ``onnxruntime``, ``torch``).
    """

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        batch_size: int = 64,
        decode_workers: int = 0,
        prefetch_batches: int = 3,
        fetch_ahead_shards: int = 3,
        backend: str = "auto",
    ) -> None:
        self.ctx = ctx
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.prefetch_batches = prefetch_batches
        self.fetch_ahead_shards = fetch_ahead_shards
        self.backend = backend

    @cached_property
    def runner(self) -> TileEncoder:
        from wsitk.shared.models.runtime import open_backbone

        runner = open_backbone(backbone_path(self.ctx), backend=self.backend, batch_size=self.batch_size)
        MODEL_INFO.labels(SERVICE, "backbone", runner.backbone_id).set(1)
        log.info(
            "backbone loaded",
            backbone_id=runner.backbone_id,
            providers=runner.providers,
            batch_size=self.batch_size,
        )
        return runner

    @cached_property
    def engine(self) -> EmbeddingEngine:
        return EmbeddingEngine(
            self.runner,
            self.ctx.store,
            artifacts_bucket=self.ctx.settings.artifacts_bucket,
            decode_workers=self.decode_workers,
            prefetch_batches=self.prefetch_batches,
            fetch_ahead_shards=self.fetch_ahead_shards,
        )

    def handle(self, message: Incoming) -> list[Outgoing]:
        """One message on its own (tests, tools); the service uses ``handle_batch``."""
        (outcome,) = self.handle_batch([message])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def handle_batch(self, messages: list[Incoming]) -> list[list[Outgoing] | BaseException]:
        runner = self.runner
        bucket = self.ctx.settings.artifacts_bucket
        outcomes: list[list[Outgoing] | BaseException] = []
        to_embed: dict[int, ShardJob] = {}
        known: dict[int, tuple[StoredObject, int]] = {}
        for index, message in enumerate(messages):
            event = message.event
            if not isinstance(event, pb.QcResult):
                outcomes.append(PermanentError("wrong-event", f"expected a QcResult, got {type(event)}"))
                continue
            outcomes.append([])
            if event.profile.encoder_id and event.profile.encoder_id != runner.backbone_id:
                outcomes[index] = PermanentError(
                    "encoder-mismatch",
                    f"this slide's profile pins encoder {event.profile.encoder_id}, but this embedder runs "
                    f"{runner.backbone_id}; run an embedder with that encoder, or `wsi rescore` with a new "
                    "profile",
                )
                continue
            if event.accepted_count == 0:
                continue
            job = ShardJob(
                slide_id=event.meta.slide_id,
                tiling_run_id=event.tiling_run_id,
                shard_id=event.shard_id,
                shard_bucket=event.shard.bucket,
                shard_key=event.shard.key,
                accepted=mask_from_bytes(event.accepted_mask, event.tile_count),
                stain=event.stain if event.HasField("stain") else None,
            )
            try:
                stored = self.ctx.store.stat(bucket, self.engine.key_for(job))
                if stored is not None:  # a redelivery: what is stored stands, its checksum is published
                    known[index] = (stored, self._stored_count(stored))
                else:
                    to_embed[index] = job
            except Exception as exc:  # noqa: BLE001 - the shard's outcome, classified below like the engine's
                outcomes[index] = exc
        results = self.engine.run(list(to_embed.values())) if to_embed else []
        for index, result in zip(to_embed, results, strict=True):
            if isinstance(result, BaseException):
                outcomes[index] = result
            elif result.stored is not None:  # (another replica's object when it won a race: same tiles)
                known[index] = (result.stored, result.tile_count)
        embedded = sum(count for _, count in known.values())
        TILES.labels(SERVICE, "embedded").inc(embedded)
        for index, message in enumerate(messages):
            if isinstance(outcomes[index], BaseException):
                continue
            event = message.event_as(pb.QcResult)
            outcomes[index] = [self._output(event, *known.get(index, (None, 0)))]
        return outcomes

    def _stored_count(self, stored: StoredObject) -> int:
        with np.load(io.BytesIO(self.ctx.store.get_bytes(stored.bucket, stored.key))) as data:
            return int(data["features"].shape[0])

    def _output(self, event: pb.QcResult, stored: StoredObject | None, count: int) -> Outgoing:
        runner = self.runner
        slide_id = event.meta.slide_id
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
        if count and stored is not None:
            out.embeddings.CopyFrom(object_ref(stored))
        return Outgoing(EMBEDDINGS, slide_id, out)
