"""The mil-scorer's stream: a faust-streaming agent over the co-partitioned plans and embeddings.

Faust owns the consumer group, the agent loop and the offset commits (an event's offset is
committed only after the agent has finished with it, and the agent awaits every produced event's
acknowledgement first: at least once). The per-slide state is *not* a Faust table: table changelog
recovery fails against the local broker after a SIGKILL, so the state lives in PostgreSQL
(``MilScorer``), where any restart finds it.

The delivery rules of the other services hold here too, from the same code: ``shared/bus/delivery.py``'s
``DeliveryPolicy`` (the durable attempt ledger, poison recognised after a crash, bounded retries then a
dead letter plus a public ``SlideFailed``, unlimited retries with backoff for infrastructure failures
with readiness reported false), and ``/metrics`` ``/healthz`` ``/readyz`` and JSON logs.

Timeouts are shortened from Faust's defaults (60 s session and rebalance), with which a restarted
worker on the local broker waited over 100 s for partitions; with these it resumes in about 20 s.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import structlog
from wsitk.services.mil_scorer.scorer import SERVICE, MilScorer
from wsitk.shared.bus.delivery import (
    AttemptLedger,
    DeliveryPolicy,
    Incoming,
    Ledger,
    Result,
    call_each,
)
from wsitk.shared.bus.kafka import Outgoing, report_lag
from wsitk.shared.config import Settings, wsi_home
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import MalformedEvent, decode, package_version, pb
from wsitk.shared.errors import PermanentError
from wsitk.shared.heap import release_free_memory
from wsitk.shared.logging import configure_logging, get_logger
from wsitk.shared.metrics import (
    BUILD_INFO,
    ERRORS,
    EVENTS_IN,
    HANDLE_SECONDS,
    IN_FLIGHT,
    READY,
    HealthServer,
)
from wsitk.shared.topics import EMBEDDINGS, TILE_PLANS, topic, topic_table

GROUP = "wsi-mil-scorer"
log = get_logger()


def _broker_credentials(settings: Settings) -> Any:
    protocol = settings.kafka_security_protocol
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_password(),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
            if "SSL" in protocol
            else None,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None))
    return None


class ScorerStream:
    """What the Faust agent does with one event: the shared ``DeliveryPolicy`` around ``MilScorer``.

    A thin adapter: Faust delivers one event at a time and commits its offset once the agent returns;
    counting, retries, dead letters and the infrastructure backoff are the policy's, as in every other
    service.
    """

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.settings = settings
        self.scorer = MilScorer(ServiceContext(settings, SERVICE))
        self.outputs = {
            name: app.topic(name, key_serializer="raw", value_serializer="raw") for name in topic_table()
        }
        self.ready = False
        self.policy = scorer_policy(settings, AttemptLedger(self.scorer.ctx.db, GROUP), self.set_ready)

    def set_ready(self, value: bool) -> None:
        self.ready = value
        READY.labels(SERVICE).set(1 if value else 0)

    async def send_all(self, items: list[Outgoing]) -> None:
        """Produce and wait for every acknowledgement (acks=all) before the event is acked to Faust."""
        pending = []
        for out in items:
            value, headers = out.serialise()
            if len(value) > topic(out.topic).max_message_bytes:
                raise PermanentError("message-too-large", f"{len(value)} bytes for {out.topic}")
            pending.append(
                await self.outputs[out.topic].send(key=out.key.encode(), value=value, headers=headers)
            )
        for future in pending:
            await future

    def handle(self, message: Incoming) -> list[Outgoing]:
        event = message.event
        if isinstance(event, pb.TilePlan):
            return self.scorer.on_plan(event)
        if isinstance(event, pb.ShardEmbedding):
            return self.scorer.on_embedding(event)
        raise PermanentError("unexpected-event", f"the scorer does not consume {type(event).__name__}")

    async def process(self, message: Incoming) -> None:
        """Deliver one event per the shared rules; returns when its outputs are acknowledged."""
        started = time.perf_counter()
        try:
            await self.policy.deliver([message], call_each(self.handle, _in_thread), self.send_all)
        finally:
            release_free_memory()  # as the runtime does after each batch (shared/heap.py)
        HANDLE_SECONDS.labels(SERVICE, message.topic).observe(time.perf_counter() - started)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def scorer_policy(settings: Settings, ledger: Ledger, ready: Callable[[bool], None]) -> DeliveryPolicy:
    """The scorer's delivery policy: the shared one, waiting with plain sleeps (Faust keeps the membership)."""

    async def wait_out(what: str, error: BaseException, delay: float) -> None:
        ready(False)
        ERRORS.labels(SERVICE, "infrastructure").inc()
        log.warning(
            "infrastructure failure, retrying",
            step=what,
            error=f"{type(error).__name__}: {error}",
            retry_in_s=delay,
        )
        await asyncio.sleep(delay)

    async def retry_pause() -> None:
        await asyncio.sleep(0.5)

    return DeliveryPolicy(
        SERVICE,
        GROUP,
        ledger,
        max_attempts=settings.max_attempts,
        backoff_max_s=settings.infra_backoff_max_s,
        run=_in_thread,
        wait_out=wait_out,
        retry_pause=retry_pause,
        ready=ready,
    )


