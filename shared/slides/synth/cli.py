"""``wsi synth``: the command-line glue of the generator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsitk.shared.slides.looks import LOOKS, ScannerLook, look_named
from wsitk.shared.slides.synth.cohort import (
    CohortSlide,
    generate_labelled_cohort,
    hard_parameters,
    write_labelled_cohort,
)
from wsitk.shared.slides.synth.spec import SlideTruth
from wsitk.shared.slides.synth.writer import generate_cohort

# ---------------------------------------------------------------------------------------------------------
# CLI glue (`wsi synth`)
# ---------------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must look like WIDTHxHEIGHT, e.g. 8000x6000"
        ) from None
    return width, height


def _split_range(text: str, what: str, example: str) -> tuple[str, str]:
    parts = [part.strip() for part in text.split("-")]
    if len(parts) == 1 and parts[0]:
        return parts[0], parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"{what} {text!r} must be a number or a range LOW-HIGH, e.g. {example}")


def _parse_fraction_range(text: str) -> tuple[float, float]:
    """``0.2`` or ``0.05-0.4``; bounds are checked where they are used, with the other arguments."""
    low, high = _split_range(text, "tumour fraction", "0.2 or 0.05-0.4")
    try:
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tumour fraction {text!r} must be a number or a range LOW-HIGH, e.g. 0.2 or 0.05-0.4"
        ) from None


def _parse_count_range(text: str) -> tuple[int, int]:
    """``2`` or ``1-3`` (inclusive)."""
    low, high = _split_range(text, "slides per patient", "2 or 1-3")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"slides per patient {text!r} must be a whole number or a range LOW-HIGH, e.g. 2 or 1-3"
        ) from None


def _parse_tiles(text: str) -> tuple[int, int]:
    """``5000`` or ``5000-30000`` tiler tiles of tissue per slide."""
    low, high = _split_range(text, "tiles per slide", "5000-30000")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tiles per slide {text!r} must be a whole number or a range LOW-HIGH, e.g. 5000-30000"
        ) from None


def _parse_looks(text: str) -> tuple[ScannerLook, ...]:
    """``all``, or comma-separated look names (``shared/slides/looks.py``)."""
    if text.strip() == "all":
        return tuple(LOOKS.values())
    try:
        return tuple(look_named(name.strip()) for name in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``wsi synth OUTDIR``: unrelated slides (``--count``) or a labelled cohort (``--patients``)."""
    parser.add_argument(
        "outdir", type=Path, help="folder to write the slides and their .truth.json/.mask.npz"
    )
    parser.add_argument(
        "--count", type=int, default=None, help="number of unrelated slides (default 4; without --patients)"
    )
    parser.add_argument(
        "--size", type=_parse_size, default=None, help="WIDTHxHEIGHT of level 0 (default 8000x6000)"
    )
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=("svs", "tiff", "mixed"),
        default="svs",
        help="slide format; 'mixed' (with --patients): each slide svs or tiff at random",
    )
    parser.add_argument("--mpp", type=float, default=0.5, help="um per pixel: 0.5 = 20x, 0.25 = 40x")
    parser.add_argument(
        "--tumour-fraction",
        type=_parse_fraction_range,
        default=None,
        metavar="FRACTION[-MAX]",
        help="fraction of the tissue area that is tumour on tumour slides (default 0.2); with --patients "
        "a range LOW-HIGH to draw from (default 0.05-0.4)",
    )
    parser.add_argument(
        "--tumour-ratio",
        type=float,
        default=None,
        help="share of tumour slides (default 0.5; without --patients)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tile-size", type=int, default=None, help="stored tile size (240 for svs, 256 tiff)"
    )
    parser.add_argument("--no-mpp", action="store_true", help="tiff only: write no resolution (MPP) at all")
    parser.add_argument(
        "--artefacts",
        action="store_true",
        help="draw pen strokes (blue, green, black; red too with a look's red ink), blurred disks, dark debris "
        "and faint tissue, with truth masks",
    )
    parser.add_argument(
        "--jpeg-tables",
        action="store_true",
        help="store JPEG tables once per level (TIFF JPEGTables), as Aperio does",
    )
    parser.add_argument(
        "--rgb-jpeg",
        action="store_true",
        help="RGB-coded JPEG tiles (photometric RGB, no colour marker); implies --jpeg-tables",
    )
    looks = parser.add_mutually_exclusive_group()
    looks.add_argument(
        "--look",
        type=_parse_looks,
        default=None,
        metavar="NAME[,NAME...]|all",
        help=f"scanner/stain look(s), cycled over the slides: {', '.join(LOOKS)}, random-<seed>, or 'all' "
        "(then --count defaults to one slide per look); see docs/tiling-and-qc.md",
    )
    looks.add_argument(
        "--random-looks",
        action="store_true",
        help="each slide gets a random look (glass tint and brightness, stain intensity and hue, JPEG "
        "quality, stripes, red ink) drawn from its seed",
    )
    cohort = parser.add_argument_group(
        "labelled cohort",
        "--patients N writes a cohort for patient-level training and evaluation: patients with one or more "
        "slides each, spread over sites (scanner + lab) with their own staining, plus labels.csv "
        "(slide, patient, label, site, tumour_fraction) and cohort.json",
    )
    cohort.add_argument("--patients", type=int, default=None, help="number of patients (cohort mode)")
    cohort.add_argument(
        "--slides-per-patient",
        type=_parse_count_range,
        default=None,
        metavar="N[-MAX]",
        help="slides per patient, a number or an inclusive range (default 1-3)",
    )
    cohort.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    cohort.add_argument(
        "--site-stain-shift",
        type=float,
        default=None,
        help="each site's stain strength differs by up to this share (default 0.15)",
    )
    cohort.add_argument(
        "--tumour-patient-ratio",
        type=float,
        default=None,
        help="share of patients with tumour (default 0.5); their other slides are tumour with p=0.7",
    )
    hard = parser.add_argument_group(
        "hard benchmark",
        "--hard (with --patients) writes the hard benchmark cohort (shared/slides/synth/hard.py, "
        "docs/training-and-evaluation.md): tumour mimics on every slide, tumour at 0.5-5% of the tissue "
        "with a subtle look, slides of 5,000-30,000 tiler tiles, a held-out site with a strong stain and "
        "scanner shift whose patients are all split=test, 5% label noise (true_label kept)",
    )
    hard.add_argument("--hard", action="store_true", help="the hard benchmark preset (needs --patients)")
    hard.add_argument(
        "--tiles",
        type=_parse_tiles,
        default=None,
        metavar="N[-MAX]",
        help="with --hard: tiler tiles (224 px at 0.5 um/px) of tissue per slide (default 5000-30000)",
    )
    hard.add_argument(
        "--label-noise", type=float, default=None, help="with --hard: share of patients flipped (0.05)"
    )
    hard.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="with --hard: share of the other sites' patients fixed to split=test (default 0.2)",
    )


