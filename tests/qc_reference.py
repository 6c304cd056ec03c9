"""Reference QC results per tile: what quality-filter measured and decided before its speed work.

``tests/integration/test_qc_speed_equivalence.py`` checks every tile against ``tests/data/qc_reference.json``: same
accepted/rejected, same reason, metrics within a stated tolerance. This module builds the tiles (one
deterministic recipe each) and, with ``--write``, regenerates the reference from the code as it is::

    .venv/bin/python -m tests.qc_reference --write      # rewrite tests/data/qc_reference.json
    .venv/bin/python -m tests.qc_reference              # compare the code with the stored reference

The file was first written by the float32 implementation of ``services/quality_filter/measures.py`` (the
one that measured about 300-350 tiles/s), so it pins the decisions of that implementation. Tiles:

* ``cmu/x/y``: every 224 px tile of a grid over level 0 of ``../shared/fixtures/real/CMU-1-Small-Region.svs``
  read with OpenSlide, measured at the slide's 0.499 um/px against the background segmentation estimates
  on its thumbnail (``segment_tissue``, as the tiler does);
* ``real/<file>``: each labelled tile of ``../shared/fixtures/real/tiles`` whole (512 px at its own
  resolution, default background, as ``tests/integration/test_real_slides.py``), and ``real224/<file>`` box-resized
  to 224 px at 0.5 um/px (as the handler test there);
* ``synth/<look>/<recipe>``: 224 px tiles rendered by ``shared/slides/synth/`` at 0.5 um/px in each
  scanner look (``shared/slides/looks.py``, plus glass clipped at 255 and two random looks), clean
  normal, tumour and glass, a marker stroke of each colour (wide and thin), blur, dark debris, an
  over-exposed flash on tissue and on glass, a tissue edge, and adipose-like septa on glass; each JPEG round-tripped at quality
  85 as the tiler stores tiles; measured against the background ``estimate_background`` finds on glass
  plus tissue of the same look. Each synthetic tile's pixels are pinned by a digest, so a change of the
  generator shows up as such and not as a QC difference.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL = REPO_ROOT.parent / "shared" / "fixtures" / "real"
CMU = REAL / "CMU-1-Small-Region.svs"
REAL_TILES = REAL / "tiles"
REFERENCE = REPO_ROOT / "tests" / "data" / "qc_reference.json"
TILE = 224
#: Tiles measured together, as the handler does.
BATCH = 16


@dataclass
class Case:
    """One tile to measure, with the background and resolution it is measured at."""

    key: str
    tile: np.ndarray
    background: Any
    mpp: float


def _digest(tile: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tile).tobytes()).hexdigest()[:16]


def cmu_cases() -> list[Case]:
    import openslide
    from wsitk.shared.slides.reader import mpp_for
    from wsitk.shared.slides.tissue import segment_tissue

    cases = []
    with openslide.OpenSlide(str(CMU)) as slide:
        mpp0 = mpp_for(slide.properties).x
        background = segment_tissue(slide, mpp0=mpp0).background
        width, height = slide.dimensions
        for y in range(0, height - TILE + 1, TILE):
            for x in range(0, width - TILE + 1, TILE):
                tile = np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))
                cases.append(Case(f"cmu/{x}/{y}", tile, background, mpp0))
    return cases


def real_tile_cases() -> list[Case]:
    from PIL import Image
    from wsitk.shared.slides.optical import DEFAULT_BACKGROUND

    with (REAL_TILES / "labels.csv").open() as handle:
        names = [row["file"] for row in csv.DictReader(handle)]
    cases = []
    for name in names:
        image = Image.open(REAL_TILES / name).convert("RGB")
        mpp = 2.0 if "level2" in name else 1.0 if "level1" in name else 0.25
        cases.append(Case(f"real/{name}", np.asarray(image), DEFAULT_BACKGROUND, mpp))
        resized = np.asarray(image.resize((TILE, TILE), Image.Resampling.BOX))
        cases.append(Case(f"real224/{name}", resized, DEFAULT_BACKGROUND, 0.5))
    return cases


#: Looks the synthetic tiles are rendered in: the named ones, glass clipped at 255, two random looks.
def _looks() -> list[Any]:
    from wsitk.shared.slides.looks import LOOKS, ScannerLook, random_look

    return [*LOOKS.values(), ScannerLook("clipped-glass", white_rgb=(255.0, 255.0, 255.0))] + [
        random_look(seed) for seed in (1, 2)
    ]


def _septa(seed: int, cells: int, septum_px: float) -> np.ndarray:
    """Optical density [224, 224, 3] of thin eosin septa between ``cells`` random adipocyte centres on
    glass (a Voronoi net), with a little glass noise."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, cells])
    points = rng.uniform(0, TILE, (cells, 2))
    ys, xs = np.mgrid[0:TILE, 0:TILE].astype(np.float64)
    distances = np.partition(np.hypot(ys[..., None] - points[:, 0], xs[..., None] - points[:, 1]), 1, axis=-1)
    septa = np.clip(septum_px - (distances[..., 1] - distances[..., 0]), 0.0, 1.0)
    septa = ndimage.gaussian_filter(septa, 0.6)
    return np.asarray(septa[..., None] * np.array([0.08, 0.35, 0.16]) + rng.normal(0, 0.004, (TILE, TILE, 3)))


