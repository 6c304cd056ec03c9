"""``wsi experiment``: the whole model path on one machine, pipeline -> train -> evaluate, in one command.

1. the default models and the local stack with the six services (as ``wsi demo``);
2. a labelled synthetic cohort (``wsi synth --patients``: patients with several slides, sites with stain
   shifts, tumour down to 5 % of the tissue), uploaded through the S3 API;
3. every slide through the pipeline, waiting with visible progress;
4. ``wsi train`` on the stored embeddings (patient-level held-out test set, k folds, the chosen
   aggregators), then ``wsi evaluate`` on the held-out test patients;
5. optionally ``wsi model register --promote`` of the gated-attention ensemble.

The same steps, one command each, are in docs/training-and-evaluation.md. Slides that do not end
predicted (none should) are reported and left out of the labels used for training.

``--benchmark hard`` makes the cohort the hard benchmark (``wsi synth --hard``;
shared/slides/synth/hard.py): tumour mimics, tumours of 0.5-5 % of the tissue with a subtle look,
slides sized by tile count (``--tiles``, 5,000-30,000 by default), a held-out site with a strong stain and
scanner shift whose patients are all in the test set, other test patients fixed in labels.csv, and 5 %
label noise. The evaluation then adds the AUC per site, against the labels file and against the true
labels, and the summary shows every model on the held-out site.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsitk.shared.config import load_settings, wsi_home


def _say(text: str) -> None:
    print(text, flush=True)


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help="experiment directory (default $WSI_HOME/experiments/TAG)"
    )
    parser.add_argument(
        "--benchmark",
        choices=("default", "hard"),
        default="default",
        help="the cohort: 'default' (easy: any model separates it) or 'hard' (mimics, small subtle tumours, "
        "big slides, a held-out site, label noise; docs/training-and-evaluation.md)",
    )
    parser.add_argument(
        "--patients", type=int, default=36, help="patients in the cohort (default 36: 64 slides with seed 0)"
    )
    parser.add_argument("--slides-per-patient", default="1-3", help="range, inclusive (default 1-3)")
    parser.add_argument(
        "--tumour-fraction",
        default=None,
        help="tumour share of the tissue on tumour slides (default 0.05-0.4; hard: 0.005-0.05)",
    )
    parser.add_argument("--sites", type=int, default=4, help="sites (hard: the last one is held out)")
    parser.add_argument("--size", default="3000x2400", help="slide size WxH in level-0 pixels at 0.5 um/px")
    parser.add_argument(
        "--tiles",
        default="5000-30000",
        help="hard: tiler tiles (224 px at 0.5 um/px) of tissue per slide, LOW-HIGH; replaces --size",
    )
    parser.add_argument(
        "--label-noise", type=float, default=0.05, help="hard: share of patients with a flipped label"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", nargs="+", default=["all"], help="aggregators to train (default: all)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="share of patients held out for testing (hard: of the other sites' patients, fixed in "
        "labels.csv, beside the whole held-out site)",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--encoder",
        default="small-cnn",
        choices=("small-cnn", "small-cnn-synth"),
        help="the pipeline's tile encoder: small-cnn has random weights; small-cnn-synth is trained first "
        "on the tissue classes of separate synthetic slides (shared/models/synth_encoder.py, ~10 min)",
    )
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the pipeline")
    parser.add_argument(
        "--promote", action="store_true", help="register and promote the gated-attention ensemble"
    )


def cli_experiment(args: argparse.Namespace) -> int:
    from wsitk.shared.db import records
    from wsitk.shared.db.connection import Database
    from wsitk.shared.demo import wait_for_outcomes
    from wsitk.shared.models.bags import Bag, load_bags
    from wsitk.shared.models.evaluate_run import evaluate_run
    from wsitk.shared.models.training import ARCHITECTURES, Progress, TrainConfig, train_run
    from wsitk.shared.objectstore import open_store
    from wsitk.shared.ops import submit_files
    from wsitk.shared.slides.synth.hard import TILER_TILE_UM

    started = time.monotonic()
    home = wsi_home()
    tag = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or home / "experiments" / tag)
    _start(home, args.encoder)

    settings = load_settings()
    prefix = f"experiment-{out.name}"
    cohort_dir = out / "cohort"
    _say(
        f"[3/6] labelled synthetic cohort ({args.benchmark}): {args.patients} patients, {args.sites} sites "
        f"-> {cohort_dir}; each slide is uploaded to s3://{settings.uploads_bucket}/{prefix}/ as soon as "
        "it is written, so the pipeline works while the next one is drawn"
    )
    t0 = time.monotonic()
    keys: list[str] = []

    def on_slide(slide: Any, truth: Any) -> None:
        tiles = truth.tissue_fraction * truth.width * truth.height * (truth.mpp / TILER_TILE_UM) ** 2
        _say(
            f"      {slide.file_name}  {slide.patient} {slide.site}  {truth.label:6s} "
            f"(tumour share of tissue {truth.tumour_fraction_actual:.3f}; {truth.width}x{truth.height}, "
            f"~{tiles:.0f} tissue tiles; {time.monotonic() - t0:.0f} s)"
        )
        keys.extend(submit_files(settings, [truth.path], prefix=prefix))

    cohort = _make_cohort(args, cohort_dir, on_slide)
    _say(f"      {len(cohort.slides)} slides in {time.monotonic() - t0:.0f} s; labels: {cohort.labels_path}")

    _say("[4/6] waiting for the pipeline")
    rows = wait_for_outcomes(settings, keys, args.timeout)
    pipeline_s = time.monotonic() - t0
    predicted = {k for r in rows if r["status"] == "predicted" for k in keys if k in (r["upload_keys"] or "")}
    _say(f"      {len(predicted)}/{len(keys)} slides predicted {pipeline_s:.0f} s after the first was drawn")
    labels = _labels_used(
        cohort.labels_path, out / "labels-used.csv", {k.rsplit("/", 1)[-1] for k in predicted}
    )

    db = Database(settings.dsn())
    store = open_store(settings)
    sources = records.upload_keys(db, f"{prefix}/")

    def loader(slide_ids: Sequence[str]) -> Mapping[str, Bag]:
        return load_bags(db, store, slide_ids, cache_dir=out / "run" / "bags")

    architectures = ARCHITECTURES if args.arch == ["all"] else tuple(args.arch)
    _say(f"[5/6] wsi train: {', '.join(architectures)}, {args.folds} patient folds, held-out test patients")
    t0 = time.monotonic()
    train_run(
        labels,
        out / "run",
        TrainConfig(
            architectures=tuple(architectures),
            folds=args.folds,
            test_fraction=args.test_fraction,
            seed=args.seed,
            epochs=args.epochs,
        ),
        sources=sources,
        bag_loader=loader,
        progress=Progress(),
        command="wsi experiment " + " ".join(sys.argv[2:]),
    )
    train_s = time.monotonic() - t0
    _say("[6/6] wsi evaluate: the held-out test patients, 95 % CIs (clustered DeLong, Wilson, bootstrap)")
    metrics = evaluate_run(
        out / "run",
        bag_loader=loader,
        n_bootstrap=args.bootstrap,
        max_tiles_per_slide=settings.max_tiles_per_slide,  # the scorer's cap: one scoring rule for both
    )
    held_out = cohort.held_out_site
    if args.benchmark == "hard":
        metrics["by_site"] = _true_label_breakdown(out / "run" / "evaluation", labels, held_out)
    if args.promote:
        from wsitk.shared.models.lifecycle import cli_register

        cli_register(
            argparse.Namespace(run=out / "run", arch="gated-attention", promote=True, actor=None, force=False)
        )
    _summary(out, metrics, len(keys), pipeline_s, train_s, time.monotonic() - started, held_out)
    return 0


def _make_cohort(args: argparse.Namespace, cohort_dir: Path, on_slide: Callable[[Any, Any], None]) -> Any:
    """The labelled cohort: the plain one (``--size``) or the hard benchmark (``--tiles``)."""
    from wsitk.shared.slides.synth import (
        generate_labelled_cohort,
        hard_parameters,
        write_labelled_cohort,
    )

    spp = tuple(int(v) for v in _range(args.slides_per_patient))
    if args.benchmark == "hard":
        tiles = tuple(int(v) for v in _range(args.tiles))
        parameters = hard_parameters(
            args.patients,
            seed=args.seed,
            slides_per_patient=(spp[0], spp[1]),
            tumour_fraction=None if args.tumour_fraction is None else _range(args.tumour_fraction),
            sites=args.sites,
            tiles_per_slide=(tiles[0], tiles[1]),
            label_noise=args.label_noise,
            test_fraction=args.test_fraction,
        )
        _say(f"      hard benchmark; the last site is held out (all its patients split=test); {parameters}")
        return write_labelled_cohort(cohort_dir, parameters, on_slide=on_slide)
    width, height = (int(v) for v in args.size.lower().split("x"))
    return generate_labelled_cohort(
        cohort_dir,
        patients=args.patients,
        slides_per_patient=(spp[0], spp[1]),
        tumour_fraction=_range(args.tumour_fraction or "0.05-0.4"),
        sites=args.sites,
        size=(width, height),
        seed=args.seed,
        on_slide=on_slide,
    )


def _true_label_breakdown(evaluation: Path, labels: Path, held_out: str | None) -> dict[str, Any]:
    """Per-site AUC against the labels file and against the cohort's true labels (label noise)."""
    from wsitk.shared.models.by_site import add_site_breakdown

    with labels.open(newline="") as handle:
        true_labels = {r["slide"]: int(r["true_label"] == "tumour") for r in csv.DictReader(handle)}
    return add_site_breakdown(evaluation, true_labels=true_labels, held_out_site=held_out)