_SLIDES_ONLY = {
    "count": "--count",
    "tumour_ratio": "--tumour-ratio",
    "tile_size": "--tile-size",
    "look": "--look",
}
_SLIDES_ONLY_FLAGS = {
    "no_mpp": "--no-mpp",
    "jpeg_tables": "--jpeg-tables",
    "rgb_jpeg": "--rgb-jpeg",
    "random_looks": "--random-looks",
}
_COHORT_ONLY = {
    "slides_per_patient": "--slides-per-patient",
    "sites": "--sites",
    "site_stain_shift": "--site-stain-shift",
    "tumour_patient_ratio": "--tumour-patient-ratio",
}
_HARD_ONLY = {"tiles": "--tiles", "label_noise": "--label-noise", "test_fraction": "--test-fraction"}


def cli_synth(args: argparse.Namespace) -> int:
    """Run ``wsi synth``: one line per slide on stdout, progress of big slides on stderr.

    Without ``--patients``: ``--count`` unrelated slides, labels alternating. With it: a labelled cohort
    (:func:`generate_labelled_cohort`), and the path of its labels.csv as the last line.
    """
    try:
        if args.patients is None:
            _cli_slides(args)
        else:
            _cli_cohort(args)
    except ValueError as error:
        print(f"wsi synth: {error}", file=sys.stderr)
        return 2
    return 0


def _report_progress(path: Path, fraction: float) -> None:
    print(f"  {path.name}: {fraction:5.1%}", file=sys.stderr, flush=True)


