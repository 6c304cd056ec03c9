"""A labelled synthetic cohort (patients, sites, tumour fraction) for patient-level training and evaluation.

Planning invariants are checked on large plans (no files); written cohorts are small (1200 x 1000 px) and
checked through the real files: labels.csv against the truth sidecars, pixels read back with OpenSlide.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy import ndimage
from wsitk.shared.cli import build_parser
from wsitk.shared.slides import synth
from wsitk.shared.slides.synth import (
    CohortParameters,
    SynthSpec,
    generate_labelled_cohort,
    load_truth,
    plan_labelled_cohort,
    render_region,
)

SMALL = (1200, 1000)


def _read_labels(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _tissue_optical_density(path: Path) -> np.ndarray:
    """Mean optical density (R, G, B) of the tissue at the slide's lowest level, away from tissue edges."""
    truth = load_truth(path)
    with openslide.OpenSlide(path) as slide:
        level = slide.level_count - 1
        downsample = round(slide.level_downsamples[level])
        image = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
    factor = truth.mask_downsample // downsample  # level pixels per mask cell
    rows, cols = image.shape[0] // factor, image.shape[1] // factor
    cells = image[: rows * factor, : cols * factor].astype(np.float64)
    cells = cells.reshape(rows, factor, cols, factor, 3).mean(axis=(1, 3))
    tissue = ndimage.binary_erosion(truth.tissue_mask, iterations=2)[:rows, :cols]
    assert tissue.sum() > 50, f"{path.name}: too little tissue to measure"
    return np.asarray(-np.log(np.maximum(cells[tissue], 1.0) / 255.0).mean(axis=0))


# -- planning (no files) ------------------------------------------------------------------------------


def test_plan_gives_tumour_patients_tumour_slides_and_normal_patients_none() -> None:
    parameters = CohortParameters(patients=200, slides_per_patient=(1, 3), tumour_patient_ratio=0.4, seed=11)
    cohort = plan_labelled_cohort(Path("unused"), parameters)
    assert Counter(p.label for p in cohort.patients) == {"tumour": 80, "normal": 120}
    slides_of = defaultdict(list)
    for slide in cohort.slides:
        slides_of[slide.patient].append(slide)
    extra_tumour, extra_total = 0, 0
    for patient in cohort.patients:
        labels = [slide.label for slide in slides_of[patient.patient_id]]
        assert 1 <= len(labels) <= 3
        if patient.label == "tumour":
            assert "tumour" in labels, patient
            extra_tumour += labels.count("tumour") - 1
            extra_total += len(labels) - 1
        else:
            assert set(labels) == {"normal"}, patient
    # Not every block of a cancer patient shows tumour: the other slides are tumour with p = 0.7.
    assert 0.55 < extra_tumour / extra_total < 0.85
    assert Counter(len(v) for v in slides_of.values()).keys() == {1, 2, 3}
    fractions = [slide.spec.tumour_fraction for slide in cohort.slides if slide.label == "tumour"]
    assert 0.05 <= min(fractions) < 0.08 and 0.37 < max(fractions) <= 0.4


def test_plan_spreads_patients_and_diagnoses_evenly_over_sites() -> None:
    cohort = plan_labelled_cohort(Path("unused"), CohortParameters(patients=31, sites=3, seed=4))
    per_site = Counter(p.site for p in cohort.patients)
    assert sorted(per_site) == ["site-A", "site-B", "site-C"]
    assert max(per_site.values()) - min(per_site.values()) <= 1
    tumour_per_site = Counter(p.site for p in cohort.patients if p.label == "tumour")
    assert max(tumour_per_site.values()) - min(tumour_per_site.values()) <= 1
    # A patient's slides all come from the patient's site.
    site_of = {p.patient_id: p.site for p in cohort.patients}
    assert all(slide.site == site_of[slide.patient] for slide in cohort.slides)


def test_plan_shares_a_look_per_patient_and_a_shift_per_site() -> None:
    cohort = plan_labelled_cohort(
        Path("unused"), CohortParameters(patients=40, slides_per_patient=(2, 3), sites=3, seed=8)
    )
    look = defaultdict(set)
    for slide in cohort.slides:
        look[slide.patient].add((slide.spec.stain_shift, slide.spec.nucleus_scale))
        site = next(s for s in cohort.sites if s.name == slide.site)
        assert slide.spec.illumination_od == site.illumination_od
    assert all(len(looks) == 1 for looks in look.values()), "a patient's slides share one look"
    assert len({next(iter(looks)) for looks in look.values()}) == 40, "patients differ from each other"
    # Site shifts spread over 1 +- 0.15 so that sites differ visibly, whatever the seed.
    eosin = sorted(site.stain_shift[0] for site in cohort.sites)
    assert eosin[0] < 0.9 and eosin[-1] > 1.1
    assert min(b - a for a, b in itertools.pairwise(eosin)) > 0.08


