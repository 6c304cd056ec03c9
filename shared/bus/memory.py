"""An in-memory broker: run a service's handler and the shared delivery rules without Kafka.

For unit tests of handlers and of ``DeliveryPolicy``. Events go through the same serialisation as on
Kafka (``Outgoing.serialise``, ``decode_message``: the contracts and the size limits are exercised),
topics are append-only logs with one partition, each consumer group has a committed offset per topic,
and the attempt ledger is a dictionary. What it does not model: partitions, rebalances, concurrency
and crashes; those are the integration and end-to-end tests' business.

    broker = MemoryBroker()
    broker.publish([Outgoing(SLIDES_INGESTED, slide_id, event)])
    MemoryRunner(tiler_spec, broker).drain()
    plans = broker.events(TILE_PLANS)
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from wsitk.shared.bus.delivery import (
    CallHandler,
    DeliveryPolicy,
    Incoming,
    Result,
    call_batch,
    call_each,
    decode_message,
)
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.contracts import MalformedEvent, decode
from wsitk.shared.errors import PermanentError
from wsitk.shared.topics import topic


@dataclass(frozen=True)
class Record:
    topic: str
    offset: int
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


class MemoryBroker:
    """Topics as lists of records; committed offsets per (group, topic)."""

    def __init__(self) -> None:
        self.logs: dict[str, list[Record]] = defaultdict(list)
        self.committed: dict[tuple[str, str], int] = defaultdict(int)

    def append(
        self, topic_name: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]] = ()
    ) -> int:
        """Append raw bytes (malformed ones too); returns the record's offset."""
        log = self.logs[topic_name]
        log.append(Record(topic_name, len(log), key, value, tuple(headers)))
        return len(log) - 1

    def publish(self, outputs: Sequence[Outgoing]) -> None:
        """Produce as the Kafka producer does: serialised, refused over the topic's size limit."""
        for out in outputs:
            value, headers = out.serialise()
            limit = topic(out.topic).max_message_bytes
            if len(value) > limit:
                raise PermanentError(
                    "message-too-large", f"{len(value)} bytes for {out.topic} (limit {limit})"
                )
        for out in outputs:
            value, headers = out.serialise()
            self.append(out.topic, out.key.encode(), value, headers)

    async def produce(self, outputs: list[Outgoing]) -> None:
        self.publish(outputs)

    def fetch(self, group: str, topics: Sequence[str], max_records: int) -> list[Record]:
        """Up to ``max_records`` records after the group's committed offsets, topic by topic."""
        out: list[Record] = []
        for name in topics:
            start = self.committed[(group, name)]
            out += self.logs[name][start : start + max_records - len(out)]
            if len(out) >= max_records:
                break
        return out

    def commit(self, group: str, messages: Sequence[Incoming]) -> None:
        for message in messages:
            key = (group, message.topic)
            self.committed[key] = max(self.committed[key], message.offset + 1)

    def lag(self, group: str, topic_name: str) -> int:
        return len(self.logs[topic_name]) - self.committed[(group, topic_name)]

    def records(self, topic_name: str) -> list[Record]:
        return list(self.logs[topic_name])

    def events(self, topic_name: str) -> list[Message]:
        """Every event on a topic, decoded (raises MalformedEvent if one is not its contract)."""
        return [decode(topic_name, r.value) for r in self.logs[topic_name]]


class MemoryLedger:
    """The attempt ledger as a dictionary; ``writes_fail`` makes every write raise (a database outage)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, int], int] = {}
        self.errors: dict[tuple[str, int, int], str] = {}
        self.writes_fail: BaseException | None = None

    def _check(self) -> None:
        if self.writes_fail is not None:
            raise self.writes_fail

    def increment(self, messages: Sequence[Incoming]) -> dict[tuple[str, int, int], int]:
        self._check()
        for message in messages:
            self.counts[message.position] = self.counts.get(message.position, 0) + 1
        return {m.position: self.counts[m.position] for m in messages}

    def record_error(self, message: Incoming, error: str) -> None:
        self._check()
        self.errors[message.position] = error

    def forget_transient(self, message: Incoming) -> None:
        self._check()
        self.counts[message.position] = max(self.counts.get(message.position, 0) - 1, 0)

    def clear(self, messages: Sequence[Incoming]) -> None:
        self._check()
        for message in messages:
            self.counts.pop(message.position, None)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


async def _no_pause() -> None:
    return None


class MemoryRunner:
    """One consumer group over a ``MemoryBroker``: the runtime's loop with the shared delivery policy.

    ``spec`` is a ``runtime.ServiceSpec`` (a handler or a batch handler, topics, batch size). Handlers
    run inline; infrastructure backoff does not sleep (``waits`` records each wait instead).
    """

    def __init__(
        self,
        spec: Any,
        broker: MemoryBroker,
        *,
        max_attempts: int = 3,
        ledger: MemoryLedger | None = None,
        early_publish: bool = True,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.group = spec.group_id or f"wsi-{spec.name}"
        self.ledger = ledger if ledger is not None else MemoryLedger()
        self.waits: list[tuple[str, str]] = []
        self.results: list[Result] = []
        self.early_publish = early_publish
        self.policy = DeliveryPolicy(
            spec.name,
            self.group,
            self.ledger,
            max_attempts=spec.max_attempts or max_attempts,
            backoff_max_s=0.0,
            run=_inline,
            wait_out=self._wait_out,
            retry_pause=_no_pause,
            on_dead_letter=spec.on_dead_letter,
        )

    async def _wait_out(self, what: str, error: BaseException, _delay: float) -> None:
        self.waits.append((what, f"{type(error).__name__}: {error}"))
        if len(self.waits) > 1000:
            raise RuntimeError(f"infrastructure never recovered: {self.waits[-1]}")

    def _call(self) -> CallHandler:
        if self.spec.batch_handler is not None:
            return call_batch(self.spec.batch_handler, _inline)
        emit = self.broker.publish if self.early_publish else None
        return call_each(self.spec.handler, _inline, emit)

    def drain(self, max_batches: int = 10_000) -> list[Result]:
        """Consume until the group has nothing left on its topics; returns the results of this call."""
        return asyncio.run(self._drain(max_batches))

    async def _drain(self, max_batches: int) -> list[Result]:
        results: list[Result] = []
        batch_size = self.spec.batch_size or 8
        for _ in range(max_batches):
            records = self.broker.fetch(self.group, self.spec.topics, batch_size)
            if not records:
                break
            malformed: list[Result] = []
            decoded: list[Incoming] = []
            for record in records:
                try:
                    decoded.append(
                        decode_message(
                            record.topic, 0, record.offset, record.key, record.value, record.headers
                        )
                    )
                except MalformedEvent as exc:
                    raw = Incoming(record.topic, 0, record.offset, record.key, record.value, [], None)
                    malformed.append(Result.malformed(raw, exc))
            batch = malformed + await self.policy.handle(decoded, self._call())
            await self.policy.settle(batch, self.broker.produce)
            self.broker.commit(self.group, [r.message for r in batch])
            results += batch
        self.results += results
        return results
