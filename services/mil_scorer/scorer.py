"""mil-scorer: when every planned shard of a slide is embedded, score the slide with attention MIL.

State is per (slide id, tiling run id) and lives in PostgreSQL (``scorer_plans``,
``scorer_shards``), not in a stream processor's local table: after any crash the state is simply
there, and arrival order, duplicates and a slide tiled twice do not matter. A slide is scored when
its plan and one embedding per planned shard are present; the prediction id is deterministic
(slide + tiling run + model version), so re-scoring after a redelivery produces the same id.

The number of tiles held per slide is capped (``WSI_MAX_TILES_PER_SLIDE``); beyond the cap the
tiles are sub-sampled uniformly at random with a seed derived from the slide id, so the same slide
always keeps the same tiles.
"""

from __future__ import annotations

import io
import zlib
from functools import cached_property
from pathlib import Path

import numpy as np
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import deterministic_id, new_meta, pb
from wsitk.shared.errors import PermanentError
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import MODEL_INFO
from wsitk.shared.topics import PREDICTIONS, SLIDES_FAILED

SERVICE = "mil-scorer"
TOP_K = 8
log = get_logger()


def mil_model_path(ctx: ServiceContext) -> Path:
    manifest = ctx.model_manifest()
    rel = manifest.get("mil", {}).get("path", "mil-default.onnx")
    path = Path(rel) if Path(rel).is_absolute() else Path(ctx.settings.model_dir) / rel
    if not path.is_file():
        raise PermanentError(
            "model-missing", f"MIL model {path} not found: run `wsi model init-defaults` or set WSI_MODEL_DIR"
        )
    return path


def subsample(count: int, cap: int, slide_id: str) -> np.ndarray:
    """Indices of the tiles kept: all of them up to ``cap``, else a seeded uniform sample, sorted."""
    if count <= cap:
        return np.arange(count)
    rng = np.random.default_rng(zlib.crc32(slide_id.encode()))
    return np.sort(rng.choice(count, size=cap, replace=False))


