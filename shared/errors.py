"""The two kinds of failure, and how to tell them apart.

DESIGN.md section 2: infrastructure failures (a server unreachable, a timeout) are retried without
limit, with backoff, and never dead-letter anything; deterministic failures (a corrupt slide, a
malformed event) are dead-lettered after a bounded number of attempts with a reason a person can
act on. Code raises ``PermanentError`` or ``TransientError`` where it knows which it is; for
everything else ``is_transient`` classifies the exceptions of the libraries we talk through.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path


class TransientError(Exception):
    """An infrastructure failure: retry later, forever, without counting an attempt."""


class PermanentError(Exception):
    """A deterministic failure of one input. ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: str, reason: str) -> None:
        reason = scrub_local_paths(reason)  # reasons reach public events: no paths of this machine
        super().__init__(reason)
        self.code = code
        self.reason = reason


# A path of this machine: absolute (or ``~/``) with two or more parts, or relative through a ``.wsi``
# folder. Not a URL (``http://host/key``, ``s3://bucket/key``) nor an object key (``case-12/s1.svs``).
_PART = r"[^\s'\"`/:,;()\[\]{}<>|]+"
_LOCAL_PATH = rf"(?<![\w:/.~-])~?(?:/{_PART}){{2,}}/?|(?<![\w/.-])(?:[\w.-]+/)*\.wsi(?:/{_PART})+"


def scrub_local_paths(text: str, known: Mapping[str, str] | None = None) -> str:
    """``text`` (a reason built from an exception) without the local filesystem paths it quotes.

    ``known`` maps local paths or file names to what the public should read instead (the object key
    the file was downloaded from); any other local path becomes its file name. Public events (slide
    rejected, slide failed, dead letters) build their reasons through this, so a cache path such as
    ``.wsi/cache/ingest/<digest>.svs`` never leaves the machine.
    """
    names = {local: public for local, public in (known or {}).items() if local}
    literals = [re.escape(local) for local in sorted(names, key=len, reverse=True)]
    pattern = re.compile("|".join([*literals, _LOCAL_PATH]))

    def public(match: re.Match[str]) -> str:
        found = match.group(0)
        if found in names:
            return names[found]
        name = found.rstrip("/").rsplit("/", 1)[-1]
        return names.get(name, name)

    return pattern.sub(public, text)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def local_disk_full(what: str, folder: Path, needed_for: str) -> TransientError:
    """The error for a full local disk: names the folder and its free bytes, and waits (transient)."""
    try:
        free = f"{shutil.disk_usage(folder).free} bytes free"
    except OSError:
        free = "no free space"
    return TransientError(
        f"local disk full: {what} {folder} has {free}, too few for {needed_for}; "
        "waiting for space (free the disk, give it more, or lower WSI_CACHE_MAX_BYTES)"
    )


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
    # A full local disk (the slide cache, the tiler's work folder) is the machine's, not the slide's:
    # wait for space as for any other infrastructure failure, never dead-letter the slide for it.
    errno.ENOSPC,
    errno.EDQUOT,
}


#: Errors that mean a bug in our code, never a server being away (unless raised ``from`` one).
_PROGRAMMING_ERRORS = (LookupError, AttributeError, TypeError, NameError, AssertionError)


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
    cause = exc.__cause__
    if cause is None and not isinstance(exc, _PROGRAMMING_ERRORS):
        # An error raised while handling another one (no ``from``) is judged by that one, except a bug:
        # a KeyError in an ``except ConnectionError`` block must fail (and dead-letter), not retry forever.
        cause = exc.__context__
    if cause is not None and cause is not exc:
        return is_transient(cause)
    return False
