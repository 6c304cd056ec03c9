"""The delivery rules, once, without Kafka: ``DeliveryPolicy`` over the in-memory broker.

The same policy runs in the aiokafka runtime and in the scorer's Faust stream; the end-to-end tests
(tests/e2e/test_runtime.py, tests/e2e/test_outages.py, tests/e2e/test_scorer_delivery.py) check that on the real
broker and database. Here every rule is checked in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs
from wsitk.services.mil_scorer.stream import scorer_policy
from wsitk.shared.bus.delivery import DeliveryPolicy, HandBack, Incoming, call_each
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.bus.memory import MemoryBroker, MemoryLedger, MemoryRunner
from wsitk.shared.bus.runtime import ServiceSpec
from wsitk.shared.config import Settings
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.errors import PermanentError, TransientError
from wsitk.shared.topics import DEADLETTER, SLIDES_FAILED, SLIDES_INGESTED, TILE_PLANS


def _ingested(slide: str) -> Outgoing:
    event = pb.SlideIngested(meta=new_meta(service="ingest", slide_id=slide, event_parts=["ingested", slide]))
    return Outgoing(SLIDES_INGESTED, slide, event)


def _plan_for(message: Incoming) -> list[Outgoing]:
    slide = message.slide_id
    return [
        Outgoing(
            TILE_PLANS, slide, pb.TilePlan(meta=new_meta(service="t", slide_id=slide, event_parts=[slide]))
        )
    ]


def _spec(handler: Callable[[Incoming], list[Outgoing]], **extra: object) -> ServiceSpec:
    return ServiceSpec(name="t", topics=[SLIDES_INGESTED], handler=handler, batch_size=4, **extra)


def _failing(
    times: int, error: Callable[[], BaseException]
) -> tuple[Callable[[Incoming], list[Outgoing]], list[str]]:
    calls: list[str] = []

    def handler(message: Incoming) -> list[Outgoing]:
        calls.append(message.slide_id)
        if calls.count(message.slide_id) <= times:
            raise error()
        return _plan_for(message)

    return handler, calls


def test_outputs_are_produced_once_and_offsets_committed() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested(f"s{i}") for i in range(6)])
    runner = MemoryRunner(_spec(_plan_for), broker)
    runner.drain()
    assert [e.meta.slide_id for e in broker.events(TILE_PLANS)] == [f"s{i}" for i in range(6)]
    assert broker.lag(runner.group, SLIDES_INGESTED) == 0
    assert runner.ledger.counts == {}, "attempt counts are cleared once outputs are out"
    runner.drain()
    assert len(broker.records(TILE_PLANS)) == 6, "a committed event is not handled again"


def test_infrastructure_failures_are_retried_without_limit_and_never_counted() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("blip")])
    handler, calls = _failing(10, lambda: TransientError("S3 unreachable"))
    runner = MemoryRunner(_spec(handler), broker, max_attempts=3)
    runner.drain()
    assert len(calls) == 11
    assert len(runner.waits) == 10 and all(what == "handler" for what, _ in runner.waits)
    assert broker.records(DEADLETTER) == [] and broker.records(SLIDES_FAILED) == []
    assert len(broker.records(TILE_PLANS)) == 1


def test_a_deterministic_failure_is_retried_to_the_limit_then_dead_lettered_with_its_bytes() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("bad"), _ingested("good")])
    handler, calls = _failing(99, lambda: ValueError("cannot parse"))

    def only_bad_fails(message: Incoming) -> list[Outgoing]:
        return _plan_for(message) if message.slide_id == "good" else handler(message)

    runner = MemoryRunner(_spec(only_bad_fails), broker, max_attempts=3)
    runner.drain()
    assert calls == ["bad"] * 3
    (letter,) = broker.events(DEADLETTER)
    assert letter.attempts == 3 and "cannot parse" in letter.error
    assert letter.original_value == broker.records(SLIDES_INGESTED)[0].value
    (failed,) = broker.events(SLIDES_FAILED)
    assert failed.meta.slide_id == "bad" and "wsi redrive" in failed.reason
    assert [e.meta.slide_id for e in broker.events(TILE_PLANS)] == ["good"]
    assert broker.lag(runner.group, SLIDES_INGESTED) == 0


def test_poison_is_recognised_from_the_durable_count_without_handling_it_again() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("killer")])
    ledger = MemoryLedger()
    ledger.counts[(SLIDES_INGESTED, 0, 0)] = 3  # it crashed the process three times already
    handler, calls = _failing(0, lambda: ValueError("never"))
    MemoryRunner(_spec(handler), broker, max_attempts=3, ledger=ledger).drain()
    assert calls == []
    (letter,) = broker.events(DEADLETTER)
    assert letter.error_type == "poison-message"


def test_a_malformed_event_is_dead_lettered_at_once_with_its_bytes() -> None:
    broker = MemoryBroker()
    broker.append(SLIDES_INGESTED, b"k", b"\xff\x00 not protobuf")
    handler, calls = _failing(0, lambda: ValueError("never"))
    MemoryRunner(_spec(handler), broker).drain()
    assert calls == []
    (letter,) = broker.events(DEADLETTER)
    assert letter.original_value == b"\xff\x00 not protobuf"
    assert broker.records(SLIDES_FAILED) == [], "no slide is known for bytes that do not decode"


def test_a_failing_dead_letter_hook_is_logged_and_the_dead_letter_still_goes_out() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("bad")])
    handler, _ = _failing(99, lambda: ValueError("broken"))

    def hook(_message: Incoming, _error: BaseException) -> list[Outgoing]:
        raise RuntimeError("hook exploded")

    with capture_logs() as logs:
        MemoryRunner(_spec(handler, on_dead_letter=hook), broker, max_attempts=1).drain()
    assert len(broker.records(DEADLETTER)) == 1
    assert any("hook exploded" in str(entry.get("error")) for entry in logs)


def test_a_ledger_outage_while_taking_back_an_attempt_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("blip")])
    ledger = MemoryLedger()
    state = {"calls": 0}

    def handler(message: Incoming) -> list[Outgoing]:
        state["calls"] += 1
        if state["calls"] == 1:
            ledger.writes_fail = TransientError("database restarting")
            raise TransientError("S3 unreachable")
        ledger.writes_fail = None
        return _plan_for(message)

    with capture_logs() as logs:
        MemoryRunner(_spec(handler), broker, ledger=ledger).drain()
    assert len(broker.records(TILE_PLANS)) == 1 and broker.records(DEADLETTER) == []
    assert any(entry["event"] == "attempt ledger write failed" for entry in logs)


def test_an_output_over_the_size_limit_is_a_permanent_error_not_a_retry() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("huge")])

    def handler(message: Incoming) -> list[Outgoing]:
        plan = pb.TilePlan(meta=new_meta(service="t", slide_id="huge", event_parts=["x"]))
        plan.meta.producer.version = "x" * 2_000_000
        return [Outgoing(TILE_PLANS, "huge", plan)]

    with pytest.raises(PermanentError, match=r"bytes for"):
        MemoryRunner(_spec(handler), broker).drain()
    assert broker.records(TILE_PLANS) == []


def test_stopping_with_work_unfinished_hands_it_back_uncommitted() -> None:
    ledger = MemoryLedger()
    stopping = {"now": False}

    async def run(fn: Callable[..., object], *args: object) -> object:
        return fn(*args)

    async def wait_out(_what: str, _error: BaseException, _delay: float) -> None:
        stopping["now"] = True  # SIGTERM arrives while waiting out an outage

    policy = DeliveryPolicy(
        "t",
        "g",
        ledger,
        max_attempts=3,
        backoff_max_s=0,
        run=run,
        wait_out=wait_out,
        stopping=lambda: stopping["now"],
    )
    message = Incoming(SLIDES_INGESTED, 0, 7, b"s", b"", [], _ingested("s").message)

    def handler(_message: Incoming) -> list[Outgoing]:
        raise TransientError("broker gone")

    with pytest.raises(HandBack):
        asyncio.run(policy.handle([message], call_each(handler, run)))


def test_the_scorers_policy_retries_an_object_store_outage_longer_than_the_attempt_limit() -> None:
    """The drift the scorer's own copy once had: every retry of an S3 blip counted as an attempt."""
    settings = Settings(max_attempts=3, infra_backoff_max_s=0)
    ledger = MemoryLedger()
    readiness: list[bool] = []
    policy = scorer_policy(settings, ledger, readiness.append)
    message = Incoming(SLIDES_INGESTED, 0, 1, b"s", b"", [], _ingested("s").message)
    handler, calls = _failing(6, lambda: TransientError("S3 unreachable"))
    produced: list[Outgoing] = []

    async def produce(outputs: list[Outgoing]) -> None:
        produced.extend(outputs)

    async def go() -> None:
        await policy.deliver([message], call_each(handler, policy.run), produce)

    asyncio.run(asyncio.wait_for(go(), timeout=30))
    assert len(calls) == 7
    assert [o.topic for o in produced] == [TILE_PLANS], "nothing dead-lettered"
    assert False in readiness and readiness[-1] is True
    assert ledger.counts == {}


