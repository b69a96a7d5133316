"""`sinder evaluate`: honest figures on synthetic data, the feature cache, data layouts and errors, the command line,
and two processes giving the numbers of one."""

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
from test_benchmarks import load_benchmark
from test_trainer import launch_two_processes

from sinder_peft.cli import main as cli_main
from sinder_peft.evaluation.arguments import EvaluationArguments
from sinder_peft.evaluation.datasets import load_classification_data, load_segmentation_data, prepare_mask
from sinder_peft.evaluation.evaluate import evaluate_models, run_evaluation
from sinder_peft.evaluation.features import model_fingerprint, shard_positions
from sinder_peft.images.preprocessing import load_image, prepare_image
from sinder_peft.synthetic.demo import build_demo_model, demo_image_paths
from sinder_peft.tuner.architectures import ImageNormalization

PALETTE = np.array([(190, 50, 50), (50, 160, 70), (60, 80, 190), (180, 170, 50)], dtype=np.float64)
KNN_CLASSES, SEG_CLASSES = 4, 3
KNN_SIZE, SEG_SIZE = 56, 112
FAST = {
    "num_workers": 0,
    "knn_resolution": KNN_SIZE,
    "seg_resolution": SEG_SIZE,
    "defect_resolution": SEG_SIZE,
    "norm_map_images": 1,
}


