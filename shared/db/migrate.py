"""Schema migrations: numbered SQL files applied in order, once, under the owner role.

``wsi db migrate`` connects with the admin (owner) URL, applies what is missing inside one
transaction per file, and grants the services' role row access only (SELECT, INSERT, UPDATE,
DELETE, and drawing ids from sequences): it can never create, alter or drop anything.

The owner need not be a superuser. On Kubernetes, CloudNativePG creates the database's owner as a
plain role (no SUPERUSER, no CREATEROLE) and the services' role from a managed-role entry of the
Cluster; so this module only does what a database owner may do: it creates the schema and tables,
grants on objects it owns, and sets the default ``search_path`` on the database (``ALTER DATABASE``,
never ``ALTER ROLE``, which needs CREATEROLE on the role). It creates the services' role only when it
is allowed to (the local stack's owner is a superuser); otherwise a missing role is an error
(:class:`AppRoleMissing`, a non-zero exit of ``wsi db migrate``), so a Job retries until the
operator has created it instead of reporting success with nothing granted.

``wsi db wait`` (the services' init containers) waits until every migration shipped with the
running package is recorded, so a new version never starts on an older schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources

import psycopg
from psycopg import sql
from wsitk.shared.logging import get_logger

log = get_logger()

SCHEMA = "wsi"


class AppRoleMissing(RuntimeError):
    """The services' role does not exist and the owner may not create it."""


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("wsitk.shared.db").joinpath("migrations")
    files = sorted(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )
    return files


def newest_migration() -> str:
    """The name of the newest migration shipped with this package (what a release needs)."""
    return migration_files()[-1][0]


def migrate(admin_dsn: str, app_user: str = "wsi_app", app_password: str | None = None) -> list[str]:
    """Apply pending migrations; create (when allowed) and grant the app role.

    Returns the names applied now. Raises :class:`AppRoleMissing` when the app role does not
    exist and cannot be created here: the schema is then migrated but nothing is granted yet.
    """
    applied_now: list[str] = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS wsi.schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM wsi.schema_migrations")}
        for name, text in migration_files():
            if name in done:
                continue
            with conn.transaction():
                conn.execute(text)  # trusted files shipped with the package
                conn.execute("INSERT INTO wsi.schema_migrations (name) VALUES (%s)", (name,))
            applied_now.append(name)
            log.info("migration applied", migration=name)
        # Everyone connecting to this database (people with psql included) finds the tables first;
        # the services also set it on their own connections.
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET search_path = wsi, public").format(
                sql.Identifier(_current_database(conn))
            )
        )
        _grant_app_role(conn, app_user, app_password)
    return applied_now


def _current_database(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def _may_create_roles(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    return bool(row and row[0])


def _grant_app_role(conn: psycopg.Connection, app_user: str, app_password: str | None) -> None:
    role = sql.Identifier(app_user)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_user,)).fetchone()
    if not exists:
        if app_password is None or not _may_create_roles(conn):
            raise AppRoleMissing(
                f"the services' role {app_user!r} does not exist and the owner role may not create it: "
                "create it first (CloudNativePG: the Cluster's spec.managed.roles entry; elsewhere "
                f"CREATE ROLE {app_user} LOGIN PASSWORD '...'), then run the migration again"
            )
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(app_password)))
    conn.execute(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(_current_database(conn)), role)
    )
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA wsi TO {}").format(role))
    conn.execute(
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA wsi TO {}").format(role)
    )
    # bigserial ids (model_events) need the sequences: USAGE to draw from them, nothing more
    conn.execute(sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA wsi TO {}").format(role))
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA wsi FROM {}").format(role))
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(role))
    log.info("services' role granted row access", role=app_user)


def pending_migrations(dsn: str) -> list[str]:
    """Migrations shipped with this package that the database has not recorded (any role may ask).

    Raises ``psycopg.Error`` while the server, the schema or the grants are not there yet.
    """
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        done = {row[0] for row in conn.execute("SELECT name FROM wsi.schema_migrations")}
    return [name for name, _text in migration_files() if name not in done]


def wait_for_schema(
    dsn: str,
    *,
    timeout_s: float | None = None,
    interval_s: float = 5.0,
    say: Callable[[str], None] = print,
) -> bool:
    """Block until every shipped migration is recorded; False if ``timeout_s`` passed first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            missing = pending_migrations(dsn)
            if not missing:
                return True
            reason = f"migrations not applied yet: {', '.join(missing)}"
        except psycopg.Error as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip() or 'no answer'}"
        if deadline is not None and time.monotonic() >= deadline:
            say(f"schema not ready after {timeout_s:.0f} s ({reason})")
            return False
        say(f"waiting for the schema up to {newest_migration()} (`wsi db migrate`): {reason}")
        time.sleep(interval_s)
