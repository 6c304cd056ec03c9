"""The two kinds of failure, and how to tell them apart.

DESIGN.md section 2: infrastructure failures (a server unreachable, a timeout) are retried without
limit, with backoff, and never dead-letter anything; deterministic failures (a corrupt slide, a
malformed event) are dead-lettered after a bounded number of attempts with a reason a person can
act on. Code raises ``PermanentError`` or ``TransientError`` where it knows which it is; for
everything else ``is_transient`` classifies the exceptions of the libraries we talk through.
"""

from __future__ import annotations

import errno
import socket


class TransientError(Exception):
    """An infrastructure failure: retry later, forever, without counting an attempt."""


class PermanentError(Exception):
    """A deterministic failure of one input. ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_TRANSIENT_S3_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "XMinioServerNotInitialized",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
    errno.EPIPE,
}


def is_transient(exc: BaseException) -> bool:
    """True when the exception means "a server we depend on is unavailable", not "this input is bad"."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError | socket.timeout | socket.gaierror):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith("urllib3"):
        return True
    if module.startswith("psycopg"):
        # OperationalError covers a refused connection, a server shutting down, a lost connection.
        return name in {"OperationalError", "InterfaceError", "AdminShutdown", "CannotConnectNow"} or (
            "Connection" in name
        )
    if module.startswith(("aiokafka", "kafka")):
        return name not in {"MessageSizeTooLargeError", "RecordTooLargeError", "InvalidTopicError"}
    if module.startswith("minio"):
        code = getattr(exc, "code", "")
        status = getattr(getattr(exc, "response", None), "status", 0) or 0
        return code in _TRANSIENT_S3_CODES or status >= 500 or name in {"ServerError"}
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return is_transient(cause)
    return False
