"""Images for diagnosis and repair: one preprocessing function and the datasets built on it.

Every image goes through `prepare_image`: resize so the short side is `resolution` (bicubic, antialiased, as
torchvision's `Resize` does on PIL images), centre-crop to whole patches, normalize. The datasets yield
`{"pixel_values": Tensor[3, H, W], "path": str}` and `collate_images` stacks them.

Unreadable files never stop a run. `ImageFolderDataset` checks every file with Pillow's `verify` when it scans the
folder (the header and, for PNG, the chunk checksums; no pixel is decoded, so this stays cheap for large folders) and
leaves out those that fail; a file that passes that check but fails to decode later (a truncated JPEG, say) makes
`__getitem__` return `None`, and `collate_images` drops it. Both are logged as warnings and counted in
`num_unreadable` (counts made inside DataLoader worker processes stay in those processes).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from .loading import ImageNormalization, looks_like_hub_id

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
MIN_GRID_SIDE = 3
"""Fewest patches per side: the defect detector never flags the border ring, so 3×3 leaves one token to judge."""

_IMAGE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)
"""What PIL raises on files that are not (whole) images; `SyntaxError` is its parse error, e.g. a bad PNG checksum."""
_SAVE_TO_DISK_MARKERS: tuple[str, ...] = ("state.json", "dataset_dict.json")

ImageItem = dict[str, Any]


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Return the (width, height) with the short side equal to `resolution`, computed as torchvision's `Resize`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if width <= height else (new_long, resolution)


def _center_crop_box(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
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
    new_size = _resized_size(width, height, resolution)
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
    return image.crop(_center_crop_box(*new_size, crop_width, crop_height))


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
    except _IMAGE_ERRORS as error:
        raise ValueError(f"Cannot read the image {str(path)!r}: {error}") from error


def find_image_files(root: str | Path) -> list[Path]:
    """Return the image files (jpg, jpeg, png, webp, any case) under `root`, recursively, in sorted order.

    Raises:
        FileNotFoundError: if `root` does not exist.
        NotADirectoryError: if `root` is a file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"The image folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is a file, not a folder of images.")
    return sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFileDataset(Dataset):
    """A map-style dataset over a list of image files; items are `{"pixel_values", "path"}` or `None`.

    Files that fail Pillow's `verify` are left out when the dataset is built; a file that fails to decode (or is too
    small) when its item is read gives `None` (drop it with `collate_images`). Both are logged and counted in
    `num_unreadable`.

    Raises:
        ValueError: if no file is a readable image.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        resolution: int,
        patch_size: int,
        normalization: ImageNormalization | None = None,
        *,
        square: bool = True,
    ) -> None:
        self.resolution = resolution
        self.patch_size = patch_size
        self.normalization = normalization or ImageNormalization()
        self.square = square
        self.unreadable_files: list[Path] = []
        self.files: list[Path] = []
        for file in map(Path, files):
            try:
                with Image.open(file) as image:
                    image.verify()
            except _IMAGE_ERRORS as error:
                logger.warning("Skipping %s: not a readable image (%s).", file, error)
                self.unreadable_files.append(file)
            else:
                self.files.append(file)
        if not self.files:
            raise ValueError(f"None of the {len(files)} files given is a readable image.")

    @property
    def num_unreadable(self) -> int:
        """Number of files skipped so far: not images at all, or failing to decode when read."""
        return len(self.unreadable_files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageItem | None:
        path = self.files[index]
        try:
            pixel_values = prepare_image(
                load_image(path), self.resolution, self.patch_size, self.normalization, square=self.square
            )
        except (FileNotFoundError, ValueError) as error:
            logger.warning("Skipping %s: %s", path, error)
            if path not in self.unreadable_files:
                self.unreadable_files.append(path)
            return None
        return {"pixel_values": pixel_values, "path": str(path)}


class ImageFolderDataset(ImageFileDataset):
    """Every jpg/jpeg/png/webp image under a folder (recursively, sorted), as an `ImageFileDataset`.

    Raises:
        FileNotFoundError: if the folder does not exist.
        NotADirectoryError: if it is a file.
        ValueError: if it holds no readable image.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        patch_size: int,
        normalization: ImageNormalization | None = None,
        *,
        square: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        files = find_image_files(self.root)
        if not files:
            raise ValueError(
                f"The folder {str(self.root)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)."
            )
        super().__init__(files, resolution, patch_size, normalization, square=square)


