"""Entry point: ``wsi run tiler``."""

from __future__ import annotations

from wsitk.services.tiler.handler import SERVICE, TilerHandler
from wsitk.shared.bus.runtime import ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.topics import SLIDES_INGESTED


def build(settings: Settings) -> ServiceSpec:
    handler = TilerHandler(ServiceContext(settings, SERVICE))
    # One slide at a time: a slide is minutes of work, done with the partition paused.
    return ServiceSpec(
        name=SERVICE,
        topics=[SLIDES_INGESTED],
        handler=handler.handle,
        batch_size=1,
        on_start=handler.warm_up,
    )


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
