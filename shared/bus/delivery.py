"""The delivery policy: what happens to a consumed message, whatever carries it.

One place for the rules of DESIGN.md section 2, used by the aiokafka runtime (``runtime.py``), by the
mil-scorer's Faust stream (``services/mil_scorer/stream.py``) and by the in-memory broker the unit
tests drive (``memory.py``):

- attempts are counted durably (``AttemptLedger``) *before* the handler runs, so a message that kills
  the process is recognised as poison after the restart, without being handled again;
- an infrastructure failure (``errors.is_transient``) is not the message's fault: its attempt is taken
  back, it is retried without limit with capped exponential backoff, and nothing is dead-lettered;
- a deterministic failure is retried up to ``max_attempts`` (each retry counted durably) and then
  dead-lettered with the error and the original bytes, plus the public ``SlideFailed``;
- a malformed event is dead-lettered at once;
- outputs are produced (and acknowledged) before the attempt count is cleared; committing the offset
  is the transport's business and comes after ``settle``.

The transport supplies three things: how to run blocking work (a worker thread that keeps the
consumer's membership alive), how to wait out an infrastructure failure (and report readiness), and
whether it is stopping.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from google.protobuf.message import Message
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.contracts import MalformedEvent, decode, new_meta, pb
from wsitk.shared.db.connection import Database
from wsitk.shared.errors import PermanentError, is_transient, scrub_local_paths
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import DEAD_LETTERS, ERRORS, EVENTS_OUT, REDELIVERIES
from wsitk.shared.topics import DEADLETTER, SLIDES_FAILED, topic

log = get_logger()

E = TypeVar("E", bound=Message)


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

    def event_as(self, kind: type[E]) -> E:
        """The decoded event as the type the handler consumes; anything else is a ``MalformedEvent``.

        The runtime decodes by the topic table, so a mismatch means a topic carries the wrong contract:
        dead-lettered at once, never an ``AssertionError`` counted as a crash.
        """
        if not isinstance(self.event, kind):
            got = type(self.event).__name__ if self.event is not None else "no wsi.v1 event"
            raise MalformedEvent(f"{self.topic} delivered {got}; this handler consumes {kind.__name__}")
        return self.event

    @property
    def position(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)

    @property
    def slide_id(self) -> str:
        meta = getattr(self.event, "meta", None)
        return str(meta.slide_id) if meta is not None else ""

    @property
    def event_id(self) -> str:
        meta = getattr(self.event, "meta", None)
        if meta is not None:
            return str(meta.event_id)
        return f"{self.topic}:{self.partition}:{self.offset}"


def decode_message(
    topic_name: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
) -> Incoming:
    """Decode per the topic table; raises MalformedEvent for anything that is not its contract."""
    raw = value or b""
    event = decode(topic_name, raw) if topic(topic_name).message != "minio-s3-notification" else None
    return Incoming(topic_name, partition, offset, key, raw, list(headers or []), event)


#: What handling one message gave: its outputs, or the exception it raised.
Outcome = list[Outgoing] | BaseException
Handler = Callable[[Incoming], list[Outgoing]]
DeadLetterHook = Callable[[Incoming, BaseException], list[Outgoing]]


class Ledger(Protocol):
    """Durable attempt counts per message position (``AttemptLedger``; an in-memory one in unit tests)."""

    def increment(self, messages: Sequence[Incoming]) -> dict[tuple[str, int, int], int]: ...
    def record_error(self, message: Incoming, error: str) -> None: ...
    def forget_transient(self, message: Incoming) -> None: ...
    def clear(self, messages: Sequence[Incoming]) -> None: ...


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


def dead_letter_outputs(
    service: str, group: str, message: Incoming, error: BaseException, attempts: int
) -> list[Outgoing]:
    """The dead letter itself plus the public SlideFailed outcome when the slide is known."""
    slide_id = message.slide_id or (message.key or b"").decode("utf-8", "replace").split("/")[0] or "unknown"
    key = (message.key or b"").decode("utf-8", "replace") or slide_id
    reason = scrub_local_paths(f"{type(error).__name__}: {error}")  # no local paths in (public) events
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


@dataclass
class Result:
    """Where one message ended: outputs to produce, or an error to dead-letter."""

    message: Incoming
    outputs: list[Outgoing] = field(default_factory=list)
    error: BaseException | None = None
    dead_letter: bool = False

    @classmethod
    def malformed(cls, message: Incoming, error: MalformedEvent) -> Result:
        return cls(message, error=error, dead_letter=True)


class HandBack(Exception):
    """Stopping with work unfinished: leave it uncommitted for the next owner."""


RunInWorker = Callable[..., Awaitable[Any]]
WaitOut = Callable[[str, BaseException, float], Awaitable[None]]
Produce = Callable[[list[Outgoing]], Awaitable[None]]
CallHandler = Callable[[list[Incoming]], Awaitable[list[Outcome]]]


async def _no_wait(_what: str, _error: BaseException, _delay: float) -> None:
    return None


class DeliveryPolicy:
    """The delivery rules for one consumer group, independent of the transport that carries messages.

    ``run(fn, *args)`` runs blocking work (ledger writes) and returns its result; ``wait_out(what, error,
    delay)`` waits out an infrastructure failure (the transport reports itself unready meanwhile);
    ``retry_pause`` waits between deterministic retries; ``ready(True)`` is called after every success;
    ``stopping()`` says the transport wants to stop, in which case unfinished work raises ``HandBack``.
    """

    def __init__(
        self,
        service: str,
        group: str,
        ledger: Ledger,
        *,
        max_attempts: int,
        backoff_max_s: float,
        run: RunInWorker,
        wait_out: WaitOut = _no_wait,
        retry_pause: Callable[[], Awaitable[None]] | None = None,
        ready: Callable[[bool], None] = lambda _ready: None,
        stopping: Callable[[], bool] = lambda: False,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.service = service
        self.group = group
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.backoff_max_s = backoff_max_s
        self.run = run
        self.wait_out = wait_out
        self.retry_pause = retry_pause
        self.ready = ready
        self.stopping = stopping
        self.on_dead_letter = on_dead_letter

    async def retry_infra(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` through ``run``; retry infrastructure failures forever with capped backoff."""
        delay = 0.5
        while True:
            try:
                result = await self.run(fn, *args)
                self.ready(True)
                return result
            except Exception as exc:  # classified just below; anything else re-raised
                if not is_transient(exc):
                    raise
                await self.wait_out(what, exc, delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def count(self, messages: Sequence[Incoming]) -> None:
        """Count one more attempt for each message, durably, before its handler runs."""
        if not messages:
            return
        counts = await self.retry_infra("count attempts", self.ledger.increment, list(messages))
        for message in messages:
            message.attempt = counts.get(message.position, message.attempt + 1)
            if message.attempt > 1:
                REDELIVERIES.labels(self.service).inc()

    async def handle(self, messages: list[Incoming], call: CallHandler) -> list[Result]:
        """Count, recognise poison, call the handler, retry per the rules; a ``Result`` per message."""
        await self.count(messages)
        done: list[Result] = []
        pending: list[Incoming] = []
        for message in messages:
            if message.attempt > self.max_attempts:  # poison: it failed (or killed us) too often already
                error = PermanentError(
                    "poison-message",
                    f"handling this message failed or crashed the {self.service} process "
                    f"{message.attempt - 1} times (limit {self.max_attempts})",
                )
                done.append(Result(message, error=error, dead_letter=True))
            else:
                pending.append(message)
        delay = 0.5
        while pending and not self.stopping():
            outcomes = await call(pending)
            transient: list[Incoming] = []
            again: list[Incoming] = []
            first_transient: BaseException | None = None
            for message, outcome in zip(pending, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    done.append(Result(message, outputs=outcome))
                elif is_transient(outcome):
                    first_transient = first_transient or outcome
                    transient.append(message)
                    await self._ledger_write("take back an attempt", self.ledger.forget_transient, message)
                else:
                    ERRORS.labels(self.service, "handler").inc()
                    self._log_failure(message, outcome)
                    await self._ledger_write(
                        "record the error",
                        self.ledger.record_error,
                        message,
                        f"{type(outcome).__name__}: {outcome}",
                    )
                    if message.attempt >= self.max_attempts or isinstance(outcome, MalformedEvent):
                        done.append(Result(message, error=outcome, dead_letter=True))
                    else:
                        again.append(message)
            if first_transient is not None:
                await self.wait_out("handler", first_transient, delay)
                delay = min(delay * 2, self.backoff_max_s)
            else:
                self.ready(True)  # the handler ran without an infrastructure failure
                if again and self.retry_pause is not None:
                    await self.retry_pause()
            await self.count(again)  # a deterministic retry is a new attempt, counted like the first
            pending = transient + again
        if pending:
            raise HandBack()
        return done

    def outputs(self, results: Sequence[Result]) -> list[Outgoing]:
        """Everything to produce for ``results``: their outputs, or dead letters and public outcomes."""
        outputs: list[Outgoing] = []
        for result in results:
            if not (result.dead_letter and result.error is not None):
                outputs += result.outputs
                continue
            message, error = result.message, result.error
            DEAD_LETTERS.labels(self.service, message.topic).inc()
            structlog.get_logger().error(
                "dead-lettered",
                slide_id=message.slide_id,
                event_id=message.event_id,
                topic=message.topic,
                error=str(error),
            )
            outputs += dead_letter_outputs(self.service, self.group, message, error, message.attempt)
            if self.on_dead_letter is not None:
                try:
                    outputs += self.on_dead_letter(message, error)
                except Exception as exc:  # noqa: BLE001 - the dead letter itself must still go out
                    ERRORS.labels(self.service, "dead-letter-hook").inc()
                    log.error(
                        "dead-letter hook failed; the dead letter is produced without its extra outcome",
                        slide_id=message.slide_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
        return outputs

    async def settle(self, results: Sequence[Result], produce: Produce) -> None:
        """Produce every output (acknowledged), retrying infrastructure forever, then clear the counts.

        The caller commits the offsets afterwards. A ``PermanentError`` while producing (an output over
        the topic's size limit) is raised: it is a bug in the service, not in the message.
        """
        outputs = self.outputs(results)
        delay = 0.5
        while True:
            try:
                await produce(outputs)
                break
            except PermanentError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker or network: wait and produce again
                await self.wait_out("produce", exc, delay)
                delay = min(delay * 2, self.backoff_max_s)
        for out in outputs:
            EVENTS_OUT.labels(self.service, out.topic).inc()
        await self._ledger_write("clear attempt counts", self.ledger.clear, [r.message for r in results])

    async def deliver(self, messages: list[Incoming], call: CallHandler, produce: Produce) -> list[Result]:
        """``handle`` then ``settle``: everything short of committing the offsets."""
        results = await self.handle(messages, call)
        await self.settle(results, produce)
        return results

    async def _ledger_write(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """A best-effort ledger write: a failure is logged (the database may be what is down), not raised.

        Losing one is safe: a count not taken back makes a retry count once more; a count not cleared
        is stale state for a committed offset, never read again.
        """
        try:
            await self.run(fn, *args)
        except Exception as exc:  # noqa: BLE001 - logged; see the docstring for why it is safe
            ERRORS.labels(self.service, "ledger").inc()
            log.warning("attempt ledger write failed", step=what, error=f"{type(exc).__name__}: {exc}")

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


def call_each(
    handler: Handler, run: RunInWorker, emit: Callable[[list[Outgoing]], None] | None = None
) -> CallHandler:
    """A ``CallHandler`` that runs a per-message handler on each message in turn, via ``run``."""

    async def call(messages: list[Incoming]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for message in messages:
            message.emit = emit
            try:
                outcomes.append(await run(call_one, handler, message))
            finally:
                message.emit = None
        return outcomes

    return call


def call_batch(handler: Callable[[list[Incoming]], list[Outcome]], run: RunInWorker) -> CallHandler:
    """A ``CallHandler`` for a handler that takes the whole batch (an exception fails every message)."""

    async def call(messages: list[Incoming]) -> list[Outcome]:
        try:
            outcomes: list[Outcome] = await run(handler, messages)
        except Exception as exc:  # noqa: BLE001 - the outcome of every message in the batch
            return [exc] * len(messages)
        return outcomes

    return call


def call_one(handler: Handler, message: Incoming) -> Outcome:
    """Run one handler call with the slide and event ids bound to every log line; errors are returned."""
    structlog.contextvars.bind_contextvars(slide_id=message.slide_id, event_id=message.event_id)
    try:
        return handler(message)
    except Exception as exc:  # noqa: BLE001 - an outcome the policy classifies
        return exc
    finally:
        structlog.contextvars.unbind_contextvars("slide_id", "event_id")
