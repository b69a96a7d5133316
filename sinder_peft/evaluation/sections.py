"""The sections of an evaluation, one model at a time: kNN, the dense linear probe and the defect statistics (the
depth probe and the unsupervised segmentation are in `dense_sections`).

`load_context` reads and checks the data layouts once; `evaluate_model` runs one model on every data set of the
context and returns its section of evaluation.json. Features and statistics go through the cache of `features`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.detection import DefectDirections, estimate_defect_directions
from ..analysis.direction_files import directions_from_tensors, directions_to_tensors
from ..analysis.directions import singular_defect_directions
from ..images.batching import spread_positions
from ..tuner.architectures import ImageNormalization, describe_model
from .arguments import DIRECTION_SAMPLE_IMAGES, EvaluationArguments
from .context import (
    CACHE_FOLDER,
    EvaluationContext,
    ModelResult,
    UnsupervisedData,
    image_shape,
    model_device,
    prepared_masks,
    split_features,
)
from .datasets import (
    load_classification_data,
    load_images,
    load_segmentation_data,
    load_segmentation_training_images,
    load_segmentation_validation,
    subsample,
)
from .dense_crf import load_dense_crf
from .dense_sections import depth_section, prepare_depth_maps, prepare_unsupervised_masks, unsupervised_section
from .depth_data import load_depth_data
from .features import FeatureCache, ProcessState, extract_defect_statistics, model_fingerprint
from .image_sources import PreparedImages
from .probes import (
    IGNORE_INDEX,
    evaluate_segmentation_probe,
    intersection_over_union,
    knn_top1_accuracy,
    mean_iou,
    patch_label_counts,
    train_linear_segmentation_probe,
)

logger = logging.getLogger(__name__)

DIRECTIONS_PREFIX = "directions."
"""Prefix of the chosen directions' tensors among the cached defect statistics."""


def load_context(args: EvaluationArguments, state: ProcessState | None) -> EvaluationContext:
    """Read and check the data layouts (not the images), before any model is loaded."""
    knn = None
    if args.knn_data:
        knn = load_classification_data(
            args.knn_data,
            train_split=args.train_split,
            val_split=args.val_split,
            image_column=args.image_column,
            label_column=args.label_column,
            max_train=args.knn_max_train,
            max_val=args.knn_max_val,
            seed=args.seed,
        )
    segmentation = None
    if args.seg_data:
        segmentation = load_segmentation_data(
            args.seg_data,
            train_split=args.train_split,
            val_split=args.val_split,
            image_column=args.image_column,
            annotation_column=args.annotation_column,
            reduce_zero_label=args.seg_reduce_zero_label,
            max_train=args.seg_max_train,
            max_val=args.seg_max_val,
            seed=args.seed,
        )
    defect_images, defect_source = None, None
    if args.defect_max_images > 0:
        if args.defect_data:
            defect_images = load_images(args.defect_data, split=args.defect_split, image_column=args.image_column)
            defect_source = args.defect_data
        elif segmentation is not None:
            defect_images, defect_source = segmentation.val.images, f"validation images of {segmentation.source}"
        elif knn is not None:
            defect_images, defect_source = knn.val.images, f"validation images of {knn.source}"
        if defect_images is not None:
            defect_images = defect_images.select(spread_positions(len(defect_images), args.defect_max_images))
    depth = None
    if args.depth_data:
        depth = load_depth_data(
            args.depth_data,
            train_split=args.train_split,
            val_split=args.val_split,
            image_column=args.image_column,
            depth_column=args.depth_column,
            max_train=args.depth_max_train,
            max_val=args.depth_max_val,
            seed=args.seed,
        )
    unsupervised = None
    unsupervised_resolution = args.unsupervised_resolution or args.seg_resolution
    if args.unsupervised_data:
        split, reduce_zero_label = load_segmentation_validation(
            args.unsupervised_data,
            val_split=args.val_split,
            image_column=args.image_column,
            annotation_column=args.annotation_column,
            reduce_zero_label=args.unsupervised_reduce_zero_label,
            max_val=args.unsupervised_max_val,
            seed=args.seed,
        )
        train = None
        if args.unsupervised_protocol == "cause":
            train = load_segmentation_training_images(
                args.unsupervised_data,
                train_split=args.train_split,
                image_column=args.image_column,
                max_train=args.unsupervised_max_train,
                seed=args.seed,
            )
        unsupervised = UnsupervisedData(
            args.unsupervised_data, split, reduce_zero_label, unsupervised_resolution, train
        )
    elif segmentation is not None and args.unsupervised:
        train = None
        if args.unsupervised_protocol == "cause":
            keep = subsample(len(segmentation.train.images), args.unsupervised_max_train, args.seed)
            train = segmentation.train.images if keep is None else segmentation.train.images.select(keep)
        unsupervised = UnsupervisedData(
            segmentation.source, segmentation.val, segmentation.reduce_zero_label, unsupervised_resolution, train
        )
    if unsupervised is not None and args.unsupervised_protocol == "cause" and args.cause_crf:
        load_dense_crf()  # a missing pydensecrf fails here, before any model runs
    cache_dir = args.cache_dir or str(Path(args.output_dir) / CACHE_FOLDER)
    return EvaluationContext(
        args, state, FeatureCache(cache_dir), knn, segmentation, defect_images, defect_source, depth, unsupervised
    )


