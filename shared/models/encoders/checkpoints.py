"""Checkpoint files as the foundation models are distributed: reading them and checking them strictly.

- **Formats:** ``.safetensors`` (read with ``safetensors``, no code execution) and torch files (``.bin``,
  ``.pth``, ``.pt``: ``torch.load(weights_only=True)``, tensors only). A ``{"state_dict": ...}`` wrapper
  and ``module.`` prefixes (DataParallel) are unwrapped; nothing else is renamed silently.
- **Layouts:** ``timm`` (the parameter names of the network as written in ``vit.py``) and ``hf-dinov2``
  (``transformers``' ``Dinov2Model``: ``embeddings.*``, ``encoder.layer.N.*`` with separate query, key and
  value, ``layernorm.*``), converted here to the timm names.
- **Strictness:** the file must hold exactly the tensors the layout expects, each with the expected shape.
  A missing, unexpected or mis-shaped tensor is refused with its name (``CheckpointError``), with a
  description of what the file looks like (width, depth, patch size, register tokens) against what the
  family expects, and, when the file matches another registered family exactly, that family's name.
- **Layouts without memory:** ``expected_layout`` builds the network on torch's ``meta`` device, so the
  full-size names and shapes of a 1.1-billion-parameter ViT-g are known without allocating it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, ...]
LAYOUTS = ("timm", "hf-dinov2")
_SHOWN = 6


class CheckpointError(ValueError):
    """A weights file that cannot be read or does not hold what its encoder family expects."""


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` or torch file (never a download); CPU, as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; give the path of the downloaded file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad header, pickled code: all are unreadable files here
        raise CheckpointError(
            f"{path.name} cannot be read as a {'safetensors' if path.suffix == '.safetensors' else 'torch'} "
            f"checkpoint ({type(exc).__name__}: {str(exc)[:200]}); is the download complete "
            "(compare its size and SHA-256 with the model page)?"
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict (parameter names mapped to tensors)")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def module_layout(build: Callable[[], nn.Module]) -> dict[str, Shape]:
    """Names and shapes of a module's persistent state, built on the ``meta`` device (no memory)."""
    with torch.device("meta"):
        module = build()
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


# ---- Hugging Face DINOv2 <-> timm names ------------------------------------------------------------

_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_IGNORED = ("embeddings.mask_token",)  # used in pre-training only; in every Dinov2Model file
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV = ("query", "key", "value")


