"""The recorder's tables: every write of pipeline state, one function per event type.

Tables written here, by the recorder only: ``slides``, ``slide_sources``, ``slide_runs``,
``stage_progress``, ``qc_summaries``, ``predictions``, ``dead_letters``, ``audit_log`` (docs/design.md, "Tables and who
may use them", lists who reads them). Each writer takes the batch's cursor: the recorder writes a batch
of events in one transaction. ``stalled_slides`` is the one read the recorder makes (its deadlines);
``slide_statuses`` and ``upload_keys`` are what training reads (which slides, under which upload keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from google.protobuf.message import Message
from psycopg.types.json import Jsonb
from wsitk.shared.bus.delivery import Incoming
from wsitk.shared.contracts import pb, tiling_run_id, to_json_dict
from wsitk.shared.db.connection import Database
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import END_TO_END_SECONDS, SLIDE_OUTCOMES, SLIDES_INGESTED

log = get_logger()

# Forward-only status order; terminal outcomes outrank progress, and a prediction outranks a failure
# (a slide failed once and re-driven successfully ends as predicted).
STATUS_RANK = {"ingested": 1, "tiled": 2, "failed": 8, "no_tissue": 8, "rejected": 8, "predicted": 9}
UPSERT_STATUS = """
INSERT INTO slides (slide_id, status, reason_code, status_reason, stage, updated_at)
VALUES (%(slide_id)s, %(status)s, %(code)s, %(reason)s, %(stage)s, now())
ON CONFLICT (slide_id) DO UPDATE SET
  status = CASE WHEN %(rank)s >= (CASE slides.status {cases} ELSE 0 END) THEN EXCLUDED.status ELSE slides.status END,
  reason_code = CASE WHEN %(rank)s >= (CASE slides.status {cases} ELSE 0 END) THEN EXCLUDED.reason_code
                ELSE slides.reason_code END,
  status_reason = CASE WHEN %(rank)s >= (CASE slides.status {cases} ELSE 0 END) THEN EXCLUDED.status_reason
                  ELSE slides.status_reason END,
  stage = EXCLUDED.stage,
  updated_at = now(),
  finished_at = CASE WHEN %(rank)s >= 8 AND %(rank)s >= (CASE slides.status {cases} ELSE 0 END) THEN now()
                ELSE slides.finished_at END
""".format(cases=" ".join(f"WHEN '{k}' THEN {v}" for k, v in STATUS_RANK.items()))


def _set_status(
    cur: psycopg.Cursor, slide_id: str, status: str, stage: str, code: str = "", reason: str = ""
) -> None:
    """Move a slide's status forward; count a terminal outcome the first time the slide reaches it."""
    if STATUS_RANK[status] >= 8:
        cur.execute("SELECT status FROM slides WHERE slide_id = %s", (slide_id,))
        row = cur.fetchone()
        if row is None or STATUS_RANK.get(row[0], 0) < STATUS_RANK[status]:
            PENDING_METRICS.append(("outcome", status, code))
    cur.execute(
        UPSERT_STATUS,
        {
            "slide_id": slide_id,
            "status": status,
            "code": code or None,
            "reason": reason or None,
            "stage": stage,
            "rank": STATUS_RANK[status],
        },
    )


