"""A prediction as DICOM: a Structured Report (highdicom) and the attention heatmap as a Parametric Map.

The Structured Report (Comprehensive SR, TID 1500 measurement report) holds one measurement group for
the slide: the tumour probability, the decision threshold and the number of tiles scored as numeric
measurements, the label as a qualitative evaluation (SNOMED CT 108369006 "Neoplasm" or 17621005
"Normal"), the model version as the algorithm (name ``wsitk-mil``, version = the model version), and
the source image it refers to. Codes the standard has no concept for use the local coding scheme
``99WSITK`` (``LOCAL_CODES``).

The attention heatmap is a Parametric Map (float32, one pixel per tile at the tiler's tile size at level
0, values = attention relative to the slide's maximum, 0 where no tile was scored) on the slide's frame
of reference, with its pixel spacing in millimetres.

Both objects belong to the source's study and frame of reference when the slide came in as DICOM (the
UIDs from ``SlideMetadata.dicom``, pseudonymised or not as ingest recorded them) and reference its
original-resolution instance; for any other slide they get a study, series, frame of reference and
source image UID derived from the slide id (``derived_uid``), so the same slide always maps to the
same study. Patient attributes are left empty (type 2): nothing identifying is copied in; an
integration engine fills in the patient by the study UID if the archive needs it. Every UID of an
output is derived from the prediction id: writing the results again gives the same objects.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.contracts import pb

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
MANUFACTURER = "WSI Toolkit"
ALGORITHM_NAME = "wsitk-mil"
LOCAL_SCHEME = "99WSITK"
LOCAL_CODES = {
    "probability": ("WSI001", "Tumour probability"),
    "threshold": ("WSI002", "Decision threshold"),
    "tiles": ("WSI003", "Tiles scored"),
    "classification": ("WSI004", "Slide classification"),
    "procedure": ("WSI005", "Whole slide image MIL analysis"),
    "attention": ("WSI006", "MIL attention"),
}
# highdicom narrates every object it builds at INFO on the root handlers; services log JSON only.
logging.getLogger("highdicom").setLevel(logging.WARNING)
LABEL_CODES = {"tumour": ("108369006", "SCT", "Neoplasm"), "normal": ("17621005", "SCT", "Normal")}


def derived_uid(*parts: str) -> str:
    """A UID (``2.25.<decimal>``) derived from ``parts``: the same inputs always give the same UID."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


@dataclass(frozen=True)
class SlideContext:
    """What the results need of a slide: its id, size, scale and DICOM identity."""

    slide_id: str
    width: int
    height: int
    mpp: float
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    source_sop_instance_uid: str
    from_dicom: bool

    @classmethod
    def of(
        cls, slide_id: str, width: int, height: int, mpp: float, dicom: pb.DicomSource | None
    ) -> SlideContext:
        if dicom is not None and dicom.study_instance_uid:
            return cls(
                slide_id,
                width,
                height,
                mpp,
                dicom.study_instance_uid,
                dicom.series_instance_uid,
                dicom.frame_of_reference_uid or derived_uid(slide_id, "frame-of-reference"),
                dicom.sop_instance_uid,
                True,
            )
        return cls(
            slide_id,
            width,
            height,
            mpp,
            derived_uid(slide_id, "study"),
            derived_uid(slide_id, "series"),
            derived_uid(slide_id, "frame-of-reference"),
            derived_uid(slide_id, "image"),
            False,
        )


