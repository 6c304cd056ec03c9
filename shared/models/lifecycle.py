"""``wsi model register|promote|list|retire`` and ``wsi rescore``: trained models into the running pipeline.

``register`` takes a training run (``wsi train``, ideally after ``wsi evaluate``) and an architecture, and
registers that architecture's fold ensemble: the ONNX file and a model card go to the artifacts bucket, a
row with the training summary and the held-out test metrics goes to ``model_versions``. ``promote`` makes
a version active: ingest pins it on new slides and the mil-scorer loads it, without a restart.

``rescore`` re-scores chosen slides (or all scored ones) with any registered version from the embeddings
already stored, and publishes the predictions on ``wsi.predictions`` like the scorer does (origin
``rescore``); the recorder keeps them beside the earlier ones, one row per slide, tiling run and version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="training run directory (from `wsi train`)")
    parser.add_argument("--arch", default="gated-attention", help="which architecture's ensemble")
    parser.add_argument("--promote", action="store_true", help="make it the active version right away")
    parser.add_argument("--actor", default=None, help="who registers it (default user@host)")
    parser.add_argument("--force", action="store_true", help="with --promote: even if the backbone differs")


def cli_register(args: argparse.Namespace) -> int:
    from wsitk.shared.models.registry import RegistryError, promote, register_model
    from wsitk.shared.models.training import RunPaths, read_run

    settings, db, store = _services()
    try:
        run = read_run(args.run)
        model = run["models"].get(args.arch)
        if not model:
            raise RegistryError(f"run {args.run} has no {args.arch} model; it has {sorted(run['models'])}")
        evaluation_path = RunPaths(args.run).evaluation / "metrics.json"
        metrics: dict[str, Any] = {}
        if evaluation_path.is_file():
            evaluation = json.loads(evaluation_path.read_text())
            metrics = {
                "test": evaluation["models"].get(f"{args.arch} ensemble", {}),
                "baseline_test": evaluation["models"].get("baseline: mean-pool + LR", {}),
            }
        else:
            print(
                "note: the run has not been evaluated (`wsi evaluate RUN`); registering without test metrics"
            )
        training = {
            "labels_file": run["labels_file"],
            "labels_sha256": run["labels_sha256"],
            "cohort": run["cohort"],
            "split_summary": run["split_summary"],
            "config": run["config"],
            "folds": model["folds"],
            "oof_auc": model["oof_auc"],
            "command": run.get("command", ""),
        }
        row = register_model(
            db,
            store,
            settings.artifacts_bucket,
            Path(args.run) / model["onnx"],
            profile=run["profile"],
            training=training,
            metrics=metrics,
            actor=args.actor,
        )
        print(f"registered {row.model_version} (s3://{row.artifact_bucket}/{row.artifact_key})")
        if args.promote:
            row = promote(
                db,
                row.model_version,
                actor=args.actor,
                serving_backbone_id=_serving_backbone(settings),
                force=args.force,
            )
            print(f"promoted {row.model_version}: new slides are scored with it")
    except (RegistryError, KeyError) as error:
        print(f"wsi model register: {error}", file=sys.stderr)
        return 2
    return 0


def _services() -> tuple[Any, Any, Any]:
    from wsitk.shared.config import load_settings
    from wsitk.shared.db.connection import Database
    from wsitk.shared.objectstore import open_store

    settings = load_settings()
    return settings, Database(settings.dsn()), open_store(settings)


def _serving_backbone(settings: Any) -> str | None:
    from wsitk.shared.models.defaults import load_manifest

    backbone = (load_manifest(Path(settings.model_dir)) or {}).get("backbone", {}).get("backbone_id")
    return str(backbone) if backbone else None


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="a registered model version")
    parser.add_argument("--actor", default=None)
    parser.add_argument("--force", action="store_true", help="even if it expects another backbone")


def cli_promote(args: argparse.Namespace) -> int:
    from wsitk.shared.models.registry import RegistryError, promote

    settings, db, _ = _services()
    try:
        row = promote(
            db,
            args.version,
            actor=args.actor,
            serving_backbone_id=_serving_backbone(settings),
            force=args.force,
        )
    except RegistryError as error:
        print(f"wsi model promote: {error}", file=sys.stderr)
        return 2
    print(
        f"{row.model_version} is active (promoted by {row.promoted_by}); ingest pins it on new slides "
        f"within {settings.model_refresh_s:g} s"
    )
    return 0


def cli_deactivate(args: argparse.Namespace) -> int:
    from wsitk.shared.models.registry import deactivate

    _, db, _ = _services()
    demoted = deactivate(db, actor=args.actor)
    print(
        f"{demoted} is no longer active; new slides get the shipped default model"
        if demoted
        else "no version was active; new slides get the shipped default model"
    )
    return 0


def cli_retire(args: argparse.Namespace) -> int:
    from wsitk.shared.models.registry import RegistryError, retire

    _, db, _ = _services()
    try:
        retire(db, args.version, actor=args.actor)
    except RegistryError as error:
        print(f"wsi model retire: {error}", file=sys.stderr)
        return 2
    print(f"{args.version} retired")
    return 0


def cli_list(args: argparse.Namespace) -> int:
    from wsitk.shared.models.registry import list_versions

    _, db, _ = _services()
    versions = list_versions(db)
    if args.json:
        print(json.dumps([v.__dict__ for v in versions], indent=2, default=str))
        return 0
    if not versions:
        print("no registered model versions (the shipped default model scores slides)")
        return 0
    print(f"{'model version':48s} {'status':10s} {'arch':16s} {'test AUC (95% CI)':24s} {'created by':20s}")
    for v in versions:
        auc = ((v.metrics.get("test") or {}).get("metrics") or {}).get("auc") or {}
        auc_text = "-"
        if auc.get("point") is not None:
            low, high = auc.get("lower"), auc.get("upper")
            auc_text = f"{auc['point']:.3f}" + (
                f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
            )
        print(
            f"{v.model_version:48s} {v.status:10s} {_arch_name(v.architecture):16s} {auc_text:24s} "
            f"{v.created_by:20s}"
        )
    return 0


def _arch_name(architecture: dict[str, Any]) -> str:
    """ "gated-attention-mil" or, for a fold ensemble, "5 x gated-attention-mil"."""
    members = architecture.get("members") or []
    if architecture.get("name") == "ensemble" and members:
        return f"{len(members)} x {members[0].get('name', '?')}"
    return str(architecture.get("name", ""))


# -- rescore ---------------------------------------------------------------------------------------------
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
    from wsitk.services.mil_scorer.scorer import MilScorer
    from wsitk.shared.contracts import pb

    scorer = MilScorer(ctx)
    version = version or ctx.models.active()
    where = "scored_at IS NOT NULL" + (" AND slide_id = ANY(%s)" if slide_ids is not None else "")
    rows = ctx.db.execute(
        "SELECT DISTINCT ON (slide_id) slide_id, tiling_run_id, plan FROM scorer_plans "
        f"WHERE {where} ORDER BY slide_id, scored_at DESC",
        (slide_ids,) if slide_ids is not None else None,
    )
    found = {r[0] for r in rows}
    results: list[dict[str, Any]] = [
        {"slide_id": s, "outcome": "not-scored", "reason": "no scored tiling run with stored embeddings"}
        for s in (slide_ids or [])
        if s not in found
    ]
    for slide_id, run_id, plan_bytes in rows:
        plan = pb.TilePlan.FromString(bytes(plan_bytes))
        shard_rows = ctx.db.execute(
            "SELECT shard_id, embedding FROM scorer_shards WHERE slide_id = %s AND tiling_run_id = %s",
            (slide_id, run_id),
        )
        shards = {sid: pb.ShardEmbedding.FromString(bytes(data)) for sid, data in shard_rows}
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
