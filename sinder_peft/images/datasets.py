"""Image datasets for diagnosis and repair: folders, file lists and 🤗 datasets, and `build_dataset` for `--data`.

The datasets yield `{"pixel_values": Tensor[3, H, W], "path": str, "index": int}` (`preprocessing.prepare_image`)
and `batching.collate_images` stacks them into an `ImageBatch`.

Datasets are lazy: an image folder is listed, never opened, when the dataset is built (`list_image_files`), so a
1.28-million-file ImageNet tree costs its listing, not 1.28 million reads. A file that cannot be used (not an image,
truncated, too small) is found when it is first read: its item is an `UnreadableImage`, which `collate_images` sets
aside, and `UnreadableImageLog` warns about once and counts (the repair reports the count as `images_unreadable`).
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
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..models.loading import looks_like_hub_id
from ..synthetic.demo import demo_image_paths
from ..tuner.architectures import ImageNormalization
from .preprocessing import IMAGE_ERRORS, load_image, prepare_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
_SAVE_TO_DISK_MARKERS: tuple[str, ...] = ("state.json", "dataset_dict.json")

ImageItem = dict[str, Any]


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
        except IMAGE_ERRORS as error:
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

    - `None`: the bundled demo images (`sinder_peft.synthetic.demo.demo_image_paths()`).
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
