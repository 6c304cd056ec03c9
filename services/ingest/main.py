"""Entry point: ``wsi run ingest``."""

from __future__ import annotations

from functools import partial

from wsitk.services.ingest.handler import SERVICE, IngestHandler
from wsitk.services.ingest.multifile import check_groups
from wsitk.services.ingest.poller import poll_bucket, reconcile
from wsitk.shared.bus.runtime import Produce, ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.topics import BUCKET_EVENTS


def build(settings: Settings) -> ServiceSpec:
    ctx = ServiceContext(settings, SERVICE)
    handler = IngestHandler(ctx)
    periodic = [
        (settings.reconcile_interval_s, partial(_reconcile, ctx, settings.reconcile_interval_s)),
        (settings.multifile_check_interval_s, partial(check_groups, ctx)),
    ]
    if settings.poller_enabled:
        periodic.append((settings.poll_interval_s, partial(_poll, ctx)))
    return ServiceSpec(
        name=SERVICE,
        topics=[BUCKET_EVENTS],
        handler=handler.handle,
        batch_size=4,
        on_dead_letter=handler.on_dead_letter,
        periodic=periodic,
        on_start=handler.warm_up,
    )


def _poll(ctx: ServiceContext, produce: Produce) -> None:
    poll_bucket(ctx, produce)


def _reconcile(ctx: ServiceContext, stalled_after_s: float, produce: Produce) -> None:
    reconcile(ctx, produce, stalled_after_s)


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
