"""What the viewer draws over a slide and offers for download, read from the artifacts bucket.

Every key is built from a slide id, tiling run and model version that the database lists for that
slide (the caller checks them first), never from request text. The attention map and its QuPath
GeoJSON come from the same code as ``wsi export`` (``shared/models/explain.py``), the h5 from
``shared/models/features_export.py``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from wsitk.shared.keys import qc_report_key, shard_key, tiling_manifest_key, tissue_outline_key
from wsitk.shared.models.explain import (
    attention_ranks,
    colormap_rgb,
    load_attention,
    stored_attention_geojson,
)
from wsitk.shared.objectstore import ObjectStore
from wsitk.shared.shards import Shard


class Overlays:
    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store = store
        self.bucket = bucket

    def attention(self, slide_id: str, run_id: str, model_version: str) -> dict[str, Any]:
        """Per tile: level-0 (x, y), its heat colour (rank scale, as the exports colour it), weight, rank."""
        attention = load_attention(
            self.store, self.bucket, slide_id, tiling_run_id=run_id, model_version=model_version
        )
        ranks, scaled = attention_ranks(attention.attention)
        colours = colormap_rgb(scaled)
        order = np.argsort(ranks)
        tiles = [
            [
                int(attention.coords[i, 0]),
                int(attention.coords[i, 1]),
                "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colours[i])),
                float(attention.attention[i]),
                int(ranks[i]),
            ]
            for i in order
        ]
        return {
            "tiling_run_id": run_id,
            "model_version": model_version,
            "tile_size": attention.tile_size_level0,
            "columns": ["x", "y", "colour", "attention", "rank"],
            "tiles": tiles,
        }

    def tissue(self, slide_id: str, run_id: str) -> bytes:
        """The tiler's tissue polygons (GeoJSON, level-0 pixels) as stored."""
        return self.store.get_bytes(self.bucket, tissue_outline_key(slide_id, run_id))

    def manifest(self, slide_id: str, run_id: str) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(
            self.store.get_bytes(self.bucket, tiling_manifest_key(slide_id, run_id))
        )
        return manifest

    def qc(self, slide_id: str, run_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        """Tiles quality control rejected, each with its reason, from the per-shard QC reports."""
        manifest = self.manifest(slide_id, run_id)
        rejected: list[list[Any]] = []
        counts: dict[str, int] = {}
        for shard in manifest.get("shards", []):
            shard_id = str(shard["shard_id"])
            report_key = qc_report_key(slide_id, run_id, shard_id)
            if self.store.stat(self.bucket, report_key) is None:
                continue  # not quality-checked yet
            report = json.loads(self.store.get_bytes(self.bucket, report_key))
            accepted = report.get("accepted", [])
            if all(accepted):
                continue
            coords = Shard(self.store.get_bytes(self.bucket, shard_key(slide_id, run_id, shard_id))).coords
            per_tile = report.get("tiles", [])
            for index, ok in enumerate(accepted):
                if ok or index >= len(coords):
                    continue
                reason = _reason(per_tile[index] if index < len(per_tile) else {}, profile)
                counts[reason] = counts.get(reason, 0) + 1
                rejected.append([int(coords[index, 0]), int(coords[index, 1]), reason])
        return {
            "tiling_run_id": run_id,
            "tile_size": float(manifest.get("tile_size_level0", 0)),
            "columns": ["x", "y", "reason"],
            "rejected": rejected,
            "rejected_by_reason": counts,
        }

    def geojson(self, slide_id: str, run_id: str, model_version: str) -> bytes:
        collection, _ = stored_attention_geojson(
            self.store, self.bucket, slide_id, tiling_run_id=run_id, model_version=model_version
        )
        return json.dumps(collection, separators=(",", ":"), allow_nan=False).encode()

    def h5(self, slide_id: str, run_id: str, backbone_id: str) -> bytes:
        from wsitk.shared.models.features_export import export_slide_h5

        with tempfile.TemporaryDirectory(prefix="wsi-viewer-") as folder:
            path = Path(folder) / f"{slide_id}.h5"
            export_slide_h5(
                self.store, self.bucket, slide_id, path, tiling_run_id=run_id, backbone_id=backbone_id
            )
            return path.read_bytes()


def _reason(metrics: dict[str, Any], profile: dict[str, Any]) -> str:
    """A rejected tile's reason: the report's own (quality-filter stores it per tile), else, for reports
    written before it did, decided again from the measures with the run's QC limits by the same rule."""
    if metrics.get("reason"):
        return str(metrics["reason"])
    try:
        from wsitk.services.quality_filter.measures import QcThresholds, decide

        _, reason = decide(metrics, QcThresholds.from_profile(SimpleNamespace(**profile)))
    except (KeyError, TypeError, ValueError):
        return "rejected"
    return reason or "rejected"