def test_plan_file_names_reveal_no_label_patient_or_site() -> None:
    cohort = plan_labelled_cohort(
        Path("unused"), CohortParameters(patients=30, fmt="mixed", seed=21, slides_per_patient=(2, 3))
    )
    names = [slide.file_name for slide in cohort.slides]
    assert len(set(names)) == len(names)
    assert len({slide.spec.seed for slide in cohort.slides}) == len(names)
    for slide in cohort.slides:
        lowered = slide.file_name.lower()
        assert slide.file_name.startswith("cohort-21-")
        for secret in ("tumour", "normal", slide.patient.lower(), slide.site.lower(), "site"):
            assert secret not in lowered
    # The order of the files does not group a patient's slides together.
    patients_in_order = [slide.patient for slide in cohort.slides]
    runs = sum(1 for a, b in itertools.pairwise(patients_in_order) if a == b)
    assert runs < len(names) / 4
    # "mixed": formats at random per slide, so the extension says nothing about the site either.
    formats_per_site = defaultdict(set)
    for slide in cohort.slides:
        formats_per_site[slide.site].add(slide.spec.fmt)
    assert all(formats == {"svs", "tiff"} for formats in formats_per_site.values())


def test_plan_is_deterministic_for_a_seed() -> None:
    first = plan_labelled_cohort(Path("a"), CohortParameters(patients=12, seed=5))
    second = plan_labelled_cohort(Path("a"), CohortParameters(patients=12, seed=5))
    other = plan_labelled_cohort(Path("a"), CohortParameters(patients=12, seed=6))
    assert first.slides == second.slides and first.patients == second.patients
    assert [s.spec for s in first.slides] != [s.spec for s in other.slides]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"patients": 0}, "patients 0 must be within 1..10000"),
        ({"slides_per_patient": (3, 1)}, r"slides_per_patient 3-1 must satisfy 1 <= low <= high"),
        ({"slides_per_patient": (0, 2)}, r"slides_per_patient 0-2 must satisfy"),
        ({"tumour_fraction": (0.4, 0.05)}, r"tumour_fraction 0.4-0.05 must satisfy .* e\.g\. 0\.05-0\.4"),
        ({"tumour_fraction": (0.0, 0.3)}, r"tumour_fraction 0.0-0.3 must satisfy 0.01 <= low"),
        ({"tumour_fraction": (0.1, 0.95)}, r"tumour_fraction 0.1-0.95 must satisfy"),
        ({"tumour_patient_ratio": 1.5}, "tumour_patient_ratio 1.5 must be within 0..1"),
        ({"sites": 0}, "sites 0 must be within 1..26"),
        ({"site_stain_shift": 0.8}, "site_stain_shift 0.8 must be within 0..0.4"),
        ({"size": (10, 1000)}, "width x height 10x1000 must each be within 64..400000"),
        ({"fmt": "ndpi"}, "fmt 'ndpi' must be 'svs', 'tiff' or 'mixed'"),
    ],
)
def test_bad_cohort_arguments_say_what_to_change(arguments: dict[str, object], message: str) -> None:
    parameters: dict[str, object] = {"patients": 4, **arguments}
    with pytest.raises(ValueError, match=f"invalid labelled cohort: .*{message}"):
        CohortParameters(**parameters)


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ValueError) as caught:
        CohortParameters(patients=-1, sites=40, tumour_fraction=(0.5, 0.2))
    assert str(caught.value).count(";") == 2


def test_bad_site_effects_in_a_spec_say_what_to_change() -> None:
    with pytest.raises(ValueError, match=r"stain_shift \(2.0, 1.0\) must be two factors .* within 0.5..1.6"):
        SynthSpec(stain_shift=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"illumination_od .* must be three optical densities"):
        SynthSpec(illumination_od=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"nucleus_scale 2\.0 must be within 0\.75\.\.1\.3"):
        SynthSpec(nucleus_scale=2.0)


def test_site_and_patient_effects_change_pixels_as_documented() -> None:
    base = SynthSpec(width=2000, height=2000, tumour_fraction=0.9, seed=3)
    window = (700, 700, 600, 600)

    def od(spec: SynthSpec) -> np.ndarray:
        pixels = render_region(spec, *window).astype(np.float64)
        return np.asarray(-np.log(np.maximum(pixels, 1.0) / 255.0).reshape(-1, 3).mean(axis=0))

    plain = od(base)
    # More eosin: more green absorbed (eosin's strongest band); more haematoxylin: more red absorbed.
    assert od(dataclasses.replace(base, stain_shift=(1.3, 1.0)))[1] > plain[1] + 0.05
    assert od(dataclasses.replace(base, stain_shift=(1.0, 1.3)))[0] > plain[0] + 0.05
    # A scanner's cast adds its optical density to every pixel, glass included.
    cast = od(dataclasses.replace(base, illumination_od=(0.1, 0.0, 0.0))) - plain
    assert cast[0] == pytest.approx(0.1, abs=0.01) and abs(cast[1]) < 0.005
    # Bigger nuclei cover more of the tissue with haematoxylin.
    assert od(dataclasses.replace(base, nucleus_scale=1.25))[0] > plain[0] + 0.02


