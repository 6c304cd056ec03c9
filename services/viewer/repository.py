"""Everything the viewer reads from PostgreSQL, as plain dicts; SQL lives here and nowhere else.

The viewer connects with its own read-only role (``wsi_viewer``, member of ``wsi_readonly``: SELECT
on slides, sources, runs, predictions, QC summaries and model versions) and opens its sessions
read-only as well, so no query here can change anything even by mistake.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from wsitk.shared.errors import TransientError

STATUSES = ("ingested", "tiled", "predicted", "rejected", "failed", "no_tissue")

# The prediction shown in the list: the newest one of the slide's current run (a rescore adds
# another model version beside it; the slide page shows them all).
_SLIDE_ROWS = """
SELECT s.slide_id, s.status, s.reason_code, s.status_reason, s.stage, s.tissue_area_mm2, s.total_tiles,
       s.mpp, s.width, s.height, s.vendor, s.tiling_run_id, s.first_seen_at, s.updated_at,
       coalesce((SELECT array_agg(DISTINCT src.upload_key ORDER BY src.upload_key)
                 FROM slide_sources src WHERE src.slide_id = s.slide_id), '{}') AS upload_keys,
       p.label, p.probability, p.threshold, p.model_version,
       qc.tiles AS qc_tiles, qc.accepted AS qc_accepted, qc.rejected AS qc_rejected,
       greatest(s.updated_at, p.recorded_at) AS changed_at
FROM slides s
LEFT JOIN LATERAL (
    SELECT label, probability, threshold, model_version, recorded_at FROM predictions
    WHERE predictions.slide_id = s.slide_id AND predictions.tiling_run_id = s.tiling_run_id
    ORDER BY recorded_at DESC LIMIT 1
) p ON true
LEFT JOIN LATERAL (
    SELECT sum(q.tile_count)::int AS tiles, sum(q.accepted_count)::int AS accepted,
           (SELECT jsonb_object_agg(reason, n) FROM (
                SELECT r.key AS reason, sum(r.value::int) AS n
                FROM qc_summaries q2, jsonb_each_text(q2.rejected_by_reason) r
                WHERE q2.slide_id = s.slide_id AND q2.tiling_run_id = s.tiling_run_id GROUP BY r.key
           ) counted) AS rejected
    FROM qc_summaries q WHERE q.slide_id = s.slide_id AND q.tiling_run_id = s.tiling_run_id
) qc ON true
"""

_FILTERS = """
WHERE (%(q)s = '' OR s.slide_id LIKE %(id_prefix)s ESCAPE '\\'
       OR EXISTS (SELECT 1 FROM slide_sources src
                  WHERE src.slide_id = s.slide_id AND src.upload_key LIKE %(q_prefix)s ESCAPE '\\'))
  AND (%(status)s = '' OR s.status = %(status)s)
  AND (%(model)s = '' OR EXISTS (SELECT 1 FROM predictions pm
                                 WHERE pm.slide_id = s.slide_id AND pm.model_version = %(model)s))
