"""How a repair reads its images: batches of dataset items, the selection sample, and each process's share.

A repair reads its data in two ways: `selection_sample`, a few images spread evenly over the whole dataset to choose
the blocks to adapt, and `epoch_batches`, the training batches of one process: each process reads only its own,
disjoint share of every epoch (`process_share`, or `datasets.distributed.split_dataset_by_node` for a stream).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .datasets import HFImageIterableDataset, ImageItem, UnreadableImage

logger = logging.getLogger(__name__)


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
