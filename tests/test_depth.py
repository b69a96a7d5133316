"""`sinder evaluate --depth-data`: the linear depth probe has a known answer on planted features, its figures equal
an independent computation, its data layouts (folders, 🤗 datasets, NYUd's crop) read right, and bad data fails
clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_dinov2
from PIL import Image
from test_evaluate import ForwardCounter, zeroed_model

from sinder_peft.evaluation.arguments import EvaluationArguments
from sinder_peft.evaluation.depth_data import load_depth_data, prepare_depth, valid_depth
from sinder_peft.evaluation.depth_probe import (
    bins_to_depth,
    depth_bin_centres,
    depth_error_sums,
    depth_metrics,
    evaluate_depth_probe,
    patch_log_depth_targets,
    train_linear_depth_probe,
)
from sinder_peft.evaluation.evaluate import evaluate_models
from sinder_peft.tuner.architectures import ImageNormalization

DEPTH_SIZE = 112
FAST_DEPTH = {
    "num_workers": 0,
    "depth_resolution": DEPTH_SIZE,
    "depth_epochs": 30,
    "depth_batch_size": 4,
    "depth_lr": 1e-2,
    "defect_max_images": 0,
}


def depth_scene(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A grey ramp across the image, horizontal or vertical, and its depth: 1 m + 4 m × the grey level (0-1), so
    depth is a linear function of the brightness of every pixel."""
    low, high = np.sort(rng.uniform(0.05, 0.95, size=2))
    ramp = np.linspace(low, high, DEPTH_SIZE)
    grey = np.broadcast_to(ramp[None, :] if rng.random() < 0.5 else ramp[:, None], (DEPTH_SIZE, DEPTH_SIZE))
    pixels = np.repeat((grey * 255)[..., None], 3, axis=2).astype(np.uint8)
    return Image.fromarray(pixels), 1.0 + 4.0 * grey


def write_depth_folder(root: Path, train: int = 24, val: int = 8, npy: bool = False) -> Path:
    """`root/{train,val}/images/d<i>.png` and `root/{train,val}/depth/d<i>.png` (16-bit, mm) or `.npy` (m)."""
    rng = np.random.default_rng(3)
    for split, count in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "depth").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, depth = depth_scene(rng)
            image.save(root / split / "images" / f"d{index}.png")
            millimetres = np.round(depth * 1000).astype(np.uint16)  # the same depths in both formats
            if npy:
                np.save(root / split / "depth" / f"d{index}.npy", millimetres.astype(np.float32) / 1000)
            else:
                Image.fromarray(millimetres).save(root / split / "depth" / f"d{index}.png")
    return root


def reference_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """RMSE, AbsRel and δ < 1.25 of every [H, W] image written out pixel by pixel over its valid (> 0) pixels, then
    averaged over the images that have one."""
    per_image = []
    for guesses, trues in zip(predicted, truth, strict=True):
        squared, relative, within, count = 0.0, 0.0, 0, 0
        for guess, true in zip(guesses.ravel().tolist(), trues.ravel().tolist(), strict=True):
            if true <= 0:
                continue
            count += 1
            squared += (guess - true) ** 2
            relative += abs(guess - true) / true
            within += max(guess / true, true / guess) < 1.25
        if count:
            per_image.append((math.sqrt(squared / count), relative / count, within / count))
    means = np.mean(per_image, axis=0).tolist()
    return {"rmse": means[0], "abs_rel": means[1], "delta1": means[2]}


@pytest.fixture(scope="module")
def depth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_depth_folder(tmp_path_factory.mktemp("depth") / "data")


