"""Ingest's tables: the upload ledger (``poller_seen_objects``) and the files of multi-file slides
(``upload_groups``, ``upload_group_parts``), and what ingest reads of the recorder's tables.

Written by ingest only (its bucket poller, its multi-file grouping); read by ingest and its reconciler
(docs/design.md, "Tables and who may use them"; ``shared/db/tables.py`` states the rules the tests
check). Ingest also reads ``slides``, ``slide_sources`` and ``slide_runs`` here: whether content is
already known under another key, and which slides stalled. Unless a docstring says otherwise, a
function runs one statement in a transaction of its own (``Database.execute``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb
from wsitk.shared.db.connection import Database

POLLER_LOCK_ID = 0x57_53_49_01  # "WSI" + 1
TERMINAL_STATUSES = ("predicted", "rejected", "failed", "no_tissue")

# (object key, ETag, size, sha256, detail) of one file of a multi-file slide
GroupPart = tuple[str, str, int, str, dict[str, Any]]


# -- the bucket poller's ledger -------------------------------------------------------------------------
def try_poller_lock(db: Database) -> bool:
    """Take the session's advisory lock that lets one replica poll; False while another holds it."""
    (locked,) = db.execute("SELECT pg_try_advisory_lock(%s)", (POLLER_LOCK_ID,))[0]
    return bool(locked)


def announced_uploads(db: Database, bucket: str) -> set[tuple[str, str]]:
    """``(object key, ETag)`` of every upload in ``bucket`` the poller announced (``poller_seen_objects``)."""
    return {
        (k, e)
        for k, e in db.execute(
            "SELECT object_key, etag FROM poller_seen_objects WHERE bucket = %s", (bucket,)
        )
    }


def record_announced(db: Database, bucket: str, objects: Sequence[tuple[str, str]]) -> None:
    """Add ``(object key, ETag)`` pairs to ``poller_seen_objects``, all in one transaction."""
    with db.transaction() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO poller_seen_objects (bucket, object_key, etag) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            [(bucket, key, etag) for key, etag in objects],
        )


# -- what ingest reads of the recorder's tables ---------------------------------------------------------
def known_under_other_key(db: Database, slide_id: str, key: str) -> bool:
    """Whether ``slide_sources`` has the slide under an upload key other than ``key``."""
    rows = db.execute(
        "SELECT 1 FROM slide_sources WHERE slide_id = %s AND upload_key <> %s LIMIT 1", (slide_id, key)
    )
    return bool(rows)


def uploads_to_reannounce(
    db: Database, stalled_after_s: float
) -> list[tuple[str, str, str, str | None, bool]]:
    """``(bucket, key, ETag, slide id, reprocessed)`` of what the reconciler announces again.

    Unfinished slides whose row has not changed for ``stalled_after_s`` (one source each; ``reprocessed``
    when the current run came from ``wsi reprocess``), and uploads announced that long ago that never
    became a slide nor belong to a multi-file group (slide id None). Reads ``slides``, ``slide_sources``,
    ``slide_runs``, ``poller_seen_objects`` and ``upload_group_parts``.
    """
    rows = db.execute(
        """
        SELECT DISTINCT ON (s.slide_id) src.bucket, src.upload_key, src.etag, s.slide_id,
               coalesce(r.origin = 'reprocess', false)
        FROM slides s JOIN slide_sources src ON src.slide_id = s.slide_id
        LEFT JOIN slide_runs r ON r.slide_id = s.slide_id AND r.tiling_run_id = s.tiling_run_id
        WHERE s.status <> ALL(%s) AND s.updated_at < now() - make_interval(secs => %s)
        UNION
        SELECT p.bucket, p.object_key, p.etag, NULL, false FROM poller_seen_objects p
        WHERE p.seen_at < now() - make_interval(secs => %s)
          AND NOT EXISTS (SELECT 1 FROM slide_sources src WHERE src.bucket = p.bucket AND src.upload_key = p.object_key)
          AND NOT EXISTS (SELECT 1 FROM upload_group_parts g WHERE g.bucket = p.bucket AND g.object_key = p.object_key)
        """,
        (list(TERMINAL_STATUSES), stalled_after_s, stalled_after_s),
    )
    return [(bucket, key, etag, slide_id, reprocessed) for bucket, key, etag, slide_id, reprocessed in rows]


