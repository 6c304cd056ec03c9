"""Stages run as several members of one consumer group on one machine (``wsi services up --replicas``).

Two tiler and two embedder members share their partitions: several slides give exactly one
prediction each and both members of each stage did work. Scaling back to one member hands every
partition to the first, and each member's lag gauge reports only the partitions it owns.
"""

from __future__ import annotations

import hashlib
import re
import urllib.request
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from wsitk.shared.ops import replica_status
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import QC_RESULTS, SLIDES_INGESTED, topic

from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e


def scrape(pipeline: Pipeline, instance: str) -> str:
    port = pipeline.metrics_port(instance)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def owned_partitions(pipeline: Pipeline, instance: str, topic_name: str) -> set[int]:
    """Partitions of ``topic_name`` for which the member exports a lag series (what it owns now)."""
    owned = set()
    for labels in re.findall(
        r"^wsi_consumer_lag_messages\{([^}]*)\}", scrape(pipeline, instance), re.MULTILINE
    ):
        values = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if values.get("topic") == topic_name:
            owned.add(int(values["partition"]))
    return owned


def serving(pipeline: Pipeline, instance: str) -> bool:
    try:
        return pipeline.ready(instance)
    except (AssertionError, OSError):  # not started or not serving yet
        return False


def consumed(pipeline: Pipeline, instance: str, topic_name: str) -> float:
    pattern = rf'^wsi_events_consumed_total\{{[^}}]*topic="{re.escape(topic_name)}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, scrape(pipeline, instance), re.MULTILINE))


def split_between(pipeline: Pipeline, members: tuple[str, str], topic_name: str) -> bool:
    try:
        first, second = (owned_partitions(pipeline, m, topic_name) for m in members)
    except (AssertionError, OSError):  # a member not started or not serving yet
        return False
    everything = set(range(topic(topic_name).partitions))
    return bool(first) and bool(second) and not first & second and first | second == everything


def partition_of(slide_id: str, topic_name: str) -> int:
    return (murmur2(slide_id.encode()) & 0x7FFFFFFF) % topic(topic_name).partitions


def slides_for_both(folder: Path, owners: list[set[int]]) -> list[Path]:
    """Small slides whose ids (content digests) land on partitions of each member, two per member."""
    chosen: list[Path] = []
    wanted = [2] * len(owners)
    for seed in range(700, 760):
        if not any(wanted):
            break
        path = folder / f"replica-{seed}.svs"
        generate_slide(path, SynthSpec(width=1600, height=1400, mpp=0.5, seed=seed, tumour_fraction=0.2))
        slide_id = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        member = next(i for i, parts in enumerate(owners) if partition_of(slide_id, SLIDES_INGESTED) in parts)
        if wanted[member]:
            wanted[member] -= 1
            chosen.append(path)
        else:
            path.unlink()
    assert not any(wanted), "could not generate slides for every member's partitions"
    return chosen


def test_two_tilers_and_two_embedders_share_the_work_exactly_once_and_scale_back(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    stages = ("tiler", "embedder")
    pipeline.wait_for(lambda: all(serving(pipeline, s) for s in stages), 120, "the tiler and embedder")
    before = {
        stage: consumed(pipeline, stage, SLIDES_INGESTED if stage == "tiler" else QC_RESULTS)
        for stage in stages
    }
    pipeline.start(stages, replicas={"tiler": 2, "embedder": 2})
    try:
        assert {"tiler", "tiler-2", "embedder", "embedder-2"} <= set(replica_status(stages))
        pipeline.wait_for(
            lambda: (
                split_between(pipeline, ("tiler", "tiler-2"), SLIDES_INGESTED)
                and split_between(pipeline, ("embedder", "embedder-2"), QC_RESULTS)
            ),
            120,
            "the tiler's and the embedder's partitions to be split between their two members",
        )
        owners = [owned_partitions(pipeline, m, SLIDES_INGESTED) for m in ("tiler", "tiler-2")]
        slides = slides_for_both(tmp_path, owners)
        keys = [f"replicas/{path.name}" for path in slides]
        for path, key in zip(slides, keys, strict=True):
            pipeline.upload(path, key)
        pipeline.wait_for(
            lambda: (
                set(pipeline.statuses(keys).values()) == {"predicted"}
                and len(pipeline.statuses(keys)) == len(keys)
            ),
            300,
            "every slide to be predicted",
        )
        rows = pipeline.query(
            "SELECT src.upload_key, count(p.*) FROM slide_sources src "
            "LEFT JOIN predictions p USING (slide_id) WHERE src.upload_key = ANY(%s) GROUP BY 1",
            (keys,),
        )
        assert dict(rows) == dict.fromkeys(keys, 1), rows
        # Each member did a share: the second members started in this test, the first had counts before.
        assert consumed(pipeline, "tiler-2", SLIDES_INGESTED) >= 2
        assert consumed(pipeline, "tiler", SLIDES_INGESTED) - before["tiler"] >= 2
        assert consumed(pipeline, "embedder-2", QC_RESULTS) > 0
        assert consumed(pipeline, "embedder", QC_RESULTS) - before["embedder"] > 0
    finally:
        pipeline.start(stages, replicas={"tiler": 1, "embedder": 1})  # scale back: stops the second members
    assert set(replica_status(stages)) == {"tiler", "embedder"}
    every = set(range(topic(SLIDES_INGESTED).partitions))
    pipeline.wait_for(
        lambda: owned_partitions(pipeline, "tiler", SLIDES_INGESTED) == every,
        60,
        "the remaining tiler to own (and report the lag of) every partition",
    )


def test_replica_counts_are_parsed_and_bad_ones_refused_readably() -> None:
    from wsitk.shared.ops import instance_names, parse_replicas

    assert parse_replicas("tiler=2, quality-filter=3,embedder=1") == {
        "tiler": 2,
        "quality-filter": 3,
        "embedder": 1,
    }
    assert instance_names("quality-filter", 3) == ["quality-filter", "quality-filter-2", "quality-filter-3"]
    for text, words in (
        ("tiler", "needs a count"),
        ("tiler=0", "needs a count"),
        ("tiler=two", "needs a count"),
        ("tilr=2", "unknown service 'tilr'"),
        ("viewer=2", "runs as one process"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_replicas(text)
