"""mil-scorer: when every planned shard of a slide is embedded, score the slide with attention MIL.

State is per (slide id, tiling run id) and lives in PostgreSQL (``scorer_plans``,
``scorer_shards``), not in a stream processor's local table: after any crash the state is simply
there, and arrival order, duplicates and a slide tiled twice do not matter. A slide is scored when
its plan and one embedding per planned shard are present; the prediction id is deterministic
(slide + tiling run + model version), so re-scoring after a redelivery produces the same id.

The number of tiles scored per slide is capped (``WSI_MAX_TILES_PER_SLIDE``); beyond the cap the
tiles kept are chosen by the one rule ``wsitk.shared.models.tile_rule.tiles_to_score`` (lowest hash of
the tile coordinates: deterministic, independent of shard order), which ``wsi evaluate`` applies too and
reports what it drops.
"""

from __future__ import annotations

import io

import numpy as np
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import deterministic_id, new_meta, pb
from wsitk.shared.db import scores
from wsitk.shared.errors import is_transient
from wsitk.shared.keys import attention_key, explanations_prefix, object_ref, shard_key
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import MODEL_INFO
from wsitk.shared.models.registry import profile_mismatch
from wsitk.shared.models.tile_rule import tiles_to_score
from wsitk.shared.topics import PREDICTIONS, SLIDES_FAILED

SERVICE = "mil-scorer"
TOP_K = 8
log = get_logger()


