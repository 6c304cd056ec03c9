"""The synthetic generator's appearance constants, the slide specification and its ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.looks import ScannerLook

GENERATOR_VERSION = "wsitk-synth-1"

SlideFormat = Literal["svs", "tiff"]
PatchKind = Literal["background", "normal", "tumour"]
PATCH_KINDS: tuple[str, ...] = ("background", "normal", "tumour")

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int32]

# ---------------------------------------------------------------------------------------------------------
# Appearance constants. Colours are optical densities (OD = -ln(I / 255)) per unit stain concentration, so
# that stains add up the way light absorption does.
# ---------------------------------------------------------------------------------------------------------


def _od(rgb: tuple[float, float, float]) -> NDArray[np.float32]:
    return (-np.log(np.asarray(rgb, dtype=np.float64) / 255.0)).astype(np.float32)


# Eosin at concentration 1 gives pink stroma around RGB (230, 150, 190).
EOSIN_OD = _od((230.0, 150.0, 190.0))
# Haematoxylin at concentration 1, together with some eosin and the glass, gives nuclei around (90, 60, 150).
HAEMATOXYLIN_OD = np.asarray([0.93, 1.12, 0.32], dtype=np.float32)
# Glass and mounting medium: near-white background, RGB about 240 with mild noise.
GLASS_OD = 0.061
GLASS_OD_NOISE = 0.012

# Physical texture scales (micrometres).
GRAIN_SIGMA_UM = 0.35  # per-pixel grain: chromatin, sensor noise
FIBRE_SIGMA_UM = (7.0, 1.1)  # stroma fibres: long along, thin across
COARSE_SIGMA_UM = 14.0  # staining density variation, border roughness
BORDER_ROUGHNESS_UM = 10.0  # amplitude of tissue border irregularity
TISSUE_EDGE_UM = 2.0  # width of the tissue/glass transition
TUMOUR_EDGE_UM = 8.0  # tumour/normal transition is more diffuse than the tissue edge

NUCLEUS_CELL_PX = 256  # nuclei are drawn per cell of this many pixels at the rendered downsample
STAMP_MODE_MIN_RADIUS_PX = 0.75  # below this nuclei are rendered as a coverage field, not as shapes
STAMPS_PER_CLASS = 32
TEXTURE_PERIODS = (512, 500)  # two periodic noise banks with coprime-ish periods: no visible repeats


@dataclass(frozen=True)
class TissueClass:
    """How one kind of tissue looks: its stroma stains and its nuclei, in physical units."""

    name: str
    class_id: int
    stroma_eosin: float  # eosin concentration of the stroma
    stroma_haematoxylin: float  # haematoxylin tint of the stroma (tumour stroma is more purple)
    nuclei_per_um2: float
    radius_um: tuple[float, float]
    aspect: tuple[float, float]  # ellipse axis ratio
    irregularity: tuple[float, float]  # amplitude of harmonic border perturbation
    haematoxylin: tuple[float, float]  # nuclear stain concentration (darkness)
    # Fat only: empty vacuoles (adipocytes) that clear the stroma, drawn like nuclei but subtracting stain.
    vacuoles_per_um2: float = 0.0
    vacuole_radius_um: tuple[float, float] = (0.0, 0.0)
    stamp_supersample: int = 4  # anti-aliasing of the stamps; 2 is plenty for fat's large vacuoles

    @property
    def mean_nucleus_area_um2(self) -> float:
        radius = sum(self.radius_um) / 2
        return math.pi * radius * radius * (sum(self.aspect) / 2)


NORMAL = TissueClass(
    name="normal",
    class_id=1,
    stroma_eosin=1.0,
    stroma_haematoxylin=0.03,
    nuclei_per_um2=1 / 160,
    radius_um=(1.5, 2.0),
    aspect=(1.0, 1.35),
    irregularity=(0.0, 0.06),
    haematoxylin=(0.75, 0.95),
)
TUMOUR = TissueClass(
    name="tumour",
    class_id=2,
    stroma_eosin=0.82,
    stroma_haematoxylin=0.16,
    nuclei_per_um2=1 / 55,
    radius_um=(3.0, 4.0),
    aspect=(1.0, 1.6),
    irregularity=(0.1, 0.25),
    haematoxylin=(1.15, 1.5),
)

# A subtler tumour (``SynthSpec.tumour_look="subtle"``): stroma like normal tissue, nuclei only moderately
# larger, denser and darker. Same class id as TUMOUR: it replaces it, it does not add to it.
TUMOUR_SUBTLE = TissueClass(
    name="tumour",
    class_id=2,
    stroma_eosin=0.97,
    stroma_haematoxylin=0.05,
    nuclei_per_um2=1 / 70,
    radius_um=(2.6, 3.4),
    aspect=(1.0, 1.5),
    irregularity=(0.08, 0.2),
    haematoxylin=(1.05, 1.35),
)
TUMOUR_LOOKS = ("classic", "subtle")

# Mimics: benign tissue that a colour or nuclear-density shortcut confuses with tumour (or hides it under).
# Opt-in (``SynthSpec.mimics``); a slide without them renders exactly as before they existed.
LYMPHOID = TissueClass(  # lymphoid aggregate: dense, small, very dark, round nuclei
    name="lymphoid",
    class_id=3,
    stroma_eosin=0.75,
    stroma_haematoxylin=0.08,
    nuclei_per_um2=1 / 30,
    radius_um=(1.6, 2.1),
    aspect=(1.0, 1.12),
    irregularity=(0.0, 0.03),
    haematoxylin=(1.45, 1.8),
)
REACTIVE = TissueClass(  # reactive epithelium: moderately enlarged, darker nuclei; the closest tumour mimic
    name="reactive",
    class_id=4,
    stroma_eosin=0.93,
    stroma_haematoxylin=0.07,
    nuclei_per_um2=1 / 85,
    radius_um=(2.2, 2.9),
    aspect=(1.0, 1.4),
    irregularity=(0.03, 0.1),
    haematoxylin=(0.95, 1.2),
)
NECROSIS = TissueClass(  # necrosis: bright pink debris with karyorrhectic nuclear fragments
    name="necrosis",
    class_id=5,
    stroma_eosin=1.3,
    stroma_haematoxylin=0.06,
    nuclei_per_um2=1 / 28,
    radius_um=(0.55, 1.1),
    aspect=(1.0, 1.8),
    irregularity=(0.15, 0.4),
    haematoxylin=(1.1, 1.6),
)
FAT = TissueClass(  # adipose tissue: large empty vacuoles between thin pink septa, rare flat nuclei
    name="fat",
    class_id=6,
    stroma_eosin=0.8,
    stroma_haematoxylin=0.02,
    nuclei_per_um2=1 / 2500,
    radius_um=(1.4, 1.8),
    aspect=(1.4, 2.0),
    irregularity=(0.0, 0.05),
    haematoxylin=(0.7, 0.9),
    vacuoles_per_um2=1 / 1900,
    vacuole_radius_um=(22.0, 38.0),
)
MUCIN = TissueClass(  # mucin: pale blue-grey pools with a few floating nuclei
    name="mucin",
    class_id=7,
    stroma_eosin=0.16,
    stroma_haematoxylin=0.17,
    nuclei_per_um2=1 / 900,
    radius_um=(1.6, 2.2),
    aspect=(1.0, 1.3),
    irregularity=(0.0, 0.08),
    haematoxylin=(0.8, 1.0),
)
#: Mimic classes by name, in compositing order: earlier ones lie on top where soft borders overlap.
MIMIC_CLASSES: dict[str, TissueClass] = {c.name: c for c in (NECROSIS, LYMPHOID, REACTIVE, MUCIN, FAT)}
MIMIC_EDGE_UM = TUMOUR_EDGE_UM

# Bounds of the site and patient effects. A stain shift beyond 0.5..1.6 or a colour cast beyond a few tenths
# of OD no longer looks like H&E from a working lab; nuclei scaled beyond 0.75..1.3 would blur the
# normal/tumour size difference the demo relies on.
STAIN_SHIFT_RANGE = (0.5, 1.6)
ILLUMINATION_OD_RANGE = (-0.06, 0.25)
NUCLEUS_SCALE_RANGE = (0.75, 1.3)

# ---------------------------------------------------------------------------------------------------------
# Spec and ground truth
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSpec:
    """What slide to make. Everything that changes a pixel is here, so (spec) -> identical file bytes.

    ``fmt="svs"`` writes an Aperio SVS (OpenSlide vendor ``aperio``, ``aperio.MPP`` and ``aperio.AppMag``,
    thumbnail, label and macro images, identifying-looking description fields for de-identification tests);
    ``fmt="tiff"`` writes a generic tiled TIFF (vendor ``generic-tiff``) whose MPP is carried by the TIFF
    resolution tags in centimetres, or by nothing at all when ``with_mpp`` is false.
    """

    width: int = 8000
    height: int = 6000
    mpp: float = 0.5
    fmt: SlideFormat = "svs"
    tumour_fraction: float = 0.0
    seed: int = 0
    tile_size: int = 256
    jpeg_quality: int = 85
    n_tissue_blobs: int = 3
    with_mpp: bool = True
    with_associated_images: bool = True
    stain_jitter: float = 0.06
    artefacts: bool = (
        False  # pen strokes, blurred disks, dark debris, a faint disk (shared/slides/artefacts.py)
    )
    jpeg_tables: bool = False  # Aperio-style: quantisation/Huffman tables once per level (TIFF JPEGTables)
    rgb_coded_jpeg: bool = False  # JPEG coded in RGB, photometric RGB, no Adobe marker (as Aperio can write)
    # Site and patient effects (labelled cohorts). The defaults are exact no-ops: a spec without them gives
    # the same bytes as before they existed.
    stain_shift: tuple[float, float] = (1.0, 1.0)  # (eosin, haematoxylin) OD multipliers: a lab's protocol
    illumination_od: tuple[float, float, float] = (0.0, 0.0, 0.0)  # OD added per RGB channel: scanner cast
    nucleus_scale: float = 1.0  # nuclear radius multiplier of both classes: one patient's look
    # Scanner and stain look (shared/slides/looks.py). The default changes nothing. A look's JPEG quality,
    # when it has one, replaces ``jpeg_quality``; its red ink is drawn even without ``artefacts``.
    look: ScannerLook = field(default_factory=ScannerLook)
    # Mimic regions ((class name, share of the tissue area), ...; shared/slides/synth/mimics.py) and the
    # tumour's look ("classic" or "subtle"). The defaults (none, classic) are exact no-ops.
    mimics: tuple[tuple[str, float], ...] = ()
    tumour_look: str = "classic"

    def __post_init__(self) -> None:
        # Truth files store tuples as JSON lists and the look as an object; normalise so that a reloaded
        # spec equals (and hashes like) the one that wrote the slide.
        object.__setattr__(self, "stain_shift", tuple(float(v) for v in self.stain_shift))
        object.__setattr__(self, "illumination_od", tuple(float(v) for v in self.illumination_od))
        if isinstance(self.look, dict):
            object.__setattr__(self, "look", ScannerLook.from_json(self.look))
        if self.look.jpeg_quality is not None:
            object.__setattr__(self, "jpeg_quality", self.look.jpeg_quality)
        object.__setattr__(self, "mimics", tuple((str(name), float(share)) for name, share in self.mimics))
        problems = []
        if not (64 <= self.width <= 400_000 and 64 <= self.height <= 400_000):
            problems.append(f"width x height {self.width}x{self.height} must each be within 64..400000 px")
        if not 0.05 <= self.mpp <= 20.0:
            problems.append(f"mpp {self.mpp} must be within 0.05..20 um/px (0.5 is 20x, 0.25 is 40x)")
        if self.fmt not in ("svs", "tiff"):
            problems.append(f"fmt {self.fmt!r} must be 'svs' or 'tiff'")
        if not 0.0 <= self.tumour_fraction <= 0.9:
            problems.append(f"tumour_fraction {self.tumour_fraction} must be 0 (normal) or up to 0.9")
        if self.tile_size % 16 or not 64 <= self.tile_size <= 2048:
            problems.append(f"tile_size {self.tile_size} must be a multiple of 16 within 64..2048 (240, 256)")
        if not 10 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality {self.jpeg_quality} must be within 10..100")
        if not 1 <= self.n_tissue_blobs <= 12:
            problems.append(f"n_tissue_blobs {self.n_tissue_blobs} must be within 1..12")
        if self.seed < 0:
            problems.append(f"seed {self.seed} must be >= 0")
        if self.rgb_coded_jpeg and not self.jpeg_tables:
            problems.append("rgb_coded_jpeg needs jpeg_tables (Aperio's RGB-coded tiles share tables)")
        if self.fmt == "svs" and not self.with_mpp:
            problems.append("with_mpp=False is only possible with fmt='tiff' (Aperio always records MPP)")
        problems += self._effect_problems() + self._mimic_problems()
        if problems:
            raise ValueError("invalid SynthSpec: " + "; ".join(problems))

    def _effect_problems(self) -> list[str]:
        """What is wrong with the site and patient effects (stain shift, colour cast, nucleus size)."""
        problems = []
        if len(self.stain_shift) != 2 or not all(
            STAIN_SHIFT_RANGE[0] <= v <= STAIN_SHIFT_RANGE[1] for v in self.stain_shift
        ):
            problems.append(
                f"stain_shift {self.stain_shift} must be two factors (eosin, haematoxylin) within "
                f"{STAIN_SHIFT_RANGE[0]}..{STAIN_SHIFT_RANGE[1]} (1.0 = unchanged)"
            )
        if len(self.illumination_od) != 3 or not all(
            ILLUMINATION_OD_RANGE[0] <= v <= ILLUMINATION_OD_RANGE[1] for v in self.illumination_od
        ):
            problems.append(
                f"illumination_od {self.illumination_od} must be three optical densities (R, G, B) within "
                f"{ILLUMINATION_OD_RANGE[0]}..{ILLUMINATION_OD_RANGE[1]} (0 = neutral, 0.05 = 5% darker)"
            )
        if not NUCLEUS_SCALE_RANGE[0] <= self.nucleus_scale <= NUCLEUS_SCALE_RANGE[1]:
            problems.append(
                f"nucleus_scale {self.nucleus_scale} must be within "
                f"{NUCLEUS_SCALE_RANGE[0]}..{NUCLEUS_SCALE_RANGE[1]} (1.0 = unchanged)"
            )
        return problems

    def _mimic_problems(self) -> list[str]:
        problems = []
        if self.tumour_look not in TUMOUR_LOOKS:
            problems.append(f"tumour_look {self.tumour_look!r} must be one of {', '.join(TUMOUR_LOOKS)}")
        names = [name for name, _ in self.mimics]
        unknown = sorted(set(names) - set(MIMIC_CLASSES))
        if unknown:
            problems.append(f"mimics {unknown} unknown: choose from {', '.join(MIMIC_CLASSES)}")
        if len(set(names)) != len(names):
            problems.append(f"mimics {names} name a class more than once")
        bad = [f"{name}={share}" for name, share in self.mimics if not 0.0 < share <= 0.5]
        if bad:
            problems.append(f"mimic shares {', '.join(bad)} must be within 0 (exclusive)..0.5 of the tissue")
        if sum(share for _, share in self.mimics) + self.tumour_fraction > 0.95:
            problems.append("mimic shares plus tumour_fraction must leave at least 5% of the tissue normal")
        return problems

    @property
    def label(self) -> str:
        return "tumour" if self.tumour_fraction > 0 else "normal"

    @property
    def objective_power(self) -> int:
        """Nominal objective: 20x at 0.5 um/px, 40x at 0.25 um/px (10 um/px divided by the MPP)."""
        return max(1, round(10.0 / self.mpp))

    def level_downsamples(self) -> list[int]:
        """Level 0, then downsamples 4, 16, ... while the smallest level is still 1024 px or more."""
        downsamples = [1]
        while max(self.width, self.height) // downsamples[-1] >= 1024:
            downsamples.append(downsamples[-1] * 4)
        return downsamples

    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(max(1, self.width // ds), max(1, self.height // ds)) for ds in self.level_downsamples()]


@dataclass
class SlideTruth:
    """What is on a generated slide. Masks are at ``mask_downsample`` (level-0 px per mask cell)."""

    path: Path
    label: str
    tumour_fraction_requested: float
    tumour_fraction_actual: float  # of the tissue area
    tissue_fraction: float  # of the slide area
    mpp: float
    width: int
    height: int
    seed: int
    fmt: str
    mask_downsample: int
    tissue_mask: BoolArray
    tumour_mask: BoolArray
    spec: SynthSpec
    identifying_properties: dict[str, str] = field(default_factory=dict)
    artefact_masks: dict[str, BoolArray] = field(default_factory=dict)  # pen/blur/debris/faint, mask grid
    pen_masks: dict[str, BoolArray] = field(default_factory=dict)  # per pen colour drawn, mask grid
    # With mimics (or a subtle tumour): every class's share of the tissue area ("normal", "tumour", mimics)
    # and each mimic's mask (mask grid, exclusive of tumour and of each other). Empty otherwise.
    class_fractions: dict[str, float] = field(default_factory=dict)
    class_masks: dict[str, BoolArray] = field(default_factory=dict)

    @property
    def truth_json_path(self) -> Path:
        return truth_json_path(self.path)

    @property
    def mask_path(self) -> Path:
        return mask_path(self.path)


def truth_json_path(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.name + ".truth.json")


def mask_path(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.name + ".mask.npz")
