"""Images for diagnosis and repair: one preprocessing function, the datasets built on it, and how a repair reads them.

Every image goes through `prepare_image`: resize so the short side is `resolution` (bicubic, antialiased, as
torchvision's `Resize` does on PIL images), centre-crop to whole patches, normalize. The datasets yield
`{"pixel_values": Tensor[3, H, W], "path": str, "index": int}` and `collate_images` stacks them into an `ImageBatch`.

Datasets are lazy: an image folder is listed, never opened, when the dataset is built (`list_image_files`), so a
1.28-million-file ImageNet tree costs its listing, not 1.28 million reads. A file that cannot be used (not an image,
truncated, too small) is found when it is first read: its item is an `UnreadableImage`, which `collate_images` sets
aside, and `UnreadableImageLog` warns about once and counts (the repair reports the count as `images_unreadable`).

A repair reads its data in two ways: `selection_sample`, a few images spread evenly over the whole dataset to choose
the blocks to adapt, and `epoch_batches`, the training batches of one process: each process reads only its own,
disjoint share of every epoch (`process_share`, or `datasets.distributed.split_dataset_by_node` for a stream).
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

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
    except _IMAGE_ERRORS as error:
        raise ValueError(f"Cannot read the image {str(path)!r}: {error}") from error


def _sort_key(relative: str) -> list[str]:
    """Sort key of a relative path: component by component, as sorting `Path` objects does."""
    return relative.split(os.sep)


def list_image_files(root: str | Path) -> list[str]:
    """Return the paths, relative to `root`, of the image files (jpg, jpeg, png, webp, any case) under `root`,
    recursively, in sorted order (component by component).

    No file is opened or even `stat`-ed: the walk reads directory entries only (`os.scandir`, whose entry types come
    with the listing on common file systems), so listing an ImageNet-sized tree of 1.28 million files takes seconds
    (`benchmarks/bench_listing.py`). Symbolic links to files are followed, to directories not.

    Raises:
        FileNotFoundError: if `root` does not exist.
        NotADirectoryError: if `root` is a file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"The image folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is a file, not a folder of images.")
    found: list[str] = []
    pending = [""]
    while pending:
        relative_directory = pending.pop()
        with os.scandir(root / relative_directory if relative_directory else root) as entries:
            for entry in entries:
                relative = os.path.join(relative_directory, entry.name) if relative_directory else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(relative)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(relative)
    found.sort(key=_sort_key)
    return found


def find_image_files(root: str | Path) -> list[Path]:
    """Return the image files under `root` as full paths, in the order of `list_image_files`.

    Raises:
        FileNotFoundError: if `root` does not exist.
        NotADirectoryError: if `root` is a file.
    """
    root = Path(root).expanduser()
    return [root / relative for relative in list_image_files(root)]


@dataclass(frozen=True)
class UnreadableImage:
    """What a dataset returns in place of an image it could not use.

    Attributes:
        name: the image's path (folders) or `SOURCE:SPLIT:INDEX` (🤗 datasets).
        index: its position in the dataset (in this process's stream for a streamed dataset).
        reason: why it could not be used (not an image, truncated, too small...).
    """

    name: str
    index: int
    reason: str


def _file_array(files: Sequence[str | Path]) -> np.ndarray:
    """Return file paths as one numpy array of bytes.

    A list of a million `str` or `Path` objects is a million Python objects, whose reference counts DataLoader worker
    processes write to, copying the pages that hold them into every worker; one numpy buffer is shared as it is.
    """
    return np.array([os.fsencode(file) for file in files], dtype=np.bytes_)


