"""quality-filter: per tile shard, decide which tiles are fit for the model, and say why not.

Exactly one ``QcResult`` per ``TileShard``, including shards where every tile is rejected, so the
scorer can account for every planned shard. Metrics per tile are stored as a JSON object
put-if-absent; a redelivered shard re-publishes the stored decision instead of recomputing it.

What is measured and decided, and in which order, is in ``measures.py`` beside this file. The stored
report has, per tile, its measures, its ``reason`` ("" when accepted) and, for pen, the ``ink`` colour. Tissue and
ink are measured against the slide's own background, which the tiler records in each shard's header
(``background``); thresholds come from the slide's pipeline profile, where 0 means the default.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
from wsitk.services.quality_filter.measures import (
    QcThresholds,
    assess,
    decide,
    ink_colour_name,
    measure,
    measure_batch,
)
from wsitk.shared.bus.delivery import Incoming
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.keys import object_ref, qc_report_key
from wsitk.shared.metrics import TILES
from wsitk.shared.shards import Shard, mask_from_bytes, mask_to_bytes
from wsitk.shared.slides.optical import Background
from wsitk.shared.topics import QC_RESULTS

SERVICE = "quality-filter"
#: Tiles decoded and measured together (memory: about 0.6 MB per 224 px tile while measured).
QC_BATCH_TILES = 16
__all__ = [
    "QcThresholds",
    "QualityFilterHandler",
    "accepted_indices",
    "assess",
    "assess_shard",
    "decide",
    "measure",
    "measure_batch",
]


class QualityFilterHandler:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def handle(self, message: Incoming) -> list[Outgoing]:
        event = message.event_as(pb.TileShard)
        bucket = self.ctx.settings.artifacts_bucket
        key = qc_report_key(event.meta.slide_id, event.tiling_run_id, event.shard_id)
        stored = self.ctx.store.stat(bucket, key)
        if stored is not None:
            report = json.loads(self.ctx.store.get_bytes(bucket, key))
        else:
            report = self._assess(event)
            stored = self.ctx.store.put_if_absent(
                bucket, key, json.dumps(report).encode(), "application/json"
            )
        accepted = np.array(report["accepted"], dtype=bool)
        result = pb.QcResult(
            meta=new_meta(
                service=SERVICE,
                slide_id=event.meta.slide_id,
                event_parts=["qc", event.tiling_run_id, event.shard_id],
                correlation_id=event.meta.correlation_id,
            ),
            tiling_run_id=event.tiling_run_id,
            shard_id=event.shard_id,
            shard=event.shard,
            tile_count=len(accepted),
            accepted_count=int(accepted.sum()),
            accepted_mask=mask_to_bytes(accepted),
            rejected_by_reason=report["rejected_by_reason"],
            metrics=object_ref(stored),
            profile=event.profile,
            stain=event.stain,
        )
        return [Outgoing(QC_RESULTS, f"{event.meta.slide_id}/{event.shard_id}", result)]

    def _assess(self, event: pb.TileShard) -> dict[str, Any]:
        report = assess_shard(
            Shard(self.ctx.store.get_bytes(event.shard.bucket, event.shard.key)), event.profile
        )
        accepted = sum(report["accepted"])
        TILES.labels(SERVICE, "accepted").inc(accepted)
        TILES.labels(SERVICE, "rejected").inc(len(report["accepted"]) - accepted)
        return report


def assess_shard(shard: Shard, profile: Any, *, use_table: bool | None = None) -> dict[str, Any]:
    """The QC report of one shard: per tile its measures and ``reason`` ("" when accepted; ``ink`` colour
    for pen), which tiles are accepted, counts by reason, and the background it was measured against.

    ``profile`` is the slide's ``PipelineProfile`` (its QC limits, and ``target_mpp`` when the shard does
    not say its scale). Tiles are decoded into one reused buffer and measured ``QC_BATCH_TILES`` at a time;
    ``use_table`` is ``measure_batch``'s (None: the slide's colour table once it pays).
    """
    accepted: list[bool] = []
    reasons: Counter[str] = Counter()
    per_tile: list[dict[str, Any]] = []
    limits = QcThresholds.from_profile(profile)
    background = Background.from_dict(shard.header.get("background"))
    # The tiles' true scale (within the tiler's tolerance of the target; older shards: the target).
    mpp = float(
        shard.header.get("tile_mpp") or shard.header.get("mpp") or getattr(profile, "target_mpp", 0.0) or 0.5
    )
    buffer: np.ndarray | None = None
    for start in range(0, len(shard), QC_BATCH_TILES):
        indices = range(start, min(start + QC_BATCH_TILES, len(shard)))
        stack = shard.decode_stack(indices, buffer)
        if stack is not None:
            buffer = stack if buffer is None else buffer  # the first batch is a full one
            measured = measure_batch(stack, background, mpp, use_table=use_table)
        else:  # tiles of one shard have one size; measure one at a time if a writer did otherwise
            measured = [measure(shard.decode(index), background, mpp) for index in indices]
        for metrics in measured:
            ok, reason = decide(metrics, limits)
            accepted.append(ok)
            entry: dict[str, Any] = {**metrics, "reason": reason}  # "" when accepted
            if reason == "pen":
                entry["ink"] = ink_colour_name(metrics)  # "blue", "green", "red" or "black"
            per_tile.append(entry)
            if not ok:
                reasons[reason] += 1
    return {
        "accepted": accepted,
        "rejected_by_reason": dict(reasons),
        "background": background.to_dict(),
        "tiles": per_tile,
    }


def accepted_indices(result: pb.QcResult) -> np.ndarray:
    return np.flatnonzero(mask_from_bytes(result.accepted_mask, result.tile_count))
