"""ONNX Runtime as the embedder and the mil-scorer use it: sessions, model metadata, preprocessing, inference.

This module needs ``onnxruntime``, ``numpy`` and ``pillow`` only (no torch, no ``onnx``), so that the service
images stay small. Every model file carries its own contract as ONNX metadata (``metadata_props``, each
value JSON-encoded, written by ``export.py``):

- backbone: ``kind="backbone"``, ``backbone_id``, ``input_size``, ``mean``, ``std``, ``target_mpp``,
  ``output_dim``, ``weights_source``, ``weights_sha256``, ``fp16``; input ``tiles`` either float32
  ``[N, 3, S, S]`` (already normalised) or, for models exported with ``input_format="uint8-nhwc"``, the raw
  uint8 RGB tiles ``[N, S, S, 3]`` with the normalisation inside the graph (4x less data to move to a GPU,
  no float arithmetic on the CPU); output ``features`` float32 ``[N, D]``. Exports from this project also
  carry ``architecture``, ``seed`` and ``weights_state_sha256`` so that the torch backend
  (``torch_backend.py``) can rebuild the same network and prove it is the same.
- MIL: ``kind="mil"``, ``model_version``, ``backbone_id``, ``in_dim``, ``threshold``, ``architecture``;
  input ``features`` float32 ``[N, D]``, outputs ``probability`` float32 ``[1]`` and ``attention``
  float32 ``[N]`` summing to one.

A third-party ONNX encoder works too once those metadata keys are added to it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import structlog
from PIL import Image
from wsitk.shared.cpus import usable_cpus
from wsitk.shared.hashing import sha256_file
from wsitk.shared.models.ood import OodReference

log = structlog.get_logger(__name__)

DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
BACKENDS = ("auto", "onnxruntime", "torch")
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
    ``intra_op_threads`` caps the CPU threads of one session (None: the CPUs this process may use,
    ``wsitk.shared.cpus.usable_cpus``, which honours a container's CPU limit).
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
    # ONNX Runtime's default is one thread per host core, which under a container's CPU limit only
    # adds throttling: size the pool from the CPUs this process may really use.
    options.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else usable_cpus()
    # Idle pool threads sleep instead of spinning: the services share a machine's cores (the embedder's
    # decoding threads, quality-filter beside it), and a spinning pool takes cycles they need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if chosen == ["CPUExecutionProvider"]:
        # The memory pattern pre-plans one block per input shape and keeps it: on the CPU it held 65 MiB
        # more for the small CNN at batch 64, and one more block for each partial batch's shape, at the
        # same CPU per tile (docs/throughput.md, memory). Tensors come from the arena one by one instead.
        options.enable_mem_pattern = False
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
    tiles: np.ndarray,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 RGB tiles ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, S, S]`` for a backbone.

    Tiles of another size are resized with Pillow's antialiased bilinear filter. Resizing changes the
    physical resolution, so the tiler should cut tiles at the model's ``input_size`` and ``target_mpp``;
    the resize is for models whose input size differs from the pipeline profile's tile size. ``out``
    (float32 ``[N, 3, S, S]``, e.g. a slice of a batch) is written in place instead of a new array.
    """
    tiles = resize_tiles(tiles, input_size)
    count = len(tiles)
    std32 = np.asarray(std, dtype=np.float32)
    scale: np.ndarray = (1.0 / (255.0 * std32)).astype(np.float32)
    offset: np.ndarray = (np.asarray(mean, dtype=np.float32) / std32).astype(np.float32)
    if out is None:
        out = np.empty((count, 3, input_size, input_size), dtype=np.float32)
    np.multiply(tiles.transpose(0, 3, 1, 2), scale[None, :, None, None], out=out)
    out -= offset[None, :, None, None]
    return out