def _run(
    cur: psycopg.Cursor,
    slide_id: str,
    run_id: str,
    profile: pb.PipelineProfile | None = None,
    origin: str = "",
    reason: str = "",
) -> bool:
    """Record the run an event belongs to; True when it is the slide's current run (module docstring).

    The first event of a run the slide has not had makes it current, and a slide that already had
    another run (or was rejected before any run) starts over as ``ingested``.
    """
    if not run_id:  # events without a run (a dead-lettered message's failure) concern the slide as a whole
        return True
    has_profile = profile is not None and bool(profile.profile_id)
    cur.execute(
        "INSERT INTO slide_runs (slide_id, tiling_run_id, profile_id, profile, origin, reason) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (slide_id, tiling_run_id) DO UPDATE SET "
        "profile_id = coalesce(slide_runs.profile_id, EXCLUDED.profile_id), "
        "profile = coalesce(slide_runs.profile, EXCLUDED.profile), "
        "origin = CASE WHEN EXCLUDED.origin = 'reprocess' THEN 'reprocess' ELSE slide_runs.origin END, "
        "reason = CASE WHEN slide_runs.reason = '' THEN EXCLUDED.reason ELSE slide_runs.reason END "
        "RETURNING (xmax = 0) AS inserted",
        (
            slide_id,
            run_id,
            profile.profile_id if has_profile and profile is not None else None,
            Jsonb(to_json_dict(profile)) if has_profile and profile is not None else None,
            origin or "upload",
            reason,
        ),
    )
    row = cur.fetchone()
    new_run = bool(row and row[0])
    cur.execute("SELECT tiling_run_id, status FROM slides WHERE slide_id = %s", (slide_id,))
    slide = cur.fetchone()
    if slide is None:
        return True  # the slide's first event: the writer creates the row, then _claim_run names the run
    current, status = slide
    if current == run_id:
        return True
    if not new_run:
        return current is None and STATUS_RANK.get(status, 0) < 8
    if current is None and STATUS_RANK.get(status, 0) < 8:
        cur.execute("UPDATE slides SET tiling_run_id = %s WHERE slide_id = %s", (run_id, slide_id))
        return True
    # Another run (a reprocess), or a first run after a rejection: the slide starts over.
    cur.execute(
        "UPDATE slides SET status = 'ingested', reason_code = NULL, status_reason = NULL, stage = 'ingest', "
        "finished_at = NULL, run_started_at = now(), updated_at = now(), tiling_run_id = %s, "
        "shards_planned = NULL, total_tiles = NULL, tissue_area_mm2 = NULL WHERE slide_id = %s",
        (run_id, slide_id),
    )
    log.info(
        "slide starts another run", slide_id=slide_id, tiling_run_id=run_id, previous=current, origin=origin
    )
    return True


def _claim_run(cur: psycopg.Cursor, slide_id: str, run_id: str) -> None:
    """Name the current run on a slide row created by this event (no run named yet)."""
    if run_id:
        cur.execute(
            "UPDATE slides SET tiling_run_id = %s WHERE slide_id = %s AND tiling_run_id IS NULL",
            (run_id, slide_id),
        )


def _ingested(cur: psycopg.Cursor, e: pb.SlideIngested) -> None:
    cur.execute("SELECT 1 FROM slides WHERE slide_id = %s", (e.meta.slide_id,))
    if cur.fetchone() is None:
        PENDING_METRICS.append(("ingested", "", ""))
    run_id = tiling_run_id(e.meta.slide_id, e.profile)
    if not _run(cur, e.meta.slide_id, run_id, e.profile, e.origin, e.reason):
        _source(cur, e.meta.slide_id, e.source, e.upload_key)  # a late event of an earlier run: source only
        return
    _set_status(cur, e.meta.slide_id, "ingested", "ingest")
    _claim_run(cur, e.meta.slide_id, run_id)
    _source(cur, e.meta.slide_id, e.source, e.upload_key)
    m = e.metadata
    cur.execute(
        "UPDATE slides SET vendor=%s, width=%s, height=%s, mpp=%s, mpp_source=%s, objective_power=%s, metadata=%s, "
        "profile_id=%s, profile=%s, file_size=%s, source_sha256=%s WHERE slide_id=%s",
        (
            m.vendor,
            m.width,
            m.height,
            m.mpp_x,
            m.mpp_source,
            m.objective_power,
            Jsonb(to_json_dict(m)),
            e.profile.profile_id,
            Jsonb(to_json_dict(e.profile)),
            m.file_size,
            e.source.sha256,
            e.meta.slide_id,
        ),
    )


def _source(cur: psycopg.Cursor, slide_id: str, source: pb.ObjectRef, upload_key: str) -> None:
    cur.execute(
        "INSERT INTO slide_sources (bucket, upload_key, etag, version_id, slide_id) VALUES (%s, %s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (source.bucket, upload_key, source.etag, source.version_id, slide_id),
    )


def _rejected(cur: psycopg.Cursor, e: pb.SlideRejected) -> None:
    _set_status(cur, e.meta.slide_id, "rejected", "ingest", e.reason_code, e.reason)
    if e.source.bucket:
        _source(cur, e.meta.slide_id, e.source, e.upload_key)


