"""Deep-zoom tile server benchmark: the viewer's tile route vs OpenSlide's ``DeepZoomGenerator``.

Run (not a timed test; numbers depend on the machine)::

    python -m tests.benchmarks.bench_viewer --workdir bench-results/viewer
    python -m tests.benchmarks.bench_viewer --workdir bench-results/viewer --quick   # seconds

Both servers run in this process on loopback, each an aiohttp application answering
``/slides/{id}_files/{level}/{col}_{row}.jpeg`` from 8 worker threads, over the same synthetic SVS:

* ``viewer``: the viewer's own application (``services/viewer/app.py``: middleware, validation,
  the slide file through the local cache from a filesystem object store, the tile LRU);
* ``deepzoom``: ``openslide.deepzoom.DeepZoomGenerator(tile_size=254, overlap=1)`` ``get_tile``
  encoded as JPEG (quality 80) by PIL, no tile cache: how OpenSlide's own example server works.

``--clients`` concurrent clients fetch the same shuffled sample of tiles (the levels a viewer shows:
the top four); "cold" is the first pass (the viewer's tile cache empty, the slide already open on both),
"warm" the same tiles again. Reported per pass: tiles/s, p50 and p99 latency; and the mean absolute
pixel difference between the two servers' tiles (they cut the same pyramid).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, TCPConnector, web

SLIDE_ID = "ab" * 16


def _slide(workdir: Path, size: tuple[int, int]) -> Path:
    from wsitk.shared.slides.synth import SynthSpec, generate_slide

    path = workdir / f"viewer-bench-{size[0]}x{size[1]}.svs"
    if not path.exists():
        generate_slide(path, SynthSpec(width=size[0], height=size[1], mpp=0.25, seed=11, tile_size=240))
    return path


class _Repository:
    """The two queries the tile route makes, answered for one slide (no database in a benchmark)."""

    def __init__(self, width: int, height: int) -> None:
        self.row = {"slide_id": SLIDE_ID, "mpp": 0.25, "width": width, "height": height}

    def slide(self, slide_id: str) -> dict[str, Any] | None:
        return (
            {**self.row, "predictions": [], "runs": [], "tiling_run_id": ""} if slide_id == SLIDE_ID else None
        )

    def source(self, slide_id: str) -> dict[str, Any] | None:
        if slide_id != SLIDE_ID:
            return None
        return {"bucket": "uploads", "upload_key": "bench.svs", "version_id": "", "source_sha256": ""}


def viewer_app(slide: Path, workdir: Path) -> web.Application:
    from wsitk.services.viewer.app import Viewer, build_app
    from wsitk.shared.config import Settings
    from wsitk.shared.objectstore import FilesystemObjectStore

    store_root = workdir / "store"
    target = store_root / "uploads" / "bench.svs"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.write_bytes(slide.read_bytes())
    import openslide

    with openslide.OpenSlide(str(slide)) as opened:
        width, height = opened.dimensions
    settings = Settings(cache_dir=workdir / "cache", viewer_tile_cache_tiles=100_000)
    viewer = Viewer(settings, _Repository(width, height), FilesystemObjectStore(store_root))
    return build_app(viewer)


def deepzoom_app(slide: Path) -> web.Application:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    opened = openslide.OpenSlide(str(slide))
    generator = DeepZoomGenerator(opened, tile_size=254, overlap=1, limit_bounds=False)
    executor = ThreadPoolExecutor(max_workers=8)

    def render(level: int, col: int, row: int) -> bytes:
        buffer = io.BytesIO()
        generator.get_tile(level, (col, row)).save(buffer, "JPEG", quality=80)
        return buffer.getvalue()

    async def tile(request: web.Request) -> web.Response:
        info = request.match_info
        data = await asyncio.get_running_loop().run_in_executor(
            executor, render, int(info["level"]), int(info["col"]), int(info["row"])
        )
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get(r"/slides/{slide_id}_files/{level}/{col}_{row}.jpeg", tile)
    return app


class Server:
    """An aiohttp application on a free loopback port, in its own thread and event loop."""

    def __init__(self, app: web.Application) -> None:
        self.port = 0
        self._runner: web.AppRunner
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(app,), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _run(self, app: web.Application) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            runner = web.AppRunner(app, access_log=None)
            self._runner = runner
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)


def tile_sample(width: int, height: int, count: int, seed: int = 3) -> list[tuple[int, int, int]]:
    from wsitk.services.viewer.deepzoom import Pyramid

    pyramid = Pyramid(width, height)
    tiles = []
    for level in range(max(0, pyramid.max_level - 3), pyramid.max_level + 1):
        cols, rows = pyramid.grid(level)
        tiles += [(level, c, r) for c in range(cols) for r in range(rows)]
    random.Random(seed).shuffle(tiles)
    return tiles[:count] if count else tiles


async def one_pass(port: int, tiles: list[tuple[int, int, int]], clients: int) -> dict[str, Any]:
    queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
    for tile in tiles:
        queue.put_nowait(tile)
    latencies: list[float] = []
    base = f"http://127.0.0.1:{port}/slides/{SLIDE_ID}_files"

    async def client(session: ClientSession) -> None:
        while not queue.empty():
            level, col, row = queue.get_nowait()
            started = time.perf_counter()
            async with session.get(f"{base}/{level}/{col}_{row}.jpeg") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"tile {level}/{col}_{row}: HTTP {response.status}")
            latencies.append(time.perf_counter() - started)

    async with ClientSession(connector=TCPConnector(limit=clients)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "tiles": len(latencies),
        "tiles_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
    }


async def pixel_difference(ports: dict[str, int], tiles: list[tuple[int, int, int]]) -> float:
    import numpy as np
    from PIL import Image

    differences = []
    async with ClientSession() as session:
        for level, col, row in tiles:
            images = []
            for port in ports.values():
                url = f"http://127.0.0.1:{port}/slides/{SLIDE_ID}_files/{level}/{col}_{row}.jpeg"
                async with session.get(url) as response:
                    images.append(np.asarray(Image.open(io.BytesIO(await response.read())).convert("RGB")))
            if images[0].shape != images[1].shape:
                raise AssertionError(
                    f"tile {level}/{col}_{row}: sizes differ {images[0].shape} {images[1].shape}"
                )
            differences.append(float(np.abs(images[0].astype(int) - images[1].astype(int)).mean()))
    return round(statistics.mean(differences), 2)


def measure(slide: Path, workdir: Path, *, count: int, clients: int) -> dict[str, Any]:
    import openslide

    with openslide.OpenSlide(str(slide)) as opened:
        width, height = opened.dimensions
    tiles = tile_sample(width, height, count)
    servers = {"viewer": Server(viewer_app(slide, workdir)), "deepzoom": Server(deepzoom_app(slide))}
    result: dict[str, Any] = {"slide": slide.name, "size": [width, height], "clients": clients}
    try:
        ports = {name: server.port for name, server in servers.items()}
        for name, port in ports.items():
            # open the slide (and, for the viewer, copy it into its file cache) before timing
            asyncio.run(one_pass(port, [(0, 0, 0)], 1))
            result[name] = {
                "cold": asyncio.run(one_pass(port, tiles, clients)),
                "warm": asyncio.run(one_pass(port, tiles, clients)),
            }
        result["mean_abs_pixel_difference"] = asyncio.run(pixel_difference(ports, tiles[:40]))
    finally:
        for server in servers.values():
            server.stop()
    for phase in ("cold", "warm"):
        result[f"{phase}_speedup"] = round(
            result["viewer"][phase]["tiles_per_s"] / result["deepzoom"][phase]["tiles_per_s"], 2
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the synthetic slide is kept")
    parser.add_argument("--size", default="12000x9000", help="level-0 WIDTHxHEIGHT of the slide")
    parser.add_argument(
        "--tiles", type=int, default=600, help="tiles per pass (0 = every tile of the top 4 levels)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--quick", action="store_true", help="a small slide and few tiles: the smoke form")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in ("3000x2400" if args.quick else args.size).split("x"))
    slide = _slide(args.workdir, (width, height))
    result = measure(slide, args.workdir, count=80 if args.quick else args.tiles, clients=args.clients)
    print(f"{'server':10s} {'pass':5s} {'tiles/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name in ("viewer", "deepzoom"):
        for phase in ("cold", "warm"):
            row = result[name][phase]
            print(
                f"{name:10s} {phase:5s} {row['tiles_per_s']:9.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}"
            )
    print(
        f"viewer / deepzoom tiles/s: cold {result['cold_speedup']}x, warm {result['warm_speedup']}x; "
        f"mean |pixel difference| {result['mean_abs_pixel_difference']}"
    )
    (args.workdir / "bench_viewer.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
