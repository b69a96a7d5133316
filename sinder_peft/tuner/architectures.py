"""The architecture registry: one `ArchitectureDescription` per supported ViT family, and how to find the backbone.

Everything in sinder-peft that needs to know the *structure* of a model reads it from one description
(`descriptions.ArchitectureDescription`). The descriptions are built per family, in one registry keyed by the
`model_type` of the *backbone's* config (`SUPPORTED_MODEL_TYPES`). Supporting another ViT family means adding one
function here, not changing the math in `analysis/directions.py` or the adapter defaults in `tuner/model.py`.

The backbone is the bare vision transformer holding the embeddings, the blocks and the final norm. It may sit inside
a larger model, which the repair keeps whole: `Dinov2ForImageClassification.dinov2`, `DepthAnythingForDepthEstimation
.backbone` (a `Dinov2Backbone`), `CLIPModel.vision_model` (the text tower is never adapted), ... `unwrap_backbone`
finds it structurally.

Each family also says how its checkpoints normalize pixels (`image_mean`, `image_std`), for a checkpoint without an
image processor; `ImageNormalization` is that pair, used wherever images are prepared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .descriptions import ArchitectureDescription, BlockDescription, EmbeddedTokens, MlpDescription

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageNormalization:
    """Per-channel mean and standard deviation applied to RGB pixel values in [0, 1].

    Attributes:
        mean: the value subtracted from each channel (R, G, B).
        std: the value each channel is divided by after subtracting the mean.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got mean={self.mean} and std={self.std}.")
        if any(value <= 0 for value in self.std):
            raise ValueError(f"Every std value must be positive, got {self.std}.")


# ----------------------------------------------------------------------------------------------------------------
# Embedding functions, one per family. Each receives pixel values already on the backbone's device and dtype.
# ----------------------------------------------------------------------------------------------------------------


def _embed_dinov2(backbone: nn.Module, pixel_values: torch.Tensor, grid_size: tuple[int, int]) -> EmbeddedTokens:
    """DINOv2 (with or without registers, and `Dinov2Backbone`): the embeddings interpolate their positions
    themselves; the model calls its blocks without an attention mask."""
    return EmbeddedTokens(backbone.embeddings(pixel_values), {}, grid_size)


_DINOV3_ROPE_AUGMENTATIONS = ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")


def _embed_dinov3(backbone: nn.Module, pixel_values: torch.Tensor, grid_size: tuple[int, int]) -> EmbeddedTokens:
    """DINOv3: no absolute positions; RoPE (cos, sin), each [H·W, head_dim], go to every block. In train mode the
    RoPE coordinates are randomly augmented on every call, so a backbone in train mode with augmentation configured
    is refused rather than silently giving random tokens."""
    augmentations = [name for name in _DINOV3_ROPE_AUGMENTATIONS if getattr(backbone.config, name, None) is not None]
    if backbone.rope_embeddings.training and augmentations:
        raise ValueError(
            f"The DINOv3 backbone is in train mode, where its RoPE patch coordinates are randomly augmented on every "
            f"call ({', '.join(augmentations)} set in its config), so its tokens would be random. Call `model.eval()` "
            "first: gradients still flow in eval mode."
        )
    position_embeddings = backbone.rope_embeddings(pixel_values)
    return EmbeddedTokens(backbone.embeddings(pixel_values), {"position_embeddings": position_embeddings}, grid_size)


def _embed_clip(backbone: nn.Module, pixel_values: torch.Tensor, grid_size: tuple[int, int]) -> EmbeddedTokens:
    """CLIP: the embeddings, then the pre-norm `pre_layrnorm` (skipping it would be silently wrong). The blocks take
    `attention_mask` as a required argument. Interpolating the positions is exact at the native size."""
    hidden = backbone.embeddings(pixel_values, interpolate_pos_encoding=True)
    return EmbeddedTokens(backbone.pre_layrnorm(hidden), {"attention_mask": None}, grid_size)


