"""DICOM whole-slide series (VL Whole Slide Microscopy, TILED_FULL, JPEG baseline) from synthetic slides.

Written with pydicom from the pixels of a slide OpenSlide reads: one instance per pyramid level (the
base level optionally split into a concatenation of several instances), plus a LABEL instance. The
files carry identifying attributes (patient, accession, dates, operator, institution, the container's
barcode) for the de-identification tests; ``PHI`` lists them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

PHI = {
    "PatientName": "TESTPATIENT^JANE",
    "PatientID": "MRN-7741920",
    "AccessionNumber": "ACC-55102938",
    "InstitutionName": "St Example General Hospital",
    "OperatorsName": "OPERATOR^MARTHA",
    "ContainerIdentifier": "BARCODE-XJ-90217",
    "StudyID": "STUDY-88123",
    "ReferringPhysicianName": "REFERRER^PAUL",
}
PHI_DATE = "19770412"  # the patient's birth date
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


@dataclass(frozen=True)
class DicomSeries:
    files: list[Path]
    study_uid: str
    series_uid: str


def _jpeg(tile: NDArray[np.uint8]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


def _frames(image: NDArray[np.uint8], tile: int) -> list[bytes]:
    height, width = image.shape[:2]
    frames = []
    for row in range(math.ceil(height / tile)):
        for col in range(math.ceil(width / tile)):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = image[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]
            block[: part.shape[0], : part.shape[1]] = part
            frames.append(_jpeg(block))
    return frames


def _instance(
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    image_type: list[str],
    image: NDArray[np.uint8],
    frames: list[bytes],
    tile: int,
    mpp: float,
    instance_number: int,
    concatenation: tuple[str, int, int, int] | None = None,
) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid

    height, width = image.shape[:2]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = UID(WSI_SOP_CLASS)
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Modality = "SM"
    ds.ImageType = image_type
    ds.InstanceNumber = instance_number
    ds.SeriesNumber = 1
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientBirthDate = PHI_DATE
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240305"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AcquisitionDateTime = "20240305101500"
    ds.Manufacturer = "WSI Toolkit test writer"
    ds.SpecimenDescriptionSequence = [Dataset()]
    ds.SpecimenDescriptionSequence[0].SpecimenIdentifier = PHI["ContainerIdentifier"] + "-S1"
    ds.SpecimenDescriptionSequence[0].SpecimenUID = generate_uid()
    ds.ImagedVolumeWidth = width * mpp / 1000
    ds.ImagedVolumeHeight = height * mpp / 1000
    ds.ImagedVolumeDepth = 0.001
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.Rows = ds.Columns = tile
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.BurnedInAnnotation = "YES" if "LABEL" in image_type else "NO"
    ds.SpecimenLabelInImage = "YES" if "LABEL" in image_type else "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.TotalPixelMatrixOriginSequence = [Dataset()]
    ds.TotalPixelMatrixOriginSequence[0].XOffsetInSlideCoordinateSystem = 20.0
    ds.TotalPixelMatrixOriginSequence[0].YOffsetInSlideCoordinateSystem = 40.0
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.OpticalPathSequence = [Dataset()]
    ds.OpticalPathSequence[0].OpticalPathIdentifier = "1"
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]
    measures.SliceThickness = 0.001
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    if concatenation is not None:
        concatenation_uid, number, total, offset = concatenation
        ds.ConcatenationUID = concatenation_uid
        ds.InConcatenationNumber = number
        ds.InConcatenationTotalNumber = total
        ds.ConcatenationFrameOffsetNumber = offset
        ds.SOPInstanceUIDOfConcatenationSource = concatenation_uid
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def write_dicom_series(source: Path, out_dir: Path, *, base_parts: int = 1, tile: int = 256) -> DicomSeries:
    """Write ``source`` (any slide OpenSlide opens) as a DICOM WSI series into ``out_dir``.

    ``base_parts`` > 1 splits level 0 into a concatenation of that many instances.
    """
    import openslide
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    files: list[Path] = []
    with openslide.OpenSlide(str(source)) as slide:
        mpp = float(slide.properties["openslide.mpp-x"])
        label = (
            np.asarray(slide.associated_images["label"].convert("RGB"))
            if "label" in slide.associated_images
            else None
        )
        for level, (width, height) in enumerate(slide.level_dimensions):
            if level > 0 and max(width, height) < tile:
                break
            downsample = slide.level_downsamples[level]
            image = np.asarray(slide.read_region((0, 0), level, (width, height)).convert("RGB"))
            frames = _frames(image, tile)
            image_type = [
                "ORIGINAL" if level == 0 else "DERIVED",
                "PRIMARY",
                "VOLUME",
                "NONE" if level == 0 else "RESAMPLED",
            ]
            parts = base_parts if level == 0 else 1
            concatenation_uid = generate_uid()
            per_part = math.ceil(len(frames) / parts)
            for part in range(parts):
                chunk = frames[part * per_part : (part + 1) * per_part]
                ds = _instance(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    frame_of_reference_uid=frame_uid,
                    image_type=image_type,
                    image=image,
                    frames=chunk,
                    tile=tile,
                    mpp=mpp * downsample,
                    instance_number=len(files) + 1,
                    concatenation=(concatenation_uid, part + 1, parts, part * per_part)
                    if parts > 1
                    else None,
                )
                path = out_dir / f"level{level}-part{part}.dcm"
                ds.save_as(path, enforce_file_format=True)  # type: ignore[attr-defined]
                files.append(path)
        if label is not None:
            ds = _instance(
                study_uid=study_uid,
                series_uid=series_uid,
                frame_of_reference_uid=frame_uid,
                image_type=["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
                image=label,
                frames=_frames(label, max(label.shape[:2])),
                tile=max(label.shape[:2]),
                mpp=0.02 * 1000,
                instance_number=len(files) + 1,
            )
            ds.Rows, ds.Columns = max(label.shape[:2]), max(label.shape[:2])  # type: ignore[attr-defined]
            path = out_dir / "label.dcm"
            ds.save_as(path, enforce_file_format=True)  # type: ignore[attr-defined]
            files.append(path)
    return DicomSeries(files, study_uid, series_uid)
