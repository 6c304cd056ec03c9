"""quality-filter: per tile shard, decide which tiles are fit for the model, and say why not.

Exactly one ``QcResult`` per ``TileShard``, including shards where every tile is rejected, so the
scorer can account for every planned shard. Metrics per tile (tissue fraction, blur as variance of
the Laplacian) are stored as a JSON object put-if-absent; a redelivered shard re-publishes the
stored decision instead of recomputing it.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.bus.runtime import Incoming
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.metrics import TILES
from wsitk.shared.shards import Shard, mask_from_bytes, mask_to_bytes
from wsitk.shared.topics import QC_RESULTS

SERVICE = "quality-filter"


def tissue_fraction(tile: np.ndarray) -> float:
    """Share of pixels that are stained tissue: saturated enough and not near-white."""
    rgb = tile.astype(np.float32) / 255.0
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    return float(np.mean((saturation > 0.08) & (high < 0.95)))


def blur_variance(tile: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (0-255 scale): low means blurred."""
    grey = tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lap = -4 * grey[1:-1, 1:-1] + grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
    return float(lap.var())


def assess(tile: np.ndarray, profile: pb.PipelineProfile) -> tuple[bool, str, dict[str, float]]:
    metrics = {
        "tissue_fraction": round(tissue_fraction(tile), 4),
        "blur_variance": round(blur_variance(tile), 2),
    }
    if metrics["tissue_fraction"] < profile.qc_min_tissue_fraction:
        return False, "background", metrics
    if metrics["blur_variance"] < profile.qc_min_blur_variance:
        return False, "blur", metrics
    return True, "", metrics


class QualityFilterHandler:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def handle(self, message: Incoming) -> list[Outgoing]:
        event = message.event
        assert isinstance(event, pb.TileShard)
        bucket = self.ctx.settings.artifacts_bucket
        key = f"qc/{event.meta.slide_id}/{event.tiling_run_id}/{event.shard_id}.json"
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
            metrics=pb.ObjectRef(
                bucket=stored.bucket, key=stored.key, size=stored.size, sha256=stored.sha256
            ),
            profile=event.profile,
            stain=event.stain,
        )
        return [Outgoing(QC_RESULTS, f"{event.meta.slide_id}/{event.shard_id}", result)]

    def _assess(self, event: pb.TileShard) -> dict[str, Any]:
        shard = Shard(self.ctx.store.get_bytes(event.shard.bucket, event.shard.key))
        accepted: list[bool] = []
        reasons: Counter[str] = Counter()
        per_tile: list[dict[str, float]] = []
        for _, tile in shard.iter_decoded():
            ok, reason, metrics = assess(tile, event.profile)
            accepted.append(ok)
            per_tile.append(metrics)
            if not ok:
                reasons[reason] += 1
        TILES.labels(SERVICE, "accepted").inc(sum(accepted))
        TILES.labels(SERVICE, "rejected").inc(len(accepted) - sum(accepted))
        return {"accepted": accepted, "rejected_by_reason": dict(reasons), "tiles": per_tile}


def accepted_indices(result: pb.QcResult) -> np.ndarray:
    return np.flatnonzero(mask_from_bytes(result.accepted_mask, result.tile_count))
