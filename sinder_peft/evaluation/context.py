"""What every section of one evaluation shares: the settings, the data, the cache and the processes
(`EvaluationContext`), and the cached features and prepared masks that the sections read.

Every process checks the cache before an extraction, whose gathers need every process, so the main process cannot
write an entry before all have looked: they all take the same branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..tuner.architectures import ImageNormalization, describe_model
from .arguments import EvaluationArguments
from .datasets import ClassificationData, SegmentationData, SegmentationSplit, load_masks
from .depth_data import DepthData
from .features import FeatureCache, ProcessState, extract_features
from .image_sources import ImageSource, PreparedImages

CACHE_FOLDER = "cache"


@dataclass(frozen=True)
class UnsupervisedData:
    """The images and masks of the unsupervised segmentation: the validation split of `--unsupervised-data`, or of
    `--seg-data`; `reduce_zero_label` as for the segmentation data; the images' `resolution`; the training images
    that CAUSE fits on (`train`, without masks; None: the data has none, or the protocol is k-means)."""

    source: str
    val: SegmentationSplit
    reduce_zero_label: bool
    resolution: int
    train: ImageSource | None = None


@dataclass
class EvaluationContext:
    """What every model of one evaluation shares: the settings, the data, the cache and the processes."""

    args: EvaluationArguments
    state: ProcessState | None
    cache: FeatureCache
    knn: ClassificationData | None
    segmentation: SegmentationData | None
    defect_images: ImageSource | None
    defect_source: str | None
    depth: DepthData | None = None
    unsupervised: UnsupervisedData | None = None
    masks: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    prepared: dict[str, torch.Tensor] = field(default_factory=dict)
    """Prepared masks and depth maps by cache file name, so that a second model does not read them again."""

    @property
    def is_main(self) -> bool:
        """Whether this is the process that runs the probes and writes the outputs."""
        return self.state is None or self.state.is_main_process

    def wait(self) -> None:
        """Wait for every process (a no-op in a single process)."""
        if self.state is not None and self.state.num_processes > 1:
            self.state.wait_for_everyone()


@dataclass
class ModelResult:
    """One model's section of evaluation.json, and what its figures need."""

    entry: dict[str, Any]
    patch_size: int
    norm_maps: list[torch.Tensor] = field(default_factory=list)
    depth_maps: list[torch.Tensor] = field(default_factory=list)
    depth_truth: list[torch.Tensor] = field(default_factory=list)


def model_device(model: nn.Module) -> torch.device:
    """Return where the model's parameters are: the probes run there too."""
    return next(model.parameters()).device


def image_shape(resolution: int, patch_size: int) -> tuple[int, int, int]:
    """Return the (3, S, S) shape of an image prepared with a square crop at `resolution`."""
    side = (resolution // patch_size) * patch_size
    return (3, side, side)


def cached_features(
    context: EvaluationContext,
    model: nn.Module,
    fingerprint: str,
    images: ImageSource,
    resolution: int,
    normalization: ImageNormalization,
    *,
    with_patches: bool,
    label: str,
    mirrored: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Return the cached or freshly extracted features of `images`, or of their mirror images when `mirrored` (on
    the main process; None elsewhere)."""
    patch_size = describe_model(model).patch_size
    dataset = PreparedImages(images, resolution, patch_size, normalization, mirrored)
    key = {"model": fingerprint, "data": dataset.identity(), "patches": with_patches}
    path = context.cache.path("features", key)
    if path is not None and path.is_file():
        return context.cache.load(path) if context.is_main else None
    features = extract_features(
        model,
        dataset,
        image_shape=image_shape(resolution, patch_size),
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


def split_features(
    context: EvaluationContext,
    model: nn.Module,
    fingerprint: str,
    images: dict[str, ImageSource],
    resolution: int,
    normalization: ImageNormalization,
    *,
    with_patches: bool,
    purpose: str,
    mirrored: bool = False,
) -> dict[str, dict[str, torch.Tensor] | None]:
    """Return `cached_features` of each named split of `images` (e.g. "train", "val"), its progress bar labelled
    "`purpose` `name`"; of the mirror images when `mirrored`."""
    return {
        name: cached_features(
            context,
            model,
            fingerprint,
            split,
            resolution,
            normalization,
            with_patches=with_patches,
            label=f"{purpose} {name}" + (" (mirrored)" if mirrored else ""),
            mirrored=mirrored,
        )
        for name, split in images.items()
    }


def cached_tensor(context: EvaluationContext, kind: str, key: dict[str, Any], read: Any) -> torch.Tensor:
    """Return the tensor stored as `kind` under `key`, or `read()` (show_progress on the main process) stored there.

    Reading data involves no collective operation: without the first barrier a slower process could find the entry
    the main process has just written, skip the barrier after the write, and leave the processes waiting at
    different points.
    """
    path = context.cache.path(kind, key)
    name = path.name if path is not None else f"{kind}-{key}"
    if name in context.prepared:
        return context.prepared[name]
    cached = context.cache.load(path)
    context.wait()
    if cached is not None:
        context.prepared[name] = cached[kind]
        return cached[kind]
    tensor = read(show_progress=context.is_main)
    if context.is_main:
        context.cache.save(path, {kind: tensor}, key)
    context.wait()
    context.prepared[name] = tensor
    return tensor


def prepared_masks(
    context: EvaluationContext, split: SegmentationSplit, patch_size: int, resolution: int, reduce_zero_label: bool
) -> torch.Tensor:
    """Return the prepared masks [N, S, S] of one split (cached, as they are read on every process)."""
    key = {
        "images": split.images.identity(),
        "masks": split.masks.identity(),
        "resolution": resolution,
        "patch_size": patch_size,
        "reduce_zero_label": reduce_zero_label,
    }

    def read(show_progress: bool) -> torch.Tensor:
        return load_masks(split, resolution, patch_size, reduce_zero_label, show_progress=show_progress)

    return cached_tensor(context, "masks", key, read)
