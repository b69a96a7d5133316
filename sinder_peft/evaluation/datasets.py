"""Labelled image data for `sinder evaluate`: the kNN classification and segmentation layouts, folders or 🤗 datasets.

kNN data (`--knn-data`):
    a folder `ROOT/train/<class>/…` and `ROOT/val/<class>/…` (images anywhere below each class folder; classes are
    the folder names of `train/`, sorted), or a 🤗 dataset (a Hub name or a `save_to_disk` directory) with an image
    and an integer label column and a train and a validation split (e.g. `imagenet-1k`).

Segmentation data (`--seg-data`):
    a folder `ROOT/train/images`, `ROOT/train/masks`, `ROOT/val/images`, `ROOT/val/masks`, where every image has a
    mask with the same file stem (`masks/<stem>.png`): a single-channel PNG ("L", "P" or 16-bit) of class indices,
    255 = ignored, the same size as its image; or a 🤗 dataset with an image and an annotation column in the
    `scene_parse_150` (ADE20k) layout, where label 0 means "other" (ignored) and 1…150 are the classes
    (`reduce_zero_label` maps 0 to 255 and every other label l to l − 1, as mmsegmentation does for ADE20k).

Images are preprocessed with `images.preprocessing.prepare_image` (square crop, so images of any shape batch
together); masks follow the same resize and centre crop with nearest-neighbour resampling (`prepare_mask`), so mask
pixels line up with the image pixels the model saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images.datasets import IMAGE_EXTENSIONS, find_image_files, is_saved_dataset, load_hf_dataset
from ..images.preprocessing import center_crop_box, resized_size
from ..models.loading import looks_like_hub_id
from .image_sources import DatasetColumn, ImageFiles, ImageSource
from .probes import IGNORE_INDEX

logger = logging.getLogger(__name__)

TRAIN_FOLDER = "train"
VAL_FOLDER = "val"
IMAGES_FOLDER = "images"
MASKS_FOLDER = "masks"
MASK_EXTENSION = ".png"
_MASK_MODES: tuple[str, ...] = ("L", "P", "I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class ClassificationSplit:
    """Images and their class indices."""

    images: ImageSource
    labels: torch.Tensor


@dataclass(frozen=True)
class ClassificationData:
    """The kNN data: a train and a validation split and the class names (index → name)."""

    source: str
    train: ClassificationSplit
    val: ClassificationSplit
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class SegmentationSplit:
    """Images and their masks, in the same order."""

    images: ImageSource
    masks: ImageSource


@dataclass(frozen=True)
class SegmentationData:
    """The segmentation data: a train and a validation split; `reduce_zero_label` as described in the module."""

    source: str
    train: SegmentationSplit
    val: SegmentationSplit
    reduce_zero_label: bool


def is_hf_dataset(source: str) -> bool:
    """Whether `source` names a 🤗 dataset (a `save_to_disk` directory or a Hub name) rather than a folder layout.

    Raises:
        FileNotFoundError: `source` neither exists nor looks like a Hub dataset name.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return is_saved_dataset(path)
    if path.exists():
        raise NotADirectoryError(f"{source!r} is a file; expected a folder or a 🤗 datasets name.")
    if not looks_like_hub_id(source):
        raise FileNotFoundError(f"{source!r} does not exist and is not a 🤗 datasets name.")
    return True


def subsample(count: int, limit: int | None, seed: int) -> list[int] | None:
    """Return sorted random positions keeping `limit` of `count` items (seeded), or None to keep them all."""
    if limit is None or limit >= count:
        return None
    if limit < 1:
        raise ValueError(f"A maximum number of images must be positive, got {limit}.")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


def folder_listing(path: Path) -> str:
    """Return a short description of what `path` holds, for layout errors."""
    if not path.is_dir():
        return f"{str(path)!r} does not exist"
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in path.iterdir())
    shown = ", ".join(entries[:8]) + (", …" if len(entries) > 8 else "")
    return f"{str(path)!r} holds: {shown or 'nothing'}"


