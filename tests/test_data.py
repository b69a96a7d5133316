"""Image preprocessing, image datasets (folder, 🤗 datasets, demo) and model loading (`load_backbone`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_python, tiny_dinov2
from PIL import Image
from transformers import BitImageProcessor, ConvNextConfig, ConvNextModel

from sinder_peft.images.batching import UnreadableImageLog, collate_images
from sinder_peft.images.datasets import (
    HFImageDataset,
    HFImageIterableDataset,
    ImageFileDataset,
    ImageFolderDataset,
    UnreadableImage,
    build_dataset,
)
from sinder_peft.images.preprocessing import denormalize_image, prepare_image, resize_and_crop
from sinder_peft.models.loading import load_backbone
from sinder_peft.tuner.architectures import IMAGENET_MEAN, IMAGENET_STD, ImageNormalization

IMAGENET = ImageNormalization(IMAGENET_MEAN, IMAGENET_STD)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random RGB image of `width` × `height` pixels, converted to `mode`."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def reference_tensor(image: Image.Image, resized: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """Independent preprocessing: PIL bicubic resize to `resized`, numpy slice `box`, ImageNet normalization."""
    array = np.asarray(image.convert("RGB").resize(resized, Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    left, top, right, bottom = box
    array = (array[top:bottom, left:right] - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(array).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------------------------
# prepare_image
# ---------------------------------------------------------------------------------------------------------------


def test_prepare_image_resizes_short_side_and_centre_crops_to_whole_patches() -> None:
    image = random_image(300, 200)
    # short side 200 -> 100, so 300 -> 150; whole patches of 14: 140 x 98, centred: left 5, top 1.
    result = prepare_image(image, 100, 14, IMAGENET)
    assert result.shape == (3, 98, 140)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, reference_tensor(image, (150, 100), (5, 1, 145, 99)), atol=1e-5, rtol=0)


def test_prepare_image_518_short_side_gives_37_patches_and_keeps_aspect_ratio() -> None:
    portrait = random_image(400, 600, seed=1)
    result = prepare_image(portrait, 518, 14, IMAGENET)
    # 600 * 518 / 400 = 777 -> 770 = 55 patches
    assert result.shape == (3, 770, 518)
    assert (result.shape[1] // 14, result.shape[2] // 14) == (55, 37)


def test_prepare_image_square_crop() -> None:
    image = random_image(300, 200, seed=2)
    result = prepare_image(image, 100, 14, IMAGENET, square=True)
    assert result.shape == (3, 98, 98)
    torch.testing.assert_close(result, reference_tensor(image, (150, 100), (26, 1, 124, 99)), atol=1e-5, rtol=0)


def test_prepare_image_converts_modes_and_applies_the_normalization() -> None:
    grey = Image.new("L", (60, 60), color=51)
    normalization = ImageNormalization(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    result = prepare_image(grey, 42, 14, normalization)
    assert result.shape == (3, 42, 42)
    expected = (0.2 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.5, 0.25, 2.0])
    torch.testing.assert_close(result[:, 20, 20], expected)
    rgba = random_image(50, 50, mode="RGBA")
    assert prepare_image(rgba, 42, 14, IMAGENET).shape == (3, 42, 42)


def test_prepare_image_refuses_images_too_small() -> None:
    with pytest.raises(ValueError, match=r"300x200 pixels.*2x3 patch grid \(rows x columns\).*3x3"):
        prepare_image(random_image(300, 200), 28, 14, IMAGENET)
    with pytest.raises(ValueError, match=r"10x40 pixels \(width x height\), smaller than one 14x14 patch"):
        prepare_image(random_image(10, 40), 518, 14, IMAGENET)


def test_resize_and_crop_and_denormalize_give_the_picture_the_model_sees() -> None:
    image = random_image(90, 70, seed=3)
    cropped = resize_and_crop(image, 56, 14)
    assert cropped.size == (70, 56)
    pixel_values = prepare_image(image, 56, 14, IMAGENET)
    torch.testing.assert_close(pixel_values, prepare_image(cropped, 56, 14, IMAGENET))
    normalization = ImageNormalization(mean=(0.3, 0.2, 0.1), std=(0.1, 0.2, 0.4))
    restored = denormalize_image(prepare_image(image, 56, 14, normalization), normalization)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(cropped))


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder with images of every supported extension (any case, nested), a text file and a corrupt 'jpg'."""
    root = tmp_path / "images"
    (root / "b" / "deeper").mkdir(parents=True)
    random_image(40, 30, seed=1).save(root / "z_last.PNG")
    random_image(30, 40, seed=2).save(root / "a_first.jpg")
    random_image(50, 50, seed=3).save(root / "b" / "middle.JPEG", format="JPEG")
    random_image(42, 42, seed=4).save(root / "b" / "deeper" / "w.webp", format="WEBP", lossless=True)
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "broken.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    return root


