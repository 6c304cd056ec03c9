"""The torch backend for exported backbones: the same network, rebuilt in torch, on a CUDA device.

Where the installed ONNX Runtime offers no CUDA provider (a CPU ``onnxruntime`` wheel beside a CUDA
build of torch, as on some GPU machines) the embedder can still use the GPU. It does not convert the
ONNX graph: it rebuilds the network the file was exported from (``architecture`` and ``seed`` in the
file's metadata, plus the local weights file named by ``weights_source``) and refuses to run unless the
rebuilt parameters hash to the ``weights_state_sha256`` recorded at export. So the backbone id and
checksum that the embedder reports name the file, and the numbers come from the same weights and the
same preprocessing (the normalisation runs on the device, on uint8 tiles, as in a ``uint8-nhwc`` export).

Only files exported by this project (``export.export_backbone``) carry those keys; a third-party ONNX
encoder runs on ONNX Runtime only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from wsitk.shared.models.runtime import (
    _BACKBONE_KEYS,
    _require_keys,
    embed_in_batches,
    read_onnx_file_metadata,
    resize_tiles,
    sha256_file,
)

_REBUILD_KEYS = ("architecture", "seed", "weights_source", "weights_sha256", "weights_state_sha256")


class TorchBackboneRunner:
    """A ``runtime.TileEncoder`` on torch: uint8 tiles in, float32 features out, on ``device``.

    Prepared batches are uint8 ``[N, S, S, 3]`` in page-locked host memory (recycled, so that the copy
    to the device is a DMA without an extra staging copy); normalisation, fp16 (when the export was fp16)
    and the network run on the device with cuDNN autotuning and channels-last layout.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        batch_size: int = 256,
        weights_dir: Path | None = None,
        device: str | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        from wsitk.shared.models.export import _resolve_backbone, state_dict_sha256

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.metadata = read_onnx_file_metadata(self.path)
        _require_keys(self.metadata, _BACKBONE_KEYS, self.path, "backbone")
        missing = [key for key in _REBUILD_KEYS if key not in self.metadata]
        if missing:
            raise ValueError(
                f"{self.path} lacks {missing}: the torch backend can only rebuild backbones exported by "
                "`wsi model export-backbone`; run this model with --backend onnxruntime"
            )
        self.backbone_id = str(self.metadata["backbone_id"])
        self.input_size = int(self.metadata["input_size"])
        self.output_dim = int(self.metadata["output_dim"])
        self.sha256 = sha256_file(self.path)
        self.fp16 = bool(self.metadata.get("fp16", False))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        weights = self._weights_file(weights_dir or self.path.parent)
        _, model = _resolve_backbone(
            str(self.metadata["architecture"]),
            weights,
            int(self.metadata["seed"]),
            input_size=self.input_size,
        )
        if state_dict_sha256(model) != self.metadata["weights_state_sha256"]:
            raise ValueError(
                f"the network rebuilt from {self.metadata['architecture']} "
                f"(weights {self.metadata['weights_source']}) is not the one exported to {self.path}: "
                "its parameters hash differently. Use the weights file the model was exported with"
            )
        model = model.to(self.device, memory_format=torch.channels_last)
        self.model = (model.half() if self.fp16 else model).eval()
        dtype = torch.float16 if self.fp16 else torch.float32
        std = torch.tensor(self.metadata["std"], dtype=torch.float32)
        mean = torch.tensor(self.metadata["mean"], dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).to(self.device)
        self._offset = (mean / std).reshape(1, 3, 1, 1).to(self.device)
        self._dtype = dtype
        self._pinned = self.device.type == "cuda"
        self._free_buffers: dict[int, list[torch.Tensor]] = {}
        self._buffers_in_use: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._graph: Any = None  # (graph, static input, static output) once captured
        self._use_graphs = cuda_graphs and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        normalised = (tiles.permute(0, 3, 1, 2).float() * self._scale - self._offset).to(self._dtype)
        return self.model(normalised.contiguous(memory_format=torch.channels_last))

    def _captured(self) -> Any:
        """The full-batch forward pass captured as a CUDA graph: one launch instead of hundreds of kernels.

        The embedder's inference thread shares the interpreter with the decoding threads; eager mode needs
        the GIL for every kernel launch, a replayed graph needs it once per batch.
        """
        if self._graph is None:
            size = self.input_size
            static_in = torch.zeros((self.batch_size, size, size, 3), dtype=torch.uint8, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up outside the capture: cuDNN autotuning, allocations
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            self._graph = (graph, static_in, static_out)
        return self._graph

    def _weights_file(self, weights_dir: Path) -> Path | None:
        source = str(self.metadata["weights_source"])
        if source.startswith("random-init("):
            return None
        candidate = Path(weights_dir) / source
        if not candidate.is_file():
            raise FileNotFoundError(
                f"{self.path} was exported from the weights file {source}; put it in {weights_dir} (or pass "
                "weights_dir) for the torch backend, or run this model with --backend onnxruntime"
            )
        if sha256_file(candidate) != self.metadata["weights_sha256"]:
            raise ValueError(f"{candidate} is not the weights file {self.path} was exported from (sha256)")
        return candidate

    @property
    def providers(self) -> list[str]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return [f"torch:{self.device}:{name}"]

    def batch_array(self, count: int) -> np.ndarray:
        """A uint8 ``[count, S, S, 3]`` batch, page-locked on CUDA and recycled after ``infer``."""
        shape = (count, self.input_size, self.input_size, 3)
        with self._lock:
            free = self._free_buffers.get(count)
            tensor = free.pop() if free else None
        if tensor is None:
            tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=self._pinned)
        array: np.ndarray = tensor.numpy()
        with self._lock:
            self._buffers_in_use[array.ctypes.data] = tensor
        return array

    def prepare(self, tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, S, S, 3]`` (resized if needed); normalised on the device."""
        resized = resize_tiles(tiles, self.input_size)
        if out is None:
            return np.ascontiguousarray(resized)
        out[...] = resized
        return out

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """One prepared uint8 batch -> float32 features ``[N, D]``."""
        with self._lock:
            owner = self._buffers_in_use.pop(batch.ctypes.data, None)
        host = owner if owner is not None and owner.shape == batch.shape else torch.from_numpy(batch)
        if self._use_graphs and len(batch) == self.batch_size:
            graph, static_in, static_out = self._captured()
            static_in.copy_(host, non_blocking=True)
            graph.replay()
            features = static_out
        else:
            features = self._forward(host.to(self.device, non_blocking=True))
        result: np.ndarray = features.float().cpu().numpy()  # synchronises: the host buffer is free now
        if owner is not None and len(batch) == self.batch_size:  # full batches only: bounded pool
            with self._lock:
                self._free_buffers.setdefault(len(batch), []).append(owner)
        return result

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        return embed_in_batches(self, tiles)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "torch",
            "device": str(self.device),
            "fp16": self.fp16,
            "providers": self.providers,
        }
