"""Tile extraction benchmark: our tiler's reader vs an OpenSlide loop vs the raw libjpeg-turbo decode limit.

Run (not a timed test; numbers depend on the machine)::

    python -m tests.benchmarks.bench_tiles --workdir bench-results/tiles            # 12000x9000 px slides
    python -m tests.benchmarks.bench_tiles --workdir bench-results/tiles --quick    # seconds: the smoke form

Slides: synthetic Aperio slides (240 px stored tiles, shared JPEG tables) at exactly 0.5 um/px (20x) and
0.25 um/px (40x), a synthetic 40x slide at 0.2527 um/px (a real scanner's calibration: within
``MPP_TOLERANCE`` of 0.25, so 0.5 um/px tiles are its level 0 decoded at 1/2 in the DCT domain, no
resize), and the real scan ``../shared/fixtures/real/CMU-1-Small-Region.svs`` (0.499 um/px, RGB-coded
240 px tiles) at 256 px and at 240 px, where every tissue tile inside the slide is one stored tile and
the tiler passes the stored bytes through.

On each, in one process, over the same planned tissue tiles (0.5 um/px), the fastest of ``--rounds``
rounds in which the four take turns, timed in CPU seconds of this process (every phase is single-threaded
work, so that other jobs on a shared machine do not skew the ratios; ``ours_vs_raw_decode_wall`` is the
wall-clock ratio beside it):

* ``ours``: ``FastTileReader.read_tile`` (stored JPEG tiles, DCT-scaled on 40x), decoded RGB tiles/s,
  a fresh reader (empty cache) each round;
* ``openslide``: ``tiling.read_tile`` (``read_region`` + alpha, + Lanczos when the grid is resampled or
  an exact 1/2 cut);
* ``raw_decode``: every stored tile those output tiles touch, already in memory, decoded once at full
  size by ``imagecodecs.jpeg8_decode`` in the level's colour space (as ``ours`` decodes it); expressed as
  output tiles/s (output tiles / decode time), the limit for a reader that decodes at full size;
* ``tiler``: what the tiler does per shard tile (``ShardTileCutter``: read + glass past the edge + JPEG
  encode, or the stored bytes passed through), tiles/s;
* ``histolab``: reported as unavailable unless ``histolab`` imports (see docs/tiling-and-qc.md).

Peak memory is the process's maximum resident set size after each phase (monotone, so a phase that
needed more than the ones before shows up as a step).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REAL_SLIDE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real" / "CMU-1-Small-Region.svs"
)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _slide(workdir: Path, name: str, mpp: float, size: tuple[int, int]) -> Path:
    from wsitk.shared.slides.synth import SynthSpec, generate_slide

    path = workdir / f"{name}-{size[0]}x{size[1]}.svs"
    if not path.exists():
        spec = SynthSpec(width=size[0], height=size[1], mpp=mpp, seed=7, tile_size=240, jpeg_tables=True)
        generate_slide(path, spec)
    return path


def measure(
    path: Path, *, tile_size: int = 256, target_mpp: float = 0.5, max_tiles: int = 0, rounds: int = 3
) -> dict[str, Any]:
    """Tiles/s of each reader over the same planned tissue tiles of ``path``."""
    import openslide
    from imagecodecs import jpeg8_decode
    from wsitk.services.tiler.handler import ShardTileCutter
    from wsitk.shared.slides.fastread import open_fast_reader
    from wsitk.shared.slides.reader import mpp_for
    from wsitk.shared.slides.tiling import plan_tiles, read_tile
    from wsitk.shared.slides.tissue import segment_tissue

    result: dict[str, Any] = {"slide": path.name, "tile_size": tile_size, "target_mpp": target_mpp}
    with openslide.OpenSlide(str(path)) as slide:
        mpp0 = mpp_for(slide.properties).x
        tissue = segment_tissue(slide, mpp0=mpp0)
        grid = plan_tiles(
            *slide.dimensions,
            mpp0,
            tissue,
            target_mpp=target_mpp,
            tile_size=tile_size,
            min_tissue_fraction=0.25,
            level_downsamples=list(slide.level_downsamples),
        )
        coords = [(int(x), int(y)) for x, y in grid.coords][: max_tiles or None]
        result.update(
            mpp0=mpp0,
            tile_mpp=round(grid.tile_mpp, 5),
            resampled=grid.resampled,
            level=grid.level,
            read_size=grid.read_size,
            tiles=len(coords),
        )
        result["peak_rss_mib_after_plan"] = round(_peak_rss_mib(), 1)

        def open_reader() -> Any:
            reader, why = open_fast_reader(
                path, slide.properties["openslide.vendor"], list(slide.level_dimensions)
            )
            if reader is None or not reader.supports(grid):
                raise SystemExit(
                    f"{path.name}: the fast path does not apply ({why}); benchmark needs a JPEG slide"
                )
            return reader

        probe = open_reader()
        result["dct_scale"] = probe.scale_for(grid)
        level = probe.levels[grid.level]
        assert level is not None
        probe.read_tile(grid, *coords[0])  # warm-up: imports and first-call costs, outside the timings

        involved: set[tuple[int, int]] = set()
        for x, y in coords:
            left, top = round(x / grid.level_downsample), round(y / grid.level_downsample)
            right, bottom = left + grid.read_size - 1, top + grid.read_size - 1
            for row in range(
                top // level.tile_height, min(bottom, level.height - 1) // level.tile_height + 1
            ):
                for column in range(
                    left // level.tile_width, min(right, level.width - 1) // level.tile_width + 1
                ):
                    involved.add((column, row))
        stored = [probe.stored_tile_bytes(grid.level, c, r) for c, r in sorted(involved)]
        probe.close()
        colorspace = "RGB" if level.rgb_coded else None

        def ours(reader: Any) -> float:
            return sum(float(reader.read_tile(grid, x, y)[::32, ::32].mean()) for x, y in coords)

        def openslide_loop(_: None) -> float:
            return sum(float(read_tile(slide, grid, x, y)[::32, ::32].mean()) for x, y in coords)

        def raw_decode(_: None) -> float:
            for data in stored:
                jpeg8_decode(data, tables=level.tables, colorspace=colorspace, outcolorspace="RGB")
            return 0.0

        passed_through = 0

        def tiler(reader: Any) -> float:
            nonlocal passed_through
            cutter = ShardTileCutter(
                grid, slide.dimensions, tissue.background.white, fast=reader, slide=slide
            )
            total = float(sum(len(tile.data) for tile in cutter.tiles(range(len(coords)))))
            passed_through = cutter.passed_through
            return total

        # Phases take turns within each round, so that a change in the machine's load hits all of them.
        phases: dict[str, tuple[Callable[[Any], float], Callable[[], Any]]] = {
            "ours": (ours, open_reader),
            "openslide": (openslide_loop, lambda: None),
            "raw_decode": (raw_decode, lambda: None),
            "tiler": (tiler, open_reader),
        }
        best = dict.fromkeys(phases, float("inf"))
        best_wall = dict.fromkeys(phases, float("inf"))
        checksums = dict.fromkeys(phases, 0.0)
        for round_index in range(rounds):
            for name, (run, setup) in phases.items():
                prepared = setup()
                started, started_wall = time.process_time(), time.perf_counter()
                checksums[name] = run(prepared)
                best[name] = min(best[name], time.process_time() - started)
                best_wall[name] = min(best_wall[name], time.perf_counter() - started_wall)
                if prepared is not None:
                    prepared.close()
                if round_index == 0:
                    result[f"peak_rss_mib_after_{name}"] = round(_peak_rss_mib(), 1)
        ours_s, openslide_s, raw_s, tiler_s = (max(best[name], 1e-9) for name in phases)
        checksum_ours, checksum_openslide = checksums["ours"], checksums["openslide"]
        result["ours_vs_raw_decode_wall"] = round(best_wall["raw_decode"] / best_wall["ours"], 2)
    n = len(coords)
    result.update(
        stored_tiles_involved=len(stored),
        ours_tiles_per_s=round(n / ours_s, 1),
        openslide_tiles_per_s=round(n / openslide_s, 1),
        raw_decode_stored_tiles_per_s=round(len(stored) / raw_s, 1),
        raw_decode_output_tiles_per_s=round(n / raw_s, 1),
        tiler_tiles_per_s=round(n / tiler_s, 1),
        tiles_passed_through=passed_through,
        ours_vs_openslide=round(openslide_s / ours_s, 2),
        ours_vs_raw_decode=round(raw_s / ours_s, 2),
        tiler_vs_raw_decode=round(raw_s / tiler_s, 2),
        raw_decode_vs_openslide=round(openslide_s / raw_s, 2),
        checksum_ratio=round(checksum_ours / max(checksum_openslide, 1e-9), 4),
        peak_rss_mib=round(_peak_rss_mib(), 1),
    )
    try:
        import histolab  # noqa: F401

        result["histolab"] = "installed but not wired into this benchmark"
    except ImportError:
        result["histolab"] = "not installed (see docs/tiling-and-qc.md)"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the synthetic slides are kept")
    parser.add_argument("--size", default="12000x9000", help="level-0 WIDTHxHEIGHT of the synthetic slides")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per reader; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="small slides, few tiles: the smoke form")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.quick:
        width, height = 2400, 1800
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[Path, int]] = [
        (_slide(args.workdir, name, mpp, (width, height)), 256)
        for name, mpp in (("bench-20x", 0.5), ("bench-40x", 0.25), ("bench-40x-0.2527", 0.2527))
    ]
    if REAL_SLIDE.is_file():
        runs += [(REAL_SLIDE, 256), (REAL_SLIDE, 240)]
    else:
        print(f"real slide missing, skipped: {REAL_SLIDE}", file=sys.stderr)
    results = [
        measure(
            path,
            tile_size=tile_size,
            max_tiles=40 if args.quick else 0,
            rounds=1 if args.quick else args.rounds,
        )
        for path, tile_size in runs
    ]
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