def test_image_folder_dataset_lists_sorted_images_and_reports_unreadable_when_read(image_folder: Path) -> None:
    dataset = ImageFolderDataset(image_folder, 42, 14, IMAGENET)
    names = [dataset.file(index).relative_to(image_folder).as_posix() for index in range(len(dataset))]
    assert names == ["a_first.jpg", "b/broken.jpg", "b/deeper/w.webp", "b/middle.JPEG", "z_last.PNG"]
    item = dataset[2]
    assert item["path"] == str(image_folder / "b" / "deeper" / "w.webp") and item["index"] == 2
    webp = Image.open(image_folder / "b" / "deeper" / "w.webp")
    torch.testing.assert_close(item["pixel_values"], prepare_image(webp, 42, 14, IMAGENET, square=True))
    broken = dataset[1]
    assert isinstance(broken, UnreadableImage)
    assert broken.name == str(image_folder / "b" / "broken.jpg") and broken.index == 1
    assert "Cannot read the image" in broken.reason
    assert all(dataset[index]["pixel_values"].shape == (3, 42, 42) for index in (0, 2, 3, 4))


def test_truncated_and_too_small_images_are_found_when_read_and_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    random_image(64, 64, seed=5).save(tmp_path / "good.png")
    random_image(64, 64, seed=6).save(tmp_path / "cut.jpg", format="JPEG", quality=95)
    random_image(10, 12, seed=7).save(tmp_path / "tiny.png")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    dataset = ImageFolderDataset(tmp_path, 42, 14, IMAGENET)
    assert len(dataset) == 3
    items = [dataset[index] for index in range(3)]
    batch = collate_images(items)
    assert batch.paths == [str(tmp_path / "good.png")] and batch.indices == [1]
    assert batch.pixel_values.shape == (1, 3, 42, 42)
    assert [image.name for image in batch.unreadable] == [str(tmp_path / "cut.jpg"), str(tmp_path / "tiny.png")]
    assert "smaller than one 14x14 patch" in batch.unreadable[1].reason

    log = UnreadableImageLog()
    with caplog.at_level(logging.WARNING, logger="sinder_peft.images.batching"):
        assert log.add(batch.unreadable) == [str(tmp_path / "cut.jpg"), str(tmp_path / "tiny.png")]
        assert log.add(collate_images([dataset[0], dataset[2]]).unreadable) == []  # a second epoch
    assert len(log) == 2
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 2 and "cut.jpg" in warned[0] and "tiny.png" in warned[1]
    empty = collate_images([dataset[0]])
    assert empty.pixel_values is None and empty.paths == [] and len(empty.unreadable) == 1


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 42, 14)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image"):
        ImageFolderDataset(tmp_path / "empty", 42, 14)
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(tmp_path / "empty" / "sub" / "readme.md", 42, 14)


def test_collate_images_stacks_and_refuses_mixed_sizes() -> None:
    first = {"pixel_values": torch.zeros(3, 28, 42), "path": "a", "index": 4}
    second = {"pixel_values": torch.ones(3, 28, 42), "path": "b", "index": 7}
    batch = collate_images([first, UnreadableImage("c", 5, "broken"), second])
    assert batch.paths == ["a", "b"] and batch.indices == [4, 7]
    assert [image.name for image in batch.unreadable] == ["c"]
    torch.testing.assert_close(batch.pixel_values, torch.stack([first["pixel_values"], second["pixel_values"]]))
    with pytest.raises(ValueError, match="different sizes"):
        collate_images([first, {"pixel_values": torch.zeros(3, 42, 42), "path": "c"}])