@pytest.fixture(scope="module")
def depth_evaluated(depth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One evaluation of a working and an information-free model on the depth folder."""
    output_dir = tmp_path_factory.mktemp("depth_evaluated")
    args = EvaluationArguments(output_dir=str(output_dir), depth_data=str(depth_root), **FAST_DEPTH)
    normalization = ImageNormalization()
    good = tiny_dinov2()
    results = evaluate_models([("good", good, normalization), ("blind", zeroed_model(), normalization)], args)
    return {"results": results, "output_dir": output_dir, "good": good}


@pytest.mark.parametrize("head", ["linear", "bins"])
def test_probe_reads_depth_off_a_planted_feature(head: str) -> None:
    """Depth a linear function of one feature channel: the probe finds it (RMSE near 0); without the channel
    (noise only) it can only predict the typical depth (RMSE near the depths' spread). Both heads: an affine map,
    and DINOv2's bins (a normalised affine map over 256 bins)."""
    generator = torch.Generator().manual_seed(0)
    count, grid, channels, patch = 64, 8, 16, 14
    feature = torch.rand(count, grid, grid, generator=generator)
    noise = torch.randn(count, grid, grid, channels, generator=generator)
    planted = noise.clone()
    planted[..., 0] = feature
    cls = torch.randn(count, 8, generator=generator)
    depth = (1 + 4 * feature).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    log_depth, counts = patch_log_depth_targets(depth, patch)
    centres = depth_bin_centres(1e-3, 10.0, 256) if head == "bins" else None
    settings = {"head": head, "depth_range": (1e-3, 10.0), "centres": centres, "epochs": 30, "batch_size": 16}
    settings.update({"lr": 0.3 if head == "bins" else 0.03, "weight_decay": 1e-4, "seed": 0})
    errors = {}
    for name, features in (("planted", planted), ("blind", noise)):
        probe = train_linear_depth_probe(features, cls, log_depth, counts, show_progress=False, **settings)
        outputs = probe.logits(features, cls).permute(0, 2, 3, 1)
        patch_depth = bins_to_depth(outputs, centres) if head == "bins" else outputs[..., 0]
        errors[name] = float((patch_depth - (1 + 4 * feature)).pow(2).mean().sqrt())
    spread = float((1 + 4 * feature).std())
    assert errors["planted"] < 0.05 * spread
    assert errors["blind"] > 0.8 * spread


def test_patch_targets_and_bins_match_loops() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 8, size=(2, 28, 42))
    depth[rng.random(depth.shape) < 0.3] = 0
    depth[0, :14, :14] = 0  # a patch with no valid pixel
    log_depth, counts = patch_log_depth_targets(torch.from_numpy(depth), 14)
    for image in range(2):
        for row in range(2):
            for column in range(3):
                block = depth[image, row * 14 : row * 14 + 14, column * 14 : column * 14 + 14]
                valid = block[block > 0]
                assert counts[image, row, column] == valid.size
                expected = np.log(valid).mean() if valid.size else 0.0
                assert float(log_depth[image, row, column]) == pytest.approx(expected, abs=1e-5)
    centres = depth_bin_centres(0.001, 10.0, 5)
    assert centres.tolist() == pytest.approx([0.001, 2.50075, 5.0005, 7.50025, 10.0], abs=1e-5)
    assert depth_bin_centres(0.1, 10.0, 3, "log").tolist() == pytest.approx([0.1, 1.0, 10.0], rel=1e-5)
    logits = torch.tensor([[-3.0, 1.0, 0.0, 2.0, -1.0]])
    weights = [0.1, 1.1, 0.1, 2.1, 0.1]
    expected = sum(w * c for w, c in zip(weights, centres.tolist(), strict=True)) / sum(weights)
    assert float(bins_to_depth(logits, centres)) == pytest.approx(expected, rel=1e-6)


def test_metrics_equal_a_pixel_loop() -> None:
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.5, 9.0, size=(4, 10, 12))
    truth[rng.random(truth.shape) < 0.25] = 0
    truth[3] = 0  # an image without a valid pixel is not counted
    predicted = truth * rng.uniform(0.7, 1.4, size=truth.shape) + rng.normal(0, 0.1, size=truth.shape)
    predicted = np.clip(predicted, 0.01, None)
    sums = depth_error_sums(torch.from_numpy(predicted[:2]), torch.from_numpy(truth[:2])) + depth_error_sums(
        torch.from_numpy(predicted[2:]), torch.from_numpy(truth[2:])
    )
    metrics = depth_metrics(sums)
    expected = reference_metrics(predicted, truth)
    for name in ("rmse", "abs_rel", "delta1"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-9)
    with pytest.raises(ValueError, match="No valid depth pixel"):
        depth_metrics(depth_error_sums(torch.ones(1, 2, 2), torch.zeros(1, 2, 2)))


