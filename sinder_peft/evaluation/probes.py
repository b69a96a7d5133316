"""The probes of `sinder evaluate`, as pure functions on cached features: kNN classification and a linear dense probe.

kNN (the DINOv2 protocol): features are L2-normalised, the k training features with the largest cosine similarity
to a query vote for their class with weight exp(similarity / T), T = 0.07, and the class with the largest total
wins. One top-k search at the largest k serves every k.

Linear dense probe: a linear classifier (one weight matrix and bias, a 1×1 convolution) on frozen patch tokens,
standardised per channel with the training tokens' mean and standard deviation (what the BatchNorm in front of
DINOv2's linear segmentation head does on frozen features). Evaluation upsamples the patch logits bilinearly to the
mask size and scores every pixel whose label is not `IGNORE_INDEX`. Training minimises the pixel cross-entropy with
the logits upsampled by nearest neighbour (each pixel takes its patch's logits): that loss is exactly a patch-level
cross-entropy against the class histogram of the patch's pixels (`patch_label_counts`), which costs one row per patch
instead of one per pixel, so the probe trains in seconds.

Percentages are 0–100 throughout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DINOV2_KNN_TEMPERATURE = 0.07
DINOV2_KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
IGNORE_INDEX = 255
_QUERY_CHUNK = 1024
_COUNT_CHUNK = 64
"""Masks turned into patch histograms at once (bounds the int64 index tensors)."""
_EVALUATION_ELEMENTS = 2**23
"""Upper bound on logits × pixels held at once while scoring the probe (32 MiB of float32): one image of 150-class
logits at 224 px. Upsampling one image at a time is 1.8× faster on the CPU than four (docs/performance.md)."""


# ----------------------------------------------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------------------------------------------


def knn_class_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    device: torch.device | str | None = None,
) -> dict[int, torch.Tensor]:
    """Return the weighted kNN votes of every query for every class, for each k in `ks`.

    Features are L2-normalised here (so any scale may be passed in). For each query, the `max(ks)` training features
    of largest cosine similarity s are found once; the first k of them (most similar first) each add exp(s / T) to
    the score of their class.

    Args:
        train_features: [N, C] training features.
        train_labels: [N] class indices in [0, num_classes).
        query_features: [Q, C] features to classify.
        num_classes: number of classes.
        ks: numbers of neighbours; a k above N uses all N training features (logged).
        temperature: T of the vote weight.
        device: where to compute (default: where `train_features` is); the scores are returned on the CPU.

    Returns:
        `{k: scores}` with scores a float32 [Q, num_classes] tensor per k; the predicted class is its argmax.

    Raises:
        ValueError: on empty inputs, mismatched shapes, or a non-positive k or temperature.
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"Expected [N, C] training and [Q, C] query features, got {tuple(train_features.shape)} and "
            f"{tuple(query_features.shape)}."
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"Expected {train_features.shape[0]} training labels, got shape {tuple(train_labels.shape)}.")
    if train_features.shape[0] == 0 or not ks:
        raise ValueError("kNN needs at least one training feature and one k.")
    if min(ks) < 1 or temperature <= 0:
        raise ValueError(f"k must be positive and the temperature positive, got ks={list(ks)}, T={temperature}.")
    count = train_features.shape[0]
    if max(ks) > count:
        logger.warning("k = %d exceeds the %d training features; using all of them for those k.", max(ks), count)
    largest = min(max(ks), count)
    device = train_features.device if device is None else torch.device(device)
    bank = nn.functional.normalize(train_features.to(device).float(), dim=1)
    queries = nn.functional.normalize(query_features.to(device).float(), dim=1)
    labels = train_labels.to(device).long()
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        similarity = queries[start : start + _QUERY_CHUNK] @ bank.T
        top_similarity, top_index = similarity.topk(largest, dim=1, largest=True, sorted=True)
        votes = (
            nn.functional.one_hot(labels[top_index], num_classes).float()
            * torch.exp(top_similarity / temperature)[..., None]
        )
        cumulative = votes.cumsum(dim=1)
        for k in ks:
            scores[k].append(cumulative[:, min(k, largest) - 1].cpu())
    return {k: torch.cat(chunks) for k, chunks in scores.items()}


