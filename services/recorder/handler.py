"""recorder: every event of the pipeline becomes PostgreSQL rows; the only writer of pipeline state.

A batch of events is written in one transaction, all upserts: a redelivered event changes nothing
but its audit row's ``deliveries`` count, which makes absorbed redeliveries visible. Status moves
forward only (a late "ingested" never demotes a "predicted" slide). The recorder also enforces each
slide's deadline: a slide stuck past ``WSI_SLIDE_DEADLINE_S`` is failed explicitly. For each prediction it
records it writes the results for hospital systems (DICOM SR and parametric map, FHIR Bundle) and announces
them on ``wsi.results.dicom`` and ``wsi.results.fhir`` (shared/interop/publish.py).

A slide can be run more than once: ``wsi reprocess`` (or a re-upload after the profile changed)
announces it with another profile, which is another tiling run. Every run is kept (``slide_runs``, in
order of first appearance; its progress, QC summaries and predictions under its own tiling run id), and
the newest is the slide's current run (``slides.tiling_run_id``). The first event of a new run makes it
current and starts the slide over (status ``ingested``, reason cleared, deadline from now), so it ends
``predicted`` (or failed) again by the new run's outcome. Events of older runs are still recorded (a
late prediction is kept) but never move the status; a redelivered event of a known run never starts
anything over.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
from wsitk.shared.bus.delivery import Incoming
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.db.records import PENDING_METRICS, WRITERS, audit, publish_metrics, stalled_slides
from wsitk.shared.logging import get_logger
from wsitk.shared.topics import SLIDES_FAILED

SERVICE = "recorder"
log = get_logger()


class RecorderHandler:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def handle_batch(self, messages: list[Incoming]) -> list[list[Outgoing] | BaseException]:
        """One transaction for the whole batch; on a bad event, fall back to one at a time to isolate it."""
        PENDING_METRICS.clear()
        try:
            with self.ctx.db.transaction() as conn, conn.cursor() as cur:
                for message in messages:
                    self._write(cur, message)
            publish_metrics()
            return [self._results(message) for message in messages]
        except psycopg.DataError:
            PENDING_METRICS.clear()
            results: list[list[Outgoing] | BaseException] = []
            for message in messages:
                try:
                    with self.ctx.db.transaction() as conn, conn.cursor() as cur:
                        self._write(cur, message)
                    publish_metrics()
                    results.append(self._results(message))
                except psycopg.DataError as exc:
                    PENDING_METRICS.clear()
                    results.append(exc)
            return results

    def _results(self, message: Incoming) -> list[Outgoing]:
        """A recorded prediction's DICOM and FHIR results, stored and announced (shared/interop/publish.py)."""
        if not isinstance(message.event, pb.Prediction) or not self.ctx.settings.interop_results:
            return []
        from wsitk.shared.interop.publish import interop_results

        return interop_results(self.ctx, message.event, SERVICE)

    def _write(self, cur: psycopg.Cursor, message: Incoming) -> None:
        event = message.event
        assert event is not None
        audit(cur, message)
        WRITERS[type(event)](cur, event)

    def enforce_deadlines(self, produce: Callable[[list[Outgoing]], None]) -> None:
        deadline = self.ctx.settings.slide_deadline_s
        rows = stalled_slides(self.ctx.db, deadline)
        outputs = []
        for slide_id, status, run_id in rows:
            event = pb.SlideFailed(
                meta=new_meta(service=SERVICE, slide_id=slide_id, event_parts=["deadline", run_id or ""]),
                stage=SERVICE,
                reason_code="deadline-exceeded",
                reason=f"slide still '{status}' after the {deadline} s deadline (WSI_SLIDE_DEADLINE_S); "
                "check the dead letters and service logs for this slide id, then `wsi rescore` or re-upload",
                tiling_run_id=run_id or "",
            )
            outputs.append(Outgoing(SLIDES_FAILED, slide_id, event))
        if outputs:
            produce(outputs)
            log.warning(
                "slides failed by deadline", count=len(outputs), slide_ids=json.dumps([r[0] for r in rows])
            )
