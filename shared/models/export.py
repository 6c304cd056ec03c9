"""Export torch models to ONNX with their contract as metadata, and prove the export agrees with torch.

``export_backbone`` turns a registered backbone (``backbones.BACKBONES``) or any ``package.module:Factory``
plus an optional local weights file into an ONNX tile encoder; ``export_mil`` does the same for a trained
MIL model. Both write to a temporary file beside the target, check ONNX Runtime's output against torch's on
realistic inputs, and only then move the file into place, so a model file that exists is one that passed.

The legacy TorchScript exporter (``dynamo=False``) is used on purpose: the newer torch.export-based one needs
the ``onnxscript`` package, which this project does not install. torch marks the legacy path deprecated;
its ``DeprecationWarning`` is silenced here, where that choice is made.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from wsitk.shared.models.backbones import BACKBONES, load_state_dict_file
from wsitk.shared.models.encoders import ENCODERS, build_encoder
from wsitk.shared.models.runtime import create_session, preprocess_tiles, sha256_file

OPSET = 17
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FP32_TOLERANCE = 1e-3  # max |onnx - torch| relative to max |torch|
FP16_TOLERANCE = 5e-2
MIL_CHECK_SIZES = (1, 5, 5000)
INPUT_FORMATS = ("float32-nchw", "uint8-nhwc")
# Above this many bytes of parameters the weights go to one ``<model>.onnx.data`` file beside the graph
# (a protobuf cannot exceed 2 GiB: Virchow2, UNI2-h, H-optimus and Prov-GigaPath in fp32 are larger).
EXTERNAL_DATA_BYTES = 1_500_000_000


class ExportValidationError(RuntimeError):
    """The ONNX model disagrees with the torch model beyond tolerance; the file was not written."""


@dataclass(frozen=True)
class BackboneInfo:
    """What was exported, and how closely ONNX Runtime reproduces torch on it."""

    path: Path
    name: str
    backbone_id: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    target_mpp: float
    output_dim: int
    weights_source: str
    weights_sha256: str
    fp16: bool
    input_format: str
    architecture: str
    seed: int
    weights_state_sha256: str
    sha256: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    validation_tiles: int
    encoder: str = ""
    tile_size: int = 0
    external_data: str = ""

    def metadata(self) -> dict[str, Any]:
        """The ONNX metadata of the file, as ``runtime.read_model_metadata`` reads it back."""
        decoded: dict[str, Any] = json.loads(json.dumps(_backbone_metadata(asdict(self))))
        return decoded


@dataclass(frozen=True)
class MilInfo:
    path: Path
    model_version: str
    backbone_id: str
    in_dim: int
    threshold: float
    architecture: dict[str, Any]
    sha256: str
    max_abs_diff_probability: float
    max_rel_diff_attention: float
    checked_bag_sizes: tuple[int, ...]
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _backbone_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "backbone_id",
        "input_size",
        "mean",
        "std",
        "target_mpp",
        "output_dim",
        "weights_source",
        "weights_sha256",
        "fp16",
        "input_format",
        "architecture",
        "seed",
        "weights_state_sha256",
    )
    metadata = {"kind": "backbone", "metadata_version": 1, **{k: values[k] for k in keys}}
    for optional in ("encoder", "tile_size"):  # registry encoders only: older files stay as they were
        if values.get(optional):
            metadata[optional] = values[optional]
    return metadata


def state_dict_sha256(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, dtypes, shapes, values), independent of files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@contextmanager
def _quiet_legacy_exporter() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


@contextmanager
def _staged_output(out_path: Path) -> Iterator[Path]:
    """A temporary path beside ``out_path``; moved into place only if the block succeeds."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(handle)
    staged = Path(name)
    try:
        yield staged
        os.replace(staged, out_path)
    finally:
        staged.unlink(missing_ok=True)


