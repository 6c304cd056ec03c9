"""``wsi evaluate RUN``: every model of a training run on the held-out test patients, once.

For each architecture of the run: the fold ensemble (the model that would be registered, scored through
its exported ONNX file exactly as the mil-scorer runs it) and each fold model on its own; beside them the
mean-pooling + logistic-regression baseline ensemble. Every threshold comes from the training run
(validation folds or out-of-fold predictions); the test labels are used for the metrics only. Metrics
carry 95 % confidence intervals from a bootstrap that resamples patients.

Writes into ``RUN/evaluation/``: ``report.md`` (methods + results tables), ``metrics.json``,
``test_predictions.csv``, ``roc.png`` and ``calibration.png``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from wsitk.shared.models.by_site import add_site_breakdown
from wsitk.shared.models.labels import LabelsError
from wsitk.shared.models.tile_rule import DEFAULT_MAX_TILES, dropped_tiles, tiles_to_score
from wsitk.shared.models.tile_rule import RULE as TILE_RULE
from wsitk.shared.models.training import (
    ENSEMBLE_THRESHOLD_RULE,
    RunPaths,
    load_fold_models,
    read_run,
    run_rows,
)

if TYPE_CHECKING:
    from wsitk.shared.models.bags import Bag

BASELINE = "baseline: mean-pool + LR"

LIMITATIONS = (
    "The cohort is synthetic (`wsi synth`): tumour and normal tissue differ in rendered texture and "
    "nuclear morphology, and the default tile encoder is a small CNN with seeded random weights, not a "
    "pathology-pretrained encoder. The numbers show that the pipeline, the splits and the models work "
    "end to end; they say nothing about diagnostic accuracy on real slides. The test set is small, which "
    "the width of the intervals shows; the intervals resample patients but not the training process "
    "(seeds, folds)."
)


def _other_tasks(evaluate: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Runs of a subtyping or survival task (``tasks.py``) go to ``task_evaluate.evaluate_task_run``."""

    @functools.wraps(evaluate)
    def dispatch(root: Path, **options: Any) -> dict[str, Any]:
        run = read_run(Path(root))
        if run.get("task", "binary") != "binary" and "finished_at" in run:
            from wsitk.shared.models.task_evaluate import evaluate_task_run

            return evaluate_task_run(Path(root), run, **options)
        return evaluate(root, **options)

    return dispatch


