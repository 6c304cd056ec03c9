"""The embedded local stack: Kafka-API broker (Tansu), PostgreSQL (pgserver) and S3 (moto) on loopback.

Import from here; the submodules import their servers' client libraries only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsitk.shared.stack.cli import add_stack_arguments, cli_stack
    from wsitk.shared.stack.local import (
        LocalStack,
        StackInfo,
        ensure_buckets,
        ensure_database,
        ensure_topics,
        stack_status,
        start_component,
        start_stack,
        stop_component,
        stop_stack,
    )

__all__ = [
    "LocalStack",
    "StackInfo",
    "add_stack_arguments",
    "cli_stack",
    "ensure_buckets",
    "ensure_database",
    "ensure_topics",
    "stack_status",
    "start_component",
    "start_stack",
    "stop_component",
    "stop_stack",
]


def __getattr__(name: str) -> Any:
    """Lazy re-exports, so ``import wsitk.shared.stack.s3server`` (the S3 process) stays light."""
    if name in ("add_stack_arguments", "cli_stack"):
        from wsitk.shared.stack import cli

        return getattr(cli, name)
    if name in __all__:
        from wsitk.shared.stack import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
