"""docs/reproduce.md: every `sinder` command of the guide runs, end to end, on small synthetic stand-ins.

The commands are read from the guide itself (every line of a bash block that starts with `sinder`, continuation
lines joined), so the guide and this test cannot drift apart: a renamed flag, a missing model or a wrong layout
fails here. Only the names of models and data sets are replaced (ViT-g by the planted-defect demo model, the
registers model by a tiny DINOv2 with registers, each data set by a synthetic one in the same layout), and a few
settings are appended to make the runs small on a CPU (argparse takes the last value of a repeated flag).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_dinov2
from test_depth import write_depth_folder
from test_evaluate import write_knn_folder, write_seg_folder

from sinder_peft.cli import main as cli_main
from sinder_peft.synthetic.demo import demo_image_paths

GUIDE = REPO_ROOT / "docs" / "reproduce.md"
SMALL_REPAIR = ["--max-steps", "60"]  # enough for the paper recipe to repair the demo stand-in (outcome "repaired")
SMALL_EVALUATION = [
    "--knn-resolution", "56", "--seg-resolution", "112", "--depth-resolution", "112",
    "--unsupervised-resolution", "112", "--defect-resolution", "112", "--batch-size", "8", "--num-workers", "0",
    "--depth-epochs", "5", "--seg-epochs", "3", "--cause-crf-processes", "0",
]  # fmt: skip


def guide_commands() -> list[list[str]]:
    """Return the `sinder` commands of the guide's bash blocks, as argument lists (without the `sinder`)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("sinder "):
                commands.append(shlex.split(command)[1:])
    return commands


def test_the_guide_holds_the_whole_pipeline() -> None:
    """One repair, then kNN, ADE20k, NYUd and the two unsupervised sets (with the paper's protocol, CAUSE), each
    evaluating the three models."""
    commands = guide_commands()
    assert [command[0] for command in commands] == ["repair"] + ["evaluate"] * 5
    assert "--recipe" in commands[0] and commands[0][commands[0].index("--recipe") + 1] == "paper"
    flags = [next(argument for argument in command if argument.endswith("-data")) for command in commands[1:]]
    assert flags == ["--knn-data", "--seg-data", "--depth-data", "--unsupervised-data", "--unsupervised-data"]
    models = ["facebook/dinov2-giant", "runs/dinov2-giant-sinder", "facebook/dinov2-with-registers-giant"]
    for command in commands[1:]:
        assert command[1:4] == models
    for command in commands[4:]:
        assert command[command.index("--unsupervised-protocol") + 1] == "cause"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The replacement of every model and data set name of the guide."""
    root = tmp_path_factory.mktemp("stand_ins")
    tiny_dinov2("registers").save_pretrained(root / "registers")
    seg = write_seg_folder(root / "seg")
    voc, cityscapes = root / "voc", root / "cityscapes"
    for unsupervised in (voc, cityscapes):  # validation images and masks, training images without masks
        for split, folder in (("val", "images"), ("val", "masks"), ("train", "images")):
            (unsupervised / split).mkdir(parents=True, exist_ok=True)
            (unsupervised / split / folder).symlink_to(seg / split / folder)
    return {
        "facebook/dinov2-giant": "demo",
        "facebook/dinov2-with-registers-giant": str(root / "registers"),
        "imagenet-train-30k": str(demo_image_paths()[0].parent),
        "imagenet-1k": str(write_knn_folder(root / "knn")),
        "ade20k": str(seg),
        "nyu": str(write_depth_folder(root / "nyu")),
        "voc2012": str(voc),
        "cityscapes": str(cityscapes),
    }


def test_every_command_of_the_guide_runs(
    stand_ins: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state: None
) -> None:
    monkeypatch.chdir(tmp_path)  # the guide's output directories are relative
    sections = {"--knn-data": "knn", "--seg-data": "segmentation", "--depth-data": "depth"}
    sections["--unsupervised-data"] = "unsupervised"
    for command in guide_commands():
        arguments = [stand_ins.get(argument, argument) for argument in command]
        arguments += SMALL_REPAIR if command[0] == "repair" else SMALL_EVALUATION
        assert cli_main(arguments) == 0, command
        if command[0] == "repair":
            assert (tmp_path / "runs" / "dinov2-giant-sinder" / "model" / "config.json").is_file()
            continue
        output_dir = tmp_path / command[command.index("--output-dir") + 1]
        results = json.loads((output_dir / "evaluation.json").read_text())
        assert [entry["model"] for entry in results["models"]] == arguments[1:4]
        section = next(sections[argument] for argument in command if argument in sections)
        for entry in results["models"]:
            assert section in entry, (command, entry.keys())
        if "--unsupervised-protocol" in command:
            sections_fitted = [entry["unsupervised"] for entry in results["models"]]
            assert all(fitted["protocol"] == "cause" and fitted["fit_on"] == "train" for fitted in sections_fitted)
        assert (output_dir / "evaluation.md").is_file() and (output_dir / "evaluation.png").is_file()
