"""The consumer runtime: one aiokafka loop that every service but the scorer runs around its handler.

A service is a ``ServiceSpec``: a name, the topics it consumes, and a handler that turns one
decoded event into the events it produces. The delivery rules (attempt ledger, retries, dead
letters) are ``delivery.DeliveryPolicy``'s, shared with the scorer's Faust stream; this module is
the Kafka side of DESIGN.md section 2:

- batches from ``getmany``; a new group starts at the earliest offset;
- the handler runs in a worker thread while the assigned partitions are *paused* and the loop
  keeps polling, so heartbeats flow and the poll interval is never exceeded however long a slide
  takes;
- outputs are produced with ``acks=all`` and awaited; only then is the offset committed
  (at-least-once; the handlers' effects are idempotent);
- while the policy waits out an infrastructure failure the partitions stay paused, polling goes on
  and readiness is reported false;
- SIGTERM finishes (or, past a bound, hands back) the batch in hand, commits, leaves the group and
  exits 0;
- ``/metrics``, ``/healthz``, ``/readyz``, and JSON logs with slide id and event id on every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from wsitk.shared.bus.delivery import (
    AttemptLedger,
    DeadLetterHook,
    DeliveryPolicy,
    HandBack,
    Handler,
    Incoming,
    Outcome,
    Result,
    call_batch,
    call_each,
    dead_letter_outputs,
    decode_message,
)
from wsitk.shared.bus.kafka import Outgoing, make_consumer, make_producer, produce_all, report_lag
from wsitk.shared.config import Settings
from wsitk.shared.contracts import MalformedEvent, package_version
from wsitk.shared.db.connection import Database
from wsitk.shared.errors import TransientError, is_transient
from wsitk.shared.heap import release_free_memory
from wsitk.shared.logging import configure_logging, get_logger
from wsitk.shared.metrics import (
    BATCH_SIZE,
    BUILD_INFO,
    ERRORS,
    EVENTS_IN,
    EVENTS_OUT,
    HANDLE_SECONDS,
    IN_FLIGHT,
    READY,
    HealthServer,
)

__all__ = [
    "AttemptLedger",
    "BatchHandler",
    "DeadLetterHook",
    "Handler",
    "Incoming",
    "PeriodicTask",
    "Produce",
    "ServiceRuntime",
    "ServiceSpec",
    "dead_letter_outputs",
    "run_service",
]

log = get_logger()


BatchHandler = Callable[[list[Incoming]], list[Outcome]]
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


def decode_record(record: ConsumerRecord) -> Incoming:
    """Decode a Kafka record per the topic table; raises MalformedEvent if it is not its contract."""
    return decode_message(
        record.topic, record.partition, record.offset, record.key, record.value, record.headers
    )


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
        # PostgreSQL probed on its own connection, so readiness follows the database even with no work
        self._probe_db = Database(settings.dsn(), connect_timeout_s=3)
        self._db_reachable = True
        self._buffer: list[ConsumerRecord] = []
        self._health: HealthServer | None = None
        self._worker = HandlerThread(spec.name)
        self.policy = DeliveryPolicy(
            spec.name,
            self.group,
            self.ledger,
            max_attempts=self.max_attempts,
            backoff_max_s=settings.infra_backoff_max_s,
            run=self._in_worker,
            wait_out=self._infra_pause,
            retry_pause=self._infra_pause_short,
            ready=self._set_ready,
            stopping=self._stopping.is_set,
            on_dead_letter=spec.on_dead_letter,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self._ready and self._db_reachable and not self._stopping.is_set()

    def _set_ready(self, value: bool) -> None:
        self._ready = value
        READY.labels(self.spec.name).set(1 if self.ready() else 0)

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
            tasks = [asyncio.create_task(self._lag_reporter()), asyncio.create_task(self._database_probe())]
            tasks += [
                asyncio.create_task(self._periodic(interval, fn)) for interval, fn in self.spec.periodic
            ]
            if self.spec.on_start is not None:
                await self.policy.retry_infra("on_start", self.spec.on_start)
                self._resume_all()  # waiting for it kept the group membership by pausing the partitions
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
                try:
                    await client.stop()
                except Exception as exc:  # noqa: BLE001 - closing a broken client; a new one follows
                    log.debug("closing a Kafka client failed", error=f"{type(exc).__name__}: {exc}")
        self.consumer = None
        self.producer = None

    async def _shutdown(self) -> None:
        self._set_ready(False)
        await self._close_clients()
        if self._health is not None:
            await self._health.stop()
        self.db.close()
        self._probe_db.close()
        self._worker.close()

    # -- the loop --------------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            if self._buffer:
                records, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size :]
            else:
                try:
                    fetched = await self.consumer.getmany(timeout_ms=1000, max_records=self.batch_size)
                except Exception as exc:  # noqa: BLE001 - the consume loop must survive; logged and retried
                    await self._infra_pause("poll", exc)
                    self._resume_all()  # the pause polled paused partitions, as during a handler call
                    continue
                records = [r for batch in fetched.values() for r in batch]
                self._set_ready(True)
            if not records:
                continue
            BATCH_SIZE.labels(self.spec.name).observe(len(records))
            await self._process_batch(records)

    def _resume_all(self) -> None:
        """Resume every assigned partition: ``_keepalive_until`` pauses them while it waits, and only a
        batch (``_process_batch``) resumes them by itself."""
        if self.consumer is not None:
            self.consumer.resume(*self.consumer.assignment())

    async def _keepalive_until(self, task: asyncio.Future[Any]) -> Any:
        """Wait for a worker while polling paused partitions, so the group keeps us as a member."""
        assert self.consumer is not None
        while not task.done():
            paused = self.consumer.assignment() - self.consumer.paused()
            if paused:
                self.consumer.pause(*paused)  # newly assigned partitions after a rebalance
            try:
                extra = await self.consumer.getmany(timeout_ms=KEEPALIVE_POLL_MS)
                self._buffer.extend(r for batch in extra.values() for r in batch)
            except Exception as exc:  # noqa: BLE001 - the worker result matters more; polling resumes next round
                log.debug("keepalive poll failed", error=str(exc))
            if not task.done():
                # wake as soon as the worker is done, not at the end of a poll: a 500 ms poll here added
                # up to half a second to every message (measured: quality-filter busy 23.6 s for 13.6 s
                # of CPU on one slide)
                await asyncio.wait({task}, timeout=KEEPALIVE_WAIT_S)
            if self._stopping.is_set() and not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout=self.spec.shutdown_grace_s)
                if not task.done():
                    log.error("shutdown grace exceeded; handing the batch back uncommitted")
                    os._exit(0)
        return task.result()

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        task = asyncio.ensure_future(self._worker.submit(fn, *args))
        return await self._keepalive_until(task)

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
            malformed, decoded = self._decode_all(records)
            results = malformed + await self.policy.handle(decoded, self._call_handler)
            await self.policy.settle(results, self._produce)
            await pause_before_commit(self.spec.name)
            await self._commit([r.message for r in results])
        finally:
            IN_FLIGHT.labels(self.spec.name).set(0)
            if self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())

    def _decode_all(self, records: list[ConsumerRecord]) -> tuple[list[Result], list[Incoming]]:
        malformed: list[Result] = []
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
                malformed.append(Result.malformed(raw, exc))
        return malformed, decoded

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

    async def _call_handler(self, messages: list[Incoming]) -> list[Outcome]:
        spec = self.spec
        started = time.perf_counter()
        if spec.batch_handler is not None:
            outcomes = await call_batch(spec.batch_handler, self._in_worker)(messages)
        else:
            assert spec.handler is not None
            emit = self._emitter(asyncio.get_running_loop())
            outcomes = await call_each(spec.handler, self._in_worker, emit)(messages)
        elapsed = time.perf_counter() - started
        for message in messages:
            HANDLE_SECONDS.labels(spec.name, message.topic).observe(elapsed / max(len(messages), 1))
        return outcomes

    async def _produce(self, outputs: list[Outgoing]) -> None:
        if self.producer is None:
            raise TransientError("producer not connected")
        await produce_all(self.producer, outputs)

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
        except Exception as exc:  # noqa: BLE001 - a rebalance took the partition: the new owner redelivers
            ERRORS.labels(self.spec.name, "commit").inc()
            log.warning("offset commit failed; the messages will be redelivered", error=str(exc))

    # -- background ------------------------------------------------------------------------------
    async def _lag_reporter(self) -> None:
        reported: set[tuple[str, int]] = set()
        while True:
            await asyncio.sleep(self.settings.lag_interval_s)
            if self.consumer is not None:
                reported = await report_lag(self.consumer, self.spec.name, reported)

    async def _database_probe(self) -> None:
        """Every ``probe_interval_s``, ``SELECT 1`` on a connection of its own: while PostgreSQL does not
        answer, ``/readyz`` says 503 even if no message needs the database (the handlers' own failures
        also turn readiness off; see ``_infra_pause``)."""
        interval = self.settings.probe_interval_s
        while True:
            try:
                reachable = await asyncio.wait_for(
                    asyncio.to_thread(self._probe_db.ping), timeout=interval + 5
                )
            except TimeoutError:
                reachable = False
            if reachable != self._db_reachable:
                if reachable:
                    log.info("PostgreSQL reachable again")
                else:
                    ERRORS.labels(self.spec.name, "infrastructure").inc()
                    log.warning("PostgreSQL unreachable; reporting not ready", retry_in_s=interval)
                self._db_reachable = reachable
                READY.labels(self.spec.name).set(1 if self.ready() else 0)
            await asyncio.sleep(interval)

    async def _periodic(self, interval: float, fn: PeriodicTask) -> None:
        """Run ``fn(produce)`` now and then every ``interval`` seconds, in a worker thread."""
        produce = self._emitter(asyncio.get_running_loop())

        while True:
            try:
                await asyncio.to_thread(fn, produce)
            except Exception as exc:  # noqa: BLE001 - a periodic task must not end the service; logged
                ERRORS.labels(self.spec.name, "periodic").inc()
                log.warning("periodic task failed", task=getattr(fn, "__name__", "?"), error=str(exc))
            await asyncio.sleep(interval)


COMMIT_PAUSE_DIR = "WSI_TEST_COMMIT_PAUSE_DIR"
#: While a worker runs, the loop polls (paused partitions: this keeps the group membership) for at most
#: KEEPALIVE_POLL_MS, then waits for the worker for at most KEEPALIVE_WAIT_S, and again.
KEEPALIVE_POLL_MS = 20
KEEPALIVE_WAIT_S = 0.5


class HandlerThread:
    """The one thread that makes a service's handler calls and ledger writes, in turn.

    They are awaited one at a time anyway; what one thread buys is one malloc arena. On asyncio's default
    pool each call lands on whichever of its threads is idle (the database probe and periodic tasks use
    the pool too), each thread allocates from an arena of its own, and the free top of a thread's arena
    stayed resident even after ``malloc_trim`` (glibc shrinks a thread's heap on a free that leaves more
    than ``M_TRIM_THRESHOLD`` there, set high in ``shared/heap.py``): every thread a message ever ran on
    kept that message's working set (quality-filter: two arenas of 30-35 MiB on a 30,000 px slide, one on
    a small one; ``tests/unit/test_heap.py``; docs/throughput.md, memory as slides grow). Each call sees the
    submitting task's context (structlog's bound slide and event), as with ``asyncio.to_thread``, and its
    freed memory goes back to the OS afterwards (``_then_release``).
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-handler")

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        call = functools.partial(contextvars.copy_context().run, _then_release, fn, *args)
        return asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _then_release(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, then what it freed goes back to the OS (``shared/heap.py``): each message (or a
    batch handler's batch) may run on another of the pool's threads, each with its own malloc arena, and
    an arena would otherwise keep one message's working set until the next message that lands on it."""
    try:
        return fn(*args)
    finally:
        release_free_memory()


async def pause_before_commit(service: str) -> None:
    """A test hook for the crash harness (``tests/chaos.py``), inert unless ``WSI_TEST_COMMIT_PAUSE_DIR``
    is set and ``<dir>/<service>.arm`` exists: then, with the batch's outputs acknowledged and its
    offsets not yet committed, it writes ``<dir>/<service>.paused`` (the pid) and waits until the arm
    file is gone (30 s at most), so that a SIGKILL lands exactly in that window."""
    folder = os.environ.get(COMMIT_PAUSE_DIR)
    if folder:
        await asyncio.to_thread(_hold_if_armed, folder, service)


def _hold_if_armed(folder: str, service: str) -> None:
    arm, marker = os.path.join(folder, f"{service}.arm"), os.path.join(folder, f"{service}.paused")
    if not os.path.exists(arm):
        return
    with open(marker, "w") as handle:
        handle.write(str(os.getpid()))
    until = time.monotonic() + 30
    while os.path.exists(arm) and time.monotonic() < until:
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.remove(marker)


def run_service(spec: ServiceSpec, settings: Settings) -> int:
    """Entry point of every service process."""
    runtime = ServiceRuntime(spec, settings)
    try:
        return asyncio.run(runtime.run())
    except HandBack:
        return 0
    except TransientError as exc:
        log.error("giving up on start", error=str(exc))
        return 1
