"""The embedded local stack: real Kafka-API, PostgreSQL and S3 servers on loopback, no Docker.

``start_stack(state_dir)`` starts (or finds already running) a Tansu broker, a PostgreSQL cluster
and a moto S3 server as detached processes, waits until each answers its own protocol, creates the
topics of ``shared/topics.toml``, the buckets and the database, runs the migrations, and writes
``state_dir/stack.env`` (read by ``load_settings()`` when ``state_dir`` is ``$WSI_HOME``) and
``state_dir/stack.json``. PostgreSQL keeps its data in ``state_dir/pg`` and S3 in ``state_dir/s3``
across restarts; the broker is memory-only, so its topics are recreated on every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wsitk.shared.config import Settings
from wsitk.shared.stack import procs, servers
from wsitk.shared.stack.servers import ADMIN_USER, BROKER, COMPONENTS, POSTGRES, S3, Layout

log = logging.getLogger(__name__)

APP_USER = "wsi_app"
VIEWER_USER = "wsi_viewer"
DATABASE = "wsi"
READY_TIMEOUT_S = {BROKER: 30.0, POSTGRES: 60.0, S3: 30.0}
STOP_TIMEOUT_S = 15.0
KAFKA_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class StackInfo:
    """Endpoints, credentials and pids of a running local stack."""

    state_dir: Path
    host: str
    ports: dict[str, int]
    pids: dict[str, int]
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    admin_password: str = field(repr=False)
    app_password: str = field(repr=False)
    viewer_password: str = field(default="", repr=False)

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.ports[BROKER]}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.host}:{self.ports[S3]}"

    def database_url(self, *, admin: bool = False, database: str = DATABASE) -> str:
        user, password = (ADMIN_USER, self.admin_password) if admin else (APP_USER, self.app_password)
        return f"postgresql://{user}:{password}@{self.host}:{self.ports[POSTGRES]}/{database}"

    def viewer_database_url(self) -> str:
        """The viewer's read-only role (SELECT on what it shows, read-only sessions)."""
        return (
            f"postgresql://{VIEWER_USER}:{self.viewer_password}@{self.host}:{self.ports[POSTGRES]}/{DATABASE}"
        )

    def env(self) -> dict[str, str]:
        """The ``WSI_*`` variables that point services and tools at this stack."""
        return {
            "WSI_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "WSI_S3_ENDPOINT": self.s3_endpoint,
            "WSI_S3_SECURE": "false",
            "WSI_S3_ACCESS_KEY": self.s3_access_key,
            "WSI_S3_SECRET_KEY": self.s3_secret_key,
            "WSI_DATABASE_URL": self.database_url(),
            "WSI_DATABASE_ADMIN_URL": self.database_url(admin=True),
            "WSI_VIEWER_DATABASE_URL": self.viewer_database_url(),
        }

    def settings(self, **overrides: Any) -> Settings:
        """Settings for this stack (environment variables for other fields still apply)."""
        values: dict[str, Any] = {
            "kafka_bootstrap": self.kafka_bootstrap,
            "s3_endpoint": self.s3_endpoint,
            "s3_secure": False,
            "s3_access_key": self.s3_access_key,
            "s3_secret_key": self.s3_secret_key,
            "database_url": self.database_url(),
            "database_admin_url": self.database_url(admin=True),
            "viewer_database_url": self.viewer_database_url(),
        }
        values.update(overrides)
        return Settings(**values)


# ---------------------------------------------------------------------------------------------
# Provisioning: topics, buckets, database. Each is separately callable and idempotent.
# ---------------------------------------------------------------------------------------------
def ensure_topics(
    bootstrap: str, *, replication_factor: int | None = None, settings: Settings | None = None
) -> list[str]:
    """Create every topic of the topic table that the broker lacks; returns the names created.

    ``replication_factor=None`` uses the table's factor capped at the number of brokers, so the
    same call works on the one-node local broker and on a cluster. A topic that exists with another
    partition count is left alone (changing it remaps keys) and logged as a warning. ``settings``
    supplies the security options (TLS, SASL) of a broker that requires them.
    """
    return asyncio.run(_ensure_topics(bootstrap, replication_factor, settings))