# -- written cohorts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> synth.Cohort:
    return generate_labelled_cohort(
        tmp_path_factory.mktemp("cohort"),
        patients=4,
        slides_per_patient=(1, 3),
        tumour_fraction=(0.05, 0.4),
        sites=2,
        size=SMALL,
        fmt="mixed",
        seed=3,
    )


def test_labels_csv_matches_the_truth_of_every_slide(cohort: synth.Cohort) -> None:
    rows = _read_labels(cohort.labels_path)
    assert list(rows[0]) == ["slide", "patient", "label", "site", "tumour_fraction"]
    on_disk = sorted(p.name for p in cohort.out_dir.iterdir() if p.suffix in (".svs", ".tiff"))
    assert [row["slide"] for row in rows] == on_disk
    for row in rows:
        truth = load_truth(cohort.out_dir / row["slide"])
        assert row["label"] == truth.label
        assert float(row["tumour_fraction"]) == pytest.approx(truth.tumour_fraction_actual, abs=1e-4)
        assert truth.tumour_fraction_actual == pytest.approx(truth.tumour_fraction_requested, abs=0.02)
        assert (truth.label == "tumour") == (truth.tumour_fraction_requested > 0)
        assert truth.spec == next(s.spec for s in cohort.slides if s.file_name == row["slide"])
        assert row["patient"].startswith("P") and len(row["patient"]) == 5
        assert row["site"] in {"site-A", "site-B"}
        with openslide.OpenSlide(truth.path) as slide:
            assert slide.dimensions == SMALL
            vendor = slide.properties[openslide.PROPERTY_NAME_VENDOR]
            assert vendor == ("aperio" if truth.path.suffix == ".svs" else "generic-tiff")
    labels = {row["label"] for row in rows}
    assert labels == {"tumour", "normal"}


def test_written_cohort_keeps_patient_rules(cohort: synth.Cohort) -> None:
    rows = _read_labels(cohort.labels_path)
    by_patient = defaultdict(list)
    for row in rows:
        by_patient[row["patient"]].append(row)
    summary = json.loads(cohort.summary_path.read_text())
    assert set(by_patient) == set(summary["patients"])
    for patient_id, info in summary["patients"].items():
        labels = {row["label"] for row in by_patient[patient_id]}
        assert {row["site"] for row in by_patient[patient_id]} == {info["site"]}
        assert sorted(row["slide"] for row in by_patient[patient_id]) == info["slides"]
        if info["label"] == "tumour":
            assert "tumour" in labels
        else:
            assert labels == {"normal"}
    assert max(len(v) for v in by_patient.values()) >= 2, "patients have several slides when asked"
    counts = Counter(row["label"] for row in rows)
    assert summary["counts"]["slides"] == {"tumour": counts["tumour"], "normal": counts["normal"]}
    per_site = Counter((row["site"], row["label"]) for row in rows)
    for site, site_counts in summary["counts"]["per_site"].items():
        assert site_counts["slides"] == {label: per_site[site, label] for label in ("tumour", "normal")}
    assert summary["parameters"]["seed"] == 3 and summary["parameters"]["patients"] == 4


def test_smallest_tumour_fraction_is_reachable(tmp_path: Path) -> None:
    result = generate_labelled_cohort(
        tmp_path,
        patients=1,
        slides_per_patient=(1, 1),
        tumour_patient_ratio=1.0,
        tumour_fraction=(0.05, 0.05),
        size=SMALL,
        seed=9,
    )
    (row,) = _read_labels(result.labels_path)
    truth = load_truth(tmp_path / row["slide"])
    assert row["label"] == "tumour" == truth.label
    assert 0.04 <= float(row["tumour_fraction"]) <= 0.06
    assert truth.tumour_mask.sum() > 20  # a small focus, but a real region on the mask


