"""Poison slides through the real pipeline: a file whose pixels need far more memory than the decoder may
use is recognised as poison, dead-lettered with a reason that names the limit, and never takes the service
down; slides uploaded with it are not held back; `wsi redrive` replays it once the limit is raised, and
then it completes.

The bombs are generated here (nothing binary is committed): small, valid generic tiled TIFFs (8192 px
square at 0.25 um/px, three levels) whose 0.5 um/px level, 4096 px square, is stored as ONE huge tile
(TIFF lets a tile run past the image). Their headers claim nothing absurd, and ingest's cheap checks
(they decode the coarsest level and one level-0 tile) pass: the tiler, which reads that level, is the
first to decode the tile.

- ``bomb-jpeg.tiff``: a 24576 px JPEG tile. The tiler's fast reader (libjpeg-turbo) needs 1.7 GiB for
  it: the allocation fails inside the decoder process (MemoryError) -> ``out-of-memory``.
- ``bomb-deflate.tiff``: a 16384 px deflate tile. Not JPEG, so OpenSlide reads it, and GLib aborts the
  decoder process when its 1 GiB ARGB buffer cannot be allocated -> ``decoder-crashed``.

The code names the cause on the dead letter (``dead_letters.error_type``); the slide itself ends
``failed`` with the runtime's ``dead-lettered`` code and a reason that quotes the error and its limit.
While they arrive the tiler runs with a 1 GiB decoder limit (normal slides need about 350 MB); the fix
is the pipeline's own 3 GiB, under which both decode (about 2.2 GB each).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wsitk.shared.ops import redrive

from tests.conftest import Pipeline
from tests.e2e.test_bad_input import good_slide
from tests.e2e.test_e2e_pipeline import all_terminal

pytestmark = pytest.mark.e2e

LOW_LIMIT = 1024**3
MPP0 = 0.25
LEVEL1_PX = 4096
#: Tissue: 3 x 3 tiles of 224 px at 0.5 um/px, on the tiler's grid (level-1 pixels), so 9 tiles result.
TISSUE_AT, TISSUE_PX = 8 * 224, 3 * 224
BOMBS = {  # file name -> (compression of the huge tile, its side in px, the reason code it must cause)
    "bomb-jpeg.tiff": ("jpeg", 24576, "out-of-memory"),
    "bomb-deflate.tiff": ("zlib", 16384, "decoder-crashed"),
}


def write_tile_bomb(path: Path, *, compression: str, tile_px: int, seed: int) -> None:
    """Level 0 (1024 px JPEG tiles) and level 2 (256 px) are ordinary; level 1 (0.5 um/px, what the tiler
    reads) is one ``tile_px`` square tile of ``compression``. Tissue sits at the same place on every level."""
    import tifffile
    from PIL import Image
    from wsitk.shared.slides.synth import render_patch

    patch = render_patch("normal", TISSUE_PX, 2 * MPP0, np.random.default_rng(seed))

    def level(scale: float) -> np.ndarray:  # scale: this level's pixels per level-1 pixel
        side, at, size = round(LEVEL1_PX * scale), round(TISSUE_AT * scale), round(TISSUE_PX * scale)
        image = np.full((side, side, 3), 255, dtype=np.uint8)
        resized = Image.fromarray(patch).resize((size, size), Image.Resampling.LANCZOS)
        image[at : at + size, at : at + size] = np.asarray(resized)
        return image

    common: dict[str, Any] = {
        "photometric": "rgb",
        "metadata": None,
        "resolution": (1e4 / MPP0, 1e4 / MPP0),  # pixels per centimetre: openslide.mpp-x = 0.25
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path) as writer:
        writer.write(level(2.0), tile=(1024, 1024), subfiletype=0, compression="jpeg", **common)
        writer.write(level(1.0), tile=(tile_px, tile_px), subfiletype=1, compression=compression, **common)
        writer.write(level(1 / 8), tile=(256, 256), subfiletype=1, compression="jpeg", **common)


def ready(pipeline: Pipeline, service: str) -> bool:
    """/readyz of the service's current process; False while it is not listening yet."""
    try:
        url = f"http://127.0.0.1:{pipeline.metrics_port(service)}/readyz"
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (OSError, AssertionError):  # refused (starting or stopped), or no port logged yet
        return False


def log_events(pipeline: Pipeline, service: str) -> list[dict]:
    events = []
    for line in (pipeline.home / "logs" / f"{service}.log").read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def restart(pipeline: Pipeline, service: str) -> int:
    """Restart ``service`` with ``pipeline.env``; returns its new pid once its new process is ready."""
    starts = sum(e.get("event") == "service starting" for e in log_events(pipeline, service))
    pipeline.stop((service,))
    pid = pipeline.start((service,))[service]
    pipeline.wait_for(
        lambda: (
            sum(e.get("event") == "service starting" for e in log_events(pipeline, service)) > starts
            and ready(pipeline, service)
        ),
        60,
        f"{service} to be ready after its restart",
    )
    return pid


def children_of(pid: int) -> dict[int, str]:
    """``pid``'s child processes and their states (R, S, Z for a zombie, ...)."""
    states = {}
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                states[int(child)] = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:  # exited meanwhile
                continue
    return states