def knn_top1_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    ks: Sequence[int],
    temperature: float,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, float]:
    """Return the kNN top-1 accuracy (percent) of the queries for each k in `ks` (see `knn_class_scores`).

    `num_classes` defaults to one more than the largest label seen in either split.
    """
    if query_labels.shape != (query_features.shape[0],):
        raise ValueError(f"Expected {query_features.shape[0]} query labels, got shape {tuple(query_labels.shape)}.")
    if query_labels.numel() == 0:
        raise ValueError("kNN needs at least one query.")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_class_scores(
        train_features,
        train_labels,
        query_features,
        num_classes=num_classes,
        ks=ks,
        temperature=temperature,
        device=device,
    )
    targets = query_labels.long().cpu()
    return {k: float((score.argmax(dim=1) == targets).float().mean() * 100) for k, score in scores.items()}


# ----------------------------------------------------------------------------------------------------------------
# Linear dense probe
# ----------------------------------------------------------------------------------------------------------------


def patch_label_counts(
    masks: torch.Tensor, patch_size: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Return how many pixels of each class every patch holds: [N, H / p, W / p, num_classes] int16.

    Args:
        masks: [N, H, W] class indices, H and W multiples of `patch_size`; `ignore_index` pixels are not counted.
        patch_size: side p of a square patch in pixels (at most 181, so that p² fits in int16).
        num_classes: number of classes; every other label must be below it.

    Raises:
        ValueError: if the mask does not tile into patches or holds a label outside [0, num_classes) other than
            `ignore_index`.
    """
    count, height, width = masks.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"Masks of {height}×{width} pixels do not tile into {patch_size}-pixel patches.")
    if patch_size * patch_size > torch.iinfo(torch.int16).max:
        raise ValueError(f"Patches of {patch_size} pixels hold too many pixels to count in int16.")
    rows, columns = height // patch_size, width // patch_size
    per_image = rows * columns * num_classes
    # the bin of every pixel of an image, before its label is added: its patch's first class bin
    patch_index = torch.arange(height)[:, None] // patch_size * columns + torch.arange(width)[None, :] // patch_size
    patch_bins = patch_index * num_classes
    counts = torch.zeros(count, per_image, dtype=torch.int16)
    for start in range(0, count, _COUNT_CHUNK):
        labels = masks[start : start + _COUNT_CHUNK].to(torch.int64, copy=True)  # a copy: it is added to in place
        images = labels.shape[0]
        valid = labels != ignore_index
        if bool(((labels >= num_classes) | (labels < 0)).logical_and_(valid).any()):
            raise ValueError(f"Mask labels must be in [0, {num_classes}) or {ignore_index} (ignored).")
        # ignored pixels go to one extra bin past the chunk's last, dropped below
        unused_bin = images * per_image
        bins = labels.add_(patch_bins).add_(torch.arange(images)[:, None, None] * per_image)
        bins = bins.masked_fill_(~valid, unused_bin)
        chunk = torch.bincount(bins.flatten(), minlength=unused_bin + 1)[:unused_bin]
        counts[start : start + images] = chunk.view(images, per_image).to(torch.int16)
    return counts.view(count, rows, columns, num_classes)


@dataclass(frozen=True)
class LinearSegmentationProbe:
    """A trained linear classifier of patch tokens.

    Attributes:
        weight: [K, C] class weights (on standardised features).
        bias: [K] class biases.
        mean: [C] per-channel mean of the training tokens.
        std: [C] per-channel standard deviation of the training tokens (floored at 1e-6).
        losses: mean training loss of every epoch.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    losses: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self.weight.shape[0]

    def to(self, device: torch.device | str) -> LinearSegmentationProbe:
        """Return the probe with its tensors on `device`."""
        return LinearSegmentationProbe(
            self.weight.to(device), self.bias.to(device), self.mean.to(device), self.std.to(device), self.losses
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Return the class logits [B, K, h, w] of patch features [B, h, w, C] (any float dtype), on the probe's
        device."""
        standardised = (features.to(self.weight.device).float() - self.mean) / self.std
        return (standardised @ self.weight.T + self.bias).permute(0, 3, 1, 2)

    def predict(self, features: torch.Tensor, mask_size: tuple[int, int]) -> torch.Tensor:
        """Return per-pixel classes [B, H, W]: the logits upsampled bilinearly to `mask_size` (H, W), then argmax.

        The logits are upsampled in channels-last layout, which PyTorch's CPU kernel vectorizes over the classes
        (about twice as fast as channels-first for a 150-class probe, same values); `max(...).indices` gives the
        first largest class, as `argmax`, a quarter faster on the CPU.
        """
        logits = self.logits(features).contiguous(memory_format=torch.channels_last)
        upsampled = nn.functional.interpolate(logits, size=mask_size, mode="bilinear", align_corners=False)
        return upsampled.max(dim=1).indices


def patch_cross_entropy(logits: torch.Tensor, label_counts: torch.Tensor) -> torch.Tensor:
    """Return the mean pixel cross-entropy of patch logits upsampled by nearest neighbour, computed per patch.

    With `label_counts` the pixel-class histogram of every patch (`patch_label_counts`), every labelled pixel of a
    patch takes the patch's logits, so the pixel loss sums to −Σ_patches Σ_classes count · log_softmax(logits); this
    returns that sum divided by the number of labelled pixels.

    Args:
        logits: [..., K] patch logits.
        label_counts: [..., K] pixel counts per class of the same patches.

    Returns:
        A scalar tensor (0 when no pixel is labelled).
    """
    counts = label_counts.float()
    return -(counts * torch.log_softmax(logits, dim=-1)).sum() / counts.sum().clamp_min(1.0)


def channel_statistics(values: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-channel mean and standard deviation (float32, std floored at 1e-6) of [N, ..., C] values
    (patch features [N, h, w, C], CLS tokens [N, C]), accumulated in float64 a batch of images at a time, so that a
    large feature cache is normalized without a float64 copy of it."""
    channels = values.shape[-1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, values.shape[0], batch_size):
        chunk = values[start : start + batch_size].reshape(-1, channels).double()
        total += chunk.sum(dim=0)
        squares += (chunk * chunk).sum(dim=0)
    rows = values.numel() // channels
    mean = total / rows
    variance = (squares / rows - mean * mean).clamp_min(0.0)
    return mean.float(), variance.sqrt().float().clamp_min(1e-6)


def fit_minibatch_epochs(
    parameter_groups: list[dict[str, Any]],
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    count: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    description: str,
    show_progress: bool,
) -> list[float]:
    """Minimise `batch_loss` over `epochs` passes of `count` images, and return each epoch's pixel-weighted loss.

    The recipe of the linear probes: AdamW over `parameter_groups` (each group's own weight decay), learning rate
    annealed to 0 by a cosine over all steps, images shuffled every epoch by a generator seeded with `seed`, batches
    of `batch_size` images. `batch_loss(index)` returns the loss of the images `index` and the number of pixels it
    averages (the weight of that loss in the epoch's mean).
    """
    optimizer = torch.optim.AdamW(parameter_groups, lr=lr)
    steps_per_epoch = math.ceil(count / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(epochs), desc=description, unit="epoch", disable=not show_progress):
        order = torch.randperm(count, generator=generator)
        epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
        epoch_pixels = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, count, batch_size):
            loss, pixels = batch_loss(order[start : start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.detach().double() * pixels
            epoch_pixels += pixels
        losses.append(float(epoch_loss / epoch_pixels.clamp_min(1.0)))
    return losses


def train_linear_segmentation_probe(
    features: torch.Tensor,
    label_counts: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> LinearSegmentationProbe:
    """Train a linear classifier of patch tokens on the pixel labels of their patches.

    The loss is the pixel cross-entropy with nearest-neighbour upsampled logits (`patch_cross_entropy`), averaged over
    the labelled pixels of each batch. AdamW (weight decay on the weights, not the biases), learning rate annealed to
    0 by a cosine over all steps, images shuffled every epoch by a generator seeded with `seed`; the weights start at
    zero, so the result depends on nothing but the inputs and these settings.

    Args:
        features: [N, h, w, C] frozen patch features (float16 or float32).
        label_counts: [N, h, w, K] pixel counts per class (`patch_label_counts`).
        epochs, lr, weight_decay, batch_size, seed: the recipe (images per step for `batch_size`).
        device: where to train; the features stay where they are and each batch is moved there.
        show_progress: draw a progress bar over the epochs.

    Returns:
        The trained `LinearSegmentationProbe`, on the CPU.

    Raises:
        ValueError: if the shapes disagree, no pixel is labelled, or a setting is out of range.
    """
    if features.shape[:3] != label_counts.shape[:3]:
        raise ValueError(
            f"Features {tuple(features.shape)} and label counts {tuple(label_counts.shape)} cover different patches."
        )
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"Need epochs ≥ 1, batch_size ≥ 1 and lr > 0, got {epochs}, {batch_size}, {lr}.")
    if int(label_counts.sum()) == 0:
        raise ValueError("No labelled pixel to train the probe on (every mask pixel is ignored).")
    count, channels, num_classes = features.shape[0], features.shape[-1], label_counts.shape[-1]
    device = torch.device(device)
    mean, std = (statistic.to(device) for statistic in channel_statistics(features, batch_size))
    weight = torch.zeros(num_classes, channels, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)

    def batch_loss(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = features[index].to(device=device, dtype=torch.float32).reshape(-1, channels)
        counts = label_counts[index].to(device).reshape(-1, num_classes)
        # the standardisation folded into the classifier, so the tokens are not rewritten every step:
        # ((x - mean) / std) Wᵀ + b = x (W / std)ᵀ + (b - (W / std) mean)
        scaled = weight / std
        logits = torch.addmm(bias - scaled @ mean, tokens, scaled.T)
        return patch_cross_entropy(logits, counts), counts.sum(dtype=torch.float64)

    losses = fit_minibatch_epochs(
        [{"params": [weight], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}],
        batch_loss,
        count=count,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        description="linear probe",
        show_progress=show_progress,
    )
    logger.info("Linear probe: loss %.4f after epoch 1, %.4f after epoch %d.", losses[0], losses[-1], epochs)
    probe = LinearSegmentationProbe(
        weight=weight.detach(), bias=bias.detach(), mean=mean, std=std, losses=tuple(losses)
    )
    return probe.to("cpu")


def confusion_matrix(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Return the [K, K] int64 confusion matrix (rows: true class, columns: predicted) of the non-ignored pixels."""
    targets = targets.long()
    valid = targets != ignore_index
    pairs = targets[valid] * num_classes + predictions.long()[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def intersection_over_union(confusion: torch.Tensor) -> torch.Tensor:
    """Return the IoU of every class (percent, float64) from a confusion matrix: TP / (TP + FP + FN).

    A class that is neither present nor predicted has no IoU: NaN.
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1.0) * 100, torch.nan)


def mean_iou(per_class_iou: torch.Tensor) -> float:
    """Return the mean of the defined (non-NaN) class IoUs, as mmsegmentation's mIoU; NaN when none is defined."""
    defined = per_class_iou[~per_class_iou.isnan()]
    return float(defined.mean()) if defined.numel() else float("nan")


def evaluate_segmentation_probe(
    probe: LinearSegmentationProbe,
    features: torch.Tensor,
    masks: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return the confusion matrix (on the CPU) of the probe on [N, h, w, C] features against [N, H, W] masks.

    Logits are upsampled bilinearly to the mask size; pixels labelled `ignore_index` are left out. Images are scored
    a few at a time on `device`, so that the upsampled logits stay small in memory.
    """
    if features.shape[0] != masks.shape[0]:
        raise ValueError(f"Got features of {features.shape[0]} images and masks of {masks.shape[0]}.")
    mask_size = (masks.shape[1], masks.shape[2])
    per_chunk = max(1, _EVALUATION_ELEMENTS // (probe.num_classes * mask_size[0] * mask_size[1]))
    probe = probe.to(device)
    confusion = torch.zeros(probe.num_classes, probe.num_classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, features.shape[0], per_chunk):
            predictions = probe.predict(features[start : start + per_chunk], mask_size)
            targets = masks[start : start + per_chunk].to(device)
            confusion += confusion_matrix(predictions, targets, probe.num_classes, ignore_index)
    return confusion.cpu()
