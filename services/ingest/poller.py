"""The bucket poller (for S3 servers without notifications) and the reconciler.

Poller: lists the uploads bucket and announces each object (key + ETag) it has not announced
before, in MinIO's notification format, on ``wsi.bucket-events``. What it announced is recorded in
PostgreSQL *after* the broker acknowledged it, so a crash in between announces twice (harmless:
ingest is idempotent) and never zero times. Only one replica polls at a time (an advisory lock).

Reconciler: the local broker forgets everything when it restarts, and any broker can lose an event
to an operator's mistake; PostgreSQL and the object store keep the truth. Slides the recorder knows
as unfinished whose progress stalled, and announced uploads that never became a slide, are
announced again (files of multi-file slides are left to ``multifile.check_groups``; a slide whose current run came from ``wsi reprocess`` gets that run's
``SlideIngested`` again instead). Downstream stages reuse what they already stored, so a re-drive is cheap.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from wsitk.shared.announce import make_bucket_event
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.corrections import reannounce_reprocessed
from wsitk.shared.db import intake
from wsitk.shared.logging import get_logger
from wsitk.shared.topics import BUCKET_EVENTS

log = get_logger()

Produce = Callable[[list[Outgoing]], None]


def poll_bucket(ctx: ServiceContext, produce: Produce, limit: int = 500) -> int:
    """Announce new uploads; returns how many were announced."""
    bucket = ctx.settings.uploads_bucket
    if not intake.try_poller_lock(ctx.db):
        return 0
    seen = intake.announced_uploads(ctx.db, bucket)
    fresh = []
    for obj in ctx.store.list_keys(bucket):
        if (obj.key, obj.etag) not in seen:
            fresh.append(obj)
        if len(fresh) >= limit:
            break
    if not fresh:
        return 0
    produce(
        [
            Outgoing(BUCKET_EVENTS, f"{bucket}/{o.key}", raw=make_bucket_event(bucket, o.key, o.size, o.etag))
            for o in fresh
        ]
    )
    intake.record_announced(ctx.db, bucket, [(o.key, o.etag) for o in fresh])
    log.info("bucket poller announced uploads", count=len(fresh))
    return len(fresh)


def reconcile(ctx: ServiceContext, produce: Produce, stalled_after_s: float) -> int:
    """Re-announce unfinished slides and announced-but-never-ingested uploads. Returns the count."""
    rows = intake.uploads_to_reannounce(ctx.db, stalled_after_s)
    outputs = []
    for bucket, key, _etag, slide_id, reprocessed in rows:
        if reprocessed:  # its current run is `wsi reprocess`'s profile, not the one ingest would pin
            again = reannounce_reprocessed(ctx, slide_id)
            if again is not None:
                outputs.append(again)
                continue
        stored = ctx.store.stat(bucket, key)
        if stored is None:
            continue
        outputs.append(
            Outgoing(
                BUCKET_EVENTS, f"{bucket}/{key}", raw=make_bucket_event(bucket, key, stored.size, stored.etag)
            )
        )
    if outputs:
        produce(outputs)
        log.info("reconciler re-announced unfinished uploads", count=len(outputs))
    return len(outputs)


def cli_reconcile(args: argparse.Namespace) -> int:
    """``wsi reconcile``: what the periodic reconciler does, once, now (after a broker restart)."""
    import asyncio

    from wsitk.shared.bus.kafka import make_producer, produce_all
    from wsitk.shared.config import load_settings

    settings = load_settings()
    ctx = ServiceContext(settings, "cli")

    async def run() -> int:
        producer = make_producer(settings)
        await producer.start()
        loop = asyncio.get_running_loop()
        try:

            def produce(outputs: list[Outgoing]) -> None:
                asyncio.run_coroutine_threadsafe(produce_all(producer, outputs), loop).result(timeout=60)

            return await asyncio.to_thread(reconcile, ctx, produce, args.stalled_after)
        finally:
            await producer.stop()

    print(f"re-announced {asyncio.run(run())} upload(s)")
    return 0
