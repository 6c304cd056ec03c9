"""DICOM whole-slide instances: what a file declares about its series, and a de-identified copy of it.

``describe_instance`` reads a file's header (never its pixels) and returns the facts ingest needs to group
the files of a series and decide when the series is complete: the Study, Series and SOP Instance UIDs,
the image type (VOLUME levels, LABEL, OVERVIEW, THUMBNAIL), the total pixel matrix and tile size, the
number of frames, and the concatenation an instance belongs to.

``deidentified_copy`` writes the file again with its identifying attributes emptied, streaming the pixel
data through unchanged (bounded memory for multi-gigabyte levels). The policy, applied recursively into
sequences: every private element is removed; every person name (VR PN: patient, operators, physicians)
and every date and time (VR DA, DT, TM) is emptied; the identifiers and free text in
``IDENTIFYING_KEYWORDS`` (patient id, accession number, study id, institution, station, device serial
number, the container's barcode, the specimen identifiers, descriptions and comments) are emptied.
UIDs stay: they identify objects, not people, and they link results back to the hospital's archive; with
a pseudonymisation key (``WSI_DICOM_UID_KEY``) every non-standard UID is replaced by a keyed hash of it
(``2.25.<decimal>``), consistently across the files of a series, so the hospital (which holds the key) can
still link back. LABEL and OVERVIEW instances (photographs of the label) are dropped by ingest before it
writes the slide's bundle, as associated images are never read.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsitk.shared.contracts import pb

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
STANDARD_UID_ROOT = "1.2.840.10008."

IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientAge",
        "PatientSex",
        "PatientWeight",
        "PatientSize",
        "PatientComments",
        "MedicalRecordLocator",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyID",
        "StudyDescription",
        "SeriesDescription",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "StationName",
        "DeviceSerialNumber",
        "ContainerIdentifier",
        "IssuerOfTheContainerIdentifierSequence",
        "AlternateContainerIdentifierSequence",
        "SpecimenIdentifier",
        "IssuerOfTheSpecimenIdentifierSequence",
        "SpecimenShortDescription",
        "SpecimenDetailedDescription",
        "ImageComments",
        "DerivationDescription",
        "RequestAttributesSequence",
        "ReferencedPatientSequence",
        "ReferencedStudySequence",
        "AdmissionID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "PerformedProcedureStepDescription",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSiteName",
    }
)
_EMPTIED_VRS = frozenset({"PN", "DA", "DT", "TM"})


@dataclass(frozen=True)
class InstanceInfo:
    """What one file of a DICOM whole-slide series declares (header only)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    image_flavor: str  # ImageType value 3: VOLUME, LABEL, OVERVIEW, THUMBNAIL
    derived: str  # ImageType value 4: NONE (the original resolution) or RESAMPLED
    total_columns: int
    total_rows: int
    columns: int
    rows: int
    frames: int
    focal_planes: int
    optical_paths: int
    organization: str  # TILED_FULL or TILED_SPARSE
    concatenation_uid: str
    concatenation_number: int
    concatenation_total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @property
    def expected_frames(self) -> int:
        """Frames the whole level holds when tiled fully (0 when the organisation does not say)."""
        if self.organization != "TILED_FULL" or not self.columns or not self.rows:
            return 0
        across = -(-self.total_columns // self.columns)
        down = -(-self.total_rows // self.rows)
        return across * down * max(self.focal_planes, 1) * max(self.optical_paths, 1)


def is_dicom(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def describe_instance(path: Path) -> InstanceInfo | None:
    """The header facts of ``path``; None when it is not a DICOM file pydicom can read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]

    def number(keyword: str) -> int:
        try:
            return int(ds.get(keyword, 0) or 0)
        except (TypeError, ValueError):
            return 0

    return InstanceInfo(
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        image_flavor=image_type[2] if len(image_type) > 2 else "",
        derived=image_type[3] if len(image_type) > 3 else "",
        total_columns=number("TotalPixelMatrixColumns"),
        total_rows=number("TotalPixelMatrixRows"),
        columns=number("Columns"),
        rows=number("Rows"),
        frames=number("NumberOfFrames") or 1,
        focal_planes=number("TotalPixelMatrixFocalPlanes") or 1,
        optical_paths=number("NumberOfOpticalPaths") or 1,
        organization=str(ds.get("DimensionOrganizationType", "")).upper(),
        concatenation_uid=str(ds.get("ConcatenationUID", "")),
        concatenation_number=number("InConcatenationNumber"),
        concatenation_total=number("InConcatenationTotalNumber"),
    )


def pseudonymise_uid(uid: str, key: str) -> str:
    """A keyed hash of ``uid`` as a valid UID (``2.25.<decimal>``); standard UIDs and no key: unchanged."""
    if not key or not uid or uid.startswith(STANDARD_UID_ROOT):
        return uid
    digest = hmac.new(key.encode(), uid.encode(), hashlib.sha256).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def deidentify_dataset(ds: Any, uid_key: str = "") -> None:
    """Apply the module's policy to ``ds`` in place (recursively)."""
    ds.remove_private_tags()
    for element in list(ds):
        if element.VR == "SQ":
            if element.keyword in IDENTIFYING_KEYWORDS:
                element.value = []
                continue
            for item in element.value:
                deidentify_dataset(item, uid_key)
        elif element.tag == 0x7FE00010:
            continue
        elif element.VR in _EMPTIED_VRS or element.keyword in IDENTIFYING_KEYWORDS:
            element.value = ""
        elif element.VR == "UI" and uid_key and element.value:
            values = element.value if element.VM > 1 else [element.value]
            mapped = [pseudonymise_uid(str(v), uid_key) for v in values]
            element.value = mapped if element.VM > 1 else mapped[0]


def deidentified_copy(source: Path, dest: Path, uid_key: str = "") -> None:
    """Write ``source`` to ``dest`` with its header de-identified and its pixel data copied as stored."""
    import pydicom

    with source.open("rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        pixels_at = handle.tell()
        deidentify_dataset(ds, uid_key)
        if uid_key:
            ds.file_meta.MediaStorageSOPInstanceUID = pseudonymise_uid(  # type: ignore[assignment]
                str(ds.file_meta.MediaStorageSOPInstanceUID), uid_key
            )
        header = io.BytesIO()
        ds.save_as(header, enforce_file_format=True)
        with dest.open("wb") as out:
            out.write(header.getvalue())
            handle.seek(pixels_at)
            shutil.copyfileobj(handle, out, 8 * 1024 * 1024)


def dicom_identity(path: Path) -> dict[str, str] | None:
    """The UIDs of a DICOM slide's main file (``DicomSource``'s fields), None for any other file."""
    with path.open("rb") as handle:
        if not is_dicom(handle.read(132)):
            return None
    info = describe_instance(path)
    if info is None:
        return None
    return {
        "study_instance_uid": info.study_uid,
        "series_instance_uid": info.series_uid,
        "frame_of_reference_uid": info.frame_of_reference_uid,
        "sop_instance_uid": info.sop_instance_uid,
        "sop_class_uid": info.sop_class_uid,
    }


def pseudonymised_dicom_source(identity: dict[str, str], uid_key: str) -> pb.DicomSource:
    """``DicomSource`` from ``dicom_identity``'s UIDs, each pseudonymised when a key is set."""
    return pb.DicomSource(
        **{
            name: value if name == "sop_class_uid" else pseudonymise_uid(value, uid_key)
            for name, value in identity.items()
        },
        uids_pseudonymised=bool(uid_key),
    )
