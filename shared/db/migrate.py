"""Schema migrations: numbered SQL files applied in order, once, under the owner role.

``wsi db migrate`` connects with the admin (owner) URL, applies what is missing inside one
transaction per file, and grants the services' role row access only (SELECT, INSERT, UPDATE,
DELETE, and drawing ids from sequences): it can never create, alter or drop anything.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from psycopg import sql
from wsitk.shared.logging import get_logger

log = get_logger()


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("wsitk.shared.db").joinpath("migrations")
    files = sorted(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )
    return files


def migrate(admin_dsn: str, app_user: str = "wsi_app", app_password: str | None = None) -> list[str]:
    """Apply pending migrations; create/grant the app role. Returns the names applied now."""
    applied_now: list[str] = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS wsi")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS wsi.schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM wsi.schema_migrations")}
        for name, text in migration_files():
            if name in done:
                continue
            with conn.transaction():
                conn.execute(text)  # type: ignore[arg-type]  # trusted files shipped with the package
                conn.execute("INSERT INTO wsi.schema_migrations (name) VALUES (%s)", (name,))
            applied_now.append(name)
            log.info("migration applied", migration=name)
        _grant_app_role(conn, app_user, app_password)
    return applied_now


def _grant_app_role(conn: psycopg.Connection, app_user: str, app_password: str | None) -> None:
    role = sql.Identifier(app_user)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_user,)).fetchone()
    if not exists and app_password is not None:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(app_password)))
    elif not exists:
        log.warning("app role missing and no password given; create it yourself", role=app_user)
        return
    conn.execute(sql.SQL("ALTER ROLE {} SET search_path = wsi, public").format(role))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA wsi TO {}").format(role))
    conn.execute(
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA wsi TO {}").format(role)
    )
    # bigserial ids (model_events) need the sequences: USAGE to draw from them, nothing more
    conn.execute(sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA wsi TO {}").format(role))
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA wsi FROM {}").format(role))
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(role))
