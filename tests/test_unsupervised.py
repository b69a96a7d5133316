"""Unsupervised segmentation of `sinder evaluate`: k-means with Hungarian matching separates separable regions, a
blind model does not, the figures equal an independent computation, and it runs on `--unsupervised-data`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_dinov2
from PIL import Image
from scipy.optimize import linear_sum_assignment
from test_evaluate import FAST, SEG_SIZE, write_seg_folder, zeroed_model

from sinder_peft.evaluation.arguments import EvaluationArguments
from sinder_peft.evaluation.clustering import (
    cluster_class_counts,
    cluster_maps,
    matched_confusion,
    maximum_matching,
    spherical_kmeans,
)
from sinder_peft.evaluation.evaluate import evaluate_models
from sinder_peft.tuner.architectures import ImageNormalization


def test_matching_is_the_best_assignment() -> None:
    """`maximum_matching` finds the assignment of largest total weight: the same total as scipy's, and as trying
    every permutation on small matrices; rectangular matrices match min(R, C) pairs."""
    rng = np.random.default_rng(0)
    for rows, columns in ((4, 4), (5, 3), (3, 6), (6, 6)):
        weights = torch.from_numpy(rng.integers(0, 50, size=(rows, columns))).long()
        pairs = maximum_matching(weights)
        assert len(pairs) == min(rows, columns)
        assert len({row for row, _ in pairs}) == len({column for _, column in pairs}) == len(pairs)
        total = sum(int(weights[row, column]) for row, column in pairs)
        row_index, column_index = linear_sum_assignment(weights.numpy(), maximize=True)
        assert total == int(weights.numpy()[row_index, column_index].sum())
        if rows == columns:
            best = max(sum(int(weights[i, p[i]]) for i in range(rows)) for p in itertools.permutations(range(rows)))
            assert total == best
    big = torch.from_numpy(rng.integers(0, 10_000, size=(30, 30)))
    row_index, column_index = linear_sum_assignment(big.numpy(), maximize=True)
    assert sum(int(big[r, c]) for r, c in maximum_matching(big)) == int(big.numpy()[row_index, column_index].sum())


def test_kmeans_finds_separated_clusters() -> None:
    """Three well separated directions with noise: k-means recovers them up to relabelling."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5
    labels = torch.randint(3, (600,), generator=generator)
    features = centres[labels] + 0.5 * torch.randn(600, 8, generator=generator)
    centroids = spherical_kmeans(features, 3, seed=1)
    assigned = (torch.nn.functional.normalize(features, dim=1) @ centroids.T).argmax(dim=1)
    pairs = {(int(a), int(b)) for a, b in zip(assigned, labels, strict=True)}
    assert len(pairs) == 3  # a one-to-one relabelling
    with pytest.raises(ValueError, match="Cannot make 5 clusters of 4 tokens"):
        spherical_kmeans(features[:4], 5)


def test_matched_confusion_counts_unmatched_clusters_as_errors() -> None:
    counts = torch.tensor([[10, 0], [1, 7], [0, 5]])  # three clusters, two classes
    confusion = matched_confusion(counts)
    # cluster 0 -> class 0, cluster 1 -> class 1; cluster 2 has no class: its pixels are wrong
    assert confusion.tolist() == [[10, 1, 0], [0, 7, 5], [0, 0, 0]]


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seg_folder(tmp_path_factory.mktemp("unsupervised") / "seg")