def scorer_datadir(replica: str = "") -> Path:
    """Faust's data directory: under WSI_HOME (writable in containers), never the working directory.

    One per local member (``replica``, e.g. ``mil-scorer-2``). Created here with its parents: Faust
    itself creates only the last component.
    """
    path = wsi_home() / (replica or "mil-scorer") / "faust"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_app(settings: Settings) -> faust.App:
    configure_logging(SERVICE, settings.log_level)
    BUILD_INFO.labels(SERVICE, package_version()).set(1)
    partitions = topic(TILE_PLANS).partitions
    if topic(EMBEDDINGS).partitions != partitions:
        raise RuntimeError(
            "wsi.tiles.plans and wsi.embeddings must have equal partition counts (co-partitioned join)"
        )
    app = faust.App(
        GROUP,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker_credentials=_broker_credentials(settings),
        store="memory://",
        # Faust keeps its app directory (v1/, tables) under datadir, by default "<name>-data" in the
        # working directory: in an image that is the read-only root. WSI_HOME is writable everywhere.
        datadir=str(scorer_datadir(settings.replica)),
        topic_partitions=partitions,
        topic_replication_factor=1,
        topic_allow_declare=False,  # topics come from the topic table, never from a stream processor
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=max(t.max_message_bytes for t in topic_table().values()) + 65536,
        web_enabled=False,
        broker_commit_every=1,
        broker_commit_interval=1.0,
        broker_session_timeout=max(settings.kafka_session_timeout_ms / 1000, 6.0),
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_ms / 1000,
        broker_rebalance_timeout=10.0,
        broker_max_poll_interval=settings.kafka_max_poll_interval_ms / 1000,
        stream_wait_empty=False,
    )
    handler = ScorerStream(app, settings)
    inputs = app.topic(TILE_PLANS, EMBEDDINGS, key_serializer="raw", value_serializer="raw")

    @app.agent(inputs)
    async def score(stream: Any) -> None:
        async for event in stream.events():
            raw = event.message
            EVENTS_IN.labels(SERVICE, raw.topic).inc()
            IN_FLIGHT.labels(SERVICE).set(1)
            try:
                message = Incoming(
                    raw.topic,
                    raw.partition,
                    raw.offset,
                    raw.key,
                    raw.value or b"",
                    list(raw.headers or []),
                    decode(raw.topic, raw.value),
                )
            except MalformedEvent as exc:
                message = Incoming(raw.topic, raw.partition, raw.offset, raw.key, raw.value or b"", [], None)
                await handler.policy.settle([Result.malformed(message, exc)], handler.send_all)
                IN_FLIGHT.labels(SERVICE).set(0)
                continue
            structlog.contextvars.bind_contextvars(slide_id=message.slide_id, event_id=message.event_id)
            try:
                await handler.process(message)
            finally:
                structlog.contextvars.unbind_contextvars("slide_id", "event_id")
                IN_FLIGHT.labels(SERVICE).set(0)

    lag_partitions: set[tuple[str, int]] = set()

    @app.timer(interval=settings.lag_interval_s)
    async def lag() -> None:
        """Consumer lag per owned input partition, as the other services export it (``report_lag``)."""
        nonlocal lag_partitions
        lag_partitions = await report_lag(app.consumer, SERVICE, lag_partitions)

    @app.task
    async def serve_health() -> None:
        server = HealthServer(settings.metrics_host, settings.metrics_port, lambda: handler.ready)
        port = await server.start()
        handler.set_ready(True)
        log.info(
            "service starting", settings=settings.masked(), metrics_port=port, group=GROUP, stream="faust"
        )

    return app


def run(settings: Settings) -> int:
    app = build_app(settings)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0