def _start(home: Path, encoder: str = "small-cnn") -> None:
    from wsitk.shared.models.defaults import init_default_models
    from wsitk.shared.ops import services_up
    from wsitk.shared.stack.local import start_stack

    _say(f"[1/6] models: default backbone ({encoder}) + MIL model in {home / 'models'}")
    init_default_models(home / "models", seed=0, encoder=encoder)
    _say(f"[2/6] local stack and the six services (home {home})")
    info = start_stack(home)
    for key, value in info.env().items():
        os.environ[key] = value
    services_up()


def _labels_used(source: Path, target: Path, predicted_names: set[str]) -> Path:
    with source.open() as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if r["slide"] in predicted_names]
    if len(kept) < len(rows):
        _say(
            f"      leaving out {len(rows) - len(kept)} slide(s) without a prediction: "
            f"{sorted(r['slide'] for r in rows if r['slide'] not in predicted_names)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return target


def _summary(
    out: Path,
    metrics: Mapping[str, Any],
    slides: int,
    pipeline_s: float,
    train_s: float,
    total_s: float,
    held_out: str | None = None,
) -> None:
    _say("")
    _say(f"slides {slides}; pipeline {pipeline_s:.0f} s, training {train_s:.0f} s, total {total_s:.0f} s")
    for name, result in metrics["models"].items():
        if " fold " in name:
            continue
        auc = result["metrics"]["auc"]
        text = "n/a" if auc["point"] is None else f"{auc['point']:.3f}"
        if auc["lower"] is not None and auc["upper"] is not None:
            text += f" (95 % CI {auc['lower']:.3f}-{auc['upper']:.3f})"
        _say(f"  {name:30s} test AUC {text}")
    by_site = metrics.get("by_site") or {}
    if held_out and by_site:
        for source, table in by_site["labels"].items():
            if held_out not in table:
                continue
            site = table[held_out]
            _say(
                f"held-out site {held_out} ({site['slides']} slides, {site['patients']} patients, "
                f"{site['tumour_slides']} tumour), against the {source}:"
            )
            for name, auc in site["auc"].items():
                text = "n/a" if auc["point"] is None else f"{auc['point']:.3f}"
                if auc["lower"] is not None and auc["upper"] is not None:
                    text += f" (95 % CI {auc['lower']:.3f}-{auc['upper']:.3f})"
                _say(f"  {name:30s} AUC {text}")
    _say(f"report: {out / 'run' / 'evaluation' / 'report.md'}")
