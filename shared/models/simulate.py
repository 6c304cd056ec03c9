"""Generated feature-level cohorts with a known truth, for subtyping and survival, and a bag loader that
reads bags from files, so ``wsi train`` and ``wsi evaluate`` can be checked end to end without slides.

A cohort is a directory: ``labels.csv`` (the labels format of ``tasks.py``), ``bags/SLIDE.npy`` (float16
``[tiles, D]``), ``bags/SLIDE.coords.npy`` (tile positions on a grid) and ``truth.json`` (each patient's
class or true hazard). Tiles are Gaussian ``N(0, I_D)`` plus, for some of them, an amplitude along a
tile-type direction (orthonormal directions in feature space):

- **Subtyping** (``K`` classes): a patient of class ``k`` has a small share (``share``, 2-6 % by default)
  of tiles along direction ``u_k``; besides them *mimic* tiles along another class's direction at half the
  amplitude (0-10 %) and *noise* tiles along a direction no class uses (0-30 %), so neither "any tile off
  the centre" nor the largest single value gives the class away.
- **Survival:** a patient's share ``s`` of *risk* tiles (along ``u_risk``) is uniform on 2-40 %; their
  event time is exponential with hazard ``h = base * exp(beta * (s - 0.21))``, censoring an independent
  uniform time (about a third censored), and the observed time the earlier of the two. Mimic tiles point
  half along ``u_risk`` and half along another direction (0-20 %); noise tiles as above. The Harrell's C of
  the true hazard on the patients is in ``truth.json`` (``oracle_c_index``): what a perfect model could get.

``python -m wsitk.shared.models.simulate --task survival --out DIR`` writes a cohort, trains on it with
``training.train_run`` and evaluates with ``evaluate_run.evaluate_run`` (the functions ``wsi train`` and
``wsi evaluate`` call), with bags read from the files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from wsitk.shared.models.bags import Bag

PROFILE = {"target_mpp": 0.5, "tile_size": 224, "stain_method": "", "profile_id": "generated"}
BACKBONE = "generated-features"
AMPLITUDE = 3.0


@dataclass(frozen=True)
class GeneratedCohort:
    root: Path
    labels_csv: Path
    bags_dir: Path
    slide_ids: list[str]
    truth: dict[str, Any]

    def sources(self) -> list[tuple[str, str]]:
        """``(slide id, upload key)`` pairs, as ``wsi train`` reads them from the pipeline."""
        return [(s, f"generated/{s}.npy") for s in self.slide_ids]


def _directions(dim: int, count: int, rng: np.random.Generator) -> np.ndarray:
    if count > dim:
        raise ValueError(f"{count} tile types need a feature dimension of at least {count}, got {dim}")
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return np.asarray(q[:, :count].T)


def _bag(
    rng: np.random.Generator, tiles: int, dim: int, parts: Sequence[tuple[float, np.ndarray]]
) -> np.ndarray:
    """``tiles`` Gaussian tiles; for each ``(share, offset)`` a disjoint share of them shifted by ``offset``."""
    features = rng.normal(size=(tiles, dim))
    order = rng.permutation(tiles)
    start = 0
    for share, offset in parts:
        count = round(share * tiles)
        features[order[start : start + count]] += offset
        start += count
    return features


def _survival_outcome(rng: np.random.Generator, beta: float) -> tuple[float, float, float, int]:
    """``(risk share, hazard, observed time, event)`` of one patient."""
    risk_share = float(rng.uniform(0.02, 0.40))
    hazard = 0.05 * math.exp(beta * (risk_share - 0.21))
    event_time = float(rng.exponential(1.0 / hazard))
    censor_time = float(rng.uniform(0.0, 60.0))
    return risk_share, hazard, max(min(event_time, censor_time), 0.01), int(event_time <= censor_time)


def _write_bag(bags_dir: Path, slide_id: str, features: np.ndarray) -> None:
    """``SLIDE.npy`` (float16) and ``SLIDE.coords.npy`` (the tiles on a square grid of 224 px tiles)."""
    n = len(features)
    side = math.ceil(math.sqrt(n))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int64) * 224
    np.save(bags_dir / f"{slide_id}.npy", features.astype(np.float16))
    np.save(bags_dir / f"{slide_id}.coords.npy", coords)


def generate_cohort(
    out: Path,
    task: str,
    *,
    patients: int = 120,
    dim: int = 16,
    classes: int = 3,
    tiles: tuple[int, int] = (60, 120),
    share: tuple[float, float] = (0.02, 0.06),
    beta: float = 18.0,
    max_slides_per_patient: int = 2,
    seed: int = 0,
) -> GeneratedCohort:
    """Write a subtyping (``task="subtype"``) or survival (``task="survival"``) cohort into ``out``."""
    if task not in ("subtype", "survival"):
        raise ValueError(f"generated cohorts are for subtype or survival, not {task!r}")
    rng = np.random.default_rng(seed)
    root = Path(out)
    bags_dir = root / "bags"
    bags_dir.mkdir(parents=True, exist_ok=True)
    directions = _directions(dim, classes + 2, rng)  # classes (or risk, mimic), then noise
    noise = AMPLITUDE * directions[-1]
    mimic = AMPLITUDE * (directions[0] + directions[1]) / math.sqrt(2.0)
    rows: list[list[Any]] = []
    truth: dict[str, Any] = {"task": task, "patients": {}}
    slide_ids: list[str] = []
    outcomes: list[tuple[float, int, float]] = []  # survival: time, event, hazard
    for p in range(patients):
        patient = f"G{p:03d}"
        k = p % classes
        other = (k + 1 + int(rng.integers(classes - 1))) % classes
        own_share = float(rng.uniform(*share))
        if task == "subtype":
            outcome: list[Any] = [f"type-{chr(ord('A') + k)}"]
            truth["patients"][patient] = {"subtype": outcome[0], "share": own_share}
        else:
            own_share, hazard, time, event = _survival_outcome(rng, beta)
            outcome = [f"{time:.3f}", event]
            outcomes.append((time, event, hazard))
            truth["patients"][patient] = {"risk_share": own_share, "hazard": hazard}
        for s in range(1 + int(rng.integers(max_slides_per_patient))):
            slide_id = f"gen-{patient}-{s}"
            if task == "subtype":
                parts = [(own_share, AMPLITUDE * directions[k])]
                parts.append((float(rng.uniform(0.0, 0.10)), 0.5 * AMPLITUDE * directions[other]))
            else:
                parts = [(own_share, AMPLITUDE * directions[0]), (float(rng.uniform(0.0, 0.20)), mimic)]
            parts.append((float(rng.uniform(0.0, 0.30)), noise))
            _write_bag(bags_dir, slide_id, _bag(rng, int(rng.integers(tiles[0], tiles[1] + 1)), dim, parts))
            rows.append([slide_id, patient, *outcome, f"site-{p % 3}"])
            slide_ids.append(slide_id)
    if task == "survival":
        from wsitk.shared.models.survival import concordance_index

        times, events, hazards = zip(*outcomes, strict=True)
        truth["oracle_c_index"] = concordance_index(times, events, hazards)
        truth["events"] = int(sum(events))
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["slide", "patient", *(["subtype"] if task == "subtype" else ["time", "event"]), "site"]
        )
        writer.writerows(rows)
    (root / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return GeneratedCohort(root, labels_csv, bags_dir, slide_ids, truth)


class FileBagLoader:
    """A ``bag_loader`` for ``train_run`` / ``evaluate_run`` that reads ``SLIDE.npy`` (and
    ``SLIDE.coords.npy``) from ``bags_dir``, memory-mapped; ``asked`` records every request."""

    def __init__(self, bags_dir: Path) -> None:
        self.directory = Path(bags_dir)
        self.asked: list[list[str]] = []

    def __call__(self, slide_ids: Sequence[str]) -> Mapping[str, Bag]:
        self.asked.append(list(slide_ids))
        bags = {}
        for slide_id in slide_ids:
            features = np.load(self.directory / f"{slide_id}.npy", mmap_mode="r")
            coords_path = self.directory / f"{slide_id}.coords.npy"
            coords = np.load(coords_path) if coords_path.is_file() else np.zeros((len(features), 2), np.int64)
            bags[slide_id] = Bag(slide_id, "generated", BACKBONE, features, coords, dict(PROFILE))
        return bags


def file_bag_loader(bags_dir: Path) -> FileBagLoader:
    return FileBagLoader(bags_dir)


def main(argv: Sequence[str] | None = None) -> int:
    from wsitk.shared.models.evaluate_run import evaluate_run
    from wsitk.shared.models.training import TrainConfig, train_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--task", choices=("subtype", "survival"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for the cohort and the run")
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    cohort = generate_cohort(
        args.out / "cohort", args.task, patients=args.patients, dim=args.dim, seed=args.seed
    )
    loader = file_bag_loader(cohort.bags_dir)
    config = TrainConfig(
        folds=args.folds, epochs=args.epochs, learning_rate=args.lr, seed=args.seed, patience=10
    )
    command = "python -m wsitk.shared.models.simulate " + " ".join(argv if argv is not None else sys.argv[1:])
    train_run(
        cohort.labels_csv,
        args.out / "run",
        config,
        sources=cohort.sources(),
        bag_loader=loader,
        command=command,
    )
    metrics = evaluate_run(args.out / "run", bag_loader=loader, n_bootstrap=args.bootstrap, seed=args.seed)
    summary = {"oracle_c_index": cohort.truth.get("oracle_c_index"), "models": metrics["models"]}
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
