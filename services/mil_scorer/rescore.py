"""``wsi rescore``: re-score chosen slides (or all scored ones) with any registered model version, from the
embeddings already stored, with the scorer's own code.

The predictions go out on ``wsi.predictions`` like the scorer's (origin ``rescore``); the recorder keeps
them beside the earlier ones, one row per slide, tiling run and version. It lives with the scorer (the
operator's command runs the service's code in process); ``shared/cli.py`` loads it on demand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from wsitk.services.mil_scorer.scorer import MilScorer


def add_rescore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="model version (default: the active one)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument(
        "--slides", nargs="+", help="slide ids (as `wsi status` lists them), upload keys or file names"
    )
    chosen.add_argument("--all", action="store_true", help="every slide the scorer has scored")
    parser.add_argument("--dry-run", action="store_true", help="score and print, publish nothing")


def rescore(
    ctx: Any, version: str, slide_ids: list[str] | None, *, publish: Any = None
) -> list[dict[str, Any]]:
    """Score slides from their stored embeddings with ``version``; returns one summary per slide.

    ``publish(outputs)`` sends the resulting events (``Prediction``, or nothing for a refused slide).
    A slide the model cannot score (other backbone or profile) is reported, not failed: its earlier
    predictions stay valid.
    """
    from wsitk.shared.contracts import pb
    from wsitk.shared.db import scores

    scorer = MilScorer(ctx)
    version = version or ctx.models.active()
    runs = scores.scored_runs(ctx.db, slide_ids)
    found = {slide_id for slide_id, _run_id, _plan in runs}
    results: list[dict[str, Any]] = [
        {"slide_id": s, "outcome": "not-scored", "reason": "no scored tiling run with stored embeddings"}
        for s in (slide_ids or [])
        if s not in found
    ]
    for slide_id, run_id, plan in runs:
        shards = scores.load_embeddings(ctx.db, slide_id, run_id)
        outputs = scorer.score(plan, [shards[s] for s in plan.shard_ids], version=version, origin="rescore")
        event = outputs[0].message if outputs else None
        if isinstance(event, pb.Prediction):
            results.append(
                {
                    "slide_id": slide_id,
                    "outcome": "predicted",
                    "model_version": event.model_version,
                    "label": event.label,
                    "probability": round(event.probability, 4),
                    "prediction_id": event.prediction_id,
                }
            )
            if publish is not None:
                publish(outputs)
        else:
            reason = getattr(event, "reason", "not scored")
            results.append({"slide_id": slide_id, "outcome": "refused", "reason": reason})
    return results


def cli_rescore(args: argparse.Namespace) -> int:
    from wsitk.shared.bus.kafka import make_producer, produce_all
    from wsitk.shared.config import load_settings
    from wsitk.shared.context import ServiceContext
    from wsitk.shared.ops import resolve_slide_ids

    settings = load_settings()
    slide_ids = None if args.all else resolve_slide_ids(settings, list(args.slides))
    ctx = ServiceContext(settings, "rescore")

    async def run() -> list[dict[str, Any]]:
        producer = make_producer(settings)
        await producer.start()
        loop = asyncio.get_running_loop()
        try:

            def publish(outputs: list[Any]) -> None:
                asyncio.run_coroutine_threadsafe(produce_all(producer, outputs), loop).result(timeout=60)

            return await asyncio.to_thread(
                rescore,
                ctx,
                args.model,
                slide_ids,
                publish=None if args.dry_run else publish,
            )
        finally:
            await producer.stop()

    results = asyncio.run(run())  # an unknown version (RegistryError) and the like: wsi's one-line error
    for result in results:
        print(json.dumps(result))
    predicted = sum(r["outcome"] == "predicted" for r in results)
    print(
        f"{'would publish' if args.dry_run else 'published'} {predicted} prediction(s); "
        f"{len(results) - predicted} slide(s) not scored",
        file=sys.stderr,
    )
    return 0 if predicted == len(results) else 1
