"""Labelled synthetic cohorts: sites, patients and slides for patient-level splits, training and evaluation."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from wsitk.shared.slides.looks import ScannerLook
from wsitk.shared.slides.synth import hard
from wsitk.shared.slides.synth.spec import (
    GENERATOR_VERSION,
    TUMOUR_LOOKS,
    SlideFormat,
    SlideTruth,
    SynthSpec,
)
from wsitk.shared.slides.synth.writer import generate_slide

# ---------------------------------------------------------------------------------------------------------
# Labelled cohorts: patients, sites, slides (training and evaluation data for patient-level splits)
# ---------------------------------------------------------------------------------------------------------

CohortFormat = Literal["svs", "tiff", "mixed"]
LABELS_CSV = "labels.csv"
COHORT_JSON = "cohort.json"
LABELS_COLUMNS = ("slide", "patient", "label", "site", "tumour_fraction")
# Added to labels.csv only with fixed splits or label noise (the hard benchmark): other cohorts keep theirs.
HARD_LABELS_COLUMNS = ("split", "true_label")
MAX_SITES = 26  # site-A .. site-Z
MAX_SLIDES_PER_PATIENT = 50
# Blocks of one patient are usually cut and stained in one batch: less slide-to-slide stain variation than
# between the unrelated slides of generate_cohort (0.06), so that the patient's own look dominates.
COHORT_SLIDE_STAIN_JITTER = 0.03


@dataclass(frozen=True)
class CohortParameters:
    """What labelled cohort to make; :func:`generate_labelled_cohort` documents each field.

    Validated on construction, naming every bad value at once; (parameters) -> the same cohort, byte for byte.
    """

    patients: int
    slides_per_patient: tuple[int, int] = (1, 3)  # inclusive
    tumour_patient_ratio: float = 0.5
    tumour_slide_probability: float = 0.7  # other slides of a tumour patient
    tumour_fraction: tuple[float, float] = (0.05, 0.4)  # of the tissue area, per tumour slide
    sites: int = 3
    site_stain_shift: float = 0.15
    site_tint: float = 0.03
    patient_variation: float = 0.1
    size: tuple[int, int] = (8000, 6000)
    fmt: CohortFormat = "svs"
    mpp: float = 0.5
    artefacts: bool = False
    seed: int = 0
    # The hard benchmark (shared/slides/synth/hard.py; ``hard.HARD_DEFAULTS``). The defaults change nothing.
    mimics: bool = False  # lymphoid, reactive, necrosis, fat and mucin regions drawn per slide
    tumour_look: str = "classic"  # or "subtle"
    tumour_fraction_log: bool = False  # draw tumour fractions log-uniformly (small foci are common)
    tiles_per_slide: tuple[int, int] | None = None  # tiler tiles of tissue per slide; replaces ``size``
    held_out_site: bool = False  # the last site: strongest stain shift and its own look; all split=test
    test_fraction: float = 0.0  # share of the other sites' patients fixed to split=test (rest: train)
    label_noise: float = 0.0  # share of patients whose label is flipped in labels.csv (true_label kept)

    def __post_init__(self) -> None:
        # Lists (from JSON) become tuples; a range may be given as one number ("exactly this").
        for name in ("slides_per_patient", "tumour_fraction", "tiles_per_slide"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(
                    self, name, (value, value) if isinstance(value, int | float) else tuple(value)
                )
        object.__setattr__(self, "size", tuple(self.size))
        problems = self._count_problems() + self._appearance_problems() + self._hard_problems()
        if problems:
            raise ValueError("invalid labelled cohort: " + "; ".join(problems))

    def _count_problems(self) -> list[str]:
        problems: list[str] = []
        if not 1 <= self.patients <= 10_000:
            problems.append(f"patients {self.patients} must be within 1..10000")
        _check_range(
            "slides_per_patient", self.slides_per_patient, 1, MAX_SLIDES_PER_PATIENT, problems, "1-3"
        )
        # Foci below 1 % of the tissue come with log-uniform draws (the hard benchmark), down to 0.2 %.
        smallest = 0.002 if self.tumour_fraction_log else 0.01
        _check_range("tumour_fraction", self.tumour_fraction, smallest, 0.9, problems, "0.05-0.4")
        if not 0.0 <= self.tumour_patient_ratio <= 1.0:
            problems.append(f"tumour_patient_ratio {self.tumour_patient_ratio} must be within 0..1")
        if not 0.0 <= self.tumour_slide_probability <= 1.0:
            problems.append(f"tumour_slide_probability {self.tumour_slide_probability} must be within 0..1")
        if not 1 <= self.sites <= MAX_SITES:
            problems.append(f"sites {self.sites} must be within 1..{MAX_SITES}")
        if self.seed < 0:
            problems.append(f"seed {self.seed} must be >= 0")
        return problems

    def _appearance_problems(self) -> list[str]:
        problems: list[str] = []
        if not 0.0 <= self.site_stain_shift <= 0.4:
            problems.append(
                f"site_stain_shift {self.site_stain_shift} must be within 0..0.4 (0.15 = up to +-15% stain)"
            )
        if not 0.0 <= self.site_tint <= 0.1:
            problems.append(f"site_tint {self.site_tint} must be within 0..0.1 (optical density of the cast)")
        if not 0.0 <= self.patient_variation <= 0.2:
            problems.append(f"patient_variation {self.patient_variation} must be within 0..0.2")
        if self.fmt not in ("svs", "tiff", "mixed"):
            problems.append(
                f"fmt {self.fmt!r} must be 'svs', 'tiff' or 'mixed' (each slide svs or tiff at random)"
            )
        if len(self.size) != 2:
            problems.append(f"size {self.size!r} must be (width, height)")
        else:
            try:  # size and mpp are checked (and the problems worded) once, by SynthSpec
                SynthSpec(width=self.size[0], height=self.size[1], mpp=self.mpp)
            except ValueError as error:
                problems.append(str(error).removeprefix("invalid SynthSpec: "))
        return problems

    def _hard_problems(self) -> list[str]:
        problems: list[str] = []
        if self.tumour_look not in TUMOUR_LOOKS:
            problems.append(f"tumour_look {self.tumour_look!r} must be one of {', '.join(TUMOUR_LOOKS)}")
        if self.tiles_per_slide is not None:
            _check_range("tiles_per_slide", self.tiles_per_slide, 10, 200_000, problems, "5000-30000")
        if self.held_out_site and self.sites < 2:
            problems.append(f"held_out_site needs at least 2 sites (one to hold out), got {self.sites}")
        if not 0.0 <= self.test_fraction <= 0.5:
            problems.append(f"test_fraction {self.test_fraction} must be within 0..0.5 (0.2 = a fifth)")
        if not 0.0 <= self.label_noise <= 0.3:
            problems.append(f"label_noise {self.label_noise} must be within 0..0.3 (0.05 = 5% of patients)")
        return problems

    @property
    def fixed_splits(self) -> bool:
        """Whether labels.csv fixes each patient's split (a held-out site or fixed test patients)."""
        return self.held_out_site or self.test_fraction > 0

    @property
    def hard_columns(self) -> bool:
        return self.fixed_splits or self.label_noise > 0


