"""The consumer runtime against a real broker and PostgreSQL (its own stack: no pipeline services run
here, so nothing else consumes the test messages).

Covers DESIGN.md section 2's rules: deterministic failures dead-lettered after bounded, durably
counted attempts; poison recognised from the durable count alone; malformed events dead-lettered;
infrastructure failures retried without dead-lettering; SIGTERM exits 0; health and metrics served.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from aiokafka import TopicPartition
from wsitk.shared.bus.kafka import Outgoing, make_consumer, make_producer, produce_all
from wsitk.shared.bus.runtime import Incoming, ServiceRuntime, ServiceSpec
from wsitk.shared.contracts import decode, new_meta, pb
from wsitk.shared.errors import PermanentError, TransientError
from wsitk.shared.topics import DEADLETTER, SLIDES_FAILED, TILE_PLANS, TILE_SHARDS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Any]:
    from wsitk.shared.stack import LocalStack

    with LocalStack() as info:
        yield info


def settings_for(stack: Any) -> Any:
    return stack.settings(kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=1000, max_attempts=3)


def shard_event(slide_id: str) -> pb.TileShard:
    return pb.TileShard(
        meta=new_meta(service="test", slide_id=slide_id, event_parts=["shard", slide_id]),
        tiling_run_id=f"run-{slide_id}",
        shard_id="s00000",
    )


async def publish(stack: Any, outputs: list[Outgoing]) -> None:
    producer = make_producer(settings_for(stack))
    await producer.start()
    try:
        await produce_all(producer, outputs)
    finally:
        await producer.stop()


async def read_all(stack: Any, topic: str, idle_s: float = 3.0) -> list[Any]:
    consumer = make_consumer(settings_for(stack), [], None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        records: list[Any] = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            for rs in batch.values():
                records.extend(rs)
                idle_since = time.monotonic()
        return records
    finally:
        await consumer.stop()


async def run_until(runtime: ServiceRuntime, done: Any, timeout_s: float = 90.0) -> None:
    task = asyncio.create_task(runtime.run())
    try:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, "the runtime did not get there in time"
            assert not task.done(), f"the runtime stopped: {task.exception() if task.done() else ''}"
            await asyncio.sleep(0.5)
    finally:
        runtime._stopping.set()
        try:
            await asyncio.wait_for(task, 30)
        except Exception as exc:  # noqa: BLE001 - the test's assertions decide; how the runtime ended is said
            print(f"the runtime ended with {type(exc).__name__}: {exc}")


def attempts_rows(stack: Any, group: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.database_url(), options="-c search_path=wsi") as conn:
        return conn.execute(
            'SELECT topic, "offset", attempts, last_error FROM delivery_attempts WHERE consumer_group = %s',
            (group,),
        ).fetchall()


def test_a_deterministic_failure_is_retried_a_bounded_number_of_times_then_dead_lettered(stack: Any) -> None:
    slide_id = uuid.uuid4().hex
    calls: list[int] = []

    def handler(message: Incoming) -> list[Outgoing]:
        if message.slide_id == slide_id:
            calls.append(message.attempt)
            raise PermanentError("corrupt-shard", "shard bytes are garbage")
        return []

    group = f"test-dl-{slide_id[:8]}"
    spec = ServiceSpec(name="test-service", topics=[TILE_SHARDS], handler=handler, group_id=group)

    async def scenario() -> tuple[list[Any], list[Any]]:
        await publish(stack, [Outgoing(TILE_SHARDS, f"{slide_id}/s00000", shard_event(slide_id))])
        runtime = ServiceRuntime(spec, settings_for(stack))
        letters: list[Any] = []

        def dead_lettered() -> bool:
            return len(calls) >= 3 and not attempts_rows(stack, group)

        await run_until(runtime, dead_lettered)
        letters = [
            r
            for r in await read_all(stack, DEADLETTER)
            if decode(DEADLETTER, r.value).meta.slide_id == slide_id
        ]
        failed = [
            r
            for r in await read_all(stack, SLIDES_FAILED)
            if decode(SLIDES_FAILED, r.value).meta.slide_id == slide_id
        ]
        return letters, failed

    letters, failed = asyncio.run(scenario())
    assert calls == [1, 2, 3]
    assert len(letters) == 1
    letter = decode(DEADLETTER, letters[0].value)
    assert letter.attempts == 3 and letter.error_type == "corrupt-shard"
    assert "shard bytes are garbage" in letter.error
    assert decode(TILE_SHARDS, letter.original_value).meta.slide_id == slide_id  # the payload, replayable
    assert len(failed) == 1
    event = decode(SLIDES_FAILED, failed[0].value)
    assert event.reason_code == "dead-lettered" and "wsi redrive" in event.reason


def test_messages_are_handled_after_a_slow_on_start_on_the_same_handler_thread(stack: Any) -> None:
    """``on_start`` (the tiler's and ingest's warm-up) is waited for with the partitions paused, as a
    handler call is; they must be resumed afterwards, or the service would never consume."""
    import threading

    slide_id = uuid.uuid4().hex
    threads: dict[str, int] = {}

    def warm_up() -> None:
        threads["on_start"] = threading.get_ident()
        time.sleep(2.0)

    def handler(message: Incoming) -> list[Outgoing]:
        if message.slide_id == slide_id:
            threads["handler"] = threading.get_ident()
        return []

    group = f"test-start-{slide_id[:8]}"
    spec = ServiceSpec(
        name="test-service", topics=[TILE_SHARDS], handler=handler, group_id=group, on_start=warm_up
    )

    async def scenario() -> None:
        await publish(stack, [Outgoing(TILE_SHARDS, f"{slide_id}/s00000", shard_event(slide_id))])
        await run_until(ServiceRuntime(spec, settings_for(stack)), lambda: "handler" in threads, 60.0)

    asyncio.run(scenario())
    assert threads["handler"] == threads["on_start"] != threading.get_ident()


def test_poison_is_recognised_from_the_durable_count_without_handling_it_again(stack: Any) -> None:
    """A message whose handling killed the process 3 times (count in PostgreSQL) is not handled a 4th time."""
    slide_id = uuid.uuid4().hex
    group = f"test-poison-{slide_id[:8]}"
    handled: list[str] = []

    async def scenario() -> list[Any]:
        await publish(
            stack,
            [
                Outgoing(
                    TILE_PLANS,
                    slide_id,
                    pb.TilePlan(
                        meta=new_meta(service="test", slide_id=slide_id, event_parts=["plan"]),
                        tiling_run_id="r",
                    ),
                )
            ],
        )
        records = [
            r
            for r in await read_all(stack, TILE_PLANS)
            if decode(TILE_PLANS, r.value).meta.slide_id == slide_id
        ]
        (record,) = records
        with psycopg.connect(stack.database_url(), options="-c search_path=wsi") as conn:
            conn.execute(
                'INSERT INTO delivery_attempts (consumer_group, topic, partition, "offset", attempts) '
                "VALUES (%s, %s, %s, %s, 3)",
                (group, TILE_PLANS, record.partition, record.offset),
            )

        def handler(message: Incoming) -> list[Outgoing]:
            handled.append(message.slide_id)
            return []

        spec = ServiceSpec(name="test-service", topics=[TILE_PLANS], handler=handler, group_id=group)
        runtime = ServiceRuntime(spec, settings_for(stack))

        async def letters() -> list[Any]:
            return [
                r
                for r in await read_all(stack, DEADLETTER, idle_s=1.0)
                if decode(DEADLETTER, r.value).meta.slide_id == slide_id
            ]

        found: list[Any] = []
        task = asyncio.create_task(runtime.run())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not found:
            await asyncio.sleep(2)
            found.extend(await letters())
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)
        return found

    found = asyncio.run(scenario())
    assert slide_id not in handled
    assert len(found) == 1
    letter = decode(DEADLETTER, found[0].value)
    assert letter.error_type == "poison-message" and letter.attempts == 4


def test_a_malformed_event_is_dead_lettered_at_once_with_its_bytes(stack: Any) -> None:
    key = f"garbage-{uuid.uuid4().hex[:8]}"
    group = f"test-malformed-{key}"
    spec = ServiceSpec(name="test-service", topics=[TILE_SHARDS], handler=lambda m: [], group_id=group)

    async def scenario() -> list[Any]:
        await publish(stack, [Outgoing(TILE_SHARDS, key, raw=b"\x08\x96\x01 not a shard")])
        runtime = ServiceRuntime(spec, settings_for(stack))
        found: list[Any] = []
        task = asyncio.create_task(runtime.run())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not found:
            await asyncio.sleep(2)
            found = [r for r in await read_all(stack, DEADLETTER, idle_s=1.0) if r.key == key.encode()]
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)
        return found

    found = asyncio.run(scenario())
    assert len(found) == 1
    letter = decode(DEADLETTER, found[0].value)
    assert letter.original_value == b"\x08\x96\x01 not a shard"
    assert letter.attempts == 1 and "TileShard" in letter.error


def test_infrastructure_failures_are_retried_until_they_pass_and_never_dead_lettered(stack: Any) -> None:
    slide_id = uuid.uuid4().hex
    group = f"test-infra-{slide_id[:8]}"
    failures = {"left": 3}
    readiness: list[bool] = []
    runtime_box: dict[str, ServiceRuntime] = {}

    def handler(message: Incoming) -> list[Outgoing]:
        if message.slide_id != slide_id:
            return []
        readiness.append(runtime_box["rt"].ready())
        if failures["left"]:
            failures["left"] -= 1
            raise TransientError("object store unreachable (simulated outage)")
        failed = pb.SlideFailed(
            meta=new_meta(service="test", slide_id=slide_id, event_parts=["ok"]), reason_code="probe"
        )
        return [Outgoing(SLIDES_FAILED, slide_id, failed)]

    spec = ServiceSpec(name="test-service", topics=[TILE_SHARDS], handler=handler, group_id=group)

    async def scenario() -> tuple[list[Any], list[Any]]:
        await publish(stack, [Outgoing(TILE_SHARDS, f"{slide_id}/s00000", shard_event(slide_id))])
        runtime = ServiceRuntime(spec, settings_for(stack))
        runtime_box["rt"] = runtime
        await run_until(runtime, lambda: failures["left"] == 0 and len(readiness) >= 4)
        outputs = [
            r
            for r in await read_all(stack, SLIDES_FAILED)
            if decode(SLIDES_FAILED, r.value).meta.slide_id == slide_id
        ]
        letters = [
            r
            for r in await read_all(stack, DEADLETTER)
            if decode(DEADLETTER, r.value).meta.slide_id == slide_id
        ]
        return outputs, letters

    outputs, letters = asyncio.run(scenario())
    assert len(outputs) == 1 and decode(SLIDES_FAILED, outputs[0].value).reason_code == "probe"
    assert letters == []
    assert readiness[0] is True and False in readiness[1:]  # not ready while the outage lasted


def test_readiness_follows_postgresql_even_with_no_messages_to_handle(stack: Any) -> None:
    """An idle service (nothing on its topics) still says not-ready while PostgreSQL does not answer,
    and ready again once it does: the probe runs on its own connection, not on the handlers' work."""
    from wsitk.shared.db.connection import Database
    from wsitk.shared.stack.procs import free_port

    group = f"test-probe-{uuid.uuid4().hex[:8]}"
    spec = ServiceSpec(name="test-service", topics=[TILE_SHARDS], handler=lambda m: [], group_id=group)
    settings = stack.settings(
        kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=1000, probe_interval_s=0.3
    )
    runtime = ServiceRuntime(spec, settings)
    reachable_db = runtime._probe_db
    phases: dict[str, list[bool]] = {"up": [], "down": [], "back": []}

    def step() -> bool:
        ready = runtime.ready()
        if not phases["up"] or not phases["up"][-1]:
            phases["up"].append(ready)
            if ready:  # polling and PostgreSQL answers; now it "goes away": the probe dials a dead port
                runtime._probe_db = Database(
                    f"postgresql://x:y@127.0.0.1:{free_port()}/wsi", connect_timeout_s=1
                )
            return False
        if not phases["down"] or phases["down"][-1]:
            phases["down"].append(ready)
            if not ready:
                runtime._probe_db.close()
                runtime._probe_db = reachable_db  # PostgreSQL is back
            return False
        phases["back"].append(ready)
        return ready

    asyncio.run(run_until(runtime, step, timeout_s=60))
    assert phases["up"][-1] is True
    assert phases["down"][-1] is False  # an idle service noticed the database was gone
    assert phases["back"][-1] is True


def test_a_service_process_serves_health_and_metrics_and_exits_0_on_sigterm(
    stack: Any, tmp_path: Any
) -> None:
    env = {**os.environ, **stack.env(), "WSI_HOME": str(tmp_path), "WSI_METRICS_PORT": "0"}
    log_path = tmp_path / "recorder.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "wsitk.shared.cli", "run", "recorder"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            time.sleep(0.5)
            for line in log_path.read_text().splitlines():
                if '"service starting"' in line:
                    port = int(json.loads(line)["metrics_port"])
        assert port, log_path.read_text()
        ready = False
        while not ready and time.monotonic() < deadline:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert ready, log_path.read_text()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        assert 'wsi_ready{service="recorder"} 1.0' in metrics
        assert "wsi_build_info" in metrics
        first_line = log_path.read_text().splitlines()[0]
        assert stack.app_password not in log_path.read_text()  # secrets masked in the config line
        assert '"service": "recorder"' in first_line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
