"""Entry point: ``wsi run embedder``."""

from __future__ import annotations

from wsitk.services.embedder.handler import SERVICE, EmbedderHandler
from wsitk.shared.bus.runtime import ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.topics import QC_RESULTS


def build(settings: Settings) -> ServiceSpec:
    handler = EmbedderHandler(ServiceContext(settings, SERVICE))
    return ServiceSpec(name=SERVICE, topics=[QC_RESULTS], handler=handler.handle, batch_size=4)


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
