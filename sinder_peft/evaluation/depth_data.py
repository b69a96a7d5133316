"""Depth data for `sinder evaluate --depth-data`: the folder layout and 🤗 datasets (NYU Depth v2), and depth maps
as the probe scores them.

Folder layout:
    `ROOT/train/images`, `ROOT/train/depth`, `ROOT/val/images`, `ROOT/val/depth`, where every image has a depth map
    with the same file stem: `depth/<stem>.png`, a 16-bit single-channel PNG in millimetres (NYU's and KITTI's
    raw format; 0 = no measurement), or `depth/<stem>.npy`, a 2-D float array in metres (0 or not finite = none). A
    depth map has the size of its image.

🤗 dataset:
    an image column and a depth column (`--depth-column`, default `depth_map`, as in NYU Depth v2 on the Hub) and a
    train and a validation split; a depth value is a float image (mode F) or an array in metres, or a 16-bit image
    in millimetres.

A depth map goes through the resize (short side to the resolution) and the centre square crop of its image, with
nearest-neighbour resampling so depths are never blended with missing pixels (`prepare_depth`). At a resolution
equal to the map's short side (480 for NYUd) nothing is resampled: the probe is scored at the map's own resolution.
Pixels outside [`min_depth`, `max_depth`] or, for maps of NYUd's 640×480, outside the Eigen crop (rows 45–470,
columns 41–600, the crop of DINOv2's and BTS's NYUd evaluation; `--depth-crop`) are invalid (0).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..images.datasets import find_image_files
from ..images.preprocessing import center_crop_box, resized_size
from .datasets import IMAGES_FOLDER, TRAIN_FOLDER, VAL_FOLDER, dataset_split, folder_listing, is_hf_dataset, subsample
from .image_sources import DatasetColumn, ImageFiles, ImageSource

logger = logging.getLogger(__name__)

DEPTH_FOLDER = "depth"
DEPTH_EXTENSIONS: tuple[str, ...] = (".png", ".npy")
MILLIMETRES_PER_METRE = 1000.0
NYU_SIZE = (640, 480)
"""(width, height) of NYU Depth v2's maps, to which the Eigen crop applies."""
NYU_EIGEN_CROP = (41, 45, 601, 471)
"""(left, top, right, bottom) of the Eigen crop of NYUd's 640×480 maps (as DINOv2's and BTS's evaluations)."""
DepthCrop = Literal["auto", "eigen", "none"]
_MILLIMETRE_MODES = ("I", "I;16", "I;16B", "I;16L")