#: (cells, septum width in px) of the adipose-like tiles; the widest septa make dense tissue, not fat.
FAT_RECIPES = ((8, 1.5), (5, 2.5), (14, 1.5), (8, 6.0))


def _synth_recipes(left_um: float, top_um: float) -> Iterator[tuple[str, str, Any, float]]:
    """(name, tissue kind, artefacts, brightness factor) of each synthetic tile whose top-left corner is at
    (``left_um``, ``top_um``) in the renderer's level-0 micrometres."""
    from wsitk.shared.slides.artefacts import Artefacts, Disk, PenStroke

    side = TILE * 0.5  # micrometres

    def at(x: float, y: float) -> tuple[float, float]:
        return left_um + x, top_um + y

    def disk(x: float, y: float, radius: float) -> Disk:
        return Disk(*at(x, y), radius_um=radius)

    yield "normal", "normal", Artefacts(), 1.0
    yield "tumour", "tumour", Artefacts(), 1.0
    yield "glass", "background", Artefacts(), 1.0
    for colour in ("blue", "green", "black", "red"):
        wide = PenStroke(colour, (at(-10.0, 20.0), at(side + 10.0, 70.0)), width_um=30.0)
        thin = PenStroke(colour, (at(30.0, -10.0), at(45.0, side + 10.0)), width_um=5.0)
        yield f"pen-{colour}", "tumour", Artefacts(pens=(wide,)), 1.0
        yield f"pen-{colour}-thin", "normal", Artefacts(pens=(thin,)), 1.0
        yield f"pen-{colour}-glass", "background", Artefacts(pens=(wide,)), 1.0
    yield "blur", "tumour", Artefacts(blur=(disk(side / 2, side / 2, side),)), 1.0
    yield "blur-half", "normal", Artefacts(blur=(disk(0.0, side / 2, side * 0.6),)), 1.0
    yield "debris", "tumour", Artefacts(debris=(disk(side / 2, side / 2, side * 0.5),)), 1.0
    yield "debris-large", "normal", Artefacts(debris=(disk(side / 2, side / 2, side * 0.8),)), 1.0
    yield "faint", "normal", Artefacts(faint=(disk(side / 2, side / 2, side),)), 1.0
    yield "flash", "normal", Artefacts(), 1.12
    yield "flash-glass", "background", Artefacts(), 1.08
    yield "dark-scan", "tumour", Artefacts(), 0.3


def _windows(renderers: dict[str, Any]) -> Callable[[str, int, int, int, int], np.ndarray]:
    """``render(kind, x, y, width, height)`` at level 0 that renders each clean window only once."""
    windows: dict[tuple[str, int, int, int, int], np.ndarray] = {}

    def window(kind: str, x: int, y: int, width: int, height: int) -> np.ndarray:
        if (kind, x, y, width, height) not in windows:
            windows[kind, x, y, width, height] = renderers[kind].render(1, x, y, width, height)
        return windows[kind, x, y, width, height]

    return window


