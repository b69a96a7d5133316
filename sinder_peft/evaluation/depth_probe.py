"""The linear depth probe of `sinder evaluate`, as pure functions on cached features (after DINOv2's "lin. 1").

Input, as DINOv2's linear depth evaluation: every last-layer patch token concatenated with the image's CLS token,
standardised per channel with the training tokens' mean and standard deviation (the BatchNorm in front of DINOv2's
head on frozen features), through one linear map. Its outputs stand for depth in one of three ways (`DepthHead`):

- `linear` (the default): one output, the depth in metres;
- `log`: one output, the log depth;
- `bins`: DINOv2's head, the logits of `bins` depth bins spread uniformly (or log-spaced) between `min_depth` and
  `max_depth`, normalised as AdaBins' "linear" strategy does (ReLU, plus 0.1, divided by their sum); the depth is the
  probability-weighted mean of the bin centres.

Training minimises DINOv2's scale-invariant log loss, sqrt(Var(g) + 0.15 · Mean(g)²) with g = log(predicted) −
log(true depth), over patches: each patch is compared with the mean log depth of its valid pixels and weighted by
their number (one row per patch instead of one per pixel, as the segmentation probe's patch loss). Scoring upsamples
the outputs of the patch grid bilinearly by 4 (DINOv2 upsamples the tokens by 4 before its head; the head being
affine, upsampling its outputs is the same), turns them into log depth, upsamples that bilinearly to the depth map
and exponentiates it: RMSE, AbsRel and δ < 1.25 are computed over each map's valid pixels (depth > 0), then averaged
over the images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .probes import channel_statistics, fit_minibatch_epochs

logger = logging.getLogger(__name__)

DINOV2_DEPTH_BINS = 256
DINOV2_DEPTH_UPSAMPLE = 4
ADABINS_LINEAR_EPS = 0.1
"""What AdaBins' "linear" normalisation adds to every ReLU'd logit before dividing by their sum."""
SCALE_INVARIANT_LAMBDA = 0.15
"""Weight of the squared mean log error in DINOv2's scale-invariant log loss (`SigLoss`)."""
DELTA_THRESHOLD = 1.25
BinSpacing = Literal["uniform", "log"]
DepthHead = Literal["linear", "log", "bins"]
"""`linear`: one output, the depth; `log`: one output, the log depth; `bins`: DINOv2's classification over bins."""
_EVALUATION_ELEMENTS = 2**23
"""Upper bound on outputs × upsampled cells, and on depth-map pixels, held at once while scoring."""


def depth_bin_centres(min_depth: float, max_depth: float, bins: int, spacing: BinSpacing = "uniform") -> torch.Tensor:
    """Return the `bins` depth values [bins] (float32) of the classification, from `min_depth` to `max_depth`.

    `uniform` is DINOv2's ("UD"); `log` spaces them evenly in log depth.

    Raises:
        ValueError: if the range is empty or not positive, or fewer than two bins are asked for.
    """
    if not 0 < min_depth < max_depth or bins < 2:
        raise ValueError(f"Need 0 < min_depth < max_depth and bins ≥ 2, got {min_depth}, {max_depth}, {bins}.")
    if spacing == "uniform":
        return torch.linspace(min_depth, max_depth, bins)
    if spacing == "log":
        return torch.exp(torch.linspace(math.log(min_depth), math.log(max_depth), bins))
    raise ValueError(f"Unknown bin spacing {spacing!r}: expected 'uniform' or 'log'.")


def bins_to_depth(logits: torch.Tensor, centres: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Return the depth of bin logits along `dim`: AdaBins' linear normalisation, then the weighted bin centres.

    p_k = (ReLU(l_k) + 0.1) / Σ_j (ReLU(l_j) + 0.1), depth = Σ_k p_k · c_k; the result lies between the smallest and
    the largest centre.
    """
    weights = torch.relu(logits) + ADABINS_LINEAR_EPS
    shape = [1] * logits.ndim
    shape[dim] = -1
    return (weights * centres.view(shape)).sum(dim=dim) / weights.sum(dim=dim)


def outputs_to_log_depth(
    outputs: torch.Tensor, head: DepthHead, centres: torch.Tensor | None, min_depth: float, dim: int = -1
) -> torch.Tensor:
    """Return the log depth the probe's outputs stand for, along `dim` (removed): the log of the output, floored at
    `min_depth`, for the `linear` head; the output itself for `log`; the log of `bins_to_depth` for `bins`."""
    if head == "linear":
        return torch.log(outputs.squeeze(dim).clamp_min(min_depth))
    if head == "log":
        return outputs.squeeze(dim)
    if centres is None:
        raise ValueError("The bins head needs its bin centres.")
    return torch.log(bins_to_depth(outputs, centres, dim))


def patch_log_depth_targets(depth: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean log depth of the valid pixels of every patch and their number.

    Args:
        depth: [N, H, W] depth maps in metres, H and W multiples of `patch_size`; pixels ≤ 0 are invalid.
        patch_size: side p of a square patch in pixels.

    Returns:
        `(log_depth, counts)`: [N, H / p, W / p] float32 each; `log_depth` is 0 where a patch has no valid pixel.

    Raises:
        ValueError: if the maps do not tile into patches.
    """
    count, height, width = depth.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"Depth maps of {height}×{width} pixels do not tile into {patch_size}-pixel patches.")
    rows, columns = height // patch_size, width // patch_size
    blocks = depth.float().reshape(count, rows, patch_size, columns, patch_size)
    valid = blocks > 0
    logs = torch.where(valid, torch.log(blocks.clamp_min(1e-12)), torch.zeros_like(blocks))
    counts = valid.sum(dim=(2, 4)).float()
    return logs.sum(dim=(2, 4)) / counts.clamp_min(1.0), counts


