"""ONNX Runtime as the embedder and the mil-scorer use it: sessions, model metadata, preprocessing, inference.

This module needs ``onnxruntime``, ``numpy`` and ``pillow`` only (no torch, no ``onnx``), so that the service
images stay small. Every model file carries its own contract as ONNX metadata (``metadata_props``, each
value JSON-encoded, written by ``export.py``):

- backbone: ``kind="backbone"``, ``backbone_id``, ``input_size``, ``mean``, ``std``, ``target_mpp``,
  ``output_dim``, ``weights_source``, ``weights_sha256``, ``fp16``; input ``tiles`` float32 ``[N, 3, S, S]``
  (already normalised), output ``features`` float32 ``[N, D]``.
- MIL: ``kind="mil"``, ``model_version``, ``backbone_id``, ``in_dim``, ``threshold``, ``architecture``;
  input ``features`` float32 ``[N, D]``, outputs ``probability`` float32 ``[1]`` and ``attention``
  float32 ``[N]`` summing to one.

A third-party ONNX encoder works too once those metadata keys are added to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog
from PIL import Image

log = structlog.get_logger(__name__)

DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
_ORT_ERRORS_ONLY = 3  # ORT log severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
_BACKBONE_KEYS = ("backbone_id", "input_size", "mean", "std", "target_mpp", "output_dim")
_MIL_KEYS = ("model_version", "backbone_id", "in_dim", "threshold")


def available_providers() -> list[str]:
    """Execution providers the installed ONNX Runtime offers (``onnxruntime-gpu`` adds CUDA, TensorRT)."""
    return list(ort.get_available_providers())


def create_session(
    path: Path | str,
    prefer: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int | None = None,
    *,
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ort.InferenceSession:
    """Open an ONNX model with the first of ``prefer`` that this runtime offers, falling back in order.

    Providers the installed runtime does not offer are dropped before the session is created, so a CPU-only
    install does not print warnings about a missing CUDA; ONNX Runtime's own log is limited to errors. The
    providers actually used are logged (a CUDA provider that is offered but whose libraries fail to load
    is silently replaced by the next one by ONNX Runtime itself: the log line shows it).
    ``intra_op_threads`` caps the CPU threads of one session (None: ONNX Runtime's default, one per core).
    """
    model_path = Path(path)
    if not model_path.is_file():
        raise FileNotFoundError(
            f"ONNX model {model_path} does not exist; create the default models with "
            "`wsi model init-defaults` or point the service at an exported model file"
        )
    offered = available_providers()
    chosen = [p for p in prefer if p in offered]
    if not chosen:
        raise RuntimeError(
            f"none of the requested execution providers {list(prefer)} is offered by this ONNX Runtime "
            f"(it offers {offered}); add CPUExecutionProvider to the list, or install onnxruntime-gpu "
            "(never beside onnxruntime) for CUDA and TensorRT"
        )
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_ERRORS_ONLY
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    providers: list[str | tuple[str, dict[str, Any]]] = [
        (p, dict(provider_options[p])) if provider_options and p in provider_options else p for p in chosen
    ]
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    log.info(
        "onnx session created", model=model_path.name, providers=session.get_providers(), requested=chosen
    )
    return session


def read_model_metadata(session: ort.InferenceSession) -> dict[str, Any]:
    """The model's ``metadata_props`` with JSON values decoded (a non-JSON value stays a string)."""
    metadata: dict[str, Any] = {}
    for key, raw in session.get_modelmeta().custom_metadata_map.items():
        try:
            metadata[key] = json.loads(raw)
        except json.JSONDecodeError:
            metadata[key] = raw
    return metadata


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require_keys(metadata: Mapping[str, Any], keys: Sequence[str], path: Path, kind: str) -> None:
    found_kind = metadata.get("kind")
    if found_kind is not None and found_kind != kind:
        raise ValueError(f"{path} is a {found_kind!r} model, but a {kind!r} model was expected here")
    missing = [k for k in keys if k not in metadata]
    if missing:
        raise ValueError(
            f"{path} lacks the ONNX metadata {missing} that a {kind} model must carry; export it with "
            f"wsitk.shared.models.export (export_backbone / export_mil) or add these metadata_props"
        )


def preprocess_tiles(
    tiles: np.ndarray, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 RGB tiles ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, S, S]`` for a backbone.

    Tiles of another size are resized with Pillow's antialiased bilinear filter. Resizing changes the
    physical resolution, so the tiler should cut tiles at the model's ``input_size`` and ``target_mpp``;
    the resize is for models whose input size differs from the pipeline profile's tile size.
    """
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be uint8 [N, H, W, 3] RGB; got shape {tiles.shape}")
    if tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 (0-255 RGB); got {tiles.dtype}")
    count, height, width = tiles.shape[:3]
    if height != width:
        raise ValueError(f"tiles must be square to keep their physical aspect; got {height} x {width}")
    if height != input_size:
        resized = np.empty((count, input_size, input_size, 3), dtype=np.uint8)
        for i in range(count):
            image = Image.fromarray(tiles[i])
            resized[i] = np.asarray(image.resize((input_size, input_size), Image.Resampling.BILINEAR))
        tiles = resized
    std32 = np.asarray(std, dtype=np.float32)
    scale: np.ndarray = (1.0 / (255.0 * std32)).astype(np.float32)
    offset: np.ndarray = (np.asarray(mean, dtype=np.float32) / std32).astype(np.float32)
    out = np.empty((count, 3, input_size, input_size), dtype=np.float32)
    np.multiply(tiles.transpose(0, 3, 1, 2), scale[None, :, None, None], out=out)
    out -= offset[None, :, None, None]
    return out


class BackboneRunner:
    """A tile encoder: uint8 tiles in, float32 embeddings out, preprocessing taken from the model file."""

    def __init__(
        self,
        path: Path | str,
        *,
        batch_size: int = 64,
        prefer: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.session = create_session(self.path, prefer, intra_op_threads)
        self.metadata = read_model_metadata(self.session)
        _require_keys(self.metadata, _BACKBONE_KEYS, self.path, "backbone")
        self.backbone_id: str = str(self.metadata["backbone_id"])
        self.input_size: int = int(self.metadata["input_size"])
        self.output_dim: int = int(self.metadata["output_dim"])
        self.target_mpp: float = float(self.metadata["target_mpp"])
        self.mean: tuple[float, ...] = tuple(float(v) for v in self.metadata["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in self.metadata["std"])
        self.sha256: str = sha256_file(self.path)
        model_input = self.session.get_inputs()[0]
        self._input_name = model_input.name
        self._input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self._output_name = self.session.get_outputs()[0].name

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def preprocess(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, S, S]``, resized and normalised as the model expects."""
        return preprocess_tiles(tiles, self.input_size, self.mean, self.std)

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, D]``, in batches of ``batch_size`` (bounded memory)."""
        if tiles.ndim != 4:
            raise ValueError(f"tiles must be uint8 [N, H, W, 3] RGB; got shape {tiles.shape}")
        if len(tiles) == 0:
            return np.zeros((0, self.output_dim), dtype=np.float32)
        parts = []
        for start in range(0, len(tiles), self.batch_size):
            batch = self.preprocess(tiles[start : start + self.batch_size]).astype(
                self._input_dtype, copy=False
            )
            (features,) = self.session.run([self._output_name], {self._input_name: batch})
            parts.append(np.asarray(features, dtype=np.float32))
        return np.concatenate(parts)


class MilRunner:
    """A slide aggregator: tile features ``[N, D]`` in, P(tumour) and attention ``[N]`` out.

    The model is small, so by default it runs on the CPU: copying a bag to a GPU costs more than it saves.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        prefer: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.session = create_session(self.path, prefer, intra_op_threads)
        self.metadata = read_model_metadata(self.session)
        _require_keys(self.metadata, _MIL_KEYS, self.path, "mil")
        self.model_version: str = str(self.metadata["model_version"])
        self.backbone_id: str = str(self.metadata["backbone_id"])
        self.in_dim: int = int(self.metadata["in_dim"])
        self.threshold: float = float(self.metadata["threshold"])
        self.sha256: str = sha256_file(self.path)

    def score(self, features: np.ndarray) -> tuple[float, np.ndarray]:
        """``(P(tumour), attention [N])`` for one bag; float16 features are accepted and widened.

        An empty bag is refused: a slide without tissue tiles needs an explicit outcome, not a score.
        """
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"MIL model {self.model_version} expects features [N, {self.in_dim}]; got shape "
                f"{features.shape} (was the bag embedded with backbone {self.backbone_id}?)"
            )
        if len(features) == 0:
            raise ValueError("cannot score an empty bag; a slide without tiles needs an explicit outcome")
        bag = np.ascontiguousarray(features, dtype=np.float32)
        if not np.isfinite(bag).all():
            raise ValueError("features contain NaN or infinity; the embedding of this slide is corrupt")
        probability, attention = self.session.run(["probability", "attention"], {"features": bag})
        return float(np.asarray(probability).reshape(-1)[0]), np.asarray(attention, dtype=np.float32).reshape(
            -1
        )
