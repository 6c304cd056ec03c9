"""Synthetic whole-slide images with ground truth: real pyramidal, tiled, JPEG-compressed TIFF/SVS files.

Why this exists: no public slide archive can be downloaded where the project is built and tested, yet every
stage (tissue detection, tiling at a physical resolution, QC, embedding, MIL training) needs slides that
OpenSlide opens exactly as it opens scanner output. This module writes such slides, streaming tile by tile so
that a 40,000 x 40,000 px slide needs no more memory than a 4,000 px one, and records what is on them (tissue
and tumour masks, the tumour fraction) so that tests and demos can check the pipeline's answers.

How a slide is drawn:

* A coarse **layout** (one grid cell per ``mask_downsample`` level-0 pixels) comes from the seed: a few smooth,
  warped tissue blobs and, for tumour slides, smooth tumour regions inside them, thresholded so that the
  requested fraction of the tissue area is tumour. The layout's masks are the ground truth.
* Every output window (a stored tile, a thumbnail, a standalone patch) is rendered procedurally from the
  layout: signed distances to the region borders are interpolated per pixel and roughened by noise, stain
  concentrations (haematoxylin, eosin) are computed per pixel and turned into RGB through Beer-Lambert optical
  density, so stain-normalisation methods (Macenko, Reinhard) see realistic colour statistics.
* Texture is defined at **physical scale**: noise fields have correlation lengths in micrometres and nuclei
  have radii in micrometres, so the same tissue at 0.25 um/px has nuclei twice as many pixels wide, and a
  pyramid level rendered at 4x the pixel size looks like the downsampled level 0. Nuclei belong to fixed
  cells of the pixel grid, each seeded by (slide seed, downsample, class, cell), so a window's pixels do not
  depend on the order or the size of the windows asked for: slides are byte-for-byte reproducible.
* Normal tissue: pink stroma with fibre texture and sparse small round nuclei. Tumour: denser, larger, darker,
  irregular nuclei on a slightly more purple stroma. The difference is meant to be learnable by a small
  random-weight CNN with attention MIL, which is what the demo trains.

* The hard benchmark (opt-in; ``mimics.py``, ``hard.py``): mimic regions (lymphoid aggregates, reactive
  epithelium, necrosis, fat, mucin) blended by membership like tumour, a subtler tumour look, small
  tumours, slides sized by tile count, a held-out site with a strong shift, fixed splits and label noise.
* Site and patient effects (``stain_shift``, ``illumination_od``, ``nucleus_scale``) are off by default. A
  labelled cohort (:func:`generate_labelled_cohort`) uses them so that the slides of one lab share a staining
  and scanner look and the slides of one patient share a tissue look, as real cohorts do: splitting by slide
  instead of by patient then leaks, and models can be checked across sites.
* Scanner and stain looks (``look``, a :class:`~wsitk.shared.slides.looks.ScannerLook`; the named set
  ``LOOKS`` and ``random_look`` live in ``shared/slides/looks.py``): glass white point (the illumination,
  which multiplies tissue too), stain intensity and hue, JPEG quality, strip-boundary stripes, red ink.
  The default look is an exact no-op.

The package: ``spec`` (appearance constants, :class:`SynthSpec`, :class:`SlideTruth`), ``layout`` (where tissue
and tumour are), ``render`` (texture, nuclei, the per-window renderer, patches), ``writer`` (SVS/TIFF files,
truth, simple cohorts), ``cohort`` (labelled cohorts with sites and patients) and ``cli`` (``wsi synth``).

Public entry points: :class:`SynthSpec`, :func:`generate_slide`, :func:`generate_cohort`, :func:`load_truth`,
:func:`render_patch`, :func:`render_region`, :class:`CohortParameters`, :func:`plan_labelled_cohort`,
:func:`generate_labelled_cohort`, and :func:`add_synth_arguments` / :func:`cli_synth` for ``wsi synth``.
"""

from __future__ import annotations