def _source_image(slide: SlideContext) -> Any:
    """The slide's original-resolution image as evidence: UIDs, geometry, no patient attributes."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = slide.source_sop_instance_uid
    ds.StudyInstanceUID = slide.study_uid
    ds.SeriesInstanceUID = slide.series_uid
    ds.FrameOfReferenceUID = slide.frame_of_reference_uid
    ds.Modality = "SM"
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, "")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.TotalPixelMatrixColumns = slide.width
    ds.TotalPixelMatrixRows = slide.height
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.Rows = ds.Columns = 256
    ds.NumberOfFrames = -(-slide.width // 256) * -(-slide.height // 256)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixOriginSequence = [Dataset()]
    ds.TotalPixelMatrixOriginSequence[0].XOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence[0].YOffsetInSlideCoordinateSystem = 0.0
    measures = Dataset()
    measures.PixelSpacing = [slide.mpp / 1000.0, slide.mpp / 1000.0]
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _code(key: str) -> Any:
    from highdicom.sr import CodedConcept

    value, meaning = LOCAL_CODES[key]
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


def structured_report(prediction: pb.Prediction, slide: SlideContext) -> Any:
    """The prediction as a Comprehensive SR (module docstring); a pydicom Dataset."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    unit = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    tiles_unit = CodedConcept(value="{tiles}", scheme_designator="UCUM", meaning="tiles")
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=prediction.model_version or "unknown"
    )
    label_value, label_scheme, label_meaning = LABEL_CODES.get(
        prediction.label, (prediction.label or "unknown", LOCAL_SCHEME, prediction.label or "unknown")
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(prediction.prediction_id, "tracking"), identifier="slide-level MIL result"
        ),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=_code("probability"), value=float(prediction.probability), unit=unit),
            hd.sr.Measurement(name=_code("threshold"), value=float(prediction.threshold), unit=unit),
            hd.sr.Measurement(name=_code("tiles"), value=int(prediction.tiles_scored), unit=tiles_unit),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_code("classification"),
                value=CodedConcept(value=label_value, scheme_designator=label_scheme, meaning=label_meaning),
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=WSI_SOP_CLASS,
                referenced_sop_instance_uid=slide.source_sop_instance_uid,
            )
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(ALGORITHM_NAME, prediction.model_version),
            name=ALGORITHM_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=prediction.model_version or "unknown",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("procedure"),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[_source_image(slide)],
        content=report[0],
        series_instance_uid=derived_uid(prediction.prediction_id, "sr-series"),
        series_number=900,
        sop_instance_uid=derived_uid(prediction.prediction_id, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )


def attention_grid(attention_npz: bytes, slide: SlideContext) -> tuple[NDArray[np.float32], int]:
    """Per-tile attention on the slide's tile grid (rows, columns), scaled to 0..1, and the tile size."""
    with np.load(io.BytesIO(attention_npz)) as data:
        coords = np.asarray(data["coords"], dtype=np.int64)
        attention = np.asarray(data["attention"], dtype=np.float32)
        tile = int(data["tile_size_level0"])
    columns = max(1, -(-slide.width // tile))
    rows = max(1, -(-slide.height // tile))
    grid = np.zeros((rows, columns), np.float32)
    if len(attention):
        peak = float(attention.max()) or 1.0
        cols_at = np.clip(coords[:, 0] // tile, 0, columns - 1)
        rows_at = np.clip(coords[:, 1] // tile, 0, rows - 1)
        grid[rows_at, cols_at] = attention / peak
    return grid, tile


def parametric_map(prediction: pb.Prediction, slide: SlideContext, attention_npz: bytes) -> Any:
    """The attention heatmap as a Parametric Map on the slide's frame of reference (module docstring)."""
    import highdicom as hd
    from highdicom.sr import CodedConcept

    grid, tile = attention_grid(attention_npz, slide)
    spacing_mm = tile * slide.mpp / 1000.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="attention",
        lut_explanation="MIL attention relative to the slide's maximum",
        unit=CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=_code("attention"),
    )
    result = hd.pm.ParametricMap(
        source_images=[_source_image(slide)],
        pixel_array=grid[np.newaxis, :, :],
        series_instance_uid=derived_uid(prediction.prediction_id, "pm-series"),
        series_number=901,
        sop_instance_uid=derived_uid(prediction.prediction_id, "pm"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=prediction.model_version or "unknown",
        device_serial_number="none",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="ATTENTION",
        content_description="MIL attention heatmap",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(spacing_mm, spacing_mm), slice_thickness=None),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=(0, -1, 0, -1, 0, 0)
        ),
        plane_positions=[
            hd.PlanePositionSequence(
                coordinate_system="SLIDE",
                image_position=(0.0, 0.0, 0.0),
                pixel_matrix_position=(1, 1),
            )
        ],
    )
    result.Laterality = ""  # type 2C: a slide is no paired body part; empty satisfies validators
    return result


def to_bytes(dataset: Any) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
