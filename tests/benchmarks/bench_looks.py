"""Tissue segmentation and tile QC accuracy per scanner look, against the generator's ground truth.

Run (a measurement, not a pass/fail test; the table goes into docs/tiling-and-qc.md, "Accuracy per look")::

    .venv/bin/python -m tests.benchmarks.bench_looks --workdir bench-results/looks             # every look
    .venv/bin/python -m tests.benchmarks.bench_looks --workdir bench-results/looks --looks dim,bright --random 0

For each look (``shared/slides/looks.py``: the named ``LOOKS`` plus ``--random N`` random looks) it writes
one slide: ``SynthSpec(width=6000, height=4500, mpp=0.5, seed=11, tile_size=240, artefacts=True,
jpeg_tables=True)`` in that look, with red ink added to every look so that pens of all four colours
(blue, green, black, red) are on every slide. Same seed, so every look shows the same tissue and
artefacts. Slides are kept in the workdir and reused while their spec is unchanged. On each slide
:func:`measure_look` reports:

* **segmentation** (``segment_tissue``, as the tiler calls it): IoU of the found mask against the truth
  tissue minus pen and debris (mask grid, as ``tests/integration/test_qc_accuracy.py``); the share of the pen truth
  (and of each pen colour) inside the found mask, which should be near 0; the share of the faint (30 %
  stain) tissue kept, which should be near 1;
* **tile QC** (``assess`` with :func:`qc_limits`, given the slide's background as segmentation measured
  it where the tissue mask carries one, as the tiler hands it on) on every tile position of the
  ``plan_tiles`` grid (256 px at 0.5 um/px) that lies inside the slide, read with the fast reader: tiles
  are assessed whether or not segmentation kept them, so QC is measured on its own. Per reason, true and
  false positives and false negatives against the truth cover of each tile:

  - ``pen``: positive when > 15 % of the tile is pen, negative when none is;
  - ``blur``: positive when > 60 % is blurred tissue without pen or debris, negative when no blur or
    faint tissue is on the tile (faint tissue reads as blur at this threshold; not counted either way);
  - ``underexposed``: positive when > 60 % is debris, negative when none is;
  - ``background``: positive when the tissue share is below 0.6 x the limit ``min_tissue_fraction`` and
    no pen or debris is on the tile, negative when it is above 1.4 x the limit (0.3 and 0.7 at 0.5);

  and the share of clean tissue tiles (> 90 % tissue, no artefact) that QC accepts.

Results: ``<workdir>/looks.json`` (everything) and ``<workdir>/looks.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The slide every look is drawn on (the one of tests/integration/test_qc_accuracy.py), and the QC limits.
BENCH_SIZE = (6000, 4500)
BENCH_SEED = 11
QC_REASONS = ("pen", "blur", "underexposed", "background")
MIN_IOU = 0.90  # the bar: no look below it


def bench_spec(look: Any, size: tuple[int, int] = BENCH_SIZE, seed: int = BENCH_SEED) -> Any:
    """The benchmark slide in ``look`` (a ScannerLook), with red ink so that all four pen colours are on it."""
    from wsitk.shared.slides.synth import SynthSpec

    return SynthSpec(
        width=size[0],
        height=size[1],
        mpp=0.5,
        seed=seed,
        tile_size=240,
        artefacts=True,
        jpeg_tables=True,
        look=dataclasses.replace(look, red_ink=True),
    )


def make_slide(workdir: Path, spec: Any) -> Path:
    """The slide of ``spec`` in ``workdir`` (generated unless an identical one is there already)."""
    from wsitk.shared.slides.synth import generate_slide, load_truth

    path = workdir / f"look-{spec.look.name}-{spec.width}x{spec.height}-s{spec.seed}.svs"
    if path.exists():
        try:
            if load_truth(path).spec == spec:
                return path
        except (FileNotFoundError, ValueError, KeyError):
            pass
    generate_slide(path, spec)
    return path


def _cover(mask: np.ndarray, downsample: int, x: int, y: int, side: int) -> float:
    """Share of a level-0 square covered by a truth mask (mask cells of ``downsample`` level-0 px)."""
    window = mask[y // downsample : (y + side) // downsample, x // downsample : (x + side) // downsample]
    return float(window.mean()) if window.size else 0.0


def _share(part: np.ndarray, whole: np.ndarray) -> float | None:
    total = int(whole.sum())
    return None if total == 0 else round(float((part & whole).sum()) / total, 4)


def _rates(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": None if tp + fp == 0 else round(tp / (tp + fp), 3),
        "recall": None if tp + fn == 0 else round(tp / (tp + fn), 3),
    }


def _glass_rgb(slide: Any, truth: Any) -> list[float]:
    """Median RGB of the glass at the slide's lowest level, away from tissue and pen (truth masks)."""
    from scipy import ndimage

    level = slide.level_count - 1
    image = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
    pen = truth.artefact_masks.get("pen", np.zeros_like(truth.tissue_mask))
    glass = ndimage.binary_erosion(~truth.tissue_mask, iterations=3) & ~ndimage.binary_dilation(
        pen, iterations=3
    )
    factor = truth.mask_downsample / slide.level_downsamples[level]
    rows = np.minimum((np.arange(image.shape[0]) / factor).astype(int), glass.shape[0] - 1)
    cols = np.minimum((np.arange(image.shape[1]) / factor).astype(int), glass.shape[1] - 1)
    pixels = image[glass[rows[:, None], cols[None, :]]]
    return [round(float(v), 1) for v in np.median(pixels, axis=0)] if len(pixels) else []


