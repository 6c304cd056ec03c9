"""Training bags from what the pipeline already stored: no slide is re-read, re-tiled or re-embedded.

For every labelled slide the mil-scorer's state in PostgreSQL (``scorer_plans``, ``scorer_shards``) says
which tiling runs exist, their pipeline profile, and where each shard's embeddings are in the object store.
A slide is usable when one tiling run has all its planned shards embedded with the chosen backbone; the
most recent such run is taken. Bags are cached locally as ``.npz`` (float16, as stored), so re-training
and evaluation do not fetch them again.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from wsitk.shared.contracts import pb
from wsitk.shared.db import records, scores
from wsitk.shared.db.connection import Database
from wsitk.shared.models.labels import LabelsError
from wsitk.shared.objectstore import ObjectStore


@dataclass
class Bag:
    slide_id: str
    tiling_run_id: str
    backbone_id: str
    features: np.ndarray  # float16 [N, D] as stored
    coords: np.ndarray  # int64 [N, 2] level-0 top-left
    profile: dict[str, Any] = field(default_factory=dict)

    def float32(self) -> np.ndarray:
        return np.asarray(self.features, dtype=np.float32)


def _profile_dict(profile: pb.PipelineProfile) -> dict[str, Any]:
    return {
        "profile_id": profile.profile_id,
        "target_mpp": profile.target_mpp,
        "tile_size": profile.tile_size,
        "stain_method": profile.stain_method,
        "encoder_id": profile.encoder_id,
    }


def load_bags(
    db: Database,
    store: ObjectStore,
    slide_ids: Sequence[str],
    *,
    backbone_id: str = "",
    cache_dir: Path | None = None,
    progress: Callable[[str], object] | None = None,
) -> dict[str, Bag]:
    """One bag per slide id; a readable error names every slide that has no complete embedding set."""
    runs = scores.complete_runs(db, list(slide_ids))
    bags: dict[str, Bag] = {}
    missing: list[str] = []
    for index, slide_id in enumerate(slide_ids, start=1):
        bag = None
        for run_id, plan_bytes in runs.get(slide_id, []):
            bag = _load_run(db, store, slide_id, run_id, plan_bytes, backbone_id, cache_dir)
            if bag is not None:
                break
        if bag is None:
            missing.append(slide_id)
        else:
            bags[slide_id] = bag
        if progress is not None and (index % 10 == 0 or index == len(slide_ids)):
            progress(f"[bags] {index}/{len(slide_ids)} slides loaded")
    if missing:
        statuses = records.slide_statuses(db, missing)
        described = [f"{s[:12]}... ({statuses.get(s, 'unknown')})" for s in missing[:8]]
        raise LabelsError(
            f"{len(missing)} labelled slide(s) have no complete embeddings"
            + (f" with backbone {backbone_id}" if backbone_id else "")
            + f": {described}. Wait until the pipeline has scored them (`wsi status`), or drop them from "
            "the labels file (rejected or failed slides have no embeddings)"
        )
    backbones = {b.backbone_id for b in bags.values()}
    if len(backbones) > 1:
        raise LabelsError(
            f"the slides were embedded with several backbones {sorted(backbones)}; a model is trained on one: "
            "pass --backbone ID"
        )
    return bags


def _load_run(
    db: Database,
    store: ObjectStore,
    slide_id: str,
    run_id: str,
    plan_bytes: bytes,
    backbone_id: str,
    cache_dir: Path | None,
) -> Bag | None:
    plan = pb.TilePlan.FromString(plan_bytes)
    shards = scores.embeddings_in_order(db, slide_id, run_id)
    used = {s.backbone_id for s in shards if s.tile_count}
    if not used or (backbone_id and used != {backbone_id}) or len(used) > 1:
        return None
    backbone = used.pop()
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"{slide_id}--{run_id}--{backbone}.npz"
        if cached.is_file():
            with np.load(cached) as data:
                return Bag(
                    slide_id, run_id, backbone, data["features"], data["coords"], _profile_dict(plan.profile)
                )
    features, coords = [], []
    for shard in shards:
        if not shard.tile_count:
            continue
        with np.load(io.BytesIO(store.get_bytes(shard.embeddings.bucket, shard.embeddings.key))) as data:
            features.append(np.asarray(data["features"], dtype=np.float16))
            coords.append(np.asarray(data["coords"], dtype=np.int64).reshape(-1, 2))
    bag = Bag(
        slide_id,
        run_id,
        backbone,
        np.concatenate(features),
        np.concatenate(coords),
        _profile_dict(plan.profile),
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(cached.name + ".partial.npz")
        np.savez(partial, features=bag.features, coords=bag.coords)
        partial.replace(cached)
    return bag


class BagFiles(Sequence[np.ndarray]):
    """Bags on disk, one ``.npy`` file per slide (``[N, D]``, float16 as stored), read when indexed.

    ``train_mil`` visits bags one at a time (the input normalisation streams over them; a training step
    reads one bag and samples its tiles; validation scores one bag at a time), so training on a cohort
    of these holds one bag at a time instead of the cohort: memory is bounded by the largest bag. Each
    access memory-maps the file read-only and the mapping goes when the array does, so a sampled step
    reads only the sampled rows.
    """

    def __init__(self, paths: Sequence[Path | str]) -> None:
        self.paths = [Path(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> BagFiles: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | BagFiles:
        if isinstance(index, slice):
            return BagFiles(self.paths[index])
        return np.load(self.paths[index], mmap_mode="r")
