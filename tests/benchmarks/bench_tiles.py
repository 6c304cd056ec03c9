"""Tile extraction benchmark: our tiler's reader vs an OpenSlide loop vs the raw libjpeg-turbo decode limit.

Run (not a timed test; numbers depend on the machine)::

    python -m tests.benchmarks.bench_tiles --workdir bench-results/tiles            # 20x and 40x, 12000x9000 px
    python -m tests.benchmarks.bench_tiles --workdir bench-results/tiles --quick    # seconds: the smoke form

On each slide, in one process, over the same planned tissue tiles (0.5 um/px, 256 px):

* ``ours``: ``FastTileReader.read_tile`` (stored JPEG tiles, DCT-scaled on 40x), decoded RGB tiles/s;
* ``openslide``: ``tiling.read_tile`` (``read_region`` + alpha + Lanczos to 256 px on 40x);
* ``raw_decode``: every stored tile those output tiles touch, already in memory, decoded once at full
  size by ``imagecodecs.jpeg8_decode``; expressed as output tiles/s (output tiles / decode time), the
  limit for a reader that decodes at full size;
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
from pathlib import Path
from typing import Any


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
    path: Path, *, tile_size: int = 256, target_mpp: float = 0.5, max_tiles: int = 0
) -> dict[str, Any]:
    """Tiles/s of each reader over the same planned tissue tiles of ``path``."""
    import openslide
    from imagecodecs import jpeg8_decode
    from wsitk.shared.slides.fastread import open_fast_reader
    from wsitk.shared.slides.reader import mpp_for
    from wsitk.shared.slides.tiling import plan_tiles, read_tile
    from wsitk.shared.slides.tissue import segment_tissue

    result: dict[str, Any] = {"slide": path.name}
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
        result.update(mpp0=mpp0, level=grid.level, read_size=grid.read_size, tiles=len(coords))
        result["peak_rss_mib_after_plan"] = round(_peak_rss_mib(), 1)

        reader, why = open_fast_reader(
            path, slide.properties["openslide.vendor"], list(slide.level_dimensions)
        )
        if reader is None or not reader.supports(grid):
            raise SystemExit(
                f"{path.name}: the fast path does not apply ({why}); benchmark needs a JPEG slide"
            )
        result["dct_scale"] = reader.scale_for(grid)
        started = time.perf_counter()
        ours = [reader.read_tile(grid, x, y) for x, y in coords[:1]]  # warm-up: first-tile costs
        started = time.perf_counter()
        checksum_ours = 0.0
        for x, y in coords:
            checksum_ours += float(reader.read_tile(grid, x, y)[::32, ::32].mean())
        ours_s = time.perf_counter() - started
        result["peak_rss_mib_after_ours"] = round(_peak_rss_mib(), 1)

        started = time.perf_counter()
        checksum_openslide = 0.0
        for x, y in coords:
            checksum_openslide += float(read_tile(slide, grid, x, y)[::32, ::32].mean())
        openslide_s = time.perf_counter() - started
        result["peak_rss_mib_after_openslide"] = round(_peak_rss_mib(), 1)

        level = reader.levels[grid.level]
        assert level is not None
        involved: set[tuple[int, int]] = set()
        for x, y in coords:
            left, top = x / grid.level_downsample, y / grid.level_downsample
            right, bottom = left + grid.read_size - 1, top + grid.read_size - 1
            for row in range(
                int(top) // level.tile_height, int(min(bottom, level.height - 1)) // level.tile_height + 1
            ):
                for column in range(
                    int(left) // level.tile_width, int(min(right, level.width - 1)) // level.tile_width + 1
                ):
                    involved.add((column, row))
        stored = [reader.stored_tile_bytes(grid.level, c, r) for c, r in sorted(involved)]
        started = time.perf_counter()
        for data in stored:
            jpeg8_decode(data, tables=level.tables)
        raw_s = time.perf_counter() - started
        reader.close()
        del ours
    n = len(coords)
    result.update(
        stored_tiles_involved=len(stored),
        ours_tiles_per_s=round(n / ours_s, 1),
        openslide_tiles_per_s=round(n / openslide_s, 1),
        raw_decode_stored_tiles_per_s=round(len(stored) / raw_s, 1),
        raw_decode_output_tiles_per_s=round(n / raw_s, 1),
        ours_vs_openslide=round(openslide_s / ours_s, 2),
        ours_vs_raw_decode=round(raw_s / ours_s, 2),
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
    parser.add_argument("--size", default="12000x9000", help="level-0 WIDTHxHEIGHT of both slides")
    parser.add_argument("--quick", action="store_true", help="small slides, few tiles: the smoke form")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.quick:
        width, height = 2400, 1800
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, mpp in (("bench-20x", 0.5), ("bench-40x", 0.25)):
        path = _slide(args.workdir, name, mpp, (width, height))
        results.append(measure(path, max_tiles=40 if args.quick else 0))
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
