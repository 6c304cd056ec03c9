"""The consumer runtime: one loop that every service runs around its handler.

A service is a ``ServiceSpec``: a name, the topics it consumes, and a handler that turns one
decoded event into the events it produces. Everything DESIGN.md section 2 asks of a consumer
lives here, once:

- batches from ``getmany``; a new group starts at the earliest offset;
- the handler runs in a worker thread while the assigned partitions are *paused* and the loop
  keeps polling, so heartbeats flow and the poll interval is never exceeded however long a slide
  takes;
- outputs are produced with ``acks=all`` and awaited; only then is the offset committed
  (at-least-once; the handlers' effects are idempotent);
- infrastructure failures (``errors.is_transient``) are retried without limit, with capped
  exponential backoff, readiness reported false, nothing counted or dead-lettered;
- deterministic failures are retried up to ``max_attempts`` and then dead-lettered with the error
  and the original payload. Attempts are counted in PostgreSQL *before* the handler runs, so a
  message that kills the process is recognised as poison after the restart;
- SIGTERM finishes (or, past a bound, hands back) the batch in hand, commits, leaves the group and
  exits 0;
- ``/metrics``, ``/healthz``, ``/readyz``, and JSON logs with slide id and event id on every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from google.protobuf.message import Message
from wsitk.shared.bus.kafka import Outgoing, make_consumer, make_producer, produce_all, report_lag
from wsitk.shared.config import Settings
from wsitk.shared.contracts import MalformedEvent, decode, new_meta, package_version, pb
from wsitk.shared.db.connection import Database
from wsitk.shared.errors import PermanentError, TransientError, is_transient
from wsitk.shared.logging import configure_logging, get_logger
from wsitk.shared.metrics import (
    BATCH_SIZE,
    BUILD_INFO,
    DEAD_LETTERS,
    ERRORS,
    EVENTS_IN,
    EVENTS_OUT,
    HANDLE_SECONDS,
    IN_FLIGHT,
    READY,
    REDELIVERIES,
    HealthServer,
)
from wsitk.shared.topics import DEADLETTER, SLIDES_FAILED, topic

log = get_logger()


@dataclass
class Incoming:
    """One consumed message, decoded. ``event`` is None on topics that do not carry wsi.v1 messages."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]]
    event: Message | None
    attempt: int = 1
    #: Set by the runtime while the handler runs: produce some outputs now, before the handler returns
    #: (waits for the broker's acknowledgement). For long handlers whose outputs can start the next stage
    #: early (the tiler's plan and each shard as it is stored). Outputs are deterministic, so a retry of
    #: the message producing them again is absorbed downstream like any redelivery. None outside a runtime.
    emit: Callable[[list[Outgoing]], None] | None = field(default=None, repr=False, compare=False)

    def publish_now(self, outputs: list[Outgoing]) -> bool:
        """Produce ``outputs`` now when the runtime allows it (True); False: return them from the handler."""
        if self.emit is None:
            return False
        self.emit(outputs)
        return True

    @property
    def slide_id(self) -> str:
        if self.event is not None:
            return str(self.event.meta.slide_id)  # type: ignore[attr-defined]
        return ""

    @property
    def event_id(self) -> str:
        if self.event is not None:
            return str(self.event.meta.event_id)  # type: ignore[attr-defined]
        return f"{self.topic}:{self.partition}:{self.offset}"


Handler = Callable[[Incoming], list[Outgoing]]
BatchHandler = Callable[[list[Incoming]], list["list[Outgoing] | BaseException"]]
DeadLetterHook = Callable[[Incoming, BaseException], list[Outgoing]]
Produce = Callable[[list[Outgoing]], None]
PeriodicTask = Callable[[Produce], None]


@dataclass
class ServiceSpec:
    """What a service is: its name, its inputs and its handler. The runtime does the rest."""

    name: str
    topics: Sequence[str]
    handler: Handler | None = None
    batch_handler: BatchHandler | None = None  # handles a whole batch at once (recorder, embedder)
    batch_size: int | None = None
    max_attempts: int | None = None
    on_dead_letter: DeadLetterHook | None = None  # extra public outcome beyond the default SlideFailed
    on_start: Callable[[], None] | None = None  # runs once, in a thread, after the consumer joined
    periodic: Sequence[tuple[float, PeriodicTask]] = field(default_factory=list)  # (interval_s, task)
    group_id: str | None = None
    shutdown_grace_s: float = 60.0


