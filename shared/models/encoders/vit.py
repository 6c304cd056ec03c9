"""The vision transformers of the pathology foundation models, in torch, with timm's parameter names.

``timm`` cannot be installed beside the CPU build of torch here (it imports torchvision), so the networks
are written in the project. Module and parameter names follow timm's ``VisionTransformer`` exactly
(``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.ls1.gamma``, ``blocks.N.mlp.fc1``/``fc2``, ``norm``), so a checkpoint
saved from a timm model (``pytorch_model.bin`` / ``model.safetensors`` of UNI, UNI2-h, Virchow2,
H-optimus, Prov-GigaPath) loads with ``strict=True`` and nothing renamed. The Hugging Face DINOv2 layout
(Phikon-v2) is converted to these names by ``checkpoints.py``.

What differs between the families is all in ``VitConfig``: patch size, width, depth, heads, the MLP
(GELU, or timm's ``SwiGLUPacked``: one ``fc1`` producing both halves, ``silu(first) * second``), register
tokens, whether the position embedding covers the prefix tokens (timm's ``no_embed_class``), layer
scale, and how the output is pooled. ``tests/integration/test_encoders.py`` checks every family numerically against
``transformers``' DINOv2 implementations loading the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("cls", "cls+mean", "tokens")
MLPS = ("gelu", "swiglu-packed")


def swiglu_half_width(embed_dim: int, ratio: float = 4.0) -> int:
    """DINOv2's SwiGLU hidden width: ``(int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8`` (4096 for 1536)."""
    return (int(int(embed_dim * ratio) * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class VitConfig:
    """One ViT variant. ``mlp_hidden`` is ``fc1``'s output width (both halves for ``swiglu-packed``)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    mlp: str = "gelu"
    reg_tokens: int = 0
    no_embed_class: bool = False
    layer_scale_init: float | None = 1e-5
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS or self.mlp not in MLPS:
            raise ValueError(f"pooling must be one of {POOLINGS} and mlp one of {MLPS}")
        if self.img_size % self.patch_size or self.embed_dim % self.num_heads:
            raise ValueError("img_size must be a multiple of patch_size and embed_dim of num_heads")
        if self.mlp == "swiglu-packed" and self.mlp_hidden % 2:
            raise ValueError("a packed SwiGLU needs an even fc1 width")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.reg_tokens

    @property
    def pos_embed_len(self) -> int:
        return self.grid**2 + (0 if self.no_embed_class else self.num_prefix_tokens)

    @property
    def output_dim(self) -> int:
        return self.embed_dim * 2 if self.pooling == "cls+mean" else self.embed_dim

    def reduced(self, *, embed_dim: int = 64, num_heads: int = 4, depth: int = 2) -> VitConfig:
        """The same family at test size: fewer, narrower blocks; patch size, input size, register tokens,
        position-embedding layout, MLP kind and pooling unchanged, so every parameter keeps its name."""
        hidden = 2 * swiglu_half_width(embed_dim) if self.mlp == "swiglu-packed" else 4 * embed_dim
        return replace(self, embed_dim=embed_dim, num_heads=num_heads, depth=depth, mlp_hidden=hidden)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if torch.onnx.is_in_onnx_export():  # plain ops: exported faithfully at any opset
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm's ``Mlp`` (GELU) or ``GluMlp`` as ``SwiGLUPacked``: ``fc2(silu(a) * b)``, ``a, b = fc1(x)``."""

    def __init__(self, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if kind == "swiglu-packed" else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.kind == "swiglu-packed":
            first, second = x.chunk(2, dim=-1)
            return self.fc2(F.silu(first) * second)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, config.mlp_hidden, config.mlp)
        init = config.layer_scale_init
        self.ls1: nn.Module = LayerScale(dim, init) if init is not None else nn.Identity()
        self.ls2: nn.Module = LayerScale(dim, init) if init is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_patch_pos_embed_dino(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINO's interpolation of a square patch-position grid ``[1, G*G, D]`` to ``grid`` x ``grid``.

    Bicubic with a scale factor of ``(grid + 0.1) / G`` (the +0.1 of the DINO code, kept for fidelity),
    as CONCH v1.5's reference code (iBOT/DINO ``interpolate_pos_encoding``) does for 448 px input.
    """
    old = math.isqrt(patch_pos.shape[1])
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"position embedding of {patch_pos.shape[1]} patches is not a square grid")
    if old == grid:
        return patch_pos
    dim = patch_pos.shape[-1]
    scale = (grid + 0.1) / old
    resized = F.interpolate(
        patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        align_corners=False,
    )
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


class VisionTransformer(nn.Module):
    """A timm-named ViT: ``[N, 3, S, S]`` -> pooled features (``cls``, ``cls+mean``) or all tokens.

    The input size is fixed per model (the size it is exported at). When it differs from the grid the
    position embedding was trained on (CONCH v1.5: 14 x 14 stored, 28 x 28 used), ``set_input_size``
    interpolates it once, after the weights are loaded, into a buffer that the forward pass uses: the
    exported graph then holds a constant instead of a resize.
    """

    reg_token: nn.Parameter | None
    _pos_for_input: torch.Tensor | None

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim)) if config.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_len, dim))
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.register_buffer("_pos_for_input", None, persistent=False)
        self.input_size = config.img_size
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation scheme (truncated normal 0.02); weights from a checkpoint replace it."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_input_size(self, size: int) -> None:
        """Fix the input size; precompute the position embedding for it if the stored grid differs."""
        config = self.config
        if size % config.patch_size:
            raise ValueError(f"input size {size} is not a multiple of the patch size {config.patch_size}")
        self.input_size = size
        grid = size // config.patch_size
        if grid == config.grid:
            self._pos_for_input = None
            return
        prefix = 0 if config.no_embed_class else config.num_prefix_tokens
        with torch.no_grad():
            pos = self.pos_embed.detach()
            patches = resample_patch_pos_embed_dino(pos[:, prefix:], grid)
            self._pos_for_input = torch.cat([pos[:, :prefix], patches], dim=1)

    def forward_tokens(self, tiles: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: ``[N, 1 + registers + patches, D]``."""
        x = self.patch_embed(tiles)
        pos = self.pos_embed if self._pos_for_input is None else self._pos_for_input
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.config.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return self.norm(self.blocks(x))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(tiles)
        pooling = self.config.pooling
        if pooling == "tokens":
            return tokens
        if pooling == "cls+mean":
            patches = tokens[:, self.config.num_prefix_tokens :]
            return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
        return tokens[:, 0]


@dataclass(frozen=True)
class PoolerConfig:
    """CoCa's attentional pooler as CONCH v1.5 uses it for its contrastive (slide-retrieval) embedding."""

    d_model: int = 768
    num_heads: int = 8
    n_queries: int = 1

    def reduced(self) -> PoolerConfig:
        return replace(self, d_model=32, num_heads=4)


class AttentionalPooler(nn.Module):
    """``query`` attends over the LayerNormed trunk tokens; no biases (CONCH v1.5's vision tower)."""

    def __init__(self, config: PoolerConfig, context_dim: int) -> None:
        super().__init__()
        d_model = config.d_model
        self.num_heads = config.num_heads
        self.head_dim = d_model // config.num_heads
        self.query = nn.Parameter(torch.randn(config.n_queries, d_model) * 0.02)
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, _ = tokens.shape
        heads, head_dim = self.num_heads, self.head_dim
        queries = self.query.shape[0]
        q = self.to_q(self.ln_q(self.query)).reshape(1, queries, heads, head_dim).transpose(1, 2)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        k = k.reshape(batch, count, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, count, heads, head_dim).transpose(1, 2)
        weights = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, queries, heads * head_dim)
        return self.to_out(out)


class ConchVisionTower(nn.Module):
    """CONCH v1.5's vision encoder: ViT-L/16 trunk, attentional pooler, LayerNorm -> 768-d."""

    def __init__(self, config: VitConfig, pooler: PoolerConfig) -> None:
        super().__init__()
        if config.pooling != "tokens":
            config = replace(config, pooling="tokens")
        self.trunk = VisionTransformer(config)
        self.attn_pool_contrast = AttentionalPooler(pooler, config.embed_dim)
        self.ln_contrast = nn.LayerNorm(pooler.d_model)

    def set_input_size(self, size: int) -> None:
        self.trunk.set_input_size(size)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk(tiles))[:, 0])
