"""Which module may read and write which table: docs/design.md, "Tables and who may use them", as data.

Every SQL statement in ``shared/`` and ``services/`` sits in one of the modules of ``SQL_MODULES`` and
touches only the tables listed there for it. ``tests/unit/test_table_rules.py`` finds the statements in
the code and checks them against this table, checks that every table the migrations create belongs to
one group of ``TABLE_GROUPS``, and that docs/design.md's table names the same groups and modules.
PostgreSQL's own catalogues (``pg_roles``, ...) are not the project's tables and are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

# The recorder's record of every slide, run, stage, prediction and event.
RECORDS = frozenset(
    {
        "slides",
        "slide_sources",
        "slide_runs",
        "stage_progress",
        "qc_summaries",
        "predictions",
        "dead_letters",
        "audit_log",
    }
)
SCORES = frozenset({"scorer_plans", "scorer_shards"})  # the mil-scorer's per-(slide, run) state
INTAKE = frozenset({"poller_seen_objects", "upload_groups", "upload_group_parts"})  # ingest's upload ledger
DELIVERY = frozenset({"delivery_attempts"})  # every consumer's attempt counts
MODELS = frozenset({"model_versions", "model_events"})  # the model registry
CORRECTIONS = frozenset({"slide_mpp_overrides"})  # `wsi mpp`
VIEWS = frozenset({"v_slide_status", "v_predictions", "v_model_versions"})  # stable views for people
MIGRATIONS = frozenset({"schema_migrations"})  # what `wsi db migrate` applied

TABLE_GROUPS: dict[str, frozenset[str]] = {
    "records": RECORDS,
    "scores": SCORES,
    "intake": INTAKE,
    "delivery": DELIVERY,
    "models": MODELS,
    "corrections": CORRECTIONS,
    "views": VIEWS,
    "migrations": MIGRATIONS,
}

# What the viewer's role may SELECT (migration 0004 grants ``wsi_readonly`` exactly these).
VIEWER_READS = frozenset(
    {"slides", "slide_sources", "slide_runs", "predictions", "qc_summaries", "model_versions"} | VIEWS
)


@dataclass(frozen=True)
class Access:
    """The tables one module may read and write; a table written may also be read."""

    reads: frozenset[str]
    writes: frozenset[str] = frozenset()


# Module (path from the repository root) -> its tables. A module not listed holds no SQL.
SQL_MODULES: dict[str, Access] = {
    # The owners: each group's writes in one module.
    "shared/db/records.py": Access(reads=RECORDS, writes=RECORDS),  # the recorder; its deadline read
    "shared/db/scores.py": Access(reads=SCORES, writes=SCORES),  # the mil-scorer and `wsi rescore`
    # ingest: its ledger and groups; is this content known under another key, which slides stalled
    "shared/db/intake.py": Access(reads=INTAKE | {"slides", "slide_sources", "slide_runs"}, writes=INTAKE),
    "shared/bus/delivery.py": Access(reads=DELIVERY, writes=DELIVERY),  # AttemptLedger
    "shared/models/registry.py": Access(reads=MODELS, writes=MODELS),  # `wsi model`; the active version
    # `wsi mpp` writes the overrides; `wsi reprocess` and ingest's reconciler read what a slide is
    "shared/corrections.py": Access(
        reads=CORRECTIONS | {"slides", "slide_sources", "slide_runs"}, writes=CORRECTIONS
    ),
    "shared/db/migrate.py": Access(reads=MIGRATIONS, writes=MIGRATIONS),  # `wsi db migrate`, `wsi db wait`
    # Readers with queries of their own.
    # `wsi status`; `wsi redrive` marks a dead letter replayed and clears the message's attempt count
    "shared/ops.py": Access(reads=RECORDS | VIEWS | DELIVERY, writes=frozenset({"dead_letters"}) | DELIVERY),
    "shared/interop/publish.py": Access(
        reads=frozenset({"slides"})
    ),  # the recorder's results: size, metadata
    "services/viewer/repository.py": Access(reads=VIEWER_READS),  # its own read-only role
}
