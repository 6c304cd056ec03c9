"""The topic table (shared/topics.toml) as typed objects.

One table feeds the local stack, the services and the Kubernetes KafkaTopic resources, so a topic's
partitions, retention and size limit are written down exactly once.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

BUCKET_EVENTS = "wsi.bucket-events"
SLIDES_INGESTED = "wsi.slides.ingested"
SLIDES_REJECTED = "wsi.slides.rejected"
TILE_PLANS = "wsi.tiles.plans"
TILE_SHARDS = "wsi.tiles.shards"
QC_RESULTS = "wsi.qc.results"
EMBEDDINGS = "wsi.embeddings"
PREDICTIONS = "wsi.predictions"
SLIDES_FAILED = "wsi.slides.failed"
DEADLETTER = "wsi.deadletter"
RESULTS_DICOM = "wsi.results.dicom"
RESULTS_FHIR = "wsi.results.fhir"


@dataclass(frozen=True)
class Topic:
    name: str
    message: str
    encoding: str
    partitions: int
    key: str
    max_message_bytes: int
    retention_hours: int
    replication_factor: int
    public: bool = False
    compaction: bool = False
    doc: str = ""

    @property
    def retention_ms(self) -> int:
        return self.retention_hours * 3600 * 1000


@cache
def topic_table() -> dict[str, Topic]:
    """Every topic of the pipeline, by name, from shared/topics.toml."""
    raw = tomllib.loads(resources.files("wsitk.shared").joinpath("topics.toml").read_text())
    defaults = raw.get("defaults", {})
    table: dict[str, Topic] = {}
    for name, spec in raw["topics"].items():
        merged = {**defaults, **spec}
        table[name] = Topic(
            name=name,
            message=merged["message"],
            encoding=merged["encoding"],
            partitions=int(merged["partitions"]),
            key=merged["key"],
            max_message_bytes=int(merged["max_message_bytes"]),
            retention_hours=int(merged["retention_hours"]),
            replication_factor=int(merged["replication_factor"]),
            public=bool(merged.get("public", False)),
            compaction=bool(merged.get("compaction", False)),
            doc=str(merged.get("doc", "")),
        )
    return table


def topic(name: str) -> Topic:
    try:
        return topic_table()[name]
    except KeyError:
        raise KeyError(f"topic {name!r} is not in shared/topics.toml") from None