class MilScorer:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._announced: set[str] = set()

    def model_for(self, version: str):  # type: ignore[no-untyped-def]  # onnxruntime is imported lazily
        """``(MilRunner, expected profile)`` of ``version`` ('' = the active one), loaded once."""
        runner, expected = self.ctx.models.get(version)
        if runner.model_version not in self._announced:
            self._announced.add(runner.model_version)
            MODEL_INFO.labels(SERVICE, "mil", runner.model_version).set(1)
            log.info("MIL model loaded", model_version=runner.model_version, backbone_id=runner.backbone_id)
        return runner, expected

    # -- state (shared/db/scores.py) -----------------------------------------------------------------
    def on_plan(self, plan: pb.TilePlan) -> list[Outgoing]:
        scores.save_plan(self.ctx.db, plan)
        return self.try_score(plan.meta.slide_id, plan.tiling_run_id)

    def on_embedding(self, embedding: pb.ShardEmbedding) -> list[Outgoing]:
        scores.save_embedding(self.ctx.db, embedding)
        return self.try_score(embedding.meta.slide_id, embedding.tiling_run_id)

    def try_score(self, slide_id: str, run_id: str) -> list[Outgoing]:
        plan = scores.load_plan(self.ctx.db, slide_id, run_id)
        if plan is None:
            return []  # the plan has not arrived yet; the embedding waits in scorer_shards
        if not plan.shard_ids:
            return []  # no tissue: the tiler already published that outcome
        embeddings = scores.load_embeddings(self.ctx.db, slide_id, run_id)
        if any(sid not in embeddings for sid in plan.shard_ids):
            return []
        outputs = self.score(plan, [embeddings[sid] for sid in plan.shard_ids])
        scores.mark_scored(self.ctx.db, slide_id, run_id)
        return outputs

    # -- scoring -----------------------------------------------------------------------------------
    def score(
        self,
        plan: pb.TilePlan,
        shards: list[pb.ShardEmbedding],
        *,
        version: str = "",
        origin: str = "stream",
    ) -> list[Outgoing]:
        """Score one slide with ``version`` (default: the version pinned on the slide at ingest).

        A slide whose embeddings or pipeline profile the model was not trained on is refused with a
        ``SlideFailed`` that says what differs; nothing is scored on features the model never saw.
        """
        slide_id, run_id = plan.meta.slide_id, plan.tiling_run_id
        model, expected = self.model_for(version or plan.profile.mil_model_version)
        backbones = {s.backbone_id for s in shards if s.tile_count}
        problem = profile_mismatch(expected, plan.profile, backbones)
        if problem:
            code = (
                "backbone-mismatch"
                if backbones and expected.get("backbone_id") not in backbones
                else "profile-mismatch"
            )
            return [
                self._failed(
                    plan,
                    code,
                    f"MIL model {model.model_version} cannot score this slide: {problem}. Re-embed the slide "
                    "with the model's profile (`wsi redrive`/re-upload under that profile), or score it with a "
                    "model trained on this one (`wsi rescore --model VERSION`)",
                )
            ]
        features, coords, shard_index = self._load(shards)
        if len(features) == 0:
            return [
                self._failed(
                    plan,
                    "no-tiles-passed-qc",
                    f"all {plan.total_tiles} tissue tiles were rejected by quality control (blur, background); "
                    "see the QC summary of this slide",
                )
            ]
        keep = tiles_to_score(coords, self.ctx.settings.max_tiles_per_slide)
        probability, attention = model.score(features[keep])
        ood = model.ood.assess(features[keep]) if getattr(model, "ood", None) is not None else None
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
            attention_key(slide_id, run_id, model.model_version),
            buffer.getvalue(),
        )
        heatmap, mosaic = self._explain(plan, model.model_version, coords, attention, top, shard_index)
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
            ood_score=ood.score if ood else 0.0,
            ood_percentile=ood.percentile if ood else 0.0,
            ood_limit=ood.limit if ood else 0.0,
            out_of_distribution=bool(ood and ood.out_of_distribution),
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
            origin=origin,
        )
        if heatmap is not None:
            prediction.heatmap.CopyFrom(heatmap)
        if mosaic is not None:
            prediction.top_tiles_image.CopyFrom(mosaic)
        log.info(
            "slide scored",
            slide_id=slide_id,
            label=label,
            probability=round(probability, 4),
            tiles=len(keep),
            tiles_total=len(features),
            out_of_distribution=prediction.out_of_distribution,
            ood_score=round(prediction.ood_score, 3),
        )
        return [Outgoing(PREDICTIONS, slide_id, prediction)]

    def _load(self, shards: list[pb.ShardEmbedding]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """All tile features and coords of the slide, and each shard's coords (to find tile pixels)."""
        features, coords = [], []
        index: dict[str, np.ndarray] = {}
        for shard in shards:
            if not shard.tile_count:
                continue
            data = self.ctx.store.get_bytes(shard.embeddings.bucket, shard.embeddings.key)
            with np.load(io.BytesIO(data)) as arrays:
                features.append(arrays["features"].astype(np.float32))
                coords.append(arrays["coords"])
                index[shard.shard_id] = np.asarray(arrays["coords"], dtype=np.int64).reshape(-1, 2)
        if not features:
            return np.zeros((0, 0), np.float32), np.zeros((0, 2), np.int64), index
        return np.concatenate(features), np.concatenate(coords), index

    def _explain(
        self,
        plan: pb.TilePlan,
        version: str,
        coords: np.ndarray,
        attention: np.ndarray,
        top: np.ndarray,
        shard_index: dict[str, np.ndarray],
    ) -> tuple[pb.ObjectRef | None, pb.ObjectRef | None]:
        """The attention heatmap over the slide thumbnail and a mosaic of the top tiles, as artifacts.

        Explanations are a view of the prediction, not part of it: when their inputs are gone (tile shards
        expired by the lifecycle policy before a ``rescore``) the prediction goes out without them and the
        log says why. Object-store outages still propagate and are retried like any other.
        """
        from wsitk.shared.models.explain import (
            ShardSource,
            attention_heatmap,
            load_top_tiles,
            top_tiles_mosaic,
        )

        slide_id, run_id = plan.meta.slide_id, plan.tiling_run_id
        bucket = self.ctx.settings.artifacts_bucket
        prefix = explanations_prefix(slide_id, run_id, version)
        refs: list[pb.ObjectRef | None] = [None, None]
        try:
            thumbnail = None
            if plan.HasField("thumbnail") and plan.thumbnail.key:
                from PIL import Image

                raw = self.ctx.store.get_bytes(plan.thumbnail.bucket, plan.thumbnail.key)
                with Image.open(io.BytesIO(raw)) as image:
                    thumbnail = np.asarray(image.convert("RGB"))
            png = attention_heatmap(
                coords,
                attention,
                plan.tile_size_level0,
                plan.slide_width,
                plan.slide_height,
                thumbnail=thumbnail,
            )
            refs[0] = object_ref(
                self.ctx.store.put_if_absent(bucket, f"{prefix}/heatmap.png", png, "image/png")
            )
            sources = [
                ShardSource(bucket, shard_key(slide_id, run_id, sid), shard_coords)
                for sid, shard_coords in shard_index.items()
            ]
            tiles = load_top_tiles(self.ctx.store, sources, coords[top])
            mosaic = top_tiles_mosaic(tiles, attention[top])
            refs[1] = object_ref(
                self.ctx.store.put_if_absent(bucket, f"{prefix}/top-tiles.png", mosaic, "image/png")
            )
        except Exception as exc:  # missing shards or thumbnail (S3 NoSuchKey), an undecodable tile
            if is_transient(exc):
                raise
            log.warning("explanations skipped", slide_id=slide_id, error=f"{type(exc).__name__}: {exc}")
        return refs[0], refs[1]

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
