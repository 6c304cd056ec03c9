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
balanced cross-entropy, Adam, flips and quarter turns, and colour augmentation so that a new lab's
colours do not move the embedding much (``augment``):

* ``"od-channel"`` (the first recipe): optical density scaled by 1 +- ``stain_jitter`` and shifted by
  +-0.03 per RGB channel and tile;
* ``"stain"`` (the default): per tile, the haematoxylin and eosin amounts changed separately (optical
  density unmixed with the standard Ruifrok-Johnston H&E vectors, each stain scaled by 1 +- ``stain_scale``),
  every stain hue turned together about the grey axis by up to +-``hue_deg`` degrees, the glass tinted
  (an optical-density offset per channel) and, for half the tiles, JPEG at a quality drawn from
  ``jpeg_quality``: the ways labs and scanners differ (Tellez et al. 2019 measured HED jitter as the
  augmentation that generalises best across centres), drawn fresh for every tile and epoch instead of
  the 24 looks of the pretraining slides.

The report also gives the validation accuracy on the validation slides rendered again with an
``UNSEEN_LAB`` look (stains and hues beyond anything the pretraining slides draw, bluish dim glass, strong
JPEG; not the hard benchmark's held-out look): how much of the accuracy survives a lab it never saw. The
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
    stain_jitter: float = 0.2  # "od-channel": optical density scaled by 1 +- this per channel and tile
    augment: str = "stain"  # "stain" or "od-channel" (module docstring)
    stain_scale: float = 0.35  # "stain": each stain's amount scaled by 1 +- this
    hue_deg: float = 20.0  # "stain": every stain hue turned by up to +- this
    jpeg_quality: tuple[int, int] = (40, 95)  # "stain": for half the tiles, JPEG at a quality in this range
    workers: int = 2  # processes rendering tiles

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment {self.augment!r}: choose one of {AUGMENTATIONS}")
        object.__setattr__(self, "jpeg_quality", tuple(int(q) for q in self.jpeg_quality))


AUGMENTATIONS = ("stain", "od-channel")

#: Ruifrok & Johnston's H&E optical-density vectors (rows: haematoxylin, eosin; unit length), and a
#: third row orthogonal to both: unmixing with them gives each pixel's amount of each stain.
_H = np.array([0.650, 0.704, 0.286])
_E = np.array([0.072, 0.990, 0.105])
_RESIDUAL = np.cross(_H, _E)
STAIN_MATRIX = np.stack(
    [_H / np.linalg.norm(_H), _E / np.linalg.norm(_E), _RESIDUAL / np.linalg.norm(_RESIDUAL)]
)


def unseen_lab() -> tuple[Any, tuple[float, float]]:
    """The look and stain shift of the encoder's out-of-distribution validation: beyond the pretraining
    draws on every axis (hues +-25 degrees where slides draw +-20, a stain shift at the generator's limit,
    glass tinted 0.86 where slides draw 0.90-1.0, JPEG 45), and unlike the hard benchmark's held-out site
    (whose hues turn the other way, on yellowish glass)."""
    from wsitk.shared.slides.looks import ScannerLook

    look = ScannerLook(
        "unseen-lab",
        white_rgb=(198.0, 212.0, 230.0),
        stain_intensity=(0.7, 1.3),
        stain_hue_deg=(-25.0, 25.0),
        jpeg_quality=45,
    )
    return look, (0.55, 1.55)


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


def render_labelled_tiles(
    index: int, seed: int, recipe: EncoderRecipe, *, unseen: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One pretraining slide's tiles (N, 224, 224, 3) uint8 and their class indices (N,); with ``unseen``
    the same tiles of the same tissue, rendered with the ``unseen_lab`` look and stains."""
    from wsitk.shared.slides.synth.layout import build_layout
    from wsitk.shared.slides.synth.render import _slide_renderer

    spec = pretraining_spec(index, seed, recipe)
    if unseen:
        look, shift = unseen_lab()
        spec = dataclasses.replace(spec, look=look, stain_shift=shift)
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
    indices: Sequence[int],
    seed: int,
    recipe: EncoderRecipe,
    progress: Callable[[str], object],
    *,
    unseen: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    tiles, labels = [], []
    with ProcessPoolExecutor(max_workers=max(1, recipe.workers)) as pool:
        futures = [pool.submit(render_labelled_tiles, i, seed, recipe, unseen=unseen) for i in indices]
        for done, future in enumerate(futures, 1):
            t, y = future.result()
            tiles.append(t)
            labels.append(y)
            progress(f"[encoder]   slide {done}/{len(indices)}: {len(y)} tiles")
    return np.concatenate(tiles), np.concatenate(labels)


def _augment(batch: Any, generator: Any, recipe: EncoderRecipe) -> Any:
    """Colour augmentation (``recipe.augment``), flips and quarter turns; uint8 NHWC -> float NCHW 0..1."""
    import torch

    if recipe.augment == "stain":
        x = _stain_augment(batch, generator, recipe)
    else:
        x = _od_channel_augment(batch.permute(0, 3, 1, 2).float(), generator, recipe.stain_jitter)
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(3)
    turns = int(torch.randint(0, 4, (1,), generator=generator).item())
    return torch.rot90(x, turns, dims=(2, 3))


def _od_channel_augment(x: Any, generator: Any, jitter: float) -> Any:
    import torch

    od = -torch.log((x + 1.0) / 256.0)
    n = x.shape[0]
    scale = 1.0 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * jitter
    shift = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * 0.03
    return (256.0 * torch.exp(-(od * scale + shift).clamp(min=0.0)) - 1.0).clamp(0.0, 255.0) / 255.0


def _uniform(generator: Any, shape: tuple[int, ...], low: float, high: float) -> Any:
    import torch

    return low + (high - low) * torch.rand(shape, generator=generator)


def _grey_axis_rotations(angles: Any) -> Any:
    """(N, 3, 3) rotations by ``angles`` (radians) about the grey axis (1, 1, 1)/sqrt(3) (Rodrigues)."""
    import torch

    axis = torch.full((3,), 1 / np.sqrt(3), dtype=torch.float32)
    cross = torch.tensor(
        [[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]], dtype=torch.float32
    )
    outer = torch.outer(axis, axis)
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    return cos * torch.eye(3) + sin * cross + (1 - cos) * outer


def _stain_augment(batch: Any, generator: Any, recipe: EncoderRecipe) -> Any:
    """Per tile: each stain's amount scaled (1 +- ``stain_scale``), stain hues turned (+-``hue_deg``), the
    glass tinted (optical density offset -0.02..0.10 per channel), and JPEG for half the tiles."""
    import torch

    n = batch.shape[0]
    od = -torch.log((batch.float() + 1.0) / 256.0)  # N, H, W, 3
    stains = torch.from_numpy(STAIN_MATRIX.astype(np.float32))
    amounts = od @ torch.linalg.inv(stains)  # per pixel: haematoxylin, eosin, residual
    scale = torch.ones(n, 3)
    scale[:, :2] = _uniform(generator, (n, 2), 1 - recipe.stain_scale, 1 + recipe.stain_scale)
    mixing = scale[:, :, None] * stains  # N, 3, 3
    angles = torch.deg2rad(_uniform(generator, (n,), -recipe.hue_deg, recipe.hue_deg))
    mixing = mixing @ _grey_axis_rotations(angles).transpose(1, 2)
    tint = _uniform(generator, (n, 1, 3), -0.02, 0.10)
    od = (amounts.reshape(n, -1, 3) @ mixing + tint).clamp(min=0.0).reshape(od.shape)
    rgb = (256.0 * torch.exp(-od) - 1.0).clamp(0.0, 255.0)
    low, high = recipe.jpeg_quality
    compress = torch.rand(n, generator=generator) < 0.5
    qualities = torch.randint(low, high + 1, (n,), generator=generator)
    if bool(compress.any()):
        tiles = rgb.round().to(torch.uint8).numpy()
        for i in np.flatnonzero(compress.numpy()):
            tiles[i] = _jpeg(tiles[i], int(qualities[i]))
        rgb = torch.from_numpy(tiles).float()
    return rgb.permute(0, 3, 1, 2).contiguous() / 255.0


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


def _unseen_lab_report(matrix: np.ndarray) -> dict[str, Any]:
    """What the report says of the validation slides in the unseen lab's look, from their confusion matrix."""
    look, shift = unseen_lab()
    recall = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    return {
        "look": look.to_json(),
        "stain_shift": list(shift),
        "balanced_accuracy": round(float(recall.mean()), 4),
        "recall": {c: round(float(recall[i]), 4) for i, c in enumerate(CLASSES)},
        "confusion": matrix.tolist(),
    }


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
    val_indices = range(recipe.slides, recipe.slides + recipe.val_slides)
    val_x, val_y = _render_split(val_indices, seed, recipe, progress)
    progress("[encoder] the validation slides again, in an unseen lab's look")
    unseen_x, unseen_y = _render_split(val_indices, seed, recipe, progress, unseen=True)
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
                x = _normalise(_augment(tiles_t[idx], generator, recipe))
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
    unseen = _unseen_lab_report(_confusion(network, head, unseen_x, unseen_y))
    progress(f"[encoder] unseen lab: balanced accuracy {unseen['balanced_accuracy']:.3f}")
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
        "unseen_lab": unseen,
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
        "data": "synthetic pretraining slides only (no cohort's slides); not validated on real tissue",
    }
    text = json.dumps(report, indent=2) + "\n"
    out_path.with_suffix(".json").write_text(text)
    return dict(json.loads(text))  # as the file reads back (tuples become lists)
