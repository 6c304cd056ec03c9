"""Tile encoders written in the project, in torch, for export to ONNX (``export.export_backbone``).

Two are registered in ``BACKBONES``:

- ``small-cnn``: a six-layer convolutional network with *seeded random weights*. It is a baseline so that
  the pipeline runs out of the box with no weight download, NOT a pathology-pretrained encoder: its
  features are random projections of colour and texture statistics, good enough to tell the synthetic
  tumour texture from normal tissue, and nothing more should be read into them.
- ``resnet50-trunc``: ResNet50 up to and including ``layer3`` followed by global average pooling (1024-d),
  the encoder CLAM uses. Written here because torchvision has no CPU build on this platform; its parameter
  names follow torchvision's ``resnet50`` so that a locally stored ImageNet (or other) state dict loads as is.
  Without a weights file it is randomly initialised, which is only useful for testing the plumbing.

Nothing here downloads anything: weights come from a local file or from the seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block and restore the caller's generator state afterwards.

    Building a model must not change the random stream of whoever builds it (a training loop, a test).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class SmallCNN(nn.Module):
    """Baseline tile encoder with seeded random weights: NOT pathology-pretrained.

    Five 3x3 stride-2 convolutions with ReLU (224 px -> 7 x 7), a 1x1 projection to ``out_dim`` and global
    average pooling. There is no normalisation layer: with random weights a batch-norm in eval mode is an
    identity, so it would only cost time. Kaiming-normal initialisation keeps activations at a usable scale
    through the stack. With ONNX Runtime it embeds about 850 tiles/s of 224 x 224 on two idle CPU cores
    (about 650 tiles per CPU-second on one thread, preprocessing included), so it is never the bottleneck
    of a demo.
    """

    def __init__(self, out_dim: int = 128, *, seed: int = 0) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"SmallCNN out_dim must be positive, got {out_dim}")
        self.out_dim = out_dim
        channels = (3, 16, 32, 64, 128, 128)
        layers: list[nn.Module] = []
        for in_ch, out_ch in itertools.pairwise(channels):
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels[-1], out_dim, kernel_size=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        with seeded_torch(seed):
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(tiles)), 1)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block (stride on the 3x3 convolution), parameter names as in torchvision."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TruncatedResNet50(nn.Module):
    """ResNet50 through ``layer3`` + global average pooling -> 1024-d features, as CLAM uses it.

    ``weights``: a local file holding a torchvision-compatible ``resnet50`` state dict (``torch.save`` of
    ``model.state_dict()``; a ``{"state_dict": ...}`` checkpoint and ``module.`` prefixes are accepted). The
    ``layer4.*`` and ``fc.*`` entries of a full ResNet50 are ignored; any other missing or unexpected key is
    an error, so a wrong file cannot load silently. Without ``weights`` the network is randomly initialised
    (torchvision's scheme, from ``seed``): only useful for testing, its features mean nothing.
    """

    out_dim = 1024
    _IGNORED_PREFIXES = ("layer4.", "fc.")

    def __init__(self, weights: Path | None = None, *, seed: int = 0) -> None:
        super().__init__()
        with seeded_torch(seed):
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, width=64, blocks=3, stride=1)
            self.layer2 = self._make_layer(256, width=128, blocks=4, stride=2)
            self.layer3 = self._make_layer(512, width=256, blocks=6, stride=2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if weights is not None:
            self.load_torchvision_weights(weights)

    @staticmethod
    def _make_layer(in_channels: int, *, width: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_channels, width, stride)]
        layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def load_torchvision_weights(self, weights: Path) -> None:
        """Load a torchvision-named ResNet50 state dict from a local file, ignoring ``layer4`` and ``fc``."""
        state = load_state_dict_file(weights)
        kept = {k: v for k, v in state.items() if not k.startswith(self._IGNORED_PREFIXES)}
        result = self.load_state_dict(kept, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{weights} is not a torchvision-compatible ResNet50 state dict: "
                f"missing keys {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
                f"unexpected keys {result.unexpected_keys[:5]}"
                f"{'...' if len(result.unexpected_keys) > 5 else ''}. Save it with "
                "torch.save(resnet50_model.state_dict(), path)."
            )

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(tiles))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save`` (tensors only: ``weights_only=True``, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; give the path of a local state-dict file"
        )
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


@dataclass(frozen=True)
class BackboneEntry:
    """How to build one registered backbone: ``build(weights, seed)`` returns the module in eval mode."""

    build: Callable[[Path | None, int], nn.Module]
    output_dim: int
    description: str


def _build_small_cnn(weights: Path | None, seed: int) -> nn.Module:
    model = SmallCNN(seed=seed)
    if weights is not None:
        model.load_state_dict(load_state_dict_file(weights))
    return model.eval()


def _build_resnet50_trunc(weights: Path | None, seed: int) -> nn.Module:
    return TruncatedResNet50(weights, seed=seed).eval()


BACKBONES: dict[str, BackboneEntry] = {
    "small-cnn": BackboneEntry(
        _build_small_cnn, 128, "baseline CNN with seeded random weights (not pretrained)"
    ),
    "resnet50-trunc": BackboneEntry(
        _build_resnet50_trunc,
        TruncatedResNet50.out_dim,
        "ResNet50 to layer3 + average pool (CLAM); weights from a local torchvision state dict",
    ),
}