def _embed_interpolated(backbone: nn.Module, pixel_values: torch.Tensor, grid_size: tuple[int, int]) -> EmbeddedTokens:
    """SigLIP, ViT, DeiT: the embeddings with interpolated positions (exact at the native size; without it they
    refuse any other size); blocks called with `attention_mask=None`."""
    hidden = backbone.embeddings(pixel_values, interpolate_pos_encoding=True)
    return EmbeddedTokens(hidden, {"attention_mask": None}, grid_size)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Return the patches of `pixel_values` [B, C, H, W] as [B, (H/p)·(W/p), p·p·C], row-major over the grid.

    Each patch is flattened in (row, column, channel) order, as SigLIP 2's image processor does, so SigLIP 2's
    linear patch embedding reads them as it reads the processor's output.
    """
    batch, channels, height, width = pixel_values.shape
    rows, columns = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, rows, patch_size, columns, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * columns, patch_size * patch_size * channels)


def _embed_siglip2(backbone: nn.Module, pixel_values: torch.Tensor, grid_size: tuple[int, int]) -> EmbeddedTokens:
    """SigLIP 2 (NaFlex) takes patchified pixels with their grid shape: the images are cut into patches here,
    without padding, so every token is real and the attention mask is None (the model's own mask for an all-ones
    `pixel_attention_mask`). The position table is resized to the grid as the model does."""
    patches = patchify(pixel_values, backbone.config.patch_size)
    spatial_shapes = torch.tensor([grid_size], dtype=torch.long, device=pixel_values.device)
    spatial_shapes = spatial_shapes.expand(pixel_values.shape[0], 2)
    return EmbeddedTokens(backbone.embeddings(patches, spatial_shapes), {"attention_mask": None}, grid_size)


# ----------------------------------------------------------------------------------------------------------------
# One description per family
# ----------------------------------------------------------------------------------------------------------------


def _patch_size(config: PretrainedConfig) -> int:
    """The side of a (square) patch: `config.patch_size`, an int or a pair."""
    return config.patch_size if isinstance(config.patch_size, int) else int(config.patch_size[0])


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)
_DINO_BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "query": "attention.q_proj",
    "key": "attention.k_proj",
    "value": "attention.v_proj",
    "output": "attention.o_proj",
    "layer_scale1": "layer_scale1.lambda1",
    "layer_scale2": "layer_scale2.lambda1",
    "mlp_prefix": "mlp",
}
_CLIP_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "output": "self_attn.out_proj",
    "layer_scale1": None,
    "layer_scale2": None,
    "mlp_prefix": "mlp",
}
_VIT_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "query": "attention.q_proj",
    "key": "attention.k_proj",
    "value": "attention.v_proj",
    "output": "attention.o_proj",
    "layer_scale1": None,
    "layer_scale2": None,
    "mlp_prefix": "mlp",
}
_GATED_PROJECTIONS = {"input_projections": ("gate_proj", "up_proj"), "output_projection": "down_proj"}
_FC_PROJECTIONS = {"input_projections": ("fc1",), "output_projection": "fc2"}


def _describe_dinov2(config: PretrainedConfig) -> ArchitectureDescription:
    """Dinov2Model, Dinov2WithRegistersModel, Dinov2Backbone: GELU or SwiGLU MLP (whose gate is always silu),
    per-channel layer scales, [CLS, registers..., patches]."""
    if config.use_swiglu_ffn:
        mlp = MlpDescription(kind="gated", activation="silu", **_GATED_PROJECTIONS)
    else:
        mlp = MlpDescription(kind="plain", activation=config.hidden_act, **_FC_PROJECTIONS)
    return ArchitectureDescription(
        model_type=config.model_type,
        family="DINOv2",
        layers="encoder.layer",
        final_norm="layernorm",
        last_hidden_state_normed=True,
        num_prefix_tokens=1 + int(getattr(config, "num_register_tokens", 0)),
        has_cls_token=True,
        patch_size=_patch_size(config),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        block=BlockDescription(**_DINO_BLOCK_NAMES, mlp=mlp),
        pooling="cls",
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        embed_tokens=_embed_dinov2,
    )


def _describe_dinov3(config: PretrainedConfig) -> ArchitectureDescription:
    """DINOv3ViTModel / DINOv3ViTBackbone: plain (`up_proj`, `down_proj`) or gated MLP, both with
    `config.hidden_act`; per-channel layer scales; RoPE; [CLS, registers..., patches]."""
    if config.use_gated_mlp:
        mlp = MlpDescription(kind="gated", activation=config.hidden_act, **_GATED_PROJECTIONS)
    else:
        mlp = MlpDescription(
            kind="plain", activation=config.hidden_act, input_projections=("up_proj",), output_projection="down_proj"
        )
    return ArchitectureDescription(
        model_type=config.model_type,
        family="DINOv3",
        layers="model.layer",
        final_norm="norm",
        last_hidden_state_normed=True,
        num_prefix_tokens=1 + int(config.num_register_tokens),
        has_cls_token=True,
        patch_size=_patch_size(config),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        block=BlockDescription(**_DINO_BLOCK_NAMES, mlp=mlp),
        pooling="cls",
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        embed_tokens=_embed_dinov3,
    )


def _describe_clip(config: PretrainedConfig) -> ArchitectureDescription:
    """CLIPVisionModel (also `CLIPModel.vision_model`): quick-GELU MLP, no layer scale, `pre_layrnorm` before the
    blocks, `post_layernorm` applied to the pooled CLS token only; [CLS, patches]."""
    return ArchitectureDescription(
        model_type=config.model_type,
        family="CLIP",
        layers="encoder.layers",
        final_norm="post_layernorm",
        last_hidden_state_normed=False,
        num_prefix_tokens=1,
        has_cls_token=True,
        patch_size=_patch_size(config),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        block=BlockDescription(
            **_CLIP_BLOCK_NAMES, mlp=MlpDescription(kind="plain", activation=config.hidden_act, **_FC_PROJECTIONS)
        ),
        pooling="cls",
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        embed_tokens=_embed_clip,
    )


def _describe_siglip(config: PretrainedConfig) -> ArchitectureDescription:
    """SiglipVisionModel and Siglip2VisionModel: tanh-GELU MLP, no layer scale, no CLS token (patches only); the
    attention-pooling `head` reads the normed tokens and is never adapted."""
    embed = _embed_siglip2 if config.model_type == "siglip2_vision_model" else _embed_interpolated
    return ArchitectureDescription(
        model_type=config.model_type,
        family="SigLIP 2" if config.model_type == "siglip2_vision_model" else "SigLIP",
        layers="encoder.layers",
        final_norm="post_layernorm",
        last_hidden_state_normed=True,
        num_prefix_tokens=0,
        has_cls_token=False,
        patch_size=_patch_size(config),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        block=BlockDescription(
            **_CLIP_BLOCK_NAMES, mlp=MlpDescription(kind="plain", activation=config.hidden_act, **_FC_PROJECTIONS)
        ),
        pooling="head" if getattr(config, "vision_use_head", True) else "mean",
        image_mean=_HALF,
        image_std=_HALF,
        embed_tokens=embed,
    )


def _describe_vit(config: PretrainedConfig) -> ArchitectureDescription:
    """ViTModel and DeiTModel: GELU MLP, no layer scale, blocks at the model root (`layers`); [CLS, patches], DeiT
    [CLS, distillation, patches]. The `pooler` is never adapted."""
    deit = config.model_type == "deit"
    return ArchitectureDescription(
        model_type=config.model_type,
        family="DeiT" if deit else "ViT",
        layers="layers",
        final_norm="layernorm",
        last_hidden_state_normed=True,
        num_prefix_tokens=2 if deit else 1,
        has_cls_token=True,
        patch_size=_patch_size(config),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        block=BlockDescription(
            **_VIT_BLOCK_NAMES, mlp=MlpDescription(kind="plain", activation=config.hidden_act, **_FC_PROJECTIONS)
        ),
        pooling="cls",
        image_mean=IMAGENET_MEAN if deit else _HALF,
        image_std=IMAGENET_STD if deit else _HALF,
        embed_tokens=_embed_interpolated,
    )


_DESCRIBERS: dict[str, Callable[[PretrainedConfig], ArchitectureDescription]] = {
    "dinov2": _describe_dinov2,
    "dinov2_with_registers": _describe_dinov2,
    "dinov3_vit": _describe_dinov3,
    "clip_vision_model": _describe_clip,
    "siglip_vision_model": _describe_siglip,
    "siglip2_vision_model": _describe_siglip,
    "vit": _describe_vit,
    "deit": _describe_vit,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_DESCRIBERS)
SUPPORTED_FAMILIES: tuple[str, ...] = ("DINOv2", "DINOv3", "CLIP", "SigLIP", "SigLIP 2", "ViT", "DeiT")


def _unsupported(config: PretrainedConfig | None, what: str) -> ValueError:
    """Build the error for a model or config without a supported ViT backbone, naming the supported families."""
    if config is None:
        found = "is no transformers model"
    else:
        found = (
            f"has model_type={getattr(config, 'model_type', None)!r} ({type(config).__name__}) and no vision "
            "backbone of a supported family"
        )
    return ValueError(
        f"sinder-peft supports the ViT families {', '.join(SUPPORTED_FAMILIES)} (backbone model types "
        f"{list(SUPPORTED_MODEL_TYPES)}), but {what} {found}. Load a model of a supported family, e.g. "
        "`AutoModel.from_pretrained('facebook/dinov2-base')`."
    )


def backbone_config(config: PretrainedConfig) -> PretrainedConfig:
    """Return the config of the supported ViT backbone `config` describes: `config` itself when its `model_type` is
    registered, else its first registered sub-config (`CLIPConfig.vision_config`, `DepthAnythingConfig
    .backbone_config`, ...).

    Raises:
        ValueError: if neither `config` nor any of its sub-configs is of a supported family.
    """
    if getattr(config, "model_type", None) in _DESCRIBERS:
        return config
    for name in getattr(config, "sub_configs", {}):
        sub_config = getattr(config, name, None)
        if getattr(sub_config, "model_type", None) in _DESCRIBERS:
            return sub_config
    raise _unsupported(config, "this model's config")


def describe_config(config: PretrainedConfig) -> ArchitectureDescription:
    """Return the description of the ViT backbone `config` describes (see `backbone_config`).

    Raises:
        ValueError: if the config is not of a supported family, naming the supported ones.
    """
    config = backbone_config(config)
    return _DESCRIBERS[config.model_type](config)


def _backbone_depth(name: str) -> int:
    """Depth of a submodule named `name` (0 for the root)."""
    return name.count(".") + 1 if name else 0


def _is_backbone(module: nn.Module) -> bool:
    """Whether `module` is a transformers model of a registered family that holds its family's block list."""
    if not isinstance(module, PreTrainedModel):
        return False
    model_type = getattr(module.config, "model_type", None)
    if model_type not in _DESCRIBERS:
        return False
    try:
        blocks = module.get_submodule(_DESCRIBERS[model_type](module.config).layers)
    except AttributeError:
        return False
    return isinstance(blocks, nn.ModuleList)


