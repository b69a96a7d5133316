"""`sinder evaluate`: show in numbers that a repaired backbone lost its defects and kept its features.

For every model (a Hub id, a local directory, `demo`, or an in-memory model) and every data set given:

- kNN (`--knn-data`): DINOv2's kNN protocol on the CLS token after the final norm (`probes.knn_top1_accuracy`):
  top-1 accuracy for k = 10, 20, 100, 200, with k = 20 the headline.
- Dense linear probe (`--seg-data`): a linear classifier on frozen last-layer patch tokens, trained with a fixed,
  seeded recipe on the training split (`probes.train_linear_segmentation_probe`), scored as mIoU and per-class IoU
  on the validation split with logits upsampled bilinearly to the mask size and label 255 ignored.
- Defects (`--defect-data`, default: some validation images): the mean last-layer max/median token-norm ratio, the
  share of high-norm and of flagged defect tokens, and the ratio of every layer (`defects.find_defect_tokens`).

The output directory receives `evaluation.json`, `evaluation.md` (tables), `evaluation.png` (the models side by
side) and `norm_maps.png` (last-layer norm maps, one column per model), and `cache/` with the features: a second
run with other probe settings reads them instead of running the models. Percentages are 0–100.

Run it as `sinder evaluate MODEL [MODEL ...] ...`, `accelerate launch examples/evaluate.py ...` (several processes
share the feature extraction), `evaluate([...], output_dir=...)` for models by name, or `evaluate_models` for
models already in memory (what `sinder repair` uses for the original and the repaired model).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from torch import nn
from transformers import HfArgumentParser

from .architectures import describe_model
from .data import resize_and_crop, spread_positions
from .defects import estimate_defect_directions, singular_defect_directions
from .direction_sources import (
    DIRECTION_SOURCE_HELP,
    DefectDirections,
    DirectionSource,
    directions_from_tensors,
    directions_to_tensors,
)
from .evaluation_data import (
    ClassificationData,
    ImageSource,
    PreparedImages,
    SegmentationData,
    SegmentationSplit,
    load_classification_data,
    load_images,
    load_masks,
    load_segmentation_data,
)
from .features import (
    FeatureCache,
    ProcessState,
    extract_defect_statistics,
    extract_features,
    model_fingerprint,
)
from .loading import ImageNormalization, ModelNotAvailableError, load_backbone
from .probes import (
    DINOV2_KNN_KS,
    DINOV2_KNN_TEMPERATURE,
    IGNORE_INDEX,
    evaluate_segmentation_probe,
    intersection_over_union,
    knn_top1_accuracy,
    mean_iou,
    patch_label_counts,
    train_linear_segmentation_probe,
)
from .visualize import save_evaluation_comparison, save_norm_map_comparison

logger = logging.getLogger(__name__)

RESULTS_NAME = "evaluation.json"
TABLE_NAME = "evaluation.md"
COMPARISON_FIGURE_NAME = "evaluation.png"
NORM_MAPS_FIGURE_NAME = "norm_maps.png"
CACHE_FOLDER = "cache"
DEFECT_KERNEL = 3
DIRECTION_SAMPLE_IMAGES = 16
DIRECTIONS_PREFIX = "directions."
"""Prefix of the chosen directions' tensors among the cached defect statistics."""
"""The defect images on which each model's directions are chosen (`--directions`), the first ones of the data."""


