"""Entry point: ``wsi run recorder``."""

from __future__ import annotations

from functools import partial

from wsitk.services.recorder.handler import SERVICE, RecorderHandler
from wsitk.shared.bus.runtime import ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.topics import BUCKET_EVENTS, topic_table


def build(settings: Settings) -> ServiceSpec:
    handler = RecorderHandler(ServiceContext(settings, SERVICE))
    topics = [name for name in topic_table() if name != BUCKET_EVENTS]
    return ServiceSpec(
        name=SERVICE,
        topics=topics,
        batch_handler=handler.handle_batch,
        batch_size=200,
        periodic=[(60.0, partial(handler.enforce_deadlines))],
    )


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