async def _ensure_topics(
    bootstrap: str, replication_factor: int | None, settings: Settings | None
) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from wsitk.shared.bus.kafka import client_options
    from wsitk.shared.topics import topic_table

    options: dict[str, Any] = {"bootstrap_servers": bootstrap, "request_timeout_ms": 10000}
    if settings is not None:
        options = {**client_options(settings), **options}
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"]) or 1
        existing = set(await admin.list_topics())
        missing = [spec for spec in topic_table().values() if spec.name not in existing]
        created: list[str] = []
        if missing:
            new_topics = [
                NewTopic(
                    name=spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=replication_factor or min(spec.replication_factor, brokers),
                    topic_configs={
                        "retention.ms": str(spec.retention_ms),
                        "max.message.bytes": str(spec.max_message_bytes),
                        "cleanup.policy": "compact" if spec.compaction else "delete",
                    },
                )
                for spec in missing
            ]
            response = await admin.create_topics(new_topics, timeout_ms=10000)
            failures = []
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != KAFKA_TOPIC_ALREADY_EXISTS:  # created meanwhile by another process
                    failures.append(f"{name}: error {code} {rest[0] if rest else ''}")
            if failures:
                raise RuntimeError(
                    f"the broker at {bootstrap} refused to create topics: {'; '.join(failures)}"
                )
        described = await admin.describe_topics(list(topic_table()))
        for entry in described:
            spec = topic_table()[entry["topic"]]
            if len(entry["partitions"]) != spec.partitions:
                log.warning(
                    "topic %s has %d partitions, the topic table says %d; left as it is (changing remaps keys)",
                    spec.name,
                    len(entry["partitions"]),
                    spec.partitions,
                )
        return created
    finally:
        await admin.close()


def ensure_buckets(settings: Settings) -> list[str]:
    """Create the uploads and artifacts buckets if missing; returns the names created."""
    from wsitk.shared.objectstore import S3ObjectStore

    client = S3ObjectStore(settings).client  # the services' client: same TLS and CA options
    created = []
    for bucket in (settings.uploads_bucket, settings.artifacts_bucket):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
            created.append(bucket)
    return created


def ensure_database(info: StackInfo) -> list[str]:
    """Create database ``wsi`` (owned by the admin role), the app role, and run the migrations.

    Returns the migrations applied now. The migration step belongs to ``wsitk.shared.db.migrate``;
    if that module is missing the database is still created and a log line says what was skipped.
    """
    return provision_database(
        lambda database: info.database_url(admin=True, database=database),
        info.app_password,
        info.viewer_password or None,
    )


