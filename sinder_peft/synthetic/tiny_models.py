"""Tiny random models of every supported ViT family (`build_tiny_model`), with the image processor of each
family (`tiny_image_processor`): what `planting` plants a defect into, built without any download."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import BaseImageProcessor

from ..tuner.architectures import IMAGENET_MEAN, IMAGENET_STD

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
NUM_HEADS = 4
MLP_RATIO = 4


def default_patch_size(family: str) -> int:
    """Return the patch size `build_planted_model` uses by default: 14 for DINOv2 and the models holding one (as
    the released checkpoints have), 16 for the others."""
    check_family(family)
    return 14 if family.startswith("dinov2") or family == "depth_anything" else 16


def check_family(family: str) -> None:
    """Raise a ValueError naming the families when `family` is not one of `PLANTED_FAMILIES`."""
    if family not in PLANTED_FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {list(PLANTED_FAMILIES)}.")


def _dinov2_config(
    family: str, hidden_size: int, num_layers: int, patch_size: int, image_size: int
) -> transformers.PretrainedConfig:
    """The `Dinov2Config` (or `Dinov2WithRegistersConfig`) of the DINOv2 families."""
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "mlp_ratio": MLP_RATIO,
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
        "num_attention_heads": NUM_HEADS,
        "intermediate_size": MLP_RATIO * hidden_size,
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
    check_family(family)
    patch_size = patch_size or default_patch_size(family)
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16, got {hidden_size}.")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(family, hidden_size, num_layers, patch_size, image_size)
    return model.eval()


def tiny_image_processor(family: str, patch_size: int, image_size: int) -> BaseImageProcessor:
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