def synth_cases() -> list[Case]:
    from wsitk.shared.shards import encode_jpeg
    from wsitk.shared.slides.artefacts import render_with_artefacts
    from wsitk.shared.slides.optical import estimate_background
    from wsitk.shared.slides.synth import Layout, Renderer

    def jpeg(tile: np.ndarray) -> np.ndarray:
        from imagecodecs import jpeg8_decode

        return np.asarray(jpeg8_decode(encode_jpeg(tile, 85)))

    # Every look shows the same tissue (one seed), so all renderers share one texture bank: the bank
    # depends on the seed and the resolution only, and building it is most of the rendering time.
    seed, bank = 100, None
    septa = [_septa(seed, cells, septum) for cells, septum in FAT_RECIPES]
    cases = []
    for index, look in enumerate(_looks()):
        renderers = {
            kind: Renderer(Layout.uniform(kind), 0.5, seed=seed, look=look)
            for kind in ("normal", "tumour", "background")
        }
        for renderer in renderers.values():
            bank = bank or renderer._bank(1)
            renderer._banks[1] = bank
        glass = renderers["background"].render(1, 0, 0, TILE, TILE)
        tissue = renderers["normal"].render(1, 0, 0, TILE, TILE)
        background = estimate_background(np.concatenate([glass, glass, tissue], axis=0))
        white = np.asarray(background.white)
        x0, y0 = 4000 + 300 * index, 2000
        window = _windows(renderers)
        for name, kind, artefacts, brightness in _synth_recipes(x0 * 0.5, y0 * 0.5):
            tile = render_with_artefacts(
                lambda x, y, w, h, k=kind, of=window: of(k, x, y, w, h),
                artefacts,
                0.5,
                x0,
                y0,
                TILE,
                TILE,
                white_rgb=look.white_rgb,
            )
            if brightness != 1.0:
                tile = np.clip(np.rint(tile * brightness), 0, 255).astype(np.uint8)
            cases.append(Case(f"synth/{look.name}/{name}", jpeg(tile), background, 0.5))
        edge = np.concatenate(
            [glass[:, : TILE * 3 // 4], renderers["tumour"].render(1, x0, y0, TILE // 4, TILE)], axis=1
        )
        cases.append(Case(f"synth/{look.name}/edge-quarter", jpeg(edge), background, 0.5))
        for (cells, septum), od in zip(FAT_RECIPES, septa, strict=True):
            tile = np.clip(np.rint(white * 10 ** (-np.maximum(od, 0))), 0, 255).astype(np.uint8)
            cases.append(Case(f"synth/{look.name}/fat-{cells}-{septum}", jpeg(tile), background, 0.5))
    return cases


def all_cases() -> list[Case]:
    return cmu_cases() + real_tile_cases() + synth_cases()


def measure_cases(cases: list[Case]) -> dict[str, dict[str, Any]]:
    """Per key: metrics, accepted, reason (default ``QcThresholds``), measured in handler-sized batches."""
    from wsitk.services.quality_filter.measures import QcThresholds, decide, measure_batch

    limits = QcThresholds()
    groups: dict[tuple[Any, ...], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.tile.shape, case.background, case.mpp), []).append(case)
    results: dict[str, dict[str, Any]] = {}
    for group in groups.values():
        for start in range(0, len(group), BATCH):
            batch = group[start : start + BATCH]
            measured = measure_batch(np.stack([c.tile for c in batch]), batch[0].background, batch[0].mpp)
            for case, metrics in zip(batch, measured, strict=True):
                accepted, reason = decide(metrics, limits)
                results[case.key] = {"metrics": metrics, "accepted": accepted, "reason": reason}
    return {case.key: results[case.key] for case in cases}


def build_reference(cases: list[Case]) -> dict[str, Any]:
    measured = measure_cases(cases)
    tiles = {}
    for case in cases:
        entry = dict(measured[case.key])
        if case.key.startswith("synth/"):
            entry["pixels"] = _digest(case.tile)
        tiles[case.key] = entry
    return {
        "about": "per-tile QC reference; regenerate with: python -m tests.qc_reference --write",
        "thresholds": "QcThresholds() defaults",
        "tiles": tiles,
    }


def compare(
    reference: dict[str, Any], cases: list[Case], tolerance: float
) -> tuple[list[str], dict[str, float]]:
    """(problems, largest metric difference per metric) of the code against the stored reference."""
    measured = measure_cases(cases)
    problems: list[str] = []
    largest: dict[str, float] = {}
    stored = reference["tiles"]
    if sorted(stored) != sorted(measured):
        problems.append(f"tile sets differ: {sorted(set(stored) ^ set(measured))[:10]}")
    for case in cases:
        want, got = stored.get(case.key), measured[case.key]
        if want is None:
            continue
        if "pixels" in want and want["pixels"] != _digest(case.tile):
            problems.append(f"{case.key}: the generator's pixels changed (not a QC difference)")
            continue
        if (want["accepted"], want["reason"]) != (got["accepted"], got["reason"]):
            problems.append(
                f"{case.key}: decision {(want['accepted'], want['reason'])} -> "
                f"{(got['accepted'], got['reason'])}; {want['metrics']} -> {got['metrics']}"
            )
        if set(want["metrics"]) != set(got["metrics"]):
            problems.append(f"{case.key}: metric names {sorted(want['metrics'])} -> {sorted(got['metrics'])}")
            continue
        for name, value in want["metrics"].items():
            difference = abs(float(got["metrics"][name]) - float(value))
            largest[name] = max(largest.get(name, 0.0), difference)
            limit = 0.0 if name in ("fat_lumens", "pen_colour") else tolerance * max(1.0, abs(value))
            if difference > limit:
                problems.append(f"{case.key}: {name} {value} -> {got['metrics'][name]}")
    return problems, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the reference from the current code")
    parser.add_argument("--tolerance", type=float, default=0.01, help="metric tolerance when comparing")
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(build_reference(cases), separators=(",", ":"), sort_keys=True) + "\n")
        reasons: dict[str, int] = {}
        for entry in json.loads(REFERENCE.read_text())["tiles"].values():
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
        print(f"wrote {REFERENCE.relative_to(REPO_ROOT)}: {len(cases)} tiles, reasons {reasons}")
        return 0
    problems, largest = compare(json.loads(REFERENCE.read_text()), cases, args.tolerance)
    print(
        json.dumps({"tiles": len(cases), "problems": problems[:50], "largest_difference": largest}, indent=2)
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