def depth_array(value: Any, name: str) -> np.ndarray:
    """Return a depth map in metres as a float32 [H, W] array from a file path, a PIL image, an array or a 🤗
    datasets value.

    A 16-bit or 32-bit integer image holds millimetres, a float image (mode F) or array metres; a `.npy` file
    metres; an 8-bit or colour image is refused (no depth unit can be read from it).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: the value is not a single-channel depth map; the message names it (`name`).
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
        value = Image.open(io.BytesIO(value)) if isinstance(value, bytes) else value
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"No depth map at {str(path)!r}.")
        if path.suffix.lower() == ".npy":
            value = np.load(path)
        else:
            try:
                value = Image.open(path)
                value.load()
            except OSError as error:
                raise ValueError(f"The depth map {name} cannot be read: {error}") from error
    if isinstance(value, Image.Image):
        if value.mode in _MILLIMETRE_MODES:
            return np.asarray(value).astype(np.float32) / MILLIMETRES_PER_METRE
        if value.mode == "F":
            return np.asarray(value, dtype=np.float32)
        raise ValueError(
            f"The depth map {name} is a {value.mode} image; depth maps must be 16-bit PNGs in millimetres, float "
            "images or .npy arrays in metres."
        )
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"The depth map {name} has shape {array.shape}; a depth map is a 2-D array.")
    return array


class DepthFiles(ImageFiles):
    """Depth maps stored as files (16-bit PNG in millimetres, or `.npy` in metres), in a fixed order."""

    def load_depth(self, index: int) -> np.ndarray:
        """Return depth map `index` in metres (see `depth_array`)."""
        return depth_array(self.paths[index], self.name(index))

    def select(self, indices: Sequence[int]) -> DepthFiles:
        """Return the maps at `indices`, in that order."""
        return DepthFiles([self.paths[index] for index in indices])


class DepthColumn(DatasetColumn):
    """The depth column of a 🤗 dataset, optionally restricted to some rows."""

    def load_depth(self, index: int) -> np.ndarray:
        """Return depth map `index` in metres (see `depth_array`)."""
        return depth_array(self._value(index), self.name(index))

    def select(self, indices: Sequence[int]) -> DepthColumn:
        """Return the maps at `indices` (positions in this view), in that order."""
        return DepthColumn(self.dataset, self.column, self.source, self.split, [self.rows[i] for i in indices])


DepthSource = DepthFiles | DepthColumn


@dataclass(frozen=True)
class DepthSplit:
    """Images and their depth maps, in the same order."""

    images: ImageSource
    depths: DepthSource


@dataclass(frozen=True)
class DepthData:
    """The depth data: a train and a validation split."""

    source: str
    train: DepthSplit
    val: DepthSplit


def _depth_folder(root: Path, max_train: int | None, max_val: int | None, seed: int) -> DepthData:
    """Read the `train|val/images|depth` layout (see the module docstring)."""
    layout = "train/images, train/depth, val/images and val/depth (depth: <image stem>.png in mm or .npy in m)"
    splits = []
    for split, limit in ((TRAIN_FOLDER, max_train), (VAL_FOLDER, max_val)):
        for folder in (IMAGES_FOLDER, DEPTH_FOLDER):
            if not (root / split / folder).is_dir():
                where = root / split if (root / split).is_dir() else root
                raise ValueError(
                    f"The depth data folder {str(root)!r} has no {split}/{folder}/ folder: expected {layout}; "
                    f"{folder_listing(where)}."
                )
        images = find_image_files(root / split / IMAGES_FOLDER)
        if not images:
            raise ValueError(f"{str(root / split / IMAGES_FOLDER)!r} holds no image; expected {layout}.")
        depths = {
            path.stem: path
            for path in sorted((root / split / DEPTH_FOLDER).rglob("*"))
            if path.suffix.lower() in DEPTH_EXTENSIONS
        }
        if not depths:
            raise ValueError(f"{str(root / split / DEPTH_FOLDER)!r} holds no depth map; expected {layout}.")
        missing = [image.name for image in images if image.stem not in depths]
        if missing:
            raise ValueError(
                f"{len(missing)} images of {str(root / split / IMAGES_FOLDER)!r} have no depth map "
                f"{DEPTH_FOLDER}/<stem>.png or .npy (e.g. {missing[0]})."
            )
        keep = subsample(len(images), limit, seed)
        if keep is not None:
            images = [images[i] for i in keep]
        splits.append(DepthSplit(ImageFiles(images), DepthFiles([depths[image.stem] for image in images])))
    return DepthData(str(root), splits[0], splits[1])


def load_depth_data(
    source: str,
    *,
    train_split: str = "train",
    val_split: str = "validation",
    image_column: str = "image",
    depth_column: str = "depth_map",
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> DepthData:
    """Return the depth data `source` names: a `train|val/images|depth` folder or a 🤗 dataset.

    Args:
        source: the folder, a `save_to_disk` directory, or a Hub dataset name.
        train_split, val_split, image_column, depth_column: where the data is in a 🤗 dataset.
        max_train, max_val: keep at most this many images of the split, chosen at random (seeded by `seed`).

    Raises:
        FileNotFoundError: `source` does not exist and is not a dataset name, or the dataset cannot be loaded.
        ValueError: the folder is not in the layout (the message says what was found), an image has no depth map,
            or a column is missing. Depth maps themselves are checked when they are read (`load_depth_maps`).
    """
    if is_hf_dataset(source):
        splits = []
        for split, limit in ((train_split, max_train), (val_split, max_val)):
            dataset, rows = dataset_split(source, split, image_column, depth_column, limit, seed)
            splits.append(
                DepthSplit(
                    DatasetColumn(dataset, image_column, source, split, rows),
                    DepthColumn(dataset, depth_column, source, split, rows),
                )
            )
        data = DepthData(source, splits[0], splits[1])
    else:
        data = _depth_folder(Path(source).expanduser(), max_train, max_val, seed)
    logger.info(
        "Depth data %s: %d training and %d validation images.", source, len(data.train.images), len(data.val.images)
    )
    return data


def valid_depth(depth: np.ndarray, min_depth: float, max_depth: float, crop: DepthCrop) -> np.ndarray:
    """Return the depth map with every invalid pixel set to 0: not finite, outside [min_depth, max_depth], or
    outside the Eigen crop when `crop` is "eigen", or "auto" and the map is NYUd's 640×480."""
    depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    depth = np.where((depth >= min_depth) & (depth <= max_depth), depth, 0.0).astype(np.float32)
    height, width = depth.shape
    if crop == "eigen" or (crop == "auto" and (width, height) == NYU_SIZE):
        if (width, height) != NYU_SIZE:
            raise ValueError(
                f"The Eigen crop applies to NYUd's 640x480 depth maps; this one is {width}x{height} "
                "(--depth-crop none or auto)."
            )
        left, top, right, bottom = NYU_EIGEN_CROP
        inside = np.zeros_like(depth, dtype=bool)
        inside[top:bottom, left:right] = True
        depth = np.where(inside, depth, 0.0).astype(np.float32)
    return depth


