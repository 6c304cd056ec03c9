"""Cohort-scale training benchmark: MIL training on float16 tile features on disk, with peak memory measured.

Run (not a timed test; numbers depend on the machine, its disk and what else runs on it)::

    python -m tests.benchmarks.bench_cohort_training --workdir bench-results/cohort             # 1,000 slides x 15,000 tiles x 1,024 dims: 30.7 GB float16
    python -m tests.benchmarks.bench_cohort_training --workdir bench-results/cohort --scale 0.1 # 100 slides, 3 GB
    python -m tests.benchmarks.bench_cohort_training --workdir bench-results/cohort --quick     # seconds: the smoke form

The cohort is written once (``features/slide-NNNN.npy``, float16 ``[tiles, dim]``, reused by later runs
with the same shape): Gaussian tile embeddings, and on tumour slides (every other slide) a focus of 1 % of
the tiles shifted along a few dimensions. Then, in this process: ``train_mil`` (gated attention, one bag
per step, at most 512 sampled tiles per bag and step) for ``--epochs`` over ``BagFiles`` (each bag read
from disk when its step comes), with validation on 10 % of the slides; the input normalisation streams
over the training bags in float64, one bag at a time. Printed as JSON: sizes, seconds per phase, the
validation AUC, and ``peak_rss_gb`` (the process's high-water resident memory, ``ru_maxrss``), beside
``cohort_float32_gb``, what holding the training features in float32 would take.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def write_cohort(
    folder: Path, slides: int, tiles: int, dim: int, seed: int = 0
) -> tuple[list[Path], list[int]]:
    """One float16 ``.npy`` per slide (skipped when present with the right shape); labels alternate."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for index in range(slides):
        path = folder / f"slide-{index:04d}.npy"
        label = index % 2
        paths.append(path)
        labels.append(label)
        if path.is_file() and np.load(path, mmap_mode="r").shape == (tiles, dim):
            continue
        rng = np.random.default_rng(seed * 1_000_003 + index)
        features = rng.standard_normal((tiles, dim), dtype=np.float32)
        if label:
            focus = rng.choice(tiles, size=max(1, tiles // 100), replace=False)
            features[focus, :8] += 3.0
        partial = path.with_name(path.name + ".partial.npy")
        np.save(partial, features.astype(np.float16))
        partial.replace(path)
    return paths, labels


def main(argv: list[str] | None = None) -> int:
    from wsitk.shared.models.bags import BagFiles
    from wsitk.shared.models.mil import binary_auc, predict_bags, train_mil

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--tiles", type=int, default=15000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the slide count (0.1: 100 slides)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 slides x 2,000 tiles x 256 dims")
    args = parser.parse_args(argv)
    slides, tiles, dim = (
        (60, 2000, 256) if args.quick else (round(args.slides * args.scale), args.tiles, args.dim)
    )

    started = time.perf_counter()
    folder = args.workdir / f"features-{slides}x{tiles}x{dim}"
    paths, labels = write_cohort(folder, slides, tiles, dim)
    written = time.perf_counter()
    n_val = max(2, slides // 10)
    bags = BagFiles(paths)
    train_bags, val_bags = bags[n_val:], bags[:n_val]
    rss_before = _peak_rss_gb()
    trained = train_mil(
        train_bags,
        labels[n_val:],
        epochs=args.epochs,
        lr=1e-3,
        seed=0,
        max_tiles_per_bag=512,
        val_bags=val_bags,
        val_labels=labels[:n_val],
        patience=args.epochs,
    )
    trained_at = time.perf_counter()
    val_auc = binary_auc(labels[:n_val], predict_bags(trained.model, val_bags))
    result = {
        "slides": slides,
        "tiles_per_slide": tiles,
        "dim": dim,
        "train_slides": slides - n_val,
        "validation_slides": n_val,
        "epochs": args.epochs,
        "bytes_on_disk": sum(path.stat().st_size for path in paths),
        "cohort_float32_gb": round((slides - n_val) * tiles * dim * 4 / 1e9, 2),
        "write_s": round(written - started, 1),
        "train_s": round(trained_at - written, 1),
        "validation_auc": round(val_auc, 3),
        "peak_rss_before_training_gb": round(rss_before, 3),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "largest_bag_float32_gb": round(tiles * dim * 4 / 1e9, 3),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