def class_image(label: int, rng: np.random.Generator) -> Image.Image:
    """An image of class `label`: its palette colour, a random shade, pixel noise."""
    pixels = PALETTE[label] * rng.uniform(0.7, 1.1) + rng.normal(0, 25, size=(KNN_SIZE, KNN_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def scene(rng: np.random.Generator, classes: int = SEG_CLASSES) -> tuple[Image.Image, np.ndarray]:
    """A scene of four rectangles split at a random point, each of a random class coloured by the palette."""
    mask = np.zeros((SEG_SIZE, SEG_SIZE), dtype=np.uint8)
    x, y = rng.integers(SEG_SIZE // 4, 3 * SEG_SIZE // 4, size=2)
    mask[:y, :x], mask[:y, x:], mask[y:, :x], mask[y:, x:] = rng.integers(0, classes, size=4)
    pixels = PALETTE[mask] + rng.normal(0, 20, size=(SEG_SIZE, SEG_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), mask


def write_knn_folder(root: Path, train: int = 7, val: int = 3, classes: int = KNN_CLASSES) -> Path:
    """`root/train/class_<c>/<i>.png` and `root/val/...`: odd counts, so two processes get uneven shares."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                class_image(label, rng).save(folder / f"{index}.png")
    return root


def write_seg_folder(root: Path, train: int = 15, val: int = 7) -> Path:
    """`root/{train,val}/images/s<i>.jpg` and `root/{train,val}/masks/s<i>.png`."""
    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = scene(rng)
            image.save(root / split / "images" / f"s{index}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"s{index}.png")
    return root


def zeroed_model() -> torch.nn.Module:
    """The tiny model with every patch-embedding weight zeroed: its features carry no information about the image."""
    model = tiny_dinov2()
    with torch.no_grad():
        model.embeddings.patch_embeddings.projection.weight.zero_()
    return model


class ForwardCounter:
    """Counts the forward passes of a model (any call of its embeddings)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.embeddings.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"knn": write_knn_folder(root / "knn"), "seg": write_seg_folder(root / "seg")}


@pytest.fixture(scope="module")
def evaluated(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One evaluation of a working and an information-free model on the kNN and segmentation folders."""
    output_dir = tmp_path_factory.mktemp("evaluated")
    good = tiny_dinov2()
    args = EvaluationArguments(
        output_dir=str(output_dir),
        knn_data=str(data["knn"]),
        seg_data=str(data["seg"]),
        **FAST,
    )
    normalization = ImageNormalization()
    results = evaluate_models([("good", good, normalization), ("zero", zeroed_model(), normalization)], args)
    return {"results": results, "output_dir": output_dir, "good": good, "args": args}


def test_figures_are_honest(evaluated: dict) -> None:
    """A working model scores high on easy data; one whose features carry no information scores at chance."""
    good, zero = evaluated["results"]["models"]
    assert good["model"] == "good" and zero["model"] == "zero"
    assert good["knn"]["top1"] == good["knn"]["by_k"]["20"] and good["knn"]["k"] == 20
    assert good["knn"]["top1"] >= 90
    assert zero["knn"]["top1"] <= 100 / KNN_CLASSES + 10  # every feature equal: one class for every image, 25 %
    assert good["segmentation"]["miou"] >= 80
    assert zero["segmentation"]["miou"] <= 35  # three classes placed at random: chance is about 20 %
    assert zero["segmentation"]["pixel_accuracy"] <= 100 / SEG_CLASSES + 15
    assert len(good["segmentation"]["per_class_iou"]) == SEG_CLASSES
    assert good["segmentation"]["miou"] == pytest.approx(np.mean(good["segmentation"]["per_class_iou"]))
    # the written files: the JSON returned, a table, the figures
    output_dir = evaluated["output_dir"]
    assert json.loads((output_dir / "evaluation.json").read_text()) == json.loads(json.dumps(evaluated["results"]))
    table = (output_dir / "evaluation.md").read_text()
    assert "| `good` |" in table and "| `zero` |" in table
    for name in ("evaluation.png", "norm_maps.png"):
        with Image.open(output_dir / name) as figure:
            assert figure.format == "PNG"


def test_knn_equals_an_independent_computation(evaluated: dict, data: dict[str, Path]) -> None:
    """The kNN figure equals a plain `model(pixel_values=...)` loop and a vote written out here."""
    model, normalization = evaluated["good"], ImageNormalization()

    def features(split: str) -> tuple[list[list[float]], list[int]]:
        rows, labels = [], []
        for label, folder in enumerate(sorted((data["knn"] / split).iterdir())):
            for path in sorted(folder.iterdir()):
                pixels = prepare_image(load_image(path), KNN_SIZE, 14, normalization, square=True)
                with torch.no_grad():
                    cls = model(pixel_values=pixels[None]).pooler_output[0]
                rows.append(torch.nn.functional.normalize(cls, dim=0).tolist())
                labels.append(label)
        return rows, labels

    train, train_labels = features("train")
    val, val_labels = features("val")
    by_k = evaluated["results"]["models"][0]["knn"]["by_k"]
    for k in (10, 20, 100, 200):
        correct = 0
        for query, truth in zip(val, val_labels, strict=True):
            similarity = [sum(a * b for a, b in zip(query, row, strict=True)) for row in train]
            nearest = sorted(range(len(train)), key=lambda index: -similarity[index])[:k]
            votes = [0.0] * KNN_CLASSES
            for index in nearest:
                votes[train_labels[index]] += math.exp(similarity[index] / 0.07)
            correct += int(votes.index(max(votes)) == truth)
        assert by_k[str(k)] == pytest.approx(100 * correct / len(val), abs=1e-9)


def test_second_run_reads_the_cache(evaluated: dict, data: dict[str, Path], tmp_path: Path) -> None:
    """Features and defect statistics come from the cache: the model never runs, the numbers are the same, and a
    different probe setting changes only the probe."""
    model = evaluated["good"]
    counter = ForwardCounter(model)
    cache = str(evaluated["output_dir"] / "cache")
    args = EvaluationArguments(
        output_dir=str(tmp_path / "again"),
        cache_dir=cache,
        knn_data=str(data["knn"]),
        seg_data=str(data["seg"]),
        **FAST,
    )
    again = evaluate_models([("good", model, ImageNormalization())], args)
    assert counter.calls == 0
    assert again["models"][0] == evaluated["results"]["models"][0]
    other = EvaluationArguments(**{**vars(args), "output_dir": str(tmp_path / "other"), "seg_epochs": 2})
    changed = evaluate_models([("good", model, ImageNormalization())], other)["models"][0]
    assert counter.calls == 0
    assert changed["knn"] == again["models"][0]["knn"]
    assert changed["segmentation"]["final_training_loss"] != again["models"][0]["segmentation"]["final_training_loss"]
    # another model (other weights) is not served from that cache
    other_model = tiny_dinov2(seed=1)
    other_counter = ForwardCounter(other_model)
    knn_only = EvaluationArguments(**{**vars(args), "seg_data": None})
    evaluate_models([("other", other_model, ImageNormalization())], knn_only)
    assert other_counter.calls > 0


def test_defect_figures_of_the_planted_defect(tmp_path: Path) -> None:
    """The demo model's planted defect shows in the defect figures of the demo images; a random model's does not."""
    args = EvaluationArguments(
        output_dir=str(tmp_path),
        defect_data=str(demo_image_paths()[0].parent),
        defect_resolution=224,
        num_workers=0,
        norm_map_images=2,
        directions="weights",  # the paper's theory; `auto` on random models: tests/test_direction_sources.py
    )
    normalization = ImageNormalization()
    models = [("demo", build_demo_model(), normalization), ("tiny", tiny_dinov2(), normalization)]
    results = evaluate_models(models, args)
    demo, tiny = (entry["defects"] for entry in results["models"])
    assert "knn" not in results["models"][0] and "segmentation" not in results["models"][0]
    assert demo["num_images"] == len(demo_image_paths())
    assert demo["norm_ratio"] >= 10 and demo["images_with_defects"] == 100 and demo["defect_token_share"] > 0
    assert demo["earliest_first_defective_layer"] == 2 and len(demo["per_layer_norm_ratio"]) == 6
    # a random model passes the white spots on as somewhat larger tokens, but not as defects
    assert tiny["norm_ratio"] < demo["norm_ratio"] / 3 and tiny["images_with_defects"] < 50
    assert (tmp_path / "norm_maps.png").is_file()


def test_masks_line_up_with_their_images() -> None:
    """`prepare_mask` crops and resizes a mask exactly as `prepare_image` does its image (non-square, odd sizes)."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.repeat(rng.integers(0, 4, size=(10, 15)), 10, axis=0), 10, axis=1)[:97, :150]
    image = Image.fromarray(PALETTE[labels].astype(np.uint8))
    pixels = prepare_image(image, 70, 14, ImageNormalization(mean=(0, 0, 0), std=(1, 1, 1)), square=True)
    mask = prepare_mask(labels.astype(np.uint8), 70, 14)
    assert tuple(mask.shape) == tuple(pixels.shape[1:]) == (70, 70)
    colours = torch.from_numpy(PALETTE / 255).float()
    nearest = ((pixels.permute(1, 2, 0)[..., None, :] - colours) ** 2).sum(-1).argmin(-1)
    # away from region borders (where bicubic resampling blends colours), colour and label agree
    interior = torch.ones_like(mask, dtype=torch.bool)
    for shift in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        interior &= mask == torch.roll(mask, shift, dims=(0, 1))
    assert interior.float().mean() > 0.5
    assert torch.equal(nearest[interior], mask[interior].long())


def test_data_errors_are_clear(tmp_path: Path, data: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"has no val/ folder: expected train/<class>/<image>"):
        (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
        load_classification_data(str(tmp_path / "noval"))
    loose = tmp_path / "loose"
    for split in ("train", "val"):
        (loose / split).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(loose / split / "x.png")
    with pytest.raises(ValueError, match="holds images directly"):
        load_classification_data(str(loose))
    single = write_knn_folder(tmp_path / "single", train=2, val=1, classes=1)
    with pytest.raises(ValueError, match="single class"):
        load_classification_data(str(single))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classification_data(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no train/masks/ folder"):
        (tmp_path / "seg" / "train" / "images").mkdir(parents=True)
        load_segmentation_data(str(tmp_path / "seg"))

    seg = write_seg_folder(tmp_path / "badmask", train=2, val=1)
    Image.new("L", (SEG_SIZE, SEG_SIZE - 8)).save(seg / "train" / "masks" / "s1.png")
    args = EvaluationArguments(output_dir=str(tmp_path / "out"), seg_data=str(seg), **FAST)
    model = [("tiny", tiny_dinov2(), ImageNormalization())]
    with pytest.raises(ValueError, match=r"s1.png is 112x104 pixels but its image .*s1.jpg is 112x112"):
        evaluate_models(model, args)
    Image.new("RGB", (SEG_SIZE, SEG_SIZE)).save(seg / "train" / "masks" / "s1.png")
    with pytest.raises(ValueError, match="is a RGB image; masks must be single-channel"):
        evaluate_models(model, args)
    for name in ("s0", "s1"):
        Image.new("L", (SEG_SIZE, SEG_SIZE), 2).save(seg / "train" / "masks" / f"{name}.png")
    with pytest.raises(ValueError, match="hold only class 2; a segmentation probe needs at least two classes"):
        evaluate_models(model, args)
    (seg / "val" / "masks" / "s0.png").unlink()
    with pytest.raises(ValueError, match=r"have no mask masks/<stem>.png \(e.g. s0.jpg\)"):
        load_segmentation_data(str(seg))

    # the command line turns them into one line on stderr and exit code 1
    assert cli_main(["evaluate", "demo", "--knn-data", str(loose), "--output-dir", str(tmp_path / "cli")]) == 1


def test_hf_datasets_give_the_numbers_of_the_folders(evaluated: dict, data: dict[str, Path], tmp_path: Path) -> None:
    """The same images as 🤗 datasets (`save_to_disk`): a kNN dataset with image and label columns, a segmentation
    dataset in the ADE20k layout (label 0 = other, classes from 1) give the folders' numbers."""
    import datasets

    knn_rows = {"train": {"image": [], "label": []}, "validation": {"image": [], "label": []}}
    for split, name in (("train", "train"), ("val", "validation")):
        for label, folder in enumerate(sorted((data["knn"] / split).iterdir())):
            for path in sorted(folder.iterdir()):
                knn_rows[name]["image"].append(str(path))
                knn_rows[name]["label"].append(label)
    seg_rows = {"train": {"image": [], "annotation": []}, "validation": {"image": [], "annotation": []}}
    for split, name in (("train", "train"), ("val", "validation")):
        for path in sorted((data["seg"] / split / "images").iterdir()):
            shifted = np.asarray(Image.open(data["seg"] / split / "masks" / f"{path.stem}.png")).astype(np.uint8) + 1
            annotation = tmp_path / f"{name}-{path.stem}.png"
            Image.fromarray(shifted, mode="L").save(annotation)
            seg_rows[name]["image"].append(str(path))
            seg_rows[name]["annotation"].append(str(annotation))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=KNN_CLASSES)})
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(rows, features=features) for name, rows in knn_rows.items()}
    ).save_to_disk(tmp_path / "knn_hf")
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(rows, features=features) for name, rows in seg_rows.items()}
    ).save_to_disk(tmp_path / "seg_hf")

    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"), knn_data=str(tmp_path / "knn_hf"), seg_data=str(tmp_path / "seg_hf"), **FAST
    )
    (result,) = evaluate_models([("good", evaluated["good"], ImageNormalization())], args)["models"]
    folder = evaluated["results"]["models"][0]
    assert result["knn"] == folder["knn"]
    assert result["segmentation"]["miou"] == pytest.approx(folder["segmentation"]["miou"], abs=1e-6)


