"""``wsi demo``: the whole product on one machine, slides in, predictions out.

Starts the local stack and the six services as separate processes, makes a few synthetic slides
(some with tumour), uploads them through the S3 API, waits with visible progress until every slide
has an outcome, and prints the predictions as the recorder stored them in PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from wsitk.shared.config import Settings, load_settings, wsi_home

TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


def _say(text: str) -> None:
    print(text, flush=True)


def wait_for_outcomes(settings: Settings, keys: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Poll the recorder's view until every upload has an outcome; print progress when it changes."""
    from wsitk.shared.ops import slide_table

    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    last = ""
    while time.monotonic() < deadline:
        try:
            rows = [
                r
                for r in slide_table(settings, limit=500)
                if any(k in (r["upload_keys"] or "") for k in keys)
            ]
        except Exception as exc:  # noqa: BLE001 - the database may still be starting; said, then retried
            rows = []
            _say(f"      (waiting for the recorder: {exc})")
        counts = Counter(r["status"] for r in rows)
        done = sum(counts[s] for s in TERMINAL)
        line = f"      {done}/{len(keys)} done  " + "  ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        if line != last:
            _say(f"{time.strftime('%H:%M:%S')}{line}")
            last = line
        if len(rows) == len(keys) and done == len(keys):
            return rows
        time.sleep(3)
    _say(f"timed out after {timeout_s:.0f} s; see the service logs in {wsi_home() / 'logs'}")
    return rows


def cli_demo(args: argparse.Namespace) -> int:
    from wsitk.shared.models.defaults import init_default_models
    from wsitk.shared.ops import format_table, services_up, submit_files, viewer_url
    from wsitk.shared.slides.synth import SynthSpec, generate_slide
    from wsitk.shared.stack.local import start_stack

    home = wsi_home()
    width, height = (int(v) for v in args.size.lower().split("x"))
    _say(f"[1/5] models: default backbone + MIL model in {home / 'models'}")
    init_default_models(home / "models", seed=0)

    _say(f"[2/5] local stack (broker, PostgreSQL, S3) in {home}")
    info = start_stack(home)
    for key, value in info.env().items():
        os.environ[key] = value
    _say(
        f"      kafka {info.kafka_bootstrap}  s3 {info.s3_endpoint}  postgres {info.database_url().split('@')[-1]}"
    )

    _say("[3/5] six services and the viewer as separate processes")
    for name, pid in services_up().items():
        _say(f"      {name:15s} pid {pid}  log {home / 'logs' / (name + '.log')}")

    slides_dir = home / "demo-slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    run_tag = time.strftime("%Y%m%d-%H%M%S")
    _say(f"[4/5] {args.slides} synthetic slides ({width}x{height} px, half with tumour) -> uploads bucket")
    paths: list[Path] = []
    for index in range(args.slides):
        tumour = index % 2 == 1
        fmt = "svs" if index % 3 != 2 else "tiff"
        path = slides_dir / f"demo-{run_tag}-{index:02d}-{'tumour' if tumour else 'normal'}.{fmt}"
        spec = SynthSpec(
            width=width,
            height=height,
            mpp=0.5,
            fmt=fmt,
            tumour_fraction=0.3 if tumour else 0.0,
            seed=int(time.time()) % 100000 + index,
        )
        generate_slide(path, spec)
        paths.append(path)
        _say(f"      made {path.name}")
    settings = load_settings()
    keys = submit_files(settings, paths, prefix=f"demo-{run_tag}")
    for key in keys:
        _say(f"      uploaded s3://{settings.uploads_bucket}/{key}")

    _say("[5/5] waiting for every slide to reach an outcome")
    rows = wait_for_outcomes(settings, keys, args.timeout)
    _say("")
    _say(format_table(rows))
    _say("")
    _say(
        "Predictions come from a gated-attention MIL model trained at set-up on synthetic slides: a synthetic"
    )
    _say("baseline, not a diagnostic model. Labels in the file names are the generator's ground truth.")
    _say("")
    _say("Follow the public events:   .venv/bin/wsi events tail --follow")
    _say("Slide status any time:      .venv/bin/wsi status")
    _say("Submit your own slides:     .venv/bin/wsi submit path/to/slide.svs")
    _say("Stop everything:            make stop")
    url = viewer_url()
    _say("")
    if url:
        _say(f"Look at the slides, heatmaps and QC in a browser: {url}")
    else:
        _say(f"The viewer did not start; see {home / 'logs' / 'viewer.log'}")
    complete = len(rows) == len(keys) and all(r["status"] in TERMINAL for r in rows)
    return 0 if complete else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_demo(argparse.Namespace(slides=6, size="6000x5000", timeout=900.0)))
