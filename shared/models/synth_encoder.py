"""``small-cnn-synth``: the ``small-cnn`` network trained to tell tissue classes apart on synthetic slides.

Why: the default ``small-cnn`` has seeded random weights. On the hard benchmark (tumour at 0.5-5 % of the
tissue, mimics, a held-out site) its embeddings carry too little of the tumour's look for any aggregator
to find, so a MIL comparison on them measures the encoder, not the aggregators. Real studies use encoders
pretrained on other data (UNI, Virchow...); no such weights can be downloaded here, so this module makes
the closest honest stand-in: an encoder pretrained, with tile labels, on a **separate set of synthetic
slides** that belong to no cohort.

What it learns from (``EncoderRecipe``):

* ``slides`` pretraining slides (plus ``val_slides`` for its own validation), each a ``SynthSpec`` of its
  own: 12,000 x 9,000 px at 0.5 um/px, tumour over 20-40 % of the tissue (classic or subtle look, half each),
  every mimic class (lymphoid, reactive epithelium, necrosis, fat, mucin) over 6-12 % each, a random
  stain shift over the generator's whole range, a colour cast, a patient nuclear size and a random scanner
  look (``looks.random_look``), JPEG at that look's quality. Their seeds start at ``PRETRAIN_SEED_BASE``
  (cohorts draw theirs at random below 2**31, so a seed could coincide, but a slide is its whole spec:
  size, classes, shares, stains and look all differ), and none of them reuses a cohort's site or the hard
  benchmark's held-out look.
* tiles of 224 px at 0.5 um/px (the tiler's default) whose window is at least ``purity`` one class by the
  slide's layout masks (the generator's ground truth), up to ``tiles_per_class`` per class and slide.
* seven classes: normal, tumour and the five mimics (``CLASSES``). Background is left out: the tiler and
  the quality filter drop it before the embedder.

Training: the ``small-cnn`` network (``backbones.SmallCNN``, 128-d output) with a linear head, class-
balanced cross-entropy, Adam, flips and quarter turns, and stain augmentation in optical density (each
channel scaled and shifted per tile) so that a new lab's colours do not move the embedding much. The
head is thrown away; only the network's weights are kept and exported exactly like the baseline
(``export.export_backbone("small-cnn", weights=...)``, same preprocessing: ImageNet normalisation).

What it is not: it has never seen a real slide, so it says nothing about real tissue; and because it was
taught the generator's classes, results on generated cohorts with it are an upper bound of what a strong
pretrained encoder would give, not a property of the MIL models alone. ``docs/training-and-evaluation.md``
reports the hard benchmark with both encoders.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Tile classes, in label order.
CLASSES: tuple[str, ...] = ("normal", "tumour", "necrosis", "lymphoid", "reactive", "mucin", "fat")
#: First seed of the pretraining slides.
PRETRAIN_SEED_BASE = 900_000_000
TILE_PX = 224
TILE_MPP = 0.5


@dataclass(frozen=True)
class EncoderRecipe:
    """How ``small-cnn-synth`` is made; the same recipe and seed give the same weights."""

    slides: int = 24
    val_slides: int = 6
    tiles_per_class: int = 60  # per slide and class, at most
    purity: float = 0.7  # share of the tile window that must be its class
    width: int = 12000
    height: int = 9000
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 1e-3
    stain_jitter: float = 0.2  # optical density scaled by 1 +- this per channel and tile
    workers: int = 2  # processes rendering tiles


def pretraining_spec(index: int, seed: int, recipe: EncoderRecipe) -> Any:
    """The ``index``-th pretraining slide: every class present, a random lab and scanner look."""
    from wsitk.shared.slides.looks import random_look
    from wsitk.shared.slides.synth.spec import MIMIC_CLASSES, STAIN_SHIFT_RANGE, SynthSpec

    rng = np.random.default_rng([seed, index, 0x5EC])
    slide_seed = PRETRAIN_SEED_BASE + seed * 10_000 + index
    look = dataclasses.replace(random_look(slide_seed), red_ink=False, name=f"pretrain-{index}")
    low, high = STAIN_SHIFT_RANGE
    return SynthSpec(
        width=recipe.width,
        height=recipe.height,
        mpp=TILE_MPP,
        fmt="svs",
        tumour_fraction=float(rng.uniform(0.2, 0.4)),
        seed=slide_seed,
        stain_shift=(float(rng.uniform(low + 0.1, high - 0.1)), float(rng.uniform(low + 0.1, high - 0.1))),
        illumination_od=tuple(float(v) for v in rng.uniform(0.0, 0.05, 3)),
        nucleus_scale=float(rng.uniform(0.85, 1.15)),
        look=look,
        mimics=tuple((name, round(float(rng.uniform(0.06, 0.12)), 4)) for name in MIMIC_CLASSES),
        tumour_look="subtle" if index % 2 else "classic",
    )


def class_grid(layout: Any) -> np.ndarray:
    """Per layout cell: the index in ``CLASSES`` of its tissue class, -1 outside tissue."""
    grid = np.full(layout.tissue_mask.shape, -1, np.int8)
    grid[layout.tissue_mask] = CLASSES.index("normal")
    for name, mask in layout.mimic_masks.items():
        grid[mask] = CLASSES.index(name)
    grid[layout.tumour_mask] = CLASSES.index("tumour")
    return grid


def tile_windows(
    grid: np.ndarray, downsample: float, width: int, height: int, purity: float
) -> list[tuple[int, int, int]]:
    """(x0, y0, class) of every whole 224 px window, on a grid of half a tile, at least ``purity`` one class."""
    windows = []
    cells = max(1, round(TILE_PX / downsample))
    step = TILE_PX // 2
    for y0 in range(0, height - TILE_PX + 1, step):
        for x0 in range(0, width - TILE_PX + 1, step):
            row, col = int(y0 / downsample), int(x0 / downsample)
            window = grid[row : row + cells, col : col + cells]
            if window.size == 0:
                continue
            counts = np.bincount(window[window >= 0].ravel(), minlength=len(CLASSES))
            best = int(counts.argmax())
            if counts[best] >= purity * window.size:
                windows.append((x0, y0, best))
    return windows


def _jpeg(tile: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def render_labelled_tiles(index: int, seed: int, recipe: EncoderRecipe) -> tuple[np.ndarray, np.ndarray]:
    """One pretraining slide's tiles (N, 224, 224, 3) uint8 and their class indices (N,)."""
    from wsitk.shared.slides.synth.layout import build_layout
    from wsitk.shared.slides.synth.render import _slide_renderer

    spec = pretraining_spec(index, seed, recipe)
    layout = build_layout(spec)
    renderer = _slide_renderer(spec, layout)
    windows = tile_windows(class_grid(layout), layout.downsample, spec.width, spec.height, recipe.purity)
    rng = np.random.default_rng([seed, index, 0x711E])
    chosen: list[tuple[int, int, int]] = []
    for label in range(len(CLASSES)):
        mine = [w for w in windows if w[2] == label]
        take = rng.permutation(len(mine))[: recipe.tiles_per_class]
        chosen += [mine[i] for i in take]
    tiles = np.empty((len(chosen), TILE_PX, TILE_PX, 3), np.uint8)
    for i, (x0, y0, _) in enumerate(chosen):
        tiles[i] = _jpeg(renderer.render(1, x0, y0, TILE_PX, TILE_PX), spec.jpeg_quality)
    return tiles, np.asarray([c for _, _, c in chosen], np.int64)


