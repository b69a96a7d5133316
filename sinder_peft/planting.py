"""Tiny models of every supported ViT family with one planted singular defect, and images that trigger it.

The construction is the demo's (`sinder_peft.demo`), applied through each family's `ArchitectureDescription`, so
that tests and benchmarks can check every family against a known answer without any download. Reserved orthonormal
directions of the residual stream, all orthogonal to the all-ones vector (LayerNorm's centring leaves them alone):
d (brightness), u (the defect direction), q (carried by no token) and, for CLIP only, r (see below).

* The patch embedding writes α · (mean normalized pixel value − threshold) along d, the threshold being a uniform
  grey of level `BRIGHTNESS_LEVEL` under the normalization of the family's image processor (ImageNet for DINOv2 and
  DINOv3, OpenAI's for CLIP, 0.5/0.5 for SigLIP, SigLIP 2, ViT and DeiT), so the same pictures trigger every family.
  α is the demo's gain (2) times the processor's mean std over ImageNet's, which makes the feature the same in pixel
  units for every family: with a smaller gain the ordinary tokens of a 0.5/0.5 family would be so short that their
  random spread along u hides the defect tokens from the detection test on images with many bright patches.
  The threshold goes into the patch projection's bias, or, for CLIP (whose patch convolution has none), into the
  patch rows of the position table. The rest of the embedding avoids span{d, u, q}; where there is a position table
  (every family but DINOv3, which has RoPE only), it gives the patch tokens a small spread along u.
* Blocks up to `defect_layer` are the identity (every projection zero), except for planted MLP units: before it a
  *silent* unit that reads q and writes along d (it never fires, but makes d the leading direction there); at it the
  defect unit, which reads κ·d and writes β·u, so bright patches become high-norm tokens along u. Gated MLPs get an
  up-projection row along q with bias 1, so the unit computes act(κ·d·x) as a plain one does.
* Families with layer scales get random per-channel scales in [0.1, 1] (as trained checkpoints have), and the planted
  output columns are divided by them, so each block writes exactly β·u: directions that ignored the layer scale
  would miss u.
* Blocks after `defect_layer` have random weights at the family's initializer range that neither read nor write
  d, u or q. Heads, necks, poolers and text towers keep the model's own (seeded) initialization.
* CLIP: its `pre_layrnorm` would scale every token to the same norm and turn the brightness *magnitude* into a ratio.
  The plant adds R·r (R = 1000) to every position row and sets `pre_layrnorm` to weight R/√N and bias −R·r, which
  makes it the identity on the un-normed tokens up to O(‖y‖²/R).

The planted blocks make `singular_defect_directions` recover u (|cos| > 0.999) from `defect_layer` on, and on
`generate_spot_image` pictures (white spots on the patch grid) the last layer's max/median patch-token norm is far
above 40. `build_planted_model` builds one, `save_planted_model` writes it with its family's image processor (PIL
back end, which loads without torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import BaseImageProcessor

from .architectures import ArchitectureDescription, describe_model, unwrap_backbone
from .defects import singular_defect_directions
from .demo import BRIGHTNESS_LEVEL, generate_demo_image
from .loading import IMAGENET_MEAN, IMAGENET_STD, ImageNormalization

PLANTED_FAMILIES: tuple[str, ...] = (
    "dinov2",
    "dinov2_registers",
    "dinov2_swiglu",
    "dinov2_backbone",
    "depth_anything",
    "dinov3",
    "dinov3_gated",
    "clip_vision",
    "clip",
    "siglip",
    "siglip2",
    "vit",
    "deit",
)
"""Families `build_planted_model` builds: the bare backbone of each supported family (DINOv2 in its three block
kinds), and models holding one (`Dinov2Backbone`, `DepthAnythingForDepthEstimation`, `CLIPModel`)."""

# Scales of the construction, those of the demo (see `sinder_peft.demo` for why they are what they are).
_BRIGHTNESS_GAIN = 2.0  # α under the ImageNet normalization (see `brightness_gain`)
_PLANT_READ = 7.0  # κ
_PLANT_WRITE = 7.0  # β
_SILENT_READ = 1.0
_SILENT_WRITE = 10.0
_BIAS_STD = 0.02
_EMBEDDING_STD = 0.004
_TOKEN_STD = 0.1
_DEFECT_SPREAD = 0.3
_LAYER_SCALE_RANGE = (0.1, 1.0)
_CLIP_PRE_NORM_OFFSET = 1000.0  # R

_NUM_HEADS = 4
_MLP_RATIO = 4

# Scales of `build_random_planted_dinov2`: the brightness gain, the trigger unit's read and write norms.
_HARD_BRIGHTNESS_GAIN = 4.0
_HARD_READ_GAIN = 10.0
_HARD_WRITE_GAIN = 128.0
# Scales of `build_sparse_unit_dinov2`: the unit fires where the normed token's d-coordinate exceeds 60 / 10 = 6.
_SPARSE_BRIGHTNESS_GAIN = 16.0
_SPARSE_READ_GAIN = 10.0
_SPARSE_THRESHOLD = 60.0
_SPARSE_WRITE_GAIN = 400.0


@dataclass
class PlantedModel:
    """A tiny model of one family with one planted defect, and the ground truth about it.

    Attributes:
        model: the whole model (e.g. a `CLIPModel`, not only its vision tower), float32, in eval mode.
        family: one of `PLANTED_FAMILIES`.
        direction: u, the unit defect direction written by the planted unit (hidden_size,).
        brightness_direction: d, the unit direction along which the patch embedding writes brightness.
        defect_layer: index of the block holding the planted unit (0-based, as `DefectAnalysis` counts layers).
        normalization: the mean/std of `image_processor`, which the brightness threshold was computed with.
        image_processor: the family's image processor (PIL back end) that `save_planted_model` saves.
        patch_size: side of a patch in pixels.
    """

    model: nn.Module
    family: str
    direction: torch.Tensor
    brightness_direction: torch.Tensor
    defect_layer: int
    normalization: ImageNormalization
    image_processor: BaseImageProcessor
    patch_size: int

    def planted_positions(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return the ground-truth defect patches of normalized images [B, 3, H·p, W·p] as a bool [B, H, W].

        A patch is a defect exactly when its brightness feature is positive, i.e. its mean normalized pixel value
        (over its pixels and channels) exceeds that of a uniform grey of level `BRIGHTNESS_LEVEL`.
        """
        brightness = nn.functional.avg_pool2d(pixel_values.float().mean(dim=1, keepdim=True), self.patch_size)
        return brightness[:, 0] > brightness_threshold(self.normalization)