def find_backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the path (from `model`, "" for `model` itself) and the module of the ViT backbone inside `model`.

    The backbone is the *shallowest* submodule (`model` included) that is a `PreTrainedModel` whose
    `config.model_type` is registered and that holds its family's block list. Shallowest first matters: DINOv3's
    encoder (`DINOv3ViTModel.model`, also its `base_model`) is itself a model of type `dinov3_vit`. Wrappers are
    searched through as plain modules: task models, `CLIPModel` (its `vision_model`), PEFT models.

    Raises:
        ValueError: if no supported backbone is found, naming the supported families.
    """
    found: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        depth = _backbone_depth(name)
        if (found is None or depth < found[0]) and _is_backbone(module):
            found = (depth, name, module)
    if found is None:
        models = [module for _, module in model.named_modules() if isinstance(module, PreTrainedModel)]
        config = models[0].config if models else getattr(model, "config", None)
        raise _unsupported(config, f"the model ({type(model).__name__})")
    return found[1], found[2]


def unwrap_backbone(model: nn.Module) -> nn.Module:
    """Return the bare ViT backbone inside `model` (see `find_backbone`): e.g. the `Dinov2Model` itself, the
    `vision_model` of a `CLIPModel`, the `backbone` of a `DepthAnythingForDepthEstimation`, through PEFT wrappers.

    Raises:
        ValueError: if no supported backbone is found.
    """
    return find_backbone(model)[1]


def describe_model(model: nn.Module) -> ArchitectureDescription:
    """Return the description of the backbone of `model` (any form `unwrap_backbone` accepts)."""
    return describe_config(unwrap_backbone(model).config)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the `nn.ModuleList` of transformer blocks of `model` (any form `unwrap_backbone` accepts)."""
    backbone = unwrap_backbone(model)
    return backbone.get_submodule(describe_config(backbone.config).layers)


def block_list_path(model: nn.Module) -> str:
    """Return the dotted path of the block list from `model` itself, e.g. `encoder.layer` for a `Dinov2Model`,
    `vision_model.encoder.layers` for a `CLIPModel`, `layers` for a `ViTModel`."""
    path, backbone = find_backbone(model)
    layers = describe_config(backbone.config).layers
    return f"{path}.{layers}" if path else layers