def test_working_model_beats_a_blind_one(depth_evaluated: dict) -> None:
    good, blind = (entry["depth"] for entry in depth_evaluated["results"]["models"])
    assert set(good) >= {"rmse", "abs_rel", "delta1", "num_train", "num_val", "resolution"}
    assert good["num_train"] == 24 and good["num_val"] == 8 and good["valid_pixels"] == 8 * DEPTH_SIZE**2
    # depths span 1.2-4.8 m (standard deviation about 0.9 m); a blind model predicts about the typical depth
    assert good["rmse"] < 0.35 and good["delta1"] > 0.95 and good["abs_rel"] < 0.1
    assert blind["rmse"] > 2 * good["rmse"] and blind["delta1"] < good["delta1"]
    output_dir = depth_evaluated["output_dir"]
    assert "depth_maps.png" in depth_evaluated["results"]["figures"]
    with Image.open(output_dir / "depth_maps.png") as figure:
        assert figure.format == "PNG"
    table = (output_dir / "evaluation.md").read_text()
    assert "depth RMSE (m)" in table and f"{good['rmse']:.3f}" in table


def test_second_run_reads_the_cached_features(depth_evaluated: dict, depth_root: Path, tmp_path: Path) -> None:
    """The depth features and maps come from the cache: the model never runs, the numbers are the same, and another
    probe setting changes only the probe."""
    model = depth_evaluated["good"]
    counter = ForwardCounter(model)
    cache = str(depth_evaluated["output_dir"] / "cache")
    data = str(depth_root)
    args = EvaluationArguments(output_dir=str(tmp_path / "a"), cache_dir=cache, depth_data=data, **FAST_DEPTH)
    again = evaluate_models([("good", model, ImageNormalization())], args)["models"][0]["depth"]
    assert counter.calls == 0 and again == depth_evaluated["results"]["models"][0]["depth"]
    other = EvaluationArguments(**{**vars(args), "output_dir": str(tmp_path / "b"), "depth_epochs": 2})
    changed = evaluate_models([("good", model, ImageNormalization())], other)["models"][0]["depth"]
    assert counter.calls == 0 and changed["final_training_loss"] != again["final_training_loss"]


def test_depth_figures_equal_an_independent_computation(depth_evaluated: dict, depth_root: Path) -> None:
    """The section's RMSE, AbsRel and δ equal the probe retrained from plain `model(pixel_values=...)` features and
    scored by the pixel loop of this test on the 16-bit PNGs read with PIL."""
    from sinder_peft.images.preprocessing import load_image, prepare_image

    model, normalization = depth_evaluated["good"], ImageNormalization()

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches, cls, maps = [], [], []
        for path in sorted((depth_root / name / "images").iterdir()):  # the order of the folder's listing
            pixels = prepare_image(load_image(path), DEPTH_SIZE, 14, normalization, square=True)
            with torch.no_grad():
                output = model(pixel_values=pixels[None])
            patches.append(output.last_hidden_state[0, 1:].reshape(8, 8, -1).half())
            cls.append(output.pooler_output[0])
            millimetres = np.asarray(Image.open(depth_root / name / "depth" / f"{path.stem}.png"))
            maps.append(torch.from_numpy(millimetres.astype(np.float32) / 1000))
        return torch.stack(patches), torch.stack(cls), torch.stack(maps)

    train_patches, train_cls, train_maps = split("train")
    val_patches, val_cls, val_maps = split("val")
    log_depth, counts = patch_log_depth_targets(train_maps, 14)
    probe = train_linear_depth_probe(
        train_patches,
        train_cls,
        log_depth,
        counts,
        head="linear",
        depth_range=(1e-3, 10.0),
        centres=None,
        epochs=30,
        lr=1e-2,
        weight_decay=1e-4,
        batch_size=4,
        seed=0,
        show_progress=False,
    )
    _, predicted = evaluate_depth_probe(probe, val_patches, val_cls, val_maps, keep=len(val_maps))
    expected = reference_metrics(predicted.double().numpy(), val_maps.double().numpy())
    section = depth_evaluated["results"]["models"][0]["depth"]
    for name in ("rmse", "abs_rel", "delta1"):
        assert section[name] == pytest.approx(expected[name], rel=1e-3, abs=1e-4)


