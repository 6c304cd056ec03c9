"""Where things live in the artifacts bucket: the one home of the object-key layout.

Every key is derived from ids the events carry, so any stage (and the viewer, the exports, `wsi
redrive`) finds an object without asking another service::

    tiles/{slide_id}/{tiling_run_id}/manifest.json        the tiler's record of a finished run
    tiles/{slide_id}/{tiling_run_id}/thumbnail.jpg        the segmentation thumbnail
    tiles/{slide_id}/{tiling_run_id}/tissue.geojson       tissue outlines in level-0 pixels
    tiles/{slide_id}/{tiling_run_id}/{shard_id}.shard     a shard of JPEG tiles
    qc/{slide_id}/{tiling_run_id}/{shard_id}.json         quality-filter's per-tile report
    embeddings/{slide_id}/{tiling_run_id}/{backbone_id}/{shard_id}.npz
    attention/{slide_id}/{tiling_run_id}/{model_version}.npz
    explanations/{slide_id}/{tiling_run_id}/{model_version}/heatmap.png, top-tiles.png

docs/object-store.md describes the buckets and the write-once rule these keys rely on.
"""

from __future__ import annotations

from typing import Protocol

from wsitk.shared.contracts import pb


def tiles_prefix(slide_id: str, tiling_run_id: str) -> str:
    return f"tiles/{slide_id}/{tiling_run_id}"


def tiling_manifest_key(slide_id: str, tiling_run_id: str) -> str:
    return f"{tiles_prefix(slide_id, tiling_run_id)}/manifest.json"


def thumbnail_key(slide_id: str, tiling_run_id: str) -> str:
    return f"{tiles_prefix(slide_id, tiling_run_id)}/thumbnail.jpg"


def tissue_outline_key(slide_id: str, tiling_run_id: str) -> str:
    return f"{tiles_prefix(slide_id, tiling_run_id)}/tissue.geojson"


def shard_key(slide_id: str, tiling_run_id: str, shard_id: str) -> str:
    return f"{tiles_prefix(slide_id, tiling_run_id)}/{shard_id}.shard"


def qc_report_key(slide_id: str, tiling_run_id: str, shard_id: str) -> str:
    return f"qc/{slide_id}/{tiling_run_id}/{shard_id}.json"


def embeddings_prefix(slide_id: str) -> str:
    return f"embeddings/{slide_id}/"


def embedding_key(slide_id: str, tiling_run_id: str, backbone_id: str, shard_id: str) -> str:
    """Where a shard's embeddings live; the backbone id is part of it, so two encoders never mix."""
    return f"embeddings/{slide_id}/{tiling_run_id}/{backbone_id}/{shard_id}.npz"


def attention_prefix(slide_id: str) -> str:
    return f"attention/{slide_id}/"


def attention_key(slide_id: str, tiling_run_id: str, model_version: str) -> str:
    return f"attention/{slide_id}/{tiling_run_id}/{model_version}.npz"


def explanations_prefix(slide_id: str, tiling_run_id: str, model_version: str) -> str:
    return f"explanations/{slide_id}/{tiling_run_id}/{model_version}"


class _Stored(Protocol):
    bucket: str
    key: str
    size: int
    sha256: str


def object_ref(stored: _Stored) -> pb.ObjectRef:
    """The event reference to a stored object (``objectstore.StoredObject``)."""
    return pb.ObjectRef(bucket=stored.bucket, key=stored.key, size=stored.size, sha256=stored.sha256)