class MilScorer:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    @cached_property
    def model(self):  # type: ignore[no-untyped-def]  # onnxruntime is imported lazily
        from wsitk.shared.models.runtime import MilRunner

        runner = MilRunner(mil_model_path(self.ctx))
        MODEL_INFO.labels(SERVICE, "mil", runner.model_version).set(1)
        log.info("MIL model loaded", model_version=runner.model_version, backbone_id=runner.backbone_id)
        return runner

    # -- state -------------------------------------------------------------------------------------
    def on_plan(self, plan: pb.TilePlan) -> list[Outgoing]:
        self.ctx.db.execute(
            "INSERT INTO scorer_plans (slide_id, tiling_run_id, plan, shards_planned) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (slide_id, tiling_run_id) DO NOTHING",
            (plan.meta.slide_id, plan.tiling_run_id, plan.SerializeToString(), len(plan.shard_ids)),
        )
        return self.try_score(plan.meta.slide_id, plan.tiling_run_id)

    def on_embedding(self, embedding: pb.ShardEmbedding) -> list[Outgoing]:
        self.ctx.db.execute(
            "INSERT INTO scorer_shards (slide_id, tiling_run_id, shard_id, embedding) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (slide_id, tiling_run_id, shard_id) DO NOTHING",
            (
                embedding.meta.slide_id,
                embedding.tiling_run_id,
                embedding.shard_id,
                embedding.SerializeToString(),
            ),
        )
        return self.try_score(embedding.meta.slide_id, embedding.tiling_run_id)

    def try_score(self, slide_id: str, run_id: str) -> list[Outgoing]:
        rows = self.ctx.db.execute(
            "SELECT plan FROM scorer_plans WHERE slide_id = %s AND tiling_run_id = %s", (slide_id, run_id)
        )
        if not rows:
            return []  # the plan has not arrived yet; the embedding waits in scorer_shards
        plan = pb.TilePlan.FromString(bytes(rows[0][0]))
        if not plan.shard_ids:
            return []  # no tissue: the tiler already published that outcome
        shard_rows = self.ctx.db.execute(
            "SELECT shard_id, embedding FROM scorer_shards WHERE slide_id = %s AND tiling_run_id = %s",
            (slide_id, run_id),
        )
        embeddings = {sid: pb.ShardEmbedding.FromString(bytes(data)) for sid, data in shard_rows}
        if any(sid not in embeddings for sid in plan.shard_ids):
            return []
        outputs = self.score(plan, [embeddings[sid] for sid in plan.shard_ids])
        self.ctx.db.execute(
            "UPDATE scorer_plans SET scored_at = now() WHERE slide_id = %s AND tiling_run_id = %s",
            (slide_id, run_id),
        )
        return outputs

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, plan: pb.TilePlan, shards: list[pb.ShardEmbedding]) -> list[Outgoing]:
        slide_id, run_id = plan.meta.slide_id, plan.tiling_run_id
        model = self.model
        backbones = {s.backbone_id for s in shards if s.tile_count}
        if backbones and backbones != {model.backbone_id}:
            return [
                self._failed(
                    plan,
                    "backbone-mismatch",
                    f"embedded with {sorted(backbones)}, but MIL model {model.model_version} was trained on "
                    f"{model.backbone_id}; re-embed with that backbone or score with a model trained on this one",
                )
            ]
        features, coords = self._load(shards)
        if len(features) == 0:
            return [
                self._failed(
                    plan,
                    "no-tiles-passed-qc",
                    f"all {plan.total_tiles} tissue tiles were rejected by quality control (blur, background); "
                    "see the QC summary of this slide",
                )
            ]
        keep = subsample(len(features), self.ctx.settings.max_tiles_per_slide, slide_id)
        probability, attention = model.score(features[keep])
        coords = coords[keep]
        top = np.argsort(-attention)[:TOP_K]
        buffer = io.BytesIO()
        np.savez(
            buffer,
            coords=coords,
            attention=attention.astype(np.float32),
            tile_size_level0=plan.tile_size_level0,
        )
        attention_ref = self.ctx.store.put_if_absent(
            self.ctx.settings.artifacts_bucket,
            f"attention/{slide_id}/{run_id}/{model.model_version}.npz",
            buffer.getvalue(),
        )
        label = "tumour" if probability >= model.threshold else "normal"
        prediction = pb.Prediction(
            meta=new_meta(
                service=SERVICE,
                slide_id=slide_id,
                event_parts=["prediction", run_id, model.model_version],
                correlation_id=plan.meta.correlation_id,
            ),
            prediction_id=deterministic_id("prediction", slide_id, run_id, model.model_version),
            tiling_run_id=run_id,
            model_version=model.model_version,
            label=label,
            probability=probability,
            threshold=model.threshold,
            scores={"tumour": probability, "normal": 1.0 - probability},
            tiles_scored=len(keep),
            tiles_total=len(features),
            top_tiles=[
                pb.AttentionTile(
                    x=int(coords[i][0]),
                    y=int(coords[i][1]),
                    size=plan.tile_size_level0,
                    attention=float(attention[i]),
                )
                for i in top
            ],
            attention=pb.ObjectRef(
                bucket=attention_ref.bucket,
                key=attention_ref.key,
                size=attention_ref.size,
                sha256=attention_ref.sha256,
            ),
            backbone_id=model.backbone_id,
        )
        log.info(
            "slide scored", slide_id=slide_id, label=label, probability=round(probability, 4), tiles=len(keep)
        )
        return [Outgoing(PREDICTIONS, slide_id, prediction)]

    def _load(self, shards: list[pb.ShardEmbedding]) -> tuple[np.ndarray, np.ndarray]:
        features, coords = [], []
        for shard in shards:
            if not shard.tile_count:
                continue
            data = self.ctx.store.get_bytes(shard.embeddings.bucket, shard.embeddings.key)
            with np.load(io.BytesIO(data)) as arrays:
                features.append(arrays["features"].astype(np.float32))
                coords.append(arrays["coords"])
        if not features:
            return np.zeros((0, 0), np.float32), np.zeros((0, 2), np.int64)
        return np.concatenate(features), np.concatenate(coords)

    def _failed(self, plan: pb.TilePlan, code: str, reason: str) -> Outgoing:
        event = pb.SlideFailed(
            meta=new_meta(
                service=SERVICE, slide_id=plan.meta.slide_id, event_parts=["failed", plan.tiling_run_id, code]
            ),
            stage=SERVICE,
            reason_code=code,
            reason=reason,
            tiling_run_id=plan.tiling_run_id,
        )
        return Outgoing(SLIDES_FAILED, plan.meta.slide_id, event)
