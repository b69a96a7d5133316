"""Where the images of an evaluation come from: image files or a 🤗 dataset column, and the images as a backbone reads
them (`PreparedImages`).

Every source can be loaded by index, named, subset (`select`) and identified for the feature cache (`identity`: the
files' sizes and modification times, or the dataset's fingerprint and rows), so that a cached feature is only reused
for the same images.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images.datasets import decode_hf_image
from ..images.preprocessing import load_image, prepare_image
from ..tuner.architectures import ImageNormalization

logger = logging.getLogger(__name__)


class ImageFiles:
    """Images stored as files, in a fixed order."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(Path(path) for path in paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Return the decoded image `index` (raises `ValueError` / `FileNotFoundError` when it cannot be read)."""
        return load_image(self.paths[index])

    def size(self, index: int) -> tuple[int, int]:
        """Return the (width, height) of image `index`, reading only its header."""
        with Image.open(self.paths[index]) as image:
            return image.size

    def name(self, index: int) -> str:
        """Return the name of image `index` for messages: its path."""
        return str(self.paths[index])

    def select(self, indices: Sequence[int]) -> ImageFiles:
        """Return the images at `indices`, in that order."""
        return ImageFiles([self.paths[index] for index in indices])

    def identity(self) -> dict[str, Any]:
        """Return what the images are, for cache keys: a hash of every path, size and modification time."""
        digest = hashlib.sha256()
        for path in self.paths:
            status = path.stat()
            digest.update(f"{path.resolve()}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        return {"kind": "files", "count": len(self.paths), "files": digest.hexdigest()}


class DatasetColumn:
    """One image column of a 🤗 dataset (images stored undecoded), optionally restricted to some rows."""

    def __init__(self, dataset: Any, column: str, source: str, split: str, rows: Sequence[int] | None = None) -> None:
        self.dataset, self.column, self.source, self.split = dataset, column, source, split
        self.rows = tuple(range(len(dataset))) if rows is None else tuple(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _value(self, index: int) -> Any:
        return self.dataset[self.rows[index]][self.column]

    def load(self, index: int) -> Image.Image:
        """Return the decoded image `index` (raises `ValueError` when it is not a readable image)."""
        return decode_hf_image(self._value(index))

    def size(self, index: int) -> tuple[int, int]:
        """Return the (width, height) of image `index`, reading only its header when the bytes are at hand."""
        value = self._value(index)
        if isinstance(value, dict) and value.get("bytes") is not None:
            with Image.open(io.BytesIO(value["bytes"])) as image:
                return image.size
        return decode_hf_image(value).size

    def name(self, index: int) -> str:
        """Return the name of image `index` for messages: `SOURCE:SPLIT:ROW`."""
        return f"{self.source}:{self.split}:{self.rows[index]}"

    def select(self, indices: Sequence[int]) -> DatasetColumn:
        """Return the images at `indices` (positions in this view), in that order."""
        return DatasetColumn(self.dataset, self.column, self.source, self.split, [self.rows[i] for i in indices])

    def identity(self) -> dict[str, Any]:
        """Return what the images are, for cache keys: source, split, column, the dataset's fingerprint and rows."""
        rows = hashlib.sha256(np.asarray(self.rows, dtype=np.int64).tobytes()).hexdigest()
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        return {
            "kind": "datasets",
            "source": self.source,
            "split": self.split,
            "column": self.column,
            "fingerprint": fingerprint,
            "count": len(self.rows),
            "rows": rows,
        }


ImageSource = ImageFiles | DatasetColumn


class PreparedImages(Dataset):
    """The images of an `ImageSource` as the backbone reads them: items `{"pixel_values": Tensor[3, S, S]}`.

    Every image is resized so its short side is `resolution` and centre-cropped to an S×S square, S = `resolution`
    rounded down to whole patches (`data.prepare_image(square=True)`), and, when `mirrored`, flipped left–right (the
    mirror image of the same crop). An image that cannot be read gives `None` (logged); the feature extraction leaves
    it out.
    """

    def __init__(
        self,
        images: ImageSource,
        resolution: int,
        patch_size: int,
        normalization: ImageNormalization,
        mirrored: bool = False,
    ) -> None:
        self.images = images
        self.resolution = resolution
        self.patch_size = patch_size
        self.normalization = normalization
        self.mirrored = mirrored

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        try:
            image = self.images.load(index)
            pixel_values = prepare_image(image, self.resolution, self.patch_size, self.normalization, square=True)
        except (FileNotFoundError, ValueError) as error:
            logger.warning("Skipping %s: %s", self.images.name(index), error)
            return None
        return {"pixel_values": pixel_values.flip(dims=[-1]) if self.mirrored else pixel_values}

    def identity(self) -> dict[str, Any]:
        """Return what the prepared tensors depend on, for cache keys (`mirrored` only when set, so that the keys of
        unmirrored images stay as they were)."""
        return {
            "images": self.images.identity(),
            "resolution": self.resolution,
            "patch_size": self.patch_size,
            "mean": list(self.normalization.mean),
            "std": list(self.normalization.std),
            **({"mirrored": True} if self.mirrored else {}),
        }
