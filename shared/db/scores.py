"""The mil-scorer's tables: ``scorer_plans`` and ``scorer_shards``, its per-(slide, tiling run) state.

Written by the mil-scorer only; read by the scorer, by ``wsi rescore``, which runs the scorer's own
code, and by training (``shared/models/bags.py``: a slide's bag is its stored embeddings) (docs/design.md, "Tables and who may use them"; ``shared/db/tables.py`` states the rules the tests
check). Every function runs one statement in a transaction of its own (``Database.execute``).
"""

from __future__ import annotations

from wsitk.shared.contracts import pb
from wsitk.shared.db.connection import Database


def save_plan(db: Database, plan: pb.TilePlan) -> None:
    """Keep a slide's tile plan in ``scorer_plans``; the first copy of a (slide, run) stays."""
    db.execute(
        "INSERT INTO scorer_plans (slide_id, tiling_run_id, plan, shards_planned) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (slide_id, tiling_run_id) DO NOTHING",
        (plan.meta.slide_id, plan.tiling_run_id, plan.SerializeToString(), len(plan.shard_ids)),
    )


def save_embedding(db: Database, embedding: pb.ShardEmbedding) -> None:
    """Keep a shard's embedding event in ``scorer_shards``; the first copy of a shard stays."""
    db.execute(
        "INSERT INTO scorer_shards (slide_id, tiling_run_id, shard_id, embedding) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (slide_id, tiling_run_id, shard_id) DO NOTHING",
        (
            embedding.meta.slide_id,
            embedding.tiling_run_id,
            embedding.shard_id,
            embedding.SerializeToString(),
        ),
    )


def load_plan(db: Database, slide_id: str, run_id: str) -> pb.TilePlan | None:
    """The stored plan of one tiling run (``scorer_plans``), None while it has not arrived."""
    rows = db.execute(
        "SELECT plan FROM scorer_plans WHERE slide_id = %s AND tiling_run_id = %s", (slide_id, run_id)
    )
    return pb.TilePlan.FromString(bytes(rows[0][0])) if rows else None


def load_embeddings(db: Database, slide_id: str, run_id: str) -> dict[str, pb.ShardEmbedding]:
    """The stored embedding events of one tiling run by shard id (``scorer_shards``)."""
    rows = db.execute(
        "SELECT shard_id, embedding FROM scorer_shards WHERE slide_id = %s AND tiling_run_id = %s",
        (slide_id, run_id),
    )
    return {sid: pb.ShardEmbedding.FromString(bytes(data)) for sid, data in rows}


def mark_scored(db: Database, slide_id: str, run_id: str) -> None:
    """Note in ``scorer_plans`` that the run was scored now (``wsi rescore`` picks scored runs)."""
    db.execute(
        "UPDATE scorer_plans SET scored_at = now() WHERE slide_id = %s AND tiling_run_id = %s",
        (slide_id, run_id),
    )


def scored_runs(db: Database, slide_ids: list[str] | None) -> list[tuple[str, str, pb.TilePlan]]:
    """``(slide id, tiling run id, plan)`` of each slide's most recently scored run (``scorer_plans``).

    ``slide_ids`` None: every slide the scorer has scored; otherwise those of them that were scored.
    """
    where = "scored_at IS NOT NULL" + (" AND slide_id = ANY(%s)" if slide_ids is not None else "")
    rows = db.execute(
        "SELECT DISTINCT ON (slide_id) slide_id, tiling_run_id, plan FROM scorer_plans "
        f"WHERE {where} ORDER BY slide_id, scored_at DESC",
        (slide_ids,) if slide_ids is not None else None,
    )
    return [
        (str(slide_id), str(run_id), pb.TilePlan.FromString(bytes(plan))) for slide_id, run_id, plan in rows
    ]


def complete_runs(db: Database, slide_ids: list[str]) -> dict[str, list[tuple[str, bytes]]]:
    """``{slide: [(tiling run, plan bytes), newest first]}`` for runs whose every shard is embedded."""
    rows = db.execute(
        "SELECT p.slide_id, p.tiling_run_id, p.plan FROM scorer_plans p "
        "WHERE p.slide_id = ANY(%s) AND p.shards_planned > 0 AND p.shards_planned = "
        "(SELECT count(*) FROM scorer_shards s WHERE s.slide_id = p.slide_id "
        " AND s.tiling_run_id = p.tiling_run_id) "
        "ORDER BY p.received_at DESC",
        (slide_ids,),
    )
    runs: dict[str, list[tuple[str, bytes]]] = {}
    for slide_id, run_id, plan in rows:
        runs.setdefault(slide_id, []).append((run_id, bytes(plan)))
    return runs


def embeddings_in_order(db: Database, slide_id: str, run_id: str) -> list[pb.ShardEmbedding]:
    """The stored embedding events of one tiling run in shard order (``scorer_shards``)."""
    rows = db.execute(
        "SELECT embedding FROM scorer_shards WHERE slide_id = %s AND tiling_run_id = %s ORDER BY shard_id",
        (slide_id, run_id),
    )
    return [pb.ShardEmbedding.FromString(bytes(row[0])) for row in rows]
