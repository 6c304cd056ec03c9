"""Crash-safety harness: a batch of slides through the local stack while services are SIGKILLed.

Short form (in the test command): ``tests/test_chaos.py``. Long form (documented in
docs/reliability.md)::

    .venv/bin/python -m tests.chaos --slides 12 --kills 12

Starts its own stack and the six services, uploads the slides, and while they are processed kills a
random service with SIGKILL every few seconds (each service type at least once when there are enough
kills, the embedder and the mil-scorer preferably while they are busy) and restarts it. Then it waits
for every slide's outcome and prints a table: slides in, predictions recorded, duplicates, losses,
redeliveries absorbed, and the peak memory of each service (its process tree, sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICES = ("ingest", "tiler", "quality-filter", "embedder", "mil-scorer", "recorder")
TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the isolated decoders count too)."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(c) for c in handle.read().split())
        except (OSError, ValueError):
            continue
    return total


@dataclass
class ChaosReport:
    slides_in: int
    predictions_recorded: int
    duplicates: int
    losses: int
    redeliveries_absorbed: int
    kills: Counter[str]
    peak_rss: dict[str, int]
    outcomes: Counter[str]
    seconds: float
    lost_keys: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("slides in", str(self.slides_in)),
            ("predictions recorded", str(self.predictions_recorded)),
            ("duplicates (extra rows or prediction ids)", str(self.duplicates)),
            ("losses (no outcome, or not predicted)", str(self.losses)),
            ("redeliveries absorbed", str(self.redeliveries_absorbed)),
            ("kills", ", ".join(f"{k} x{v}" for k, v in sorted(self.kills.items())) or "none"),
            ("outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        rows += [
            (f"max memory {name}", f"{rss / 2**20:.0f} MiB") for name, rss in sorted(self.peak_rss.items())
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


class MemorySampler(threading.Thread):
    def __init__(self, pipeline: Any) -> None:
        super().__init__(daemon=True)
        self.pipeline = pipeline
        self.peak: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pipeline.pids().items():
                if pid:
                    self.peak[name] = max(self.peak[name], tree_rss_bytes(pid))
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()


def _busy(pipeline: Any, keys: list[str], service: str) -> bool:
    """Rough signal that ``service`` has work now (for killing it mid-batch)."""
    stage_before = {"embedder": "quality-filter", "mil-scorer": "embedder", "tiler": "ingest"}.get(service)
    if stage_before is None:
        return True
    rows = pipeline.query(
        "SELECT count(*) FROM slides s JOIN slide_sources src USING (slide_id) "
        "WHERE src.upload_key = ANY(%s) AND s.status NOT IN ('predicted','rejected','failed','no_tissue') "
        "AND (s.stage = %s OR s.status = 'tiled')",
        (keys, stage_before),
    )
    return bool(rows[0][0])


def run_chaos(
    pipeline: Any, slides: list[Path], kills: int, *, seed: int = 0, timeout_s: float = 900
) -> ChaosReport:
    rng = random.Random(seed)
    started = time.monotonic()
    keys = []
    prefix = f"chaos-{int(time.time())}"
    for path in slides:
        key = f"{prefix}/{path.name}"
        pipeline.upload(path, key)
        keys.append(key)
    sampler = MemorySampler(pipeline)
    sampler.start()
    done_kills: Counter[str] = Counter()
    order = [*SERVICES] * (kills // len(SERVICES) + 1)
    rng.shuffle(order)
    order = order[:kills]
    deadline = time.monotonic() + timeout_s
    try:
        for victim in order:
            if _all_terminal(pipeline, keys):
                break
            waited = time.monotonic() + 20
            while not _busy(pipeline, keys, victim) and time.monotonic() < waited:
                time.sleep(0.5)
            time.sleep(rng.uniform(0.5, 3.0))
            pid = pipeline.pids().get(victim)
            if pid:
                os.kill(pid, signal.SIGKILL)
                done_kills[victim] += 1
                time.sleep(0.5)
                pipeline.start((victim,))
        while not _all_terminal(pipeline, keys) and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        sampler.stop()
    return _report(pipeline, keys, done_kills, dict(sampler.peak), time.monotonic() - started)


def _all_terminal(pipeline: Any, keys: list[str]) -> bool:
    statuses = pipeline.statuses(keys)
    return len(statuses) == len(keys) and set(statuses.values()) <= TERMINAL


def _report(
    pipeline: Any, keys: list[str], kills: Counter[str], peak: dict[str, int], seconds: float
) -> ChaosReport:
    from wsitk.shared.ops import read_public_events
    from wsitk.shared.topics import PREDICTIONS

    statuses = pipeline.statuses(keys)
    slide_ids = dict(
        pipeline.query("SELECT upload_key, slide_id FROM slide_sources WHERE upload_key = ANY(%s)", (keys,))
    )
    rows = dict(
        pipeline.query(
            "SELECT slide_id, count(*) FROM predictions WHERE slide_id = ANY(%s) GROUP BY slide_id",
            (list(slide_ids.values()),),
        )
    )

    async def prediction_ids() -> dict[str, set[str]]:
        ids: dict[str, set[str]] = defaultdict(set)
        async for _, _, body in read_public_events(pipeline.settings(), [PREDICTIONS], idle_timeout_s=3.0):
            if "meta" in body:  # other tests may leave undecodable records on the topic
                ids[body["meta"]["slide_id"]].add(body["prediction_id"])
        return ids

    topic_ids = asyncio.run(prediction_ids())
    duplicates = sum(max(n - 1, 0) for n in rows.values()) + sum(
        max(len(topic_ids.get(sid, set())) - 1, 0) for sid in slide_ids.values()
    )
    lost = [k for k in keys if statuses.get(k) != "predicted" or rows.get(slide_ids.get(k, ""), 0) == 0]
    absorbed = pipeline.query(
        "SELECT coalesce(sum(deliveries - 1), 0) FROM audit_log WHERE slide_id = ANY(%s)",
        (list(slide_ids.values()),),
    )[0][0]
    return ChaosReport(
        slides_in=len(keys),
        predictions_recorded=sum(rows.values()),
        duplicates=duplicates,
        losses=len(lost),
        redeliveries_absorbed=int(absorbed),
        kills=kills,
        peak_rss=peak,
        outcomes=Counter(statuses.values()),
        seconds=seconds,
        lost_keys=lost,
    )


def make_chaos_slides(
    folder: Path, count: int, seed: int, size: tuple[int, int] = (2400, 2000)
) -> list[Path]:
    from wsitk.shared.slides.synth import SynthSpec, generate_slide

    paths = []
    for index in range(count):
        path = folder / f"chaos-{seed}-{index:03d}.{'svs' if index % 2 else 'tiff'}"
        spec = SynthSpec(
            width=size[0],
            height=size[1],
            mpp=0.5,
            fmt="svs" if index % 2 else "tiff",
            seed=seed * 1000 + index,
            tumour_fraction=0.3 if index % 2 else 0.0,
        )
        generate_slide(path, spec)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="2400x2000")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    from wsitk.shared.models.defaults import init_default_models
    from wsitk.shared.stack import LocalStack

    from tests.conftest import Pipeline, pipeline_env

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="wsi-chaos-") as tmp:
        root = Path(tmp)
        print(f"building models and {args.slides} slides in {root}", flush=True)
        init_default_models(root / "models", progress=lambda _m: None)
        (root / "slides").mkdir()
        slides = make_chaos_slides(root / "slides", args.slides, args.seed, (width, height))
        with LocalStack() as stack:
            pipeline = Pipeline(
                stack=stack, home=root / "home", env=pipeline_env(stack, root / "models", root / "home")
            )
            pipeline.start()
            try:
                report = run_chaos(pipeline, slides, args.kills, seed=args.seed, timeout_s=args.timeout)
            finally:
                pipeline.stop()
    print(report.table())
    return 0 if report.losses == 0 and report.duplicates == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