@dataclass
class _Result:
    message: Incoming
    outputs: list[Outgoing] = field(default_factory=list)
    error: BaseException | None = None
    dead_letter: bool = False


class AttemptLedger:
    """Durable attempt counts per (group, topic, partition, offset), in PostgreSQL."""

    def __init__(self, db: Database, group: str) -> None:
        self.db = db
        self.group = group

    def increment(self, messages: Sequence[Incoming]) -> dict[tuple[str, int, int], int]:
        if not messages:
            return {}
        rows = [(self.group, m.topic, m.partition, m.offset) for m in messages]
        out: dict[tuple[str, int, int], int] = {}
        with self.db.transaction() as conn, conn.cursor() as cur:
            for row in rows:
                cur.execute(
                    'INSERT INTO delivery_attempts (consumer_group, topic, partition, "offset", attempts) '
                    'VALUES (%s, %s, %s, %s, 1) ON CONFLICT (consumer_group, topic, partition, "offset") '
                    "DO UPDATE SET attempts = delivery_attempts.attempts + 1, updated_at = now() "
                    "RETURNING attempts",
                    row,
                )
                fetched = cur.fetchone()
                out[(row[1], row[2], row[3])] = int(fetched[0]) if fetched else 1
        return out

    def record_error(self, message: Incoming, error: str) -> None:
        self.db.execute(
            "UPDATE delivery_attempts SET last_error = %s WHERE consumer_group = %s AND topic = %s "
            'AND partition = %s AND "offset" = %s',
            (error[:2000], self.group, message.topic, message.partition, message.offset),
        )

    def forget_transient(self, message: Incoming) -> None:
        """An infrastructure failure is not the message's fault: take its attempt back."""
        self.db.execute(
            "UPDATE delivery_attempts SET attempts = GREATEST(attempts - 1, 0) WHERE consumer_group = %s "
            'AND topic = %s AND partition = %s AND "offset" = %s',
            (self.group, message.topic, message.partition, message.offset),
        )

    def clear(self, messages: Sequence[Incoming]) -> None:
        if not messages:
            return
        with self.db.transaction() as conn, conn.cursor() as cur:
            cur.executemany(
                "DELETE FROM delivery_attempts WHERE consumer_group = %s AND topic = %s AND partition = %s "
                'AND "offset" = %s',
                [(self.group, m.topic, m.partition, m.offset) for m in messages],
            )


def decode_record(record: ConsumerRecord) -> Incoming:
    """Decode per the topic table; raises MalformedEvent for anything that is not its contract."""
    spec = topic(record.topic)
    value = record.value or b""
    event = decode(record.topic, value) if spec.message != "minio-s3-notification" else None
    return Incoming(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=value,
        headers=list(record.headers or []),
        event=event,
    )


def dead_letter_outputs(
    service: str, group: str, message: Incoming, error: BaseException, attempts: int
) -> list[Outgoing]:
    """The dead letter itself plus the public SlideFailed outcome when the slide is known."""
    slide_id = message.slide_id or (message.key or b"").decode("utf-8", "replace").split("/")[0] or "unknown"
    key = (message.key or b"").decode("utf-8", "replace") or slide_id
    reason = f"{type(error).__name__}: {error}"
    letter = pb.DeadLetter(
        meta=new_meta(
            service=service,
            slide_id=slide_id,
            event_parts=["dead-letter", message.topic, str(message.partition), str(message.offset)],
        ),
        source_topic=message.topic,
        source_partition=message.partition,
        source_offset=message.offset,
        original_key=message.key or b"",
        original_value=message.value,
        service=service,
        consumer_group=group,
        error_type=getattr(error, "code", type(error).__name__),
        error=reason[:4000],
        attempts=attempts,
    )
    outputs = [Outgoing(DEADLETTER, key, letter)]
    if message.event is not None:
        run_id = str(getattr(message.event, "tiling_run_id", ""))
        failed = pb.SlideFailed(
            meta=new_meta(
                service=service, slide_id=slide_id, event_parts=["failed", message.topic, message.event_id]
            ),
            stage=service,
            reason_code="dead-lettered",
            reason=f"{service} gave up on an event of this slide after {attempts} attempts: {reason[:500]}. "
            "Fix the cause, then `wsi redrive` replays it.",
            tiling_run_id=run_id,
        )
        outputs.append(Outgoing(SLIDES_FAILED, slide_id, failed))
    return outputs


