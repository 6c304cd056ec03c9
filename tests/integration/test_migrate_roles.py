"""Migrations under a database owner that is NOT a superuser, as CloudNativePG creates it.

CloudNativePG's ``bootstrap.initdb`` makes the owner a plain role (no SUPERUSER, no CREATEROLE, no
CREATEDB) that owns the database, and creates the services' role from the Cluster's
``spec.managed.roles`` as the ``postgres`` superuser, possibly after the migration Job first ran.
On a real PostgreSQL (the pgserver wheel's, only the database server is started), this checks:

- before the services' role exists, ``wsi db migrate`` fails loudly (non-zero), so the Job retries;
- once it exists, the same owner migrates and grants it row access, with no ALTER ROLE;
- the services' role finds the tables without qualifying them (the database's search_path), can
  read and write rows, and cannot create, alter or drop anything;
- ``wsi db wait`` passes only once every shipped migration is recorded (the newest gates it).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

OWNER, OWNER_PASSWORD = "wsi_owner", "owner-secret"
APP, APP_PASSWORD = "wsi_app", "app-secret"
DATABASE = "wsi"
SUPERUSER_PASSWORD = "superuser-secret"  # the stand-in for CloudNativePG's `postgres`


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A bare PostgreSQL on loopback; yields a URL template with {user}, {password}, {db}."""
    from wsitk.shared.stack import servers

    state_dir = Path(tempfile.mkdtemp(prefix="wsi-pg-roles-"))
    layout = servers.Layout(state_dir)
    layout.log_dir.mkdir(parents=True)
    servers.init_postgres(layout, SUPERUSER_PASSWORD)
    port = _free_port()
    pid = servers.start_postgres(layout, "127.0.0.1", port)
    url = "postgresql://{user}:{password}@127.0.0.1:" + str(port) + "/{db}"
    superuser = url.format(user=servers.ADMIN_USER, password=SUPERUSER_PASSWORD, db="postgres")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                servers.postgres_ready(superuser)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # What CloudNativePG's initdb bootstrap does: a plain owner role owning the database.
        with psycopg.connect(superuser, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD {}").format(
                    sql.Identifier(OWNER), sql.Literal(OWNER_PASSWORD)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(OWNER))
            )
        yield url
    finally:
        servers.stop_postgres(layout, pid, timeout_s=10)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_a_non_superuser_owner_migrates_and_grants_the_managed_app_role(
    server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from wsitk.shared import ops
    from wsitk.shared.db.migrate import (
        AppRoleMissing,
        migrate,
        migration_files,
        pending_migrations,
        wait_for_schema,
    )
    from wsitk.shared.stack import servers

    owner_url = server.format(user=OWNER, password=OWNER_PASSWORD, db=DATABASE)
    app_url = server.format(user=APP, password=APP_PASSWORD, db=DATABASE)
    monkeypatch.setenv("WSI_HOME", str(tmp_path))  # no stack.env of a developer's own stack
    monkeypatch.setenv("WSI_DATABASE_ADMIN_URL", owner_url)
    monkeypatch.setenv("WSI_DATABASE_URL", app_url)

    with psycopg.connect(owner_url) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False), "the owner must be a plain role, as CloudNativePG creates it"

    # 1. The Job runs before the operator created the services' role: it fails, non-zero.
    with pytest.raises(AppRoleMissing, match=APP):
        migrate(owner_url, APP, app_password="ignored: this owner may not create roles")
    assert ops.cli_db(argparse.Namespace(action="migrate")) != 0
    # The schema itself is there, but the services' role cannot pass `wsi db wait` yet.
    assert ops.cli_db(argparse.Namespace(action="wait", timeout=0.0)) == 1

    # 2. CloudNativePG reconciles the managed role (as its superuser), the Job retries and succeeds.
    superuser = server.format(user=servers.ADMIN_USER, password=SUPERUSER_PASSWORD, db="postgres")
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD {}").format(
                sql.Identifier(APP), sql.Literal(APP_PASSWORD)
            )
        )
    assert ops.cli_db(argparse.Namespace(action="migrate")) == 0
    assert migrate(owner_url, APP) == [], "idempotent: nothing left to apply"
    assert pending_migrations(app_url) == []
    assert wait_for_schema(app_url, timeout_s=0, say=lambda _m: None)
    assert ops.cli_db(argparse.Namespace(action="wait", timeout=5.0)) == 0

    # 3. The services' role: rows only, tables found through the database's search_path.
    with psycopg.connect(app_url, autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("wsi, public",)
        conn.execute("INSERT INTO slides (slide_id, status) VALUES ('s-1', 'ingested')")
        conn.execute("UPDATE slides SET status = 'tiled' WHERE slide_id = 's-1'")
        assert conn.execute("SELECT status FROM slides").fetchall() == [("tiled",)]
        for statement in (
            "CREATE TABLE wsi.intruder (x int)",
            "CREATE TABLE public.intruder (x int)",
            "DROP TABLE slides",
            "ALTER TABLE slides ADD COLUMN x int",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)

    # 4. An upgrade ships a newer migration: `wsi db wait` holds until it is recorded.
    newest = migration_files()[-1][0]
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("DELETE FROM wsi.schema_migrations WHERE name = %s", (newest,))
    assert pending_migrations(app_url) == [newest]
    messages: list[str] = []
    assert not wait_for_schema(app_url, timeout_s=0, say=messages.append)
    assert newest in messages[-1]
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("INSERT INTO wsi.schema_migrations (name) VALUES (%s)", (newest,))
    assert wait_for_schema(app_url, timeout_s=0, say=messages.append)