# ---------------------------------------------------------------------------------------------------------------
# 🤗 datasets
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_images() -> list[Image.Image]:
    return [random_image(56 + 7 * index, 50, seed=10 + index) for index in range(3)]


def test_hf_dataset_from_save_to_disk(tmp_path: Path, hf_images: list[Image.Image]) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict({"picture": hf_images, "label": [0, 1, 2]})
    dataset = dataset.cast_column("picture", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))

    wrapped = build_dataset(tmp_path / "saved", 42, 14, IMAGENET, image_column="picture")
    assert isinstance(wrapped, HFImageDataset) and len(wrapped) == 3
    for index, image in enumerate(hf_images):
        item = wrapped[index]
        assert item["path"] == f"{tmp_path / 'saved'}:train:{index}"
        torch.testing.assert_close(item["pixel_values"], prepare_image(image, 42, 14, IMAGENET, square=True))

    streamed = build_dataset(tmp_path / "saved", 42, 14, IMAGENET, image_column="picture", streaming=True)
    assert isinstance(streamed, HFImageIterableDataset)
    items = list(streamed)
    assert [item["path"] for item in items] == [wrapped[index]["path"] for index in range(3)]
    for index, item in enumerate(items):
        torch.testing.assert_close(item["pixel_values"], wrapped[index]["pixel_values"])

    with pytest.raises(KeyError, match=r"no column 'image'.*'picture', 'label'"):
        HFImageDataset(str(tmp_path / "saved"), 42, 14)


def test_hf_dataset_dict_splits_and_corrupt_rows(tmp_path: Path, hf_images: list[Image.Image]) -> None:
    import datasets

    corrupt = {"bytes": b"not an image", "path": None}
    train = datasets.Dataset.from_dict({"image": hf_images[:2]}).cast_column("image", datasets.Image())
    validation = datasets.Dataset.from_dict({"image": [hf_images[2], corrupt]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(tmp_path / "dict"))

    dataset = HFImageDataset(str(tmp_path / "dict"), 42, 14, IMAGENET, split="validation", square=False)
    assert len(dataset) == 2
    torch.testing.assert_close(dataset[0]["pixel_values"], prepare_image(hf_images[2], 42, 14, IMAGENET))
    unreadable = dataset[1]
    assert isinstance(unreadable, UnreadableImage) and unreadable.name.endswith("validation:1")

    streamed = HFImageIterableDataset(str(tmp_path / "dict"), 42, 14, IMAGENET, split="validation")
    items = list(streamed)
    assert items[0]["path"].endswith("validation:0") and items[0]["index"] == 0
    assert isinstance(items[1], UnreadableImage) and items[1].index == 1

    with pytest.raises(KeyError, match=r"no split 'test'.*'train', 'validation'"):
        HFImageDataset(str(tmp_path / "dict"), 42, 14, split="test")


def test_hf_dataset_through_load_dataset(
    tmp_path: Path, hf_images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "parquet").mkdir()
    dataset = datasets.Dataset.from_dict({"image": hf_images}).cast_column("image", datasets.Image())
    dataset.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    wrapped = build_dataset(str(tmp_path / "parquet"), 42, 14, IMAGENET)
    assert isinstance(wrapped, HFImageDataset) and len(wrapped) == 3
    torch.testing.assert_close(wrapped[2]["pixel_values"], prepare_image(hf_images[2], 42, 14, IMAGENET, square=True))


def test_build_dataset_dispatch(image_folder: Path) -> None:
    folder = build_dataset(image_folder, 42, 14, IMAGENET)
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 5
    with pytest.raises(FileNotFoundError, match="does not exist and is not a 🤗 datasets name"):
        build_dataset("./no/such/folder", 42, 14)


def test_build_dataset_demo_images() -> None:
    from sinder_peft.synthetic.demo import demo_image_paths

    demo = build_dataset(None, 56, 14)
    assert isinstance(demo, ImageFileDataset)
    assert [demo.file(index) for index in range(len(demo))] == [Path(path) for path in demo_image_paths()]
    item = demo[0]
    assert item["pixel_values"].shape == (3, 56, 56)
    torch.testing.assert_close(
        item["pixel_values"], prepare_image(Image.open(demo_image_paths()[0]), 56, 14, IMAGENET, square=True)
    )


# ---------------------------------------------------------------------------------------------------------------
# load_backbone
# ---------------------------------------------------------------------------------------------------------------


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, value in first_state.items():
        torch.testing.assert_close(second_state[name], value, rtol=0, atol=0, msg=name)


def test_load_backbone_from_local_directory(tmp_path: Path) -> None:
    model = tiny_dinov2("registers", seed=3)
    model.save_pretrained(tmp_path / "plain")
    loaded, normalization = load_backbone(str(tmp_path / "plain"))
    assert type(loaded) is type(model) and not loaded.training
    assert_same_weights(model, loaded)
    assert normalization == ImageNormalization(IMAGENET_MEAN, IMAGENET_STD)

    model.save_pretrained(tmp_path / "with_processor")
    BitImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.1, 0.3]).save_pretrained(
        tmp_path / "with_processor"
    )
    loaded, normalization = load_backbone(str(tmp_path / "with_processor"), dtype=torch.float64)
    assert normalization == ImageNormalization((0.5, 0.4, 0.3), (0.2, 0.1, 0.3))
    assert all(parameter.dtype == torch.float64 for parameter in loaded.parameters())