class ImageFileDataset(Dataset):
    """A map-style dataset over a list of image files; items are `{"pixel_values", "path", "index"}`.

    Building the dataset opens no file: a file is read when its item is, and a file that cannot be used then (not an
    image, truncated, too small for 3x3 patches) gives an `UnreadableImage` instead of an item. `collate_images`
    collects those, and the repair counts them and warns once per file (`UnreadableImageLog`).

    Raises:
        ValueError: if `files` is empty.
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
        if len(files) == 0:
            raise ValueError("No image file given.")
        self.resolution = resolution
        self.patch_size = patch_size
        self.normalization = normalization or ImageNormalization()
        self.square = square
        self._files = _file_array(files)

    def __len__(self) -> int:
        return len(self._files)

    def file(self, index: int) -> Path:
        """Return the path of item `index`, without opening it."""
        return Path(os.fsdecode(self._files[index]))

    def __getitem__(self, index: int) -> ImageItem | UnreadableImage:
        path = self.file(index)
        try:
            pixel_values = prepare_image(
                load_image(path), self.resolution, self.patch_size, self.normalization, square=self.square
            )
        except (FileNotFoundError, ValueError) as error:
            logger.debug("Cannot use %s: %s", path, error)
            return UnreadableImage(name=str(path), index=index, reason=str(error))
        return {"pixel_values": pixel_values, "path": str(path), "index": index}


class ImageFolderDataset(ImageFileDataset):
    """Every jpg/jpeg/png/webp image under a folder (recursively, sorted), as an `ImageFileDataset`.

    The folder is listed, not read (`list_image_files`); files are opened one at a time as their items are read.

    Raises:
        FileNotFoundError: if the folder does not exist.
        NotADirectoryError: if it is a file.
        ValueError: if it holds no image file.
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
        files = [os.path.join(self.root, relative) for relative in list_image_files(self.root)]
        if not files:
            raise ValueError(
                f"The folder {str(self.root)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)."
            )
        super().__init__(files, resolution, patch_size, normalization, square=square)