def _cli_slides(args: argparse.Namespace) -> None:
    misplaced = [flag for name, flag in _COHORT_ONLY.items() if getattr(args, name) is not None]
    misplaced += [flag for name, flag in _HARD_ONLY.items() if getattr(args, name) is not None]
    misplaced += ["--hard"] if args.hard else []
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} only apply to a labelled cohort: add --patients N")
    if args.fmt == "mixed":
        raise ValueError("--format mixed only applies to a labelled cohort: add --patients N")
    tumour_fraction = 0.2
    if args.tumour_fraction is not None:
        low, high = args.tumour_fraction
        if low != high:
            raise ValueError(
                f"--tumour-fraction {low}-{high}: a range only applies to a labelled cohort "
                "(add --patients N); without it give one number, e.g. 0.2"
            )
        tumour_fraction = low

    def report_slide(truth: SlideTruth) -> None:
        look = "" if truth.spec.look == ScannerLook() else f"\tlook={truth.spec.look.name}"
        print(
            f"{truth.path}\t{truth.width}x{truth.height}\t{truth.label}\t"
            f"tumour={truth.tumour_fraction_actual:.3f}{look}",
            flush=True,
        )

    looks = args.look or ()
    count = args.count if args.count is not None else len(looks) if len(looks) > 1 else 4
    generate_cohort(
        args.outdir,
        count,
        tumour_ratio=0.5 if args.tumour_ratio is None else args.tumour_ratio,
        seed=args.seed,
        size=args.size or (8000, 6000),
        fmt=args.fmt,
        mpp=args.mpp,
        tumour_fraction=tumour_fraction,
        with_mpp=not args.no_mpp,
        tile_size=args.tile_size,
        artefacts=args.artefacts,
        jpeg_tables=args.jpeg_tables or args.rgb_jpeg,
        rgb_coded_jpeg=args.rgb_jpeg,
        looks=looks,
        random_looks=args.random_looks,
        progress=_report_progress,
        on_slide=report_slide,
    )


def _cli_cohort(args: argparse.Namespace) -> None:
    misplaced = [flag for name, flag in _SLIDES_ONLY.items() if getattr(args, name) is not None]
    misplaced += [flag for name, flag in _SLIDES_ONLY_FLAGS.items() if getattr(args, name)]
    if misplaced:
        hint = " (use --tumour-patient-ratio)" if "--tumour-ratio" in misplaced else ""
        raise ValueError(f"{', '.join(misplaced)} do not apply with --patients{hint}")

    def report_slide(slide: CohortSlide, truth: SlideTruth) -> None:
        print(
            f"{truth.path}\t{truth.width}x{truth.height}\t{truth.label}\t{slide.patient}\t{slide.site}\t"
            f"tumour={truth.tumour_fraction_actual:.3f}",
            flush=True,
        )

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    if args.hard:
        if args.size is not None:
            raise ValueError("--size does not apply with --hard: slides are sized by --tiles")
        parameters = hard_parameters(
            args.patients,
            seed=args.seed,
            fmt=args.fmt,
            mpp=args.mpp,
            artefacts=args.artefacts,
            slides_per_patient=args.slides_per_patient,
            tumour_patient_ratio=args.tumour_patient_ratio,
            tumour_fraction=args.tumour_fraction,
            sites=args.sites,
            site_stain_shift=args.site_stain_shift,
            tiles_per_slide=args.tiles,
            label_noise=args.label_noise,
            test_fraction=args.test_fraction,
        )
        cohort = write_labelled_cohort(
            args.outdir, parameters, progress=_report_progress, on_slide=report_slide
        )
        print(f"labels: {cohort.labels_path}", flush=True)
        return
    misplaced = [flag for name, flag in _HARD_ONLY.items() if getattr(args, name) is not None]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} only apply with --hard")

    cohort = generate_labelled_cohort(
        args.outdir,
        patients=args.patients,
        slides_per_patient=given(args.slides_per_patient, (1, 3)),
        tumour_patient_ratio=given(args.tumour_patient_ratio, 0.5),
        tumour_fraction=given(args.tumour_fraction, (0.05, 0.4)),
        sites=given(args.sites, 3),
        site_stain_shift=given(args.site_stain_shift, 0.15),
        size=args.size or (8000, 6000),
        fmt=args.fmt,
        mpp=args.mpp,
        artefacts=args.artefacts,
        seed=args.seed,
        progress=_report_progress,
        on_slide=report_slide,
    )
    print(f"labels: {cohort.labels_path}", flush=True)
