"""Replica scaling: each stage's throughput against its number of members, on a stream of slides.

Run (not a timed test; numbers depend on the machine and on what else runs on it)::

    python -m tests.benchmarks.bench_scaling --workdir bench-results/scaling                  # 1 and 2 members
    python -m tests.benchmarks.bench_scaling --workdir bench-results/scaling --counts 1,2,4,8 --slides 16

For each member count N of ``--counts``, a fresh local stack and the six services run with N members of
each stage in ``--stages`` (``wsi services up --replicas tiler=N,quality-filter=N,embedder=N``: members of
one consumer group sharing the partitions, each with its own metrics port), and the same ``--slides``
generated slides are uploaded at once (``bench_pipeline.run_pipeline``). Per N it reports:

* ``wall_s`` (upload to the last prediction) and ``slides_per_hour``;
* per stage, ``tiles_per_s``: the stage's tiles over its active span (from its first to its last shard
  recorded by the recorder), and ``efficiency``: that rate over N times the rate with the smallest count
  (1.0 is perfect scaling; on a machine with fewer cores than busy members it falls towards 1/N);
* ``members_that_worked`` per stage (handle time above zero on each member's own ``/metrics``) and
  ``every_slide_one_prediction``: the work was shared, nothing lost and nothing doubled.

On the 2-core development machine the stages already compete for both cores with one member each, so
more members share the work without speeding it up (``docs/throughput.md``, replicas); the sweep up to 8
members is meant for a machine with the cores for it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

SCALED_STAGES = ("tiler", "quality-filter", "embedder")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_scaling", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/scaling"))
    parser.add_argument("--size", default="15000x15000", help="slide width x height in pixels (20x)")
    parser.add_argument("--slides", type=int, default=4, help="slides uploaded together for each count")
    parser.add_argument("--counts", default="1,2", help="member counts to run, e.g. 1,2,4,8")
    parser.add_argument("--stages", default=",".join(SCALED_STAGES), help="stages given N members")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for predictions")
    parser.add_argument("--models", type=Path, default=None, help="a model directory (default: build one)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not args.counts or min(args.counts) < 1:
        parser.error("--counts needs member counts of at least 1")
    unknown = set(args.stages) - set(SCALED_STAGES)
    if unknown:
        parser.error(f"--stages: {sorted(unknown)} are not among {list(SCALED_STAGES)}")
    return args


def summarise(runs: dict[int, dict[str, Any]], stages: list[str], slides: int) -> dict[str, Any]:
    """Per member count: wall time, slides per hour, and per stage its rate, scaling efficiency against
    the smallest count and how many members did work; ``runs`` maps N to ``run_pipeline``'s result."""
    base_count = min(runs)
    out: dict[str, Any] = {}
    base_rate: dict[str, float] = {}
    for count in sorted(runs):
        run = runs[count]
        per_stage: dict[str, Any] = {}
        for stage in stages:
            first = run["stage_first_shard_s"].get(stage)
            last = run["stage_last_shard_s"].get(stage)
            tiles = run["stage_tiles"].get(stage, 0)
            span = (last - first) if first is not None and last is not None else 0.0
            rate = tiles / span if span > 0 else 0.0
            if count == base_count:
                base_rate[stage] = rate
            members = [
                busy
                for instance, busy in run["member_busy_s"].items()
                if re.sub(r"-\d+$", "", instance) == stage
            ]
            base = base_rate.get(stage, 0.0)
            per_stage[stage] = {
                "tiles": tiles,
                "active_s": round(span, 2),
                "tiles_per_s": round(rate, 1),
                "efficiency": round(rate / (count / base_count * base), 3) if base > 0 else None,
                "members": len(members),
                "members_that_worked": sum(1 for busy in members if busy > 0),
            }
        counts = run["predictions_per_slide"].values()
        out[str(count)] = {
            "wall_s": run["wall_s"],
            "slides_per_hour": round(slides / run["wall_s"] * 3600, 1) if run["wall_s"] > 0 else None,
            "stages": per_stage,
            "every_slide_one_prediction": len(counts) == slides and all(c == 1 for c in counts),
            "cpu_s_total": run.get("cpu_s_total"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from tests.benchmarks.bench_pipeline import _say, emit_report, prepare_inputs, run_pipeline

    args = _parse(argv)
    workdir, slides, models = prepare_inputs(args)
    runs: dict[int, dict[str, Any]] = {}
    for count in args.counts:
        _say(f"{count} member(s) of {', '.join(args.stages)} ...")
        runs[count] = run_pipeline(slides, models, workdir, dict.fromkeys(args.stages, count), args.timeout)
    report = {
        "slides": len(slides),
        "size": args.size,
        "stages": args.stages,
        "counts": summarise(runs, args.stages, len(slides)),
        "runs": {str(count): run for count, run in runs.items()},
    }
    emit_report(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
