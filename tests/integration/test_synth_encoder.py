"""``small-cnn-synth`` (shared/models/synth_encoder.py): tiles labelled by the generator's layout, an
encoder that learns the tissue classes, and the default models built on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from wsitk.shared.models.defaults import DefaultModelRecipe, init_default_models
from wsitk.shared.models.runtime import BackboneRunner
from wsitk.shared.models.synth_encoder import (
    CLASSES,
    PRETRAIN_SEED_BASE,
    STAIN_MATRIX,
    EncoderRecipe,
    _augment,
    _grey_axis_rotations,
    class_grid,
    pretraining_spec,
    render_labelled_tiles,
    tile_windows,
    train_synth_encoder,
    unseen_lab,
)

pytestmark = pytest.mark.integration

TINY = EncoderRecipe(slides=3, val_slides=1, tiles_per_class=12, epochs=3, batch_size=32, workers=1)


def test_a_window_takes_the_class_of_most_of_its_cells_or_none() -> None:
    grid = np.full((40, 40), -1, np.int8)
    grid[:, :20] = CLASSES.index("normal")
    grid[:, 20:] = CLASSES.index("tumour")
    windows = tile_windows(grid, 16.0, 40 * 16, 40 * 16, purity=0.7)  # 14 cells per 224 px window
    by_x = {x0: label for x0, y0, label in windows if y0 == 0}
    assert by_x[0] == CLASSES.index("normal")  # cells 0-13: all normal
    assert by_x[112] == CLASSES.index("normal")  # cells 7-20: 13 of 14 columns normal
    assert 224 not in by_x  # cells 14-27: 6 normal, 8 tumour columns: no class reaches 70 %
    assert by_x[336] == CLASSES.index("tumour")  # cells 21-34
    assert all(x0 + 224 <= 640 and y0 + 224 <= 640 for x0, y0, _ in windows)


def test_pretraining_slides_hold_every_class_and_seeds_of_their_own() -> None:
    from wsitk.shared.slides.synth.layout import build_layout

    spec = pretraining_spec(0, 0, EncoderRecipe())
    assert spec.seed >= PRETRAIN_SEED_BASE and spec.look.jpeg_quality is not None
    layout = build_layout(spec)
    labels = {
        label
        for _, _, label in tile_windows(class_grid(layout), layout.downsample, spec.width, spec.height, 0.7)
    }
    assert labels == set(range(len(CLASSES)))
    assert pretraining_spec(1, 0, EncoderRecipe()).tumour_look != spec.tumour_look


def test_rendered_tiles_look_like_their_class() -> None:
    tiles, labels = render_labelled_tiles(0, 0, EncoderRecipe(tiles_per_class=6))
    assert tiles.shape == (len(labels), 224, 224, 3) and tiles.dtype == np.uint8
    assert np.bincount(labels, minlength=len(CLASSES)).tolist() == [6] * len(CLASSES)
    brightness = {c: float(tiles[labels == i].mean()) for i, c in enumerate(CLASSES)}
    # fat is mostly empty vacuoles, lymphoid aggregates are packed with dark nuclei
    assert brightness["fat"] > brightness["normal"] > brightness["lymphoid"], brightness


def test_stain_augmentation_turns_hues_about_grey_and_changes_each_stain_on_its_own() -> None:
    import torch

    rotations = _grey_axis_rotations(torch.deg2rad(torch.tensor([0.0, 20.0, -20.0])))
    grey = torch.ones(3)
    for rotation in rotations:
        assert torch.allclose(rotation @ grey, grey, atol=1e-6)  # overall absorption kept
        assert torch.allclose(rotation @ rotation.T, torch.eye(3), atol=1e-6)
    assert torch.allclose(rotations[0], torch.eye(3), atol=1e-6)
    assert not torch.allclose(rotations[1], torch.eye(3), atol=1e-2)
    assert np.allclose(np.linalg.norm(STAIN_MATRIX, axis=1), 1.0)

    tiles, labels = render_labelled_tiles(0, 0, EncoderRecipe(tiles_per_class=2))
    batch = torch.from_numpy(tiles)
    generator = torch.Generator().manual_seed(0)
    out = _augment(batch, generator, EncoderRecipe())
    assert out.shape == (len(labels), 3, 224, 224) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # every tile gets its own colours: mean colour moves, differently per tile
    before = batch.float().mean((1, 2)) / 255.0
    after = out.mean((2, 3))
    moved = (after - before).abs().sum(1)
    assert float(moved.min()) > 0.005 and float((after - before).std(0).max()) > 0.01
    # with nothing to draw (no scaling, no turn) the colours stay close: only the tint and JPEG remain
    still = EncoderRecipe(stain_scale=0.0, hue_deg=0.0, jpeg_quality=(95, 95))
    steady = _augment(batch, torch.Generator().manual_seed(0), still).mean((2, 3))
    assert float((steady - before).abs().max()) < float((after - before).abs().max())
    with pytest.raises(ValueError, match="augment"):
        EncoderRecipe(augment="none")


def test_the_unseen_lab_is_beyond_every_pretraining_look() -> None:
    from wsitk.shared.slides.looks import RANDOM_RANGES
    from wsitk.shared.slides.synth.hard import HELD_OUT_LOOK

    look, shift = unseen_lab()
    assert max(abs(h) for h in look.stain_hue_deg) > RANDOM_RANGES["stain_hue_deg"][1]
    assert look.jpeg_quality is not None and look.jpeg_quality < RANDOM_RANGES["jpeg_quality"][0]
    assert min(look.white_rgb or ()) / max(look.white_rgb or (1.0,)) < RANDOM_RANGES["white_tint"][0]
    assert min(shift) < 0.6 and max(shift) > 1.5  # pretraining slides draw 0.6-1.5
    assert look.stain_hue_deg != HELD_OUT_LOOK.stain_hue_deg and look.white_rgb != HELD_OUT_LOOK.white_rgb
    same, _ = render_labelled_tiles(0, 0, EncoderRecipe(tiles_per_class=2))
    shifted, labels = render_labelled_tiles(0, 0, EncoderRecipe(tiles_per_class=2), unseen=True)
    assert shifted.shape == same.shape and len(labels) == len(same)
    assert float(np.abs(shifted.astype(float).mean((0, 1, 2)) - same.astype(float).mean((0, 1, 2))).max()) > 5


def test_the_trained_encoder_separates_classes_and_builds_the_default_models(tmp_path: Path) -> None:
    report = train_synth_encoder(tmp_path / "enc.pt", seed=3, recipe=TINY, progress=lambda _m: None)
    assert json.loads((tmp_path / "enc.json").read_text()) == report
    assert report["train_tiles"] == dict.fromkeys(CLASSES, 36)
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    # chance is 1/7; three short epochs on 252 tiles already do far better on the unseen slide
    assert report["history"][-1]["val_balanced_accuracy"] > 0.35, report["history"]
    assert report["recipe"]["augment"] == "stain" and 0.0 <= report["unseen_lab"]["balanced_accuracy"] <= 1.0
    assert sum(map(sum, report["unseen_lab"]["confusion"])) == sum(report["val_tiles"].values())

    recipe = DefaultModelRecipe(
        train_bags=8,
        val_bags=4,
        min_tiles_per_bag=6,
        max_tiles_per_bag=10,
        train_pool=(12, 6, 4),
        val_pool=(10, 4, 3),
        epochs=3,
    )
    model_dir = tmp_path / "models"

    def build() -> tuple[dict, list[str]]:
        lines: list[str] = []
        built = init_default_models(
            model_dir,
            seed=3,
            recipe=recipe,
            encoder="small-cnn-synth",
            encoder_recipe=TINY,
            progress=lines.append,
        )
        return built, lines

    manifest, _ = build()
    assert (
        manifest["backbone"]["encoder"] == "small-cnn-synth"
        and manifest["recipe"]["encoder"] == "small-cnn-synth"
    )
    backbone = BackboneRunner(model_dir / manifest["backbone"]["path"])
    assert backbone.backbone_id == manifest["backbone"]["backbone_id"] == manifest["mil"]["backbone_id"]
    baseline = init_default_models(tmp_path / "baseline", seed=3, recipe=recipe, progress=lambda _m: None)
    assert baseline["backbone"]["backbone_id"] != backbone.backbone_id
    assert "encoder" not in baseline["recipe"]  # the baseline's recipe, hence existing installs, unchanged

    again, lines = build()
    assert again == manifest and "nothing to do" in lines[0]
    (model_dir / "mil-default.onnx").unlink()  # rebuilt, but the trained encoder is reused, not retrained
    _, lines = build()
    assert any("reusing" in line for line in lines) and not any(
        "training the small-cnn-synth" in line for line in lines
    )