class ServiceRuntime:
    def __init__(self, spec: ServiceSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.group = spec.group_id or f"wsi-{spec.name}"
        self.max_attempts = spec.max_attempts or settings.max_attempts
        self.batch_size = spec.batch_size or settings.batch_size
        self.db = Database(settings.dsn())
        self.ledger = AttemptLedger(self.db, self.group)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._ready = False
        self._buffer: list[ConsumerRecord] = []
        self._health: HealthServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self._ready and not self._stopping.is_set()

    def _set_ready(self, value: bool) -> None:
        self._ready = value
        READY.labels(self.spec.name).set(1 if value else 0)

    async def run(self) -> int:
        configure_logging(self.spec.name, self.settings.log_level)
        if self.settings.replica:
            structlog.contextvars.bind_contextvars(replica=self.settings.replica)
        BUILD_INFO.labels(self.spec.name, package_version()).set(1)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._health = HealthServer(self.settings.metrics_host, self.settings.metrics_port, self.ready)
        port = await self._health.start()
        log.info(
            "service starting",
            settings=self.settings.masked(),
            metrics_port=port,
            group=self.group,
            replica=self.settings.replica or self.spec.name,
        )
        try:
            await self._connect()
            tasks = [asyncio.create_task(self._lag_reporter())]
            tasks += [
                asyncio.create_task(self._periodic(interval, fn)) for interval, fn in self.spec.periodic
            ]
            if self.spec.on_start is not None:
                await self._retry_infra("on_start", self.spec.on_start)
            await self._consume_loop()
            for task in tasks:
                task.cancel()
        finally:
            await self._shutdown()
        log.info("service stopped")
        return 0

    async def _connect(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self.producer = make_producer(self.settings)
                await self.producer.start()
                self.consumer = make_consumer(self.settings, list(self.spec.topics), self.group)
                await self.consumer.start()
                return
            except Exception as exc:  # broker not there yet: wait, never crash-loop
                if not is_transient(exc) and not isinstance(exc, OSError):
                    raise
                ERRORS.labels(self.spec.name, "infrastructure").inc()
                log.warning("broker unreachable, retrying", error=str(exc), retry_in_s=delay)
                await self._close_clients()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.infra_backoff_max_s)

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = None
        self.producer = None

    async def _shutdown(self) -> None:
        self._set_ready(False)
        await self._close_clients()
        if self._health is not None:
            await self._health.stop()
        self.db.close()

    # -- the loop --------------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            if self._buffer:
                records, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size :]
            else:
                try:
                    fetched = await self.consumer.getmany(timeout_ms=1000, max_records=self.batch_size)
                except Exception as exc:
                    await self._infra_pause("poll", exc)
                    continue
                records = [r for batch in fetched.values() for r in batch]
                self._set_ready(True)
            if not records:
                continue
            BATCH_SIZE.labels(self.spec.name).observe(len(records))
            await self._process_batch(records)

    async def _keepalive_until(self, task: asyncio.Future[Any]) -> Any:
        """Wait for a worker while polling paused partitions, so the group keeps us as a member."""
        assert self.consumer is not None
        while not task.done():
            paused = self.consumer.assignment() - self.consumer.paused()
            if paused:
                self.consumer.pause(*paused)  # newly assigned partitions after a rebalance
            try:
                extra = await self.consumer.getmany(timeout_ms=500)
                self._buffer.extend(r for batch in extra.values() for r in batch)
            except Exception as exc:  # the worker result matters more; polling resumes next round
                log.debug("keepalive poll failed", error=str(exc))
                await asyncio.sleep(0.5)
            if self._stopping.is_set() and not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout=self.spec.shutdown_grace_s)
                if not task.done():
                    log.error("shutdown grace exceeded; handing the batch back uncommitted")
                    os._exit(0)
        return task.result()

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return await self._keepalive_until(task)

    async def _retry_infra(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in a worker; retry transient failures forever with backoff."""
        delay = 0.5
        while True:
            try:
                result = await self._in_worker(fn, *args)
                self._set_ready(True)
                return result
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await self._infra_pause(what, exc, delay)
                delay = min(delay * 2, self.settings.infra_backoff_max_s)

    async def _infra_pause(self, what: str, exc: BaseException, delay: float = 1.0) -> None:
        self._set_ready(False)
        ERRORS.labels(self.spec.name, "infrastructure").inc()
        log.warning(
            "infrastructure failure, retrying",
            step=what,
            error=f"{type(exc).__name__}: {exc}",
            retry_in_s=delay,
        )
        sleeper = asyncio.ensure_future(asyncio.sleep(delay))
        if self.consumer is not None:
            await self._keepalive_until(sleeper)
        else:
            await sleeper

    async def _process_batch(self, records: list[ConsumerRecord]) -> None:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        self.consumer.pause(*assigned)
        IN_FLIGHT.labels(self.spec.name).set(len(records))
        try:
            results, decoded = self._decode_all(records)
            if decoded:
                attempts = await self._retry_infra("count attempts", self.ledger.increment, decoded)
                for message in decoded:
                    message.attempt = attempts.get((message.topic, message.partition, message.offset), 1)
                    if message.attempt > 1:
                        REDELIVERIES.labels(self.spec.name).inc()
                results += await self._handle_with_retries(decoded)
            await self._finish(results)
        finally:
            IN_FLIGHT.labels(self.spec.name).set(0)
            if self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())

    def _decode_all(self, records: list[ConsumerRecord]) -> tuple[list[_Result], list[Incoming]]:
        results: list[_Result] = []
        decoded: list[Incoming] = []
        for record in records:
            EVENTS_IN.labels(self.spec.name, record.topic).inc()
            try:
                decoded.append(decode_record(record))
            except MalformedEvent as exc:
                raw = Incoming(
                    record.topic,
                    record.partition,
                    record.offset,
                    record.key,
                    record.value or b"",
                    list(record.headers or []),
                    None,
                )
                results.append(_Result(raw, error=exc, dead_letter=True))
        return results, decoded

    async def _handle_with_retries(self, messages: list[Incoming]) -> list[_Result]:
        done: list[_Result] = []
        pending = []
        for message in messages:
            if message.attempt > self.max_attempts:  # poison: it failed (or killed us) too often already
                error = PermanentError(
                    "poison-message",
                    f"handling this message failed or crashed the {self.spec.name} process "
                    f"{message.attempt - 1} times (limit {self.max_attempts})",
                )
                done.append(_Result(message, error=error, dead_letter=True))
            else:
                pending.append(message)
        delay = 0.5
        while pending and not self._stopping.is_set():
            outcomes = await self._call_handler(pending)
            failed_transient: list[Incoming] = []
            failed_again: list[Incoming] = []
            first_transient: BaseException | None = None
            for message, outcome in zip(pending, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    done.append(_Result(message, outputs=outcome))
                elif is_transient(outcome):
                    first_transient = first_transient or outcome
                    failed_transient.append(message)
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.ledger.forget_transient, message)
                else:
                    ERRORS.labels(self.spec.name, "handler").inc()
                    self._log_failure(message, outcome)
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(
                            self.ledger.record_error, message, f"{type(outcome).__name__}: {outcome}"
                        )
                    if message.attempt >= self.max_attempts or isinstance(outcome, MalformedEvent):
                        done.append(_Result(message, error=outcome, dead_letter=True))
                    else:
                        failed_again.append(message)
            if first_transient is not None:
                await self._infra_pause("handler", first_transient, delay)
                delay = min(delay * 2, self.settings.infra_backoff_max_s)
            elif failed_again:
                await self._infra_pause_short()
            if failed_again:  # a deterministic retry is a new attempt, counted durably like the first
                counts = await self._retry_infra("count attempts", self.ledger.increment, failed_again)
                for message in failed_again:
                    message.attempt = counts.get(
                        (message.topic, message.partition, message.offset), message.attempt + 1
                    )
            pending = failed_transient + failed_again
        if pending:
            raise _HandBack()
        return done

    async def _infra_pause_short(self) -> None:
        sleeper = asyncio.ensure_future(asyncio.sleep(0.5))
        await self._keepalive_until(sleeper)

    def _emitter(self, loop: asyncio.AbstractEventLoop) -> Callable[[list[Outgoing]], None]:
        """What a handler's worker thread calls to produce outputs before it returns (``Incoming.emit``)."""

        def emit(outputs: list[Outgoing]) -> None:
            if self.producer is None:
                raise TransientError("producer not connected")
            asyncio.run_coroutine_threadsafe(produce_all(self.producer, outputs), loop).result(timeout=120)
            for out in outputs:
                EVENTS_OUT.labels(self.spec.name, out.topic).inc()

        return emit

    async def _call_handler(self, messages: list[Incoming]) -> list[list[Outgoing] | BaseException]:
        spec = self.spec
        started = time.perf_counter()
        if spec.batch_handler is not None:
            try:
                outcomes = await self._in_worker(spec.batch_handler, messages)
            except Exception as exc:
                outcomes = [exc] * len(messages)
        else:
            assert spec.handler is not None
            outcomes = []
            emit = self._emitter(asyncio.get_running_loop())
            for message in messages:
                message.emit = emit
                try:
                    outcomes.append(await self._in_worker(_call_one, spec.handler, message))
                finally:
                    message.emit = None
        elapsed = time.perf_counter() - started
        for message in messages:
            HANDLE_SECONDS.labels(spec.name, message.topic).observe(elapsed / max(len(messages), 1))
        return outcomes

    def _log_failure(self, message: Incoming, error: BaseException) -> None:
        structlog.get_logger().warning(
            "handler failed",
            slide_id=message.slide_id,
            event_id=message.event_id,
            topic=message.topic,
            attempt=message.attempt,
            max_attempts=self.max_attempts,
            error=f"{type(error).__name__}: {error}",
            trace="".join(traceback.format_exception(error)[-3:])[-1500:],
        )

    async def _finish(self, results: list[_Result]) -> None:
        """Produce every output (acks=all), dead-letter what must be, then commit. Retries infra forever."""
        outputs: list[Outgoing] = []
        for result in results:
            if result.dead_letter and result.error is not None:
                DEAD_LETTERS.labels(self.spec.name, result.message.topic).inc()
                structlog.get_logger().error(
                    "dead-lettered",
                    slide_id=result.message.slide_id,
                    event_id=result.message.event_id,
                    topic=result.message.topic,
                    error=str(result.error),
                )
                outputs += dead_letter_outputs(
                    self.spec.name, self.group, result.message, result.error, result.message.attempt
                )
                if self.spec.on_dead_letter is not None:
                    with contextlib.suppress(Exception):
                        outputs += self.spec.on_dead_letter(result.message, result.error)
            else:
                outputs += result.outputs
        delay = 0.5
        while True:
            try:
                assert self.producer is not None
                await produce_all(self.producer, outputs)
                break
            except PermanentError:
                raise
            except Exception as exc:
                await self._infra_pause("produce", exc, delay)
                delay = min(delay * 2, self.settings.infra_backoff_max_s)
        for out in outputs:
            EVENTS_OUT.labels(self.spec.name, out.topic).inc()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.ledger.clear, [r.message for r in results])
        await self._commit([r.message for r in results])

    async def _commit(self, messages: list[Incoming]) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for message in messages:
            tp = TopicPartition(message.topic, message.partition)
            offsets[tp] = max(offsets.get(tp, 0), message.offset + 1)
        assigned = self.consumer.assignment()
        offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (
            Exception
        ) as exc:  # a rebalance took the partition: the new owner redelivers, effects are idempotent
            ERRORS.labels(self.spec.name, "commit").inc()
            log.warning("offset commit failed; the messages will be redelivered", error=str(exc))

    # -- background ------------------------------------------------------------------------------
    async def _lag_reporter(self) -> None:
        reported: set[tuple[str, int]] = set()
        while True:
            await asyncio.sleep(self.settings.lag_interval_s)
            if self.consumer is not None:
                reported = await report_lag(self.consumer, self.spec.name, reported)

    async def _periodic(self, interval: float, fn: PeriodicTask) -> None:
        """Run ``fn(produce)`` now and then every ``interval`` seconds, in a worker thread."""
        produce = self._emitter(asyncio.get_running_loop())

        while True:
            try:
                await asyncio.to_thread(fn, produce)
            except Exception as exc:
                ERRORS.labels(self.spec.name, "periodic").inc()
                log.warning("periodic task failed", task=getattr(fn, "__name__", "?"), error=str(exc))
            await asyncio.sleep(interval)


class _HandBack(Exception):
    """Shutting down with work unfinished: leave it uncommitted for the next owner."""


def _call_one(handler: Handler, message: Incoming) -> list[Outgoing] | BaseException:
    structlog.contextvars.bind_contextvars(slide_id=message.slide_id, event_id=message.event_id)
    try:
        return handler(message)
    except Exception as exc:
        return exc
    finally:
        structlog.contextvars.unbind_contextvars("slide_id", "event_id")


def run_service(spec: ServiceSpec, settings: Settings) -> int:
    """Entry point of every service process."""
    runtime = ServiceRuntime(spec, settings)
    try:
        return asyncio.run(runtime.run())
    except _HandBack:
        return 0
    except TransientError as exc:
        log.error("giving up on start", error=str(exc))
        return 1
