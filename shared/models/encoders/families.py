"""The encoder registry: each tile encoder family with its architecture, checkpoint layout, preprocessing,
magnification and pooling, as its model card and published configuration state them.

``ENCODERS[name]`` is an ``EncoderSpec``; ``build_encoder(name, weights, seed)`` returns the torch module
with the weights of a local file loaded strictly (``checkpoints.py``), ready for ``export.export_backbone``.
Where each fact comes from, and what could not be checked against the weights themselves, is in
``docs/encoders.md`` and in each entry's ``sources``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn
from wsitk.shared.models.backbones import BACKBONES, seeded_torch
from wsitk.shared.models.encoders.checkpoints import (
    CheckpointError,
    Shape,
    check_layout,
    hf_dinov2_layout,
    hf_dinov2_to_timm,
    module_layout,
    read_checkpoint,
    resample_pos_embed_bilinear,
)
from wsitk.shared.models.encoders.vit import (
    ConchVisionTower,
    PoolerConfig,
    VisionTransformer,
    VitConfig,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class EncoderSpec:
    """One registered tile encoder.

    ``input_size``: pixels the network takes; ``tile_size``: pixels the tiler cuts at ``target_mpp``
    (they differ only when the published transform resizes, e.g. CONCH v1.5: 512 px at 0.5 um/px -> 448).
    ``layout``: ``timm`` / ``hf-dinov2`` (ViTs, ``checkpoints.py``), ``torchvision`` or ``project``.
    """

    name: str
    title: str
    architecture: str
    layout: str
    files: str
    licence: str
    input_size: int
    tile_size: int
    target_mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    pooling: str
    vit: VitConfig | None = None
    pooler: PoolerConfig | None = None
    resample_pos_embed: bool = False
    cnn_output_dim: int = 0
    sources: str = ""
    unverified: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def output_dim(self) -> int:
        if self.pooler is not None:
            return self.pooler.d_model
        return self.vit.output_dim if self.vit is not None else self.cnn_output_dim

    @property
    def prefix(self) -> str:
        """Name prefix of the ViT's parameters in the file (``trunk.`` in CONCH's vision tower)."""
        return "trunk." if self.pooler is not None else ""

    def make_module(self) -> nn.Module:
        """The network with random initialisation (seed it with ``backbones.seeded_torch``)."""
        if self.vit is None:
            raise ValueError(f"{self.name} is not a vision transformer; build it with build_encoder")
        if self.pooler is not None:
            return ConchVisionTower(self.vit, self.pooler)
        return VisionTransformer(self.vit)

    def checkpoint_layout(self) -> dict[str, Shape]:
        """Names and shapes of the tensors the distributed file holds (computed on the meta device)."""
        if self.vit is None:
            entry = BACKBONES[self.name]
            return module_layout(lambda: entry.build(None, 0))
        layout = module_layout(self.make_module)
        return hf_dinov2_layout(layout) if self.layout == "hf-dinov2" else layout

    def reduced(self) -> EncoderSpec:
        """The family at test size (two narrow blocks), with every parameter name unchanged."""
        if self.vit is None:
            raise ValueError(f"{self.name} has no reduced form")
        return replace(
            self,
            name=f"{self.name}-reduced",
            vit=self.vit.reduced(),
            pooler=self.pooler.reduced() if self.pooler is not None else None,
        )


def _load_vit_state(spec: EncoderSpec, weights: Path) -> dict[str, object]:
    state = read_checkpoint(weights)
    assert spec.vit is not None
    pos_key = f"{spec.prefix}pos_embed"
    if spec.resample_pos_embed and pos_key in state:
        # CONCH v1.5's reference loader resamples a stored grid to the model's 14 x 14 (bilinear) first.
        state[pos_key] = resample_pos_embed_bilinear(state[pos_key], spec.vit.grid, prefix=1)
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    expected = spec.checkpoint_layout()
    if found != expected:
        others = {
            name: other.checkpoint_layout() for name, other in ENCODERS.items() if other.vit is not None
        }
        check_layout(found, expected, source=Path(weights).name, family=spec.name, others=others)
    return dict(hf_dinov2_to_timm(state)) if spec.layout == "hf-dinov2" else dict(state)


def build_encoder(name_or_spec: str | EncoderSpec, weights: Path | None, seed: int = 0) -> nn.Module:
    """The registered encoder in eval mode: weights from a local file, or seeded random ones (tests)."""
    spec = ENCODERS[name_or_spec] if isinstance(name_or_spec, str) else name_or_spec
    if spec.vit is None:
        return BACKBONES[spec.name].build(weights, seed)
    with seeded_torch(seed):
        model = spec.make_module()
    if weights is not None:
        state = _load_vit_state(spec, weights)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:  # the layout check makes this unreachable
            raise CheckpointError(f"{weights}: {result}")
    set_size: Callable[[int], None] = model.set_input_size  # type: ignore[assignment]
    set_size(spec.input_size)
    return model.eval()


_TIMM = "timm names (a state dict of timm's VisionTransformer)"
_VIT_L16 = VitConfig(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_hidden=4096)
_VIT_G14_REG4 = VitConfig(
    img_size=224,
    patch_size=14,
    embed_dim=1536,
    depth=40,
    num_heads=24,
    mlp_hidden=8192,
    mlp="swiglu-packed",
    reg_tokens=4,
    no_embed_class=True,
)
_H_OPTIMUS = {
    "architecture": "ViT-g/14 (DINOv2 giant): width 1536, 40 blocks, 24 heads, SwiGLU (fc1 8192 packed), "
    "4 register tokens, position embedding on patches only, layer scale",
    "layout": "timm",
    "input_size": 224,
    "tile_size": 224,
    "target_mpp": 0.5,
    "mean": HOPTIMUS_MEAN,
    "std": HOPTIMUS_STD,
    "resize": "Resize(224), Normalize(H-optimus mean/std); the tiler cuts 224 px at 0.5 um/px",
    "pooling": "class token (timm global_pool='token') -> 1536",
    "vit": _VIT_G14_REG4,
}

ENCODERS: dict[str, EncoderSpec] = {
    "uni": EncoderSpec(
        name="uni",
        title="UNI (Mahmood Lab)",
        architecture="ViT-L/16: width 1024, 24 blocks, 16 heads, GELU MLP 4096, layer scale, no registers",
        layout="timm",
        files="pytorch_model.bin from huggingface.co/MahmoodLab/UNI (gated)",
        licence="CC-BY-NC-ND 4.0 (model page)",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Resize(224), Normalize(ImageNet); the tiler cuts 224 px at 0.5 um/px (20x)",
        pooling="class token after the final norm -> 1024",
        vit=_VIT_L16,
        sources="model card: timm vit_large_patch16_224, img_size=224, patch_size=16, init_values=1e-5, "
        "num_classes=0; ImageNet mean/std",
    ),
    "uni2-h": EncoderSpec(
        name="uni2-h",
        title="UNI2-h (Mahmood Lab)",
        architecture="ViT-H/14 variant: width 1536, 24 blocks, 24 heads, SwiGLU (fc1 8192 packed), "
        "8 register tokens, position embedding on patches only, layer scale",
        layout="timm",
        files="pytorch_model.bin from huggingface.co/MahmoodLab/UNI2-h (gated)",
        licence="CC-BY-NC-ND 4.0 (model page)",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Resize(224), Normalize(ImageNet); the tiler cuts 224 px at 0.5 um/px (20x)",
        pooling="class token -> 1536",
        vit=VitConfig(
            img_size=224,
            patch_size=14,
            embed_dim=1536,
            depth=24,
            num_heads=24,
            mlp_hidden=8192,
            mlp="swiglu-packed",
            reg_tokens=8,
            no_embed_class=True,
        ),
        sources="model card timm_kwargs: vit_giant_patch14_224, img_size 224, patch_size 14, depth 24, "
        "num_heads 24, init_values 1e-5, embed_dim 1536, mlp_ratio 2.66667*2, no_embed_class True, "
        "mlp_layer SwiGLUPacked, act_layer SiLU, reg_tokens 8",
    ),
    "virchow2": EncoderSpec(
        name="virchow2",
        title="Virchow2 (Paige)",
        architecture="ViT-H/14: width 1280, 32 blocks, 16 heads, SwiGLU (fc1 6832 packed), "
        "4 register tokens, position embedding on class, registers and patches, layer scale",
        layout="timm",
        files="pytorch_model.bin (or model.safetensors) from huggingface.co/paige-ai/Virchow2 (gated)",
        licence="CC-BY-NC-ND 4.0 (model page)",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Resize(224, bicubic), Normalize(ImageNet); the tiler cuts 224 px at 0.5 um/px (20x)",
        pooling="concat(class token, mean of the 256 patch tokens; registers excluded) -> 2560",
        vit=VitConfig(
            img_size=224,
            patch_size=14,
            embed_dim=1280,
            depth=32,
            num_heads=16,
            mlp_hidden=6832,
            mlp="swiglu-packed",
            reg_tokens=4,
            pooling="cls+mean",
        ),
        sources="config: vit_huge_patch14_224, img_size 224, init_values 1e-5, reg_tokens 4, mlp_ratio "
        "5.3375, global_pool '', mlp_layer SwiGLUPacked, act_layer SiLU; model card: embedding = "
        "concat(output[:, 0], output[:, 5:].mean(1))",
        unverified="pos_embed [1, 261, 1280] follows from timm's default no_embed_class=False, which the "
        "published config does not override; not checked against the file itself",
    ),
    "h-optimus-0": EncoderSpec(
        name="h-optimus-0",
        title="H-optimus-0 (Bioptimus)",
        files="pytorch_model.bin (or model.safetensors) from huggingface.co/bioptimus/H-optimus-0",
        licence="Apache 2.0 (model page)",
        sources="model card: timm vit_giant_patch14_reg4_dinov2, img_size 224, init_values 1e-5, "
        "dynamic_img_size False; mean (0.707223, 0.578729, 0.703617), std (0.211883, 0.230117, 0.177517)",
        **_H_OPTIMUS,
    ),
    "h-optimus-1": EncoderSpec(
        name="h-optimus-1",
        title="H-optimus-1 (Bioptimus)",
        files="pytorch_model.bin (or model.safetensors) from huggingface.co/bioptimus/H-optimus-1 (gated)",
        licence="see the model page (gated; terms differ from H-optimus-0)",
        sources="model card: same timm construction and normalisation as H-optimus-0",
        **_H_OPTIMUS,
    ),
    "prov-gigapath": EncoderSpec(
        name="prov-gigapath",
        title="Prov-GigaPath tile encoder (Providence / Microsoft)",
        architecture="ViT-g with 16 px patches (timm vit_giant_patch14_dinov2 with patch_size=16): width "
        "1536, 40 blocks, 24 heads, SwiGLU (fc1 8192 packed), no registers, layer scale",
        layout="timm",
        files="pytorch_model.bin from huggingface.co/prov-gigapath/prov-gigapath (gated; the tile encoder)",
        licence="Apache 2.0 (model page; research use)",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Resize(256, bicubic), CenterCrop(224), Normalize(ImageNet) on 256 px tiles at 0.5 um/px; "
        "the tiler cuts the same 224 px centre at 0.5 um/px directly",
        pooling="class token -> 1536",
        vit=VitConfig(
            img_size=224,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            mlp_hidden=8192,
            mlp="swiglu-packed",
        ),
        sources="config.json model_args: img_size 224, patch_size 16, embed_dim 1536, depth 40, num_heads "
        "24, init_values 1e-5, mlp_ratio 5.33334 on vit_giant_patch14_dinov2 (SwiGLUPacked, SiLU)",
        unverified="the issue text calls it ViT-g/14; the published config overrides the patch size to 16",
    ),
    "phikon-v2": EncoderSpec(
        name="phikon-v2",
        title="Phikon-v2 (Owkin)",
        architecture="ViT-L/16 in transformers' Dinov2Model: width 1024, 24 blocks, 16 heads, GELU MLP "
        "4096, layer scale, no registers",
        layout="hf-dinov2",
        files="model.safetensors from huggingface.co/owkin/phikon-v2 (config.json for reference)",
        licence="Owkin non-commercial licence (model page)",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Resize(224), CenterCrop(224), Normalize(ImageNet); the tiler cuts 224 px at 0.5 um/px",
        pooling="last_hidden_state[:, 0] (class token after the final layernorm) -> 1024",
        vit=_VIT_L16,
        sources="model card: AutoModel (Dinov2Model), outputs.last_hidden_state[:, 0, :]; ViT-L/16",
        unverified="layer_norm_eps 1e-6 (Dinov2Config default) is assumed, it is not in the tensors",
    ),
    "conch-v1.5": EncoderSpec(
        name="conch-v1.5",
        title="CONCH v1.5 vision tower (Mahmood Lab, TITAN's patch encoder)",
        architecture="ViT-L/16 trunk (width 1024, 24 blocks, GELU, layer scale) at 448 px + CoCa attentional "
        "pooler (1 query, 8 heads, width 768, no biases) + LayerNorm",
        layout="timm",
        files="pytorch_model_vision.bin from huggingface.co/MahmoodLab/conchv1_5 (gated)",
        licence="CC-BY-NC-ND 4.0 (model page)",
        input_size=448,
        tile_size=512,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Resize(448, bilinear), CenterCrop(448), Normalize(ImageNet) on 512 px tiles at 0.5 um/px "
        "(20x): the tiler cuts 512 px, the embedder resizes to 448",
        pooling="attentional pooler query output -> ln_contrast -> 768",
        vit=VitConfig(
            img_size=224,
            patch_size=16,
            embed_dim=1024,
            depth=24,
            num_heads=16,
            mlp_hidden=4096,
            layer_scale_init=1.0,
            pooling="tokens",
        ),
        pooler=PoolerConfig(d_model=768, num_heads=8, n_queries=1),
        resample_pos_embed=True,
        sources="reference code (TRIDENT conchv1_5.py, TITAN): vit_large(patch 16, init_values 1.0) at the "
        "default 224 grid, position embedding interpolated to 28 x 28 for 448 px (DINO bicubic), "
        "AttentionalPooler(d_model 768, context 1024, 8 heads, 1 query), LayerNorm(768)",
        unverified="the stored pos_embed grid (a grid other than 14 x 14 is resampled as the reference "
        "loader does) and the output width 768 come from the reference code, not from the file",
    ),
    "resnet50-trunc": EncoderSpec(
        name="resnet50-trunc",
        title="ResNet50 to layer3 (ImageNet; CLAM's encoder)",
        architecture="ResNet50 (torchvision v1.5 names) through layer3 + global average pool",
        layout="torchvision",
        files="a torchvision resnet50 state dict (torch.save(model.state_dict())); layer4/fc ignored",
        licence="as the weights' source states (torchvision ImageNet weights: BSD-3-Clause)",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Normalize(ImageNet) on 224 px tiles at 0.5 um/px",
        pooling="global average pool of layer3 -> 1024",
        cnn_output_dim=1024,
    ),
    "small-cnn": EncoderSpec(
        name="small-cnn",
        title="Baseline CNN (seeded random weights, NOT pretrained)",
        architecture="five 3x3 stride-2 convolutions + 1x1 projection + average pool",
        layout="project",
        files="none: seeded random weights",
        licence="this project's",
        input_size=224,
        tile_size=224,
        target_mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="Normalize(ImageNet)",
        pooling="global average pool -> 128",
        cnn_output_dim=128,
    ),
}