def _holds_images(root: Path) -> bool:
    """Whether there is at least one image file under `root` (stops at the first one)."""
    return any(path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() for path in root.rglob("*"))


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk` (a `Dataset` or a `DatasetDict`)."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS)


def _load_hf_dataset(source: str, split: str, image_column: str, streaming: bool) -> Any:
    """Load `source` (a `save_to_disk` directory, a local dataset, or a Hub dataset name) with undecoded images.

    Images are cast to `datasets.Image(decode=False)` so that a corrupt image fails in our code, one item at a time,
    instead of inside `datasets`' iterator.

    Raises:
        FileNotFoundError: the dataset cannot be found (locally, in the cache, or on the Hub).
        KeyError: the split or the image column does not exist.
    """
    import datasets

    path = Path(source).expanduser()
    try:
        if _is_saved_dataset(path):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise KeyError(f"The dataset {source!r} has no split {split!r}; it has {list(dataset)}.")
                dataset = dataset[split]
            if streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            dataset = datasets.load_dataset(source, split=split, streaming=streaming)
    except (OSError, ConnectionError) as error:
        raise FileNotFoundError(
            f"Cannot load the dataset {source!r} (split {split!r}): it is not a folder of images, not a directory "
            "written by `save_to_disk`, and `datasets.load_dataset` could not find it locally, in the cache or on the "
            f"Hub. Cause: {error}"
        ) from error
    columns = dataset.column_names
    if columns is not None and image_column not in columns:
        raise KeyError(f"The dataset {source!r} has no column {image_column!r}; its columns are {columns}.")
    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _decode_hf_image(value: Any) -> Image.Image:
    """Turn one value of a 🤗 datasets image column (undecoded dict, PIL image or file path) into a decoded image.

    Raises:
        ValueError: if the value is not a readable image.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        return load_image(value)
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        try:
            with Image.open(source) as image:
                image.load()
                return image.copy()
        except _IMAGE_ERRORS as error:
            raise ValueError(f"not a readable image ({error})") from error
    raise ValueError(f"expected an image, got a {type(value).__name__}")


class _HFImageItems:
    """What the map-style and streaming 🤗 datasets wrappers share: loading the dataset (streamed for the
    `IterableDataset` subclass) and preprocessing a row."""

    def __init__(
        self,
        source: str,
        resolution: int,
        patch_size: int,
        normalization: ImageNormalization | None = None,
        *,
        split: str = "train",
        image_column: str = "image",
        square: bool = True,
    ) -> None:
        self.source, self.split, self.image_column = source, split, image_column
        self.resolution, self.patch_size = resolution, patch_size
        self.normalization = normalization or ImageNormalization()
        self.square = square
        self.unreadable_items: list[str] = []
        streaming = isinstance(self, IterableDataset)
        self.dataset = _load_hf_dataset(source, split, image_column, streaming=streaming)
        if not streaming and len(self.dataset) == 0:
            raise ValueError(f"The split {split!r} of the dataset {source!r} is empty.")

    def _item(self, index: int, row: dict[str, Any]) -> ImageItem | None:
        """Return the item of row `index`, or `None` (logged and counted) if its image cannot be used."""
        name = f"{self.source}:{self.split}:{index}"
        try:
            image = _decode_hf_image(row[self.image_column])
            pixel_values = prepare_image(
                image, self.resolution, self.patch_size, self.normalization, square=self.square
            )
        except (FileNotFoundError, ValueError) as error:
            logger.warning("Skipping %s: %s", name, error)
            if name not in self.unreadable_items:
                self.unreadable_items.append(name)
            return None
        return {"pixel_values": pixel_values, "path": name}

    @property
    def num_unreadable(self) -> int:
        """Number of rows skipped so far because their image could not be decoded or was too small."""
        return len(self.unreadable_items)


class HFImageDataset(_HFImageItems, Dataset):
    """A map-style view of the image column of a 🤗 dataset; items are `{"pixel_values", "path"}` or `None`.

    `path` is `"SOURCE:SPLIT:INDEX"`. `source` is a Hub dataset name, a local dataset loadable by
    `datasets.load_dataset`, or a directory written by `save_to_disk`.
    """

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ImageItem | None:
        return self._item(index, self.dataset[index])


class HFImageIterableDataset(_HFImageItems, IterableDataset):
    """A streaming view (`datasets.load_dataset(..., streaming=True)`) of the image column of a 🤗 dataset.

    Yields `{"pixel_values", "path"}`; rows whose image cannot be used are logged, counted and skipped. `datasets`
    shards the stream across DataLoader workers by itself.
    """

    def __iter__(self) -> Iterator[ImageItem]:
        for index, row in enumerate(self.dataset):
            item = self._item(index, row)
            if item is not None:
                yield item


def build_dataset(
    data: str | Path | None,
    resolution: int,
    patch_size: int,
    normalization: ImageNormalization | None = None,
    *,
    split: str = "train",
    image_column: str = "image",
    streaming: bool = False,
    square: bool = True,
) -> Dataset | IterableDataset:
    """Build the image dataset `--data` names.

    - `None`: the bundled demo images (`sinder_peft.demo.demo_image_paths()`).
    - a directory written by `datasets`' `save_to_disk`: an `HFImageDataset` (or `HFImageIterableDataset` when
      `streaming`) over it.
    - any other directory that holds images, or is empty: an `ImageFolderDataset` (an empty one raises).
    - anything else (a Hub dataset name, a local dataset of parquet/csv/… files): `datasets.load_dataset`.

    Returns:
        A map-style dataset whose items may be `None` (unreadable images), or a streaming `IterableDataset`. Batch
        either with `collate_images`. `square=True` (the default, SINDER's training crop) gives every image the same
        size; with `square=False` images keep their aspect ratio, so only batches of one image are always stackable.
    """
    if data is None:
        from .demo import demo_image_paths

        return ImageFileDataset(demo_image_paths(), resolution, patch_size, normalization, square=square)
    path = Path(data).expanduser()
    if not path.exists() and not looks_like_hub_id(str(data)):
        raise FileNotFoundError(f"{str(data)!r} does not exist and is not a 🤗 datasets name.")
    if path.is_dir() and not _is_saved_dataset(path) and (_holds_images(path) or not any(path.iterdir())):
        return ImageFolderDataset(path, resolution, patch_size, normalization, square=square)
    hf_kwargs: dict[str, Any] = {"split": split, "image_column": image_column, "square": square}
    if streaming:
        return HFImageIterableDataset(str(data), resolution, patch_size, normalization, **hf_kwargs)
    return HFImageDataset(str(data), resolution, patch_size, normalization, **hf_kwargs)


def collate_images(items: Sequence[ImageItem | None]) -> dict[str, Any] | None:
    """Stack dataset items into a batch, dropping the `None`s that unreadable images leave.

    Returns:
        `{"pixel_values": Tensor[B, 3, H, W], "paths": list[str]}`, or `None` when every item was dropped (skip
        that batch).

    Raises:
        ValueError: if the images do not all have the same size (use `square=True` or a batch size of 1).
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    shapes = {tuple(item["pixel_values"].shape) for item in kept}
    if len(shapes) > 1:
        raise ValueError(
            f"Cannot batch images of different sizes {sorted(shapes)}; crop them to squares (square=True) or use a "
            "batch size of 1."
        )
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),
        "paths": [item["path"] for item in kept],
    }