def provision_database(
    admin_url: Callable[[str], str], app_password: str, viewer_password: str | None = None
) -> list[str]:
    """``ensure_database`` for any server: ``admin_url(database)`` is the owner role's URL there."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url("postgres"), autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
            connection.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(ADMIN_USER)
                )
            )
        role = sql.Identifier(APP_USER)
        password = sql.Literal(app_password)
        if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_USER,)).fetchone() is None:
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, password))
        else:  # keep the role's password equal to the one stack.env publishes
            connection.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(role, password))
        connection.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(DATABASE), role)
        )
    try:
        from wsitk.shared.db.migrate import migrate
    except ImportError as error:
        log.warning("database migrations skipped: wsitk.shared.db.migrate is not importable (%s)", error)
        return []
    applied = migrate(admin_url(DATABASE), APP_USER, app_password)
    from wsitk.shared.db.viewer_role import grant_viewer_role

    grant_viewer_role(admin_url(DATABASE), VIEWER_USER, viewer_password)
    return applied


# ---------------------------------------------------------------------------------------------
# State files
# ---------------------------------------------------------------------------------------------
def _credentials(state_dir: Path) -> dict[str, str]:
    """Generated once per state dir (PostgreSQL's data outlives a restart, so must its passwords)."""
    path = state_dir / "credentials.json"
    if path.is_file():
        stored: dict[str, str] = json.loads(path.read_text())
        if "viewer_password" not in stored:  # state dirs from before the viewer
            stored["viewer_password"] = secrets.token_urlsafe(18)
            _write_private(path, json.dumps(stored, indent=2) + "\n")
        return stored
    created = {
        "admin_password": secrets.token_urlsafe(18),
        "app_password": secrets.token_urlsafe(18),
        "viewer_password": secrets.token_urlsafe(18),
        "s3_access_key": "wsi-local",
        "s3_secret_key": secrets.token_urlsafe(18),
    }
    _write_private(path, json.dumps(created, indent=2) + "\n")
    return created


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.chmod(0o600)
    os.replace(temporary, path)


def _saved_stack(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "stack.json"
    if not path.is_file():
        return {}
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        return {}
    return saved


def _saved_port(layout: Layout, component: str) -> int | None:
    try:
        return int(layout.port_file(component).read_text().strip())
    except (OSError, ValueError):
        return None


def _write_state(info: StackInfo) -> None:
    lines = ["# Written by `wsi stack up`; load_settings() reads it when this folder is $WSI_HOME."]
    lines += [f"{name}={value}" for name, value in info.env().items()]
    _write_private(info.state_dir / "stack.env", "\n".join(lines) + "\n")
    summary = {
        "host": info.host,
        "ports": info.ports,
        "pids": info.pids,
        "endpoints": {
            BROKER: info.kafka_bootstrap,
            POSTGRES: f"{info.host}:{info.ports[POSTGRES]}/{DATABASE}",
            S3: f"http://{info.s3_endpoint}",
        },
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (info.state_dir / "stack.json").write_text(json.dumps(summary, indent=2) + "\n")


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One start/stop at a time per state dir (two `wsi stack up` racing would start two brokers)."""
    run_dir = state_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------
def _check_ready(
    component: str, layout: Layout, host: str, port: int, credentials: Mapping[str, str]
) -> bool:
    if not procs.tcp_accepts(host, port):
        return False
    if component == BROKER:
        return servers.broker_ready(f"{host}:{port}")
    if component == POSTGRES:
        dsn = f"postgresql://{ADMIN_USER}:{credentials['admin_password']}@{host}:{port}/postgres"
        return servers.postgres_ready(dsn)
    endpoint = f"{host}:{port}"
    return servers.s3_ready(endpoint, credentials["s3_access_key"], credentials["s3_secret_key"])


def _choose_port(layout: Layout, component: str, host: str, requested: int | None) -> int:
    if requested:
        # On a restart, the server that just exited may hold its port a moment longer.
        deadline = time.monotonic() + (5.0 if requested == _saved_port(layout, component) else 0.0)
        while not procs.port_is_free(host, requested) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not procs.port_is_free(host, requested):
            raise RuntimeError(
                f"cannot start the {component} on {host}:{requested}: the port is in use. "
                f"Pick another port or stop what listens there (`ss -ltnp | grep :{requested}`)."
            )
        return requested
    previous = _saved_port(layout, component)  # keep endpoints stable across restarts when possible
    if previous and procs.port_is_free(host, previous):
        return previous
    return procs.free_port(host)


def _ensure_component(
    layout: Layout, component: str, host: str, requested_port: int | None, credentials: Mapping[str, str]
) -> tuple[int, int]:
    """Reuse the component if it runs and answers, else start it; returns (pid, port)."""
    pid = procs.running_pid(layout.pid_file(component), layout.marker(component))
    port = _saved_port(layout, component)
    if pid is not None and port is not None:
        if requested_port and requested_port != port:
            log.warning("%s already runs on port %d; port %d ignored", component, port, requested_port)
        try:
            _wait_ready(layout, component, host, port, pid, credentials)
            return pid, port
        except procs.ServerExited:  # it was just ending (killed by a test, say): start a new one
            requested_port = requested_port or port
    elif pid is not None:  # running, but its port file is gone: restart it cleanly
        _stop_one(layout, component, pid)
    port = _choose_port(layout, component, host, requested_port)
    if component == BROKER:
        pid = servers.start_broker(layout, host, port)
    elif component == POSTGRES:
        servers.init_postgres(layout, credentials["admin_password"])
        pid = servers.start_postgres(layout, host, port)
    else:
        pid = servers.start_s3(layout, host, port)
    layout.port_file(component).write_text(f"{port}\n")
    try:
        _wait_ready(layout, component, host, port, pid, credentials)
    except BaseException:
        _stop_one(layout, component, pid)
        raise
    log.info("%s ready on %s:%d (pid %d)", component, host, port, pid)
    return pid, port


def _wait_ready(
    layout: Layout, component: str, host: str, port: int, pid: int, credentials: Mapping[str, str]
) -> None:
    procs.wait_ready(
        component,
        lambda: _check_ready(component, layout, host, port, credentials),
        pid=pid,
        log_path=layout.log_file(component),
        timeout_s=READY_TIMEOUT_S[component],
    )


def _stop_one(layout: Layout, component: str, pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    if component == POSTGRES:
        servers.stop_postgres(layout, pid, timeout_s)
    else:
        procs.terminate(pid, timeout_s=timeout_s)
    layout.pid_file(component).unlink(missing_ok=True)


def _info(layout: Layout, host: str, ports: dict[str, int], pids: dict[str, int]) -> StackInfo:
    credentials = _credentials(layout.state_dir)
    return StackInfo(
        state_dir=layout.state_dir,
        host=host,
        ports=ports,
        pids=pids,
        s3_access_key=credentials["s3_access_key"],
        s3_secret_key=credentials["s3_secret_key"],
        admin_password=credentials["admin_password"],
        app_password=credentials["app_password"],
        viewer_password=credentials["viewer_password"],
    )


def _provision(info: StackInfo, settings: Settings | None) -> None:
    created_topics = ensure_topics(info.kafka_bootstrap)
    bucket_names: dict[str, Any] = {}
    if settings is not None:
        bucket_names = {
            "uploads_bucket": settings.uploads_bucket,
            "artifacts_bucket": settings.artifacts_bucket,
        }
    bucket_settings = info.settings(**bucket_names)
    created_buckets = ensure_buckets(bucket_settings)
    applied = ensure_database(info)
    log.info("provisioned: topics %s, buckets %s, migrations %s", created_topics, created_buckets, applied)


def start_stack(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    settings: Settings | None = None,
) -> StackInfo:
    """Start the broker, PostgreSQL and S3 (or reuse them if they run and answer); provision; write state.

    ``ports`` maps "broker"/"postgres"/"s3" to fixed ports; others are free loopback ports (the
    previous run's port when it is still free). ``settings`` supplies the bucket names. On a
    failure, servers this call started are stopped again and the error carries the server's log tail.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    layout = Layout(state_dir)
    credentials = _credentials(state_dir)
    requested = dict(ports or {})
    unknown = set(requested) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown stack components {sorted(unknown)}; use {list(COMPONENTS)}")
    with _locked(state_dir):
        previously_running = {
            name for name in COMPONENTS if procs.running_pid(layout.pid_file(name), layout.marker(name))
        }
        pids: dict[str, int] = {}
        chosen_ports: dict[str, int] = {}
        try:
            for component in COMPONENTS:
                pids[component], chosen_ports[component] = _ensure_component(
                    layout, component, host, requested.get(component), credentials
                )
            info = _info(layout, host, chosen_ports, pids)
            _provision(info, settings)
        except BaseException:
            for component, pid in pids.items():
                if component not in previously_running:
                    _stop_one(layout, component, pid)
            raise
        _write_state(info)
    return info


def stop_stack(state_dir: Path, *, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop every component (SIGTERM, then SIGKILL after ``timeout_s``); returns those that were running."""
    state_dir = Path(state_dir).resolve()
    layout = Layout(state_dir)
    stopped = []
    with _locked(state_dir):
        for component in reversed(COMPONENTS):
            pid = procs.running_pid(layout.pid_file(component), layout.marker(component))
            if pid is not None:
                _stop_one(layout, component, pid, timeout_s)
                stopped.append(component)
            layout.pid_file(component).unlink(missing_ok=True)
    return stopped


def stop_component(state_dir: Path, component: str, *, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop one server (for outage tests); its port stays reserved in the state dir. True if it ran."""
    _check_component(component)
    state_dir = Path(state_dir).resolve()
    layout = Layout(state_dir)
    with _locked(state_dir):
        pid = procs.running_pid(layout.pid_file(component), layout.marker(component))
        if pid is None:
            return False
        _stop_one(layout, component, pid, timeout_s)
        return True


def start_component(state_dir: Path, component: str, *, host: str | None = None) -> int:
    """Start one server again on its previous port; returns its pid.

    A restarted broker is empty (memory only), so the topic table is created on it again.
    """
    _check_component(component)
    state_dir = Path(state_dir).resolve()
    layout = Layout(state_dir)
    host = host or _saved_stack(state_dir).get("host", "127.0.0.1")
    credentials = _credentials(state_dir)
    with _locked(state_dir):
        previous_port = _saved_port(layout, component)
        already = procs.running_pid(layout.pid_file(component), layout.marker(component))
        requested = None if already is not None else previous_port
        pid, port = _ensure_component(layout, component, host, requested, credentials)
        if component == BROKER:
            ensure_topics(f"{host}:{port}")
        saved = _saved_stack(state_dir)
        if saved:
            saved.setdefault("pids", {})[component] = pid
            saved.setdefault("ports", {})[component] = port
            (state_dir / "stack.json").write_text(json.dumps(saved, indent=2) + "\n")
    return pid


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"unknown stack component {component!r}; use one of {list(COMPONENTS)}")


def stack_status(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Each component's pid, whether it is alive and accepts connections, and its endpoint."""
    state_dir = Path(state_dir).resolve()
    layout = Layout(state_dir)
    host = _saved_stack(state_dir).get("host", "127.0.0.1")
    status: dict[str, dict[str, Any]] = {}
    for component in COMPONENTS:
        recorded_pid = procs.read_pid(layout.pid_file(component))
        pid = procs.running_pid(layout.pid_file(component), layout.marker(component))
        port = _saved_port(layout, component)
        status[component] = {
            "pid": pid if pid is not None else recorded_pid,
            "alive": pid is not None,
            "accepting": bool(pid is not None and port and procs.tcp_accepts(host, port)),
            "endpoint": f"{host}:{port}" if port else None,
            "log": str(layout.log_file(component)),
        }
    return status


class LocalStack:
    """A throw-away stack for tests: ``with LocalStack() as info: ...``.

    Runs in a temporary state dir on free ports (or in ``state_dir`` if given, which is then kept),
    and on exit stops every server and removes the temporary dir, also when the body raised.
    """

    def __init__(self, state_dir: Path | None = None, *, host: str = "127.0.0.1") -> None:
        self._given_dir = state_dir
        self._host = host
        self.state_dir: Path | None = None
        self.info: StackInfo | None = None

    def __enter__(self) -> StackInfo:
        self.state_dir = (
            Path(self._given_dir) if self._given_dir else Path(tempfile.mkdtemp(prefix="wsi-stack-"))
        )
        try:
            self.info = start_stack(self.state_dir, host=self._host)
        except BaseException:
            self._cleanup()
            raise
        return self.info

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.state_dir is None:
            return
        try:
            stop_stack(self.state_dir)
        finally:
            if self._given_dir is None:
                shutil.rmtree(self.state_dir, ignore_errors=True)