class TileEncoder(Protocol):
    """What the embedder needs from a backbone, whichever backend runs it (ONNX Runtime or torch).

    The work is split in two so that the expensive half can overlap the other: ``prepare`` (resize and
    normalise, on CPU threads) writes into a batch array, ``infer`` runs the model on a full batch.
    """

    backbone_id: str
    sha256: str
    input_size: int
    output_dim: int
    batch_size: int

    @property
    def providers(self) -> list[str]: ...

    def batch_array(self, count: int) -> np.ndarray: ...

    def prepare(self, tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def embed(self, tiles: np.ndarray) -> np.ndarray: ...


def resize_tiles(tiles: np.ndarray, input_size: int) -> np.ndarray:
    """Validate uint8 RGB tiles ``[N, H, W, 3]`` and resize them to ``input_size`` if they differ."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be uint8 [N, H, W, 3] RGB; got shape {tiles.shape}")
    if tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 (0-255 RGB); got {tiles.dtype}")
    count, height, width = tiles.shape[:3]
    if height != width:
        raise ValueError(f"tiles must be square to keep their physical aspect; got {height} x {width}")
    if height == input_size:
        return tiles
    resized = np.empty((count, input_size, input_size, 3), dtype=np.uint8)
    for i in range(count):
        image = Image.fromarray(tiles[i])
        resized[i] = np.asarray(image.resize((input_size, input_size), Image.Resampling.BILINEAR))
    return resized


class BackboneRunner:
    """A tile encoder on ONNX Runtime: uint8 tiles in, float32 embeddings out, preprocessing from the file.

    The batch axis is dynamic, so any batch size runs; ``batch_size`` is how many tiles ``embed`` and the
    embedder put in one call. On a GPU provider (TensorRT, CUDA) inputs and outputs go through I/O
    binding: the output stays on the device until one copy back per batch, and no intermediate host
    buffers are allocated per call. TensorRT gets fp16 enabled only for models exported with ``fp16``
    (its own fp16 mode would change the numbers behind an unchanged backbone id) and an engine cache.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        batch_size: int = 64,
        prefer: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int | None = None,
        device_id: int = 0,
        trt_cache_dir: Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.device_id = device_id
        metadata = read_onnx_file_metadata(self.path)
        self.session = create_session(
            self.path,
            prefer,
            intra_op_threads,
            provider_options=_gpu_provider_options(
                metadata, batch_size, device_id, trt_cache_dir or self.path.parent / "trt-cache"
            ),
        )
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
        self.raw_uint8_input = model_input.type == "tensor(uint8)"
        self._input_dtype = np.dtype(
            {"tensor(uint8)": "uint8", "tensor(float16)": "float16"}.get(model_input.type, "float32")
        )
        self._output_name = self.session.get_outputs()[0].name
        self.on_gpu = bool(GPU_PROVIDERS & set(self.providers))
        if self.metadata.get("fp16") and not self.on_gpu:
            log.warning(
                "fp16 backbone on a CPU provider: it runs, but slower than its fp32 export would",
                model=self.path.name,
            )

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def batch_array(self, count: int) -> np.ndarray:
        """An empty input batch for ``count`` tiles, for ``prepare(..., out=batch[a:b])`` to fill."""
        size = self.input_size
        shape = (count, size, size, 3) if self.raw_uint8_input else (count, 3, size, size)
        return np.empty(shape, dtype=self._input_dtype)

    def prepare(self, tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> the model's input (resized; normalised unless the graph does it)."""
        if self.raw_uint8_input:
            resized = resize_tiles(tiles, self.input_size)
            if out is None:
                return np.ascontiguousarray(resized)
            out[...] = resized
            return out
        if out is not None and out.dtype == np.float32:
            return preprocess_tiles(tiles, self.input_size, self.mean, self.std, out=out)
        prepared = preprocess_tiles(tiles, self.input_size, self.mean, self.std)
        if out is None:
            return prepared.astype(self._input_dtype, copy=False)
        out[...] = prepared
        return out

    def preprocess(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, S, S]``, resized and normalised as the model expects."""
        return preprocess_tiles(tiles, self.input_size, self.mean, self.std)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """One prepared batch (from ``prepare``) -> float32 features ``[N, D]``."""
        batch = np.ascontiguousarray(batch, dtype=self._input_dtype)
        if self.on_gpu:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self._input_name, batch)
            binding.bind_output(self._output_name, "cuda", self.device_id)
            self.session.run_with_iobinding(binding)
            (features,) = binding.copy_outputs_to_cpu()
        else:
            (features,) = self.session.run([self._output_name], {self._input_name: batch})
        return np.asarray(features, dtype=np.float32)

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, D]``, in batches of ``batch_size`` (bounded memory)."""
        return embed_in_batches(self, tiles)


def embed_in_batches(encoder: TileEncoder, tiles: np.ndarray) -> np.ndarray:
    """Serial prepare + infer in batches of ``encoder.batch_size``: the simple path, for small inputs."""
    if tiles.ndim != 4:
        raise ValueError(f"tiles must be uint8 [N, H, W, 3] RGB; got shape {tiles.shape}")
    if len(tiles) == 0:
        return np.zeros((0, encoder.output_dim), dtype=np.float32)
    parts = []
    for start in range(0, len(tiles), encoder.batch_size):
        parts.append(encoder.infer(encoder.prepare(tiles[start : start + encoder.batch_size])))
    return np.concatenate(parts)


def read_onnx_file_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an ONNX file without creating a session (cheap: no graph optimisation).

    Provider options depend on it (TensorRT's fp16 mode), so it is read before the session exists.
    """
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_ERRORS_ONLY
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"ONNX model {path} does not exist; create the default models with "
            "`wsi model init-defaults` or export one with `wsi model export-backbone`"
        )
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return read_model_metadata(session)


def _gpu_provider_options(
    metadata: Mapping[str, Any], batch_size: int, device_id: int, trt_cache_dir: Path
) -> dict[str, dict[str, Any]]:
    """TensorRT and CUDA options: fp16 only for fp16 exports, an engine cache, the dynamic batch range."""
    size = int(metadata.get("input_size", 224))
    uint8_input = metadata.get("input_format") == "uint8-nhwc"

    def shape(count: int) -> str:
        return f"tiles:{count}x{size}x{size}x3" if uint8_input else f"tiles:{count}x3x{size}x{size}"

    return {
        "TensorrtExecutionProvider": {
            "device_id": device_id,
            "trt_fp16_enable": bool(metadata.get("fp16", False)),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache_dir),
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(batch_size),
            "trt_profile_max_shapes": shape(batch_size),
        },
        "CUDAExecutionProvider": {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"},
    }


def open_backbone(
    path: Path | str,
    *,
    backend: str = "auto",
    batch_size: int = 64,
    prefer: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int | None = None,
    weights_dir: Path | None = None,
) -> TileEncoder:
    """The tile encoder for an exported backbone file, on the best backend this machine has.

    ``backend``: ``onnxruntime`` (TensorRT, CUDA or CPU, whichever the installed runtime offers), ``torch``
    (the same network rebuilt in torch on a CUDA device, checked to be the same: ``torch_backend.py``), or
    ``auto``: ONNX Runtime when it offers a GPU provider; else torch when torch sees a CUDA device (an
    ``onnxruntime`` without CUDA beside a CUDA torch); else ONNX Runtime on the CPU. The choice is logged.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {list(BACKENDS)}")
    if backend == "auto":
        if GPU_PROVIDERS & set(available_providers()) or not _torch_cuda_available():
            backend = "onnxruntime"
        else:
            backend = "torch"
            log.info("onnxruntime offers no GPU provider but torch sees CUDA: using the torch backend")
    if backend == "torch":
        from wsitk.shared.models.torch_backend import TorchBackboneRunner

        return TorchBackboneRunner(path, batch_size=batch_size, weights_dir=weights_dir)
    return BackboneRunner(path, batch_size=batch_size, prefer=prefer, intra_op_threads=intra_op_threads)


#: Device nodes of a GPU driver that torch's CUDA (NVIDIA) or HIP (AMD ROCm) build could use.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def _torch_cuda_available(device_nodes: Sequence[str] = GPU_DEVICE_NODES) -> bool:
    """Whether torch is installed and sees a CUDA device. torch is imported only when it is installed
    and a GPU driver is present: on a machine without one, importing it would only add about 100 MiB
    to the embedder's resident memory (docs/throughput.md, memory) to learn that there is no GPU."""
    if not any(Path(node).exists() for node in device_nodes):
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


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
        # the summary of the training embeddings, when the model carries one (ood.py)
        self.ood: OodReference | None = (
            OodReference.from_dict(self.metadata["ood"])
            if isinstance(self.metadata.get("ood"), dict)
            else None
        )

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
