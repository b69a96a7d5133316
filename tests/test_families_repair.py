"""The whole repair, as a user runs it, on a planted-defect model of every ViT family: directory in, directory out.

Each model is saved with its family's image processor (`synthetic.planting.save_planted_model`), repaired by
`repair()` on images with white spots on its own patch grid, at 224 px with the same hyperparameters for every family
(the paper's learning rate), with both recipes. It must come out with its last-layer max/median token norm from >= 40
down to <= 5, its image processor and its own class; with the `preserve` recipe its clean tokens must also stay in
place (cosine >= 0.95), which the paper's additive shifts do not achieve on every family (DINOv3 and Depth Anything
here: see docs/method.md §7). One fresh process that never imports sinder_peft reloads every repaired model.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_python

from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.synthetic.planting import build_planted_model, generate_spot_image, save_planted_model
from sinder_peft.training.arguments import TrainingArguments

FAMILIES = ["dinov3", "dinov3_gated", "clip_vision", "clip", "siglip", "siglip2", "vit", "deit", "depth_anything"]
"""Every family but DINOv2 (whose repair the other test files cover), and two wrappers (CLIPModel, DepthAnything)."""

RECIPES = ("paper", "preserve")
RELOAD_CLASSES = {"depth_anything": "AutoModelForDepthEstimation"}
"""How a fresh process loads each repaired model: `AutoModel`, except where transformers needs another auto class."""


@pytest.fixture(scope="module")
def repaired(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """Repair every family once with each recipe; return, per (family, recipe), its source and output directories
    and the report."""
    results = {}
    for (index, family), recipe in itertools.product(enumerate(FAMILIES), RECIPES):
        root = tmp_path_factory.mktemp(f"{family}-{recipe}")
        planted = build_planted_model(family, seed=10 + index)
        save_planted_model(planted, root / "source")
        images = root / "images"
        images.mkdir()
        for seed in range(6):
            generate_spot_image(seed, 224, planted.patch_size).save(images / f"{seed}.png")
        result = repair(
            RepairArguments(
                model=str(root / "source"), data=str(images), resolution=224, output_dir=str(root / "run")
            ),
            TrainingArguments(max_steps=200, stop_window=6, recipe=recipe),
        )
        results[family, recipe] = {"source": root / "source", "run": root / "run", "report": result.report}
    return results


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_repair_removes_the_planted_defect(repaired: dict, family: str, recipe: str) -> None:
    report = repaired[family, recipe]["report"]
    before, after = report["before"], report["after"]
    assert min(before["max_median_norm_ratio_last_layer"]) >= 40, before
    assert max(after["max_median_norm_ratio_last_layer"]) <= 5, after
    assert before["images_with_defects"] == 4 and after["images_with_defects"] == 0
    assert report["resolution"] == 224
    if recipe == "preserve":
        assert report["clean_token_cosine"] >= 0.95


@pytest.mark.parametrize("family", FAMILIES)
def test_the_output_has_the_source_class_and_image_processor(repaired: dict, family: str) -> None:
    source, model_dir = repaired[family, "paper"]["source"], repaired[family, "paper"]["run"] / "model"
    source_config = json.loads((source / "config.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == source_config["architectures"]
    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert processor == json.loads((source / "preprocessor_config.json").read_text())


def test_every_repaired_model_reloads_without_sinder_peft(repaired: dict) -> None:
    """One fresh process loads each repaired model and its processor, and checks the weights are those written."""
    entries = {
        f"{family}-{recipe}": [str(result["run"] / "model"), RELOAD_CLASSES.get(family, "AutoModel")]
        for (family, recipe), result in repaired.items()
    }
    script = f"""
import sys, transformers
from safetensors.torch import load_file
for family, (directory, loader) in {entries!r}.items():
    model = getattr(transformers, loader).from_pretrained(directory)
    expected = load_file(directory + "/model.safetensors")
    state = model.state_dict()
    assert all((state[key] == value).all() for key, value in expected.items() if key in state), family
    assert type(model).__name__ == model.config.architectures[0], (family, type(model).__name__)
    transformers.AutoImageProcessor.from_pretrained(directory)
assert not any(name.startswith("sinder_peft") for name in sys.modules)
"""
    run_python(script, cwd=REPO_ROOT)


@pytest.mark.parametrize("family", ["dinov3", "clip", "siglip", "vit"])
def test_diagnose_and_evaluate_read_every_family(repaired: dict, family: str, tmp_path: Path) -> None:
    """`sinder diagnose` finds the planted defect of the source model; `sinder evaluate` compares the defect figures
    of the source and its repair side by side."""
    from sinder_peft.evaluation.evaluate import evaluate
    from sinder_peft.jobs.diagnose import diagnose

    result = repaired[family, "preserve"]
    images = result["run"].parent / "images"
    report = diagnose(str(result["source"]), [str(images)], output_dir=str(tmp_path / "diagnose"), resolution=224)
    assert [entry["first_defective_layer"] for entry in report["images"]] == [1] * 6
    assert min(entry["max_median_norm_ratio"][-1] for entry in report["images"]) >= 40
    evaluation = evaluate(
        [str(result["source"]), str(result["run"])], output_dir=str(tmp_path / "evaluate"), defect_data=str(images)
    )
    source, repaired_model = (entry["defects"]["norm_ratio"] for entry in evaluation["models"])
    assert source >= 40 and repaired_model <= 5