"""


def _like_prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}%"


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    plain = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    if "top_tiles" in plain:
        tiles: list[dict[str, Any]] = row["top_tiles"] or []
        plain["top_tiles"] = [_top_tile(t) for t in tiles]
    return plain


def _top_tile(tile: dict[str, Any]) -> dict[str, Any]:
    """Numbers as numbers (the recorder stores protobuf JSON, where 64-bit integers are strings)."""
    return {
        "x": int(tile.get("x", 0)),
        "y": int(tile.get("y", 0)),
        "size": int(tile.get("size", 0)),
        "attention": float(tile.get("attention", 0.0)),
    }


class ViewerRepository:
    """Read-only queries; one connection per worker thread (psycopg connections are not shared)."""

    def __init__(self, dsn: str, *, connect_timeout_s: int = 5) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout_s
        self._local = threading.local()

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        conn: psycopg.Connection[dict[str, Any]] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=self._timeout,
                    row_factory=dict_row,
                    options="-c search_path=wsi,public -c default_transaction_read_only=on",
                )
            except psycopg.OperationalError as exc:
                raise TransientError(f"PostgreSQL unreachable: {exc}") from exc
            self._local.conn = conn
        return conn

    def _rows(self, query: str, params: dict[str, Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        try:
            return [_plain(row) for row in self._connection().execute(query, params).fetchall()]
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._local.conn = None
            raise TransientError(f"PostgreSQL connection lost: {exc}") from exc

    def ping(self) -> bool:
        try:
            self._rows("SELECT 1 AS ok")
        except TransientError:
            return False
        return True

    # -- the slide list ----------------------------------------------------------------------------
    def list_slides(
        self, *, query: str = "", status: str = "", model: str = "", limit: int = 50, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        params = {
            "q": query,
            "q_prefix": _like_prefix(query),
            "id_prefix": _like_prefix(query.lower()),  # slide ids are lowercase hex
            "status": status,
            "model": model,
        }
        total_rows = self._rows(f"SELECT count(*) AS n FROM slides s {_FILTERS}", params)
        rows = self._rows(
            f"{_SLIDE_ROWS} {_FILTERS} ORDER BY s.first_seen_at DESC, s.slide_id LIMIT %(limit)s OFFSET %(offset)s",
            {**params, "limit": limit, "offset": offset},
        )
        return rows, int(total_rows[0]["n"])

    def changed_since(self, since: datetime, limit: int = 200) -> list[dict[str, Any]]:
        """Slides whose status or newest prediction changed after the cursor (oldest change first)."""
        return self._rows(
            f"SELECT * FROM ({_SLIDE_ROWS}) changed WHERE changed_at > %(since)s "
            "ORDER BY changed_at, slide_id LIMIT %(limit)s",
            {"since": since, "limit": limit},
        )

    def cursor(self) -> str:
        """The newest change the list has seen, to poll from."""
        rows = self._rows(
            "SELECT greatest((SELECT max(updated_at) FROM slides), (SELECT max(recorded_at) FROM predictions),"
            " 'epoch'::timestamptz) AS at"
        )
        return str(rows[0]["at"])

    def model_versions(self) -> list[str]:
        return [
            r["model_version"]
            for r in self._rows("SELECT DISTINCT model_version FROM predictions ORDER BY 1")
        ]

    # -- one slide --------------------------------------------------------------------------------
    def slide(self, slide_id: str) -> dict[str, Any] | None:
        rows = self._rows(f"{_SLIDE_ROWS} WHERE s.slide_id = %(slide_id)s", {"slide_id": slide_id})
        if not rows:
            return None
        slide = rows[0]
        slide["runs"] = self._rows(
            "SELECT r.tiling_run_id, r.origin, r.reason, r.started_at, r.profile->>'target_mpp' AS target_mpp,"
            " r.profile->>'tile_size' AS tile_size,"
            " (SELECT sum(tile_count)::int FROM qc_summaries q WHERE q.slide_id = r.slide_id"
            "   AND q.tiling_run_id = r.tiling_run_id) AS qc_tiles,"
            " (SELECT sum(accepted_count)::int FROM qc_summaries q WHERE q.slide_id = r.slide_id"
            "   AND q.tiling_run_id = r.tiling_run_id) AS qc_accepted "
            "FROM slide_runs r WHERE r.slide_id = %(slide_id)s ORDER BY r.started_at, r.tiling_run_id",
            {"slide_id": slide_id},
        )
        slide["predictions"] = self._rows(
            "SELECT prediction_id, tiling_run_id, model_version, backbone_id, label, probability, threshold,"
            " tiles_scored, tiles_total, top_tiles, recorded_at FROM predictions WHERE slide_id = %(slide_id)s"
            " ORDER BY recorded_at, model_version",
            {"slide_id": slide_id},
        )
        return slide

    def source(self, slide_id: str) -> dict[str, Any] | None:
        """Where the slide file is (bucket, key, version) and its content digest; server-side only."""
        rows = self._rows(
            "SELECT src.bucket, src.upload_key, src.version_id, s.source_sha256, s.mpp, s.width, s.height "
            "FROM slides s JOIN slide_sources src USING (slide_id) WHERE s.slide_id = %(slide_id)s "
            "ORDER BY src.first_seen_at LIMIT 1",
            {"slide_id": slide_id},
        )
        return rows[0] if rows else None

    def run_profile(self, slide_id: str, tiling_run_id: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT profile FROM slide_runs WHERE slide_id = %(slide_id)s AND tiling_run_id = %(run)s",
            {"slide_id": slide_id, "run": tiling_run_id},
        )
        return (rows[0]["profile"] or {}) if rows else None

    def prediction(self, slide_id: str, prediction_id: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT prediction_id, tiling_run_id, model_version, backbone_id, top_tiles FROM predictions "
            "WHERE slide_id = %(slide_id)s AND prediction_id = %(prediction_id)s",
            {"slide_id": slide_id, "prediction_id": prediction_id},
        )
        return rows[0] if rows else None