def prepare_depth(depth: np.ndarray, resolution: int, patch_size: int) -> torch.Tensor:
    """Return a depth map [S, S] float32 aligned with `prepare_image(square=True)` of its image: the same resize
    (short side to `resolution`, nearest neighbour, so no depth is blended with a missing one) and centre crop."""
    height, width = depth.shape
    new_width, new_height = resized_size(width, height, resolution)
    if (new_width, new_height) != (width, height):
        rows = np.minimum((np.arange(new_height) + 0.5) * height / new_height, height - 1).astype(np.int64)
        columns = np.minimum((np.arange(new_width) + 0.5) * width / new_width, width - 1).astype(np.int64)
        depth = depth[rows[:, None], columns[None, :]]
    side = (resolution // patch_size) * patch_size
    left, top, right, bottom = center_crop_box(new_width, new_height, side, side)
    return torch.from_numpy(np.ascontiguousarray(depth[top:bottom, left:right], dtype=np.float32))


def load_depth_maps(
    split: DepthSplit,
    resolution: int,
    patch_size: int,
    *,
    min_depth: float,
    max_depth: float,
    crop: DepthCrop,
    show_progress: bool = True,
) -> torch.Tensor:
    """Read, check and prepare every depth map of `split`: a [N, S, S] float32 tensor in metres, 0 = invalid (see
    `valid_depth` and `prepare_depth`).

    Raises:
        FileNotFoundError: a depth map is missing.
        ValueError: a depth map is unreadable, not single-channel, or not the size of its image (the message names
            both files and sizes).
    """
    prepared = []
    for index in tqdm(range(len(split.depths)), desc="depth maps", unit="map", disable=not show_progress):
        depth = split.depths.load_depth(index)
        image_size = split.images.size(index)
        if (depth.shape[1], depth.shape[0]) != image_size:
            raise ValueError(
                f"The depth map {split.depths.name(index)} is {depth.shape[1]}x{depth.shape[0]} pixels but its image "
                f"{split.images.name(index)} is {image_size[0]}x{image_size[1]} (width x height); a depth map must "
                "have the size of its image."
            )
        prepared.append(prepare_depth(valid_depth(depth, min_depth, max_depth, crop), resolution, patch_size))
    return torch.stack(prepared)