def _holds_images(root: Path) -> bool:
    """Whether there is at least one image file under `root` (stops at the first one)."""
    return any(path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() for path in root.rglob("*"))


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk` (a `Dataset` or a `DatasetDict`)."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS)


def load_hf_dataset(source: str, split: str, image_column: str, streaming: bool) -> Any:
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
        if is_saved_dataset(path):
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


def decode_hf_image(value: Any) -> Image.Image:
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
        streaming = isinstance(self, IterableDataset)
        self.dataset = load_hf_dataset(source, split, image_column, streaming=streaming)
        if not streaming and len(self.dataset) == 0:
            raise ValueError(f"The split {split!r} of the dataset {source!r} is empty.")

    def _item(self, index: int, row: dict[str, Any], part: str | None = None) -> ImageItem | UnreadableImage:
        """Return the item of row `index`, or an `UnreadableImage` if its image cannot be used.

        Its name is `SOURCE:SPLIT:INDEX`, or `SOURCE:SPLIT:PART:INDEX` for row `index` of one part of a split stream.
        """
        name = f"{self.source}:{self.split}:{index}" if part is None else f"{self.source}:{self.split}:{part}:{index}"
        try:
            image = decode_hf_image(row[self.image_column])
            pixel_values = prepare_image(
                image, self.resolution, self.patch_size, self.normalization, square=self.square
            )
        except (FileNotFoundError, ValueError) as error:
            logger.debug("Cannot use %s: %s", name, error)
            return UnreadableImage(name=name, index=index, reason=str(error))
        return {"pixel_values": pixel_values, "path": name, "index": index}


class HFImageDataset(_HFImageItems, Dataset):
    """A map-style view of the image column of a 🤗 dataset; items are `{"pixel_values", "path", "index"}`, or an
    `UnreadableImage` for a row whose image cannot be used.

    `path` is `"SOURCE:SPLIT:INDEX"`. `source` is a Hub dataset name, a local dataset loadable by
    `datasets.load_dataset`, or a directory written by `save_to_disk`.
    """

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ImageItem | UnreadableImage:
        return self._item(index, self.dataset[index])


class HFImageIterableDataset(_HFImageItems, IterableDataset):
    """A streaming view (`datasets.load_dataset(..., streaming=True)`) of the image column of a 🤗 dataset.

    Yields `{"pixel_values", "path", "index"}`, or an `UnreadableImage` for a row whose image cannot be used.
    `for_process` gives one process's share, and `datasets` shards the stream across DataLoader workers by itself.
    A row of the whole stream is named `SOURCE:SPLIT:INDEX`; once the stream is split (between processes or
    workers), row positions are only known within a part, so a row is named `SOURCE:SPLIT:PART:INDEX`, PART being
    `processR` or `processR-workerW`, INDEX its position in that part.
    """

    process_index: int = 0
    num_processes: int = 1

    def for_process(self, process_index: int, num_processes: int) -> HFImageIterableDataset:
        """Return a copy that streams only the rows of process `process_index` of `num_processes`.

        Uses `datasets.distributed.split_dataset_by_node`: whole shards per process when their number divides
        evenly, else every `num_processes`-th row (each process then still downloads the whole stream but decodes
        only its own rows).
        """
        from datasets.distributed import split_dataset_by_node

        share = copy.copy(self)
        share.dataset = split_dataset_by_node(self.dataset, rank=process_index, world_size=num_processes)
        share.process_index, share.num_processes = process_index, num_processes
        return share

    def __iter__(self) -> Iterator[ImageItem | UnreadableImage]:
        worker = get_worker_info()
        part = None
        if self.num_processes > 1 or worker is not None:
            part = f"process{self.process_index}" + (f"-worker{worker.id}" if worker is not None else "")
        for index, row in enumerate(self.dataset):
            yield self._item(index, row, part)


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
        A map-style dataset, or a streaming `IterableDataset`, whose items are dicts or, for images that cannot be
        used, `UnreadableImage`s. Batch either with `collate_images`. `square=True` (the default, SINDER's training
        crop) gives every image the same size; with `square=False` images keep their aspect ratio, so only batches
        of one image are always stackable.
    """
    if data is None:
        from .demo import demo_image_paths

        return ImageFileDataset(demo_image_paths(), resolution, patch_size, normalization, square=square)
    path = Path(data).expanduser()
    if not path.exists() and not looks_like_hub_id(str(data)):
        raise FileNotFoundError(f"{str(data)!r} does not exist and is not a 🤗 datasets name.")
    if path.is_dir() and not is_saved_dataset(path) and (_holds_images(path) or not any(path.iterdir())):
        return ImageFolderDataset(path, resolution, patch_size, normalization, square=square)
    hf_kwargs: dict[str, Any] = {"split": split, "image_column": image_column, "square": square}
    if streaming:
        return HFImageIterableDataset(str(data), resolution, patch_size, normalization, **hf_kwargs)
    return HFImageDataset(str(data), resolution, patch_size, normalization, **hf_kwargs)


@dataclass
class ImageBatch:
    """A batch of images, and the items of the batch that could not be used.

    Attributes:
        pixel_values: [B, 3, H, W], or None when no item of the batch could be used.
        paths: the name of each image in `pixel_values` (file path, or `SOURCE:SPLIT:INDEX`).
        indices: the dataset position of each image in `pixel_values`.
        unreadable: the items that could not be used.
    """

    pixel_values: torch.Tensor | None
    paths: list[str]
    indices: list[int]
    unreadable: list[UnreadableImage]


def collate_images(items: Sequence[ImageItem | UnreadableImage | None]) -> ImageBatch:
    """Stack dataset items into a batch, setting aside the `UnreadableImage`s (and ignoring `None`s).

    Raises:
        ValueError: if the images do not all have the same size (use `square=True` or a batch size of 1).
    """
    unreadable = [item for item in items if isinstance(item, UnreadableImage)]
    kept = [item for item in items if item is not None and not isinstance(item, UnreadableImage)]
    if not kept:
        return ImageBatch(pixel_values=None, paths=[], indices=[], unreadable=unreadable)
    shapes = {tuple(item["pixel_values"].shape) for item in kept}
    if len(shapes) > 1:
        raise ValueError(
            f"Cannot batch images of different sizes {sorted(shapes)}; crop them to squares (square=True) or use a "
            "batch size of 1."
        )
    return ImageBatch(
        pixel_values=torch.stack([item["pixel_values"] for item in kept]),
        paths=[item["path"] for item in kept],
        indices=[int(item.get("index", position)) for position, item in enumerate(kept)],
        unreadable=unreadable,
    )


class UnreadableImageLog:
    """The images found unusable so far, each warned about once.

    A file read again in a later epoch, or by another process, is neither warned about nor counted again.
    """

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names: set[str] = set(names)

    def add(self, images: Sequence[UnreadableImage]) -> list[str]:
        """Record `images`, warn about each one not seen before, and return the names of those."""
        new = []
        for image in images:
            if image.name not in self.names:
                self.names.add(image.name)
                new.append(image.name)
                logger.warning("Skipping %s: %s", image.name, image.reason)
        return new

    def merge(self, names: Sequence[str]) -> None:
        """Record images another process met (and warned about) already."""
        self.names.update(names)

    def __len__(self) -> int:
        return len(self.names)


def process_share(length: int, seed: int, epoch: int, process_index: int, num_processes: int) -> list[int]:
    """Return the dataset positions process `process_index` reads in `epoch`.

    A seeded permutation of `range(length)` (a new one each epoch, the same on every process) dealt round-robin:
    the shares are disjoint and cover the dataset, so no image is read twice in an epoch. When `length` is not a
    multiple of `num_processes` the first shares are one longer; the trainer ends an epoch when any process runs
    out, so every process takes the same number of steps.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(length, generator=generator).tolist()
    return order[process_index::num_processes]


def epoch_batches(
    dataset: Dataset | IterableDataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    process_index: int,
    num_processes: int,
    skip_batches: int = 0,
) -> Iterator[ImageBatch]:
    """Yield this process's batches of one epoch, after skipping the first `skip_batches` (resuming mid-epoch).

    A map-style dataset is read in the order of `process_share`, skipped batches without reading them; a streamed
    🤗 dataset through `HFImageIterableDataset.for_process` (its own order, unshuffled), skipped batches read and
    dropped. Both go through a `DataLoader` with `num_workers` worker processes.
    """
    if isinstance(dataset, IterableDataset):
        if isinstance(dataset, HFImageIterableDataset):
            dataset = dataset.for_process(process_index, num_processes)
        elif num_processes > 1:
            raise TypeError(
                f"Cannot split a {type(dataset).__name__} between processes; use a map-style dataset or a streamed "
                "🤗 dataset (HFImageIterableDataset)."
            )
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
        for position, batch in enumerate(loader):
            if position >= skip_batches:
                yield batch
        return
    indices = process_share(len(dataset), seed, epoch, process_index, num_processes)[skip_batches * batch_size :]
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    yield from loader


def spread_positions(length: int, count: int) -> list[int]:
    """Return `min(count, length)` positions spread evenly over `range(length)`: an even stride from 0.

    Over the sorted files of an ImageNet-style tree (one folder per class) this picks images from as many classes
    as there are positions, as the original code's evenly strided subset of the training set did.
    """
    count = min(count, length)
    return [position * length // count for position in range(count)]


def selection_sample(
    dataset: Dataset | IterableDataset, count: int, log: UnreadableImageLog | None = None
) -> ImageBatch:
    """Return `count` usable images spread over the dataset, as one batch.

    Map-style datasets: the positions of `spread_positions`; an unusable image is replaced by the next usable one
    after it (wrapping around at the end). Streamed datasets: the first `count` usable images of the stream.
    Unusable images met on the way are recorded in `log` (warned about once) and returned in `unreadable`.

    Raises:
        ValueError: if the dataset holds no usable image.
    """
    items: list[ImageItem] = []
    unreadable: list[UnreadableImage] = []

    def accept(item: ImageItem | UnreadableImage) -> bool:
        if isinstance(item, UnreadableImage):
            unreadable.append(item)
            if log is not None:
                log.add([item])
            return False
        items.append(item)
        return True

    if isinstance(dataset, IterableDataset):
        for item in dataset:
            if accept(item) and len(items) == count:
                break
    else:
        length = len(dataset)
        visited: set[int] = set()
        for start in spread_positions(length, count):
            for offset in range(length):
                position = (start + offset) % length
                if position in visited:
                    continue
                visited.add(position)
                if accept(dataset[position]):
                    break
    batch = collate_images(items)
    batch.unreadable = unreadable
    if batch.pixel_values is None:
        raise ValueError(
            f"The data holds no usable image: all {len(unreadable)} images read were unreadable or, at this "
            "resolution, smaller than 3×3 patches (see the warnings above)."
        )
    return batch