@_other_tasks
def evaluate_run(
    root: Path,
    *,
    bag_loader: Callable[[Sequence[str]], Mapping[str, Bag]],
    n_bootstrap: int = 2000,
    seed: int = 0,
    progress: Callable[[str], object] = print,
    command: str = "",
    max_tiles_per_slide: int = DEFAULT_MAX_TILES,
) -> dict[str, Any]:
    from wsitk.shared.models.evaluation import (
        CohortSummary,
        Protocol,
        ReportInput,
        SplitSummary,
        aggregate_by_patient,
        evaluate,
        plot_calibration,
        plot_roc,
        render_report,
    )

    paths = RunPaths(Path(root))
    run = read_run(paths.root)
    if "finished_at" not in run:
        raise LabelsError(
            f"the training run in {paths.root} did not finish; run `wsi train` again to resume it"
        )
    rows, plan = run_rows(run)
    test_rows = plan.test_rows(rows)
    if not test_rows:
        raise LabelsError("the run has no held-out test patients (test fraction 0); nothing to evaluate")
    progress(
        f"[evaluate] held-out test set: {len({r.patient for r in test_rows})} patients, {len(test_rows)} slides"
    )
    bags = bag_loader([r.slide_id for r in test_rows])
    expected = run["profile"]
    odd = [
        r.slide
        for r in test_rows
        if any(
            bags[r.slide_id].profile.get(k) != expected[k]
            for k in ("target_mpp", "tile_size", "stain_method")
        )
    ]
    if odd:
        raise LabelsError(
            f"test slides {odd[:5]} were tiled with another profile than the training slides ({expected}); "
            "re-process them under the training profile"
        )
    # the mil-scorer's rule: every model here sees exactly the tiles production would score
    kept = [tiles_to_score(bags[r.slide_id].coords, max_tiles_per_slide) for r in test_rows]
    features = [bags[r.slide_id].float32()[keep] for r, keep in zip(test_rows, kept, strict=True)]
    tile_counts = [len(bags[r.slide_id].features) for r in test_rows]
    dropped = dropped_tiles(tile_counts, max_tiles_per_slide)
    progress(f"[evaluate] scoring rule: {dropped.describe()}")
    labels = np.array([r.label for r in test_rows])
    patients = [r.patient for r in test_rows]
    config = run["config"]
    folds = int(config["folds"])

    predictions, thresholds, export_checks, fold_table = _score_models(paths, run, features)

    evaluations = []
    for name, probs in predictions.items():
        evaluations.append(
            evaluate(labels, probs, patients, thresholds[name], n_bootstrap=n_bootstrap, seed=seed, name=name)
        )
    headline = {n: (labels, predictions[n]) for n in predictions if " fold " not in n}
    patient_evaluations = [
        evaluate(
            *aggregate_by_patient(labels, predictions[name], patients),
            thresholds[name],
            n_bootstrap=n_bootstrap,
            seed=seed,
            name=name,
        )
        for name in headline
    ]
    out = paths.evaluation
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(headline, out / "roc.png", operating_points={n: thresholds[n] for n in headline})
    plot_calibration(headline, out / "calibration.png")
    _write_predictions(out / "test_predictions.csv", test_rows, tile_counts, kept, predictions)
    summary = run["split_summary"]
    dev = [v for k, v in summary.items() if k != "test"]
    cohort = CohortSummary(
        slides=run["cohort"]["slides"],
        patients=run["cohort"]["patients"],
        sites=len(run["cohort"]["sites"]),
        splits=[
            SplitSummary(
                f"development ({folds} folds)",
                sum(v["slides"] for v in dev),
                sum(v["patients"] for v in dev),
                sum(v["tumour_slides"] for v in dev),
            ),
            SplitSummary(
                "held-out test",
                summary["test"]["slides"],
                summary["test"]["patients"],
                summary["test"]["tumour_slides"],
            ),
        ],
    )
    architectures = {a: m["hyper"] for a, m in run["models"].items()}
    protocol = Protocol(
        test_fraction=float(config["test_fraction"]),
        k_folds=folds,
        site_preserving=bool(config["site_preserving"]),
        seeds=[int(config["seed"]) * 1000 + k for k in range(folds)],
        architecture=architectures,
        epochs=int(config["epochs"]),
        early_stopping_patience=int(config["patience"]),
        max_tiles_per_bag=int(config["max_tiles_per_bag"]),
        class_weighting=bool(config["class_weighting"]),
        threshold_rule=(
            "fold models: best balanced accuracy on the selection half of their validation fold; "
            f"ensembles and the baseline: {ENSEMBLE_THRESHOLD_RULE}"
        ),
    )
    checks = "; ".join(f"{a}: {d:.1e}" for a, d in export_checks.items())
    report = render_report(
        ReportInput(
            title=f"MIL evaluation: {paths.root.name}",
            generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            command_line=f"{run.get('command', '')}\n{command}".strip(),
            cohort=cohort,
            protocol=protocol,
            evaluations=evaluations,
            folds=fold_table,
            plots={
                "ROC curves (held-out test set)": "roc.png",
                "Calibration (held-out test set)": "calibration.png",
            },
            patient_evaluations=patient_evaluations,
            scoring=f"Tiles scored per slide: {TILE_RULE} (cap {max_tiles_per_slide:,}, as the mil-scorer); "
            f"{dropped.describe()}.",
            limitations=LIMITATIONS
            + f" Ensembles were scored through their exported ONNX files; largest ONNX-vs-torch probability "
            f"difference on the test bags: {checks}.",
        )
    )
    (out / "report.md").write_text(report)
    metrics = {
        "run": paths.root.name,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "onnx_vs_torch_max_abs_diff": export_checks,
        "scoring_rule": {"rule": TILE_RULE, **dropped.to_dict()},
        "models": {e.name: e.to_dict() for e in evaluations},
        "patient_level": {e.name: e.to_dict() for e in patient_evaluations},
        "by_site": add_site_breakdown(out),  # per-site AUC: by_site.json and a report section
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for evaluation in evaluations:
        if " fold " in evaluation.name:
            continue
        auc = evaluation.metrics["auc"]
        bacc = evaluation.metrics["balanced_accuracy"]
        progress(f"[evaluate] {evaluation.name:32s} AUC {auc.format()}  balanced accuracy {bacc.format()}")
    progress(f"[evaluate] report: {out / 'report.md'}")
    return metrics


def _write_predictions(
    path: Path,
    test_rows: Sequence[Any],
    tile_counts: Sequence[int],
    kept: Sequence[np.ndarray],
    predictions: Mapping[str, np.ndarray],
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["slide", "slide_id", "patient", "site", "label", "tiles", "tiles_scored", *predictions]
        )
        for i, row in enumerate(test_rows):
            writer.writerow(
                [row.slide, row.slide_id, row.patient, row.site, row.label, tile_counts[i], len(kept[i])]
                + [f"{predictions[n][i]:.6f}" for n in predictions]
            )


def _score_models(
    paths: RunPaths, run: Mapping[str, Any], features: Sequence[np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float], list[Any]]:
    """Test-set probabilities of every model of the run, each with the threshold the run chose for it."""
    from wsitk.shared.models.aggregators import MilEnsemble
    from wsitk.shared.models.evaluation import FoldValidation, LogisticBaseline
    from wsitk.shared.models.mil import predict_bags
    from wsitk.shared.models.runtime import MilRunner

    in_dim = int(run["in_dim"])
    folds = int(run["config"]["folds"])
    predictions: dict[str, np.ndarray] = {}
    thresholds: dict[str, float] = {}
    export_checks: dict[str, float] = {}
    fold_table: list[FoldValidation] = []
    for architecture, model in run["models"].items():
        onnx = MilRunner(paths.root / model["onnx"])
        onnx_probs = np.array([onnx.score(f)[0] for f in features])
        members = load_fold_models(paths, architecture, folds, in_dim)
        calibration = [tuple(fold.get("calibration", (1.0, 0.0))) for fold in model["folds"]]
        torch_probs = predict_bags(MilEnsemble(members, calibration=calibration).eval(), features)
        export_checks[architecture] = float(np.max(np.abs(onnx_probs - torch_probs)))
        name = f"{architecture} ensemble"
        predictions[name], thresholds[name] = onnx_probs, float(model["ensemble_threshold"])
        for fold, member in zip(model["folds"], members, strict=True):
            fold_name = f"{architecture} fold {fold['fold'] + 1}"
            predictions[fold_name] = predict_bags(member, features)
            thresholds[fold_name] = float(fold["threshold"])
            fold_table.append(
                FoldValidation(
                    fold=fold["fold"] + 1,
                    model=architecture,
                    n_val_slides=fold["val_slides"],
                    val_auc=float("nan") if fold["val_auc"] is None else fold["val_auc"],
                    threshold=fold["threshold"],
                    best_epoch=fold["best_epoch"],
                )
            )
    baseline = json.loads(paths.baseline_json().read_text())
    calibrated = []
    for fold in baseline["folds"]:
        member = LogisticBaseline.from_dict(fold["model"])
        scale, shift = fold.get("calibration", (1.0, 0.0))
        logits = scale * member.decision_function(features) + shift
        calibrated.append(0.5 * (1.0 + np.tanh(0.5 * logits)))
    # the mean of the calibrated fold models, the kind of score its threshold was chosen on
    predictions[BASELINE] = np.mean(calibrated, axis=0)
    thresholds[BASELINE] = float(baseline["ensemble_threshold"])
    for fold in baseline["folds"]:
        fold_table.append(
            FoldValidation(
                fold=fold["fold"] + 1,
                model="baseline",
                n_val_slides=fold["val_slides"],
                val_auc=float("nan") if fold["val_auc"] is None else fold["val_auc"],
                threshold=fold["threshold"],
                best_epoch=0,
            )
        )
    return predictions, thresholds, export_checks, fold_table


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="training run directory (from `wsi train`)")
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="patient bootstrap resamples (default 2000)"
    )
    parser.add_argument("--seed", type=int, default=0)


def cli_evaluate(args: argparse.Namespace) -> int:
    from wsitk.shared.config import load_settings
    from wsitk.shared.db.connection import Database
    from wsitk.shared.models.bags import load_bags
    from wsitk.shared.objectstore import open_store

    settings = load_settings()
    db = Database(settings.dsn())
    store = open_store(settings)
    paths = RunPaths(args.run)
    try:
        run = read_run(args.run)
        backbone = str(run["profile"]["backbone_id"])

        def loader(slide_ids: Sequence[str]) -> Mapping[str, Bag]:
            return load_bags(db, store, slide_ids, backbone_id=backbone, cache_dir=paths.bags)

        evaluate_run(
            args.run,
            bag_loader=loader,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            max_tiles_per_slide=settings.max_tiles_per_slide,
            command="wsi evaluate " + " ".join(sys.argv[2:]),
        )
    except LabelsError as error:
        print(f"wsi evaluate: {error}", file=sys.stderr)
        return 2
    return 0
