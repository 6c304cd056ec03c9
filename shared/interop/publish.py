"""Write a prediction's results for hospital systems and announce them (docs/interoperability.md).

The recorder calls ``interop_results`` for each prediction it has recorded: it reads the slide's size,
scale and DICOM identity (what ingest recorded in ``slides.metadata``), builds the DICOM Structured
Report and attention Parametric Map (``dicom_results``) and the FHIR Bundle (``fhir``), writes them
write-once to the artifacts bucket under ``results_prefix`` and returns two ``InteropResult`` events,
one on ``wsi.results.dicom`` and one on ``wsi.results.fhir`` (keyed by slide id). Keys and UIDs derive
from the prediction id, so a redelivered prediction rewrites nothing and announces the same event ids.
A prediction whose results cannot be built (a deterministic error in the input) is logged and skipped:
it must never stop the recorder from recording; storage errors propagate and are retried.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from google.protobuf import json_format
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.interop.dicom_results import SlideContext, parametric_map, structured_report, to_bytes
from wsitk.shared.interop.fhir import Link, fhir_bundle
from wsitk.shared.logging import get_logger
from wsitk.shared.topics import RESULTS_DICOM, RESULTS_FHIR

log = get_logger()
SR_NAME, PM_NAME, FHIR_NAME = "report-sr.dcm", "attention-pm.dcm", "fhir-bundle.json"


def results_prefix(slide_id: str, tiling_run_id: str, model_version: str) -> str:
    return f"results/{slide_id}/{tiling_run_id}/{model_version}"


def slide_context(ctx: ServiceContext, slide_id: str) -> SlideContext | None:
    rows = ctx.db.execute("SELECT width, height, mpp, metadata FROM slides WHERE slide_id = %s", (slide_id,))
    if not rows or rows[0][0] is None:
        return None
    width, height, mpp, metadata = rows[0]
    parsed = json_format.ParseDict(metadata or {}, pb.SlideMetadata(), ignore_unknown_fields=True)
    dicom = parsed.dicom if parsed.HasField("dicom") else None
    return SlideContext.of(slide_id, int(width), int(height), float(mpp or 0.5), dicom)


def _ref(stored: Any) -> pb.ObjectRef:
    return pb.ObjectRef(
        bucket=stored.bucket,
        key=stored.key,
        size=stored.size,
        sha256=stored.sha256,
        etag=stored.etag,
        version_id=stored.version_id,
    )


def interop_results(ctx: ServiceContext, prediction: pb.Prediction, service: str) -> list[Outgoing]:
    """Build, store and announce the DICOM and FHIR results of ``prediction`` (module docstring)."""
    slide_id = prediction.meta.slide_id
    slide = slide_context(ctx, slide_id)
    if slide is None:
        log.warning("no slide row for a prediction; no DICOM/FHIR results", slide_id=slide_id)
        return []
    store, bucket = ctx.store, ctx.settings.artifacts_bucket
    prefix = results_prefix(slide_id, prediction.tiling_run_id, prediction.model_version)
    try:
        sr = structured_report(prediction, slide)
        pm = None
        if prediction.attention.key:
            attention = store.get_bytes(prediction.attention.bucket or bucket, prediction.attention.key)
            pm = parametric_map(prediction, slide, attention)
        sr_bytes = to_bytes(sr)
        pm_bytes = to_bytes(pm) if pm is not None else b""
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        log.error(
            "DICOM results could not be built", slide_id=slide_id, error=f"{type(error).__name__}: {error}"
        )
        return []
    stored = [store.put_if_absent(bucket, f"{prefix}/{SR_NAME}", sr_bytes, "application/dicom")]
    if pm_bytes:
        stored.append(store.put_if_absent(bucket, f"{prefix}/{PM_NAME}", pm_bytes, "application/dicom"))
    links = [
        Link(title, "application/dicom", s.bucket, s.key, s.size, _sha1(data))
        for title, s, data in zip(
            ("DICOM Structured Report", "DICOM Parametric Map (attention)"),
            stored,
            (sr_bytes, pm_bytes),
            strict=False,
        )
    ]
    if prediction.heatmap.key:
        h = prediction.heatmap
        links.append(Link("Attention heatmap (PNG)", "image/png", h.bucket or bucket, h.key, h.size))
    settings = ctx.settings
    bundle = fhir_bundle(
        prediction,
        slide_id=slide_id,
        identifier_system=settings.fhir_identifier_system,
        study_uid=slide.study_uid if slide.from_dicom else "",
        subject_reference=settings.fhir_subject_reference,
        links=links,
    )
    fhir_bytes = json.dumps(json.loads(bundle.model_dump_json()), indent=1, sort_keys=True).encode()
    fhir_stored = store.put_if_absent(bucket, f"{prefix}/{FHIR_NAME}", fhir_bytes, "application/fhir+json")
    common = {
        "prediction_id": prediction.prediction_id,
        "tiling_run_id": prediction.tiling_run_id,
        "model_version": prediction.model_version,
        "study_instance_uid": slide.study_uid,
    }
    dicom_event = pb.InteropResult(
        meta=new_meta(
            service=service, slide_id=slide_id, event_parts=["results-dicom", prediction.prediction_id]
        ),
        format="dicom",
        objects=[_ref(s) for s in stored],
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        heatmap_sop_instance_uid=str(pm.SOPInstanceUID) if pm is not None else "",
        **common,
    )
    fhir_event = pb.InteropResult(
        meta=new_meta(
            service=service, slide_id=slide_id, event_parts=["results-fhir", prediction.prediction_id]
        ),
        format="fhir",
        objects=[_ref(fhir_stored)],
        **common,
    )
    log.info("DICOM and FHIR results written", slide_id=slide_id, prediction_id=prediction.prediction_id)
    return [Outgoing(RESULTS_DICOM, slide_id, dicom_event), Outgoing(RESULTS_FHIR, slide_id, fhir_event)]


def _sha1(data: bytes) -> str:
    """FHIR's Attachment.hash: the base64 of the SHA-1 of the data."""
    return base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode() if data else ""