def hf_dinov2_layout(timm_layout: Mapping[str, Shape]) -> dict[str, Shape]:
    """The ``Dinov2Model`` names and shapes that correspond to a timm-named layout."""
    inverse_top = {v: k for k, v in _HF_TOP.items()}
    inverse_block = {v: k for k, v in _HF_BLOCK.items()}
    out: dict[str, Shape] = {"embeddings.mask_token": (1, timm_layout["cls_token"][-1])}
    for name, shape in timm_layout.items():
        if name in inverse_top:
            out[inverse_top[name]] = shape
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", name)
        if match is None:
            raise CheckpointError(f"{name} has no Dinov2Model counterpart")
        index, module, kind = match.groups()
        prefix = f"encoder.layer.{index}."
        if module == "attn.qkv":
            for part in _QKV:
                out[f"{prefix}attention.attention.{part}.{kind}"] = (shape[0] // 3, *shape[1:])
        elif module in ("ls1", "ls2"):
            out[f"{prefix}{inverse_block[module + '.gamma']}"] = shape
        else:
            out[f"{prefix}{inverse_block[module]}.{kind}"] = shape
    return out


def hf_dinov2_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a checked ``Dinov2Model`` state dict to timm names (query, key, value -> one ``qkv``)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name in _HF_IGNORED:
            continue
        if name in _HF_TOP:
            out[_HF_TOP[name]] = tensor
            continue
        match = _HF_LAYER.match(name)
        if match is None:
            raise CheckpointError(f"{name} is not a Dinov2Model parameter")
        index, module, kind = match.groups()
        if module.startswith("attention.attention."):
            parts.setdefault((index, kind), {})[module.rsplit(".", 1)[1]] = tensor
        elif module.startswith("layer_scale"):
            out[f"blocks.{index}.{_HF_BLOCK[module + '.lambda1']}"] = tensor
        else:
            out[f"blocks.{index}.{_HF_BLOCK[module]}.{kind}"] = tensor
    for (index, kind), qkv in parts.items():
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([qkv[p] for p in _QKV], dim=0)
    return out


# ---- strict checking ---------------------------------------------------------------------------------


def _top_level_first(name: str) -> tuple[bool, str]:
    """Embeddings and final norms before the (many, repetitive) per-block tensors."""
    return (bool(re.search(r"(^|\.)(blocks|layer)\.\d+\.", name)), name)


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def describe_layout(layout: Mapping[str, Shape]) -> str:
    """A short description of what a ViT checkpoint holds (width, depth, patch, registers, MLP)."""
    names = {n.removeprefix("trunk.") for n in layout}
    shapes = {n.removeprefix("trunk."): s for n, s in layout.items()}
    hf = any(n.startswith("encoder.layer.") for n in names)
    block = re.compile(r"^encoder\.layer\.(\d+)\." if hf else r"^blocks\.(\d+)\.")
    depth = len({m.group(1) for n in names if (m := block.match(n))})
    proj = shapes.get("embeddings.patch_embeddings.projection.weight" if hf else "patch_embed.proj.weight")
    if proj is None or depth == 0:
        sample = sorted(names)[:3]
        return f"not a vision transformer in timm or Dinov2Model naming (first tensors: {sample})"
    fc1 = shapes.get("encoder.layer.0.mlp.fc1.weight" if hf else "blocks.0.mlp.fc1.weight")
    swiglu = shapes.get("encoder.layer.0.mlp.weights_in.weight")
    mlp = fc1[0] if fc1 else (swiglu[0] if swiglu else 0)
    registers = shapes.get("embeddings.register_tokens" if hf else "reg_token", (0, 0))[1]
    return (
        f"{'Dinov2Model' if hf else 'timm'}-named ViT, width {proj[0]}, {depth} blocks, patch {proj[2]}, "
        f"{registers} register tokens, MLP fc1 width {mlp}"
    )


def check_layout(
    found: Mapping[str, Shape],
    expected: Mapping[str, Shape],
    *,
    source: str,
    family: str,
    others: Mapping[str, Mapping[str, Shape]] | None = None,
) -> None:
    """Refuse ``found`` unless it has exactly the names and shapes of ``expected``."""
    missing = sorted(set(expected) - set(found), key=_top_level_first)
    unexpected = sorted(set(found) - set(expected), key=_top_level_first)
    misshaped = [
        f"{name} {list(found[name])} (expected {list(expected[name])})"
        for name in sorted(set(found) & set(expected), key=_top_level_first)
        if tuple(found[name]) != tuple(expected[name])
    ]
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_shown(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} with the wrong shape: {_shown(misshaped)}")
    matches = [
        name for name, layout in (others or {}).items() if name != family and dict(layout) == dict(found)
    ]
    hint = f" It matches the layout of {', '.join(matches)}: register it under that name." if matches else ""
    raise CheckpointError(
        f"{source} is not a {family} checkpoint: {'; '.join(problems)}. The file holds a "
        f"{describe_layout(found)}; {family} expects a {describe_layout(expected)}.{hint}"
    )


def resample_pos_embed_bilinear(pos: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` (bilinear, no antialias) of a square grid to ``grid`` x ``grid``."""
    old_patches = pos.shape[1] - prefix
    old = math.isqrt(old_patches)
    if old * old != old_patches:
        raise CheckpointError(f"position embedding {list(pos.shape)} is not a square grid plus {prefix}")
    if old == grid:
        return pos
    dim = pos.shape[-1]
    patches = pos[:, prefix:].reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([pos[:, :prefix], patches], dim=1)
