"""Entry point: ``wsi run embedder``. Its settings (``WSI_EMBED_*``) are documented in shared/config.py
and docs/embedder.md."""

from __future__ import annotations

from wsitk.services.embedder.handler import SERVICE, EmbedderHandler
from wsitk.shared.bus.runtime import ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.topics import QC_RESULTS


def build(settings: Settings) -> ServiceSpec:
    handler = EmbedderHandler(
        ServiceContext(settings, SERVICE),
        batch_size=settings.embed_batch_size,
        decode_workers=settings.embed_decode_workers,
        prefetch_batches=settings.embed_prefetch_batches,
        fetch_ahead_shards=settings.embed_fetch_ahead_shards,
        backend=settings.embed_backend,
    )
    return ServiceSpec(
        name=SERVICE,
        topics=[QC_RESULTS],
        batch_handler=handler.handle_batch,
        batch_size=settings.embed_messages_per_batch,
    )


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