def check_evaluation_data(args: EvaluationArguments) -> None:
    """Read and check the data layouts of `args` (not the images), without loading a model: a repair that ends with
    an evaluation calls this before training, so that a wrong layout fails at once, not after the repair.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: as `evaluate_models` would.
    """
    load_context(args, None)


def _knn_section(
    context: EvaluationContext, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> dict[str, Any] | None:
    """Return the `knn` section of one model (main process; None elsewhere)."""
    args, data = context.args, context.knn
    assert data is not None
    images = {"train": data.train.images, "val": data.val.images}
    splits = split_features(
        context, model, fingerprint, images, args.knn_resolution, normalization, with_patches=False, purpose="kNN"
    )
    if not context.is_main:
        return None
    train_valid, val_valid = splits["train"]["valid"], splits["val"]["valid"]
    by_k = knn_top1_accuracy(
        splits["train"]["cls"][train_valid],
        data.train.labels[train_valid],
        splits["val"]["cls"][val_valid],
        data.val.labels[val_valid],
        ks=args.knn_k,
        temperature=args.knn_temperature,
        num_classes=len(data.class_names),
        device=model_device(model),
    )
    return {
        "top1": by_k[args.knn_headline_k],
        "k": args.knn_headline_k,
        "by_k": {str(k): value for k, value in by_k.items()},
        "temperature": args.knn_temperature,
        "num_train": int(train_valid.sum()),
        "num_val": int(val_valid.sum()),
        "num_classes": len(data.class_names),
        "resolution": args.knn_resolution,
    }


def _masks(context: EvaluationContext, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return the train and validation masks for models of `patch_size`, and the number of classes.

    Raises:
        ValueError: the training masks hold fewer than two classes, or a label at or above --seg-num-classes.
    """
    if patch_size in context.masks:
        return context.masks[patch_size]
    data = context.segmentation
    assert data is not None
    resolution, reduce_zero_label = context.args.seg_resolution, data.reduce_zero_label
    train = prepared_masks(context, data.train, patch_size, resolution, reduce_zero_label)
    val = prepared_masks(context, data.val, patch_size, resolution, reduce_zero_label)
    present = torch.unique(train)
    present = present[present != IGNORE_INDEX]
    if present.numel() < 2:
        found = f"only class {int(present[0])}" if present.numel() else "no labelled pixel"
        raise ValueError(
            f"The training masks of {data.source!r} hold {found}; a segmentation probe needs at least two classes."
        )
    labels = torch.cat([train.unique(), val.unique()])
    largest = int(labels[labels != IGNORE_INDEX].max())
    num_classes = context.args.seg_num_classes or largest + 1
    if largest >= num_classes:
        raise ValueError(f"The masks hold the label {largest}, but --seg-num-classes is {num_classes}.")
    context.masks[patch_size] = (train, val, num_classes)
    return context.masks[patch_size]


def _segmentation_section(
    context: EvaluationContext, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> dict[str, Any] | None:
    """Return the `segmentation` section of one model (main process; None elsewhere)."""
    args, data = context.args, context.segmentation
    assert data is not None
    patch_size = describe_model(model).patch_size
    train_masks, val_masks, num_classes = _masks(context, patch_size)
    images = {"train": data.train.images, "val": data.val.images}
    splits = split_features(
        context,
        model,
        fingerprint,
        images,
        args.seg_resolution,
        normalization,
        with_patches=True,
        purpose="segmentation",
    )
    if not context.is_main:
        return None
    train_valid, val_valid = splits["train"]["valid"], splits["val"]["valid"]
    probe = train_linear_segmentation_probe(
        splits["train"]["patches"][train_valid],
        patch_label_counts(train_masks[train_valid], patch_size, num_classes),
        epochs=args.seg_epochs,
        lr=args.seg_lr,
        weight_decay=args.seg_weight_decay,
        batch_size=args.seg_batch_size,
        seed=args.seed,
        device=model_device(model),
    )
    confusion = evaluate_segmentation_probe(
        probe, splits["val"]["patches"][val_valid], val_masks[val_valid], device=model_device(model)
    )
    per_class = intersection_over_union(confusion)
    labelled = int(confusion.sum())
    return {
        "miou": mean_iou(per_class),
        "per_class_iou": [None if math.isnan(value) else value for value in per_class.tolist()],
        "pixel_accuracy": float(confusion.diagonal().sum()) / max(labelled, 1) * 100,
        "num_classes": num_classes,
        "num_train": int(train_valid.sum()),
        "num_val": int(val_valid.sum()),
        "resolution": args.seg_resolution,
        "final_training_loss": probe.losses[-1],
    }


def _defect_section(
    context: EvaluationContext, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> tuple[dict[str, Any] | None, list[torch.Tensor]]:
    """Return the `defects` section of one model and its last-layer norm maps (main process; None elsewhere)."""
    args, images = context.args, context.defect_images
    assert images is not None
    patch_size = describe_model(model).patch_size
    dataset = PreparedImages(images, args.defect_resolution, patch_size, normalization)
    key = {
        "model": fingerprint,
        "data": dataset.identity(),
        "defect_test": args.defect_test.to_dict(),
        "directions": args.directions,
        "direction_sample_images": DIRECTION_SAMPLE_IMAGES,
    }
    path = context.cache.path("defects", key)
    if path is not None and path.is_file():
        statistics = context.cache.load(path) if context.is_main else None
    else:
        directions = _defect_directions(model, dataset, args)
        statistics = extract_defect_statistics(
            model,
            dataset,
            directions,
            image_shape=image_shape(args.defect_resolution, patch_size),
            batch_size=args.batch_size,
            test=args.defect_test,
            num_workers=args.num_workers,
            state=context.state,
        )
        if context.is_main:
            statistics.update(
                {f"{DIRECTIONS_PREFIX}{name}": tensor for name, tensor in directions_to_tensors(directions).items()}
            )
            context.cache.save(path, statistics, key)
        context.wait()
    if not context.is_main:
        return None, []
    valid = statistics["valid"]
    if not bool(valid.any()):
        raise ValueError(f"None of the defect images ({context.defect_source}) could be read.")
    ratios = statistics["max_median_norm_ratio"][valid].double()
    first_layers = statistics["first_defective_layer"][valid]
    norms = statistics["last_layer_norms"][valid]
    tokens = norms.shape[1] * norms.shape[2]
    defective = first_layers[first_layers >= 0]
    high_norm_counts = statistics["high_norm_tokens"][valid].double()
    cosine_sums = statistics["high_norm_weights_cosine_sum"][valid].double().sum(dim=0)
    totals = high_norm_counts.sum(dim=0)
    section = {
        "norm_ratio": float(ratios[:, -1].mean()),
        "high_norm_share": float(statistics["high_norm_share"][valid][:, -1].double().mean() * 100),
        "defect_token_share": float(statistics["defect_tokens"][valid].sum()) / (tokens * len(norms)) * 100,
        "images_with_defects": float((first_layers >= 0).double().mean() * 100),
        "earliest_first_defective_layer": int(defective.min()) if defective.numel() else None,
        "per_layer_norm_ratio": ratios.mean(dim=0).tolist(),
        "images_with_high_norm_defects": float((high_norm_counts.sum(dim=1) > 0).double().mean() * 100),
        "per_layer_high_norm_tokens": (totals / len(norms)).tolist(),
        "per_layer_high_norm_weights_cosine": [
            float(total_cosine / count) if count > 0 else None
            for total_cosine, count in zip(cosine_sums.tolist(), totals.tolist(), strict=True)
        ],
        "directions": directions_from_tensors(
            {
                name.removeprefix(DIRECTIONS_PREFIX): tensor
                for name, tensor in statistics.items()
                if name.startswith(DIRECTIONS_PREFIX)
            },
            args.directions,
        ).to_dict(),
        "num_images": len(norms),
        "resolution": args.defect_resolution,
        "defect_test": args.defect_test.to_dict(),
    }
    return section, list(norms[: args.norm_map_images])


def _defect_directions(model: nn.Module, dataset: PreparedImages, args: EvaluationArguments) -> DefectDirections:
    """Return `model`'s defect directions chosen by `args.directions` on the first `DIRECTION_SAMPLE_IMAGES`
    readable images of `dataset` (every process computes the same, from the same images)."""
    parameter = next(model.parameters())
    items = (dataset[index] for index in range(min(len(dataset), DIRECTION_SAMPLE_IMAGES)))
    batches = (
        item["pixel_values"][None].to(device=parameter.device, dtype=parameter.dtype)
        for item in items
        if item is not None
    )
    return estimate_defect_directions(
        model, batches, args.directions, singular_defect_directions(model), min_tokens=args.min_tokens
    )


def evaluate_model(
    context: EvaluationContext, name: str, model: nn.Module, normalization: ImageNormalization
) -> ModelResult | None:
    """Evaluate one model on every data set of the context (in eval mode, restored afterwards)."""
    training = model.training
    model.eval()
    fingerprint = model_fingerprint(model)
    logger.info("Evaluating %s (fingerprint %s).", name, fingerprint)
    patch_size = describe_model(model).patch_size
    try:
        entry: dict[str, Any] = {"model": name}
        result = ModelResult(entry, patch_size)
        # masks and depth maps are read and checked first, so that a bad one stops the run before any model has run
        if context.depth is not None:
            prepare_depth_maps(context, patch_size)
        if context.unsupervised is not None:
            prepare_unsupervised_masks(context, patch_size)
        segmentation = None
        if context.segmentation is not None:
            segmentation = _segmentation_section(context, model, fingerprint, normalization)
        if context.knn is not None:
            entry["knn"] = _knn_section(context, model, fingerprint, normalization)
        if context.segmentation is not None:
            entry["segmentation"] = segmentation
        if context.depth is not None:
            entry["depth"], result.depth_maps, result.depth_truth = depth_section(
                context, model, fingerprint, normalization
            )
        if context.unsupervised is not None:
            entry["unsupervised"] = unsupervised_section(context, model, fingerprint, normalization)
        if context.defect_images is not None:
            entry["defects"], result.norm_maps = _defect_section(context, model, fingerprint, normalization)
    finally:
        model.train(training)
    return result if context.is_main else None
