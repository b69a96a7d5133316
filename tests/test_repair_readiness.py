"""A repair at real scale: lazy class-folder trees, disjoint shares per process, the image processor in model/,
failures that end every process, bfloat16 checkpoints and resolutions that are not a multiple of the patch size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_python
from fake_hub import FakeHub
from PIL import Image
from safetensors.torch import load_file
from transformers import BitImageProcessor

from sinder_peft.images.preprocessing import prepare_image
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.jobs.repair_report import OUTCOME_EXIT_CODES
from sinder_peft.synthetic.demo import build_demo_model, demo_image_paths
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.tuner.architectures import IMAGENET_MEAN, IMAGENET_STD, ImageNormalization

CLASSES = 40
IMAGES_PER_CLASS = 50


def class_folder_tree(root: Path) -> Path:
    """An ImageNet-shaped `train/` tree: CLASSES folders of IMAGES_PER_CLASS images (hard links to the demo images),
    the first file of the first class unreadable."""
    sources = demo_image_paths()
    for label in range(CLASSES):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            target = folder / f"n{label:08d}_{index:05d}.png"
            if label == 0 and index == 0:
                target.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
            else:
                os.link(sources[(label + index) % len(sources)], target)
    return root


def test_a_class_folder_tree_is_listed_not_read_and_the_selection_spans_it(tmp_path: Path) -> None:
    """A 2,000-file tree and a 5-step run: only the images used are opened (the selection sample and one image per
    step), the selection comes from 8 different class folders, and the unreadable file it met is counted once."""
    tree = class_folder_tree(tmp_path / "train")
    script = f"""
import json, sys
opened = set()
def audit(event, arguments):
    if event == "open" and isinstance(arguments[0], str) and arguments[0].startswith({str(tree)!r}):
        opened.add(arguments[0])
sys.addaudithook(audit)
from sinder_peft.jobs.repair import main
code = main(["--data", {str(tree)!r}, "--output-dir", {str(tmp_path / "run")!r}, "--max-steps", "5",
             "--stop-window", "1000", "--lr", "0.0005"])
json.dump({{"code": code, "opened": sorted(opened)}}, open({str(tmp_path / "opened.json")!r}, "w"))
"""
    run_python(script, cwd=REPO_ROOT)
    result = json.loads((tmp_path / "opened.json").read_text())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert result["code"] == OUTCOME_EXIT_CODES[report["outcome"]] and report["steps"] == 5
    # 8 selection images (one of them replaced by its successor) and the 5 training images
    assert len(result["opened"]) <= 8 + 1 + report["images_seen"] <= 20
    selection = report["selection_images"]
    assert len(selection) == 8 and len({Path(path).parent.name for path in selection}) == 8
    first = str(tree / "n00000000" / "n00000000_00000.png")
    assert first not in selection and str(tree / "n00000000" / "n00000000_00001.png") in selection
    assert report["images_unreadable"] >= 1 and first in report["unreadable_images"]


SHARE_SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from torch.utils.data import get_worker_info
from sinder_peft.images.datasets import HFImageIterableDataset, ImageFolderDataset
from sinder_peft.images.batching import epoch_batches

class Recording(ImageFolderDataset):
    def __getitem__(self, index):
        item = super().__getitem__(index)
        item["path"] = item["path"] + ("@worker" if get_worker_info() is not None else "@main")
        return item

accelerator = Accelerator()
assert accelerator.num_processes == 2
folder, saved, output = sys.argv[1:4]
seen = {}
for workers in (0, 2):
    shares = {"folder": Recording(folder, 56, 14), "stream": HFImageIterableDataset(saved, 56, 14)}
    for name, dataset in shares.items():
        for epoch in (0, 1):
            batches = epoch_batches(dataset, batch_size=2, num_workers=workers, seed=3, epoch=epoch,
                                    process_index=accelerator.process_index, num_processes=2)
            seen[f"{name}/{workers}/{epoch}"] = [path for batch in batches for path in batch.paths]
json.dump(seen, open(f"{output}/rank{accelerator.process_index}.json", "w"))
"""