from wsitk.shared.slides.synth.cli import (
    add_synth_arguments,
    cli_synth,
)
from wsitk.shared.slides.synth.cohort import (
    COHORT_JSON,
    COHORT_SLIDE_STAIN_JITTER,
    LABELS_COLUMNS,
    LABELS_CSV,
    MAX_SITES,
    MAX_SLIDES_PER_PATIENT,
    Cohort,
    CohortFormat,
    CohortParameters,
    CohortPatient,
    CohortSite,
    CohortSlide,
    generate_labelled_cohort,
    hard_parameters,
    plan_labelled_cohort,
    write_labelled_cohort,
)
from wsitk.shared.slides.synth.layout import (
    Layout,
    build_layout,
)
from wsitk.shared.slides.synth.render import (
    NucleusCell,
    Renderer,
    StampSet,
    TextureBank,
    render_patch,
    render_region,
)
from wsitk.shared.slides.synth.spec import (
    BORDER_ROUGHNESS_UM,
    COARSE_SIGMA_UM,
    EOSIN_OD,
    FIBRE_SIGMA_UM,
    GENERATOR_VERSION,
    GLASS_OD,
    GLASS_OD_NOISE,
    GRAIN_SIGMA_UM,
    HAEMATOXYLIN_OD,
    ILLUMINATION_OD_RANGE,
    NORMAL,
    NUCLEUS_CELL_PX,
    NUCLEUS_SCALE_RANGE,
    PATCH_KINDS,
    STAIN_SHIFT_RANGE,
    STAMP_MODE_MIN_RADIUS_PX,
    STAMPS_PER_CLASS,
    TEXTURE_PERIODS,
    TISSUE_EDGE_UM,
    TUMOUR,
    TUMOUR_EDGE_UM,
    BoolArray,
    FloatArray,
    IntArray,
    PatchKind,
    SlideFormat,
    SlideTruth,
    SynthSpec,
    TissueClass,
    mask_path,
    truth_json_path,
)
from wsitk.shared.slides.synth.writer import (
    generate_cohort,
    generate_slide,
    identifying_fields,
    load_truth,
    split_jpeg_tables,
)

__all__ = [
    "BORDER_ROUGHNESS_UM",
    "COARSE_SIGMA_UM",
    "COHORT_JSON",
    "COHORT_SLIDE_STAIN_JITTER",
    "EOSIN_OD",
    "FIBRE_SIGMA_UM",
    "GENERATOR_VERSION",
    "GLASS_OD",
    "GLASS_OD_NOISE",
    "GRAIN_SIGMA_UM",
    "HAEMATOXYLIN_OD",
    "ILLUMINATION_OD_RANGE",
    "LABELS_COLUMNS",
    "LABELS_CSV",
    "MAX_SITES",
    "MAX_SLIDES_PER_PATIENT",
    "NORMAL",
    "NUCLEUS_CELL_PX",
    "NUCLEUS_SCALE_RANGE",
    "PATCH_KINDS",
    "STAIN_SHIFT_RANGE",
    "STAMPS_PER_CLASS",
    "STAMP_MODE_MIN_RADIUS_PX",
    "TEXTURE_PERIODS",
    "TISSUE_EDGE_UM",
    "TUMOUR",
    "TUMOUR_EDGE_UM",
    "BoolArray",
    "Cohort",
    "CohortFormat",
    "CohortParameters",
    "CohortPatient",
    "CohortSite",
    "CohortSlide",
    "FloatArray",
    "IntArray",
    "Layout",
    "NucleusCell",
    "PatchKind",
    "Renderer",
    "SlideFormat",
    "SlideTruth",
    "StampSet",
    "SynthSpec",
    "TextureBank",
    "TissueClass",
    "add_synth_arguments",
    "build_layout",
    "cli_synth",
    "generate_cohort",
    "generate_labelled_cohort",
    "generate_slide",
    "hard_parameters",
    "identifying_fields",
    "load_truth",
    "mask_path",
    "plan_labelled_cohort",
    "render_patch",
    "render_region",
    "split_jpeg_tables",
    "truth_json_path",
    "write_labelled_cohort",
]