def _segmentation(truth: Any, found_mask: np.ndarray) -> dict[str, Any]:
    from PIL import Image

    masks = truth.artefact_masks
    empty = np.zeros_like(truth.tissue_mask)
    pen, debris, faint = (masks.get(kind, empty) for kind in ("pen", "debris", "faint"))
    expected = truth.tissue_mask & ~pen & ~debris
    found = np.asarray(Image.fromarray(found_mask).resize(expected.shape[::-1], Image.Resampling.NEAREST))
    return {
        "tissue_iou": round(float((found & expected).sum() / max(1, (found | expected).sum())), 4),
        "pen_inside_mask": _share(found, pen),
        "pen_inside_mask_by_colour": {colour: _share(found, m) for colour, m in truth.pen_masks.items()},
        "faint_kept": _share(found, faint & truth.tissue_mask),
    }


def qc_limits() -> Any:
    """The QC limits the figures use: the profile defaults (``QcThresholds()``)."""
    from wsitk.services.quality_filter.handler import QcThresholds

    return QcThresholds()


def _tile_qc(truth: Any, grid: Any, reader: Any, background: Any) -> dict[str, Any]:
    from wsitk.services.quality_filter.handler import assess

    masks, downsample = truth.artefact_masks, truth.mask_downsample
    empty = np.zeros_like(truth.tissue_mask)
    limits = qc_limits()
    background_below = 0.6 * limits.min_tissue_fraction
    tissue_above = min(0.95, 1.4 * limits.min_tissue_fraction)
    counts = {reason: [0, 0, 0] for reason in QC_REASONS}  # tp, fp, fn
    clean: dict[str, Any] = {"tiles": 0, "accepted": 0, "rejected_by_reason": {}}
    side = round(grid.tile_size_level0)
    rows, columns = grid.grid_shape
    xs = np.rint(np.arange(columns) * grid.stride_level0).astype(int)
    ys = np.rint(np.arange(rows) * grid.stride_level0).astype(int)
    assessed = 0
    for y in ys[ys + side <= truth.height]:
        for x in xs[xs + side <= truth.width]:
            tile = reader.read_tile(grid, int(x), int(y))
            # QC judges the tile against the slide's own glass, as the tiler measured it
            accepted, reason, _ = assess(tile, limits, background, grid.target_mpp)
            assessed += 1
            cover = {
                kind: _cover(masks.get(kind, empty), downsample, x, y, side)
                for kind in ("pen", "blur", "debris", "faint")
            }
            tissue = _cover(truth.tissue_mask, downsample, x, y, side)
            pen, debris, faint = cover["pen"], cover["debris"], cover["faint"]
            blur = cover["blur"] * tissue
            positives = {
                "pen": pen > 0.15,
                "blur": blur > 0.6 and pen == 0 and debris == 0,
                "underexposed": debris > 0.6,
                "background": tissue < background_below and pen == 0 and debris == 0,
            }
            negatives = {
                "pen": pen == 0,
                "blur": blur == 0 and faint == 0,
                "underexposed": debris == 0,
                "background": tissue > tissue_above,
            }
            for kind, tally in counts.items():
                if positives[kind] and reason == kind:
                    tally[0] += 1
                elif negatives[kind] and reason == kind:
                    tally[1] += 1
                elif positives[kind]:
                    tally[2] += 1
            if tissue > 0.9 and not any(cover.values()):
                clean["tiles"] += 1
                clean["accepted"] += int(accepted)
                if not accepted:
                    clean["rejected_by_reason"][reason] = clean["rejected_by_reason"].get(reason, 0) + 1
    clean["accepted_share"] = round(clean["accepted"] / clean["tiles"], 4) if clean["tiles"] else None
    return {
        "qc_limits": dataclasses.asdict(limits),
        "tiles_assessed": assessed,
        "qc": {kind: _rates(*tally) for kind, tally in counts.items()},
        "clean_tissue": clean,
    }