def test_an_event_of_the_wrong_contract_is_dead_lettered_at_once_not_retried() -> None:
    broker = MemoryBroker()
    broker.publish([_ingested("s")])
    calls: list[str] = []

    def handler(message: Incoming) -> list[Outgoing]:
        calls.append(message.slide_id)
        message.event_as(pb.TileShard)  # this handler consumes shards; the topic carried a SlideIngested
        return []

    MemoryRunner(_spec(handler), broker, max_attempts=3).drain()
    assert calls == ["s"]
    (letter,) = broker.events(DEADLETTER)
    assert "consumes TileShard" in letter.error and letter.attempts == 1


def test_a_bug_raised_while_handling_an_outage_is_not_mistaken_for_the_outage() -> None:
    from wsitk.shared.errors import is_transient

    def bug_during_outage() -> None:
        try:
            raise ConnectionError("S3 unreachable")
        except ConnectionError:
            topics: dict[str, int] = {}
            topics["missing-topic"]  # a programming error in the except block

    def wrapped_outage() -> None:
        try:
            raise ConnectionError("S3 unreachable")
        except ConnectionError as exc:
            raise RuntimeError("fetch failed") from exc

    for fn, transient in ((bug_during_outage, False), (wrapped_outage, True)):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the exception under test
            assert is_transient(exc) is transient, fn.__name__

    broker = MemoryBroker()
    broker.publish([_ingested("s")])

    def handler(_message: Incoming) -> list[Outgoing]:
        bug_during_outage()
        return []

    runner = MemoryRunner(_spec(handler), broker, max_attempts=2)
    runner.drain()
    assert len(broker.records(DEADLETTER)) == 1 and runner.waits == []