def _class_folders(split_root: Path, layout: str) -> dict[str, list[Path]]:
    """Return the images of every class folder of one split folder, by class name (sorted)."""
    loose = [path for path in split_root.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise ValueError(
            f"{str(split_root)!r} holds images directly ({loose[0].name}, …); kNN data needs one folder per class: "
            f"{layout}."
        )
    classes = {folder.name: find_image_files(folder) for folder in sorted(split_root.iterdir()) if folder.is_dir()}
    classes = {name: files for name, files in classes.items() if files}
    if not classes:
        raise ValueError(f"{str(split_root)!r} has no class folder with images; kNN data needs {layout}.")
    return classes


def _classification_folder(root: Path, max_train: int | None, max_val: int | None, seed: int) -> ClassificationData:
    """Read the `train/<class>/…`, `val/<class>/…` layout (see the module docstring)."""
    layout = f"{TRAIN_FOLDER}/<class>/<image> and {VAL_FOLDER}/<class>/<image>"
    for split in (TRAIN_FOLDER, VAL_FOLDER):
        if not (root / split).is_dir():
            raise ValueError(
                f"The kNN data folder {str(root)!r} has no {split}/ folder: expected {layout}; {folder_listing(root)}."
            )
    train_classes = _class_folders(root / TRAIN_FOLDER, layout)
    val_classes = _class_folders(root / VAL_FOLDER, layout)
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise ValueError(f"The kNN validation classes {unknown} have no images in {str(root / TRAIN_FOLDER)!r}.")
    names = tuple(train_classes)
    index = {name: position for position, name in enumerate(names)}

    def split(classes: dict[str, list[Path]], limit: int | None) -> ClassificationSplit:
        paths = [path for files in classes.values() for path in files]
        labels = [index[name] for name, files in classes.items() for _ in files]
        keep = subsample(len(paths), limit, seed)
        if keep is not None:
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        return ClassificationSplit(ImageFiles(paths), torch.tensor(labels, dtype=torch.long))

    return ClassificationData(str(root), split(train_classes, max_train), split(val_classes, max_val), names)


def dataset_split(
    source: str, split: str, image_column: str, other_column: str, max_count: int | None, seed: int
) -> tuple[Any, list[int] | None]:
    """Load one split of a 🤗 dataset with undecoded image columns; return it and the kept rows (None: all)."""
    import datasets

    dataset = load_hf_dataset(source, split, image_column, streaming=False)
    if other_column not in dataset.column_names:
        raise ValueError(
            f"The dataset {source!r} (split {split!r}) has no column {other_column!r}; its columns are "
            f"{dataset.column_names}."
        )
    feature = dataset.features.get(other_column)
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(other_column, datasets.Image(decode=False))
    if len(dataset) == 0:
        raise ValueError(f"The split {split!r} of the dataset {source!r} is empty.")
    return dataset, subsample(len(dataset), max_count, seed)


def _classification_dataset(
    source: str,
    *,
    train_split: str,
    val_split: str,
    image_column: str,
    label_column: str,
    max_train: int | None,
    max_val: int | None,
    seed: int,
) -> ClassificationData:
    """Read a 🤗 dataset with image and label columns (see the module docstring)."""

    def split(name: str, limit: int | None) -> tuple[ClassificationSplit, Any]:
        dataset, rows = dataset_split(source, name, image_column, label_column, limit, seed)
        labels = torch.tensor(dataset[label_column], dtype=torch.long)
        if rows is not None:
            labels = labels[rows]
        if bool((labels < 0).any()):
            raise ValueError(f"The split {name!r} of {source!r} has unlabelled rows (label < 0), e.g. a test split.")
        return ClassificationSplit(DatasetColumn(dataset, image_column, source, name, rows), labels), dataset

    train, train_dataset = split(train_split, max_train)
    val, _ = split(val_split, max_val)
    feature = train_dataset.features.get(label_column)
    count = int(max(train.labels.max(), val.labels.max())) + 1
    names = tuple(getattr(feature, "names", None) or [str(index) for index in range(count)])
    return ClassificationData(source, train, val, names)


def load_classification_data(
    source: str,
    *,
    train_split: str = "train",
    val_split: str = "validation",
    image_column: str = "image",
    label_column: str = "label",
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> ClassificationData:
    """Return the kNN data `source` names: a `train/<class>`, `val/<class>` folder or a 🤗 dataset.

    Args:
        source: the folder, a `save_to_disk` directory, or a Hub dataset name.
        train_split, val_split, image_column, label_column: where the data is in a 🤗 dataset.
        max_train, max_val: keep at most this many images of the split, chosen at random (seeded by `seed`).

    Raises:
        FileNotFoundError: `source` does not exist and is not a dataset name, or the dataset cannot be loaded.
        ValueError: the folder is not in the layout (the message says what was found), a column is missing, a
            validation class has no training images, or the training images hold fewer than two classes.
    """
    if is_hf_dataset(source):
        data = _classification_dataset(
            source,
            train_split=train_split,
            val_split=val_split,
            image_column=image_column,
            label_column=label_column,
            max_train=max_train,
            max_val=max_val,
            seed=seed,
        )
    else:
        data = _classification_folder(Path(source).expanduser(), max_train, max_val, seed)
    present = torch.unique(data.train.labels)
    if present.numel() < 2:
        only = data.class_names[int(present[0])] if present.numel() else "none"
        raise ValueError(
            f"The kNN training images of {source!r} hold a single class ({only!r}); classification needs at least two."
        )
    logger.info(
        "kNN data %s: %d training and %d validation images, %d classes.",
        source,
        len(data.train.images),
        len(data.val.images),
        len(data.class_names),
    )
    return data


def _segmentation_folder_split(root: Path, split: str, limit: int | None, seed: int) -> SegmentationSplit:
    """Read one split of the `train|val/images|masks` layout (see the module docstring)."""
    layout = "train/images, train/masks, val/images and val/masks (masks: <image stem>.png)"
    for folder in (IMAGES_FOLDER, MASKS_FOLDER):
        if not (root / split / folder).is_dir():
            where = root / split if (root / split).is_dir() else root
            raise ValueError(
                f"The segmentation data folder {str(root)!r} has no {split}/{folder}/ folder: expected {layout}; "
                f"{folder_listing(where)}."
            )
    images = find_image_files(root / split / IMAGES_FOLDER)
    if not images:
        raise ValueError(f"{str(root / split / IMAGES_FOLDER)!r} holds no image; expected {layout}.")
    masks = {path.stem: path for path in (root / split / MASKS_FOLDER).rglob(f"*{MASK_EXTENSION}")}
    missing = [image.name for image in images if image.stem not in masks]
    if missing:
        raise ValueError(
            f"{len(missing)} images of {str(root / split / IMAGES_FOLDER)!r} have no mask "
            f"{MASKS_FOLDER}/<stem>{MASK_EXTENSION} (e.g. {missing[0]})."
        )
    keep = subsample(len(images), limit, seed)
    if keep is not None:
        images = [images[i] for i in keep]
    return SegmentationSplit(ImageFiles(images), ImageFiles([masks[image.stem] for image in images]))


def _segmentation_folder(root: Path, max_train: int | None, max_val: int | None, seed: int) -> SegmentationData:
    """Read the `train|val/images|masks` layout (see the module docstring)."""
    train = _segmentation_folder_split(root, TRAIN_FOLDER, max_train, seed)
    val = _segmentation_folder_split(root, VAL_FOLDER, max_val, seed)
    return SegmentationData(str(root), train, val, reduce_zero_label=False)


def load_segmentation_data(
    source: str,
    *,
    train_split: str = "train",
    val_split: str = "validation",
    image_column: str = "image",
    annotation_column: str = "annotation",
    reduce_zero_label: bool | None = None,
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> SegmentationData:
    """Return the segmentation data `source` names: a `train|val/images|masks` folder or a 🤗 dataset.

    Args:
        source: the folder, a `save_to_disk` directory, or a Hub dataset name.
        train_split, val_split, image_column, annotation_column: where the data is in a 🤗 dataset.
        reduce_zero_label: ignore label 0 and shift the others down by one; None means yes for a 🤗 dataset (the
            ADE20k layout) and no for a folder.
        max_train, max_val: keep at most this many images of the split, chosen at random (seeded by `seed`).

    Raises:
        FileNotFoundError: `source` does not exist and is not a dataset name, or the dataset cannot be loaded.
        ValueError: the folder is not in the layout (the message says what was found), an image has no mask, or a
            column is missing. Masks themselves are checked when they are read (`load_masks`).
    """
    if is_hf_dataset(source):
        splits = []
        for split, limit in ((train_split, max_train), (val_split, max_val)):
            dataset, rows = dataset_split(source, split, image_column, annotation_column, limit, seed)
            splits.append(
                SegmentationSplit(
                    DatasetColumn(dataset, image_column, source, split, rows),
                    DatasetColumn(dataset, annotation_column, source, split, rows),
                )
            )
        data = SegmentationData(source, splits[0], splits[1], True if reduce_zero_label is None else reduce_zero_label)
    else:
        data = _segmentation_folder(Path(source).expanduser(), max_train, max_val, seed)
        if reduce_zero_label is not None:
            data = SegmentationData(data.source, data.train, data.val, reduce_zero_label)
    logger.info(
        "Segmentation data %s: %d training and %d validation images.",
        source,
        len(data.train.images),
        len(data.val.images),
    )
    return data


def load_segmentation_validation(
    source: str,
    *,
    val_split: str = "validation",
    image_column: str = "image",
    annotation_column: str = "annotation",
    reduce_zero_label: bool | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> tuple[SegmentationSplit, bool]:
    """Return the validation images and masks of segmentation data (the layouts of `load_segmentation_data`; a
    folder needs only `val/images` and `val/masks`), and whether label 0 is ignored (`reduce_zero_label`, default as
    there).

    Raises:
        FileNotFoundError, ValueError: as `load_segmentation_data`.
    """
    if is_hf_dataset(source):
        dataset, rows = dataset_split(source, val_split, image_column, annotation_column, max_val, seed)
        split = SegmentationSplit(
            DatasetColumn(dataset, image_column, source, val_split, rows),
            DatasetColumn(dataset, annotation_column, source, val_split, rows),
        )
        return split, True if reduce_zero_label is None else reduce_zero_label
    split = _segmentation_folder_split(Path(source).expanduser(), VAL_FOLDER, max_val, seed)
    return split, bool(reduce_zero_label)


def load_segmentation_training_images(
    source: str,
    *,
    train_split: str = "train",
    image_column: str = "image",
    max_train: int | None = None,
    seed: int = 0,
) -> ImageSource | None:
    """Return the training images of segmentation data, without their masks (an unsupervised method fits on them):
    the images under `train/images` of a folder (None when the folder has none), or the image column of the
    `train_split` of a 🤗 dataset; at most `max_train` of them (random, seeded).

    Raises:
        FileNotFoundError, KeyError: the 🤗 dataset or its split or column cannot be found.
        ValueError: the 🤗 split is empty.
    """
    if is_hf_dataset(source):
        dataset = load_hf_dataset(source, train_split, image_column, streaming=False)
        if len(dataset) == 0:
            raise ValueError(f"The split {train_split!r} of the dataset {source!r} is empty.")
        images: ImageSource = DatasetColumn(dataset, image_column, source, train_split)
    else:
        folder = Path(source).expanduser() / TRAIN_FOLDER / IMAGES_FOLDER
        files = find_image_files(folder) if folder.is_dir() else []
        if not files:
            return None
        images = ImageFiles(files)
    keep = subsample(len(images), max_train, seed)
    return images if keep is None else images.select(keep)


def load_images(source: str, *, split: str = "validation", image_column: str = "image") -> ImageSource:
    """Return the unlabelled images `source` names: every image under a folder (recursively, sorted), or the image
    column of one split of a 🤗 dataset (a Hub name or a `save_to_disk` directory).

    Raises:
        FileNotFoundError: `source` does not exist and is not a dataset name, or the dataset cannot be loaded.
        ValueError: the folder holds no image, or the split is empty.
    """
    if is_hf_dataset(source):
        dataset = load_hf_dataset(source, split, image_column, streaming=False)
        if len(dataset) == 0:
            raise ValueError(f"The split {split!r} of the dataset {source!r} is empty.")
        return DatasetColumn(dataset, image_column, source, split)
    files = find_image_files(source)
    if not files:
        raise ValueError(
            f"The folder {source!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)."
        )
    return ImageFiles(files)


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def mask_labels(mask: Image.Image, name: str, reduce_zero_label: bool) -> np.ndarray:
    """Return the class indices of a mask image as a uint8 [H, W] array (255 = ignored).

    Raises:
        ValueError: the mask is not single-channel, or holds a label above 255.
    """
    if mask.mode not in _MASK_MODES:
        raise ValueError(
            f"The mask {name} is a {mask.mode} image; masks must be single-channel PNGs of class indices "
            f"(mode L, P or 16-bit), not colours."
        )
    labels = np.asarray(mask).astype(np.int64)
    if labels.size and labels.max() > IGNORE_INDEX:
        raise ValueError(f"The mask {name} holds the label {labels.max()}; labels must be at most {IGNORE_INDEX}.")
    if reduce_zero_label:
        labels = np.where(labels == 0, IGNORE_INDEX, np.where(labels == IGNORE_INDEX, IGNORE_INDEX, labels - 1))
    return labels.astype(np.uint8)


def prepare_mask(labels: np.ndarray, resolution: int, patch_size: int) -> torch.Tensor:
    """Return a label map [S, S] uint8 aligned with `prepare_image(square=True)` of its image.

    The same resize (short side to `resolution`) and centre crop as the image, with nearest-neighbour resampling so
    that labels are never blended.
    """
    height, width = labels.shape
    mask = Image.fromarray(labels, mode="L")
    new_size = resized_size(width, height, resolution)
    if new_size != mask.size:
        mask = mask.resize(new_size, resample=Image.Resampling.NEAREST)
    side = (resolution // patch_size) * patch_size
    return torch.from_numpy(np.array(mask.crop(center_crop_box(*new_size, side, side)), dtype=np.uint8))


def load_masks(
    split: SegmentationSplit, resolution: int, patch_size: int, reduce_zero_label: bool, *, show_progress: bool = True
) -> torch.Tensor:
    """Read, check and prepare every mask of `split`: a [N, S, S] uint8 tensor (see `prepare_mask`).

    Raises:
        ValueError: a mask is unreadable, not single-channel, or not the size of its image (the message names both
            files and sizes).
    """
    from tqdm.auto import tqdm

    prepared = []
    for index in tqdm(range(len(split.masks)), desc="masks", unit="mask", disable=not show_progress):
        mask = split.masks.load(index)
        image_size = split.images.size(index)
        if mask.size != image_size:
            raise ValueError(
                f"The mask {split.masks.name(index)} is {mask.size[0]}x{mask.size[1]} pixels but its image "
                f"{split.images.name(index)} is {image_size[0]}x{image_size[1]} (width x height); a mask must have "
                "the size of its image."
            )
        labels = mask_labels(mask, split.masks.name(index), reduce_zero_label)
        prepared.append(prepare_mask(labels, resolution, patch_size))
    return torch.stack(prepared)


def data_identity(value: Any) -> str:
    """Return a short stable hash of a JSON-serializable description (for cache file names)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]
