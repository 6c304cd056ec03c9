"""``wsi export h5``: a slide's embeddings as the h5 file CLAM and TRIDENT users feed to their MIL code.

One file per slide, as CLAM's ``extract_features_fp.py`` and TRIDENT write them:

- dataset ``features``: float32 ``[N, D]`` (stored as float16 in the object store, widened here);
- dataset ``coords``: int64 ``[N, 2]``, level-0 top-left (x, y) of each tile, row i matching feature i;
  attributes on ``coords`` with the meanings the two loaders give them (``coords_attributes``):

  - CLAM (``Whole_Slide_Bag_FP``) reads ``patch_level`` and ``patch_size`` and calls OpenSlide's
    ``read_region(coord, patch_level, (patch_size, patch_size))``, then resizes to its model's input. So
    ``patch_size`` is in pixels *of level ``patch_level``* and ``patch_size`` times that level's downsample
    must be the tile's level-0 side. When the tiler cut the tiles at a stored level without resampling
    (the tiling manifest says which), that level and the target tile size (224) are written; otherwise
    (e.g. 20x tiles from a 40x Aperio scan, whose stored levels are 1x, 4x, 16x) level 0 and the level-0
    side (448), which CLAM reads and scales down, the field of view it would get from its own patching.
  - TRIDENT reads ``patch_size_level0`` (the tile side in level-0 pixels, what its slide encoders use),
    ``level0_magnification`` and ``target_magnification`` (magnification as ``10 / mpp``, TRIDENT's
    convention: 0.25 um/px is 40x) and ``patch_size`` in the target frame, ``patch_size_level0 =
    patch_size * level0_magnification // target_magnification``. The two meanings of ``patch_size``
    coincide whenever the tiles were cut at a stored level; after resampling CLAM's wins (it is the one
    that reads pixels with it) and ``patch_size_target`` keeps the target-frame side.
  - ours: ``target_mpp``, ``mpp`` (the patches' true um/px: within the tiler's tolerance of
    ``target_mpp``, e.g. 0.499 on a 0.499 um/px scan cut without resampling), ``level0_mpp``, ``overlap``
    (0), ``name`` (the slide id);
- file attributes saying what produced it: ``slide_id``, ``tiling_run_id``, ``backbone_id``, ``shards``.

The embeddings are read from the artifacts bucket by slide id
(``embeddings/{slide}/{tiling run}/{backbone id}/{shard}.npz``). A slide tiled twice or embedded with two
backbones has several such sets; the export never mixes them and asks which one when it is ambiguous.
Needs ``h5py`` (imported here only).
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from wsitk.shared.keys import tiling_manifest_key
from wsitk.shared.objectstore import ObjectStore


@dataclass(frozen=True)
class FeatureExport:
    path: Path
    slide_id: str
    tiling_run_id: str
    backbone_id: str
    tiles: int
    dim: int
    shards: int


def coords_attributes(
    *,
    tile_size: int,
    tile_size_level0: float,
    target_mpp: float,
    tile_mpp: float,
    read_level: int | None = None,
    resampled: bool = True,
) -> dict[str, int | float]:
    """The ``coords`` attributes CLAM's and TRIDENT's loaders read (see the module docstring).

    ``read_level`` / ``resampled`` come from the tiling manifest; without them (older runs) the tiles are
    described at level 0, which CLAM reads correctly on any slide.
    """
    side0 = round(tile_size_level0)
    level0_mpp = tile_size * tile_mpp / tile_size_level0 if tile_size_level0 else 0.0
    at_stored_level = read_level is not None and not resampled
    return {
        "patch_level": int(read_level) if at_stored_level and read_level is not None else 0,
        "patch_size": int(tile_size) if at_stored_level else side0,
        "patch_size_level0": side0,
        "patch_size_target": int(tile_size),
        "level0_magnification": round(10.0 / level0_mpp) if level0_mpp else -1,
        "target_magnification": round(10.0 / target_mpp) if target_mpp else -1,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
        "mpp": float(tile_mpp or target_mpp),
        "overlap": 0,
    }


def embedding_sets(store: ObjectStore, bucket: str, slide_id: str) -> dict[tuple[str, str], list[str]]:
    """``{(tiling run, backbone id): [shard keys, sorted]}`` stored for one slide."""
    sets: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in store.list_keys(bucket, f"embeddings/{slide_id}/"):
        parts = item.key.split("/")
        if len(parts) == 5 and parts[4].endswith(".npz"):
            sets[(parts[2], parts[3])].append(item.key)
    return {key: sorted(keys) for key, keys in sets.items()}


def export_slide_h5(
    store: ObjectStore,
    bucket: str,
    slide_id: str,
    out_path: Path,
    *,
    tiling_run_id: str = "",
    backbone_id: str = "",
) -> FeatureExport:
    """Write one slide's features and coordinates to ``out_path`` (h5); see the module docstring."""
    import h5py

    sets = embedding_sets(store, bucket, slide_id)
    chosen = {
        key: keys
        for key, keys in sets.items()
        if (not tiling_run_id or key[0] == tiling_run_id) and (not backbone_id or key[1] == backbone_id)
    }
    if not chosen:
        raise LookupError(
            f"no embeddings of slide {slide_id} in bucket {bucket}"
            + (f" for tiling run {tiling_run_id!r} / backbone {backbone_id!r}" if sets else "")
            + (f"; stored: {sorted(sets)}" if sets else "; is the slide id right, and has it been embedded?")
        )
    if len(chosen) > 1:
        options = ", ".join(f"--tiling-run {run} --backbone {backbone}" for run, backbone in sorted(chosen))
        raise LookupError(
            f"slide {slide_id} has {len(chosen)} embedding sets (tiling runs x backbones); never mixing them, "
            f"choose one: {options}"
        )
    ((run_id, backbone), keys) = next(iter(chosen.items()))
    features, coords = [], []
    geometry: dict[str, float] = {}
    for key in keys:
        with np.load(io.BytesIO(store.get_bytes(bucket, key))) as data:
            features.append(np.asarray(data["features"], dtype=np.float32))
            coords.append(np.asarray(data["coords"], dtype=np.int64).reshape(-1, 2))
            for name in ("tile_size", "tile_size_level0", "mpp", "tile_mpp"):
                if name in data.files and name not in geometry:
                    geometry[name] = float(data[name])
    all_features = np.concatenate(features)
    manifest_key = tiling_manifest_key(slide_id, run_id)
    manifest = json.loads(store.get_bytes(bucket, manifest_key)) if store.stat(bucket, manifest_key) else {}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    with h5py.File(partial, "w") as handle:
        handle.create_dataset("features", data=all_features)
        coords_set = handle.create_dataset("coords", data=np.concatenate(coords))
        for name, value in coords_attributes(
            tile_size=int(geometry.get("tile_size", 0)),
            tile_size_level0=geometry.get("tile_size_level0", 0.0),
            target_mpp=geometry.get("mpp", 0.0),
            tile_mpp=geometry.get("tile_mpp", geometry.get("mpp", 0.0)),
            read_level=manifest.get("level"),
            resampled=bool(manifest.get("resampled", True)),
        ).items():
            coords_set.attrs[name] = value
        coords_set.attrs["name"] = slide_id
        handle.attrs["slide_id"] = slide_id
        handle.attrs["tiling_run_id"] = run_id
        handle.attrs["backbone_id"] = backbone
        handle.attrs["shards"] = len(keys)
    partial.replace(out_path)
    return FeatureExport(
        out_path, slide_id, run_id, backbone, len(all_features), int(all_features.shape[1]), len(keys)
    )