@contextmanager
def _staged_directory(out_path: Path) -> Iterator[Path]:
    """``DIR/<out name>`` in a temporary directory beside ``out_path``; on success the file, and its
    ``.data`` file when the weights are stored externally, are moved into place (data first)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    staged = directory / out_path.name
    try:
        yield staged
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, out_path.with_name(out_path.name + ".data"))
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _resolve_backbone(
    name_or_import_path: str, weights: Path | None, seed: int, *, input_size: int | None = None
) -> tuple[str, nn.Module]:
    """(short name, module in eval mode) for a registry name or ``package.module:Factory``.

    ``input_size`` fixes a vision transformer's input size (its position embedding is interpolated
    once when the size differs from the stored grid); convolutional networks take any size.
    """
    if name_or_import_path in ENCODERS:
        model = build_encoder(name_or_import_path, weights, seed)
        set_size = getattr(model, "set_input_size", None)
        if input_size is not None and callable(set_size):
            set_size(input_size)
        return name_or_import_path, model
    if name_or_import_path in BACKBONES:
        return name_or_import_path, BACKBONES[name_or_import_path].build(weights, seed)
    if ":" not in name_or_import_path:
        raise ValueError(
            f"unknown backbone {name_or_import_path!r}: use one of {sorted(ENCODERS)} or an import path "
            "'package.module:Factory' whose Factory() returns a torch.nn.Module"
        )
    module_name, _, attribute = name_or_import_path.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(factory):
        raise ValueError(f"{name_or_import_path!r}: {module_name} has no callable {attribute!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name_or_import_path}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        model.load_state_dict(load_state_dict_file(weights))
    short_name = re.sub(r"[^a-z0-9]+", "-", attribute.lower()).strip("-") or "backbone"
    return short_name, model.eval()


class _Float32Interface(nn.Module):
    """Keeps the ONNX interface float32 while the network computes in float16 (``fp16=True``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.half()

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.inner(tiles.half()).float()


class _Uint8Interface(nn.Module):
    """Takes raw uint8 RGB tiles ``[N, S, S, 3]`` and normalises them inside the graph.

    On a GPU this moves a quarter of the bytes across the bus and takes the float arithmetic off the CPU
    threads that decode JPEG; the arithmetic is the same as ``runtime.preprocess_tiles``.
    """

    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(self, inner: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.inner = inner
        std32 = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std32)).reshape(1, 3, 1, 1))
        self.register_buffer("offset", (torch.tensor(mean, dtype=torch.float32) / std32).reshape(1, 3, 1, 1))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        normalised = tiles.permute(0, 3, 1, 2).float() * self.scale - self.offset
        return self.inner(normalised)


def _validation_tiles(input_size: int, target_mpp: float, seed: int) -> np.ndarray:
    """Six realistic uint8 tiles (background, normal, tumour) from the synthetic-slide renderer.

    Tissue-like input exercises the activation ranges the encoder will see, which random noise does not.
    """
    from wsitk.shared.slides.synth import render_patch

    rng = np.random.default_rng(seed)
    kinds = ("background", "normal", "normal", "tumour", "tumour", "normal")
    return np.stack([render_patch(kind, input_size, target_mpp, rng) for kind in kinds]).astype(np.uint8)


def _preprocessing_defaults(
    name: str,
    input_size: int | None,
    tile_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    target_mpp: float | None,
) -> tuple[int, int, Sequence[float], Sequence[float], float]:
    """Unset preprocessing from the encoder registry (ImageNet, 224 px, 0.5 um/px for other modules)."""
    spec = ENCODERS.get(name)
    size = input_size or (spec.input_size if spec else 224)
    if tile_size is None:
        tile_size = spec.tile_size if spec is not None and size == spec.input_size else size
    return (
        size,
        tile_size,
        mean if mean is not None else (spec.mean if spec else IMAGENET_MEAN),
        std if std is not None else (spec.std if spec else IMAGENET_STD),
        target_mpp if target_mpp is not None else (spec.target_mpp if spec else 0.5),
    )


def _parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _save_with_metadata(raw: Path, staged: Path, metadata: Mapping[str, Any], external: bool) -> None:
    """Write the exported graph with its metadata to ``staged``; weights in ``<staged>.data`` if external."""
    model = onnx.load(str(raw))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value)
    if external:
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{staged.name}.data",
            size_threshold=1024,
        )
        onnx.checker.check_model(str(staged))
    else:
        onnx.checker.check_model(model)
        onnx.save(model, str(staged))