def brightness_threshold(normalization: ImageNormalization, level: float = BRIGHTNESS_LEVEL) -> float:
    """Return the normalized brightness (mean over channels) of a uniform grey of `level` under `normalization`."""
    return sum((level - mean) / std for mean, std in zip(normalization.mean, normalization.std, strict=True)) / 3


def default_patch_size(family: str) -> int:
    """Return the patch size `build_planted_model` uses by default: 14 for DINOv2 and the models holding one (as
    the released checkpoints have), 16 for the others."""
    _check_family(family)
    return 14 if family.startswith("dinov2") or family == "depth_anything" else 16


def _check_family(family: str) -> None:
    """Raise a ValueError naming the families when `family` is not one of `PLANTED_FAMILIES`."""
    if family not in PLANTED_FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {list(PLANTED_FAMILIES)}.")


# ----------------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------------


def _dinov2_config(
    family: str, hidden_size: int, num_layers: int, patch_size: int, image_size: int
) -> transformers.PretrainedConfig:
    """The `Dinov2Config` (or `Dinov2WithRegistersConfig`) of the DINOv2 families."""
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": _NUM_HEADS,
        "mlp_ratio": _MLP_RATIO,
        "image_size": image_size,
        "patch_size": patch_size,
        "use_swiglu_ffn": family == "dinov2_swiglu",
    }
    if family == "dinov2_registers":
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
    if family in ("dinov2_backbone", "depth_anything"):
        # Every block's output is a feature map, the last four for Depth Anything's neck.
        out_indices = list(range(1, num_layers + 1))[-4:] if family == "depth_anything" else None
        return transformers.Dinov2Config(out_indices=out_indices, reshape_hidden_states=False, **common)
    return transformers.Dinov2Config(**common)


