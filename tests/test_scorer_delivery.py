"""The scorer's delivery rules: infrastructure failures are retried without being counted as attempts.

Against the real PostgreSQL attempt ledger of the test stack; the scorer's handler and producer are
replaced by stand-ins, because what is under test is the counting around them.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from wsitk.services.mil_scorer.stream import ScorerStream
from wsitk.shared.bus.runtime import AttemptLedger, Incoming
from wsitk.shared.db.connection import Database
from wsitk.shared.errors import PermanentError, TransientError

from tests.conftest import Pipeline

_OFFSETS = itertools.count(1_000_000)


def _stream(pipeline: Pipeline, handle: Any) -> tuple[ScorerStream, list[Incoming]]:
    settings = pipeline.settings().model_copy(update={"max_attempts": 3, "infra_backoff_max_s": 0.05})
    stream = ScorerStream.__new__(ScorerStream)  # no Faust app: the delivery rules only
    stream.settings = settings
    stream.ledger = AttemptLedger(Database(settings.dsn()), "test-scorer-delivery")
    stream.ready = False
    dead: list[Incoming] = []

    async def send_all(items: list[Any]) -> None:
        return None

    async def dead_letter(message: Incoming, error: BaseException) -> None:
        dead.append(message)

    stream.handle = handle  # type: ignore[method-assign]
    stream.send_all = send_all  # type: ignore[method-assign]
    stream.dead_letter = dead_letter  # type: ignore[method-assign]
    return stream, dead


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

    async def flaky(incoming: Incoming) -> list[Any]:
        calls["n"] += 1
        seen_counts.append(_count(pipeline, incoming))
        if calls["n"] <= 6:  # twice the attempt limit of transient failures (S3 unreachable)
            raise TransientError("S3 unreachable")
        return []

    stream, dead = _stream(pipeline, flaky)
    asyncio.run(stream.process(message))
    assert calls["n"] == 7 and dead == []
    assert max(seen_counts) == 1  # every retry of a blip is still the first attempt
    assert _count(pipeline, message) == 0  # cleared once handled


def test_deterministic_failures_still_dead_letter_at_the_limit(pipeline: Pipeline) -> None:
    calls = {"n": 0}
    message = _message()

    async def broken(incoming: Incoming) -> list[Any]:
        calls["n"] += 1
        raise PermanentError("bad-embedding", "the embedding object is not a matrix")

    stream, dead = _stream(pipeline, broken)
    asyncio.run(stream.process(message))
    assert calls["n"] == 3 and dead == [message]