def test_two_processes_read_disjoint_shares_with_and_without_workers(tmp_path: Path) -> None:
    """Each process reads only its own share: over an epoch of two processes no image is read twice and every
    image is read, for an image folder (seeded permutation, a new one per epoch) and for a streamed 🤗 dataset
    (`split_dataset_by_node`), with DataLoader workers doing the reading when `num_workers` > 0."""
    import datasets
    from test_trainer import launch_two_processes

    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(9):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    images = [Image.open(folder / f"{index}.png").convert("RGB") for index in range(9)]
    datasets.Dataset.from_dict({"image": images}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "script.py").write_text(SHARE_SCRIPT)
    launch_two_processes([str(tmp_path / "script.py"), str(folder), str(tmp_path / "saved"), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for key in ranks[0]:
        name, workers, epoch = key.split("/")
        paths = [path for rank in ranks for path in rank[key]]
        assert len(paths) == 9 and len(set(paths)) == 9, (key, paths)
        if name == "folder":
            where = {path.rsplit("@", 1)[1] for path in paths}
            assert where == ({"worker"} if workers == "2" else {"main"}), key
    assert ranks[0]["folder/0/0"] != ranks[0]["folder/0/1"]  # a new order each epoch


def save_planted_model_with_processor(directory: Path, dtype: torch.dtype = torch.float32) -> BitImageProcessor:
    """Save the demo model (in `dtype`) with an image processor of its own: resize 256, crop 224, non-default
    mean/std, so that a copy can be told from a default."""
    build_demo_model().to(dtype).save_pretrained(directory)
    processor = BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.5, 0.45, 0.4],
        image_std=[0.25, 0.24, 0.23],
    )
    processor.save_pretrained(directory)
    return processor


FRESH_PROCESS_PIPELINE = """
import sys, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline
model_dir, image = sys.argv[1], Image.open(sys.argv[2]).convert("RGB")
processor = AutoImageProcessor.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
with torch.no_grad():
    expected = model(**processor(images=image, return_tensors="pt")).last_hidden_state
features = torch.tensor(pipeline("image-feature-extraction", model=model_dir)(image))
assert features.shape == expected.shape, (features.shape, expected.shape)
torch.testing.assert_close(features, expected.float(), rtol=1e-4, atol=1e-4)
assert not any(name.startswith("sinder_peft") for name in sys.modules)
print(type(processor).__name__, tuple(expected.shape))
"""