def _build_model(family: str, hidden_size: int, num_layers: int, patch_size: int, image_size: int) -> nn.Module:
    """Instantiate the random-init model of `family` (weights drawn from torch's global generator)."""
    vision = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": _NUM_HEADS,
        "intermediate_size": _MLP_RATIO * hidden_size,
        "patch_size": patch_size,
    }
    if family.startswith("dinov2") or family == "depth_anything":
        config = _dinov2_config(family, hidden_size, num_layers, patch_size, image_size)
        if family == "dinov2_backbone":
            return transformers.Dinov2Backbone(config)
        if family == "depth_anything":
            maps = len(config.out_indices)
            return transformers.DepthAnythingForDepthEstimation(
                transformers.DepthAnythingConfig(
                    backbone_config=config,
                    patch_size=patch_size,
                    reassemble_hidden_size=hidden_size,
                    reassemble_factors=[4, 2, 1, 0.5][:maps],
                    neck_hidden_sizes=[16] * maps,
                    fusion_hidden_size=16,
                    head_hidden_size=8,
                )
            )
        if family == "dinov2_registers":
            return transformers.Dinov2WithRegistersModel(config)
        return transformers.Dinov2Model(config)
    builders: dict[str, Callable[[], nn.Module]] = {
        "dinov3": lambda: transformers.DINOv3ViTModel(
            transformers.DINOv3ViTConfig(image_size=image_size, num_register_tokens=4, **vision)
        ),
        "dinov3_gated": lambda: transformers.DINOv3ViTModel(
            transformers.DINOv3ViTConfig(
                image_size=image_size, num_register_tokens=4, use_gated_mlp=True, hidden_act="silu", **vision
            )
        ),
        "clip_vision": lambda: transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(image_size=image_size, **vision)
        ),
        "clip": lambda: transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config={
                    "hidden_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 64,
                    "vocab_size": 99,
                    "max_position_embeddings": 77,
                },
                vision_config={"image_size": image_size, **vision},
                projection_dim=16,
            )
        ),
        "siglip": lambda: transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(image_size=image_size, **vision)
        ),
        "siglip2": lambda: transformers.Siglip2VisionModel(
            transformers.Siglip2VisionConfig(num_patches=(image_size // patch_size) ** 2, **vision)
        ),
        "vit": lambda: transformers.ViTModel(transformers.ViTConfig(image_size=image_size, **vision)),
        "deit": lambda: transformers.DeiTModel(transformers.DeiTConfig(image_size=image_size, **vision)),
    }
    return builders[family]()


def build_tiny_model(
    family: str,
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    patch_size: int | None = None,
    image_size: int = 224,
) -> nn.Module:
    """Return a tiny random-init model of `family` (one of `PLANTED_FAMILIES`) in eval mode, without any plant.

    4 attention heads, MLP ratio 4, DINOv2/DINOv3 with 4 registers where the family has them, `CLIPModel` with a
    2-layer text tower of width 32. The weights are the model's own initialization, drawn with torch's generator
    seeded by `seed` inside a forked random state (the caller's random state is left untouched).

    Args:
        family: one of `PLANTED_FAMILIES`.
        seed: seed of the initialization.
        num_layers: number of blocks.
        hidden_size: residual width, a multiple of 16 (4 heads, RoPE needs a head size divisible by 4).
        patch_size: side of a patch; `default_patch_size(family)` when None.
        image_size: the native image side (a multiple of the patch size).
    """
    _check_family(family)
    patch_size = patch_size or default_patch_size(family)
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16, got {hidden_size}.")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(family, hidden_size, num_layers, patch_size, image_size)
    return model.eval()


def _image_processor(family: str, patch_size: int, image_size: int) -> BaseImageProcessor:
    """Return the family's image processor (PIL back end) for `image_size`-pixel square inputs.

    DINOv3's own processor has no PIL back end (it needs torchvision); a ViT processor with DINOv3's settings
    (resize to a square, bilinear, ImageNet mean/std) is used instead, which `AutoImageProcessor` loads anywhere.
    """
    square = {"height": image_size, "width": image_size}
    imagenet = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    if family == "depth_anything":
        return transformers.DPTImageProcessorPil(size=square, ensure_multiple_of=patch_size, **imagenet)
    if family.startswith("dinov2"):
        return transformers.BitImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square, **imagenet)
    if family.startswith("dinov3"):
        return transformers.ViTImageProcessorPil(size=square, resample=Image.Resampling.BILINEAR, **imagenet)
    if family.startswith("clip"):
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square)
    if family == "siglip":
        return transformers.SiglipImageProcessorPil(size=square)
    if family == "siglip2":
        return transformers.Siglip2ImageProcessorPil(
            patch_size=patch_size, max_num_patches=(image_size // patch_size) ** 2
        )
    if family == "deit":
        return transformers.DeiTImageProcessorPil(size=square, crop_size=square)
    return transformers.ViTImageProcessorPil(size=square)


# ----------------------------------------------------------------------------------------------------------------
# Planting
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EmbeddingLayout:
    """Where a family keeps the parameters of its embeddings, relative to the backbone.

    Attributes:
        projection: the patch projection (a Conv2d, or SigLIP 2's Linear over flattened patches).
        position_table: the absolute position embeddings (a parameter), or None (DINOv3: RoPE only).
        table_prefix_rows: rows of the position table before the patch rows (its CLS / distillation rows).
        tokens: the learned prefix tokens (CLS, registers, distillation token).
        pre_norm: a LayerNorm between the embeddings and the first block (CLIP's `pre_layrnorm`), or None.
    """

    projection: str
    position_table: str | None
    table_prefix_rows: int
    tokens: tuple[str, ...]
    pre_norm: str | None = None


_DINO_PROJECTION = "embeddings.patch_embeddings.projection"
_EMBEDDING_LAYOUTS: dict[str, _EmbeddingLayout] = {
    "dinov2": _EmbeddingLayout(_DINO_PROJECTION, "embeddings.position_embeddings", 1, ("embeddings.cls_token",)),
    "dinov2_with_registers": _EmbeddingLayout(
        _DINO_PROJECTION, "embeddings.position_embeddings", 1, ("embeddings.cls_token", "embeddings.register_tokens")
    ),
    "dinov3_vit": _EmbeddingLayout(
        "embeddings.patch_embeddings", None, 0, ("embeddings.cls_token", "embeddings.register_tokens")
    ),
    "clip_vision_model": _EmbeddingLayout(
        "embeddings.patch_embedding",
        "embeddings.position_embedding.weight",
        1,
        ("embeddings.class_embedding",),
        pre_norm="pre_layrnorm",
    ),
    "siglip_vision_model": _EmbeddingLayout(
        "embeddings.patch_embedding", "embeddings.position_embedding.weight", 0, ()
    ),
    "siglip2_vision_model": _EmbeddingLayout(
        "embeddings.patch_embedding", "embeddings.position_embedding.weight", 0, ()
    ),
    "vit": _EmbeddingLayout(_DINO_PROJECTION, "embeddings.position_embeddings", 1, ("embeddings.cls_token",)),
    "deit": _EmbeddingLayout(
        _DINO_PROJECTION,
        "embeddings.position_embeddings",
        2,
        ("embeddings.cls_token", "embeddings.distillation_token"),
    ),
}


def _reserved_directions(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Return `count` random orthonormal rows, all orthogonal to the all-ones vector (LayerNorm keeps them)."""
    basis = torch.cat([torch.ones(size, 1), torch.randn(size, count, generator=generator)], dim=1)
    orthonormal, _ = torch.linalg.qr(basis.double())
    return orthonormal[:, 1:].T.float().contiguous()


def _random(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Return a float32 tensor of N(0, std²) entries."""
    return torch.randn(shape, generator=generator) * std


def brightness_gain(normalization: ImageNormalization) -> float:
    """Return α, the brightness feature's gain per unit of normalized brightness: the demo's 2 for the ImageNet
    normalization, scaled by the normalization's mean std so the feature is the same in pixel units."""
    return _BRIGHTNESS_GAIN * sum(normalization.std) / sum(IMAGENET_STD)


def _set_embeddings(
    backbone: nn.Module,
    layout: _EmbeddingLayout,
    reserved: torch.Tensor,
    projector: torch.Tensor,
    normalization: ImageNormalization,
    generator: torch.Generator,
) -> None:
    """Write the brightness feature, the random rest of the embedding, and (CLIP) the pre-norm bypass."""
    brightness, defect = reserved[0], reserved[1]
    gain = brightness_gain(normalization)
    projection = backbone.get_submodule(layout.projection)
    hidden_size = projection.weight.shape[0]
    inputs_per_patch = projection.weight[0].numel()
    random_part = projector @ _random((hidden_size, inputs_per_patch), _EMBEDDING_STD, generator)
    # The random part ignores a patch's overall brightness, which only the brightness feature carries.
    random_part = random_part - random_part.mean(dim=1, keepdim=True)
    brightness_row = torch.full((inputs_per_patch,), gain / inputs_per_patch)
    projection.weight.copy_((random_part + torch.outer(brightness, brightness_row)).reshape(projection.weight.shape))
    threshold_offset = -gain * brightness_threshold(normalization) * brightness
    if projection.bias is not None:
        projection.bias.copy_(projector @ _random((hidden_size,), _BIAS_STD, generator) + threshold_offset)
        threshold_offset = torch.zeros(hidden_size)
    for name in layout.tokens:
        token = backbone.get_parameter(name)
        token.copy_(_random(tuple(token.shape), _TOKEN_STD, generator) @ projector)
    if layout.position_table is None:
        return
    table = backbone.get_parameter(layout.position_table)
    rows = table.view(-1, hidden_size)
    positions = _random(tuple(rows.shape), _TOKEN_STD, generator) @ projector
    # A natural spread of the patch tokens along u, as along any direction of a real model.
    spread = _random((rows.shape[0],), _DEFECT_SPREAD, generator)
    spread[: layout.table_prefix_rows] = 0.0
    positions = positions + spread[:, None] * defect
    positions[layout.table_prefix_rows :] += threshold_offset
    if layout.pre_norm is not None:
        bypass = reserved[3]
        positions += _CLIP_PRE_NORM_OFFSET * bypass
        pre_norm = backbone.get_submodule(layout.pre_norm)
        pre_norm.weight.fill_(_CLIP_PRE_NORM_OFFSET / math.sqrt(hidden_size))
        pre_norm.bias.copy_(-_CLIP_PRE_NORM_OFFSET * bypass)
    rows.copy_(positions)


def _fill_linear(
    linear: nn.Linear, std: float, generator: torch.Generator, *, reads: bool, writes: bool, projector: torch.Tensor
) -> None:
    """Set random weights (and bias) on `linear`, keeping the reserved directions out of the residual side(s)."""
    weight = _random(tuple(linear.weight.shape), std, generator)
    if reads:
        weight = weight @ projector
    if writes:
        weight = projector @ weight
    linear.weight.copy_(weight)
    if linear.bias is not None:
        bias = _random(tuple(linear.bias.shape), _BIAS_STD, generator)
        linear.bias.copy_(projector @ bias if writes else bias)


def _set_random_block(
    block: nn.Module,
    description: ArchitectureDescription,
    std: float,
    projector: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Random block that neither reads nor writes span{d, u, q}."""
    names = description.block
    mlp = block.get_submodule(names.mlp_prefix)
    for name in (names.query, names.key, names.value):
        _fill_linear(block.get_submodule(name), std, generator, reads=True, writes=False, projector=projector)
    _fill_linear(block.get_submodule(names.output), std, generator, reads=False, writes=True, projector=projector)
    for name in names.mlp.input_projections:
        _fill_linear(mlp.get_submodule(name), std, generator, reads=True, writes=False, projector=projector)
    output = mlp.get_submodule(names.mlp.output_projection)
    _fill_linear(output, std, generator, reads=False, writes=True, projector=projector)


def _clear_block(block: nn.Module) -> None:
    """Zero every projection weight and bias of `block`: the identity until units are planted into it."""
    for module in block.modules():
        if isinstance(module, nn.Linear):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()


def _set_unit(
    block: nn.Module,
    description: ArchitectureDescription,
    read: torch.Tensor,
    write: torch.Tensor,
    silent: torch.Tensor,
) -> None:
    """Make MLP hidden unit 0 of `block` read the row `read` (bias 0) and make the block write `write` with it.

    The output column is `write / γ₂` (the layer scale multiplies it back). A gated MLP's up-projection row reads
    q, which no token carries, with bias 1: the up factor is 1 on every real token.
    """
    names = description.block
    mlp = block.get_submodule(names.mlp_prefix)
    first = mlp.get_submodule(names.mlp.input_projections[0])
    first.weight[0] = read
    first.bias[0] = 0.0
    if names.mlp.kind == "gated":
        up = mlp.get_submodule(names.mlp.input_projections[1])
        up.weight[0] = _SILENT_READ * silent
        up.bias[0] = 1.0
    scale = torch.ones_like(write) if names.layer_scale2 is None else block.get_parameter(names.layer_scale2)
    mlp.get_submodule(names.mlp.output_projection).weight[:, 0] = write / scale


def _plant(model: nn.Module, defect_layer: int, normalization: ImageNormalization, seed: int) -> torch.Tensor:
    """Plant the defect into `model`'s backbone (in place); return the reserved directions (d, u, q[, r])."""
    backbone = unwrap_backbone(model)
    description = describe_model(model)
    layout = _EMBEDDING_LAYOUTS[description.model_type]
    generator = torch.Generator().manual_seed(seed)
    hidden_size = description.hidden_size
    reserved = _reserved_directions(hidden_size, 3 if layout.pre_norm is None else 4, generator)
    brightness, defect, silent = reserved[0], reserved[1], reserved[2]
    projector = torch.eye(hidden_size) - reserved.T @ reserved
    std = float(getattr(backbone.config, "initializer_range", 0.02))
    with torch.no_grad():
        _set_embeddings(backbone, layout, reserved, projector, normalization, generator)
        names = description.block
        for index, block in enumerate(backbone.get_submodule(description.layers)):
            for name in (names.norm1, names.norm2):
                block.get_submodule(name).weight.fill_(1.0)
                block.get_submodule(name).bias.zero_()
            for name in (names.layer_scale1, names.layer_scale2):
                if name is not None:
                    low, high = _LAYER_SCALE_RANGE
                    block.get_parameter(name).copy_(low + (high - low) * torch.rand(hidden_size, generator=generator))
            if index > defect_layer:
                _set_random_block(block, description, std, projector, generator)
                continue
            _clear_block(block)
            if index < defect_layer:
                _set_unit(block, description, _SILENT_READ * silent, _SILENT_WRITE * brightness, silent)
            else:
                _set_unit(block, description, _PLANT_READ * brightness, _PLANT_WRITE * defect, silent)
    return reserved


def build_planted_model(
    family: str,
    *,
    seed: int = 0,
    num_layers: int = 4,
    defect_layer: int = 1,
    hidden_size: int = 64,
    patch_size: int | None = None,
    image_size: int = 224,
) -> PlantedModel:
    """Build a tiny model of `family` with a planted defect at block `defect_layer` (see the module docstring).

    Args:
        family: one of `PLANTED_FAMILIES`.
        seed: seed of the model's initialization and of the plant; the same arguments always give the same model.
        num_layers: number of blocks.
        defect_layer: index of the block that holds the planted unit.
        hidden_size: residual width, a multiple of 16.
        patch_size: side of a patch; `default_patch_size(family)` when None. Trigger images need their white spots
            on this grid (`generate_spot_image`).
        image_size: the native image side (a multiple of the patch size); any multiple of the patch size runs.

    Returns:
        A `PlantedModel` holding the whole eval-mode float32 model, u, d, the defect layer and the family's image
        processor with the normalization the brightness threshold was computed with.
    """
    if not 0 <= defect_layer < num_layers:
        raise ValueError(f"defect_layer must be in [0, {num_layers}), got {defect_layer}.")
    patch_size = patch_size or default_patch_size(family)
    model = build_tiny_model(
        family, seed=seed, num_layers=num_layers, hidden_size=hidden_size, patch_size=patch_size, image_size=image_size
    )
    processor = _image_processor(family, patch_size, image_size)
    normalization = ImageNormalization(
        mean=tuple(float(value) for value in processor.image_mean),
        std=tuple(float(value) for value in processor.image_std),
    )
    reserved = _plant(model, defect_layer, normalization, seed)
    return PlantedModel(
        model=model.eval(),
        family=family,
        direction=reserved[1],
        brightness_direction=reserved[0],
        defect_layer=defect_layer,
        normalization=normalization,
        image_processor=processor,
        patch_size=patch_size,
    )


def _random_dinov2_with_brightness(
    seed: int, num_layers: int, swiglu: bool, hidden_size: int, brightness_gain: float
) -> tuple[transformers.Dinov2Model, torch.Tensor, torch.Tensor]:
    """Return a DINOv2 at transformers' random initialization (`initializer_range` 0.02, layer scale 1) whose patch
    embedding writes `brightness_gain` · (mean normalized pixel value − threshold) along a random unit direction d
    (its filters' own response along d projected out), with d and a second random unit direction u ⊥ d."""
    config = transformers.Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=_NUM_HEADS,
        mlp_ratio=_MLP_RATIO,
        image_size=224,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        initializer_range=0.02,
        hidden_act="gelu",
        layerscale_value=1.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        model = transformers.Dinov2Model(config)
    generator = torch.Generator().manual_seed(20_000 + seed)
    brightness, defect = _reserved_directions(hidden_size, 2, generator)
    with torch.no_grad():
        projection = model.embeddings.patch_embeddings.projection
        flat = projection.weight.reshape(hidden_size, -1)
        flat = flat - torch.outer(brightness, brightness @ flat)
        flat = flat + torch.outer(brightness, torch.full((flat.shape[1],), brightness_gain / flat.shape[1]))
        projection.weight.copy_(flat.reshape(projection.weight.shape))
        bias = projection.bias - brightness * (brightness @ projection.bias)
        threshold = brightness_threshold(ImageNormalization())
        projection.bias.copy_(bias - brightness_gain * threshold * brightness)
    return model, brightness, defect


def _middle_layer(num_layers: int, defect_layer: int | None) -> int:
    """Return `defect_layer`, or the middle block `num_layers // 2` when it is None, checked against the depth."""
    layer = num_layers // 2 if defect_layer is None else defect_layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"defect_layer must be in [0, {num_layers}), got {defect_layer}.")
    return layer


def _random_planted_model(
    model: transformers.Dinov2Model, swiglu: bool, defect: torch.Tensor, brightness: torch.Tensor, layer: int
) -> PlantedModel:
    """Return the `PlantedModel` of a random DINOv2 planted at block `layer` (ImageNet normalization, patch 14)."""
    return PlantedModel(
        model=model.eval(),
        family="dinov2_swiglu" if swiglu else "dinov2",
        direction=defect,
        brightness_direction=brightness,
        defect_layer=layer,
        normalization=ImageNormalization(),
        image_processor=_image_processor("dinov2", 14, 224),
        patch_size=14,
    )


def _set_trigger_unit(
    model: transformers.Dinov2Model, layer: int, swiglu: bool, read: torch.Tensor, bias: float, write: torch.Tensor
) -> None:
    """Make MLP hidden unit 0 of block `layer` compute act(read · x + bias) and write it along `write` (SwiGLU: its
    up row zero with bias 1, so that the unit computes silu(read · x + bias))."""
    mlp = model.encoder.layer[layer].mlp
    gate, output = (mlp.gate_proj, mlp.down_proj) if swiglu else (mlp.fc1, mlp.fc2)
    with torch.no_grad():
        gate.weight[0] = read
        gate.bias[0] = bias
        if swiglu:
            mlp.up_proj.weight[0] = 0.0
            mlp.up_proj.bias[0] = 1.0
        output.weight[:, 0] = write


def build_random_planted_dinov2(
    *,
    seed: int = 0,
    num_layers: int = 6,
    swiglu: bool = False,
    hidden_size: int = 96,
    defect_layer: int | None = None,
) -> PlantedModel:
    """Build a *harder* planted-defect DINOv2: every weight at transformers' own random initialization
    (`initializer_range` 0.02, layer scale 1), and one trigger unit in a middle block.

    Unlike `build_planted_model` (blocks up to the defect are the identity), nothing is zeroed or reserved: the
    patch embedding writes the brightness feature along a random direction d (its filters' own response along d
    projected out, gain `_HARD_BRIGHTNESS_GAIN`), and hidden unit 0 of block `defect_layer` (default: the middle
    one, `num_layers // 2`) reads `_HARD_READ_GAIN`·d and writes `_HARD_WRITE_GAIN`·u (SwiGLU: its up row zero with
    bias 1, so the unit computes silu(κ d·x)). Its output column becomes by far the largest singular value of that
    block's output projection, and the last-layer max/median norm of `generate_demo_image` pictures is in the
    hundreds. The repair has many ways here to make its loss small (steering the bright tokens upstream), which
    is where the paper's additive shifts move clean tokens and the `preserve` recipe does not (docs/method.md §7).

    Returns:
        A `PlantedModel` (family "dinov2" or "dinov2_swiglu", ImageNet normalization, patch 14, 224 px).
    """
    layer = _middle_layer(num_layers, defect_layer)
    model, brightness, defect = _random_dinov2_with_brightness(
        seed, num_layers, swiglu, hidden_size, _HARD_BRIGHTNESS_GAIN
    )
    _set_trigger_unit(model, layer, swiglu, _HARD_READ_GAIN * brightness, 0.0, _HARD_WRITE_GAIN * defect)
    return _random_planted_model(model, swiglu, defect, brightness, layer)


def build_sparse_unit_dinov2(
    *,
    seed: int = 0,
    num_layers: int = 8,
    swiglu: bool = False,
    hidden_size: int = 96,
    defect_layer: int | None = None,
    with_unit: bool = True,
) -> PlantedModel:
    """Build a random DINOv2 whose defect comes from a *sparse* unit that the weights' linearization does not see
    (a "register neuron", docs/method.md §9).

    Every weight is at transformers' random initialization (0.02, layer scale 1); the patch embedding writes
    brightness along d with gain `_SPARSE_BRIGHTNESS_GAIN` (so that on bright patches d dominates the normed token),
    and hidden unit 0 of block `defect_layer` (default `num_layers // 2`) computes act(`_SPARSE_READ_GAIN` · d·x −
    `_SPARSE_THRESHOLD`) and writes it along u with gain `_SPARSE_WRITE_GAIN`. The unit fires only on the patches
    of `generate_demo_image`'s white spots (1-3 % of them) and makes their last-layer norm about 90 times the median;
    but under the linearization's N(0, I) inputs it is almost never active (slope Φ(−6) ≈ 1e-9), so it adds nothing
    to the linear maps, and u is drawn orthogonal to d and to every weights' direction of the model without the
    unit: the weights' directions do not explain the high-norm tokens (|cos| near 0).

    Args:
        with_unit: False gives the same model without the unit: the reference a repair should come back to.

    Returns:
        A `PlantedModel` (family "dinov2" or "dinov2_swiglu", ImageNet normalization, patch 14, 224 px).
    """
    layer = _middle_layer(num_layers, defect_layer)
    model, brightness, candidate = _random_dinov2_with_brightness(
        seed, num_layers, swiglu, hidden_size, _SPARSE_BRIGHTNESS_GAIN
    )
    avoided = torch.linalg.qr(torch.stack([brightness, *singular_defect_directions(model)]).T.double()).Q.float()
    defect = nn.functional.normalize(candidate - avoided @ (avoided.T @ candidate), dim=0)
    if with_unit:
        read, write = _SPARSE_READ_GAIN * brightness, _SPARSE_WRITE_GAIN * defect
        _set_trigger_unit(model, layer, swiglu, read, -_SPARSE_THRESHOLD, write)
    return _random_planted_model(model, swiglu, defect, brightness, layer)


def save_planted_model(planted: PlantedModel, directory: str | Path) -> Path:
    """Write the planted model (`save_pretrained`) and its image processor to `directory`; return the directory.

    The result loads without sinder-peft (and without torchvision): `AutoModel` for the bare backbones and
    `CLIPModel`, `AutoModelForDepthEstimation` for Depth Anything, `Dinov2Backbone` itself for a `Dinov2Backbone`
    (`AutoModel` would build a `Dinov2Model`); `AutoImageProcessor` for the processor.
    """
    directory = Path(directory)
    planted.model.save_pretrained(directory)
    planted.image_processor.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Trigger images
# ----------------------------------------------------------------------------------------------------------------


def generate_spot_image(seed: int, size: int = 224, patch: int = 16) -> Image.Image:
    """Return the demo picture of `seed` (`sinder_peft.demo.generate_demo_image`) with its white spots on a
    `patch`-pixel grid: patch-16 models need whole white patches to fire. `patch=14` gives the demo image itself."""
    return generate_demo_image(seed, size, patch)


def spot_pixel_values(
    seeds: Sequence[int], normalization: ImageNormalization, *, size: int = 224, patch: int = 16
) -> torch.Tensor:
    """Return the `generate_spot_image` pictures of `seeds`, normalized with `normalization`, as a
    [len(seeds), 3, size, size] float32 tensor."""
    mean = torch.tensor(normalization.mean)[:, None, None]
    std = torch.tensor(normalization.std)[:, None, None]
    tensors = []
    for seed in seeds:
        array = np.asarray(generate_spot_image(seed, size, patch), dtype=np.float32) / 255.0
        tensors.append((torch.from_numpy(array).permute(2, 0, 1) - mean) / std)
    return torch.stack(tensors)
