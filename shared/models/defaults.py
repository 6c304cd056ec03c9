"""The default models, built locally at set-up time so that the pipeline runs with no download at all.

``init_default_models(model_dir)`` writes

- ``backbone-small-cnn.onnx``: the ``small-cnn`` baseline encoder with seeded random weights (NOT a
  pathology-pretrained encoder), 224 px tiles at 0.5 um/px, taking raw uint8 tiles (``uint8-nhwc``: the
  normalisation is in the graph);
- ``mil-default.onnx``: a gated-attention MIL model trained on *synthetic* bags embedded by that encoder;
- ``models.json``: the manifest (file names relative to ``model_dir``, checksums, ids, the training summary).

The training data are synthetic tiles from ``wsitk.shared.slides.synth.render_patch``: a normal bag holds
normal tissue and some background-like tiles, a tumour bag the same with a minority (5-30 %) of tumour
tiles. Bags are drawn from rendered tile pools (a tile may appear in several bags of its split);
training and validation bags come from two separately rendered pools, so validation
bags, on which the threshold is chosen and the validation AUC is measured, share no tile with training.
The numbers say the model separates the synthetic textures; they say nothing about real slides.

Everything is seeded, so the same seed gives the same backbone id and model version. The call is
idempotent: when the manifest matches the recipe and both files match their checksums it does nothing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsitk.shared.models.export import BackboneInfo
    from wsitk.shared.models.synth_encoder import EncoderRecipe

BACKBONE_FILE = "backbone-small-cnn.onnx"
#: The default models' encoders: the random-weight baseline, or the same network trained on the tissue
#: classes of separate synthetic slides (``synth_encoder.py``; for the hard benchmark).
ENCODER_CHOICES = ("small-cnn", "small-cnn-synth")
SYNTH_ENCODER_WEIGHTS = "encoder-small-cnn-synth.pt"
MIL_FILE = "mil-default.onnx"
MANIFEST_FILE = "models.json"
RECIPE_VERSION = 2  # 2: the MIL model carries its out-of-distribution summary (ood.py)
TILE_KINDS = ("normal", "tumour", "background")

RenderPatch = Callable[[str, int, float, np.random.Generator], np.ndarray]  # synth.render_patch


@dataclass(frozen=True)
class DefaultModelRecipe:
    """How the default models are made. Changing any field makes ``init_default_models`` rebuild them."""

    input_size: int = 224
    target_mpp: float = 0.5
    train_bags: int = 72
    val_bags: int = 36
    min_tiles_per_bag: int = 16
    max_tiles_per_bag: int = 48
    tumour_share: tuple[float, float] = (0.05, 0.30)
    background_share: tuple[float, float] = (0.0, 0.15)
    train_pool: tuple[int, int, int] = (240, 120, 40)  # rendered tiles per kind (normal, tumour, background)
    val_pool: tuple[int, int, int] = (120, 60, 20)
    epochs: int = 40
    learning_rate: float = 2e-4
    # The encoder takes raw uint8 [N, S, S, 3] tiles and normalises inside the graph: a prepared batch is
    # a quarter of float32 NCHW's size (9 instead of 37 MiB at 64 x 224 px, which bounds the embedder's
    # queue of prepared batches) and the normalisation leaves the decode threads (docs/throughput.md).
    encoder_input_format: str = "uint8-nhwc"

    def __post_init__(self) -> None:
        largest = self.max_tiles_per_bag
        needed = (
            largest,
            math.ceil(largest * self.tumour_share[1]),
            math.ceil(largest * self.background_share[1]),
        )
        for split, pool in (("train_pool", self.train_pool), ("val_pool", self.val_pool)):
            if any(have < need for have, need in zip(pool, needed, strict=True)):
                raise ValueError(
                    f"{split} {pool} is too small for bags of up to {largest} tiles: a bag draws its tiles "
                    f"without repetition, so it needs at least {needed} (normal, tumour, background) tiles"
                )
        if not 1 <= self.min_tiles_per_bag <= self.max_tiles_per_bag:
            raise ValueError("need 1 <= min_tiles_per_bag <= max_tiles_per_bag")
        if self.train_bags < 4 or self.val_bags < 2:
            raise ValueError("need at least 4 training and 2 validation bags (both classes in each)")


def _atomic_write_text(path: Path, text: str) -> None:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(name, path)


def load_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest in ``model_dir``, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((Path(model_dir) / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def register_backbone(model_dir: Path, info: BackboneInfo) -> dict[str, Any]:
    """Make an exported backbone the pipeline's encoder: ``models.json``'s ``backbone`` entry.

    The entry carries the encoder's tile size and MPP, which the pipeline profile of new slides takes
    (``ServiceContext.current_profile``); the embedder opens the file it names. The entry it replaces is
    kept under ``previous_backbones``; the MIL entry is left alone (a MIL model trained on another
    encoder's embeddings refuses slides embedded by this one, by backbone id).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(model_dir) or {}
    path = Path(info.path)
    try:
        relative = str(path.resolve().relative_to(model_dir.resolve()))
    except ValueError:
        relative = str(path.resolve())
    previous = manifest.get("backbone")
    if previous and previous.get("backbone_id") != info.backbone_id:
        manifest["previous_backbones"] = [previous, *manifest.get("previous_backbones", [])][:8]
    manifest["backbone"] = {
        "path": relative,
        "sha256": info.sha256,
        "backbone_id": info.backbone_id,
        "encoder": info.encoder or info.architecture,
        "input_size": info.input_size,
        "tile_size": info.tile_size or info.input_size,
        "target_mpp": info.target_mpp,
        "output_dim": info.output_dim,
        "weights_source": info.weights_source,
        "weights_sha256": info.weights_sha256,
        "fp16": info.fp16,
        "input_format": info.input_format,
    }
    _atomic_write_text(model_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _is_complete(model_dir: Path, manifest: dict[str, Any], wanted: dict[str, Any]) -> bool:
    from wsitk.shared.models.runtime import sha256_file

    if manifest.get("recipe") != wanted:
        return False
    try:
        return all(
            sha256_file(model_dir / manifest[part]["path"]) == manifest[part]["sha256"]
            for part in ("backbone", "mil")
        )
    except (OSError, KeyError, TypeError):
        return False


def _render_pool(
    render_patch: RenderPatch,
    counts: tuple[int, int, int],
    recipe: DefaultModelRecipe,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    pool: dict[str, np.ndarray] = {}
    for kind, count in zip(TILE_KINDS, counts, strict=True):
        tiles = [render_patch(kind, recipe.input_size, recipe.target_mpp, rng) for _ in range(count)]
        pool[kind] = np.stack(tiles).astype(np.uint8)
    return pool


def _make_bags(
    features: dict[str, np.ndarray], n_bags: int, recipe: DefaultModelRecipe, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    """Half normal, half tumour bags of embedded tiles drawn (without replacement per bag) from one pool."""
    bags: list[np.ndarray] = []
    labels: list[int] = []
    for index in range(n_bags):
        label = index % 2
        size = int(rng.integers(recipe.min_tiles_per_bag, recipe.max_tiles_per_bag + 1))
        n_background = round(size * rng.uniform(*recipe.background_share))
        n_tumour = max(1, round(size * rng.uniform(*recipe.tumour_share))) if label else 0
        n_normal = size - n_background - n_tumour
        parts = [
            features[kind][rng.choice(len(features[kind]), count, replace=False)]
            for kind, count in (("normal", n_normal), ("tumour", n_tumour), ("background", n_background))
            if count
        ]
        bag = np.concatenate(parts)
        bags.append(bag[rng.permutation(len(bag))])
        labels.append(label)
    return bags, labels


def init_default_models(
    model_dir: Path,
    *,
    seed: int = 0,
    progress: Callable[[str], object] = print,
    recipe: DefaultModelRecipe | None = None,
    encoder: str = "small-cnn",
    encoder_recipe: EncoderRecipe | None = None,
) -> dict[str, Any]:
    """Build (or confirm) the default backbone and MIL model in ``model_dir``; returns the manifest.

    About 20 s on two CPU cores with the default recipe (measured: 18-19 s). ``recipe`` exists for tests (a tiny one
    runs in seconds); the demo uses the default. ``encoder="small-cnn-synth"`` first trains the encoder on
    separate synthetic slides (``synth_encoder.train_synth_encoder``, ``encoder_recipe``; about ten minutes
    on two cores) unless its weights in ``model_dir`` were made by the same recipe and seed.
    """
    from wsitk.shared.models.export import export_mil, state_dict_sha256
    from wsitk.shared.models.mil import binary_auc, choose_threshold, predict_bags, train_mil
    from wsitk.shared.models.runtime import BackboneRunner

    recipe = recipe or DefaultModelRecipe()
    model_dir = Path(model_dir)
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"encoder {encoder!r} is not one of {', '.join(ENCODER_CHOICES)}")
    wanted = {"version": RECIPE_VERSION, "seed": seed, **asdict(recipe)}
    if encoder != "small-cnn":  # the baseline's recipe stays as it was, so existing installs are kept
        from wsitk.shared.models.synth_encoder import EncoderRecipe

        wanted["encoder"] = encoder
        wanted["encoder_recipe"] = asdict(encoder_recipe or EncoderRecipe())
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as the manifest stores them
    existing = load_manifest(model_dir)
    if existing is not None and _is_complete(model_dir, existing, wanted):
        progress(f"[models] default models in {model_dir} are present and valid; nothing to do")
        return existing

    started = time.perf_counter()
    model_dir.mkdir(parents=True, exist_ok=True)
    backbone_file, backbone, note = _export_encoder(
        model_dir, encoder, seed, recipe, encoder_recipe, progress
    )
    progress(
        f"[models]   {backbone.backbone_id}: ONNX vs torch, max rel. difference {backbone.max_rel_diff:.1e}"
    )

    from wsitk.shared.slides.synth import render_patch

    tile_source = "wsitk.shared.slides.synth.render_patch"
    rng = np.random.default_rng(seed)
    runner = BackboneRunner(model_dir / backbone_file, prefer=("CPUExecutionProvider",))
    embedded: dict[str, dict[str, np.ndarray]] = {}
    for split, counts in (("train", recipe.train_pool), ("val", recipe.val_pool)):
        progress(f"[models] rendering and embedding {sum(counts)} synthetic {split} tiles ({tile_source})")
        pool = _render_pool(render_patch, counts, recipe, rng)
        embedded[split] = {kind: runner.embed(tiles) for kind, tiles in pool.items()}
    train_bags, train_labels = _make_bags(embedded["train"], recipe.train_bags, recipe, rng)
    val_bags, val_labels = _make_bags(embedded["val"], recipe.val_bags, recipe, rng)

    progress(
        f"[models] training gated-attention MIL on {len(train_bags)} bags, validating on {len(val_bags)}"
    )
    trained = train_mil(
        train_bags,
        train_labels,
        epochs=recipe.epochs,
        lr=recipe.learning_rate,
        seed=seed,
        val_bags=val_bags,
        val_labels=val_labels,
    )
    train_auc = binary_auc(train_labels, predict_bags(trained.model, train_bags))
    val_probabilities = predict_bags(trained.model, val_bags)
    val_auc = binary_auc(val_labels, val_probabilities)
    threshold = choose_threshold(val_labels, val_probabilities)
    val_predicted = val_probabilities >= threshold
    val_truth = np.asarray(val_labels, dtype=bool)
    val_balanced_accuracy = float(
        (val_predicted[val_truth].mean() + (~val_predicted[~val_truth]).mean()) / 2.0
    )
    from wsitk.shared.models.ood import fit_reference

    # the summary of the training tiles, calibrated on the validation bags (tiles rendered apart)
    ood = fit_reference(embedded["train"].values(), val_bags)
    model_version = f"gamil-synthetic-v1-{state_dict_sha256(trained.model)[:8]}"
    training = {
        "tile_source": tile_source,
        "train_bags": len(train_bags),
        "val_bags": len(val_bags),
        "train_tiles_rendered": sum(recipe.train_pool),
        "val_tiles_rendered": sum(recipe.val_pool),
        "epochs_run": len(trained.history),
        "best_epoch": trained.best_epoch,
        "train_auc": round(train_auc, 4),
        "val_auc": round(val_auc, 4),
        "threshold_from": "validation bags (best balanced accuracy)",
        "val_balanced_accuracy": round(val_balanced_accuracy, 4),
    }
    progress(
        f"[models]   {model_version}: train AUC {train_auc:.3f}, validation AUC {val_auc:.3f}, "
        f"threshold {threshold:.3f} (validation balanced accuracy {val_balanced_accuracy:.3f})"
    )
    mil = export_mil(
        trained.model,
        model_dir / MIL_FILE,
        in_dim=backbone.output_dim,
        model_version=model_version,
        backbone_id=backbone.backbone_id,
        threshold=threshold,
        extra_meta={
            "training": training,
            "data": "synthetic tiles only; not validated on real slides",
            "ood": ood.to_dict(),
        },
        seed=seed,
    )
    training["seconds"] = round(time.perf_counter() - started, 1)
    manifest: dict[str, Any] = {
        "recipe": wanted,
        "backbone": {
            "path": backbone_file,
            "encoder": encoder,
            "sha256": backbone.sha256,
            "backbone_id": backbone.backbone_id,
            "input_size": backbone.input_size,
            "target_mpp": backbone.target_mpp,
            "output_dim": backbone.output_dim,
            "input_format": backbone.input_format,
            "note": note,
        },
        "mil": {
            "path": MIL_FILE,
            "sha256": mil.sha256,
            "model_version": mil.model_version,
            "backbone_id": mil.backbone_id,
            "threshold": mil.threshold,
            "architecture": mil.architecture,
        },
        "training": training,
    }
    _atomic_write_text(model_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    progress(f"[models] wrote {backbone_file}, {MIL_FILE} and {MANIFEST_FILE} in {training['seconds']} s")
    return manifest


def _export_encoder(
    model_dir: Path,
    encoder: str,
    seed: int,
    recipe: DefaultModelRecipe,
    encoder_recipe: EncoderRecipe | None,
    progress: Callable[[str], object],
) -> tuple[str, BackboneInfo, str]:
    """Export the default models' encoder: (file name in ``model_dir``, its info, a note for the manifest)."""
    from wsitk.shared.models.export import export_backbone
    from wsitk.shared.models.synth_encoder import EncoderRecipe

    backbone_file, weights = BACKBONE_FILE, None
    if encoder == "small-cnn-synth":
        backbone_file = "backbone-small-cnn-synth.onnx"
        weights = _synth_encoder_weights(model_dir, seed, encoder_recipe or EncoderRecipe(), progress)
        progress(f"[models] exporting the small-cnn-synth encoder ({weights.name})")
        note = "small-cnn trained on tissue classes of separate synthetic slides; never saw real tissue"
    else:
        progress(f"[models] exporting the small-cnn baseline encoder (random weights, seed {seed})")
        note = "baseline CNN with seeded random weights, not a pathology-pretrained encoder"
    backbone = export_backbone(
        "small-cnn",
        model_dir / backbone_file,
        weights=weights,
        input_size=recipe.input_size,
        target_mpp=recipe.target_mpp,
        seed=seed,
        input_format=recipe.encoder_input_format,
    )
    return backbone_file, backbone, note


def _synth_encoder_weights(
    model_dir: Path, seed: int, recipe: EncoderRecipe, progress: Callable[[str], object]
) -> Path:
    """The trained ``small-cnn-synth`` weights in ``model_dir``: kept when their report names this recipe
    and seed, trained (about ten minutes on two cores with the default recipe) otherwise."""
    from wsitk.shared.models.synth_encoder import train_synth_encoder

    weights = model_dir / SYNTH_ENCODER_WEIGHTS
    try:
        report = json.loads(weights.with_suffix(".json").read_text())
        if (
            weights.is_file()
            and report.get("seed") == seed
            and report.get("recipe") == json.loads(json.dumps(asdict(recipe)))
        ):
            progress(f"[models] {weights.name} was trained with this recipe; reusing it")
            return weights
    except (OSError, json.JSONDecodeError):
        pass
    progress("[models] training the small-cnn-synth encoder on separate synthetic slides")
    train_synth_encoder(weights, seed=seed, recipe=recipe, progress=progress)
    return weights
