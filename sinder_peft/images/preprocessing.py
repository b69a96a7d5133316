"""Image preprocessing: one function, `prepare_image`, that every image of a diagnosis, repair or evaluation goes
through.

Resize so the short side is `resolution` (bicubic, antialiased, as torchvision's `Resize` does on PIL images),
centre-crop to whole patches, normalize (`tuner.architectures.ImageNormalization`, the family's or the checkpoint's
mean and std).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..tuner.architectures import ImageNormalization

MIN_GRID_SIDE = 3
"""Fewest patches per side: the defect detector never flags the border ring, so 3×3 leaves one token to judge."""

IMAGE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)
"""What PIL raises on files that are not (whole) images; `SyntaxError` is its parse error, e.g. a bad PNG checksum."""


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Return the (width, height) with the short side equal to `resolution`, computed as torchvision's `Resize`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if width <= height else (new_long, resolution)


def center_crop_box(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
    """Return the PIL box (left, top, right, bottom) of a centred crop, rounded as torchvision's `CenterCrop`."""
    left = int(round((width - crop_width) / 2.0))
    top = int(round((height - crop_height) / 2.0))
    return left, top, left + crop_width, top + crop_height


def resize_and_crop(image: Image.Image, resolution: int, patch_size: int, *, square: bool = False) -> Image.Image:
    """Return the RGB image exactly as the backbone sees it, before normalization (see `prepare_image`).

    Useful to draw a token map over the pixels it was computed from.

    Raises:
        ValueError: if the input is smaller than one patch, or the result is smaller than 3×3 patches.
    """
    width, height = image.size
    if min(width, height) < patch_size:
        raise ValueError(
            f"The image is {width}x{height} pixels (width x height), smaller than one {patch_size}x{patch_size} "
            "patch; it holds too little to diagnose."
        )
    image = image.convert("RGB")
    new_size = resized_size(width, height, resolution)
    if new_size != image.size:
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    if square:
        side = (resolution // patch_size) * patch_size
        crop_width, crop_height = side, side
    else:
        crop_width = (new_size[0] // patch_size) * patch_size
        crop_height = (new_size[1] // patch_size) * patch_size
    if min(crop_width, crop_height) < MIN_GRID_SIDE * patch_size:
        raise ValueError(
            f"The image is {width}x{height} pixels (width x height); at resolution {resolution} it gives a "
            f"{crop_height // patch_size}x{crop_width // patch_size} patch grid (rows x columns), but at least "
            f"{MIN_GRID_SIDE}x{MIN_GRID_SIDE} patches of {patch_size} pixels are needed. Use a larger resolution."
        )
    return image.crop(center_crop_box(*new_size, crop_width, crop_height))


def normalize_image(image: Image.Image, normalization: ImageNormalization | None = None) -> torch.Tensor:
    """Return the RGB `image` as a float32 tensor `[3, H, W]`: pixel values scaled to [0, 1], then normalized."""
    normalization = normalization or ImageNormalization()
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(normalization.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def denormalize_image(pixel_values: torch.Tensor, normalization: ImageNormalization | None = None) -> Image.Image:
    """Return the RGB picture a normalized `[3, H, W]` tensor shows (the inverse of `normalize_image`, rounded).

    Lets a figure show exactly the crop the model saw, for any dataset item, without reading the file again.
    """
    normalization = normalization or ImageNormalization()
    mean = torch.tensor(normalization.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32).view(3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0.0, 1.0)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8), mode="RGB")


def prepare_image(
    image: Image.Image,
    resolution: int,
    patch_size: int,
    normalization: ImageNormalization | None = None,
    *,
    square: bool = False,
) -> torch.Tensor:
    """Turn a PIL image into the normalized pixel tensor a DINOv2 backbone reads.

    The image is converted to RGB, resized so its short side is `resolution` pixels (bicubic with antialiasing), then
    centre-cropped to the largest multiple of `patch_size` in each side (`square=False`: a 518-pixel short side gives
    37 patches, the long side keeps its aspect ratio), or to a `resolution`-sized square rounded down to whole patches
    (`square=True`: the crop SINDER trains on, which also makes images of any shape stackable into one batch).

    Args:
        image: any PIL image.
        resolution: length of the short side after resizing, in pixels.
        patch_size: the backbone's patch size.
        normalization: mean/std to apply; `None` uses the ImageNet statistics of DINOv2.
        square: crop a square instead of keeping the aspect ratio.

    Returns:
        A float32 tensor `[3, H, W]` with `H` and `W` multiples of `patch_size`.

    Raises:
        ValueError: if the input is smaller than one patch, or the result is smaller than 3×3 patches.
    """
    return normalize_image(resize_and_crop(image, resolution, patch_size, square=square), normalization)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode the image file at `path` (so a truncated file fails here, not later).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a readable image; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No image file at {str(path)!r}.")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except IMAGE_ERRORS as error:
        raise ValueError(f"Cannot read the image {str(path)!r}: {error}") from error