def _compare_with_torch(
    path: Path, model_input: np.ndarray, reference: np.ndarray, tolerance: float, name: str
) -> tuple[float, float]:
    """(max abs, max relative) difference of ONNX Runtime (CPU) to torch on batches of all and one."""
    session = create_session(path, prefer=("CPUExecutionProvider",))
    max_abs = 0.0
    for sub_batch, expected in ((model_input, reference), (model_input[:1], reference[:1])):
        (got,) = session.run(["features"], {"tiles": sub_batch})
        if got.shape != expected.shape:
            raise ExportValidationError(f"ONNX output shape {got.shape} != torch {expected.shape}")
        max_abs = max(max_abs, float(np.max(np.abs(got - expected))))
    max_rel = max_abs / max(float(np.max(np.abs(reference))), 1e-12)
    if not max_rel <= tolerance:
        raise ExportValidationError(
            f"ONNX export of {name} differs from torch by {max_rel:.2e} (relative; limit "
            f"{tolerance:.0e}); the file was not written. A custom layer may not export faithfully: "
            f"check it with opset {OPSET}, or export without fp16"
        )
    return max_abs, max_rel


def export_backbone(
    name_or_import_path: str,
    out_path: Path,
    *,
    weights: Path | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    target_mpp: float | None = None,
    tile_size: int | None = None,
    fp16: bool = False,
    input_format: str = "float32-nchw",
    seed: int = 0,
) -> BackboneInfo:
    """Export a tile encoder to ONNX (input ``tiles`` float32 [N,3,S,S], output ``features`` [N,D]).

    ``name_or_import_path``: an encoder of the registry (``encoders.ENCODERS``: UNI, UNI2-h, Virchow2,
    H-optimus-0/1, Prov-GigaPath, Phikon-v2, CONCH v1.5, ResNet50, the small CNN) or ``module:Factory``.
    ``weights`` is a local checkpoint (nothing is ever downloaded), checked strictly against the
    encoder's layout; without it the seeded random initialisation is exported, which is what the
    ``small-cnn`` baseline is meant to be. Unset ``input_size``, ``tile_size``, ``mean``, ``std`` and
    ``target_mpp`` come from the registry (224 px, ImageNet, 0.5 um/px for a module outside it). The
    ``backbone_id`` hashes the weights *and* the preprocessing (size, mean, std, MPP, precision), because
    any of them changes the embeddings. ``fp16=True`` makes the network compute in half precision behind a
    float32 interface: worth it on a GPU; ONNX Runtime's CPU provider runs it too, but about 30 % slower
    than fp32 (measured with ``small-cnn``). ``input_format="uint8-nhwc"`` puts the normalisation in the
    graph, so the model takes raw uint8 tiles (the best choice for a GPU). The export
    is checked on the CPU provider against the float32 torch model with batches of 6 and 1 (the batch axis
    is dynamic) on tissue-like tiles, and refused above a relative error of 1e-3 (fp32) or 5e-2 (fp16);
    ``max_abs_diff`` and ``max_rel_diff`` of the result report the agreement. Models with more than
    ``EXTERNAL_DATA_BYTES`` of weights keep them in ``<out>.data`` beside the graph.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    size, tile_px, mean, std, mpp = _preprocessing_defaults(
        name_or_import_path, input_size, tile_size, mean, std, target_mpp
    )
    if size < 16:
        raise ValueError(f"input_size {size} is too small for a tile encoder")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need three values per RGB channel, std > 0; got {mean}, {std}")
    mean3 = (float(mean[0]), float(mean[1]), float(mean[2]))
    std3 = (float(std[0]), float(std[1]), float(std[2]))
    name, model = _resolve_backbone(name_or_import_path, weights, seed, input_size=size)
    weights_digest = state_dict_sha256(model)
    preprocessing: dict[str, Any] = {
        "input_size": size,
        "mean": mean3,
        "std": std3,
        "target_mpp": mpp,
        "fp16": fp16,
    }
    if input_format != "float32-nchw":  # only then, so that earlier exports keep their ids
        preprocessing["input_format"] = input_format
    if tile_px != size:  # tiles cut at another size and resized change the embeddings
        preprocessing["tile_size"] = tile_px
    fingerprint = hashlib.sha256(f"{weights_digest}|{json.dumps(preprocessing)}".encode()).hexdigest()
    if weights is not None:
        weights_source, weights_sha256 = Path(weights).name, sha256_file(weights)
    else:
        weights_source, weights_sha256 = f"random-init(seed={seed})", weights_digest

    tiles = _validation_tiles(size, mpp, seed)
    batch = preprocess_tiles(tiles, size, mean3, std3)
    with torch.no_grad():
        reference = model(torch.from_numpy(batch)).numpy()
    if reference.ndim != 2:
        raise ValueError(
            f"backbone {name} returns shape {reference.shape}; a tile encoder must return [N, D]"
        )
    exported: nn.Module = _Float32Interface(copy.deepcopy(model)) if fp16 else model
    model_input = batch
    if input_format == "uint8-nhwc":
        exported, model_input = _Uint8Interface(exported, mean3, std3).eval(), tiles
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    external = _parameter_bytes(exported) > EXTERNAL_DATA_BYTES

    out_path = Path(out_path)
    with _staged_directory(out_path) as staged:
        raw = staged.with_name("raw.onnx")
        with _quiet_legacy_exporter(), torch.no_grad():
            torch.onnx.export(
                exported,
                (torch.from_numpy(model_input[:2]),),
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                input_names=["tiles"],
                output_names=["features"],
                dynamic_axes={"tiles": {0: "batch"}, "features": {0: "batch"}},
            )
        info_values: dict[str, Any] = {
            "path": out_path,
            "name": name,
            "backbone_id": f"{name}-{fingerprint[:12]}",
            "input_size": size,
            "mean": mean3,
            "std": std3,
            "target_mpp": float(mpp),
            "output_dim": int(reference.shape[1]),
            "weights_source": weights_source,
            "weights_sha256": weights_sha256,
            "fp16": fp16,
            "input_format": input_format,
            "architecture": name_or_import_path,
            "seed": seed,
            "weights_state_sha256": weights_digest,
            "encoder": name_or_import_path if name_or_import_path in ENCODERS else "",
            "tile_size": tile_px,
            "external_data": f"{out_path.name}.data" if external else "",
        }
        _save_with_metadata(raw, staged, _backbone_metadata(info_values), external)
        for leftover in staged.parent.iterdir():  # the exporter's per-tensor files of a large model
            if leftover.name not in {staged.name, f"{staged.name}.data"}:
                leftover.unlink()
        max_abs, max_rel = _compare_with_torch(staged, model_input, reference, tolerance, name)
    return BackboneInfo(
        **info_values,
        sha256=sha256_file(out_path),
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        tolerance=tolerance,
        validation_tiles=len(tiles),
    )


class _MilInterface(nn.Module):
    """The scorer's view of a MIL model: ``features [N, D] -> (probability [1], attention [N])``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, attention = self.model(features)
        return torch.sigmoid(logit).reshape(1), attention