def scale_invariant_log_loss(
    predicted_log: torch.Tensor, target_log: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Return DINOv2's scale-invariant log loss sqrt(Var(g) + 0.15 · Mean(g)²), g = predicted − target log depth,
    with the mean and variance weighted by `weights` (valid pixels per patch; a weight of 0 leaves a patch out)."""
    total = weights.sum().clamp_min(1.0)
    difference = predicted_log - target_log
    mean = (weights * difference).sum() / total
    second = (weights * difference * difference).sum() / total
    variance = (second - mean * mean).clamp_min(0.0)
    return torch.sqrt(variance + SCALE_INVARIANT_LAMBDA * mean * mean + 1e-12)


@dataclass(frozen=True)
class LinearDepthProbe:
    """A trained linear depth probe of patch tokens concatenated with their image's CLS token.

    Attributes:
        patch_weight: [K, C] weights of the standardised patch token (K = 1 for the `linear` and `log` heads, the
            number of bins for `bins`).
        cls_weight: [K, C'] weights of the standardised CLS token.
        bias: [K] biases.
        patch_mean, patch_std: [C] per-channel statistics of the training patch tokens.
        cls_mean, cls_std: [C'] per-channel statistics of the training CLS tokens.
        head: what the outputs stand for (`DepthHead`).
        depth_range: [2] the smallest and largest depth (metres); predictions are clamped to it.
        centres: [K] depth of every bin (metres) for the `bins` head, None for the others.
        losses: mean training loss of every epoch.
    """

    patch_weight: torch.Tensor
    cls_weight: torch.Tensor
    bias: torch.Tensor
    patch_mean: torch.Tensor
    patch_std: torch.Tensor
    cls_mean: torch.Tensor
    cls_std: torch.Tensor
    head: DepthHead
    depth_range: torch.Tensor
    centres: torch.Tensor | None
    losses: tuple[float, ...]

    def to(self, device: torch.device | str) -> LinearDepthProbe:
        """Return the probe with its tensors on `device`."""
        tensors = (
            self.patch_weight,
            self.cls_weight,
            self.bias,
            self.patch_mean,
            self.patch_std,
            self.cls_mean,
            self.cls_std,
        )
        centres = self.centres.to(device) if self.centres is not None else None
        moved = (tensor.to(device) for tensor in tensors)
        return LinearDepthProbe(*moved, self.head, self.depth_range.to(device), centres, self.losses)

    @property
    def outputs(self) -> int:
        """Outputs per patch: 1 for the `linear` and `log` heads, the number of bins for `bins`."""
        return self.bias.shape[0]

    def logits(self, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Return the outputs [B, K, h, w] (log depth or bin logits) of patch features [B, h, w, C] and CLS
        features [B, C']."""
        device = self.bias.device
        standardised = (patches.to(device).float() - self.patch_mean) / self.patch_std
        image_term = ((cls.to(device).float() - self.cls_mean) / self.cls_std) @ self.cls_weight.T + self.bias
        logits = standardised @ self.patch_weight.T + image_term[:, None, None, :]
        return logits.permute(0, 3, 1, 2)

    def predict(self, patches: torch.Tensor, cls: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
        """Return depth maps [B, H, W] (metres, within `depth_range`) for `map_size` (H, W): the outputs upsampled
        bilinearly by 4, turned into log depth, upsampled bilinearly to the map, exponentiated and clamped."""
        logits = self.logits(patches, cls)
        size = (logits.shape[-2] * DINOV2_DEPTH_UPSAMPLE, logits.shape[-1] * DINOV2_DEPTH_UPSAMPLE)
        fine = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        log_depth = outputs_to_log_depth(fine, self.head, self.centres, float(self.depth_range[0]), dim=1)
        full = nn.functional.interpolate(log_depth[:, None], size=map_size, mode="bilinear", align_corners=False)
        return torch.exp(full[:, 0]).clamp(float(self.depth_range[0]), float(self.depth_range[1]))


def train_linear_depth_probe(
    patches: torch.Tensor,
    cls: torch.Tensor,
    log_depth: torch.Tensor,
    counts: torch.Tensor,
    *,
    head: DepthHead,
    depth_range: tuple[float, float],
    centres: torch.Tensor | None,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> LinearDepthProbe:
    """Train the linear depth probe on the mean log depth of every patch (`patch_log_depth_targets`).

    The loss is `scale_invariant_log_loss` of each batch's patches. AdamW (weight decay on the weights, not the
    biases), learning rate annealed to 0 by a cosine over all steps, images shuffled every epoch by a generator
    seeded with `seed`. The weights start at zero; the `linear` and `log` heads' bias at the training pixels' mean
    depth or mean log depth (their first prediction), the `bins` head's biases at one, so every bin starts active (a
    ReLU at 0 would pass no gradient) and the first prediction is the mean bin centre. The result depends on nothing
    but the inputs and these settings.

    Args:
        patches: [N, h, w, C] frozen patch features (float16 or float32).
        cls: [N, C'] the images' CLS features.
        log_depth, counts: [N, h, w] targets and valid pixels per patch (`patch_log_depth_targets`).
        head: what the outputs stand for (`DepthHead`).
        depth_range: the smallest and largest depth (metres), to which predictions are clamped.
        centres: [K] bin depths (`depth_bin_centres`) for the `bins` head; None for the others.
        epochs, lr, weight_decay, batch_size, seed: the recipe (images per step for `batch_size`).
        device: where to train; the features stay where they are and each batch is moved there.
        show_progress: draw a progress bar over the epochs.

    Returns:
        The trained `LinearDepthProbe`, on the CPU.

    Raises:
        ValueError: if the shapes disagree, no pixel is valid, or a setting is out of range.
    """
    if patches.shape[:3] != log_depth.shape or counts.shape != log_depth.shape or cls.shape[0] != patches.shape[0]:
        raise ValueError(
            f"Patch features {tuple(patches.shape)}, CLS features {tuple(cls.shape)}, targets "
            f"{tuple(log_depth.shape)} and counts {tuple(counts.shape)} cover different images or patches."
        )
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"Need epochs ≥ 1, batch_size ≥ 1 and lr > 0, got {epochs}, {batch_size}, {lr}.")
    if float(counts.sum()) == 0:
        raise ValueError("No valid depth pixel to train the depth probe on.")
    count, channels, cls_channels = patches.shape[0], patches.shape[-1], cls.shape[-1]
    device = torch.device(device)
    centres = centres.float().to(device) if centres is not None else None
    patch_mean, patch_std = (statistic.to(device) for statistic in channel_statistics(patches, batch_size))
    cls_mean, cls_std = (statistic.to(device) for statistic in channel_statistics(cls, batch_size))
    if (head == "bins") != (centres is not None):
        raise ValueError(f"The {head} head takes {'bin centres' if head == 'bins' else 'no bin centres'}.")
    outputs = centres.shape[0] if centres is not None else 1
    patch_weight = torch.zeros(outputs, channels, device=device, requires_grad=True)
    cls_weight = torch.zeros(outputs, cls_channels, device=device, requires_grad=True)
    mean_log_depth = float((log_depth.double() * counts).sum() / counts.double().sum())
    initial_bias = {"linear": math.exp(mean_log_depth), "log": mean_log_depth, "bins": 1.0}[head]
    bias = torch.full((outputs,), initial_bias, device=device, requires_grad=True)
    groups = [
        {"params": [patch_weight, cls_weight], "weight_decay": weight_decay},
        {"params": [bias], "weight_decay": 0.0},
    ]

    def batch_loss(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = patches[index].to(device=device, dtype=torch.float32)
        images = tokens.shape[0]
        tokens = tokens.reshape(images, -1, channels)
        weights = counts[index].to(device).reshape(images, -1)
        targets = log_depth[index].to(device).reshape(images, -1)
        # the standardisation folded into the linear layer, so the tokens are not rewritten every step
        scaled_patch = patch_weight / patch_std
        scaled_cls = cls_weight / cls_std
        image_bias = (cls[index].to(device=device, dtype=torch.float32) - cls_mean) @ scaled_cls.T + bias
        logits = tokens @ scaled_patch.T + (image_bias - scaled_patch @ patch_mean)[:, None, :]
        predicted_log = outputs_to_log_depth(logits, head, centres, depth_range[0])
        return scale_invariant_log_loss(predicted_log, targets, weights), weights.sum(dtype=torch.float64)

    losses = fit_minibatch_epochs(
        groups,
        batch_loss,
        count=count,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        description="depth probe",
        show_progress=show_progress,
    )
    logger.info("Depth probe: loss %.4f after epoch 1, %.4f after epoch %d.", losses[0], losses[-1], epochs)
    probe = LinearDepthProbe(
        patch_weight.detach(),
        cls_weight.detach(),
        bias.detach(),
        patch_mean,
        patch_std,
        cls_mean,
        cls_std,
        head,
        torch.tensor(depth_range, dtype=torch.float32, device=device),
        centres,
        tuple(losses),
    )
    return probe.to("cpu")


@dataclass(frozen=True)
class DepthErrorSums:
    """Running sums of every scored image's RMSE, AbsRel and δ < 1.25 (over its valid pixels), from which their
    means over the images follow (`depth_metrics`); images without a valid pixel are not counted."""

    images: int = 0
    pixels: int = 0
    rmse: float = 0.0
    abs_rel: float = 0.0
    delta1: float = 0.0

    def __add__(self, other: DepthErrorSums) -> DepthErrorSums:
        return DepthErrorSums(
            self.images + other.images,
            self.pixels + other.pixels,
            self.rmse + other.rmse,
            self.abs_rel + other.abs_rel,
            self.delta1 + other.delta1,
        )


def depth_error_sums(predicted: torch.Tensor, target: torch.Tensor) -> DepthErrorSums:
    """Return the error sums of [B, H, W] `predicted` against `target` depth (metres) over each image's valid target
    pixels (> 0), in float64: per image, RMSE = sqrt(mean((d − d*)²)), AbsRel = mean(|d − d*| / d*) and δ₁ = the share
    of pixels with max(d / d*, d* / d) < 1.25."""
    valid = target > 0
    truth = torch.where(valid, target.double(), torch.ones_like(target, dtype=torch.float64))
    guess = predicted.double().clamp_min(1e-12)
    ratio = torch.maximum(guess / truth, truth / guess)
    counts = valid.sum(dim=(1, 2))
    scored = counts > 0
    count = counts[scored].double()

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return (values * valid).sum(dim=(1, 2))[scored] / count

    return DepthErrorSums(
        images=int(scored.sum()),
        pixels=int(counts.sum()),
        rmse=float(per_image((guess - truth) ** 2).sqrt().sum()),
        abs_rel=float(per_image((guess - truth).abs() / truth).sum()),
        delta1=float(per_image((ratio < DELTA_THRESHOLD).double()).sum()),
    )


def depth_metrics(sums: DepthErrorSums) -> dict[str, float]:
    """Return `{"rmse": metres, "abs_rel": ratio, "delta1": fraction}`: the means over the images of their own
    metrics, as NYUd's usual evaluation code computes them (per image, then averaged).

    Raises:
        ValueError: if the sums hold no image with a valid pixel.
    """
    if sums.images == 0:
        raise ValueError("No valid depth pixel to score.")
    images = sums.images
    return {"rmse": sums.rmse / images, "abs_rel": sums.abs_rel / images, "delta1": sums.delta1 / images}


def evaluate_depth_probe(
    probe: LinearDepthProbe,
    patches: torch.Tensor,
    cls: torch.Tensor,
    depth: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    keep: int = 0,
) -> tuple[DepthErrorSums, torch.Tensor]:
    """Return the error sums of the probe on [N, h, w, C] patch and [N, C'] CLS features against [N, H, W] depth
    maps (0 = invalid), and the predicted maps of the first `keep` images ([keep, H, W], on the CPU, for figures).

    Images are scored a few at a time on `device`, so that the upsampled logits stay small in memory.
    """
    if not patches.shape[0] == cls.shape[0] == depth.shape[0]:
        raise ValueError(
            f"Got patch features of {patches.shape[0]} images, CLS features of {cls.shape[0]} and "
            f"{depth.shape[0]} depth maps."
        )
    map_size = (depth.shape[1], depth.shape[2])
    cells = patches.shape[1] * patches.shape[2] * DINOV2_DEPTH_UPSAMPLE**2
    per_chunk = max(1, _EVALUATION_ELEMENTS // max(probe.outputs * cells, map_size[0] * map_size[1]))
    probe = probe.to(device)
    sums = DepthErrorSums()
    kept = []
    with torch.no_grad():
        for start in range(0, patches.shape[0], per_chunk):
            predicted = probe.predict(patches[start : start + per_chunk], cls[start : start + per_chunk], map_size)
            sums = sums + depth_error_sums(predicted, depth[start : start + per_chunk].to(device))
            if start < keep:
                kept.append(predicted[: keep - start].cpu())
    kept_maps = torch.cat(kept) if kept else torch.zeros(0, *map_size)
    return sums, kept_maps
