"""Entry point: ``wsi run mil-scorer``."""

from __future__ import annotations

from wsitk.services.mil_scorer.scorer import SERVICE, MilScorer
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.bus.runtime import Incoming, ServiceSpec, run_service
from wsitk.shared.config import Settings
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import pb
from wsitk.shared.topics import EMBEDDINGS, TILE_PLANS


def build(settings: Settings) -> ServiceSpec:
    scorer = MilScorer(ServiceContext(settings, SERVICE))

    def handle(message: Incoming) -> list[Outgoing]:
        if isinstance(message.event, pb.TilePlan):
            return scorer.on_plan(message.event)
        assert isinstance(message.event, pb.ShardEmbedding)
        return scorer.on_embedding(message.event)

    return ServiceSpec(name=SERVICE, topics=[TILE_PLANS, EMBEDDINGS], handler=handle, batch_size=16)


def main(settings: Settings) -> int:
    return run_service(build(settings), settings)
