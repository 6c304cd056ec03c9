"""Entry point: ``wsi run quality-filter``."""

from __future__ import annotations

from wsitk.services.quality_filter.handler import SERVICE, QualityFilterHandler
from wsitk.shared.bus.runtime import ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.topics import TILE_SHARDS


def build(settings: Settings) -> ServiceSpec:
    handler = QualityFilterHandler(ServiceContext(settings, SERVICE))
    return ServiceSpec(name=SERVICE, topics=[TILE_SHARDS], handler=handler.handle, batch_size=8)


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