def test_command_line_end_to_end(data: dict[str, Path], tmp_path: Path) -> None:
    """`python -m sinder_peft.cli evaluate demo DIR --knn-data --seg-data --output-dir` writes evaluation.json in the
    shape of the issue."""
    tiny_dinov2().save_pretrained(tmp_path / "tiny")
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "sinder_peft.cli", "evaluate", "demo", str(tmp_path / "tiny")]
    command += ["--knn-data", str(data["knn"]), "--seg-data", str(data["seg"]), "--output-dir", str(output_dir)]
    command += ["--knn-resolution", "56", "--seg-resolution", "112", "--defect-resolution", "112"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| `demo` |" in result.stdout
    results = json.loads((output_dir / "evaluation.json").read_text())
    assert [entry["model"] for entry in results["models"]] == ["demo", str(tmp_path / "tiny")]
    for entry in results["models"]:
        knn = entry["knn"]
        assert knn["k"] == 20 and set(knn["by_k"]) == {"10", "20", "100", "200"} and 0 <= knn["top1"] <= 100
        assert knn["top1"] >= 90
        segmentation = entry["segmentation"]
        assert 0 <= segmentation["miou"] <= 100 and len(segmentation["per_class_iou"]) == SEG_CLASSES
        assert segmentation["miou"] >= 80
        defects = entry["defects"]
        assert defects["norm_ratio"] >= 1 and len(defects["per_layer_norm_ratio"]) >= 3
    assert (output_dir / "evaluation.md").is_file() and (output_dir / "evaluation.png").is_file()
    assert any((output_dir / "cache").glob("features-*.safetensors"))


def test_two_processes_give_the_numbers_of_one(data: dict[str, Path], tmp_path: Path) -> None:
    """`examples/evaluate.py` in two processes (gloo on the CPU; uneven shares of 28, 12, 15 and 7 images) writes
    the numbers of one process."""
    arguments = ["demo", "--knn-data", str(data["knn"]), "--seg-data", str(data["seg"]), "--batch-size", "4"]
    arguments += ["--num-workers", "0", "--knn-resolution", "56", "--seg-resolution", "112"]
    arguments += ["--defect-resolution", "112"]
    launch_two_processes(["examples/evaluate.py", *arguments, "--output-dir", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())["models"][0]
    args = EvaluationArguments(
        output_dir=str(tmp_path / "one"), knn_data=str(data["knn"]), seg_data=str(data["seg"]), batch_size=4, **FAST
    )
    one = run_evaluation(["demo"], args)["models"][0]
    assert two["knn"] == one["knn"]
    assert two["segmentation"]["miou"] == pytest.approx(one["segmentation"]["miou"], abs=1e-3)
    assert two["defects"]["per_layer_norm_ratio"] == pytest.approx(one["defects"]["per_layer_norm_ratio"], rel=1e-5)


def test_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    model = tiny_dinov2()
    fingerprint = model_fingerprint(model)
    model.save_pretrained(tmp_path / "saved")
    from transformers import AutoModel

    assert model_fingerprint(AutoModel.from_pretrained(tmp_path / "saved")) == fingerprint
    with torch.no_grad():
        model.encoder.layer[1].mlp.fc1.weight.mul_(1.001)  # a small change of one middle weight
    assert model_fingerprint(model) != fingerprint


def test_shards_cover_every_position_once() -> None:
    for count in (0, 1, 5, 7, 8):
        for processes in (1, 2, 3):
            shares = [shard_positions(count, processes, index) for index in range(processes)]
            assert len({len(positions) for positions, _ in shares}) == 1  # equal lengths for collective gathers
            assert [p for positions, real in shares for p in positions[:real]] == list(range(count))


def test_benchmark_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_evaluate", monkeypatch)
    threads = torch.get_num_threads()
    try:
        parts = ["--parts", "extraction", "probes", "cause"]
        result = module.main(["--quick", "--threads", "1", *parts, "--output", str(tmp_path / "e.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "e.json").read_text())["benchmark"] == "evaluate"
    assert set(result["extraction"]) == {"plain", "extract (CLS)", "extract (CLS + patches)"}
    assert result["extraction"]["plain"]["throughput_vs_plain"] == 1
    assert all(entry["images_per_s"] > 0 for entry in result["extraction"].values())
    assert result["probes"]["segmentation_train_s"] > 0
    for head in ("depth_linear", "depth_bins"):
        assert result["probes"][head]["train_us_per_pixel"] > 0 and result["probes"][head]["rmse"] >= 0
    assert result["probes"]["unsupervised"]["kmeans_s"] > 0
    assert set(result["probes"]["knn_top1_by_k"]) == {10, 20, 100, 200}
    assert result["cause"]["images"] == 8 and result["cause"]["head_s_per_step"] > 0


def test_repair_ends_with_an_evaluation_of_the_original_and_the_repaired_model(
    tmp_path: Path, data: dict[str, Path]
) -> None:
    """`sinder repair --evaluate-knn-data ... --evaluate-seg-data ...`: both models evaluated after the repair, the
    result in report.json and evaluation/; a wrong layout fails before training, with nothing written."""
    from sinder_peft.jobs.repair import repair
    from sinder_peft.jobs.repair_arguments import RepairArguments
    from sinder_peft.training.arguments import TrainingArguments

    run = tmp_path / "run"
    arguments = RepairArguments(
        output_dir=str(run),
        evaluate_knn_data=str(data["knn"]),
        evaluate_seg_data=str(data["seg"]),
        evaluate_defect_data=str(demo_image_paths()[0].parent),
    )
    result = repair(arguments, TrainingArguments())
    assert result.report["outcome"] == "repaired"
    evaluation = result.report["evaluation"]
    assert [entry["model"] for entry in evaluation["models"]] == ["demo", "repaired"]
    for entry in evaluation["models"]:
        assert 0 <= entry["knn"]["top1"] <= 100 and 0 <= entry["segmentation"]["miou"] <= 100
    original, repaired = (entry["defects"]["norm_ratio"] for entry in evaluation["models"])
    assert repaired < original
    assert json.loads((run / "report.json").read_text())["evaluation"] == evaluation
    assert json.loads((run / "evaluation" / "evaluation.json").read_text()) == evaluation

    wrong = tmp_path / "wrong"
    (wrong / "nothing").mkdir(parents=True)
    with pytest.raises((ValueError, FileNotFoundError)):
        repair(RepairArguments(output_dir=str(tmp_path / "run2"), evaluate_knn_data=str(wrong)))
    assert not (tmp_path / "run2").exists()