def measure_look(path: Path) -> dict[str, Any]:
    """Segmentation and tile-QC accuracy on one generated slide with truth (any look; see module docs)."""
    import openslide
    from wsitk.shared.slides.fastread import open_fast_reader
    from wsitk.shared.slides.synth import load_truth
    from wsitk.shared.slides.tiling import plan_tiles
    from wsitk.shared.slides.tissue import segment_tissue

    path = Path(path)
    truth = load_truth(path)
    started = time.perf_counter()
    with openslide.OpenSlide(str(path)) as slide:
        tissue = segment_tissue(slide, mpp0=truth.mpp)
        segmentation_s = time.perf_counter() - started
        grid = plan_tiles(
            truth.width,
            truth.height,
            truth.mpp,
            tissue,
            target_mpp=0.5,
            tile_size=256,
            min_tissue_fraction=0.0,
            level_downsamples=list(slide.level_downsamples),
        )
        reader, why = open_fast_reader(
            path, slide.properties["openslide.vendor"], list(slide.level_dimensions)
        )
        if reader is None or not reader.supports(grid):
            raise SystemExit(f"{path.name}: the fast reader does not apply ({why}); measure JPEG slides")
        glass = _glass_rgb(slide, truth)
    try:
        qc = _tile_qc(truth, grid, reader, tissue.background)
    finally:
        reader.close()
    look = truth.spec.look
    return {
        "look": look.name,
        "slide": path.name,
        "spec_look": look.to_json(),
        "glass_rgb": glass,
        **_segmentation(truth, tissue.mask),
        "planned_tiles": len(grid),
        **qc,
        "segmentation_s": round(segmentation_s, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _pr(rates: dict[str, Any]) -> str:
    return (
        f"{_fmt(rates['precision'])} / {_fmt(rates['recall'])} ({rates['tp']}, {rates['fp']}, {rates['fn']})"
    )


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per look: segmentation and QC figures (P / R (tp, fp, fn); "-": nothing to divide)."""
    header = (
        "| look | glass RGB | tissue IoU | pen in mask | red pen in mask | faint kept | "
        + " | ".join(f"QC {reason} P / R (tp, fp, fn)" for reason in QC_REASONS)
        + " | clean tissue accepted |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for result in results:
        iou = result["tissue_iou"]
        iou_text = f"{iou:.3f}" if iou >= MIN_IOU else f"**{iou:.3f}** (< {MIN_IOU})"
        cells = [
            result["look"],
            ",".join(f"{v:.0f}" for v in result["glass_rgb"]) or "-",
            iou_text,
            _fmt(result["pen_inside_mask"]),
            _fmt(result["pen_inside_mask_by_colour"].get("red")),
            _fmt(result["faint_kept"]),
            *(_pr(result["qc"][reason]) for reason in QC_REASONS),
            f"{_fmt(result['clean_tissue']['accepted_share'])} of {result['clean_tissue']['tiles']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _looks(names: str, random_count: int) -> list[Any]:
    from wsitk.shared.slides.looks import LOOKS, look_named, random_look

    chosen = list(LOOKS.values()) if names == "all" else [look_named(n.strip()) for n in names.split(",")]
    return chosen + [random_look(seed) for seed in range(random_count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where slides and results are kept")
    parser.add_argument(
        "--looks", default="all", help="comma-separated look names (default: every named look)"
    )
    parser.add_argument(
        "--random", type=int, default=4, help="random looks (seeds 0..N-1) to add (default 4)"
    )
    parser.add_argument("--size", default=f"{BENCH_SIZE[0]}x{BENCH_SIZE[1]}", help="level-0 WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=BENCH_SEED, help="slide seed (same tissue in every look)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for look in _looks(args.looks, args.random):
        path = make_slide(args.workdir, bench_spec(look, (width, height), args.seed))
        results.append(measure_look(path))
        print(f"  {look.name}: IoU {results[-1]['tissue_iou']:.3f}", flush=True)
    (args.workdir / "looks.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (args.workdir / "looks.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
