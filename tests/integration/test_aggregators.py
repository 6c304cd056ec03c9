"""MIL aggregators (gated attention, CLAM-SB, DSMIL, TransMIL), fold ensembles and the resumable trainer.

Everything runs for real: torch training on toy bags, the legacy ONNX exporter and ONNX Runtime's CPU
provider. Toy bags: normal tiles ~ N(0, 1) in 16 dimensions; a tumour bag also holds 5-10 % tiles shifted
by +3 in four dimensions, so a model must find a few tiles among many, as on a slide.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from wsitk.shared.models.aggregators import (
    AGGREGATORS,
    DSMIL,
    ClamSB,
    MilEnsemble,
    build_aggregator,
)
from wsitk.shared.models.export import export_mil
from wsitk.shared.models.mil import (
    EpochRecord,
    GatedAttentionMIL,
    MilAggregator,
    TrainedMil,
    binary_auc,
    predict_bags,
    train_mil,
)
from wsitk.shared.models.runtime import MilRunner

NAMES = ("gated-attention", "clam-sb", "dsmil", "transmil")  # test_transmil.py: what is its own
DIM = 16


def _toy_bags(
    count: int, seed: int, sizes: tuple[int, int] = (30, 80)
) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
    """(bags, labels, tumour-tile masks); labels alternate normal / tumour."""
    rng = np.random.default_rng(seed)
    bags, labels, masks = [], [], []
    for index in range(count):
        label = index % 2
        size = int(rng.integers(*sizes))
        bag = rng.standard_normal((size, DIM))
        mask = np.zeros(size, dtype=bool)
        if label:
            tumour = max(2, round(size * rng.uniform(0.05, 0.10)))
            mask[:tumour] = True
            bag[:tumour, :4] += 3.0
        order = rng.permutation(size)
        bags.append(bag[order].astype(np.float32))
        labels.append(label)
        masks.append(mask[order])
    return bags, labels, masks


TRAIN = _toy_bags(40, seed=0)
VAL = _toy_bags(12, seed=1)
TEST = _toy_bags(20, seed=2)


@functools.cache
def _trained(name: str) -> TrainedMil:
    """One model per aggregator, shared by the tests that only read it."""
    return train_mil(
        TRAIN[0],
        TRAIN[1],
        epochs=10,
        lr=1e-3,
        seed=0,
        val_bags=VAL[0],
        val_labels=VAL[1],
        architecture=name,
        arch_options={"hidden": 32},
    )


def _state_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("name", NAMES)
def test_registry_builds_each_aggregator_and_rebuilds_it_from_its_description(name: str) -> None:
    model = build_aggregator(name, 12, hidden=24, dropout=0.1)
    assert isinstance(model, AGGREGATORS[name]) and isinstance(model, MilAggregator)
    description = model.architecture()
    assert description["in_dim"] == 12 and description["hidden"] == 24 and description["dropout"] == 0.1
    rebuilt = build_aggregator(**description)
    assert type(rebuilt) is type(model) and rebuilt.architecture() == description
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    assert {key: tensor.shape for key, tensor in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())  # identical shape: the weights fit


def test_gated_attention_keeps_its_exported_name_which_the_registry_accepts() -> None:
    model = build_aggregator("gated-attention", 8, hidden=16, attn_dim=4)
    assert isinstance(model, GatedAttentionMIL)
    assert model.architecture() == {
        "name": "gated-attention-mil",
        "in_dim": 8,
        "hidden": 16,
        "attn_dim": 4,
        "dropout": 0.25,
    }
    assert isinstance(build_aggregator(**model.architecture()), GatedAttentionMIL)


def test_unknown_names_and_options_are_refused_with_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"unknown MIL aggregator 'perceiver'; choose one of gated-attention, "
    ):
        build_aggregator("perceiver", 8)
    with pytest.raises(ValueError, match=r"'dsmil' has no option \['attn_dim'\]; its options are \['hidden'"):
        build_aggregator("dsmil", 8, attn_dim=4)
    with pytest.raises(ValueError, match="unknown MIL aggregator 'abmil'"):
        train_mil(TRAIN[0][:4], TRAIN[1][:4], epochs=1, architecture="abmil")
    with pytest.raises(ValueError, match="given both as keyword arguments and in arch_options"):
        train_mil(TRAIN[0][:4], TRAIN[1][:4], epochs=1, hidden=8, arch_options={"hidden": 16})
    with pytest.raises(ValueError, match="may not set"):
        train_mil(TRAIN[0][:4], TRAIN[1][:4], epochs=1, arch_options={"in_dim": 3})


@pytest.mark.parametrize("name", NAMES)
def test_aggregator_learns_toy_bags_and_attends_to_tumour_tiles(name: str) -> None:
    trained = _trained(name)
    assert type(trained.model) is AGGREGATORS[name] and not trained.model.training
    assert trained.history[-1].val_auc is not None
    test_bags, test_labels, test_masks = TEST
    assert binary_auc(test_labels, predict_bags(trained.model, test_bags)) >= 0.9
    with torch.no_grad():
        for bag, label, mask in zip(test_bags, test_labels, test_masks, strict=True):
            _, attention = trained.model(torch.from_numpy(bag))
            assert attention.shape == (len(bag),) and bool((attention >= 0).all())
            assert abs(float(attention.sum()) - 1.0) < 1e-5
            if label:  # the most-attended tile of a tumour bag is a tumour tile
                assert mask[int(attention.argmax())]


@pytest.mark.parametrize("name", NAMES)
def test_aggregator_exports_to_onnx_that_matches_torch_for_any_bag_size(name: str, tmp_path: Path) -> None:
    model = _trained(name).model
    info = export_mil(model, tmp_path / "mil.onnx", in_dim=DIM, model_version="t-1", backbone_id="b")
    assert info.checked_bag_sizes == (1, 5, 5000)  # export_mil compared ONNX with torch at these sizes
    assert info.architecture == model.architecture()
    runner = MilRunner(tmp_path / "mil.onnx")
    assert runner.metadata["architecture"] == model.architecture()
    for bag in (TEST[0][1][:1], TEST[0][1]):  # one tile, and a tumour bag
        with torch.no_grad():
            logit, attention = model(torch.from_numpy(bag))
        probability, got_attention = runner.score(bag)
        assert abs(probability - torch.sigmoid(logit).item()) < 1e-5
        np.testing.assert_allclose(got_attention, attention.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_fold_ensemble_averages_member_probabilities_and_exports(name: str, tmp_path: Path) -> None:
    bags, labels, _ = TRAIN
    folds = np.arange(len(bags)) % 3
    members = [
        train_mil(
            [bag for bag, f in zip(bags, folds, strict=True) if f != fold],
            [label for label, f in zip(labels, folds, strict=True) if f != fold],
            epochs=3,
            lr=1e-3,
            seed=fold,
            architecture=name,
            arch_options={"hidden": 16},
        ).model
        for fold in range(3)
    ]
    ensemble = MilEnsemble(members).eval()
    assert ensemble.architecture() == {
        "name": "ensemble",
        "members": [member.architecture() for member in members],
        "combine": "mean-probability",
    }
    member_probabilities = np.stack([predict_bags(member, TEST[0]) for member in members])
    assert np.ptp(member_probabilities, axis=0).max() > 1e-3  # the folds differ, so the mean means something
    np.testing.assert_allclose(predict_bags(ensemble, TEST[0]), member_probabilities.mean(axis=0), atol=1e-6)

    bag = torch.from_numpy(TEST[0][1])
    with torch.no_grad():
        _, attention = ensemble(bag)
        member_attention = torch.stack([member(bag)[1] for member in members]).mean(dim=0)
    torch.testing.assert_close(attention, member_attention)
    assert abs(float(attention.sum()) - 1.0) < 1e-5

    info = export_mil(ensemble, tmp_path / "ensemble.onnx", in_dim=DIM, model_version="e-1", backbone_id="b")
    assert info.architecture["name"] == "ensemble" and len(info.architecture["members"]) == 3
    runner = MilRunner(tmp_path / "ensemble.onnx")
    for index in (0, 1):
        probability, _ = runner.score(TEST[0][index])
        assert abs(probability - member_probabilities[:, index].mean()) < 1e-5
    assert runner.score(TEST[0][1][:1])[1].shape == (1,)


def test_ensemble_stays_finite_with_confident_members_and_refuses_mixed_architectures() -> None:
    torch.manual_seed(0)
    sure_tumour, sure_normal = GatedAttentionMIL(DIM, hidden=8), GatedAttentionMIL(DIM, hidden=8)
    with torch.no_grad():
        sure_tumour.classifier.bias.fill_(200.0)
        sure_normal.classifier.bias.fill_(-200.0)
    ensemble = MilEnsemble([sure_tumour, sure_normal]).eval()
    with torch.no_grad():
        logit, _ = ensemble(torch.from_numpy(TEST[0][0]))
    assert abs(float(logit)) < 1e-3  # mean of ~1 and ~0 is 1/2, not inf - inf
    with pytest.raises(ValueError, match="share one architecture"):
        MilEnsemble([GatedAttentionMIL(DIM, hidden=8), DSMIL(DIM, hidden=8)])
    with pytest.raises(ValueError, match="at least one member"):
        MilEnsemble([])


@pytest.mark.parametrize("name", NAMES)
def test_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_run(
    name: str, tmp_path: Path
) -> None:
    bags, labels, _ = _toy_bags(16, seed=3, sizes=(10, 40))
    settings: dict[str, Any] = {
        "epochs": 6,
        "lr": 1e-3,
        "seed": 4,
        "val_bags": VAL[0],
        "val_labels": VAL[1],
        "max_tiles_per_bag": 25,  # sub-sampling draws from the numpy stream
        "architecture": name,
        "arch_options": {"hidden": 16, "dropout": 0.5},  # dropout draws from the torch stream
    }
    uninterrupted = train_mil(bags, labels, **settings)

    checkpoint = tmp_path / "fold0.ckpt"

    class Interrupt(Exception):
        pass

    def stop_after_three(record: EpochRecord) -> None:
        if record.epoch == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_mil(bags, labels, **settings, on_epoch=stop_after_three, checkpoint_path=checkpoint)
    assert checkpoint.is_file() and [p.name for p in tmp_path.iterdir()] == ["fold0.ckpt"]

    seen: list[EpochRecord] = []
    resumed = train_mil(bags, labels, **settings, on_epoch=seen.append, checkpoint_path=checkpoint)
    assert resumed.resumed_from_epoch == 3 and [record.epoch for record in seen] == [4, 5, 6]
    assert resumed.history == uninterrupted.history and resumed.best_epoch == uninterrupted.best_epoch
    assert _state_equal(resumed.model, uninterrupted.model)

    seen.clear()  # a finished run returns at once with the same result
    again = train_mil(bags, labels, **settings, on_epoch=seen.append, checkpoint_path=checkpoint)
    assert seen == [] and _state_equal(again.model, uninterrupted.model)

    with pytest.raises(ValueError, match=r"different training run \(it differs in lr\)"):
        train_mil(bags, labels, **{**settings, "lr": 2e-3}, checkpoint_path=checkpoint)
    with pytest.raises(ValueError, match="differs in data_sha256"):
        train_mil(bags[::-1], labels[::-1], **settings, checkpoint_path=checkpoint)


def test_clam_instance_loss_trains_the_bag_class_instance_classifier() -> None:
    bag = torch.from_numpy(TEST[0][1])

    def gradients(bag_weight: float, target: float, tiles: torch.Tensor = bag) -> list[torch.Tensor | None]:
        torch.manual_seed(0)
        model = ClamSB(DIM, hidden=16, k_sample=4, bag_weight=bag_weight, dropout=0.0)
        model.bag_loss(tiles, target, 1.0).backward()
        return [classifier.weight.grad for classifier in model.instance_classifiers]

    normal_grad, tumour_grad = gradients(0.7, 1.0)
    assert normal_grad is None and tumour_grad is not None and float(tumour_grad.abs().sum()) > 0
    normal_grad, tumour_grad = gradients(0.7, 0.0)
    assert tumour_grad is None and normal_grad is not None and float(normal_grad.abs().sum()) > 0
    _, tumour_grad = gradients(1.0, 1.0)  # bag loss only: the instance term gets no weight
    assert tumour_grad is not None and float(tumour_grad.abs().sum()) == 0.0
    assert gradients(0.7, 1.0, bag[:1]) == [None, None]  # one tile: no top-k and bottom-k to contrast

    torch.manual_seed(0)
    model = ClamSB(DIM, hidden=16, k_sample=4, dropout=0.0)
    logit, attention = model(bag)
    hidden = model.embed(model.standardise(bag))
    expected = 0.7 * torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor(1.0))
    expected = expected + 0.3 * model.instance_loss(hidden, attention, 1, 4)
    torch.testing.assert_close(model.bag_loss(bag, 1.0, 2.0), 2.0 * expected)


def test_dsmil_scores_with_both_streams() -> None:
    torch.manual_seed(0)
    model = DSMIL(DIM, hidden=16, q_dim=8).eval()
    bag = torch.from_numpy(TEST[0][1])
    with torch.no_grad():
        max_logit, bag_logit, attention = model.streams(bag)
        logit, forward_attention = model(bag)
        instance_logits = model.instance_classifier(model.embed(model.standardise(bag))).squeeze(-1)
        loss = model.bag_loss(bag, 1.0, 1.0)
    torch.testing.assert_close(max_logit, instance_logits.max())
    torch.testing.assert_close(logit, (max_logit + bag_logit) / 2)
    torch.testing.assert_close(forward_attention, attention)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(
        loss, 0.5 * bce(max_logit, torch.tensor(1.0)) + 0.5 * bce(bag_logit, torch.tensor(1.0))
    )


def test_class_weighting_can_be_switched_off() -> None:
    bags, labels, _ = TRAIN

    def weights(bag_indices: list[int], class_weighting: bool) -> dict[str, torch.Tensor]:
        chosen_bags = [bags[i] for i in bag_indices]
        chosen_labels = [labels[i] for i in bag_indices]
        trained = train_mil(
            chosen_bags, chosen_labels, epochs=1, lr=1e-3, class_weighting=class_weighting, hidden=8
        )
        return trained.model.state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[key], b[key]) for key in a)

    balanced = list(range(8))  # four of each class: inverse-frequency weights are 1 anyway
    assert same(weights(balanced, True), weights(balanced, False))
    unbalanced = [0, 1, 2, 4, 6, 8, 10, 12]  # one tumour bag, seven normal ones
    assert not same(weights(unbalanced, True), weights(unbalanced, False))