def _mil_architecture(model: nn.Module) -> dict[str, Any]:
    """The model's own description (``MilAggregator.architecture()``, ``MilEnsemble.architecture()``).

    It names the aggregator and its hyper-parameters, so ``aggregators.build_aggregator(**description)``
    rebuilds the shape; a module without ``architecture()`` is described by its class name only.
    """
    describe = getattr(model, "architecture", None)
    if callable(describe):
        description = describe()
        if isinstance(description, Mapping) and "name" in description:
            return dict(description)
    return {"name": type(model).__name__}


def export_mil(
    model: nn.Module,
    out_path: Path,
    *,
    in_dim: int,
    model_version: str,
    backbone_id: str,
    threshold: float = 0.5,
    extra_meta: Mapping[str, Any] | None = None,
    check_sizes: Sequence[int] = MIL_CHECK_SIZES,
    seed: int = 0,
) -> MilInfo:
    """Export a MIL model (``forward(features [N, D]) -> (logit, attention [N])``) for the mil-scorer.

    ONNX input ``features`` float32 [N, D] with dynamic N; outputs ``probability`` float32 [1] (P(tumour))
    and ``attention`` float32 [N]. ``threshold`` (chosen on validation data) and ``model_version`` travel
    in the metadata with ``backbone_id``, so the scorer can refuse features from another encoder.
    ``extra_meta`` adds JSON-serialisable entries (training summary, data description). The export is
    checked against torch for each bag size in ``check_sizes`` (1, 5 and 5,000 tiles by default).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability, got {threshold}")
    reserved = {
        "kind",
        "metadata_version",
        "model_version",
        "backbone_id",
        "in_dim",
        "threshold",
        "architecture",
    }
    extra = dict(extra_meta or {})
    if reserved & extra.keys():
        raise ValueError(f"extra_meta may not override {sorted(reserved & extra.keys())}")
    model = model.eval()
    architecture = _mil_architecture(model)
    metadata = {
        "kind": "mil",
        "metadata_version": 1,
        "model_version": model_version,
        "backbone_id": backbone_id,
        "in_dim": in_dim,
        "threshold": float(threshold),
        "architecture": architecture,
        **extra,
    }
    rng = np.random.default_rng(seed)
    center = getattr(model, "feature_mean", torch.zeros(in_dim)).numpy()
    spread = 1.0 / getattr(model, "feature_scale", torch.ones(in_dim)).numpy()
    wrapper = _MilInterface(model).eval()
    out_path = Path(out_path)
    with _staged_output(out_path) as staged:
        example = torch.from_numpy((center + spread * rng.standard_normal((7, in_dim))).astype(np.float32))
        with _quiet_legacy_exporter(), torch.no_grad():
            torch.onnx.export(
                wrapper,
                (example,),
                str(staged),
                dynamo=False,
                opset_version=OPSET,
                input_names=["features"],
                output_names=["probability", "attention"],
                dynamic_axes={"features": {0: "tiles"}, "attention": {0: "tiles"}},
            )
        _write_metadata(staged, metadata)
        session = create_session(staged, prefer=("CPUExecutionProvider",))
        max_prob, max_attention = 0.0, 0.0
        for size in check_sizes:
            bag = (center + spread * rng.standard_normal((size, in_dim))).astype(np.float32)
            with torch.no_grad():
                want_prob, want_attention = (t.numpy() for t in wrapper(torch.from_numpy(bag)))
            got_prob, got_attention = session.run(["probability", "attention"], {"features": bag})
            if got_prob.shape != (1,) or got_attention.shape != (size,):
                raise ExportValidationError(
                    f"ONNX MIL outputs have shapes {got_prob.shape}, {got_attention.shape} for {size} tiles; "
                    f"expected (1,), ({size},)"
                )
            max_prob = max(max_prob, float(np.max(np.abs(got_prob - want_prob))))
            relative = np.max(np.abs(got_attention - want_attention)) / max(
                float(np.max(want_attention)), 1e-30
            )
            max_attention = max(max_attention, float(relative))
        if not (max_prob <= 1e-4 and max_attention <= FP32_TOLERANCE):
            raise ExportValidationError(
                f"ONNX MIL export differs from torch: probability by {max_prob:.2e} (limit 1e-4), "
                f"attention by {max_attention:.2e} relative (limit {FP32_TOLERANCE:.0e}); "
                "the file was not written"
            )
        del session
    return MilInfo(
        path=out_path,
        model_version=model_version,
        backbone_id=backbone_id,
        in_dim=in_dim,
        threshold=float(threshold),
        architecture=architecture,
        sha256=sha256_file(out_path),
        max_abs_diff_probability=max_prob,
        max_rel_diff_attention=max_attention,
        checked_bag_sizes=tuple(check_sizes),
        extra_meta=extra,
    )
