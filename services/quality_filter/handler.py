"""quality-filter: per tile shard, decide which tiles are fit for the model, and say why not.

Exactly one ``QcResult`` per ``TileShard``, including shards where every tile is rejected, so the
scorer can account for every planned shard. Metrics per tile are stored as a JSON object
put-if-absent; a redelivered shard re-publishes the stored decision instead of recomputing it.

Checks, in this order (the first that fails names the reason; counts by reason go to the recorder):

1. ``pen``: share of pixels that are marker ink (blue, green: the hue/saturation rule of
   ``tissue.ink_mask``; black: brightest channel below 0.22 at saturation <= 0.4) above ``qc_max_pen_fraction``. First,
   because ink is saturated and would otherwise pass as tissue.
2. ``underexposed``: share of pixels darker than luminance 60 above ``qc_max_dark_fraction`` (folds,
   debris, a dark scan; nuclei are about 80, so dense tumour does not trip it).
3. ``overexposed``: share of clipped-white pixels (every channel >= 250) above
   ``qc_max_bright_fraction`` (glass scans at 230-245; clipped highlights are lost detail).
4. ``background``: stained-tissue share below ``qc_min_tissue_fraction``.
5. ``blur``: variance of the 4-neighbour Laplacian below ``qc_min_blur_variance`` (0-255 grey scale,
   so it depends on the tile MPP: measured figures in docs/tiling-and-qc.md).

Thresholds come from the slide's pipeline profile; a profile that does not set one (0, or an older
profile without the field) gets the default in ``QcThresholds``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
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


def exposure_fractions(tile: np.ndarray) -> tuple[float, float]:
    """(share of pixels darker than luminance 60, share of clipped-white pixels)."""
    grey = tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return float(np.mean(grey < 60.0)), float(np.mean(tile.min(axis=2) >= 250))


def pen_fraction(tile: np.ndarray) -> float:
    """Share of pixels that are blue, green or black marker ink (rule in the module docstring)."""
    from wsitk.shared.slides.tissue import ink_mask

    return float(np.mean(ink_mask(tile, black_value=0.22, black_max_saturation=0.4)))


@dataclass(frozen=True)
class QcThresholds:
    """The QC limits of one profile; defaults where the profile leaves a field at 0 or lacks it."""

    min_tissue_fraction: float = 0.5
    min_blur_variance: float = 15.0
    max_pen_fraction: float = 0.05
    max_dark_fraction: float = 0.5
    max_bright_fraction: float = 0.5

    @classmethod
    def from_profile(cls, profile: pb.PipelineProfile) -> QcThresholds:
        defaults = cls()

        def pick(field: str, default: float) -> float:
            value = float(getattr(profile, field, 0.0) or 0.0)
            return value if value > 0 else default

        return cls(
            min_tissue_fraction=float(profile.qc_min_tissue_fraction),
            min_blur_variance=float(profile.qc_min_blur_variance),
            max_pen_fraction=pick("qc_max_pen_fraction", defaults.max_pen_fraction),
            max_dark_fraction=pick("qc_max_dark_fraction", defaults.max_dark_fraction),
            max_bright_fraction=pick("qc_max_bright_fraction", defaults.max_bright_fraction),
        )


def assess(
    tile: np.ndarray, profile: pb.PipelineProfile | QcThresholds
) -> tuple[bool, str, dict[str, float]]:
    """(accepted, reason or "", metrics) for one RGB uint8 tile; the order of checks is documented above."""
    limits = profile if isinstance(profile, QcThresholds) else QcThresholds.from_profile(profile)
    dark, bright = exposure_fractions(tile)
    metrics = {
        "tissue_fraction": round(tissue_fraction(tile), 4),
        "blur_variance": round(blur_variance(tile), 2),
        "pen_fraction": round(pen_fraction(tile), 4),
        "dark_fraction": round(dark, 4),
        "bright_fraction": round(bright, 4),
    }
    if metrics["pen_fraction"] > limits.max_pen_fraction:
        return False, "pen", metrics
    if metrics["dark_fraction"] > limits.max_dark_fraction:
        return False, "underexposed", metrics
    if metrics["bright_fraction"] > limits.max_bright_fraction:
        return False, "overexposed", metrics
    if metrics["tissue_fraction"] < limits.min_tissue_fraction:
        return False, "background", metrics
    if metrics["blur_variance"] < limits.min_blur_variance:
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
        limits = QcThresholds.from_profile(event.profile)
        for _, tile in shard.iter_decoded():
            ok, reason, metrics = assess(tile, limits)
            accepted.append(ok)
            per_tile.append(metrics)
            if not ok:
                reasons[reason] += 1
        TILES.labels(SERVICE, "accepted").inc(sum(accepted))
        TILES.labels(SERVICE, "rejected").inc(len(accepted) - sum(accepted))
        return {"accepted": accepted, "rejected_by_reason": dict(reasons), "tiles": per_tile}


def accepted_indices(result: pb.QcResult) -> np.ndarray:
    return np.flatnonzero(mask_from_bytes(result.accepted_mask, result.tile_count))
