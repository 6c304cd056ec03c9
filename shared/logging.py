"""Structured JSON logs (structlog), one line per event, with slide id and event id bound per message.

The runtime binds ``slide_id`` and ``event_id`` in context variables around each handled message,
so every line a handler logs carries them without passing them around.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(service: str, level: str = "INFO") -> None:
    global _configured
    if _configured:
        return
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO), format="%(message)s"
    )
    # Libraries log at INFO about every rebalance and connection; keep their warnings only.
    for noisy in ("aiokafka", "kafka", "urllib3", "faust", "mode", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def configure_cli_logging(level: str = "WARNING") -> dict[str, Any]:
    """JSON logs on stderr at ``level`` for the tool commands (``wsi train``, ``wsi rescore``...), whose
    stdout carries their results. Returns the previous structlog configuration so an in-process caller
    can restore it; unlike ``configure_logging`` it does not claim the process for a service."""
    previous: dict[str, Any] = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    return previous


def get_logger(**bound: Any) -> Any:
    # structlog.get_logger is lazy: binding here would freeze the default (non-JSON) configuration.
    return structlog.get_logger(**bound)
