"""The viewer's database login: a role that can only read, member of migration 0004's ``wsi_readonly``.

Run after the migrations (``wsi db migrate``, ``wsi stack up``). It creates the login role when a
password is given and the owner may create roles (the local stack), and otherwise leaves the role to
whoever manages roles (CloudNativePG's managed roles declare ``wsi_viewer`` with
``inRoles: [wsi_readonly]``). The viewer also opens its sessions read-only, so even a role granted
more by mistake cannot write through it.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from wsitk.shared.logging import get_logger

log = get_logger()

VIEWER_USER = "wsi_viewer"
READ_ONLY_GROUP = "wsi_readonly"


def grant_viewer_role(admin_dsn: str, viewer_user: str = VIEWER_USER, password: str | None = None) -> bool:
    """Make ``viewer_user`` a read-only member of ``wsi_readonly``; True when it is one afterwards."""
    role = sql.Identifier(viewer_user)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        may_manage = bool(row and row[0])
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READ_ONLY_GROUP,)).fetchone() is None:
            log.warning(
                "read-only group role missing (migration 0004 could not create it)", role=READ_ONLY_GROUP
            )
            return False
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (viewer_user,)).fetchone()
        if may_manage and password is not None:
            verb = sql.SQL("ALTER" if exists else "CREATE")
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    verb, role, sql.Literal(password)
                )
            )
        elif not exists:
            log.warning("viewer role missing; create it with membership in wsi_readonly", role=viewer_user)
            return False
        member = conn.execute(
            "SELECT pg_has_role(%s, %s, 'MEMBER')", (viewer_user, READ_ONLY_GROUP)
        ).fetchone()
        if not (member and member[0]):
            if not may_manage:
                log.warning("viewer role is not a member of wsi_readonly", role=viewer_user)
                return False
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(READ_ONLY_GROUP), role))
        database = conn.execute("SELECT current_database()").fetchone()
        assert database is not None
        if may_manage:
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(str(database[0])), role)
            )
    log.info("viewer role can read", role=viewer_user)
    return True
