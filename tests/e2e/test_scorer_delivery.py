"""The scorer's delivery rules on the real attempt ledger: infrastructure failures are not attempts.

The scorer's stream delivers through the shared ``DeliveryPolicy`` (``scorer_policy``); here it runs
against the real PostgreSQL ledger of the test stack with a stand-in handler and producer, because
what is under test is the counting around them (the rules themselves: tests/unit/test_delivery_policy.py).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from wsitk.services.mil_scorer.stream import scorer_policy
from wsitk.shared.bus.delivery import AttemptLedger, Incoming, call_each
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.db.connection import Database
from wsitk.shared.errors import PermanentError, TransientError
from wsitk.shared.topics import DEADLETTER

from tests.conftest import Pipeline

_OFFSETS = itertools.count(1_000_000)


def _deliver(pipeline: Pipeline, handle: Any, message: Incoming) -> list[Outgoing]:
    settings = pipeline.settings().model_copy(update={"max_attempts": 3, "infra_backoff_max_s": 0.05})
    ledger = AttemptLedger(Database(settings.dsn()), "test-scorer-delivery")
    policy = scorer_policy(settings, ledger, lambda _ready: None)
    produced: list[Outgoing] = []

    async def produce(outputs: list[Outgoing]) -> None:
        produced.extend(outputs)

    asyncio.run(policy.deliver([message], call_each(handle, policy.run), produce))
    return produced


def _message() -> Incoming:
    return Incoming("wsi.embeddings", 0, next(_OFFSETS), b"k", b"", [], None)


def _count(pipeline: Pipeline, message: Incoming) -> int:
    rows = pipeline.query(
        "SELECT attempts FROM delivery_attempts WHERE consumer_group = %s AND topic = %s AND "
        'partition = %s AND "offset" = %s',
        ("test-scorer-delivery", message.topic, message.partition, message.offset),
    )
    return int(rows[0][0]) if rows else 0


def test_an_object_store_blip_longer_than_the_attempt_limit_dead_letters_nothing(pipeline: Pipeline) -> None:
    calls = {"n": 0}
    seen_counts: list[int] = []
    message = _message()

    def flaky(incoming: Incoming) -> list[Any]:
        calls["n"] += 1
        seen_counts.append(_count(pipeline, incoming))
        if calls["n"] <= 6:  # twice the attempt limit of transient failures (S3 unreachable)
            raise TransientError("S3 unreachable")
        return []

    produced = _deliver(pipeline, flaky, message)
    assert calls["n"] == 7 and produced == []
    assert max(seen_counts) == 1  # every retry of a blip is still the first attempt
    assert _count(pipeline, message) == 0  # cleared once handled


def test_deterministic_failures_still_dead_letter_at_the_limit(pipeline: Pipeline) -> None:
    calls = {"n": 0}
    message = _message()

    def broken(incoming: Incoming) -> list[Any]:
        calls["n"] += 1
        raise PermanentError("bad-embedding", "the embedding object is not a matrix")

    produced = _deliver(pipeline, broken, message)
    assert calls["n"] == 3
    assert [o.topic for o in produced] == [DEADLETTER]
    assert _count(pipeline, message) == 0
