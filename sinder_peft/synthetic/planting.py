"""Tiny models of every supported ViT family with one planted singular defect, and images that trigger it.

The construction is the demo's (`synthetic.demo`), applied through each family's `ArchitectureDescription`, so
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BaseImageProcessor

from ..tuner.architectures import IMAGENET_STD, ImageNormalization, describe_model, unwrap_backbone
from ..tuner.descriptions import ArchitectureDescription
from .demo import BRIGHTNESS_LEVEL, generate_demo_image
from .tiny_models import build_tiny_model, default_patch_size, tiny_image_processor

# Scales of the construction, those of the demo (see `sinder_peft.synthetic.demo` for why they are what they are).
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


def reserved_directions(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
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
    reserved = reserved_directions(hidden_size, 3 if layout.pre_norm is None else 4, generator)
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


def plant_defect(
    model: nn.Module, normalization: ImageNormalization, *, defect_layer: int = 1, seed: int = 0
) -> torch.Tensor:
    """Plant the defect of this module into `model` (in place), an existing model of a supported family whose
    images are normalized with `normalization`, e.g. the transformers version of a timm model of a given
    architecture, and return its unit defect direction u.

    Raises:
        ValueError: for a `defect_layer` outside the model, or a model of no supported family.
    """
    num_layers = describe_model(model).num_layers
    if not 0 <= defect_layer < num_layers:
        raise ValueError(f"defect_layer must be in [0, {num_layers}), got {defect_layer}.")
    return _plant(model, defect_layer, normalization, seed)[1].clone()


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
    processor = tiny_image_processor(family, patch_size, image_size)
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


def generate_spot_image(seed: int, size: int = 224, patch: int = 16) -> Image.Image:
    """Return the demo picture of `seed` (`sinder_peft.synthetic.demo.generate_demo_image`) with its white spots on a
    `patch`-pixel grid: patch-16 models need whole white patches to fire. `patch=14` gives the demo image itself."""
    return generate_demo_image(seed, size, patch)


def generate_block_image(seed: int, size: int = 224, patch: int = 14) -> Image.Image:
    """Return a flat grey picture with one white block: the grey is uniform in [0.37, 0.39] with a faint texture
    (±0.01), and the block covers 2×2 to 3×3 patches of the `patch`-pixel grid, two patches or more from the border.

    On `build_random_planted_dinov2(long_input=True)` models the block's patches are long from the embedding on (an
    input feature) and become defects at the planted block.
    """
    rng = np.random.default_rng(seed)
    texture = rng.uniform(-0.01, 0.01, size=(size // patch, size // patch, 1))
    picture = np.clip(rng.uniform(0.37, 0.39) + texture.repeat(patch, 0).repeat(patch, 1), 0.0, 1.0)
    picture = np.repeat(picture, 3, axis=2)
    grid = size // patch
    height, width = (int(value) for value in rng.integers(2, 4, size=2))
    top = int(rng.integers(2, grid - 2 - height + 1))
    left = int(rng.integers(2, grid - 2 - width + 1))
    picture[top * patch : (top + height) * patch, left * patch : (left + width) * patch] = 1.0
    return Image.fromarray(np.round(picture * 255).astype(np.uint8), mode="RGB")


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