def run_fresh_pipeline(model_dir: Path) -> str:
    """Load model_dir's processor and model, and run the feature-extraction pipeline, in a fresh process that never
    imports sinder_peft; return what it printed."""
    script = [sys.executable, "-c", FRESH_PROCESS_PIPELINE, str(model_dir), str(demo_image_paths()[1])]
    result = subprocess.run(script, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_model_dir_keeps_the_source_image_processor(tmp_path: Path) -> None:
    source = tmp_path / "source"
    save_planted_model_with_processor(source)
    result = repair(RepairArguments(model=str(source), output_dir=str(tmp_path / "run")), TrainingArguments())
    assert result.report["outcome"] == "repaired"  # a model/ is written for a repaired (or partly repaired) model
    written = json.loads((tmp_path / "run" / "model" / "preprocessor_config.json").read_text())
    assert written == json.loads((source / "preprocessor_config.json").read_text())
    assert "BitImageProcessor" in run_fresh_pipeline(tmp_path / "run" / "model")


def test_model_dir_of_a_model_without_processor_gets_the_repair_preprocessing(tmp_path: Path) -> None:
    """The demo has no processor: model/ gets a BitImageProcessor doing what the repair did (short side to the
    resolution, centre square crop, ImageNet mean/std), which loads and runs without sinder_peft."""
    result = repair(RepairArguments(output_dir=str(tmp_path / "run")), TrainingArguments())
    assert result.report["outcome"] == "repaired"
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "BitImageProcessor"
    assert config["size"] == {"shortest_edge": 224} and config["crop_size"] == {"height": 224, "width": 224}
    assert config["image_mean"] == list(IMAGENET_MEAN) and config["image_std"] == list(IMAGENET_STD)
    from transformers import AutoImageProcessor

    image = Image.open(demo_image_paths()[2]).convert("RGB").resize((300, 260))
    processed = AutoImageProcessor.from_pretrained(model_dir)(images=image, return_tensors="pt")["pixel_values"]
    ours = prepare_image(image, 224, 14, ImageNormalization(), square=True)
    assert processed.shape == (1, *ours.shape)
    assert (processed[0] - ours).abs().mean() < 0.02  # PIL resampling of the two, same geometry and normalization
    run_fresh_pipeline(model_dir)


def test_upload_failure_ends_both_processes_quickly(tmp_path: Path) -> None:
    """Two gloo processes started by hand (no launcher to kill the survivor), the fake Hub answering 500: the main
    process shows the error once, the other stops because of it, both exit with 1, within seconds of each other."""
    import huggingface_hub  # noqa: F401  (the child processes use it; fail early here if it is missing)

    token = "hf_token_of_a_failing_hub"
    with FakeHub(token=token, fail_with=500, max_requests=64) as hub:
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": "2",
            "HF_HUB_OFFLINE": "0",
        }
        command = [
            sys.executable,
            "examples/repair.py",
            "--output-dir",
            str(tmp_path / "run"),
            "--push-to-hub",
            "someone/failing",
            "--hub-token",
            token,
            "--hub-endpoint",
            hub.endpoint,
        ]
        processes = [
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        ended: dict[int, float] = {}
        deadline = time.monotonic() + 600
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, process in enumerate(processes):
                if rank not in ended and process.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.1)
        for process in processes:
            if process.poll() is None:
                process.kill()
        outputs = [process.communicate() for process in processes]
    assert len(ended) == 2, "a process was still running after 10 minutes"
    assert abs(ended[0] - ended[1]) < 60
    assert [process.returncode for process in processes] == [1, 1], [error[-2000:] for _, error in outputs]
    main_error, other_error = outputs[0][1], outputs[1][1]
    assert "sinder repair: error:" in main_error and "HTTP 500" in main_error and "Traceback" not in main_error
    assert "sinder repair: error:" not in other_error and "Traceback" not in other_error
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()  # the outputs were written before the push


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_bfloat16_checkpoint_is_repaired_and_stays_bfloat16(tmp_path: Path) -> None:
    source = tmp_path / "source"
    save_planted_model_with_processor(source, torch.bfloat16)
    result = repair(
        RepairArguments(model=str(source), output_dir=str(tmp_path / "run")), TrainingArguments(max_steps=40)
    )
    model_dir = tmp_path / "run" / "model"
    weights = load_file(model_dir / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    before, after = result.report["before"], result.report["after"]
    assert after["mean_max_median_norm_ratio_last_layer"] < 0.2 * before["mean_max_median_norm_ratio_last_layer"]
    run_python(
        f"""
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(model_dir)!r})
assert next(model.parameters()).dtype == torch.bfloat16
""",
        cwd=REPO_ROOT,
    )


def test_a_resolution_that_is_not_a_multiple_of_the_patch_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="sinder_peft.jobs.repair_setup"):
        result = repair(RepairArguments(output_dir=str(tmp_path / "run"), resolution=230), TrainingArguments())
    assert "--resolution 230 is not a multiple of the patch size 14: training on 224x224 crops" in caplog.text
    assert result.report["resolution"] == 224 and result.report["requested_resolution"] == 230
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "| Resolution (short side) | 224 px |" in card