@dataclass(frozen=True)
class CohortSite:
    """One scanner and lab: every slide it produces shares its stain shift and colour cast."""

    name: str  # "site-A"
    stain_shift: tuple[float, float]  # (eosin, haematoxylin) OD multipliers of the lab's staining protocol
    illumination_od: tuple[float, float, float]  # the scanner's colour cast, OD per RGB channel
    look: ScannerLook = field(default_factory=ScannerLook)  # the held-out site's scanner look
    held_out: bool = False  # never trained on: all its patients are split=test


@dataclass(frozen=True)
class CohortPatient:
    """One patient: a diagnosis, a site, and a look that all of the patient's slides share."""

    patient_id: str  # "P0007"
    site: str
    label: str  # "tumour" or "normal": the patient's diagnosis
    stain_factor: tuple[float, float]  # on top of the site's shift: the patient's blocks, stained together
    nucleus_scale: float  # nuclear size of this patient's tissue (both classes)
    split: str = ""  # "test" or "train" when the cohort fixes splits
    recorded_label: str = ""  # the label labels.csv gives when it was flipped (label noise); else ""


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a labelled cohort: its file name, whose it is, and the spec that draws it."""

    file_name: str  # "cohort-7-0003.svs": says nothing about label, patient or site
    patient: str
    site: str
    spec: SynthSpec

    @property
    def label(self) -> str:
        return self.spec.label


@dataclass
class Cohort:
    """A planned (and, after :func:`generate_labelled_cohort`, written) labelled cohort.

    ``truths`` maps file names to the ground truth of the slides written so far; labels.csv is made from
    those truths, so it states what is on the slides rather than what was asked for.
    """

    out_dir: Path
    parameters: CohortParameters
    sites: list[CohortSite]
    patients: list[CohortPatient]
    slides: list[CohortSlide]
    truths: dict[str, SlideTruth] = field(default_factory=dict)

    @property
    def labels_path(self) -> Path:
        return self.out_dir / LABELS_CSV

    @property
    def summary_path(self) -> Path:
        return self.out_dir / COHORT_JSON

    def slide_path(self, slide: CohortSlide) -> Path:
        return self.out_dir / slide.file_name

    def label_rows(self) -> list[dict[str, str]]:
        """Rows of labels.csv (sorted by slide name), from the written slides' ground truth."""
        rows = []
        for slide in sorted(self.slides, key=lambda s: s.file_name):
            truth = self.truths.get(slide.file_name)
            if truth is None:
                raise RuntimeError(f"slide {slide.file_name} has not been written yet: no label to report")
            row = {
                "slide": slide.file_name,
                "patient": slide.patient,
                "label": truth.label,
                "site": slide.site,
                "tumour_fraction": f"{truth.tumour_fraction_actual:.4f}",
            }
            if self.parameters.hard_columns:
                patient = self.patient(slide.patient)
                row["label"] = patient.recorded_label or truth.label
                row["split"] = patient.split
                row["true_label"] = truth.label
            rows.append(row)
        return rows

    def patient(self, patient_id: str) -> CohortPatient:
        return next(p for p in self.patients if p.patient_id == patient_id)

    @property
    def held_out_site(self) -> str | None:
        return next((site.name for site in self.sites if site.held_out), None)


