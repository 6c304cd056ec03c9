"""A prediction as FHIR R4 resources (``fhir.resources``' R4B models, FHIR 4.3, the R4 line).

One ``Bundle`` (type ``collection``) per prediction with:

- a ``Device`` for the model: name ``wsitk-mil`` (type ``model-name``), version = the model version;
- an ``Observation`` (status ``final``): the tumour probability as ``valueQuantity`` (UCUM ``1``), the
  label as ``interpretation`` and as a component (SNOMED CT 108369006 "Neoplasm" / 17621005 "Normal"),
  the decision threshold and the number of tiles scored as components, ``device`` -> the Device;
- a ``DiagnosticReport`` (status ``final``, category pathology ``PAT``) with the Observation as its
  result, the label as ``conclusion`` and ``conclusionCode``, and ``presentedForm`` attachments linking
  to the DICOM Structured Report, the Parametric Map and the heatmap PNG (``s3://bucket/key`` URLs,
  with size and SHA-1 hash as FHIR wants it), and the DICOM study UID as an identifier
  (``urn:dicom:uid``) so results link back to the archive.

Identifiers are configuration, never file content: the slide id under ``WSI_FHIR_IDENTIFIER_SYSTEM``,
the prediction id, the study UID (pseudonymised when ingest pseudonymised it), and a subject only
when the integration sets ``WSI_FHIR_SUBJECT_REFERENCE``. Resource ids are UUIDs derived from the
prediction id: the same prediction always gives the same Bundle.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wsitk.shared.contracts import pb
from wsitk.shared.interop.dicom_results import ALGORITHM_NAME, LABEL_CODES, MANUFACTURER

CODE_SYSTEM = "urn:wsitk:codes"
PREDICTION_ID_SYSTEM = "urn:wsitk:prediction"
_NAMESPACE = uuid.UUID("5b0c8a54-4a8f-4d55-9a6e-0f3b4f7d2c11")


@dataclass(frozen=True)
class Link:
    """An object the report links to: what it is, where it is, its size and digest."""

    title: str
    content_type: str
    bucket: str
    key: str
    size: int
    sha1_b64: str = ""


def _id(prediction_id: str, kind: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{prediction_id}/{kind}"))


def _label_concept(label: str) -> dict[str, Any]:
    code, _, meaning = LABEL_CODES.get(label, (label, "", label))
    system = "http://snomed.info/sct" if label in LABEL_CODES else CODE_SYSTEM
    return {"coding": [{"system": system, "code": code, "display": meaning}], "text": label}


def _local(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": CODE_SYSTEM, "code": code, "display": display}], "text": display}


def fhir_bundle(
    prediction: pb.Prediction,
    *,
    slide_id: str,
    identifier_system: str,
    study_uid: str = "",
    subject_reference: str = "",
    links: list[Link] | None = None,
) -> Any:
    """The prediction as a FHIR Bundle (module docstring); a validated ``fhir.resources`` model."""
    from fhir.resources.R4B.bundle import Bundle

    pid = prediction.prediction_id
    device_id, observation_id, report_id = _id(pid, "device"), _id(pid, "observation"), _id(pid, "report")
    issued = (
        prediction.meta.produced_at.ToDatetime(tzinfo=UTC)
        if prediction.meta.HasField("produced_at")
        else datetime.now(UTC)
    ).isoformat()
    subject = {"subject": {"reference": subject_reference}} if subject_reference else {}
    slide_identifier = {"system": identifier_system, "value": slide_id}
    device = {
        "resourceType": "Device",
        "id": device_id,
        "manufacturer": MANUFACTURER,
        "deviceName": [{"name": ALGORITHM_NAME, "type": "model-name"}],
        "version": [{"value": prediction.model_version or "unknown"}],
        "type": _local("mil-model", "Slide-level MIL model"),
    }
    observation = {
        "resourceType": "Observation",
        "id": observation_id,
        "identifier": [{"system": PREDICTION_ID_SYSTEM, "value": pid}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": _local("tumour-probability", "Tumour probability (whole-slide MIL)"),
        **subject,
        "focus": [{"identifier": slide_identifier, "display": "whole-slide image"}],
        "issued": issued,
        "valueQuantity": {
            "value": round(float(prediction.probability), 6),
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        },
        "interpretation": [_label_concept(prediction.label)],
        "device": {"reference": f"urn:uuid:{device_id}"},
        "component": [
            {
                "code": _local("label", "Slide label"),
                "valueCodeableConcept": _label_concept(prediction.label),
            },
            {
                "code": _local("threshold", "Decision threshold"),
                "valueQuantity": {
                    "value": round(float(prediction.threshold), 6),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            },
            {"code": _local("tiles-scored", "Tiles scored"), "valueInteger": int(prediction.tiles_scored)},
        ],
    }
    identifiers = [slide_identifier, {"system": PREDICTION_ID_SYSTEM, "value": pid}]
    if study_uid:
        identifiers.append({"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"})
    report = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": identifiers,
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "PAT"}]}
        ],
        "code": _local("wsi-mil-report", "Whole-slide image MIL analysis"),
        **subject,
        "issued": issued,
        "result": [{"reference": f"urn:uuid:{observation_id}"}],
        "conclusion": f"{prediction.label} (probability {prediction.probability:.3f}, threshold "
        f"{prediction.threshold:.3f}; model {prediction.model_version})",
        "conclusionCode": [_label_concept(prediction.label)],
        "presentedForm": [
            {
                "contentType": link.content_type,
                "url": f"s3://{link.bucket}/{link.key}",
                "size": link.size,
                **({"hash": link.sha1_b64} if link.sha1_b64 else {}),
                "title": link.title,
            }
            for link in links or []
        ],
    }
    if not report["presentedForm"]:
        del report["presentedForm"]
    bundle = {
        "resourceType": "Bundle",
        "id": _id(pid, "bundle"),
        "type": "collection",
        "timestamp": issued,
        "entry": [
            {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}
            for resource in (report, observation, device)
        ],
    }
    return Bundle.model_validate(bundle)