@dataclass
class EvaluationArguments:
    """The settings of an evaluation; each field is also a command-line flag (`--knn-data`, …)."""

    output_dir: str = field(metadata={"help": "where to write evaluation.json, evaluation.md, the figures and cache/"})
    knn_data: str | None = field(
        default=None,
        metadata={
            "help": "kNN data: a folder train/<class>/… and val/<class>/…, or a 🤗 dataset with image and label "
            "columns (e.g. imagenet-1k)"
        },
    )
    seg_data: str | None = field(
        default=None,
        metadata={
            "help": "segmentation data: a folder train|val/images and train|val/masks (PNG class indices, 255 "
            "ignored, same stems), or a 🤗 dataset in the scene_parse_150 (ADE20k) layout"
        },
    )
    defect_data: str | None = field(
        default=None,
        metadata={
            "help": "images for the defect figures (a folder or a 🤗 dataset); default: the validation images of "
            "--seg-data, else of --knn-data"
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where features are cached (safetensors); default: OUTPUT_DIR/cache"}
    )
    batch_size: int = field(default=32, metadata={"help": "images per forward pass and process"})
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes per process (0: none)"})
    device: str | None = field(
        default=None, metadata={"help": "device of a single-process run (default: cuda if available, else cpu)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the subsampling and of the linear probe"})
    train_split: str = field(default="train", metadata={"help": "training split of 🤗 datasets"})
    val_split: str = field(default="validation", metadata={"help": "validation split of 🤗 datasets"})
    image_column: str = field(default="image", metadata={"help": "image column of 🤗 datasets"})
    label_column: str = field(default="label", metadata={"help": "class column of a 🤗 kNN dataset"})
    annotation_column: str = field(default="annotation", metadata={"help": "mask column of a 🤗 segmentation dataset"})
    knn_resolution: int = field(
        default=224, metadata={"help": "kNN images: short side resized to this, then the centre square (pixels)"}
    )
    knn_k: list[int] = field(
        default_factory=lambda: list(DINOV2_KNN_KS), metadata={"help": "numbers of neighbours to report"}
    )
    knn_headline_k: int = field(default=20, metadata={"help": "the k of the headline top-1 (one of --knn-k)"})
    knn_temperature: float = field(
        default=DINOV2_KNN_TEMPERATURE, metadata={"help": "T of the neighbour weight exp(similarity / T)"}
    )
    knn_max_train: int | None = field(
        default=None, metadata={"help": "use at most this many training images (random, seeded)"}
    )
    knn_max_val: int | None = field(
        default=None, metadata={"help": "use at most this many validation images (random, seeded)"}
    )
    seg_resolution: int = field(
        default=224,
        metadata={
            "help": "segmentation images: short side resized to this, then the centre square (448 or 518 for finer "
            "masks, at 4-5x the cost)"
        },
    )
    seg_epochs: int = field(default=10, metadata={"help": "linear probe: passes over the training images"})
    seg_lr: float = field(default=1e-3, metadata={"help": "linear probe: AdamW learning rate (cosine to 0)"})
    seg_weight_decay: float = field(default=1e-4, metadata={"help": "linear probe: AdamW weight decay"})
    seg_batch_size: int = field(default=16, metadata={"help": "linear probe: images per optimizer step"})
    seg_num_classes: int | None = field(
        default=None, metadata={"help": "number of classes (default: the largest label in the masks + 1)"}
    )
    seg_reduce_zero_label: bool | None = field(
        default=None,
        metadata={
            "help": "ignore label 0 and shift the others down by one (true/false; default: true for a 🤗 "
            "dataset, the ADE20k layout, false for a folder)"
        },
    )
    seg_max_train: int | None = field(
        default=None, metadata={"help": "use at most this many training images (random, seeded)"}
    )
    seg_max_val: int | None = field(
        default=None, metadata={"help": "use at most this many validation images (random, seeded)"}
    )
    defect_resolution: int = field(
        default=518, metadata={"help": "defect figures: short side resized to this, then the centre square"}
    )
    defect_max_images: int = field(
        default=16, metadata={"help": "defect figures: at most this many images, spread over the data (0: none)"}
    )
    defect_split: str = field(default="validation", metadata={"help": "split of a 🤗 --defect-data"})
    mask_thr: float = field(default=4.0, metadata={"help": "defect-token outlier threshold k (standard deviations)"})
    min_tokens: int = field(default=3, metadata={"help": "flagged tokens from which a layer counts as defective"})
    directions: DirectionSource = field(
        default="auto",
        metadata={
            "help": DIRECTION_SOURCE_HELP + f" Chosen per model on its first {DIRECTION_SAMPLE_IMAGES} defect images."
        },
    )
    norm_map_images: int = field(default=4, metadata={"help": "rows of norm_maps.png"})

    def __post_init__(self) -> None:
        if self.knn_headline_k not in self.knn_k:
            raise ValueError(f"--knn-headline-k {self.knn_headline_k} must be one of --knn-k {self.knn_k}.")
        positive = ("batch_size", "knn_resolution", "seg_resolution", "defect_resolution", "seg_epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")


@dataclass
class _Context:
    """What every model of one evaluation shares: the settings, the data, the cache and the processes."""

    args: EvaluationArguments
    state: ProcessState | None
    cache: FeatureCache
    knn: ClassificationData | None
    segmentation: SegmentationData | None
    defect_images: ImageSource | None
    defect_source: str | None
    masks: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        """Whether this is the process that runs the probes and writes the outputs."""
        return self.state is None or self.state.is_main_process

    def wait(self) -> None:
        """Wait for every process (a no-op in a single process)."""
        if self.state is not None and self.state.num_processes > 1:
            self.state.wait_for_everyone()


@dataclass
class _ModelResult:
    """One model's section of evaluation.json, and what its figures need."""

    entry: dict[str, Any]
    patch_size: int
    norm_maps: list[torch.Tensor] = field(default_factory=list)


def _load_context(args: EvaluationArguments, state: ProcessState | None) -> _Context:
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
    cache_dir = args.cache_dir or str(Path(args.output_dir) / CACHE_FOLDER)
    return _Context(args, state, FeatureCache(cache_dir), knn, segmentation, defect_images, defect_source)


def check_evaluation_data(args: EvaluationArguments) -> None:
    """Read and check the data layouts of `args` (not the images), without loading a model: a repair that ends with
    an evaluation calls this before training, so that a wrong layout fails at once, not after the repair.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: as `evaluate_models` would.
    """
    _load_context(args, None)


def _model_device(model: nn.Module) -> torch.device:
    """Return where the model's parameters are: the probes run there too."""
    return next(model.parameters()).device


def _image_shape(resolution: int, patch_size: int) -> tuple[int, int, int]:
    """Return the (3, S, S) shape of an image prepared with a square crop at `resolution`."""
    side = (resolution // patch_size) * patch_size
    return (3, side, side)


def _features(
    context: _Context,
    model: nn.Module,
    fingerprint: str,
    images: ImageSource,
    resolution: int,
    normalization: ImageNormalization,
    *,
    with_patches: bool,
    label: str,
) -> dict[str, torch.Tensor] | None:
    """Return the cached or freshly extracted features of `images` (on the main process; None elsewhere).

    Every process checks the cache before the extraction, whose gathers need every process, so the main process
    cannot write the entry before all have looked: they all take the same branch.
    """
    patch_size = describe_model(model).patch_size
    dataset = PreparedImages(images, resolution, patch_size, normalization)
    key = {"model": fingerprint, "data": dataset.identity(), "patches": with_patches}
    path = context.cache.path("features", key)
    if path is not None and path.is_file():
        return context.cache.load(path) if context.is_main else None
    features = extract_features(
        model,
        dataset,
        image_shape=_image_shape(resolution, patch_size),
        batch_size=context.args.batch_size,
        with_patches=with_patches,
        num_workers=context.args.num_workers,
        state=context.state,
        description=label,
    )
    if context.is_main:
        context.cache.save(path, features, key)
    context.wait()
    return features


def _split_features(
    context: _Context,
    model: nn.Module,
    fingerprint: str,
    images: dict[str, ImageSource],
    resolution: int,
    normalization: ImageNormalization,
    *,
    with_patches: bool,
    purpose: str,
) -> dict[str, dict[str, torch.Tensor] | None]:
    """Return `_features` of each named split of `images` (e.g. "train", "val"), its progress bar labelled
    "`purpose` `name`"."""
    return {
        name: _features(
            context,
            model,
            fingerprint,
            split,
            resolution,
            normalization,
            with_patches=with_patches,
            label=f"{purpose} {name}",
        )
        for name, split in images.items()
    }


def _knn_section(
    context: _Context, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> dict[str, Any] | None:
    """Return the `knn` section of one model (main process; None elsewhere)."""
    args, data = context.args, context.knn
    assert data is not None
    images = {"train": data.train.images, "val": data.val.images}
    splits = _split_features(
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
        device=_model_device(model),
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


def _split_masks(context: _Context, split: SegmentationSplit, patch_size: int) -> torch.Tensor:
    """Return the prepared masks of one split (cached, as they are read on every process)."""
    args, data = context.args, context.segmentation
    assert data is not None
    key = {
        "images": split.images.identity(),
        "masks": split.masks.identity(),
        "resolution": args.seg_resolution,
        "patch_size": patch_size,
        "reduce_zero_label": data.reduce_zero_label,
    }
    path = context.cache.path("masks", key)
    cached = context.cache.load(path)
    # Reading masks involves no collective operation: without this barrier a slower process could find the entry the
    # main process has just written, skip the barrier below, and leave the processes waiting at different points.
    context.wait()
    if cached is not None:
        return cached["masks"]
    masks = load_masks(split, args.seg_resolution, patch_size, data.reduce_zero_label, show_progress=context.is_main)
    if context.is_main:
        context.cache.save(path, {"masks": masks}, key)
    context.wait()
    return masks


def _masks(context: _Context, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return the train and validation masks for models of `patch_size`, and the number of classes.

    Raises:
        ValueError: the training masks hold fewer than two classes, or a label at or above --seg-num-classes.
    """
    if patch_size in context.masks:
        return context.masks[patch_size]
    data = context.segmentation
    assert data is not None
    train = _split_masks(context, data.train, patch_size)
    val = _split_masks(context, data.val, patch_size)
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
    context: _Context, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> dict[str, Any] | None:
    """Return the `segmentation` section of one model (main process; None elsewhere)."""
    args, data = context.args, context.segmentation
    assert data is not None
    patch_size = describe_model(model).patch_size
    train_masks, val_masks, num_classes = _masks(context, patch_size)
    images = {"train": data.train.images, "val": data.val.images}
    splits = _split_features(
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
        device=_model_device(model),
    )
    confusion = evaluate_segmentation_probe(
        probe, splits["val"]["patches"][val_valid], val_masks[val_valid], device=_model_device(model)
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
    context: _Context, model: nn.Module, fingerprint: str, normalization: ImageNormalization
) -> tuple[dict[str, Any] | None, list[torch.Tensor]]:
    """Return the `defects` section of one model and its last-layer norm maps (main process; None elsewhere)."""
    args, images = context.args, context.defect_images
    assert images is not None
    patch_size = describe_model(model).patch_size
    dataset = PreparedImages(images, args.defect_resolution, patch_size, normalization)
    key = {
        "model": fingerprint,
        "data": dataset.identity(),
        "mask_thr": args.mask_thr,
        "min_tokens": args.min_tokens,
        "kernel": DEFECT_KERNEL,
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
            image_shape=_image_shape(args.defect_resolution, patch_size),
            batch_size=args.batch_size,
            mask_thr=args.mask_thr,
            min_tokens=args.min_tokens,
            kernel=DEFECT_KERNEL,
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
        "images_with_high_norm_tokens": float((high_norm_counts.sum(dim=1) > 0).double().mean() * 100),
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


def _evaluate_model(
    context: _Context, name: str, model: nn.Module, normalization: ImageNormalization
) -> _ModelResult | None:
    """Evaluate one model on every data set of the context (in eval mode, restored afterwards)."""
    training = model.training
    model.eval()
    fingerprint = model_fingerprint(model)
    logger.info("Evaluating %s (fingerprint %s).", name, fingerprint)
    try:
        entry: dict[str, Any] = {"model": name}
        norm_maps: list[torch.Tensor] = []
        # the masks are read and checked first, so that a bad mask stops the run before any model has run
        segmentation = None
        if context.segmentation is not None:
            segmentation = _segmentation_section(context, model, fingerprint, normalization)
        if context.knn is not None:
            entry["knn"] = _knn_section(context, model, fingerprint, normalization)
        if context.segmentation is not None:
            entry["segmentation"] = segmentation
        if context.defect_images is not None:
            entry["defects"], norm_maps = _defect_section(context, model, fingerprint, normalization)
    finally:
        model.train(training)
    return _ModelResult(entry, describe_model(model).patch_size, norm_maps) if context.is_main else None


def _format(value: float | None, digits: int = 1) -> str:
    """Return `value` rounded for a table, or "–" when it was not measured."""
    return "–" if value is None else f"{value:.{digits}f}"


def evaluation_table(results: dict[str, Any]) -> str:
    """Return the Markdown of evaluation.md: a summary table of the models, then kNN by k and IoU by class."""
    entries = results["models"]
    lines = ["# Evaluation", ""]
    headline_k = next((entry["knn"]["k"] for entry in entries if "knn" in entry), None)
    columns = ["model"]
    if headline_k is not None:
        columns.append(f"kNN top-1, k = {headline_k} (%)")
    if any("segmentation" in entry for entry in entries):
        columns += ["mIoU (%)", "pixel accuracy (%)"]
    if any("defects" in entry for entry in entries):
        columns += [
            "max/median norm",
            "high-norm tokens (%)",
            "images with high-norm tokens (%)",
            "defect tokens (%)",
            "images with defects (%)",
        ]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in entries:
        row = [f"`{entry['model']}`"]
        if headline_k is not None:
            row.append(_format(entry.get("knn", {}).get("top1")))
        if "mIoU (%)" in columns:
            segmentation = entry.get("segmentation", {})
            row += [_format(segmentation.get("miou")), _format(segmentation.get("pixel_accuracy"))]
        if "max/median norm" in columns:
            defects = entry.get("defects", {})
            row += [
                _format(defects.get("norm_ratio"), 2),
                _format(defects.get("high_norm_share"), 2),
                _format(defects.get("images_with_high_norm_tokens")),
                _format(defects.get("defect_token_share"), 2),
                _format(defects.get("images_with_defects")),
            ]
        lines.append("| " + " | ".join(row) + " |")
    if headline_k is not None:
        ks = list(next(entry["knn"]["by_k"] for entry in entries if "knn" in entry))
        lines += ["", "## kNN top-1 (%) by k", "", "| model | " + " | ".join(f"k = {k}" for k in ks) + " |"]
        lines.append("|" + "---|" * (len(ks) + 1))
        for entry in entries:
            by_k = entry.get("knn", {}).get("by_k", {})
            lines.append(f"| `{entry['model']}` | " + " | ".join(_format(by_k.get(k)) for k in ks) + " |")
    segmented = [entry for entry in entries if "segmentation" in entry]
    if segmented:
        lines += [
            "",
            "## IoU (%) by class",
            "",
            "| class | " + " | ".join(f"`{e['model']}`" for e in segmented) + " |",
        ]
        lines.append("|" + "---|" * (len(segmented) + 1))
        for index in range(segmented[0]["segmentation"]["num_classes"]):
            values = [entry["segmentation"]["per_class_iou"][index] for entry in segmented]
            lines.append(f"| {index} | " + " | ".join(_format(value) for value in values) + " |")
    return "\n".join(lines) + "\n"


def _shown_images(images: ImageSource, resolution: int, patch_size: int) -> list[Image.Image]:
    """Return the readable images of `images` as the models saw them (the crop of `PreparedImages`)."""
    shown = []
    for index in range(len(images)):
        try:
            shown.append(resize_and_crop(images.load(index), resolution, patch_size, square=True))
        except (FileNotFoundError, ValueError):
            continue
    return shown


def _write_outputs(context: _Context, results: list[_ModelResult]) -> dict[str, Any]:
    """Write evaluation.json, evaluation.md and the figures; return the content of evaluation.json."""
    from . import __version__  # here, not at the top: the package may export this module's functions

    args = context.args
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = [result.entry for result in results]
    names = [entry["model"] for entry in entries]
    figures = [COMPARISON_FIGURE_NAME]
    scores: dict[str, list[float | None]] = {}
    if context.knn is not None:
        scores[f"kNN top-1, k = {args.knn_headline_k} (%)"] = [entry["knn"]["top1"] for entry in entries]
    if context.segmentation is not None:
        scores["mIoU (%)"] = [entry["segmentation"]["miou"] for entry in entries]
    layer_ratios = None
    if context.defect_images is not None:
        scores["last-layer max/median norm"] = [entry["defects"]["norm_ratio"] for entry in entries]
        layer_ratios = [entry["defects"]["per_layer_norm_ratio"] for entry in entries]
    save_evaluation_comparison(names, scores, output_dir / COMPARISON_FIGURE_NAME, layer_ratios)
    if context.defect_images is not None and results[0].norm_maps:
        pictures = _shown_images(context.defect_images, args.defect_resolution, results[0].patch_size)
        rows = min(len(pictures), *(len(result.norm_maps) for result in results))
        if rows and len({tuple(result.norm_maps[0].shape) for result in results}) == 1:
            maps = [[result.norm_maps[row] for result in results] for row in range(rows)]
            save_norm_map_comparison(pictures[:rows], maps, names, output_dir / NORM_MAPS_FIGURE_NAME)
            figures.append(NORM_MAPS_FIGURE_NAME)
    payload = {
        "models": entries,
        "data": {
            "knn": context.knn.source if context.knn is not None else None,
            "segmentation": context.segmentation.source if context.segmentation is not None else None,
            "defects": context.defect_source,
        },
        "settings": asdict(args),
        "figures": figures,
        "table": TABLE_NAME,
        "sinder_peft_version": __version__,
    }
    (output_dir / RESULTS_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    (output_dir / TABLE_NAME).write_text(evaluation_table(payload))
    logger.info("Evaluation written to %s.", output_dir / RESULTS_NAME)
    return payload


def evaluate_models(
    models: Sequence[tuple[str, nn.Module, ImageNormalization]],
    args: EvaluationArguments,
    state: ProcessState | None = None,
) -> dict[str, Any]:
    """Evaluate models already in memory and write the outputs to `args.output_dir`.

    Each model is evaluated where its parameters are (nothing is moved), in eval mode (its mode is restored
    afterwards). With a multi-process `state` (an `Accelerator` or `PartialState`), call this on every process: the
    feature extraction is shared, the probes run and the files are written on the main process.

    Args:
        models: `(name, model, normalization)` per model, in the order of the outputs, e.g.
            `[("facebook/dinov2-base", base, norm), ("repaired", merged, norm)]`. Names label the results only;
            the cache is keyed by the weights.
        args: the settings (data, probes, output directory).
        state: the Accelerate state of a multi-process run; None runs everything in this process.

    Returns:
        The content of evaluation.json on the main process, an empty dict on the others.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: a data set is missing or not in its layout, a mask does
            not fit its image, or the data holds a single class (raised before any model runs).
    """
    if not models:
        raise ValueError("No model to evaluate.")
    context = _load_context(args, state)
    results = [_evaluate_model(context, name, model, normalization) for name, model, normalization in models]
    if not context.is_main:
        context.wait()
        return {}
    payload = _write_outputs(context, [result for result in results if result is not None])
    context.wait()
    return payload


def _default_state(device: str | None) -> PartialState:
    """Return Accelerate's process state: several processes under `accelerate launch`/`torchrun`, else one."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (device is not None and torch.device(device).type == "cpu")
    return PartialState(cpu=cpu)


def run_evaluation(
    models: Sequence[str], args: EvaluationArguments, state: ProcessState | None = None
) -> dict[str, Any]:
    """Load each named model in turn (`loading.load_backbone`) and evaluate them all (see `evaluate_models`).

    Models are loaded one at a time, so only one is in memory at once. Without a `state`, Accelerate's process
    state is used: several processes when launched with `accelerate launch`, one otherwise. A single process runs
    on `args.device` (default: CUDA when available).

    Returns:
        The content of evaluation.json on the main process, an empty dict on the others.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError, ModelNotAvailableError: bad data or models (data
            layouts are checked before any model is loaded).
    """
    if not models:
        raise ValueError("No model to evaluate: pass one or more Hub ids, directories or 'demo'.")
    state = state if state is not None else _default_state(args.device)
    single_device = state.num_processes == 1 and args.device is not None
    device = torch.device(args.device) if single_device else state.device
    context = _load_context(args, state)
    results = []
    for name in models:
        backbone, normalization = load_backbone(name)
        results.append(_evaluate_model(context, name, backbone.to(device), normalization))
        del backbone
    if not context.is_main:
        context.wait()
        return {}
    payload = _write_outputs(context, [result for result in results if result is not None])
    context.wait()
    return payload


def evaluate(
    models: Sequence[str],
    *,
    output_dir: str | Path,
    knn_data: str | None = None,
    seg_data: str | None = None,
    defect_data: str | None = None,
    state: ProcessState | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate models named by Hub id, local directory or `"demo"`; the Python form of `sinder evaluate`.

    Args:
        models: the models, in the order of the outputs (usually the original, then its repair).
        output_dir: where evaluation.json, evaluation.md, the figures and the feature cache go.
        knn_data, seg_data, defect_data: the data sets (see `EvaluationArguments`); a section is left out when its
            data is not given.
        state: the Accelerate state of a multi-process run (default: Accelerate's own).
        settings: any other field of `EvaluationArguments`, e.g. `seg_epochs=20` or `knn_max_train=10000`.

    Returns:
        The content of evaluation.json (main process; an empty dict on the others).
    """
    args = EvaluationArguments(
        output_dir=str(output_dir), knn_data=knn_data, seg_data=seg_data, defect_data=defect_data, **settings
    )
    return run_evaluation(models, args, state)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_argument_parser(**kwargs: Any) -> HfArgumentParser:
    """Return the parser of `sinder evaluate`: MODEL [MODEL ...] and one flag per `EvaluationArguments` field."""
    parser = HfArgumentParser(EvaluationArguments, **kwargs)
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="Hub ids (facebook/dinov2-base, ...), model directories or 'demo'"
    )
    return parser


def arguments_from_namespace(namespace: argparse.Namespace) -> tuple[list[str], EvaluationArguments]:
    """Return the models and the `EvaluationArguments` of parsed command-line flags."""
    values = {item.name: getattr(namespace, item.name) for item in fields(EvaluationArguments)}
    return list(namespace.models), EvaluationArguments(**values)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `evaluate` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "evaluate",
        parents=[build_argument_parser(add_help=False)],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="kNN, linear segmentation probe and defect figures for one or more models, side by side",
        description=(
            "Evaluate models with a kNN classifier (--knn-data), a linear segmentation probe (--seg-data) and "
            "their defect figures (--defect-data, default: validation images). Writes evaluation.json, "
            "evaluation.md, evaluation.png and norm_maps.png to --output-dir."
        ),
    )
    parser.set_defaults(handler=run)
    return parser


def run(namespace: argparse.Namespace) -> int:
    """Run an evaluation from parsed flags, print its table, and return the exit code.

    Errors the user can fix (missing data, wrong layout, mask size, a single class, unavailable model) are printed
    as one line on stderr with exit code 1, without a traceback.
    """
    try:
        models, args = arguments_from_namespace(namespace)
        results = run_evaluation(models, args)
    except (FileNotFoundError, NotADirectoryError, ValueError, ModelNotAvailableError) as error:
        print(f"sinder evaluate: error: {error}", file=sys.stderr)
        return 1
    if results:
        print(evaluation_table(results))
        print(f"Results and figures in {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `examples/evaluate.py` (run it with `accelerate launch` or plain `python`)."""
    parser = build_argument_parser(prog="evaluate.py", description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