def _render_split(
    indices: Sequence[int], seed: int, recipe: EncoderRecipe, progress: Callable[[str], object]
) -> tuple[np.ndarray, np.ndarray]:
    tiles, labels = [], []
    with ProcessPoolExecutor(max_workers=max(1, recipe.workers)) as pool:
        futures = [pool.submit(render_labelled_tiles, i, seed, recipe) for i in indices]
        for done, future in enumerate(futures, 1):
            t, y = future.result()
            tiles.append(t)
            labels.append(y)
            progress(f"[encoder]   slide {done}/{len(indices)}: {len(y)} tiles")
    return np.concatenate(tiles), np.concatenate(labels)


def _augment(batch: Any, generator: Any, jitter: float) -> Any:
    """Flips, quarter turns and a per-tile stain change in optical density; uint8 NHWC -> float NCHW 0..1."""
    import torch

    x = batch.permute(0, 3, 1, 2).float()
    od = -torch.log((x + 1.0) / 256.0)
    n = x.shape[0]
    scale = 1.0 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * jitter
    shift = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * 0.03
    x = (256.0 * torch.exp(-(od * scale + shift).clamp(min=0.0)) - 1.0).clamp(0.0, 255.0) / 255.0
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(3)
    turns = int(torch.randint(0, 4, (1,), generator=generator).item())
    return torch.rot90(x, turns, dims=(2, 3))