def hard_parameters(patients: int, **overrides: Any) -> CohortParameters:
    """The hard benchmark's parameters (``hard.HARD_DEFAULTS``); overrides that are None keep the preset."""
    fields = {**hard.HARD_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    return CohortParameters(patients=patients, **fields)


def _check_range(
    name: str, value: tuple[float, float], low: float, high: float, problems: list[str], example: str
) -> None:
    if len(value) != 2:
        problems.append(f"{name} {value!r} must be a (low, high) pair, e.g. {example}")
    elif not low <= value[0] <= value[1] <= high:
        problems.append(
            f"{name} {value[0]}-{value[1]} must satisfy {low} <= low <= high <= {high}, e.g. {example}"
        )


def _site_names(count: int) -> list[str]:
    return [f"site-{chr(ord('A') + index)}" for index in range(count)]


def _spread_offsets(rng: np.random.Generator, count: int, spread: float) -> list[float]:
    """``count`` offsets spread evenly over -spread..spread (ends included), jittered a little, in random
    order: sites always differ visibly however the seed falls (independent uniform draws can put two
    sites' stains on top of each other), and the extremes of the range do occur. One site: near 0."""
    if count == 1:
        return [float(rng.uniform(-0.25, 0.25)) * spread]
    step = 2 * spread / (count - 1)
    centres = [-spread + step * int(position) for position in rng.permutation(count)]
    jitter = rng.uniform(-0.15, 0.15, count) * step
    return [float(np.clip(centre + jitter[i], -spread, spread)) for i, centre in enumerate(centres)]


def _plan_sites(seed: int, count: int, stain_shift: float, tint: float) -> list[CohortSite]:
    rng = np.random.default_rng([seed, 21])
    eosin = _spread_offsets(rng, count, stain_shift)
    haematoxylin = _spread_offsets(rng, count, stain_shift)
    sites = []
    for index, name in enumerate(_site_names(count)):
        # Scanners differ in lamp brightness (they rarely over-expose: 0..tint darker) and white balance.
        brightness = float(rng.uniform(0.0, tint))
        cast = rng.uniform(-0.5 * tint, 0.5 * tint, 3)
        sites.append(
            CohortSite(
                name=name,
                stain_shift=(round(1 + eosin[index], 4), round(1 + haematoxylin[index], 4)),
                illumination_od=(
                    round(brightness + float(cast[0]), 4),
                    round(brightness + float(cast[1]), 4),
                    round(brightness + float(cast[2]), 4),
                ),
            )
        )
    return sites


def _plan_patients(
    seed: int, count: int, tumour_patient_ratio: float, sites: list[CohortSite], variation: float
) -> list[CohortPatient]:
    """Diagnoses shuffled over the patient ids; sites dealt round-robin within each diagnosis, so every
    site gets about as many patients, and about the same share of tumour patients, as every other one
    (site is not a shortcut to the label)."""
    rng = np.random.default_rng([seed, 22])
    n_tumour = math.floor(count * tumour_patient_ratio + 0.5)
    labels = np.asarray(["tumour"] * n_tumour + ["normal"] * (count - n_tumour))[rng.permutation(count)]
    site_of = [""] * count
    next_site = int(rng.integers(len(sites)))
    for diagnosis in ("tumour", "normal"):
        members = [index for index in range(count) if labels[index] == diagnosis]
        dealt = [sites[(next_site + k) % len(sites)].name for k in range(len(members))]
        next_site = (next_site + len(members)) % len(sites)
        for index, site in zip(members, rng.permutation(dealt).tolist(), strict=True):
            site_of[index] = str(site)
    patients = []
    for index in range(count):
        eosin, haematoxylin = (float(v) for v in 1 + rng.uniform(-variation / 2, variation / 2, 2))
        patients.append(
            CohortPatient(
                patient_id=f"P{index + 1:04d}",
                site=site_of[index],
                label=str(labels[index]),
                stain_factor=(round(eosin, 4), round(haematoxylin, 4)),
                nucleus_scale=round(float(1 + rng.uniform(-variation, variation)), 4),
            )
        )
    return patients


def plan_labelled_cohort(out_dir: Path, parameters: CohortParameters) -> Cohort:
    """Decide every site, patient and slide of a labelled cohort, without writing anything.

    Separate from :func:`generate_labelled_cohort` so that callers (and tests) can inspect a plan cheaply.
    Sites, patients and slides draw from separate seeded streams.
    """
    sites = _plan_sites(parameters.seed, parameters.sites, parameters.site_stain_shift, parameters.site_tint)
    if parameters.held_out_site:
        sites[-1] = dataclasses.replace(
            sites[-1],
            stain_shift=hard.HELD_OUT_STAIN_SHIFT,
            illumination_od=hard.HELD_OUT_ILLUMINATION_OD,
            look=hard.HELD_OUT_LOOK,
            held_out=True,
        )
    patients = _plan_patients(
        parameters.seed,
        parameters.patients,
        parameters.tumour_patient_ratio,
        sites,
        parameters.patient_variation,
    )
    if parameters.hard_columns:
        patients = _fix_splits_and_noise(parameters, sites, patients)
    slides = _plan_slides(parameters, {site.name: site for site in sites}, patients)
    return Cohort(Path(out_dir), parameters, sites, patients, slides)


def _fix_splits_and_noise(
    parameters: CohortParameters, sites: list[CohortSite], patients: list[CohortPatient]
) -> list[CohortPatient]:
    held_out = next((site.name for site in sites if site.held_out), None)
    split: dict[str, str] = {}
    if parameters.fixed_splits:
        split = hard.fixed_splits(
            [(p.patient_id, p.site, p.label) for p in patients],
            held_out,
            parameters.test_fraction,
            parameters.seed,
        )
    flipped = hard.noisy_patients([p.patient_id for p in patients], parameters.label_noise, parameters.seed)
    other = {"tumour": "normal", "normal": "tumour"}
    return [
        dataclasses.replace(
            p,
            split=split.get(p.patient_id, ""),
            recorded_label=other[p.label] if p.patient_id in flipped else "",
        )
        for p in patients
    ]


def _plan_slides(
    parameters: CohortParameters, sites: dict[str, CohortSite], patients: list[CohortPatient]
) -> list[CohortSlide]:
    rng = np.random.default_rng([parameters.seed, 23])
    low, high = parameters.slides_per_patient
    drafts: list[tuple[CohortPatient, float]] = []  # (patient, tumour fraction or 0)
    for patient in patients:
        n_slides = int(rng.integers(low, high + 1))
        is_tumour = [False] * n_slides
        if patient.label == "tumour":
            # At least one block shows the tumour; the others do with some probability, as in real cases
            # where margins and distant blocks are often tumour-free.
            certain = int(rng.integers(n_slides))
            is_tumour = [
                k == certain or bool(rng.random() < parameters.tumour_slide_probability)
                for k in range(n_slides)
            ]
        for tumour in is_tumour:
            fraction = 0.0
            if tumour and parameters.tumour_fraction_log:
                log_low, log_high = (math.log(v) for v in parameters.tumour_fraction)
                fraction = round(math.exp(float(rng.uniform(log_low, log_high))), 4)
            elif tumour:
                fraction = round(float(rng.uniform(*parameters.tumour_fraction)), 4)
            drafts.append((patient, fraction))
    # Shuffled, so that neither file names nor their order group a patient's slides together.
    order = rng.permutation(len(drafts))
    slide_seeds = rng.choice(2**31, size=len(drafts), replace=False)
    # "mixed": each slide's format at random, not per site: the file extension must not reveal the site.
    formats: list[SlideFormat] = (
        [parameters.fmt] * len(drafts)
        if parameters.fmt != "mixed"
        else [
            "svs" if heads else "tiff"
            for heads in np.random.default_rng([parameters.seed, 24]).random(len(drafts)) < 0.5
        ]
    )
    digits = max(4, len(str(len(drafts) - 1)))
    mimic_rng = np.random.default_rng([parameters.seed, 27])
    size_rng = np.random.default_rng([parameters.seed, 28])
    slides = []
    for index, draft_index in enumerate(order.tolist()):
        patient, fraction = drafts[draft_index]
        site = sites[patient.site]
        extra: dict[str, object] = {}
        if parameters.mimics:
            extra["mimics"] = hard.draw_mimics(mimic_rng)
        if parameters.tumour_look != "classic":
            extra["tumour_look"] = parameters.tumour_look
        if site.look != ScannerLook():
            extra["look"] = site.look
        size = parameters.size
        if parameters.tiles_per_slide is not None:
            tiles = hard.draw_tiles(size_rng, parameters.tiles_per_slide)
            aspect = float(size_rng.uniform(1.0, 1.6))
            size = hard.slide_size_for_tiles(tiles, int(slide_seeds[index]), parameters.mpp, aspect)
        spec = SynthSpec(
            width=size[0],
            height=size[1],
            mpp=parameters.mpp,
            fmt=formats[index],
            tumour_fraction=fraction,
            seed=int(slide_seeds[index]),
            tile_size=240 if formats[index] == "svs" else 256,
            stain_jitter=COHORT_SLIDE_STAIN_JITTER,
            artefacts=parameters.artefacts,
            stain_shift=(
                round(site.stain_shift[0] * patient.stain_factor[0], 4),
                round(site.stain_shift[1] * patient.stain_factor[1], 4),
            ),
            illumination_od=site.illumination_od,
            nucleus_scale=patient.nucleus_scale,
            **extra,
        )
        name = f"cohort-{parameters.seed}-{index:0{digits}d}.{formats[index]}"
        slides.append(CohortSlide(name, patient.patient_id, site.name, spec))
    return slides


def generate_labelled_cohort(
    out_dir: Path,
    *,
    patients: int,
    slides_per_patient: tuple[int, int] = (1, 3),
    tumour_patient_ratio: float = 0.5,
    tumour_slide_probability: float = 0.7,
    tumour_fraction: tuple[float, float] = (0.05, 0.4),
    sites: int = 3,
    site_stain_shift: float = 0.15,
    site_tint: float = 0.03,
    patient_variation: float = 0.1,
    size: tuple[int, int] = (8000, 6000),
    fmt: CohortFormat = "svs",
    mpp: float = 0.5,
    artefacts: bool = False,
    seed: int = 0,
    mimics: bool = False,
    tumour_look: str = "classic",
    tumour_fraction_log: bool = False,
    tiles_per_slide: tuple[int, int] | None = None,
    held_out_site: bool = False,
    test_fraction: float = 0.0,
    label_noise: float = 0.0,
    progress: Callable[[Path, float], None] | None = None,
    on_slide: Callable[[CohortSlide, SlideTruth], None] | None = None,
) -> Cohort:
    """Write a labelled cohort into ``out_dir``: slides with truth files, ``labels.csv`` and ``cohort.json``.

    Why: model training and evaluation must split by patient and check robustness across sites, and no
    public archive can be downloaded here. This cohort has what makes those checks meaningful:

    * **patients** (``P0001``...) with 1..n slides each (``slides_per_patient``, inclusive). A share
      ``tumour_patient_ratio`` of the patients has cancer: at least one of their slides shows tumour, each
      other one does with ``tumour_slide_probability``, and the rest are normal tissue, as blocks of a
      cancer case often are. Normal patients have only normal slides. Each tumour slide's tumour share of
      the tissue area is drawn from ``tumour_fraction`` (low, high), down to small foci of 0.05.
    * a **patient look**: a stain factor (+-``patient_variation``/2) and a nuclear size
      (+-``patient_variation``) that all slides of a patient share, so that splitting by slide instead of by
      patient leaks and inflates results, as it does with real data.
    * **sites** (``site-A``...; scanner + lab): patients are dealt to sites evenly, within each diagnosis.
      Each site's stain shift (eosin and haematoxylin OD x (1 +- up to ``site_stain_shift``), spread over
      the range) and colour cast (up to ``site_tint`` OD) is drawn once and applies to all its slides;
      ``fmt="mixed"`` makes each slide svs or tiff at random (not per site: the file extension must not
      reveal the site).
    * the **hard benchmark** options (``shared/slides/synth/hard.py`` explains each; ``hard.HARD_DEFAULTS``
      holds the preset): ``mimics`` (lymphoid, reactive, necrosis, fat and mucin regions on every slide),
      ``tumour_look="subtle"``, ``tumour_fraction_log``, ``tiles_per_slide`` (each slide sized to hold that
      many tiler tiles of tissue, instead of ``size``), ``held_out_site`` (the last site: strong stain and
      scanner shift, all its patients ``split=test``), ``test_fraction`` (other sites' patients fixed to
      test) and ``label_noise`` (patients whose label is flipped). With splits or noise labels.csv gains
      the columns ``split`` and ``true_label``.

    File names (``cohort-<seed>-<index>.<ext>``, in shuffled order) reveal neither label, patient nor site.
    ``labels.csv`` (columns slide, patient, label, site, tumour_fraction) takes label and tumour fraction
    from each written slide's ground truth, and lists this cohort's slides only (other files in ``out_dir``
    are left alone). ``cohort.json`` records the parameters, counts per label and site, each site's shift
    and cast, each patient's look and slides, and each slide's seed. The same arguments give identical
    files. Slides are streamed by
    :func:`generate_slide` one at a time (bounded memory); ``progress(path, fraction)`` reports big slides
    and ``on_slide(slide, truth)`` each finished one. Raises ValueError, naming every bad argument.
    """
    parameters = CohortParameters(
        patients=patients,
        slides_per_patient=slides_per_patient,
        tumour_patient_ratio=tumour_patient_ratio,
        tumour_slide_probability=tumour_slide_probability,
        tumour_fraction=tumour_fraction,
        sites=sites,
        site_stain_shift=site_stain_shift,
        site_tint=site_tint,
        patient_variation=patient_variation,
        size=size,
        fmt=fmt,
        mpp=mpp,
        artefacts=artefacts,
        seed=seed,
        mimics=mimics,
        tumour_look=tumour_look,
        tumour_fraction_log=tumour_fraction_log,
        tiles_per_slide=tiles_per_slide,
        held_out_site=held_out_site,
        test_fraction=test_fraction,
        label_noise=label_noise,
    )
    return write_labelled_cohort(out_dir, parameters, progress=progress, on_slide=on_slide)


def write_labelled_cohort(
    out_dir: Path,
    parameters: CohortParameters,
    *,
    progress: Callable[[Path, float], None] | None = None,
    on_slide: Callable[[CohortSlide, SlideTruth], None] | None = None,
) -> Cohort:
    """:func:`generate_labelled_cohort` for a ready :class:`CohortParameters` (e.g. the hard preset)."""
    cohort = plan_labelled_cohort(out_dir, parameters)
    cohort.out_dir.mkdir(parents=True, exist_ok=True)
    for slide in cohort.slides:
        path = cohort.slide_path(slide)
        callback = None if progress is None else functools.partial(progress, path)
        truth = generate_slide(path, slide.spec, progress=callback)
        cohort.truths[slide.file_name] = truth
        if on_slide is not None:
            on_slide(slide, truth)
    _write_cohort_files(cohort)
    return cohort


def _write_cohort_files(cohort: Cohort) -> None:
    """labels.csv and cohort.json, each written under a temporary name and renamed when complete."""
    import csv
    import io

    rows = cohort.label_rows()
    text = io.StringIO()
    columns = LABELS_COLUMNS + (HARD_LABELS_COLUMNS if cohort.parameters.hard_columns else ())
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _replace_text(cohort.labels_path, text.getvalue())

    def counts(selected: list[dict[str, str]]) -> dict[str, int]:
        # the truth, also where label noise flipped the label column
        return {
            label: sum(row.get("true_label", row["label"]) == label for row in selected)
            for label in ("tumour", "normal")
        }

    def patient_counts(site: str | None) -> dict[str, int]:
        chosen = [p for p in cohort.patients if site is None or p.site == site]
        return {label: sum(p.label == label for p in chosen) for label in ("tumour", "normal")}

    slides_of: dict[str, list[str]] = {}
    for slide in cohort.slides:
        slides_of.setdefault(slide.patient, []).append(slide.file_name)
    summary = {
        "generator": GENERATOR_VERSION,
        "kind": "labelled-cohort",
        "seed": cohort.parameters.seed,
        "parameters": _parameters_json(cohort.parameters),
        "labels": LABELS_CSV,
        "counts": {
            "patients": patient_counts(None),
            "slides": counts(rows),
            "per_site": {
                site.name: {
                    "patients": patient_counts(site.name),
                    "slides": counts([row for row in rows if row["site"] == site.name]),
                }
                for site in cohort.sites
            },
        },
        "sites": {
            site.name: {
                "stain_shift": list(site.stain_shift),
                "illumination_od": list(site.illumination_od),
            }
            for site in cohort.sites
        },
        "patients": {
            patient.patient_id: {
                "site": patient.site,
                "label": patient.label,
                "stain_factor": list(patient.stain_factor),
                "nucleus_scale": patient.nucleus_scale,
                "slides": sorted(slides_of.get(patient.patient_id, [])),
            }
            for patient in cohort.patients
        },
        "slides": {
            slide.file_name: {
                "patient": slide.patient,
                "site": slide.site,
                "label": cohort.truths[slide.file_name].label,
                "seed": slide.spec.seed,
                "tumour_fraction_requested": slide.spec.tumour_fraction,
                "tumour_fraction_actual": cohort.truths[slide.file_name].tumour_fraction_actual,
            }
            for slide in sorted(cohort.slides, key=lambda s: s.file_name)
        },
    }
    if cohort.parameters.hard_columns or cohort.parameters.mimics:
        _add_hard_summary(cohort, summary)
    _replace_text(cohort.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _parameters_json(parameters: CohortParameters) -> dict[str, object]:
    """The parameters, without hard-benchmark fields at their defaults (other cohort.json files stay as
    they were before those fields existed)."""
    data = dataclasses.asdict(parameters)
    defaults = CohortParameters(patients=1)
    for name in (
        "mimics",
        "tumour_look",
        "tumour_fraction_log",
        "tiles_per_slide",
        "held_out_site",
        "test_fraction",
        "label_noise",
    ):
        if getattr(parameters, name) == getattr(defaults, name):
            del data[name]
    return data


def _add_hard_summary(cohort: Cohort, summary: dict[str, Any]) -> None:
    """Held-out site, splits, flipped labels and per-slide class shares, for the hard benchmark."""
    summary["held_out_site"] = cohort.held_out_site
    flipped = sorted(p.patient_id for p in cohort.patients if p.recorded_label)
    summary["label_noise"] = {"share": cohort.parameters.label_noise, "flipped_patients": flipped}
    for site in cohort.sites:
        summary["sites"][site.name]["held_out"] = site.held_out
        if site.look != ScannerLook():
            summary["sites"][site.name]["look"] = site.look.to_json()
    for patient in cohort.patients:
        entry = summary["patients"][patient.patient_id]
        entry["split"] = patient.split
        entry["recorded_label"] = patient.recorded_label or patient.label
    for name, entry in summary["slides"].items():
        truth = cohort.truths[name]
        entry["true_label"] = truth.label
        entry["class_fractions"] = truth.class_fractions
        entry["size"] = [truth.width, truth.height]
        entry["tissue_tiles"] = round(
            truth.tissue_fraction * truth.width * truth.height * (truth.mpp / hard.TILER_TILE_UM) ** 2
        )


def _replace_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)
