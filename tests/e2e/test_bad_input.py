"""The bad-input corpus through the real pipeline: each bad file gets a clear rejection, tricky keys and
duplicates are handled, malformed events on every topic are dead-lettered, and good slides uploaded
in the same batch are not held back. The corpus is generated here; nothing large is committed."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest
from wsitk.shared.bus.kafka import Outgoing, make_producer, produce_all
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import BUCKET_EVENTS, topic_table

from tests.conftest import Pipeline
from tests.e2e.test_e2e_pipeline import all_terminal
from tests.unit.test_slides_reader import write_tiff_claiming, write_tiff_with_huge_description

pytestmark = pytest.mark.e2e


def good_slide(folder: Path, name: str, seed: int) -> Path:
    path = folder / name
    generate_slide(
        path, SynthSpec(width=2400, height=2000, mpp=0.5, fmt="svs", seed=seed, tumour_fraction=0.2)
    )
    return path


def test_bad_files_are_rejected_with_reasons_and_hold_nothing_back(
    pipeline: Pipeline, fixtures_dir: Path, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    good = good_slide(tmp_path, "good.svs", seed=900)
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "notes.svs").write_text("Patient notes, not a slide\n" * 50)
    data = good.read_bytes()
    (tmp_path / "truncated.svs").write_bytes(data[: len(data) // 3])
    write_tiff_claiming(tmp_path / "bomb.tiff", side=1_000_000)
    write_tiff_with_huge_description(tmp_path / "huge-metadata.tiff")
    shutil.copy(fixtures_dir / "unopenable.tiff", tmp_path / "unopenable.tiff")
    shutil.copy(fixtures_dir / "unreadable.svs", tmp_path / "unreadable.svs")
    expected = {
        "empty.svs": "empty-file",
        "notes.svs": "not-a-slide",
        "truncated.svs": None,  # any rejection code: what OpenSlide trips over first depends on the cut
        "bomb.tiff": "absurd-dimensions",
        "huge-metadata.tiff": "metadata-too-large",
        "unopenable.tiff": None,
        "unreadable.svs": "unreadable-pixels",
    }
    keys = {name: f"bad-{run}/{name}" for name in expected}
    good_key = f"bad-{run}/good.svs"
    pipeline.upload(good, good_key)
    for name, key in keys.items():
        pipeline.upload(tmp_path / name, key)

    everything = [good_key, *keys.values()]
    pipeline.wait_for(lambda: all_terminal(pipeline, everything), 240, "every upload to reach an outcome")
    statuses = pipeline.statuses(everything)
    assert statuses[good_key] == "predicted"
    for name, key in keys.items():
        assert statuses[key] == "rejected", (name, statuses[key])
        ((code, reason),) = pipeline.query(
            "SELECT s.reason_code, s.status_reason FROM slides s JOIN slide_sources src USING (slide_id) "
            "WHERE src.upload_key = %s",
            (key,),
        )
        if expected[name]:
            assert code == expected[name], (name, code, reason)
        assert key in reason, f"the reason for {name} must name the upload: {reason}"
        assert len(reason) > 40, f"not an actionable reason: {reason}"


def upload_any_key(pipeline: Pipeline, path: Path, key: str) -> None:
    """Upload with boto3, which (unlike the minio client) sends any key the S3 API allows."""
    import boto3

    settings = pipeline.settings()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{settings.s3_endpoint}",
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret(),
        region_name=settings.s3_region,
    )
    client.upload_file(str(path), settings.uploads_bucket, key)


def rejected_reason(pipeline: Pipeline, key: str) -> str | None:
    rows = pipeline.query(
        "SELECT s.status_reason FROM slides s JOIN slide_sources src USING (slide_id) "
        "WHERE src.upload_key = %s AND s.status = 'rejected'",
        (key,),
    )
    return rows[0][0] if rows else None


def test_tricky_keys_duplicates_and_overwrites(pipeline: Pipeline, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    first = good_slide(tmp_path, "first.svs", seed=910)
    second = good_slide(tmp_path, "second.svs", seed=911)
    tricky = [
        f"tricky-{run}/ünïcödé näme/slide with spaces.svs",
        f"tricky-{run}/%2e%2e%2fencoded.svs",
        f"tricky-{run}/a+b=c&d;e'f.svs",
    ]
    for key in tricky:
        upload_any_key(pipeline, first, key)  # the same content under three names: one slide
    refused = [
        f"tricky-{run}/../../../etc/passwd.svs",
        f"/tricky-{run}/absolute.svs",
        f"tricky-{run}//empty.svs",
    ]
    for key in refused:
        upload_any_key(pipeline, first, key)
    overwritten = f"tricky-{run}/case-1.svs"
    pipeline.upload(first, overwritten)
    pipeline.wait_for(
        lambda: all_terminal(pipeline, [*tricky, *refused, overwritten]), 240, "the tricky keys to finish"
    )
    statuses = pipeline.statuses([*tricky, *refused])
    assert {statuses[k] for k in tricky} == {"predicted"}, statuses
    assert all("path segment" in (rejected_reason(pipeline, key) or "") for key in refused), statuses
    pipeline.upload(second, overwritten)  # a different file under an existing key: a new slide

    def overwrite_done() -> bool:
        rows = pipeline.query(
            "SELECT s.status FROM slide_sources src JOIN slides s USING (slide_id) WHERE src.upload_key = %s",
            (overwritten,),
        )
        return len(rows) == 2 and all(r[0] == "predicted" for r in rows)

    pipeline.wait_for(overwrite_done, 240, "the overwritten key's new content to be processed")
    slide_ids = {
        sid
        for (sid,) in pipeline.query(
            "SELECT slide_id FROM slide_sources WHERE upload_key = ANY(%s)", (tricky,)
        )
    }
    assert len(slide_ids) == 1, "identical content must be one slide, whatever its keys"
    (only,) = slide_ids
    sources = pipeline.query("SELECT upload_key FROM slide_sources WHERE slide_id = %s", (only,))
    assert {k for (k,) in sources} >= set(tricky)
    assert pipeline.query("SELECT count(*) FROM predictions WHERE slide_id = %s", (only,))[0][0] == 1
    versions = pipeline.query(
        "SELECT DISTINCT slide_id FROM slide_sources WHERE upload_key = %s", (overwritten,)
    )
    assert len(versions) == 2 and only in {v for (v,) in versions}
    # Nothing was written outside the cache directory by the path-like keys.
    assert not (pipeline.home / "etc").exists() and not Path("/etc/passwd.svs").exists()


def test_malformed_and_wrong_version_events_on_every_topic_are_dead_lettered(pipeline: Pipeline) -> None:
    settings = pipeline.settings()
    run = uuid.uuid4().hex[:8]
    outputs = []
    for name in topic_table():
        outputs.append(Outgoing(name, f"garbage-{run}-{name}", raw=b"\x00\xffnot an event\x13"))
        if name != BUCKET_EVENTS:
            spec = topic_table()[name]
            message = {
                "SlideIngested": pb.SlideIngested,
                "SlideRejected": pb.SlideRejected,
                "TilePlan": pb.TilePlan,
                "TileShard": pb.TileShard,
                "QcResult": pb.QcResult,
                "ShardEmbedding": pb.ShardEmbedding,
                "Prediction": pb.Prediction,
                "SlideFailed": pb.SlideFailed,
                "DeadLetter": pb.DeadLetter,
                "InteropResult": pb.InteropResult,
            }[spec.message](
                meta=new_meta(service="test", slide_id=f"future-{run}-{name}", event_parts=["v2"])
            )
            message.meta.schema_version = 2
            outputs.append(Outgoing(name, f"future-{run}-{name}", message))

    async def publish() -> None:
        producer = make_producer(settings)
        await producer.start()
        try:
            await produce_all(producer, outputs)
        finally:
            await producer.stop()

    asyncio.run(publish())

    def letters() -> dict[str, set[str]]:
        rows = pipeline.query(
            "SELECT source_topic, slide_id FROM dead_letters WHERE slide_id LIKE %s OR slide_id LIKE %s",
            (f"garbage-{run}-%", f"future-{run}-%"),
        )
        found: dict[str, set[str]] = {}
        for source_topic, slide_id in rows:
            found.setdefault(source_topic, set()).add(slide_id.split("-")[0])
        return found

    every_topic = set(topic_table())
    pipeline.wait_for(
        lambda: (
            set(letters()) == every_topic
            and all(
                kinds == ({"garbage"} if t == BUCKET_EVENTS else {"garbage", "future"})
                for t, kinds in letters().items()
            )
        ),
        240,
        "garbage and future-version events on every topic to be dead-lettered",
    )
    errors = [
        e
        for (e,) in pipeline.query(
            "SELECT error FROM dead_letters WHERE slide_id LIKE %s", (f"future-{run}-%",)
        )
    ]
    assert errors and all("schema_version 2" in e for e in errors)
    assert all(pipeline.pids().values()), "a service died on malformed input"
