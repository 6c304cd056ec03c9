"""Kafka clients configured once: security options, acks=all producers, size limits, topic creation.

Works against any Kafka-API broker. Things this code deliberately does not rely on, because the
local Tansu broker lacks or breaks them: idempotent producers, transactions, end offsets for
correctness (only for the lag gauge), and a quick first group join.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from google.protobuf.message import Message
from wsitk.shared.config import Settings
from wsitk.shared.contracts import encode
from wsitk.shared.errors import PermanentError
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import CONSUMER_LAG
from wsitk.shared.topics import topic, topic_table

_log = get_logger()


@dataclass
class Outgoing:
    """One event to produce. ``message`` is a wsi.v1 message, or ``raw`` bytes for non-protobuf topics."""

    topic: str
    key: str
    message: Message | None = None
    raw: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def serialise(self) -> tuple[bytes, list[tuple[str, bytes]]]:
        if self.message is not None:
            value, headers = encode(self.topic, self.message)
            return value, headers + self.headers
        if self.raw is None:
            raise ValueError(f"Outgoing to {self.topic} has neither message nor raw bytes")
        return self.raw, self.headers


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options shared by every client (TLS, SASL from settings)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
    }
    if "SSL" in settings.kafka_security_protocol:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_password()
    return options


def make_producer(settings: Settings) -> AIOKafkaProducer:
    largest = max(t.max_message_bytes for t in topic_table().values())
    return AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        # not supported by every broker we run against; effects are idempotent instead
        enable_idempotence=False,
        max_request_size=largest + 65536,
        linger_ms=5,
    )


def make_consumer(
    settings: Settings, topics: Sequence[str], group_id: str | None, **extra: Any
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        **client_options(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a new group must not skip events published before it joined
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        max_partition_fetch_bytes=2 * 1024 * 1024,
        **extra,
    )


async def produce_all(producer: AIOKafkaProducer, outputs: Iterable[Outgoing]) -> None:
    """Send every output and wait for all acknowledgements (acks=all). Raises on the first failure."""
    futures = []
    for out in outputs:
        value, headers = out.serialise()
        limit = topic(out.topic).max_message_bytes
        if len(value) > limit:
            raise PermanentError(
                "message-too-large",
                f"refusing to produce {len(value)} bytes to {out.topic} (limit {limit}): events carry object "
                "references, not payloads",
            )
        futures.append(await producer.send(out.topic, value=value, key=out.key.encode(), headers=headers))
    if futures:
        await asyncio.gather(*futures)


async def report_lag(consumer: Any, service: str, reported: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Set ``wsi_consumer_lag_messages`` for the partitions this member owns now; drop the others.

    ``reported`` is what the previous call exported (start with an empty set); the new set is returned.
    After a rebalance a member no longer owns some partitions: their series are removed, so that the
    stage's lag is the sum over its members of what each one owns, and a stage that has handed its
    partitions to a new member does not go on reporting their old lag. A partition whose position
    cannot be read right now (being revoked) keeps no series until the next call.
    """
    owned: set[tuple[str, int]] = set()
    for tp in consumer.assignment():
        try:
            high = consumer.highwater(tp)
            position = await consumer.position(tp)
        except Exception as exc:  # noqa: BLE001 - revoked while we asked: the next round has the new owner's view
            _log.debug("lag not readable", topic=tp.topic, partition=tp.partition, error=str(exc))
            continue
        if high is None or position is None:
            continue
        owned.add((tp.topic, tp.partition))
        CONSUMER_LAG.labels(service, tp.topic, str(tp.partition)).set(max(high - position, 0))
    for topic_name, partition in reported - owned:
        with contextlib.suppress(KeyError):  # never exported by this process
            CONSUMER_LAG.remove(service, topic_name, str(partition))
    return owned
