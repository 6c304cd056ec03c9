"""TLS on every connection, configured only through settings, against servers that demand it.

The stack of ``tests/secure_stack.py`` accepts nothing unencrypted: PostgreSQL rejects every
non-TLS connection, S3 speaks HTTPS only, and the broker is reachable only through TLS. The six
services run against it with ``WSI_KAFKA_SECURITY_PROTOCOL=SSL``, ``WSI_S3_SECURE`` and
``WSI_DATABASE_SSLMODE=verify-full`` (each with a CA file), and a slide goes all the way to a
recorded prediction. Clients trusting another CA, or not using TLS, are refused.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wsitk.shared.slides.synth import SynthSpec, generate_slide

from tests.secure_stack import SecureStack, start_secure_stack

pytestmark = pytest.mark.e2e


@dataclass
class SecurePipeline:
    stack: SecureStack
    home: Path
    env: dict[str, str]

    def admin_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        settings = self.stack.settings()
        with psycopg.connect(settings.dsn(admin=True), options="-c search_path=wsi,public") as conn:
            return conn.execute(sql, params).fetchall()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.home / "logs").glob("*.log"))
        )


@pytest.fixture(scope="module")
def secure(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecurePipeline]:
    from wsitk.shared.ops import SERVICE_NAMES, services_down, services_up

    stack = start_secure_stack(tmp_path_factory.mktemp("tls-stack"))
    home = tmp_path_factory.mktemp("tls-home")
    env = {
        **stack.env(),
        "WSI_HOME": str(home),
        "WSI_MODEL_DIR": str(tiny_models),
        "WSI_CACHE_DIR": str(home / "cache"),
        "WSI_POLL_INTERVAL_S": "1",
        "WSI_TILES_PER_SHARD": "48",
        "WSI_ISOLATION_MEMORY_BYTES": str(3 * 1024**3),
    }
    previous_home = os.environ.get("WSI_HOME")
    os.environ["WSI_HOME"] = str(home)
    try:
        services_up(SERVICE_NAMES, env=env)
        yield SecurePipeline(stack, home, env)
    finally:
        os.environ["WSI_HOME"] = str(home)
        services_down(SERVICE_NAMES, timeout_s=20)
        if previous_home is None:
            os.environ.pop("WSI_HOME", None)
        else:
            os.environ["WSI_HOME"] = previous_home
        stack.close()


def _wait(secure: SecurePipeline, predicate: Any, timeout_s: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{secure.logs()}")


def test_a_slide_becomes_a_prediction_with_tls_on_every_connection(
    secure: SecurePipeline, tmp_path: Path
) -> None:
    from wsitk.shared.objectstore import S3ObjectStore
    from wsitk.shared.ops import read_public_events
    from wsitk.shared.topics import PREDICTIONS

    settings = secure.stack.settings()
    slide = tmp_path / "tls-case.svs"
    generate_slide(slide, SynthSpec(width=3000, height=2400, mpp=0.5, fmt="svs", seed=5, tumour_fraction=0.3))
    S3ObjectStore(settings).client.fput_object(settings.uploads_bucket, "tls/tls-case.svs", str(slide))

    def predicted() -> bool:
        rows = secure.admin_query(
            "SELECT s.status FROM slide_sources src JOIN slides s USING (slide_id) WHERE src.upload_key = %s",
            ("tls/tls-case.svs",),
        )
        return bool(rows) and rows[0][0] in {"predicted", "rejected", "failed", "no_tissue"}

    _wait(secure, predicted, 240, "the slide to be predicted over TLS")
    ((status, reason),) = secure.admin_query(
        "SELECT s.status, s.reason_code FROM slide_sources src JOIN slides s USING (slide_id) "
        "WHERE src.upload_key = %s",
        ("tls/tls-case.svs",),
    )
    assert status == "predicted", (status, reason)
    ((slide_id, predictions),) = secure.admin_query(
        "SELECT src.slide_id, count(p.*) FROM slide_sources src LEFT JOIN predictions p USING (slide_id) "
        "WHERE src.upload_key = %s GROUP BY src.slide_id",
        ("tls/tls-case.svs",),
    )
    assert predictions == 1

    # Every database session of the services' role is encrypted, and there are some (all six
    # services keep connections open), so the services really did speak TLS to PostgreSQL.
    sessions = secure.admin_query(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
        "WHERE a.usename = 'wsi_app'"
    )
    assert sessions, "no database sessions of the services' role"
    assert all(ssl_on for ssl_on, _ in sessions), sessions
    assert {version for _, version in sessions} <= {"TLSv1.2", "TLSv1.3"}

    # The broker was only ever reachable through the TLS terminator; each service's consumer,
    # producer and metadata connections went through it.
    assert secure.stack.kafka_tls.accepted >= 12

    # A downstream reader configured from the same settings gets the prediction event over TLS.
    async def prediction_events() -> list[dict]:
        events = read_public_events(settings, [PREDICTIONS], idle_timeout_s=3.0)
        return [body async for _, _, body in events if body.get("meta", {}).get("slide_id") == slide_id]

    assert len(asyncio.run(prediction_events())) == 1

    # Credentials came from the environment and none of them reached a log line.
    logs = secure.logs()
    for secret in (secure.stack.app_password, secure.stack.admin_password, secure.stack.s3_secret):
        assert secret not in logs


def test_clients_refuse_untrusted_servers_and_servers_refuse_plaintext(secure: SecurePipeline) -> None:
    import psycopg
    import urllib3
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError
    from wsitk.shared.bus.kafka import client_options
    from wsitk.shared.objectstore import S3ObjectStore

    stack = secure.stack
    rogue_ca = str(stack.rogue.ca_file)

    async def kafka_metadata(**overrides: Any) -> None:
        options = {**client_options(stack.settings(**overrides)), "request_timeout_ms": 3000}
        admin = AIOKafkaAdminClient(**options)
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()

    # The same port works with the right CA (the pipeline test) and with it here...
    asyncio.run(asyncio.wait_for(kafka_metadata(), 20))
    # ...but not when the client trusts another CA, nor without TLS.
    with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
        asyncio.run(asyncio.wait_for(kafka_metadata(kafka_ssl_cafile=rogue_ca), 20))
    with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
        asyncio.run(asyncio.wait_for(kafka_metadata(kafka_security_protocol="PLAINTEXT"), 20))

    # S3: HTTPS verified against the configured CA; a rogue CA or plain HTTP fails.
    assert S3ObjectStore(stack.settings()).client.bucket_exists(stack.settings().uploads_bucket)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
        S3ObjectStore(stack.settings(s3_ca_file=rogue_ca)).client.bucket_exists("wsi-uploads")
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    with pytest.raises(Exception) as plain:
        S3ObjectStore(stack.settings(s3_secure=False)).client.bucket_exists("wsi-uploads")
    assert not isinstance(plain.value, AssertionError)

    # PostgreSQL: verify-full against the configured CA works; the server rejects unencrypted
    # sessions, and a client trusting another CA refuses the server.
    settings = stack.settings()
    assert "sslmode=verify-full" in settings.dsn() and "sslrootcert=" in settings.dsn()
    with psycopg.connect(settings.dsn(), connect_timeout=5) as conn:
        assert conn.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(stack.settings(database_sslmode="disable").dsn(), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(stack.settings(database_sslrootcert=rogue_ca).dsn(), connect_timeout=5)
