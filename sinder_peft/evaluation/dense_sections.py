"""The dense sections of an evaluation beside the segmentation probe, one model at a time: the linear depth probe
(`--depth-data`) and the unsupervised segmentation (k-means on patch tokens or CAUSE, on the validation masks of
`--unsupervised-data` or `--seg-data`). Features go through the cache of `context`; depth maps and masks too.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ..images.preprocessing import resize_and_crop
from ..tuner.architectures import ImageNormalization, describe_model
from .cause import cause_class_counts, fit_cause, head_features
from .clustering import cluster_class_counts, matched_confusion, spherical_kmeans
from .context import (
    EvaluationContext,
    cached_tensor,
    model_device,
    prepared_masks,
    split_features,
)
from .depth_data import DepthSplit, load_depth_maps
from .depth_probe import (
    depth_bin_centres,
    depth_metrics,
    evaluate_depth_probe,
    patch_log_depth_targets,
    train_linear_depth_probe,
)
from .probes import IGNORE_INDEX, intersection_over_union, mean_iou

logger = logging.getLogger(__name__)

COLLAPSED_SHARE = 90.0
"""An unsupervised segmentation whose largest cluster holds this share of the labelled pixels (%) or more is reported
as collapsed (a warning)."""


def _depth_maps(context: EvaluationContext, split: DepthSplit, patch_size: int) -> torch.Tensor:
    """Return the prepared depth maps [N, S, S] of one split (metres, 0 = invalid; cached)."""
    args = context.args
    key = {
        "images": split.images.identity(),
        "depths": split.depths.identity(),
        "resolution": args.depth_resolution,
        "patch_size": patch_size,
        "min_depth": args.depth_min,
        "max_depth": args.depth_max,
        "crop": args.depth_crop,
    }

    def read(show_progress: bool) -> torch.Tensor:
        return load_depth_maps(
            split,
            args.depth_resolution,
            patch_size,
            min_depth=args.depth_min,
            max_depth=args.depth_max,
            crop=args.depth_crop,
            show_progress=show_progress,
        )

    return cached_tensor(context, "depth", key, read)


def prepare_depth_maps(context: EvaluationContext, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the training and validation depth maps for models of `patch_size` (read and checked before any model
    runs: the first call comes before the first model's features).

    Raises:
        ValueError: a depth map does not fit its image, or the training or validation maps hold no valid pixel.
    """
    data = context.depth
    assert data is not None
    train = _depth_maps(context, data.train, patch_size)
    val = _depth_maps(context, data.val, patch_size)
    for name, maps in (("training", train), ("validation", val)):
        if not bool((maps > 0).any()):
            raise ValueError(
                f"The {name} depth maps of {data.source!r} hold no valid pixel in [{context.args.depth_min}, "
                f"{context.args.depth_max}] m (PNG maps are read as millimetres, .npy maps as metres)."
            )
    return train, val


