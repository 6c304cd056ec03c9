"""The embedded local stack against its real servers: Tansu (Kafka API), PostgreSQL, moto S3."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from minio import Minio
from wsitk.shared.stack import (
    LocalStack,
    StackInfo,
    add_stack_arguments,
    cli_stack,
    procs,
    stack_status,
    start_component,
    start_stack,
    stop_component,
)
from wsitk.shared.topics import DEADLETTER, topic_table


@pytest.fixture(scope="module")
def stack() -> Iterator[StackInfo]:
    with LocalStack() as info:
        yield info


def minio_client(info: StackInfo) -> Minio:
    return Minio(
        info.s3_endpoint,
        access_key=info.s3_access_key,
        secret_key=info.s3_secret_key,
        secure=False,
        region="us-east-1",
    )


def test_status_reports_every_component_alive_and_accepting(stack: StackInfo) -> None:
    status = stack_status(stack.state_dir)
    assert set(status) == {"broker", "postgres", "s3"}
    for component, entry in status.items():
        assert entry["alive"], component
        assert entry["accepting"], component
        assert entry["pid"] == stack.pids[component]
        assert entry["endpoint"] == f"{stack.host}:{stack.ports[component]}"


def test_stack_env_points_at_the_running_servers(stack: StackInfo) -> None:
    env_file = stack.state_dir / "stack.env"
    values = dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if line and not line.startswith("#")
    )
    assert values["WSI_KAFKA_BOOTSTRAP"] == stack.kafka_bootstrap
    assert values["WSI_S3_ENDPOINT"] == stack.s3_endpoint
    assert values["WSI_DATABASE_URL"] == stack.database_url()
    assert values["WSI_DATABASE_ADMIN_URL"] == stack.database_url(admin=True)
    assert env_file.stat().st_mode & 0o077 == 0, "stack.env holds passwords: owner-only"


def test_start_stack_again_reuses_the_running_servers(stack: StackInfo) -> None:
    again = start_stack(stack.state_dir)
    assert again.pids == stack.pids
    assert again.ports == stack.ports


def test_topics_exist_with_table_partitions_and_carry_messages(stack: StackInfo) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    payload = uuid.uuid4().hex.encode()

    async def round_trip() -> tuple[dict[str, int], bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            metadata = await producer.client.fetch_all_metadata()
            partitions = {name: len(metadata.partitions_for_topic(name) or ()) for name in topic_table()}
            record = await producer.send_and_wait(DEADLETTER, payload, key=b"slide-1", partition=1)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            partition = TopicPartition(DEADLETTER, 1)
            consumer.assign([partition])
            consumer.seek(partition, record.offset)
            batch = await consumer.getmany(partition, timeout_ms=10000)
        finally:
            await consumer.stop()
        return partitions, batch[partition][0].value

    partitions, received = asyncio.run(round_trip())
    assert partitions == {name: spec.partitions for name, spec in topic_table().items()}
    assert received == payload


def test_buckets_exist_and_objects_round_trip(stack: StackInfo) -> None:
    client = minio_client(stack)
    settings = stack.settings()
    assert client.bucket_exists(settings.uploads_bucket)
    assert client.bucket_exists(settings.artifacts_bucket)
    data = os.urandom(1000)
    client.put_object(settings.artifacts_bucket, "tests/stack/object.bin", io.BytesIO(data), len(data))
    assert client.get_object(settings.artifacts_bucket, "tests/stack/object.bin").read() == data


def test_app_role_reads_rows_and_cannot_create_tables(stack: StackInfo) -> None:
    with psycopg.connect(stack.database_url(), autocommit=True) as connection:
        assert connection.execute("SELECT current_user, current_database()").fetchone() == ("wsi_app", "wsi")
        applied = connection.execute("SELECT count(*) FROM wsi.schema_migrations").fetchone()
        assert applied is not None and applied[0] >= 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("CREATE TABLE wsi.not_allowed (x int)")


def test_postgres_stopped_and_restarted_on_its_port_keeps_data(stack: StackInfo) -> None:
    marker = uuid.uuid4().hex
    with psycopg.connect(stack.database_url(admin=True), autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS public.stack_test (marker text)")
        connection.execute("INSERT INTO public.stack_test VALUES (%s)", (marker,))
    assert stop_component(stack.state_dir, "postgres")
    status = stack_status(stack.state_dir)["postgres"]
    assert not status["alive"]
    assert not procs.tcp_accepts(stack.host, stack.ports["postgres"])
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(stack.database_url(), connect_timeout=2)
    start_component(stack.state_dir, "postgres")
    assert stack_status(stack.state_dir)["postgres"]["endpoint"] == f"{stack.host}:{stack.ports['postgres']}"
    with psycopg.connect(stack.database_url(admin=True)) as connection:
        rows = connection.execute("SELECT marker FROM public.stack_test").fetchall()
    assert (marker,) in rows


def test_s3_objects_survive_a_killed_server(stack: StackInfo) -> None:
    client = minio_client(stack)
    bucket = stack.settings().uploads_bucket
    big = os.urandom(11 * 1024 * 1024)  # multipart upload: its "md5-N" ETag must survive too
    written = client.put_object(
        bucket, "case 7/slide ü.svs", io.BytesIO(big), len(big), part_size=5 * 1024**2
    )
    client.put_object(bucket, "deleted.txt", io.BytesIO(b"x"), 1)
    client.remove_object(bucket, "deleted.txt")
    os.kill(stack_status(stack.state_dir)["s3"]["pid"], signal.SIGKILL)
    start_component(stack.state_dir, "s3")
    stat = client.stat_object(bucket, "case 7/slide ü.svs")
    assert stat.etag == written.etag
    assert client.get_object(bucket, "case 7/slide ü.svs").read() == big
    assert "deleted.txt" not in {entry.object_name for entry in client.list_objects(bucket, recursive=True)}


def test_restarted_broker_gets_the_topic_table_again(stack: StackInfo) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    async def topics() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    assert stop_component(stack.state_dir, "broker")
    start_component(stack.state_dir, "broker")
    assert set(topic_table()) <= asyncio.run(topics())


def test_cli_status_reports_the_running_stack(stack: StackInfo, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    assert cli_stack(parser.parse_args(["status", "--state-dir", str(stack.state_dir)])) == 0
    printed = capsys.readouterr().out
    assert f"endpoint={stack.kafka_bootstrap}" in printed
    assert "running" in printed


def test_stack_exit_leaves_no_process_and_no_state_dir() -> None:
    with LocalStack() as info:
        pids = dict(info.pids)
        assert all(procs.pid_alive(pid) for pid in pids.values())
    assert not any(procs.pid_alive(pid) for pid in pids.values()), pids
    assert not info.state_dir.exists()


def test_a_server_that_dies_at_start_reports_its_log(tmp_path: Path) -> None:
    pid = procs.spawn_detached(
        ["sh", "-c", "echo 'FATAL: data directory has wrong ownership'; exit 3"],
        log_path=tmp_path / "logs" / "x.log",
        pid_path=tmp_path / "run" / "x.pid",
    )
    with pytest.raises(RuntimeError, match="wrong ownership"):
        procs.wait_ready("x", lambda: False, pid=pid, log_path=tmp_path / "logs" / "x.log", timeout_s=10)


def test_a_port_in_use_is_refused_with_advice(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="port is in use"):
            start_stack(tmp_path / "stack", ports={"broker": port})
    assert not procs.running_pid(tmp_path / "stack" / "run" / "broker.pid", "tansu")
