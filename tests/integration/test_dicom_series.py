"""DICOM whole-slide series and MIRAX as one slide: completeness from what the files declare, the
de-identified bundle OpenSlide reads, zips, and the DICOM/FHIR results validated by independent tools
(dciodvfy from Debian's dicom3tools, highdicom/pydicom read-back, fhir.resources)."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wsitk.services.ingest.handler import Inspected, Rejected, _inspect_in_child
from wsitk.services.ingest.multifile import Part, group_upload_key, mirax_group, missing_parts
from wsitk.shared.contracts import pb
from wsitk.shared.interop.dicom_results import SlideContext, parametric_map, structured_report, to_bytes
from wsitk.shared.interop.fhir import Link, fhir_bundle
from wsitk.shared.slides.bundle import BundleRejected, open_bundle, write_bundle
from wsitk.shared.slides.dicom import deidentified_copy, describe_instance, pseudonymise_uid
from wsitk.shared.slides.synth import SynthSpec, generate_slide

from tests.dicom_wsi import PHI, PHI_DATE, DicomSeries, write_dicom_series


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DicomSeries]:
    work = tmp_path_factory.mktemp("dicom-series")
    svs = work / "source.svs"
    generate_slide(svs, SynthSpec(width=1600, height=1200, mpp=0.5, fmt="svs", seed=77, tumour_fraction=0.3))
    return svs, write_dicom_series(svs, work / "series", base_parts=2)


def _parts(files: list[Path]) -> list[Part]:
    out = []
    for path in files:
        info = describe_instance(path)
        assert info is not None
        out.append(Part(f"case/{path.name}", "etag", path.stat().st_size, "0" * 64, info.to_dict()))
    return out


def test_series_is_complete_only_with_every_declared_instance_and_frame(
    series: tuple[Path, DicomSeries],
) -> None:
    _, dicom = series
    names = sorted(p.name for p in dicom.files)
    assert names == ["label.dcm", "level0-part0.dcm", "level0-part1.dcm", "level1-part0.dcm"]
    rng = random.Random(5)
    order = list(dicom.files)
    rng.shuffle(order)
    seen: list[Path] = []
    verdicts = []
    for path in order:
        seen.append(path)
        verdicts.append(missing_parts("dicom", "dicom:case:x", _parts(seen)))
    base = {"level0-part0.dcm", "level0-part1.dcm"}
    for index, verdict in enumerate(verdicts):
        # complete by declaration exactly when both instances of the base level's concatenation are in;
        # a resampled level or a label may still follow (hence the quiet period, multifile.py)
        assert (verdict == []) == (base <= {p.name for p in order[: index + 1]}), (index, verdict)
    without_part1 = [p for p in dicom.files if p.name != "level0-part1.dcm"]
    reasons = missing_parts("dicom", "dicom:case:x", _parts(without_part1))
    assert reasons[0] == "level 1600x1200: instances [2] of its concatenation of 2"
    assert reasons[1].startswith("level 1600x1200: ") and reasons[1].endswith(" of its 35 frames")
    only_resampled = [p for p in dicom.files if p.name.startswith("level1")]
    assert "original-resolution level" in missing_parts("dicom", "dicom:case:x", _parts(only_resampled))[0]


def test_truncated_level_is_incomplete_by_its_frame_count(
    series: tuple[Path, DicomSeries], tmp_path: Path
) -> None:
    import pydicom
    from pydicom.encaps import encapsulate, generate_fragmented_frames

    _, dicom = series
    level1 = next(p for p in dicom.files if p.name == "level1-part0.dcm")
    ds = pydicom.dcmread(level1)
    frames = [
        b"".join(f) for f in generate_fragmented_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)
    ]
    ds.PixelData = encapsulate(frames[:-2])
    ds.NumberOfFrames = len(frames) - 2
    short = tmp_path / "level1-short.dcm"
    ds.save_as(short)
    files = [p for p in dicom.files if p.name != "level1-part0.dcm"] + [short]
    (reason,) = missing_parts("dicom", "dicom:case:x", _parts(files))
    assert f"{len(frames) - 2} of its {len(frames)} frames" in reason


def test_deidentified_bundle_opens_as_the_same_slide_without_phi(
    series: tuple[Path, DicomSeries], tmp_path: Path
) -> None:
    import openslide

    svs, dicom = series
    raw = b"".join(p.read_bytes() for p in dicom.files)
    secrets = [*PHI.values(), PHI_DATE]
    assert all(s.encode() in raw for s in secrets)  # really in the files
    members = []
    for index, path in enumerate(dicom.files):
        info = describe_instance(path)
        assert info is not None
        if info.image_flavor == "LABEL":
            continue
        copy = tmp_path / f"{index}.dcm"
        deidentified_copy(path, copy, uid_key="hospital-key")
        members.append((f"{pseudonymise_uid(info.sop_instance_uid, 'hospital-key')}.dcm", copy))
    bundle = tmp_path / "slide.zip"
    write_bundle(members, bundle)
    again = tmp_path / "again.zip"
    write_bundle(list(reversed(members)), again)
    assert bundle.read_bytes() == again.read_bytes()  # deterministic: content-derived slide id
    data = bundle.read_bytes()
    assert not [s for s in secrets if s.encode() in data]
    assert dicom.study_uid.encode() not in data  # UIDs pseudonymised with the key
    main = open_bundle(bundle)
    copy_info = describe_instance(main)
    assert copy_info is not None and copy_info.study_uid == pseudonymise_uid(dicom.study_uid, "hospital-key")
    with openslide.OpenSlide(str(main)) as from_dicom, openslide.OpenSlide(str(svs)) as original:
        assert from_dicom.dimensions == original.dimensions
        assert float(from_dicom.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert from_dicom.level_count == 2
        region = np.asarray(from_dicom.read_region((600, 400), 0, (256, 256)).convert("RGB"), np.int16)
        expected = np.asarray(original.read_region((600, 400), 0, (256, 256)).convert("RGB"), np.int16)
        assert np.abs(region - expected).mean() < 6  # one more JPEG generation
    result = _inspect_in_child(str(bundle), 10**10, 0.0)
    assert isinstance(result, Inspected) and result.info.width == 1600 and result.dicom is not None
    assert result.dicom["series_instance_uid"] == pseudonymise_uid(dicom.series_uid, "hospital-key")


def test_a_zip_of_a_series_is_a_slide_and_unsafe_zips_are_refused(
    series: tuple[Path, DicomSeries], tmp_path: Path
) -> None:
    _, dicom = series
    upload = tmp_path / "upload.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for path in dicom.files:
            archive.write(path, f"series/{path.name}")
    result = _inspect_in_child(str(upload), 10**10, 0.0)
    assert isinstance(result, Inspected), result
    assert result.info.vendor == "dicom" and (result.info.width, result.info.height) == (1600, 1200)
    assert result.dicom is not None and result.dicom["study_instance_uid"] == dicom.study_uid
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../escape.dcm", b"x")
    with pytest.raises(BundleRejected, match=r"'\.\.'"):
        open_bundle(evil)
    assert not (tmp_path / "escape.dcm").exists()
    text_only = tmp_path / "notes.zip"
    with zipfile.ZipFile(text_only, "w") as archive:
        archive.writestr("a.txt", b"a")
        archive.writestr("b.txt", b"b")
    rejected = _inspect_in_child(str(text_only), 10**10, 0.0)
    assert isinstance(rejected, Rejected) and rejected.code == "unsupported-format"


def test_mirax_is_complete_when_every_file_its_index_names_is_there() -> None:
    assert mirax_group("case-1/slide.mrxs") == "mirax:case-1/slide"
    assert mirax_group("case-1/slide/Data0001.dat") == "mirax:case-1/slide"
    assert mirax_group("case-1/slide/Slidedat.ini") == "mirax:case-1/slide"
    assert mirax_group("case-1/slide.svs") is None
    assert group_upload_key("mirax:case-1/slide") == "case-1/slide.mrxs"
    assert group_upload_key("dicom:case-1:1.2.3") == "case-1/"
    index = Part(
        "case-1/slide/Slidedat.ini", "e", 1, "0", {"files": ["Index.dat", "Data0000.dat", "Data0001.dat"]}
    )
    parts = [
        Part("case-1/slide.mrxs", "e", 1, "0", {}),
        index,
        Part("case-1/slide/Index.dat", "e", 1, "0", {}),
    ]
    missing = missing_parts("mirax", "mirax:case-1/slide", parts)
    assert missing == ["slide/Data0000.dat", "slide/Data0001.dat"]
    parts += [Part(f"case-1/slide/Data000{i}.dat", "e", 1, "0", {}) for i in range(2)]
    assert missing_parts("mirax", "mirax:case-1/slide", parts) == []
    assert "Slidedat.ini" in missing_parts("mirax", "mirax:case-1/slide", [parts[0]])[-1]


PREDICTION = pb.Prediction(
    prediction_id="pred-0001",
    tiling_run_id="run-1",
    model_version="gated-attention-v7",
    label="tumour",
    probability=0.8125,
    threshold=0.42,
    tiles_scored=321,
)


def _attention_npz() -> bytes:
    buffer = io.BytesIO()
    coords = np.array([[0, 0], [224, 0], [448, 224], [1344, 896]])
    np.savez(
        buffer, coords=coords, attention=np.array([0.1, 0.4, 0.2, 0.8], np.float32), tile_size_level0=224
    )
    return buffer.getvalue()


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian's dicom3tools) is not installed: run `make system-deps`")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _text_items(dataset: object, meaning: str) -> list[str]:
    found = []
    for item in getattr(dataset, "ContentSequence", []):
        names = getattr(item, "ConceptNameCodeSequence", [])
        if names and names[0].CodeMeaning == meaning and item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found += _text_items(item, meaning)
    return found


@pytest.mark.parametrize("from_dicom", [True, False])
def test_dicom_results_validate_and_read_back(from_dicom: bool, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom

    source = pb.DicomSource(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.6",
    )
    slide = SlideContext.of("ab" * 16, 1600, 1200, 0.5, source if from_dicom else None)
    sr_path, pm_path = tmp_path / "sr.dcm", tmp_path / "pm.dcm"
    sr_path.write_bytes(to_bytes(structured_report(PREDICTION, slide)))
    pm_path.write_bytes(to_bytes(parametric_map(PREDICTION, slide, _attention_npz())))
    assert _dciodvfy_errors(sr_path) == []
    assert _dciodvfy_errors(pm_path) == []

    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == slide.study_uid
    assert (sr.StudyInstanceUID == source.study_instance_uid) is from_dicom
    assert sr.PatientName == "" and sr.PatientID == ""
    content: Any = sr.content  # highdicom's typed ContentSequence lacks the SR-specific accessors
    group = content.get_planar_roi_measurement_groups() + content.get_image_measurement_groups()
    assert len(group) == 1
    values = {m.name.meaning: m.value for m in group[0].get_measurements()}
    assert values == {"Tumour probability": 0.8125, "Decision threshold": 0.42, "Tiles scored": 321}
    (evaluation,) = group[0].get_qualitative_evaluations()
    assert evaluation.value.value == "108369006"  # SNOMED CT: neoplasm
    assert _text_items(sr, "Algorithm Version") == ["gated-attention-v7"]
    assert _text_items(sr, "Algorithm Name") == ["wsitk-mil"]
    (source_image,) = group[0].source_images
    assert source_image.referenced_sop_instance_uid == slide.source_sop_instance_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == slide.study_uid

    pm = pydicom.dcmread(pm_path)
    assert pm.FrameOfReferenceUID == slide.frame_of_reference_uid
    assert pm.StudyInstanceUID == slide.study_uid
    heat = np.asarray(pm.pixel_array, np.float32)
    assert heat.shape == (6, 8)  # 1200/224 rows x 1600/224 columns of tiles
    assert (
        heat[4, 6] == pytest.approx(1.0)
        and heat[0, 1] == pytest.approx(0.5)
        and heat[1, 2] == pytest.approx(0.25)
    )
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert float(spacing[0]) == pytest.approx(224 * 0.5 / 1000)


def test_fhir_bundle_is_valid_r4_without_file_identifiers() -> None:
    from fhir.resources.R4B.bundle import Bundle

    link = Link(
        "DICOM Structured Report", "application/dicom", "wsi-artifacts", "results/x/report-sr.dcm", 99, "AAAA"
    )
    bundle = fhir_bundle(
        PREDICTION,
        slide_id="cd" * 16,
        identifier_system="urn:example:slides",
        study_uid="2.25.123",
        links=[link],
    )
    parsed = Bundle.model_validate_json(bundle.model_dump_json())  # R4 (4.3) validation of every resource
    resources: dict[str, Any] = {
        e.resource.get_resource_type(): e.resource for e in parsed.entry or [] if e.resource
    }
    assert set(resources) == {"DiagnosticReport", "Observation", "Device"}
    report, observation, device = resources["DiagnosticReport"], resources["Observation"], resources["Device"]
    assert observation.valueQuantity.value == pytest.approx(0.8125)
    assert observation.interpretation[0].coding[0].code == "108369006"
    assert device.version[0].value == "gated-attention-v7"
    assert observation.device.reference == f"urn:uuid:{device.id}"
    assert report.result[0].reference == f"urn:uuid:{observation.id}"
    assert {(i.system, i.value) for i in report.identifier} >= {
        ("urn:example:slides", "cd" * 16),
        ("urn:dicom:uid", "urn:oid:2.25.123"),
    }
    assert report.presentedForm[0].url == "s3://wsi-artifacts/results/x/report-sr.dcm"
    assert report.subject is None and observation.subject is None  # no patient unless configured
    again = fhir_bundle(PREDICTION, slide_id="cd" * 16, identifier_system="urn:example:slides")
    assert again.id == bundle.id  # ids derive from the prediction: the same result, the same resources
