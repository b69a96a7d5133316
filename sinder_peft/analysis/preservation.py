"""How far a repair moved the features users consume: the output tokens after the final norm.

A repair should remove the defect tokens and leave everything else where it was. Two numbers say whether it did, on
the same images before and after:

* the **clean-token cosine**: the mean cosine between the original and the repaired output features of the *clean*
  patch tokens, those whose last-layer norm (raw block output, before the final norm) is below `CLEAN_NORM_FACTOR`
  times the image's median norm in the original model. Defect tokens are meant to move; the others are not.
* the **CLS cosine**: the mean cosine between the original and the repaired image-level feature
  (`ArchitectureDescription.pooled_features`: the normed CLS token, or SigLIP's pooled feature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..tuner.architectures import describe_model, unwrap_backbone

CLEAN_NORM_FACTOR = 4.0
"""A patch token is clean when its last-layer norm is below this many times the median norm of its image."""


@dataclass(frozen=True, eq=False)
class OutputFeatures:
    """A model's output features for a batch of images, on the CPU in float32.

    Attributes:
        patch_tokens: [B, N, C] the patch tokens after the final norm, in row-major grid order.
        pooled: [B, C'] the image-level feature (`ArchitectureDescription.pooled_features`).
    """

    patch_tokens: torch.Tensor
    pooled: torch.Tensor


def output_features(model: nn.Module, pixel_values: torch.Tensor) -> OutputFeatures:
    """Return the output features of `model` (any form `unwrap_backbone` accepts) for `pixel_values`, from one
    forward pass without gradient."""
    backbone = unwrap_backbone(model)
    description = describe_model(backbone)
    with torch.no_grad():
        tokens = description.final_tokens(backbone, pixel_values)
        pooled = description.pool(backbone, tokens)
    return OutputFeatures(
        patch_tokens=tokens[:, description.num_prefix_tokens :].float().cpu(), pooled=pooled.float().cpu()
    )


def clean_token_mask(last_layer_norms: torch.Tensor, factor: float = CLEAN_NORM_FACTOR) -> torch.Tensor:
    """Return the clean patch tokens, bool [B, H·W]: those whose norm in `last_layer_norms` [B, H, W] (the original
    model's last-layer patch-token norms, before the final norm) is below `factor` times their image's median."""
    flat = last_layer_norms.flatten(1)
    return flat < factor * flat.median(dim=1, keepdim=True).values


def clean_token_cosine(before: OutputFeatures, after: OutputFeatures, clean: torch.Tensor) -> float:
    """Return the mean cosine between the original (`before`) and repaired (`after`) patch tokens over the `clean`
    tokens (bool [B, N], see `clean_token_mask`); NaN when there is none."""
    cosines = nn.functional.cosine_similarity(before.patch_tokens, after.patch_tokens, dim=-1)
    selected = cosines[clean]
    return float(selected.mean()) if selected.numel() else float("nan")


def pooled_cosine(before: OutputFeatures, after: OutputFeatures) -> float:
    """Return the mean cosine between the original and repaired image-level features (the CLS cosine)."""
    return float(nn.functional.cosine_similarity(before.pooled, after.pooled, dim=-1).mean())