def depth_section(
    context: EvaluationContext, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> tuple[dict[str, Any] | None, list[torch.Tensor], list[torch.Tensor]]:
    """Return the `depth` section of one model, and its predicted and the true depth maps of the first
    `--depth-figure-images` readable validation images (main process; None, [] and [] elsewhere)."""
    args, data = context.args, context.depth
    assert data is not None
    patch_size = describe_model(model).patch_size
    train_maps, val_maps = prepare_depth_maps(context, patch_size)
    images = {"train": data.train.images, "val": data.val.images}
    splits = split_features(
        context,
        model,
        fingerprint,
        images,
        args.depth_resolution,
        normalization,
        with_patches=True,
        purpose="depth",
    )
    if not context.is_main:
        return None, [], []
    train, val = splits["train"], splits["val"]
    train_valid, val_valid = train["valid"], val["valid"]
    log_depth, counts = patch_log_depth_targets(train_maps[train_valid], patch_size)
    centres = None
    if args.depth_head == "bins":
        centres = depth_bin_centres(args.depth_min, args.depth_max, args.depth_bins, args.depth_bin_spacing)
    probe = train_linear_depth_probe(
        train["patches"][train_valid],
        train["cls"][train_valid],
        log_depth,
        counts,
        head=args.depth_head,
        depth_range=(args.depth_min, args.depth_max),
        centres=centres,
        epochs=args.depth_epochs,
        lr=args.depth_lr,
        weight_decay=args.depth_weight_decay,
        batch_size=args.depth_batch_size,
        seed=args.seed,
        device=model_device(model),
    )
    sums, shown = evaluate_depth_probe(
        probe,
        val["patches"][val_valid],
        val["cls"][val_valid],
        val_maps[val_valid],
        device=model_device(model),
        keep=args.depth_figure_images,
    )
    section = {
        **depth_metrics(sums),
        "num_train": int(train_valid.sum()),
        "num_val": int(val_valid.sum()),
        "valid_pixels": int(sums.pixels),
        "resolution": args.depth_resolution,
        "head": args.depth_head,
        **({"bins": args.depth_bins, "bin_spacing": args.depth_bin_spacing} if centres is not None else {}),
        "depth_range": [args.depth_min, args.depth_max],
        "final_training_loss": probe.losses[-1],
    }
    return section, list(shown), list(val_maps[val_valid][: len(shown)])


def prepare_unsupervised_masks(context: EvaluationContext, patch_size: int) -> torch.Tensor:
    """Return the validation masks of the unsupervised segmentation for models of `patch_size` (checked before any
    model runs).

    Raises:
        ValueError: the masks hold fewer than two classes, or fewer pixels than the clusters need.
    """
    data = context.unsupervised
    assert data is not None
    masks = prepared_masks(context, data.val, patch_size, data.resolution, data.reduce_zero_label)
    present = torch.unique(masks)
    present = present[present != IGNORE_INDEX]
    if present.numel() < 2:
        raise ValueError(
            f"The validation masks of {data.source!r} hold {present.numel()} class(es); unsupervised segmentation "
            "needs at least two."
        )
    return masks


def _sampled_tokens(patches: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Return at most `limit` patch tokens [M, C] drawn at random (seeded) over every image of [N, h, w, C]."""
    flat = patches.reshape(-1, patches.shape[-1])
    if flat.shape[0] <= limit:
        return flat
    generator = torch.Generator().manual_seed(seed)
    return flat[torch.randperm(flat.shape[0], generator=generator)[:limit]]


def _kmeans_counts(
    context: EvaluationContext,
    patches: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor,
    clusters: int,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the [clusters, classes] pixel counts of k-means clusters of the validation patch tokens, and what the
    section says of them."""
    args = context.args
    centroids = spherical_kmeans(
        _sampled_tokens(patches, args.unsupervised_max_tokens, args.seed),
        clusters,
        restarts=args.unsupervised_restarts,
        seed=args.seed,
        device=device,
    )
    return cluster_class_counts(patches, centroids, masks, classes, IGNORE_INDEX, device), {"protocol": "kmeans"}


def _cause_counts(
    context: EvaluationContext,
    model: nn.Module,
    fingerprint: str,
    normalization: ImageNormalization,
    val: dict[str, torch.Tensor] | None,
    train: dict[str, torch.Tensor] | None,
    masks: torch.Tensor,
    classes: torch.Tensor,
    clusters: int,
) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """Return the [clusters, classes] pixel counts of CAUSE's clusters on the validation images, and what the
    section says of them (main process; None elsewhere). CAUSE fits on the training images' features `train`, or
    on the validation images' `val` when the data has no training images."""
    args, data = context.args, context.unsupervised
    assert data is not None
    mirrored = {"val": None}
    if args.cause_mirror:
        mirrored = split_features(
            context,
            model,
            fingerprint,
            {"val": data.val.images},
            data.resolution,
            normalization,
            with_patches=True,
            purpose="unsupervised",
            mirrored=True,
        )
    if not context.is_main:
        return None
    assert val is not None
    valid = val["valid"]
    if train is not None and bool(train["valid"].any()):
        fit_patches, fit_on = train["patches"][train["valid"]], "train"
    else:
        logger.warning("CAUSE fits on the validation images of %s: the data has no training images.", data.source)
        fit_patches, fit_on = val["patches"][valid], "val"
    device = model_device(model)
    head, centroids = fit_cause(
        fit_patches,
        clusters,
        concepts=args.cause_concepts,
        clusterbook_epochs=args.cause_clusterbook_epochs,
        head_epochs=args.cause_head_epochs,
        probe_epochs=args.cause_probe_epochs,
        batch_size=args.cause_batch_size,
        lr=args.cause_lr,
        weight_decay=args.cause_weight_decay,
        max_grad_norm=args.cause_max_grad_norm,
        seed=args.seed,
        device=device,
    )
    features = head_features(
        head,
        val["patches"][valid],
        mirrored["val"]["patches"][valid] if mirrored["val"] is not None else None,
        batch_size=args.cause_batch_size,
        device=device,
    )
    positions = valid.nonzero().flatten().tolist()
    patch_size = describe_model(model).patch_size

    def picture(index: int) -> np.ndarray:
        image = data.val.images.load(positions[index])
        return np.asarray(resize_and_crop(image, data.resolution, patch_size, square=True), dtype=np.uint8)

    counts = cause_class_counts(
        features,
        centroids,
        masks,
        classes,
        IGNORE_INDEX,
        picture=picture if args.cause_crf else None,
        batch_size=args.cause_batch_size,
        crf_processes=args.cause_crf_processes if args.cause_crf_processes is not None else os.cpu_count() or 1,
        device=device,
    )
    details = {
        "protocol": "cause",
        "fit_on": fit_on,
        "num_fit": fit_patches.shape[0],
        "concepts": args.cause_concepts,
        "mirrored": args.cause_mirror,
        "crf": args.cause_crf,
    }
    return counts, details


def unsupervised_section(
    context: EvaluationContext, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> dict[str, Any] | None:
    """Return the `unsupervised` section of one model (main process; None elsewhere): k-means or CAUSE clusters
    (`--unsupervised-protocol`), matched to the classes of the validation masks."""
    args, data = context.args, context.unsupervised
    assert data is not None
    patch_size = describe_model(model).patch_size
    masks = prepare_unsupervised_masks(context, patch_size)
    images = {"val": data.val.images, **({"train": data.train} if data.train is not None else {})}
    features = split_features(
        context, model, fingerprint, images, data.resolution, normalization, with_patches=True, purpose="unsupervised"
    )
    val = features["val"]
    if val is not None:
        masks = masks[val["valid"]]
    classes = torch.unique(masks)
    classes = classes[classes != IGNORE_INDEX]
    clusters = args.unsupervised_clusters or classes.numel()
    if args.unsupervised_protocol == "cause":
        train = features.get("train")
        counted = _cause_counts(context, model, fingerprint, normalization, val, train, masks, classes, clusters)
    elif val is not None:
        patches = val["patches"][val["valid"]]
        counted = _kmeans_counts(context, patches, masks, classes, clusters, model_device(model))
    else:
        counted = None
    if counted is None:
        return None
    counts, details = counted
    largest_share = float(counts.sum(dim=1).max()) / max(int(counts.sum()), 1) * 100
    if clusters > 1 and largest_share >= COLLAPSED_SHARE:
        logger.warning(
            "The unsupervised clusters (%s) collapsed: one of the %d holds %.1f %% of the labelled pixels.",
            details["protocol"],
            clusters,
            largest_share,
        )
    confusion = matched_confusion(counts)
    per_class = intersection_over_union(confusion)[: classes.numel()]
    return {
        "miou": mean_iou(per_class),
        "per_class_iou": {
            str(int(label)): None if math.isnan(value) else value
            for label, value in zip(classes.tolist(), per_class.tolist(), strict=True)
        },
        "pixel_accuracy": float(confusion.diagonal().sum()) / max(int(confusion.sum()), 1) * 100,
        "clusters": clusters,
        "largest_cluster_share": largest_share,
        "num_classes": classes.numel(),
        "num_val": int(val["valid"].sum()),
        "resolution": data.resolution,
        **details,
    }