def _plan(cur: psycopg.Cursor, e: pb.TilePlan) -> None:
    if not _run(cur, e.meta.slide_id, e.tiling_run_id, e.profile):
        return
    _set_status(cur, e.meta.slide_id, "tiled", "tiler")
    _claim_run(cur, e.meta.slide_id, e.tiling_run_id)
    cur.execute(
        "UPDATE slides SET tiling_run_id=%s, shards_planned=%s, total_tiles=%s, tissue_area_mm2=%s WHERE slide_id=%s",
        (e.tiling_run_id, len(e.shard_ids), e.total_tiles, e.tissue_area_mm2, e.meta.slide_id),
    )


def _progress(stage: str) -> Callable[[psycopg.Cursor, Any], None]:
    def record(cur: psycopg.Cursor, e: Any) -> None:
        _run(cur, e.meta.slide_id, e.tiling_run_id, e.profile)
        detail = {"tiles": int(getattr(e, "tile_count", 0))}
        cur.execute(
            "INSERT INTO stage_progress (slide_id, tiling_run_id, stage, shard_id, event_id, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (e.meta.slide_id, e.tiling_run_id, stage, e.shard_id, e.meta.event_id, Jsonb(detail)),
        )
        cur.execute("UPDATE slides SET updated_at = now() WHERE slide_id = %s", (e.meta.slide_id,))
        if isinstance(e, pb.QcResult):
            cur.execute(
                "INSERT INTO qc_summaries (slide_id, tiling_run_id, shard_id, tile_count, accepted_count, "
                "rejected_by_reason) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (
                    e.meta.slide_id,
                    e.tiling_run_id,
                    e.shard_id,
                    e.tile_count,
                    e.accepted_count,
                    Jsonb(dict(e.rejected_by_reason)),
                ),
            )

    return record


def _prediction(cur: psycopg.Cursor, e: pb.Prediction) -> None:
    current = _run(cur, e.meta.slide_id, e.tiling_run_id)
    cur.execute(
        "INSERT INTO predictions (prediction_id, slide_id, tiling_run_id, model_version, backbone_id, label, "
        "probability, threshold, scores, tiles_scored, tiles_total, top_tiles, attention_ref, event_id, produced_at, "
        "origin, heatmap_ref, top_tiles_ref, ood_score, ood_percentile, ood_limit, out_of_distribution) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (
            e.prediction_id,
            e.meta.slide_id,
            e.tiling_run_id,
            e.model_version,
            e.backbone_id,
            e.label,
            e.probability,
            e.threshold,
            Jsonb(dict(e.scores)),
            e.tiles_scored,
            e.tiles_total,
            Jsonb([to_json_dict(t) for t in e.top_tiles]),
            Jsonb(to_json_dict(e.attention)),
            e.meta.event_id,
            e.meta.produced_at.ToDatetime(),
            e.origin or "stream",
            Jsonb(to_json_dict(e.heatmap)) if e.HasField("heatmap") else None,
            Jsonb(to_json_dict(e.top_tiles_image)) if e.HasField("top_tiles_image") else None,
            # ood_limit 0: the model has no training-embedding summary, so the slide was not assessed
            *(
                (e.ood_score, e.ood_percentile, e.ood_limit, e.out_of_distribution)
                if e.ood_limit
                else (None,) * 4
            ),
        ),
    )
    if not current and e.origin != "rescore":  # an earlier run's prediction: kept, the status is not its
        return
    cur.execute(
        "SELECT extract(epoch FROM now() - coalesce(run_started_at, first_seen_at)) FROM slides "
        "WHERE slide_id = %s AND status <> 'predicted'",
        (e.meta.slide_id,),
    )
    row = cur.fetchone()
    if row is not None and row[0] is not None:
        PENDING_METRICS.append(("latency", str(float(row[0])), ""))
    _set_status(cur, e.meta.slide_id, "predicted", "mil-scorer")
    _claim_run(cur, e.meta.slide_id, e.tiling_run_id)


