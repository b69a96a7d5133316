"""The image processor saved with a repaired model.

`AutoImageProcessor.from_pretrained` and `pipeline("image-feature-extraction")` need a `preprocessor_config.json`
next to the weights, as every `facebook/dinov2-*` repository has. A repaired model keeps its source model's processor
unchanged (same class, same settings: the repair does not change what the model expects). A source without one (the
demo model, a bare `save_pretrained` directory) gets the processor of DINOv2 checkpoints, `BitImageProcessor`, set
to what the repair itself fed the model: resize to a short side of `resolution` (bicubic), centre-crop a square of
that side, normalize with the repair's mean and std. It is written by the PIL implementation, `BitImageProcessorPil`,
which needs no torchvision; its config names `BitImageProcessor`, which `AutoImageProcessor` loads with torchvision
(fast implementation) or without (PIL implementation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import BitImageProcessorPil

from ..tuner.architectures import ImageNormalization

IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"


def bit_image_processor(
    normalization: ImageNormalization,
    short_side: int,
    crop_size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> BitImageProcessorPil:
    """Return the `BitImageProcessor` that resizes the short side to `short_side` with `resample`, centre-crops
    `crop_size` (height, width), scales pixel values to [0, 1] and normalizes them with `normalization`."""
    return BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": short_side},
        resample=resample,
        do_center_crop=True,
        crop_size={"height": crop_size[0], "width": crop_size[1]},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(normalization.mean),
        image_std=list(normalization.std),
        do_convert_rgb=True,
    )


def default_image_processor(normalization: ImageNormalization, resolution: int) -> BitImageProcessorPil:
    """Return the `BitImageProcessor` that reproduces the repair's own preprocessing at `resolution` (a multiple of
    the patch size): short side resized to `resolution` with bicubic resampling, centre crop `resolution` square,
    pixel values scaled to [0, 1] and normalized."""
    return bit_image_processor(normalization, resolution, (resolution, resolution))


def save_image_processor(
    directory: Path,
    source_config: dict[str, Any] | None,
    normalization: ImageNormalization,
    resolution: int,
) -> Path:
    """Write `directory/preprocessor_config.json` and return its path.

    Args:
        directory: the model directory.
        source_config: the source model's image processor config (`loading.load_image_processor_config`), written
            unchanged; None writes `default_image_processor(normalization, resolution)`.
        normalization: the mean and std the repair used.
        resolution: the side of the repair's square crops.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if source_config is None:
        default_image_processor(normalization, resolution).save_pretrained(directory)
    else:
        text = json.dumps(source_config, indent=2, sort_keys=True) + "\n"
        (directory / IMAGE_PROCESSOR_CONFIG).write_text(text, encoding="utf-8")
    return directory / IMAGE_PROCESSOR_CONFIG
