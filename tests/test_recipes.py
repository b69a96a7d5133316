"""The `preserve` recipe on harder planted models: random DINOv2 weights (initializer range 0.02), several seeds,
6 and 8 blocks, GELU and SwiGLU, the defect in a middle block.

Each model is repaired with `--recipe preserve` at 224 px on training pictures and judged on held-out ones: the
last-layer max/median token norm must fall to <= 5 and the clean tokens (norm below 4x the median before) must keep
a mean cosine >= 0.95 to the original. The log-scale shift is recorded in the adapter, and the adapter reloads to the
merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_python
from peft import PeftModel

from sinder_peft.analysis.detection import HIGH_NORM_FACTOR, find_defect_tokens
from sinder_peft.analysis.directions import singular_defect_directions
from sinder_peft.analysis.preservation import clean_token_cosine, clean_token_mask, output_features
from sinder_peft.images.preprocessing import normalize_image
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.synthetic.demo import build_demo_model, generate_demo_image
from sinder_peft.synthetic.random_planting import build_random_planted_dinov2
from sinder_peft.training.arguments import TrainingArguments

TRAIN_SEEDS = range(300, 324)
HELD_OUT_SEEDS = range(2000, 2008)
MODELS = [  # (seed, blocks, SwiGLU)
    (41, 6, False),
    (42, 8, False),
    (43, 6, True),
    (44, 8, True),
]


def pictures(seeds: range) -> torch.Tensor:
    """Normalized demo-like pictures (white spots on a textured background) of `seeds`, [N, 3, 224, 224]."""
    return torch.stack([normalize_image(generate_demo_image(seed)) for seed in seeds])


@pytest.fixture(scope="module")
def training_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    for seed in TRAIN_SEEDS:
        generate_demo_image(seed).save(folder / f"{seed}.png")
    return folder


def test_the_harder_planted_models_have_a_strong_defect_their_directions_find() -> None:
    held_out = pictures(HELD_OUT_SEEDS)
    for seed, blocks, swiglu in MODELS:
        planted = build_random_planted_dinov2(seed=seed, num_layers=blocks, swiglu=swiglu)
        directions = singular_defect_directions(planted.model)
        for layer in range(planted.defect_layer, blocks):
            assert abs(float(directions[layer] @ planted.direction)) >= 0.98, (seed, layer)
        analysis = find_defect_tokens(planted.model, held_out, directions)
        assert float(analysis.max_median_norm_ratio[:, -1].median()) > 100, seed


@pytest.mark.parametrize(("seed", "blocks", "swiglu"), MODELS)
def test_preserve_removes_the_defect_and_keeps_clean_tokens_on_held_out_images(
    tmp_path: Path, training_images: Path, seed: int, blocks: int, swiglu: bool
) -> None:
    planted = build_random_planted_dinov2(seed=seed, num_layers=blocks, swiglu=swiglu)
    planted.model.save_pretrained(tmp_path / "source")
    result = repair(
        RepairArguments(
            model=str(tmp_path / "source"), data=str(training_images), resolution=224, output_dir=str(tmp_path / "run")
        ),
        TrainingArguments(recipe="preserve", max_steps=300, stop_window=24),
    )
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["shift"] == "log"

    held_out = pictures(HELD_OUT_SEEDS)
    original = build_random_planted_dinov2(seed=seed, num_layers=blocks, swiglu=swiglu).model
    repaired = type(original).from_pretrained(tmp_path / "run" / "model").eval()
    before = find_defect_tokens(original, held_out)
    after = find_defect_tokens(repaired, held_out)
    assert float(before.max_median_norm_ratio[:, -1].min()) > 40
    assert float(after.max_median_norm_ratio[:, -1].max()) <= 5
    clean = clean_token_mask(before.token_norms[:, -1])
    cosine = clean_token_cosine(output_features(original, held_out), output_features(repaired, held_out), clean)
    assert cosine >= 0.95, cosine
    assert after.high_norm_defect_images.sum() == 0
    assert result.report["after"]["images_with_defects"] == 0
    assert result.report["clean_token_cosine"] >= 0.95


def test_a_log_shift_adapter_reloads_to_the_merged_model_in_a_fresh_process(tmp_path: Path) -> None:
    """The adapter of a preserve run, loaded onto the base model with PEFT in a fresh process and merged, gives the
    weights of the run's merged model/ (W + U diag(S (exp(delta) - 1)) V^T)."""
    result = repair(RepairArguments(output_dir=str(tmp_path / "run")), TrainingArguments(recipe="preserve"))
    assert result.report["outcome"] == "repaired"
    script = f"""
import torch, sinder_peft
from peft import PeftModel
from transformers import Dinov2Model
from sinder_peft.synthetic.demo import build_demo_model
model = PeftModel.from_pretrained(build_demo_model(), {str(tmp_path / "run" / "adapter")!r}).merge_and_unload()
expected = Dinov2Model.from_pretrained({str(tmp_path / "run" / "model")!r}).state_dict()
state = model.state_dict()
assert state.keys() == expected.keys()
for key, value in expected.items():
    torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)
"""
    run_python(script, cwd=REPO_ROOT)


def test_the_preserve_recipe_on_the_demo(tmp_path: Path) -> None:
    result = repair(RepairArguments(output_dir=str(tmp_path / "run")), TrainingArguments(recipe="preserve"))
    # the preserve test stops once no flagged token is a high-norm defect token (4x the median, added by a block)
    assert max(result.report["after"]["max_median_norm_ratio_last_layer"]) < HIGH_NORM_FACTOR
    assert result.report["clean_token_cosine"] >= 0.99
    assert result.report["training"]["norm_gap"] == 4.0 and result.report["outcome"] == "repaired"
    model = PeftModel.from_pretrained(build_demo_model(), tmp_path / "run" / "adapter")
    assert model.peft_config["default"].shift == "log"
