"""A reconnecting PostgreSQL connection for the services (sync psycopg, used from worker threads).

A lost or refused connection raises ``TransientError`` so the runtime retries with backoff and
reports not-ready; the next call reconnects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from wsitk.shared.errors import TransientError


class Database:
    def __init__(self, dsn: str, *, connect_timeout_s: int = 5) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout_s
        self._conn: psycopg.Connection | None = None
        self._lock = threading.RLock()

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=self._timeout,
                    options="-c search_path=wsi,public",
                )
            except psycopg.OperationalError as exc:
                raise TransientError(f"PostgreSQL unreachable: {exc}") from exc
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction; connection problems become TransientError and drop the connection."""
        with self._lock:
            conn = self._connect()
            try:
                with conn.transaction():
                    yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.close()
                raise TransientError(f"PostgreSQL connection lost: {exc}") from exc

    def execute(
        self, query: Any, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        with self.transaction() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def ping(self) -> bool:
        try:
            self.execute("SELECT 1")
        except TransientError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None
