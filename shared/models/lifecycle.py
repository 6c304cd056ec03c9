"""``wsi model register|promote|list|retire``: trained models into the running pipeline.

``register`` takes a training run (``wsi train``, ideally after ``wsi evaluate``) and an architecture, and
registers that architecture's fold ensemble: the ONNX file and a model card go to the artifacts bucket, a
row with the training summary and the held-out test metrics goes to ``model_versions``. ``promote`` makes
a version active: ingest pins it on new slides and the mil-scorer loads it, without a restart.

``wsi rescore`` (``services/mil_scorer/rescore.py``, with the scorer whose code it runs) re-scores slides
with any registered version from the embeddings already stored.
"""

from __future__ import annotations

import argparse
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
        if run.get("task", "binary") != "binary":
            raise RegistryError(
                f"run {args.run} is a {run['task']} run: the mil-scorer serves tumour/normal models only, so "
                "subtype and risk models are evaluated (`wsi evaluate`) but not registered"
            )
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
