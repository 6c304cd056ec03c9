"""An independent reference for the project's vision transformers: ``transformers``' DINOv2 models.

The project's ViT (``shared/models/encoders/vit.py``) uses timm's parameter names; ``transformers``'
``Dinov2Model`` and ``Dinov2WithRegistersModel`` are a separate implementation of the same computation
(layer scale, SwiGLU with DINOv2's hidden width, register tokens). The functions here re-express a
timm-named state dict in their names, written from timm's and transformers' definitions rather than from
the project's converter, so that agreement between the two means both the network and the checkpoint
interpretation are right. Position embeddings: timm with ``no_embed_class`` adds them to the patches
only; transformers always adds one to the class token and never to registers. Both are expressed exactly
(a zero class-token position; for Virchow2, which embeds the registers too, the register positions are
folded into the register tokens, which are constants).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from wsitk.shared.models.encoders.families import EncoderSpec


def random_checkpoint(layout: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in a checkpoint's exact names and shapes, scaled so every block matters."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(layout):
        shape = layout[name]
        noise = torch.randn(shape, generator=generator)
        if "norm" in name or name.endswith(("ln_q.weight", "ln_k.weight", "ln_contrast.weight")):
            value = 1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise
        elif name.endswith(("gamma", "lambda1")):
            value = 0.5 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.02 * noise
        elif any(token in name for token in ("cls_token", "reg_token", "register_tokens", "pos", "query")):
            value = 0.3 * noise
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            value = noise / math.sqrt(fan_in)
        state[name] = value.contiguous()
    return state


def _hf_config(spec: EncoderSpec) -> object:
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    vit = spec.vit
    assert vit is not None
    swiglu = vit.mlp == "swiglu-packed"
    common = {
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": vit.depth,
        "num_attention_heads": vit.num_heads,
        "mlp_ratio": 4 if swiglu else vit.mlp_hidden / vit.embed_dim,
        "use_swiglu_ffn": swiglu,
        "image_size": spec.input_size,
        "patch_size": vit.patch_size,
        "layer_norm_eps": vit.norm_eps,
        "qkv_bias": vit.qkv_bias,
        "hidden_act": "gelu",
        "layerscale_value": 1.0,
        "attn_implementation": "eager",  # softmax(QK^T)V written out, not the SDPA kernel the project uses
    }
    if vit.reg_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=vit.reg_tokens, **common)
    return Dinov2Config(**common)


def hf_model(spec: EncoderSpec) -> torch.nn.Module:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config = _hf_config(spec)
    assert spec.vit is not None
    model_class = Dinov2WithRegistersModel if spec.vit.reg_tokens else Dinov2Model
    return model_class(config).eval()  # type: ignore[arg-type]


def dino_interpolate(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The DINO / iBOT ``interpolate_pos_encoding`` that CONCH v1.5's reference code runs at 448 px."""
    class_pos, patch_pos = pos[:, :1], pos[:, 1:]
    old = int(math.sqrt(patch_pos.shape[1]))
    w0 = h0 = grid + 0.1
    patch_pos = F.interpolate(
        patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2),
        scale_factor=(w0 / old, h0 / old),
        mode="bicubic",
    )
    return torch.cat([class_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def timm_to_hf(spec: EncoderSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm-named ViT state dict (no ``trunk.`` prefix) in Dinov2Model / Dinov2WithRegisters names."""
    vit = spec.vit
    assert vit is not None
    dim, registers = vit.embed_dim, vit.reg_tokens
    pos = state["pos_embed"]
    hf: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, dim),
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if vit.no_embed_class:  # patches only: the class token gets a zero position, registers none
        hf_pos = torch.cat([torch.zeros(1, 1, dim), pos], dim=1)
        if registers:
            hf["embeddings.register_tokens"] = state["reg_token"]
    elif registers:  # class, registers and patches embedded: fold register positions into the tokens
        hf_pos = torch.cat([pos[:, :1], pos[:, 1 + registers :]], dim=1)
        hf["embeddings.register_tokens"] = state["reg_token"] + pos[:, 1 : 1 + registers]
    else:
        hf_pos = pos
    grid = spec.input_size // vit.patch_size
    if hf_pos.shape[1] != grid * grid + 1:
        hf_pos = dino_interpolate(hf_pos, grid)
    hf["embeddings.position_embeddings"] = hf_pos
    for index in range(vit.depth):
        block, layer = f"blocks.{index}.", f"encoder.layer.{index}."
        for kind in ("weight", "bias"):
            query, key, value = state[f"{block}attn.qkv.{kind}"].chunk(3, dim=0)
            hf[f"{layer}attention.attention.query.{kind}"] = query
            hf[f"{layer}attention.attention.key.{kind}"] = key
            hf[f"{layer}attention.attention.value.{kind}"] = value
            hf[f"{layer}attention.output.dense.{kind}"] = state[f"{block}attn.proj.{kind}"]
            hf[f"{layer}norm1.{kind}"] = state[f"{block}norm1.{kind}"]
            hf[f"{layer}norm2.{kind}"] = state[f"{block}norm2.{kind}"]
            names = ("weights_in", "weights_out") if vit.mlp == "swiglu-packed" else ("fc1", "fc2")
            hf[f"{layer}mlp.{names[0]}.{kind}"] = state[f"{block}mlp.fc1.{kind}"]
            hf[f"{layer}mlp.{names[1]}.{kind}"] = state[f"{block}mlp.fc2.{kind}"]
        hf[f"{layer}layer_scale1.lambda1"] = state[f"{block}ls1.gamma"]
        hf[f"{layer}layer_scale2.lambda1"] = state[f"{block}ls2.gamma"]
    return hf


def reference_forward(
    spec: EncoderSpec, state: Mapping[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The family's embedding computed by transformers (+ torch's MultiheadAttention for CONCH's pooler).

    ``state``: the checkpoint as the family distributes it (timm, ``trunk.``-prefixed, or Dinov2Model).
    """
    vit = spec.vit
    assert vit is not None
    model = hf_model(spec)
    if spec.layout == "hf-dinov2":
        hf_state = dict(state)
    else:
        trunk = {
            k.removeprefix("trunk."): v for k, v in state.items() if not k.startswith(("attn_pool", "ln_"))
        }
        hf_state = timm_to_hf(spec, trunk)
    model.load_state_dict(hf_state, strict=True)
    prefix_tokens = 1 + vit.reg_tokens

    def pooled(tiles: torch.Tensor) -> torch.Tensor:
        tokens = model(pixel_values=tiles).last_hidden_state
        if spec.pooler is not None:
            return conch_pooler_reference(spec, state, tokens)
        if vit.pooling == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(dim=1)], dim=-1)
        return tokens[:, 0]

    return pooled


def conch_pooler_reference(
    spec: EncoderSpec, state: Mapping[str, torch.Tensor], tokens: torch.Tensor
) -> torch.Tensor:
    """CONCH's attentional pooler as ``torch.nn.MultiheadAttention`` (bias-free, kdim = trunk width)."""
    pooler = spec.pooler
    assert pooler is not None and spec.vit is not None
    d_model, context = pooler.d_model, spec.vit.embed_dim
    attention = torch.nn.MultiheadAttention(
        d_model, pooler.num_heads, bias=False, kdim=context, vdim=context, batch_first=True
    )
    to_kv = state["attn_pool_contrast.to_kv.weight"]
    attention.load_state_dict(
        {
            "q_proj_weight": state["attn_pool_contrast.to_q.weight"],
            "k_proj_weight": to_kv[:d_model],
            "v_proj_weight": to_kv[d_model:],
            "out_proj.weight": state["attn_pool_contrast.to_out.weight"],
        }
    )
    query = F.layer_norm(
        state["attn_pool_contrast.query"],
        (d_model,),
        state["attn_pool_contrast.ln_q.weight"],
        state["attn_pool_contrast.ln_q.bias"],
    )
    keys = F.layer_norm(
        tokens, (context,), state["attn_pool_contrast.ln_k.weight"], state["attn_pool_contrast.ln_k.bias"]
    )
    out, _ = attention(query.expand(len(tokens), -1, -1), keys, keys, need_weights=False)
    return F.layer_norm(out[:, 0], (d_model,), state["ln_contrast.weight"], state["ln_contrast.bias"])