def test_npy_maps_and_hf_datasets_give_the_numbers_of_the_png_folder(
    depth_evaluated: dict, depth_root: Path, tmp_path: Path
) -> None:
    """The same depths as .npy files in metres, and as a 🤗 dataset with float depth images (mode F, metres), give
    the 16-bit PNG folder's numbers."""
    import datasets

    npy_root = write_depth_folder(tmp_path / "npy", npy=True)
    rows: dict[str, dict[str, list]] = {}
    for split, name in (("train", "train"), ("val", "validation")):
        rows[name] = {"image": [], "depth_map": []}
        for path in sorted((depth_root / split / "images").iterdir()):
            metres = np.asarray(Image.open(depth_root / split / "depth" / f"{path.stem}.png")).astype(np.float32)
            depth_path = tmp_path / f"{name}-{path.stem}.tiff"
            Image.fromarray(metres / 1000, mode="F").save(depth_path)
            rows[name]["image"].append(str(path))
            rows[name]["depth_map"].append(str(depth_path))
    features = datasets.Features({"image": datasets.Image(), "depth_map": datasets.Image()})
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(values, features=features) for name, values in rows.items()}
    ).save_to_disk(tmp_path / "hf")
    reference = depth_evaluated["results"]["models"][0]["depth"]
    for source in (npy_root, tmp_path / "hf"):
        args = EvaluationArguments(output_dir=str(tmp_path / source.name), depth_data=str(source), **FAST_DEPTH)
        (entry,) = evaluate_models([("good", depth_evaluated["good"], ImageNormalization())], args)["models"]
        for name in ("rmse", "abs_rel", "delta1"):
            assert entry["depth"][name] == pytest.approx(reference[name], rel=1e-3, abs=1e-4), source


def test_nyu_maps_keep_the_eigen_crop_and_the_valid_range() -> None:
    depth = np.full((480, 640), 3.0, dtype=np.float32)
    depth[100, 100] = 0.0005  # below the smallest depth
    depth[101, 100] = 12.0  # beyond the largest
    depth[102, 100] = np.nan
    valid = valid_depth(depth, 1e-3, 10.0, "auto") > 0
    inside = np.zeros_like(valid)
    inside[45:471, 41:601] = True
    inside[100:103, 100] = False
    assert np.array_equal(valid, inside)
    assert (valid_depth(depth, 1e-3, 10.0, "none") > 0).sum() == 480 * 640 - 3
    with pytest.raises(ValueError, match="Eigen crop applies to NYUd's 640x480"):
        valid_depth(np.ones((100, 120), dtype=np.float32), 1e-3, 10.0, "eigen")
    # at 480 px (the default) a NYUd map is cropped, not resampled: the probe is scored at the map's resolution
    ramp = np.arange(480 * 640, dtype=np.float32).reshape(480, 640)
    prepared = prepare_depth(ramp, 480, 14)
    left, top = 82, 2  # the centre 476x476 square of 640x480, as torchvision's CenterCrop rounds it
    assert prepared.shape == (476, 476)
    assert torch.equal(prepared, torch.from_numpy(ramp[top : top + 476, left : left + 476]))