def test_memory_bombs_are_dead_lettered_without_harm_and_complete_after_the_fix(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    clock = [time.monotonic()]
    bombs: dict[str, str] = {}  # upload key -> slide id
    for seed, (name, (compression, tile_px, _)) in enumerate(BOMBS.items(), start=70):
        write_tile_bomb(tmp_path / name, compression=compression, tile_px=tile_px, seed=seed)
        bombs[f"poison-{run}/{name}"] = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:32]
    goods = {
        f"poison-{run}/good-{i}.svs": good_slide(tmp_path, f"good-{i}.svs", seed=960 + i) for i in range(2)
    }
    clock.append(time.monotonic())

    low = dataclasses.replace(pipeline, env={**pipeline.env, "WSI_ISOLATION_MEMORY_BYTES": str(LOW_LIMIT)})
    tiler_limit_lowered = True
    try:
        restart(low, "tiler")
        pids_before = pipeline.pids()
        for key in bombs:
            pipeline.upload(tmp_path / key.rsplit("/", 1)[1], key)
        for key, path in goods.items():
            pipeline.upload(path, key)
        everything = [*bombs, *goods]
        pipeline.wait_for(lambda: all_terminal(pipeline, everything), 180, "every upload to reach an outcome")
        pipeline.wait_for(
            lambda: (
                pipeline.query(
                    "SELECT count(*) FROM dead_letters WHERE slide_id = ANY(%s)", (list(bombs.values()),)
                )[0][0]
                == len(bombs)
            ),
            60,
            "the bombs' dead letters to be recorded",
        )
        clock.append(time.monotonic())

        # The slides uploaded with the bombs were not held back: one prediction each.
        statuses = pipeline.statuses(everything)
        assert {statuses[key] for key in goods} == {"predicted"}, statuses
        for key in goods:
            ((count,),) = pipeline.query(
                "SELECT count(*) FROM predictions p JOIN slide_sources src USING (slide_id) "
                "WHERE src.upload_key = %s",
                (key,),
            )
            assert count == 1, (key, count)

        # Each bomb failed in the tiler with a readable reason naming the limit, and was dead-lettered.
        for key, slide_id in bombs.items():
            code = BOMBS[key.rsplit("/", 1)[1]][2]
            ((status, reason_code, reason, stage),) = pipeline.query(
                "SELECT status, reason_code, status_reason, stage FROM slides WHERE slide_id = %s",
                (slide_id,),
            )
            assert (status, reason_code, stage) == ("failed", "dead-lettered", "tiler"), (key, reason)
            assert "1024 MiB (WSI_ISOLATION_MEMORY_BYTES)" in reason and "wsi redrive" in reason, reason
            ((service, attempts, error_type, error),) = pipeline.query(
                "SELECT service, attempts, error_type, error FROM dead_letters WHERE slide_id = %s",
                (slide_id,),
            )
            assert (service, attempts, error_type) == ("tiler", 3, code), (key, error)
            assert error.startswith(f"PermanentError: tiling {slide_id}: ") and "1024 MiB" in error, error

        # No service crashed or restarted; the tiler is ready; it tried each bomb exactly 3 times (no
        # retry loop), and no decoder process was left behind (alive or as a zombie).
        assert pipeline.pids() == pids_before
        assert ready(pipeline, "tiler")
        for slide_id in bombs.values():
            outcomes = [e["event"] for e in log_events(pipeline, "tiler") if e.get("slide_id") == slide_id]
            assert outcomes.count("handler failed") == 3 and outcomes.count("dead-lettered") == 1, outcomes
        tiler_pid = pids_before["tiler"]
        assert tiler_pid is not None
        children = children_of(tiler_pid)  # at most the live decoder and multiprocessing's resource tracker
        assert len(children) <= 2 and "Z" not in children.values(), children

        # The fix: the tiler back on the pipeline's 3 GiB limit. Redrive replays each bomb once.
        restart(pipeline, "tiler")
        tiler_limit_lowered = False
        pids_fixed = pipeline.pids()
        for slide_id in bombs.values():
            assert asyncio.run(redrive(pipeline.settings(), slide=slide_id)) == 1
        pipeline.wait_for(
            lambda: set(pipeline.statuses(list(bombs)).values()) == {"predicted"},
            120,
            "the redriven bombs to be predicted",
        )
        clock.append(time.monotonic())
        for slide_id in bombs.values():
            ((predictions,),) = pipeline.query(
                "SELECT count(*) FROM predictions WHERE slide_id = %s", (slide_id,)
            )
            ((tiles,),) = pipeline.query("SELECT total_tiles FROM slides WHERE slide_id = %s", (slide_id,))
            assert (predictions, tiles) == (1, 9)
        assert pipeline.pids() == pids_fixed
        print(
            f"\ngenerate {clock[1] - clock[0]:.1f} s, bombs dead-lettered and good slides predicted "
            f"{clock[2] - clock[1]:.1f} s, fix + redrive to predictions {clock[3] - clock[2]:.1f} s"
        )
    finally:
        if tiler_limit_lowered:  # leave the session's tiler as the other tests expect it
            pipeline.stop(("tiler",))
            pipeline.start(("tiler",))