# -- multi-file slides ----------------------------------------------------------------------------------
def group_of_file(db: Database, bucket: str, key: str, etag: str) -> str | None:
    """The group an upload (this exact ETag) was recorded under in ``upload_group_parts``, or None."""
    rows = db.execute(
        "SELECT group_key FROM upload_group_parts WHERE bucket = %s AND object_key = %s AND etag = %s",
        (bucket, key, etag),
    )
    return str(rows[0][0]) if rows else None


def record_group_file(
    db: Database,
    bucket: str,
    group: str,
    kind: str,
    part: GroupPart,
) -> None:
    """Record one file of a group: the group (``upload_groups``, its newest-file time) and the file
    (``upload_group_parts``, replacing an earlier copy of the same key), in one transaction."""
    key, etag, size, sha256, detail = part
    with db.transaction() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO upload_groups (bucket, group_key, kind) VALUES (%s, %s, %s) "
            "ON CONFLICT (bucket, group_key) DO UPDATE SET last_part_at = now()",
            (bucket, group, kind),
        )
        cur.execute(
            "INSERT INTO upload_group_parts (bucket, group_key, object_key, etag, size, sha256, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (bucket, group_key, object_key) DO UPDATE SET "
            "etag = EXCLUDED.etag, size = EXCLUDED.size, sha256 = EXCLUDED.sha256, detail = EXCLUDED.detail, "
            "seen_at = now()",
            (bucket, group, key, etag, size, sha256, Jsonb(detail)),
        )


def group_state(db: Database, bucket: str, group: str) -> tuple[str, str, float, float] | None:
    """``(kind, state, seconds since its first file, seconds since its newest file)`` of a group."""
    rows = db.execute(
        "SELECT kind, state, extract(epoch FROM now() - first_seen_at), extract(epoch FROM now() - last_part_at) "
        "FROM upload_groups WHERE bucket = %s AND group_key = %s",
        (bucket, group),
    )
    if not rows:
        return None
    kind, state, age_s, quiet_s = rows[0]
    return str(kind), str(state), float(age_s), float(quiet_s)


def group_files(db: Database, bucket: str, group: str, *, newest_first: bool = False) -> list[GroupPart]:
    """The files recorded for a group (``upload_group_parts``): by key, or newest first."""
    if newest_first:
        rows = db.execute(
            "SELECT object_key, etag, size, sha256, detail FROM upload_group_parts "
            "WHERE bucket = %s AND group_key = %s ORDER BY seen_at DESC, object_key",
            (bucket, group),
        )
    else:
        rows = db.execute(
            "SELECT object_key, etag, size, sha256, detail FROM upload_group_parts "
            "WHERE bucket = %s AND group_key = %s ORDER BY object_key",
            (bucket, group),
        )
    return [(key, etag, int(size), sha, dict(detail)) for key, etag, size, sha, detail in rows]


def reject_group(db: Database, bucket: str, group: str, reason: str) -> None:
    """Mark a group ``rejected`` with the reason (``upload_groups``)."""
    db.execute(
        "UPDATE upload_groups SET state = 'rejected', reason = %s WHERE bucket = %s AND group_key = %s",
        (reason, bucket, group),
    )


def settle_group(db: Database, bucket: str, group: str, state: str, slide_id: str) -> None:
    """Record how an assembled group ended (``ingested``/``rejected``) and its slide (``upload_groups``)."""
    db.execute(
        "UPDATE upload_groups SET state = %s, slide_id = %s WHERE bucket = %s AND group_key = %s",
        (state, slide_id, bucket, group),
    )


def groups_due(db: Database, settle_s: float) -> list[tuple[str, str, str, float]]:
    """``(bucket, group, kind, seconds since its first file)`` of pending groups quiet for ``settle_s``."""
    rows = db.execute(
        "SELECT g.bucket, g.group_key, g.kind, extract(epoch FROM now() - g.first_seen_at), "
        "extract(epoch FROM now() - g.last_part_at) FROM upload_groups g "
        "WHERE g.state = 'pending' AND g.last_part_at < now() - make_interval(secs => %s)",
        (settle_s,),
    )
    return [
        (str(bucket), str(group), str(kind), float(age_s)) for bucket, group, kind, age_s, _quiet_s in rows
    ]