def test_depth_data_errors_are_clear(tmp_path: Path) -> None:
    root = write_depth_folder(tmp_path / "data", train=3, val=2)
    model = [("tiny", tiny_dinov2(), ImageNormalization())]
    args = EvaluationArguments(output_dir=str(tmp_path / "out"), depth_data=str(root), **FAST_DEPTH)

    # a depth map whose size differs from its image: both files and sizes named, before any model runs
    Image.fromarray(np.full((DEPTH_SIZE - 8, DEPTH_SIZE), 2000, dtype=np.uint16)).save(root / "train/depth/d1.png")
    with pytest.raises(ValueError, match=r"d1.png is 112x104 pixels but its image .*d1.png is 112x112"):
        evaluate_models(model, args)
    # an 8-bit map has no depth unit
    Image.new("L", (DEPTH_SIZE, DEPTH_SIZE), 3).save(root / "train/depth/d1.png")
    with pytest.raises(ValueError, match="is a L image; depth maps must be 16-bit PNGs in millimetres"):
        evaluate_models(model, args)
    # an image without its depth map
    (root / "train/depth/d1.png").unlink()
    with pytest.raises(ValueError, match=r"have no depth map depth/<stem>.png or .npy \(e.g. d1.png\)"):
        load_depth_data(str(root))
    # a folder without depth maps
    for path in (root / "train/depth").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"train/depth' holds no depth map"):
        load_depth_data(str(root))
    # a folder not in the layout, and a missing folder
    (tmp_path / "flat" / "train" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has no train/depth/ folder: expected train/images, train/depth"):
        load_depth_data(str(tmp_path / "flat"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_depth_data(str(tmp_path / "missing"))
    # maps that hold no depth in range (metres written where millimetres are read)
    metres = write_depth_folder(tmp_path / "metres", train=2, val=1)
    for path in (metres / "train" / "depth").iterdir():
        Image.fromarray(np.full((DEPTH_SIZE, DEPTH_SIZE), 20000, dtype=np.uint16)).save(path)
    args = EvaluationArguments(output_dir=str(tmp_path / "out2"), depth_data=str(metres), **FAST_DEPTH)
    with pytest.raises(ValueError, match=r"hold no valid pixel in \[0.001, 10.0\] m"):
        evaluate_models(model, args)
    with pytest.raises(ValueError, match="depth-min"):
        EvaluationArguments(output_dir=str(tmp_path), depth_min=5.0, depth_max=1.0)


def test_command_line_writes_the_depth_section(depth_root: Path, tmp_path: Path) -> None:
    """`sinder evaluate MODEL --depth-data ...` in a fresh process: evaluation.json holds the issue's keys."""
    tiny_dinov2().save_pretrained(tmp_path / "tiny")
    command = [sys.executable, "-m", "sinder_peft.cli", "evaluate", str(tmp_path / "tiny"), "--depth-data"]
    command += [str(depth_root), "--depth-resolution", "112", "--depth-epochs", "5", "--num-workers", "0"]
    command += ["--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads((tmp_path / "out" / "evaluation.json").read_text())["models"]
    assert {"rmse", "abs_rel", "delta1"} <= set(entry["depth"]) and 0 <= entry["depth"]["delta1"] <= 1
    assert "depth RMSE (m)" in result.stdout


def test_all_four_sections_side_by_side(depth_root: Path, tmp_path: Path) -> None:
    """kNN, segmentation, depth and unsupervised segmentation of two models in one run: every model has the four
    sections in evaluation.json, one column each in evaluation.md, one bar panel each in evaluation.png."""
    from test_evaluate import FAST, write_knn_folder, write_seg_folder

    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        knn_data=str(write_knn_folder(tmp_path / "knn")),
        seg_data=str(write_seg_folder(tmp_path / "seg")),
        depth_data=str(depth_root),
        **{**FAST, **FAST_DEPTH},
    )
    normalization = ImageNormalization()
    results = evaluate_models([("good", tiny_dinov2(), normalization), ("blind", zeroed_model(), normalization)], args)
    for entry in results["models"]:
        assert {"knn", "segmentation", "depth", "unsupervised"} <= set(entry)
    good, blind = results["models"]
    assert good["depth"]["rmse"] < blind["depth"]["rmse"]
    assert good["unsupervised"]["miou"] > blind["unsupervised"]["miou"]
    header = (tmp_path / "out" / "evaluation.md").read_text().splitlines()[2]
    for column in ("kNN top-1", "mIoU (%)", "depth RMSE (m)", "depth AbsRel", "depth δ < 1.25", "unsupervised mIoU"):
        assert column in header
    assert set(results["data"]) >= {"knn", "segmentation", "depth", "unsupervised"}
    with Image.open(tmp_path / "out" / "evaluation.png") as figure:
        assert figure.width > 4 * 400  # four bar panels, 4 inches at 100 dpi each


def test_two_processes_give_the_depth_of_one(depth_root: Path, tmp_path: Path) -> None:
    """`examples/evaluate.py` in two processes (gloo on the CPU; 24 and 8 images, uneven shares at batch 5) writes
    the depth and unsupervised figures of one process."""
    from test_evaluate import FAST, write_seg_folder
    from test_trainer import launch_two_processes

    from sinder_peft.evaluation.evaluate import run_evaluation

    seg = write_seg_folder(tmp_path / "seg", train=3, val=5)
    arguments = ["demo", "--depth-data", str(depth_root), "--unsupervised-data", str(seg), "--batch-size", "5"]
    arguments += ["--num-workers", "0", "--depth-resolution", "112", "--depth-epochs", "30", "--depth-lr", "1e-2"]
    arguments += ["--depth-batch-size", "4", "--unsupervised-resolution", "112", "--defect-max-images", "0"]
    launch_two_processes(["examples/evaluate.py", *arguments, "--output-dir", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())["models"][0]
    args = EvaluationArguments(
        output_dir=str(tmp_path / "one"),
        depth_data=str(depth_root),
        unsupervised_data=str(seg),
        batch_size=5,
        unsupervised_resolution=112,
        **{**FAST, **FAST_DEPTH},
    )
    one = run_evaluation(["demo"], args)["models"][0]
    for name in ("rmse", "abs_rel", "delta1"):
        assert two["depth"][name] == pytest.approx(one["depth"][name], rel=1e-3, abs=1e-4)
    assert two["unsupervised"]["miou"] == pytest.approx(one["unsupervised"]["miou"], abs=1e-3)