def _normalise(x: Any) -> Any:
    import torch
    from wsitk.shared.models.encoders.families import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def _confusion(network: Any, head: Any, tiles: np.ndarray, labels: np.ndarray) -> np.ndarray:
    import torch

    matrix = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    network.eval()
    with torch.no_grad():
        for start in range(0, len(tiles), 128):
            x = torch.from_numpy(tiles[start : start + 128]).permute(0, 3, 1, 2).float() / 255.0
            predicted = head(network(_normalise(x))).argmax(1).numpy()
            for truth, guess in zip(labels[start : start + 128], predicted, strict=True):
                matrix[truth, guess] += 1
    network.train()
    return matrix


def train_synth_encoder(
    out_path: Path,
    *,
    seed: int = 0,
    recipe: EncoderRecipe | None = None,
    progress: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Render the pretraining tiles, train, save the network's state dict to ``out_path`` (a ``.pt`` file
    that ``export_backbone("small-cnn", weights=...)`` reads) and a report beside it (``.json``)."""
    import torch
    from wsitk.shared.models.backbones import SmallCNN, seeded_torch

    recipe = recipe or EncoderRecipe()
    started = time.perf_counter()
    progress(f"[encoder] rendering tiles of {recipe.slides} + {recipe.val_slides} pretraining slides")
    train_x, train_y = _render_split(range(recipe.slides), seed, recipe, progress)
    val_x, val_y = _render_split(
        range(recipe.slides, recipe.slides + recipe.val_slides), seed, recipe, progress
    )
    counts = np.bincount(train_y, minlength=len(CLASSES))
    if (counts == 0).any():
        missing = [CLASSES[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"no pretraining tile of class {missing}; use more or larger slides")
    progress(f"[encoder] {len(train_y)} training tiles {dict(zip(CLASSES, counts.tolist(), strict=True))}")

    with seeded_torch(seed):
        network = SmallCNN(seed=seed)
        head = torch.nn.Linear(network.out_dim, len(CLASSES))
        generator = torch.Generator().manual_seed(seed)
        weights = torch.tensor(counts.sum() / (len(CLASSES) * counts), dtype=torch.float32)
        optimiser = torch.optim.Adam([*network.parameters(), *head.parameters()], lr=recipe.learning_rate)
        steps = recipe.epochs * int(np.ceil(len(train_y) / recipe.batch_size))
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=recipe.learning_rate, total_steps=steps
        )
        tiles_t, labels_t = torch.from_numpy(train_x), torch.from_numpy(train_y)
        history = []
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(train_y), generator=generator)
            losses = []
            for start in range(0, len(order), recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                x = _normalise(_augment(tiles_t[idx], generator, recipe.stain_jitter))
                loss = torch.nn.functional.cross_entropy(head(network(x)), labels_t[idx], weight=weights)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
            matrix = _confusion(network, head, val_x, val_y)
            per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": round(float(np.mean(losses)), 4),
                    "val_balanced_accuracy": round(float(per_class.mean()), 4),
                }
            )
            progress(
                f"[encoder] epoch {epoch + 1}/{recipe.epochs}: loss {np.mean(losses):.3f}, validation "
                f"balanced accuracy {per_class.mean():.3f} ({time.perf_counter() - started:.0f} s)"
            )
    network.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out_path)
    matrix = _confusion(network, head, val_x, val_y)
    report = {
        "encoder": "small-cnn-synth",
        "seed": seed,
        "recipe": asdict(recipe),
        "classes": list(CLASSES),
        "train_tiles": dict(zip(CLASSES, counts.tolist(), strict=True)),
        "val_tiles": dict(zip(CLASSES, np.bincount(val_y, minlength=len(CLASSES)).tolist(), strict=True)),
        "val_recall": {
            c: round(float(matrix[i, i] / max(matrix[i].sum(), 1)), 4) for i, c in enumerate(CLASSES)
        },
        "val_confusion": matrix.tolist(),
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
        "data": "synthetic pretraining slides only (no cohort's slides); not validated on real tissue",
    }
    out_path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report