def _failed(cur: psycopg.Cursor, e: pb.SlideFailed) -> None:
    if not _run(cur, e.meta.slide_id, e.tiling_run_id):
        log.info("failure of an earlier run recorded in the audit log only", slide_id=e.meta.slide_id)
        return
    status = "no_tissue" if e.reason_code == "no-tissue" else "failed"
    _set_status(cur, e.meta.slide_id, status, e.stage, e.reason_code, e.reason)
    _claim_run(cur, e.meta.slide_id, e.tiling_run_id)


def _dead_letter(cur: psycopg.Cursor, e: pb.DeadLetter) -> None:
    cur.execute(
        "INSERT INTO dead_letters (event_id, slide_id, service, source_topic, source_partition, source_offset, "
        "error_type, error, attempts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (
            e.meta.event_id,
            e.meta.slide_id,
            e.service,
            e.source_topic,
            e.source_partition,
            e.source_offset,
            e.error_type,
            e.error,
            e.attempts,
        ),
    )


# Metrics of rows written in the current transaction: published only once it committed.
PENDING_METRICS: list[tuple[str, str, str]] = []


def publish_metrics() -> None:
    for kind, value, code in PENDING_METRICS:
        if kind == "outcome":
            SLIDE_OUTCOMES.labels(value, code or "none").inc()
        elif kind == "ingested":
            SLIDES_INGESTED.inc()
        elif kind == "latency":
            END_TO_END_SECONDS.observe(float(value))
    PENDING_METRICS.clear()


WRITERS: dict[type[Message], Callable[[psycopg.Cursor, Any], None]] = {
    pb.SlideIngested: _ingested,
    pb.SlideRejected: _rejected,
    pb.TilePlan: _plan,
    pb.TileShard: _progress("tiler"),
    pb.QcResult: _progress("quality-filter"),
    pb.ShardEmbedding: _progress("embedder"),
    pb.Prediction: _prediction,
    pb.SlideFailed: _failed,
    pb.DeadLetter: _dead_letter,
    pb.InteropResult: lambda cur, e: None,  # the results for hospital systems: the audit row is their record
}


def audit(cur: psycopg.Cursor, message: Incoming) -> None:
    """The audit row of one delivered event; a redelivery bumps its ``deliveries`` count."""
    e: Any = message.event
    summary = {"partition": message.partition, "offset": message.offset}
    cur.execute(
        "INSERT INTO audit_log (event_id, topic, event_type, slide_id, producer, summary) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO UPDATE SET "
        "deliveries = audit_log.deliveries + 1, last_seen_at = now()",
        (
            e.meta.event_id,
            message.topic,
            type(e).__name__,
            e.meta.slide_id,
            e.meta.producer.service,
            Jsonb(summary),
        ),
    )


def stalled_slides(db: Database, deadline_s: float) -> list[tuple[str, str, str | None]]:
    """Slides still ``ingested`` or ``tiled`` ``deadline_s`` after their run started: (id, status, run)."""
    rows = db.execute(
        "SELECT slide_id, status, tiling_run_id FROM slides WHERE status IN ('ingested', 'tiled') "
        "AND coalesce(run_started_at, first_seen_at) < now() - make_interval(secs => %s)",
        (deadline_s,),
    )
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


def slide_statuses(db: Database, slide_ids: list[str]) -> dict[str, str]:
    """``{slide id: status}`` of those of ``slide_ids`` the recorder knows (``slides``)."""
    rows = db.execute("SELECT slide_id, status FROM slides WHERE slide_id = ANY(%s)", (slide_ids,))
    return {str(slide_id): str(status) for slide_id, status in rows}


def upload_keys(db: Database, prefix: str = "") -> list[tuple[str, str]]:
    """``(slide id, upload key)`` of every source upload (``slide_sources``), those under ``prefix`` only
    when given: how a labels file's upload keys and file names become slide ids."""
    if prefix:
        rows = db.execute(
            "SELECT slide_id, upload_key FROM slide_sources WHERE upload_key LIKE %s",
            (prefix.replace("%", r"\%").replace("_", r"\_") + "%",),
        )
    else:
        rows = db.execute("SELECT slide_id, upload_key FROM slide_sources")
    return [(str(slide_id), str(key)) for slide_id, key in rows]