@pytest.fixture(scope="module")
def unsupervised_evaluated(seg_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The unsupervised section of a working and a blind model on the validation split of `--seg-data`."""
    output_dir = tmp_path_factory.mktemp("unsupervised_evaluated")
    args = EvaluationArguments(output_dir=str(output_dir), seg_data=str(seg_root), **FAST)
    normalization = ImageNormalization()
    good = tiny_dinov2()
    results = evaluate_models([("good", good, normalization), ("blind", zeroed_model(), normalization)], args)
    return {"results": results, "output_dir": output_dir, "good": good}


def test_separable_regions_give_a_high_miou_and_a_blind_model_a_low_one(unsupervised_evaluated: dict) -> None:
    good, blind = (entry["unsupervised"] for entry in unsupervised_evaluated["results"]["models"])
    assert good["miou"] >= 90 and good["clusters"] == good["num_classes"] == 3 and good["num_val"] == 7
    assert blind["miou"] <= 40
    assert good["miou"] == pytest.approx(np.mean([value for value in good["per_class_iou"].values()]))
    table = (unsupervised_evaluated["output_dir"] / "evaluation.md").read_text()
    assert "unsupervised mIoU (%)" in table and f"{good['miou']:.1f}" in table
    assert (
        unsupervised_evaluated["results"]["data"]["unsupervised"]
        == unsupervised_evaluated["results"]["data"]["segmentation"]
    )


def test_miou_equals_an_independent_computation(unsupervised_evaluated: dict, seg_root: Path) -> None:
    """Given the section's k-means centroids (refitted here from plain forward passes with the same seed), every
    pixel's cluster, the Hungarian matching (scipy) and the IoUs written out here give the section's mIoU."""
    from sinder_peft.images.preprocessing import load_image, prepare_image

    model, normalization = unsupervised_evaluated["good"], ImageNormalization()
    patches, masks = [], []
    for path in sorted((seg_root / "val" / "images").iterdir()):
        pixels = prepare_image(load_image(path), SEG_SIZE, 14, normalization, square=True)
        with torch.no_grad():
            tokens = model(pixel_values=pixels[None]).last_hidden_state[0, 1:]
        patches.append(tokens.reshape(8, 8, -1).half())
        masks.append(torch.from_numpy(np.array(Image.open(seg_root / "val" / "masks" / f"{path.stem}.png"))))
    patches, masks = torch.stack(patches), torch.stack(masks)
    centroids = spherical_kmeans(patches.reshape(-1, patches.shape[-1]), 3, restarts=3, seed=0)
    assigned = cluster_maps(patches, centroids, (SEG_SIZE, SEG_SIZE)).numpy()
    truth = masks.numpy()
    counts = np.zeros((3, 3), dtype=np.int64)
    for cluster, label in zip(assigned.ravel(), truth.ravel(), strict=True):
        counts[cluster, label] += 1
    clusters, classes = linear_sum_assignment(counts, maximize=True)
    mapping = dict(zip(clusters.tolist(), classes.tolist(), strict=True))
    predicted = np.vectorize(mapping.get)(assigned)
    ious = []
    for label in range(3):
        intersection = np.logical_and(predicted == label, truth == label).sum()
        union = np.logical_or(predicted == label, truth == label).sum()
        ious.append(100 * intersection / union)
    section = unsupervised_evaluated["results"]["models"][0]["unsupervised"]
    assert section["miou"] == pytest.approx(np.mean(ious), abs=1e-6)
    counted = cluster_class_counts(patches, centroids, masks, torch.arange(3), 255).numpy()
    assert np.array_equal(counted, counts)


def test_unsupervised_data_needs_only_a_validation_split(seg_root: Path, tmp_path: Path) -> None:
    """`--unsupervised-data` with only val/images and val/masks (255 ignored), its own section; a single-class
    folder fails clearly before any model runs."""
    val_only = tmp_path / "val_only"
    (val_only / "val").mkdir(parents=True)
    for folder in ("images", "masks"):
        (val_only / "val" / folder).symlink_to(seg_root / "val" / folder)
    args = EvaluationArguments(output_dir=str(tmp_path / "out"), unsupervised_data=str(val_only), **FAST)
    (entry,) = evaluate_models([("good", tiny_dinov2(), ImageNormalization())], args)["models"]
    assert set(entry) == {"model", "unsupervised"} and entry["unsupervised"]["miou"] >= 90

    single = tmp_path / "single"
    for folder in ("images", "masks"):
        (single / "val" / folder).mkdir(parents=True)
    Image.new("RGB", (SEG_SIZE, SEG_SIZE)).save(single / "val" / "images" / "a.png")
    Image.new("L", (SEG_SIZE, SEG_SIZE), 1).save(single / "val" / "masks" / "a.png")
    args = EvaluationArguments(output_dir=str(tmp_path / "out2"), unsupervised_data=str(single), **FAST)
    with pytest.raises(ValueError, match="hold 1 class"):
        evaluate_models([("tiny", tiny_dinov2(), ImageNormalization())], args)
    with pytest.raises(ValueError, match="has no val/masks/ folder"):
        (tmp_path / "nomasks" / "val" / "images").mkdir(parents=True)
        evaluate_models(
            [("tiny", tiny_dinov2(), ImageNormalization())],
            EvaluationArguments(output_dir=str(tmp_path / "o"), unsupervised_data=str(tmp_path / "nomasks"), **FAST),
        )


def test_a_hf_dataset_gives_the_numbers_of_the_folder(
    unsupervised_evaluated: dict, seg_root: Path, tmp_path: Path
) -> None:
    """The validation split as a 🤗 dataset in the ADE20k layout (label 0 = other, classes from 1) gives the folder's
    unsupervised mIoU; `sinder repair --evaluate-unsupervised-data` and `--evaluate-depth-data` reach the
    evaluation."""
    import datasets

    from sinder_peft.jobs.repair_arguments import RepairArguments, evaluation_settings

    rows: dict[str, list[str]] = {"image": [], "annotation": []}
    for path in sorted((seg_root / "val" / "images").iterdir()):
        shifted = np.array(Image.open(seg_root / "val" / "masks" / f"{path.stem}.png")).astype(np.uint8) + 1
        Image.fromarray(shifted, mode="L").save(tmp_path / f"{path.stem}.png")
        rows["image"].append(str(path))
        rows["annotation"].append(str(tmp_path / f"{path.stem}.png"))
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        tmp_path / "hf"
    )
    args = EvaluationArguments(output_dir=str(tmp_path / "out"), unsupervised_data=str(tmp_path / "hf"), **FAST)
    (entry,) = evaluate_models([("good", unsupervised_evaluated["good"], ImageNormalization())], args)["models"]
    folder = unsupervised_evaluated["results"]["models"][0]["unsupervised"]
    assert entry["unsupervised"]["miou"] == pytest.approx(folder["miou"], abs=1e-6)

    repair = RepairArguments(
        output_dir=str(tmp_path / "run"), evaluate_unsupervised_data="voc", evaluate_depth_data="nyu"
    )
    settings = evaluation_settings(repair, tmp_path / "run")
    assert repair.evaluates and settings.unsupervised_data == "voc" and settings.depth_data == "nyu"