def test_load_backbone_from_repair_output_directory(tmp_path: Path) -> None:
    model = tiny_dinov2("gelu", seed=4)
    model.save_pretrained(tmp_path / "run" / "model")
    loaded, _ = load_backbone(str(tmp_path / "run"))
    assert_same_weights(model, loaded)


def test_load_backbone_errors(tmp_path: Path) -> None:
    convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))  # not a ViT
    convnext.save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match=r"model_type='convnext'"):
        load_backbone(str(tmp_path / "convnext"))
    with pytest.raises(FileNotFoundError, match="does not exist and is not a Hub id"):
        load_backbone(str(tmp_path / "missing" / "model"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="PEFT adapter"):
        load_backbone(str(tmp_path / "adapter"))
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_backbone(str(tmp_path / "file.bin"))


def test_load_backbone_from_offline_hub_cache(tmp_path: Path) -> None:
    """A hub id resolves from a hand-built cache with HF_HUB_OFFLINE=1; an uncached one fails with a clear message."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--facebook--dinov2-small"
    snapshot = repo / "snapshots" / commit
    model = tiny_dinov2("gelu", seed=5)
    model.save_pretrained(snapshot)
    BitImageProcessor(image_mean=[0.25, 0.5, 0.75], image_std=[0.5, 0.5, 0.5]).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    expected = {name: float(value.double().sum()) for name, value in model.state_dict().items()}

    code = """
import json, sys
from sinder_peft.models.loading import ModelNotAvailableError, load_backbone
model, normalization = load_backbone("facebook/dinov2-small")
sums = {name: float(value.double().sum()) for name, value in model.state_dict().items()}
try:
    load_backbone("facebook/dinov2-large")
    message = None
except ModelNotAvailableError as error:
    message = str(error)
print(json.dumps({"type": type(model).__name__, "sums": sums, "mean": normalization.mean,
                  "std": normalization.std, "message": message}))
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(REPO_ROOT)}
    result = json.loads(run_python(code, cwd=tmp_path, env_update=env).stdout.strip().splitlines()[-1])
    assert result["type"] == "Dinov2Model"
    assert result["sums"] == pytest.approx(expected, rel=0, abs=0)
    assert result["mean"] == [0.25, 0.5, 0.75] and result["std"] == [0.5, 0.5, 0.5]
    message = result["message"]
    assert message is not None
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download facebook/dinov2-large" in message and "local directory" in message
