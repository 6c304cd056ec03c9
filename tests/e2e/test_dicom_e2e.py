"""A DICOM whole-slide series through the bucket, end to end: its files uploaded one by one in random
order become exactly one slide and one prediction, with DICOM and FHIR results announced and
retrievable by slide id; a series missing an instance ends rejected with its reason; the patient,
accession, dates, operator, institution and barcode in the files reach no event, log or artifact."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from wsitk.shared.announce import make_bucket_event
from wsitk.shared.bus.kafka import Outgoing, make_producer, produce_all
from wsitk.shared.objectstore import S3ObjectStore
from wsitk.shared.slides.synth import SynthSpec, generate_slide
from wsitk.shared.topics import BUCKET_EVENTS

from tests.conftest import Pipeline
from tests.dicom_wsi import PHI, PHI_DATE, write_dicom_series
from tests.e2e.test_deidentification import every_record_value

pytestmark = pytest.mark.e2e


async def _publish(pipeline: Pipeline, outputs: list[Outgoing]) -> None:
    producer = make_producer(pipeline.settings())
    await producer.start()
    try:
        await produce_all(producer, outputs)
    finally:
        await producer.stop()


def _group_state(pipeline: Pipeline, prefix: str) -> list[tuple[str, str | None, str | None]]:
    return [
        (str(state), slide_id, reason)
        for state, slide_id, reason in pipeline.query(
            "SELECT state, slide_id, reason FROM upload_groups WHERE group_key LIKE %s",
            (f"dicom:{prefix}:%",),
        )
    ]


def test_dicom_series_in_random_order_is_one_slide_with_dicom_and_fhir_results(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    svs = tmp_path / "source.svs"
    generate_slide(
        svs, SynthSpec(width=2400, height=2000, mpp=0.5, fmt="svs", seed=9191, tumour_fraction=0.3)
    )
    complete = write_dicom_series(svs, tmp_path / "complete", base_parts=2)
    partial = write_dicom_series(svs, tmp_path / "partial", base_parts=2)
    run = uuid.uuid4().hex[:8]
    prefix, partial_prefix = f"dicom-{run}/case-1", f"dicom-{run}/case-2"
    uploads = [(path, f"{prefix}/{path.name}") for path in complete.files]
    # the incomplete series: the second instance of the base level's concatenation never arrives
    uploads += [(p, f"{partial_prefix}/{p.name}") for p in partial.files if p.name != "level0-part1.dcm"]
    random.Random(run).shuffle(uploads)
    for path, key in uploads:
        pipeline.upload(path, key)

    pipeline.wait_for(
        lambda: (
            [s for s, _, _ in _group_state(pipeline, prefix)] == ["ingested"]
            and [s for s, _, _ in _group_state(pipeline, partial_prefix)] == ["rejected"]
        ),
        150,
        "the complete series to be ingested and the incomplete one rejected",
    )
    ((_, slide_id, _),) = _group_state(pipeline, prefix)
    assert slide_id
    pipeline.wait_for(
        lambda: (
            pipeline.query("SELECT status FROM slides WHERE slide_id = %s", (slide_id,)) == [("predicted",)]
        ),
        240,
        "the DICOM slide's prediction",
    )
    # exactly one slide from the files of the series, and none from any single file
    keys = [key for _, key in uploads]
    assert pipeline.query("SELECT count(*) FROM slide_sources WHERE upload_key = ANY(%s)", (keys,)) == [(0,)]
    ((source_key, bucket),) = pipeline.query(
        "SELECT upload_key, bucket FROM slide_sources WHERE slide_id = %s", (slide_id,)
    )
    assert source_key == f"bundles/{prefix}/{slide_id}.zip" and bucket == pipeline.settings().artifacts_bucket
    ((predictions,),) = pipeline.query("SELECT count(*) FROM predictions WHERE slide_id = %s", (slide_id,))
    assert predictions == 1
    ((metadata,),) = pipeline.query("SELECT metadata FROM slides WHERE slide_id = %s", (slide_id,))
    assert metadata["dicom"]["study_instance_uid"] == complete.study_uid
    assert metadata["dicom"]["series_instance_uid"] == complete.series_uid
    assert metadata["source_files"] == 4 and metadata["vendor"] == "dicom"

    # the reconciler re-announces a stalled slide by its source: the bundle is ingested again as the same
    # slide, with the same deterministic SlideIngested (the recorder counts a second delivery)
    ((event_id,),) = pipeline.query(
        "SELECT event_id FROM audit_log WHERE slide_id = %s AND event_type = 'SlideIngested'", (slide_id,)
    )
    stored = S3ObjectStore(pipeline.settings()).stat(bucket, source_key)
    assert stored is not None
    again = Outgoing(
        BUCKET_EVENTS,
        f"{bucket}/{source_key}",
        raw=make_bucket_event(bucket, source_key, stored.size, stored.etag),
    )
    asyncio.run(_publish(pipeline, [again]))
    pipeline.wait_for(
        lambda: pipeline.query("SELECT deliveries FROM audit_log WHERE event_id = %s", (event_id,)) == [(2,)],
        60,
        "the re-announced bundle to be ingested again as the same event",
    )

    # the incomplete series: a public rejection that says what is missing
    def rejection() -> list[tuple[str, str, str]]:
        return pipeline.query(
            "SELECT s.status, s.reason_code, s.status_reason FROM slide_sources src JOIN slides s USING (slide_id) "
            "WHERE src.upload_key = %s",
            (f"{partial_prefix}/",),
        )

    pipeline.wait_for(lambda: bool(rejection()), 30, "the recorder to record the rejection")
    ((status, code, reason),) = rejection()
    assert (status, code) == ("rejected", "incomplete-series")
    assert "instances [2] of its concatenation of 2" in reason and partial_prefix in reason

    # results for hospital systems: announced, stored, retrievable by slide id, valid
    pipeline.wait_for(
        lambda: (
            len(
                pipeline.query(
                    "SELECT 1 FROM audit_log WHERE slide_id = %s AND event_type = 'InteropResult'",
                    (slide_id,),
                )
            )
            == 2
        ),
        60,
        "the DICOM and FHIR results events",
    )
    out = tmp_path / "export"
    for fmt in ("fhir", "dicom"):
        done = pipeline.cli("export", fmt, slide_id, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["slide_id"] == slide_id
    from fhir.resources.R4B.bundle import Bundle

    bundle = Bundle.model_validate_json((out / f"{slide_id}.fhir-bundle.json").read_text())
    resources: list[Any] = [e.resource for e in bundle.entry or []]
    report = next(r for r in resources if r.get_resource_type() == "DiagnosticReport")
    assert ("urn:dicom:uid", f"urn:oid:{complete.study_uid}") in {
        (i.system, i.value) for i in report.identifier
    }
    import pydicom

    sr = pydicom.dcmread(out / f"{slide_id}.report-sr.dcm")
    assert sr.StudyInstanceUID == complete.study_uid  # the result joins the source's study
    pm = pydicom.dcmread(out / f"{slide_id}.attention-pm.dcm")
    assert (
        pm.FrameOfReferenceUID
        == pydicom.dcmread(complete.files[0], stop_before_pixels=True).FrameOfReferenceUID
    )
    for name in ("report-sr.dcm", "attention-pm.dcm"):
        check = subprocess.run(
            ["dciodvfy", str(out / f"{slide_id}.{name}")], capture_output=True, text=True, check=False
        )
        assert not [line for line in check.stderr.splitlines() if line.startswith("Error")], check.stderr

    # identifying attributes of the files: nowhere downstream of ingest
    secrets = [*PHI.values(), PHI_DATE]
    raw = b"".join(p.read_bytes() for p in complete.files)
    assert all(s.encode() in raw for s in secrets)
    leaks = [s for value in asyncio.run(every_record_value(pipeline)) for s in secrets if s.encode() in value]
    assert not leaks, f"identifying values in events: {sorted(set(leaks))}"
    for log in (pipeline.home / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f"identifying values in {log.name}"
    store = S3ObjectStore(pipeline.settings())
    artifacts = [o for o in store.list_keys(bucket) if slide_id in o.key]
    assert any(o.key.startswith("results/") for o in artifacts) and any(
        o.key.startswith("bundles/") for o in artifacts
    )
    for obj in artifacts:
        data = store.get_bytes(bucket, obj.key)
        assert not [s for s in secrets if s.encode() in data], f"identifying values in {obj.key}"