def test_site_stain_shift_changes_tissue_colour_between_sites(tmp_path: Path) -> None:
    # Normal tissue only, so that colour differences come from sites and patients, not from tumour.
    result = generate_labelled_cohort(
        tmp_path, patients=4, slides_per_patient=(1, 2), tumour_patient_ratio=0.0, sites=2, size=SMALL, seed=1
    )
    od_by_site: dict[str, list[np.ndarray]] = defaultdict(list)
    for slide in result.slides:
        od_by_site[slide.site].append(_tissue_optical_density(result.slide_path(slide)))
    assert all(len(values) >= 2 for values in od_by_site.values())
    site_a, site_b = (np.asarray(od_by_site[name]) for name in ("site-A", "site-B"))
    # Green absorption follows eosin: the site with more eosin is greener-darker on every slide...
    shift = {site.name: site.stain_shift[0] for site in result.sites}
    more, less = (site_a, site_b) if shift["site-A"] > shift["site-B"] else (site_b, site_a)
    assert more[:, 1].min() > less[:, 1].max()
    # ...and the gap between sites is far larger than the spread within a site.
    gap = abs(site_a[:, 1].mean() - site_b[:, 1].mean())
    spread = max(site_a[:, 1].std(), site_b[:, 1].std())
    assert gap > 3 * spread, (gap, spread)


# -- the CLI -----------------------------------------------------------------------------------------------


def test_cli_cohort_mode_matches_the_api_byte_for_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["synth", str(tmp_path / "cli"), "--patients", "2", "--slides-per-patient", "1-2"]
    argv += ["--sites", "2", "--site-stain-shift", "0.2", "--tumour-fraction", "0.1-0.3"]
    argv += ["--tumour-patient-ratio", "0.5", "--size", "1200x1000", "--seed", "3"]
    args = build_parser().parse_args(argv)
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels_path = tmp_path / "cli" / "labels.csv"
    assert lines[-1] == f"labels: {labels_path}"
    rows = {row["slide"]: row for row in _read_labels(labels_path)}
    assert len(lines) - 1 == len(rows) >= 2
    for line in lines[:-1]:
        path, size, label, patient, site, tumour = line.split("\t")
        row = rows[Path(path).name]
        assert (size, label, patient, site) == ("1200x1000", row["label"], row["patient"], row["site"])
        assert float(tumour.removeprefix("tumour=")) == pytest.approx(float(row["tumour_fraction"]), abs=1e-3)

    api = generate_labelled_cohort(
        tmp_path / "api",
        patients=2,
        slides_per_patient=(1, 2),
        sites=2,
        site_stain_shift=0.2,
        tumour_fraction=(0.1, 0.3),
        size=SMALL,
        seed=3,
    )
    assert api.labels_path.read_bytes() == labels_path.read_bytes()
    for slide in api.slides:
        assert api.slide_path(slide).read_bytes() == (tmp_path / "cli" / slide.file_name).read_bytes()
    other = plan_labelled_cohort(tmp_path, CohortParameters(patients=2, slides_per_patient=(1, 2), seed=4))
    assert {s.spec.seed for s in other.slides}.isdisjoint(s.spec.seed for s in api.slides)


def test_cli_without_patients_keeps_the_old_behaviour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        [
            "synth",
            str(tmp_path),
            "--count",
            "2",
            "--size",
            "1200x1000",
            "--tumour-fraction",
            "0.3",
            "--seed",
            "4",
        ]
    )
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["tumour", "normal"]
    assert sorted(p.name for p in tmp_path.glob("*.svs")) == ["synth-004000.svs", "synth-004001.svs"]
    assert load_truth(tmp_path / "synth-004000.svs").tumour_fraction_requested == 0.3
    assert not (tmp_path / "labels.csv").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tumour-fraction", "0.1-0.3"], "a range only applies to a labelled cohort"),
        (["--sites", "3"], "--sites only apply to a labelled cohort: add --patients N"),
        (["--format", "mixed"], "--format mixed only applies to a labelled cohort"),
        (["--patients", "3", "--count", "2"], "--count do not apply with --patients"),
        (["--patients", "3", "--tumour-ratio", "0.5"], "use --tumour-patient-ratio"),
        (["--patients", "3", "--slides-per-patient", "3-1"], "slides_per_patient 3-1 must satisfy"),
        (["--patients", "3", "--tumour-fraction", "0-0.3"], "tumour_fraction 0.0-0.3 must satisfy"),
    ],
)
def test_cli_refuses_bad_combinations_readably(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = build_parser().parse_args(["synth", str(tmp_path), "--size", "1200x1000", *extra])
    assert args.handler(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("wsi synth: ") and message in error
    assert not any(tmp_path.iterdir()), "nothing is written when the arguments are wrong"


def test_cli_range_syntax_errors_come_from_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "out", "--patients", "3", "--slides-per-patient", "1-x"])
    assert "must be a whole number or a range LOW-HIGH, e.g. 2 or 1-3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "out", "--tumour-fraction", "0.1-0.2-0.3"])
    assert "must be a number or a range LOW-HIGH" in capsys.readouterr().err
