"""A defect is born in a block, and every decision agrees with the token norms (docs/method.md §2).

The harder planted models here have trigger patches that are already long at the embedding
(`build_random_planted_dinov2(long_input=True)` on `generate_block_image` pictures: flat grey, one white block, the
white patches at 4-6x their image's median norm before any block): those tokens are input features until the planted
block makes them hundreds of times the median. Beside them: sparse units in a middle block, clean models, the defect
test of each recipe against independent computations, the stop rules, and a run that cannot change anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from sinder_peft.analysis.detection import (
    HIGH_NORM_FACTOR,
    DefectTest,
    born_high_norm_mask,
    estimate_defect_directions,
    find_defect_tokens,
)
from sinder_peft.analysis.preservation import clean_token_cosine, clean_token_mask, output_features
from sinder_peft.images.preprocessing import normalize_image, prepare_image
from sinder_peft.jobs.diagnose import diagnose
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.jobs.repair_report import summary_text
from sinder_peft.synthetic.demo import generate_demo_image
from sinder_peft.synthetic.planting import generate_block_image, save_planted_model
from sinder_peft.synthetic.random_planting import build_random_planted_dinov2, build_sparse_unit_dinov2
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.training.state import TrainerState
from sinder_peft.training.trainer import capped_stop_window
from sinder_peft.tuner.architectures import ImageNormalization

TRAIN_SEEDS = range(300, 324)
HELD_OUT_SEEDS = range(2000, 2008)
LONG_INPUT_MODELS = [  # (seed, blocks, SwiGLU, defect layer)
    (0, 6, False, 3),
    (1, 6, True, 3),
    (2, 8, False, 5),
]


def block_pixels(seeds: range) -> torch.Tensor:
    """Normalized `generate_block_image` pictures of `seeds`, [N, 3, 224, 224]."""
    return torch.stack([normalize_image(generate_block_image(seed)) for seed in seeds])


def embedding_norm_ratios(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Each patch token's norm over its image's median at the embedding output, [N, H, W], from transformers' own
    forward (hidden_states[0]), not from the package."""
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states[0][:, 1:]
    norms = hidden.norm(dim=-1)
    return (norms / norms.median(dim=1, keepdim=True).values).reshape(len(pixels), 16, 16)


def test_born_high_norm_mask_matches_an_independent_computation() -> None:
    generator = np.random.default_rng(0)
    norms = generator.lognormal(0.0, 1.0, size=(4, 3, 5, 5))
    added = norms * generator.uniform(0.0, 1.5, size=norms.shape)
    median = np.median(norms.reshape(4, 3, 25), axis=-1)[..., None, None]  # 25 tokens: one middle value
    expected = (norms >= HIGH_NORM_FACTOR * median) & (added >= HIGH_NORM_FACTOR * median)
    mask = born_high_norm_mask(torch.from_numpy(norms), torch.from_numpy(added))
    assert expected.any() and not expected.all()
    assert np.array_equal(mask.numpy(), expected)


def test_the_defect_test_of_each_recipe() -> None:
    """Image 0: three flagged tokens, one of them 6x the median and added by the blocks. Image 1: the same flags and
    norms, but the long token was as long at the embedding (an input feature). Image 2: two flags only."""
    masks = torch.zeros(3, 5, 5, dtype=torch.bool)
    masks[:, 2, 1:4] = True
    masks[2, 2, 3] = False
    norms = torch.ones(3, 5, 5)
    norms[:, 2, 2] = 6.0
    added = torch.full((3, 5, 5), 0.1)
    added[[0, 2], 2, 2] = 5.9
    preserve, paper = DefectTest.for_recipe("preserve"), DefectTest.for_recipe("paper")
    assert preserve.norm_gap == HIGH_NORM_FACTOR and paper.norm_gap is None
    assert preserve.apply(masks, norms, added).tolist() == [True, False, False]
    assert paper.apply(masks, norms, added).tolist() == [True, True, False]
    assert DefectTest.for_recipe("paper", norm_gap=7.0).apply(masks, norms, added).tolist() == [False] * 3
    with pytest.raises(ValueError, match="recipe"):
        DefectTest.for_recipe("official")  # type: ignore[arg-type]


@pytest.mark.parametrize(("seed", "blocks", "swiglu", "layer"), LONG_INPUT_MODELS)
def test_tokens_long_from_the_embedding_never_decide(seed: int, blocks: int, swiglu: bool, layer: int) -> None:
    planted = build_random_planted_dinov2(
        seed=seed, num_layers=blocks, swiglu=swiglu, defect_layer=layer, long_input=True
    )
    pixels = block_pixels(range(6))
    white = planted.planted_positions(pixels)
    ratios = embedding_norm_ratios(planted.model, pixels)
    assert float(ratios[white].min()) >= HIGH_NORM_FACTOR  # long before any block
    for source in ("auto", "data"):
        analysis = find_defect_tokens(planted.model, pixels, direction_source=source)
        assert analysis.defect_directions.sources[:layer] == ("weights",) * layer, source
        assert analysis.defect_directions.high_norm_tokens[:layer] == (0,) * layer, source
        assert (analysis.high_norm_input_counts[:, :layer].sum(dim=1) > 0).all()
        assert (analysis.high_norm_defect_counts[:, :layer] == 0).all()
        assert (analysis.first_high_norm_defect_layer == layer).all()
        assert (analysis.first_defective_layer == layer).all(), analysis.first_defective_layer
        assert float(analysis.max_median_norm_ratio[:, layer].min()) > 100
    estimated = estimate_defect_directions(planted.model, [pixels[:3], pixels[3:]], "auto")
    assert estimated.sources[:layer] == ("weights",) * layer


def test_a_sparse_unit_in_a_middle_block_is_found_where_it_is_born(tmp_path: Path) -> None:
    planted = build_sparse_unit_dinov2(seed=0, num_layers=8, defect_layer=6)
    source = save_planted_model(planted, tmp_path / "source")
    images = []
    for seed in range(3):
        images.append(tmp_path / f"{seed}.png")
        generate_demo_image(500 + seed).save(images[-1])
    report = diagnose(str(source), images, output_dir=tmp_path / "diagnosis", resolution=224)
    assert report["num_defective_images"] == 3 and report["earliest_first_defective_layer"] == 6
    assert [entry["first_high_norm_defect_layer"] for entry in report["images"]] == [6, 6, 6]
    for entry in report["images"]:
        assert max(entry["max_median_norm_ratio"][:6]) < HIGH_NORM_FACTOR < entry["max_median_norm_ratio"][6]


def test_models_without_a_defect_have_no_defective_image(tmp_path: Path) -> None:
    """A random model without the unit (no token above 4x its median), and a long-input model without its trigger
    unit (white patches high-norm from the embedding on, no block adds to them): no image is defective, the white
    patches are reported as high-norm input tokens, and a repair has nothing to do."""
    clean = build_sparse_unit_dinov2(seed=0, with_unit=False)
    inputs_only = build_random_planted_dinov2(seed=0, long_input=True)
    with torch.no_grad():
        inputs_only.model.encoder.layer[inputs_only.defect_layer].mlp.fc2.weight[:, 0] = 0.0
    pictures = {"clean": generate_demo_image, "inputs": generate_block_image}
    for name, planted in (("clean", clean), ("inputs", inputs_only)):
        source = save_planted_model(planted, tmp_path / name / "source")
        images = []
        for seed in range(3):
            images.append(tmp_path / name / f"{seed}.png")
            pictures[name](700 + seed).save(images[-1])
        report = diagnose(str(source), images, output_dir=tmp_path / name / "diagnosis", resolution=224)
        assert report["num_defective_images"] == 0 and report["num_images_with_high_norm_defects"] == 0, name
        expected_inputs = 3 if name == "inputs" else 0
        assert report["num_images_with_high_norm_input_tokens"] == expected_inputs, name
        result = repair(
            RepairArguments(
                model=str(source),
                data=str(tmp_path / name),
                resolution=224,
                output_dir=str(tmp_path / name / "run"),
            ),
            TrainingArguments(max_steps=50),
        )
        assert result.report["outcome"] == "nothing_to_repair" and result.state.images_seen == 0, name
        assert summary_text(result.report, tmp_path / name / "run").startswith("Nothing needed repair")


@pytest.fixture(scope="module")
def block_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blocks")
    for seed in TRAIN_SEEDS:
        generate_block_image(seed).save(folder / f"{seed}.png")
    return folder


@pytest.mark.parametrize(
    ("recipe", "seed", "blocks", "swiglu", "layer"),
    [("preserve", *LONG_INPUT_MODELS[0]), ("preserve", *LONG_INPUT_MODELS[1]), ("paper", *LONG_INPUT_MODELS[2])],
)
def test_repairs_of_models_whose_trigger_patches_are_long_at_the_embedding(
    tmp_path: Path, block_images: Path, recipe: str, seed: int, blocks: int, swiglu: bool, layer: int
) -> None:
    """`auto` directions, 224 px, at most 200 steps: the held-out max/median falls to <= 5, clean tokens stay
    (cosine >= 0.95), training worked at the planted block only, and the report and summary say what happened."""

    def build() -> torch.nn.Module:
        planted = build_random_planted_dinov2(
            seed=seed, num_layers=blocks, swiglu=swiglu, defect_layer=layer, long_input=True
        )
        return planted.model

    build().save_pretrained(tmp_path / "source")
    result = repair(
        RepairArguments(
            model=str(tmp_path / "source"), data=str(block_images), resolution=224, output_dir=str(tmp_path / "run")
        ),
        TrainingArguments(recipe=recipe, max_steps=200),  # type: ignore[arg-type]
    )
    report = result.report
    assert report["outcome"] == "repaired" and report["repaired"] and result.state.step <= 200
    assert set(report["defective_layers_during_training"]) == {str(layer)}
    assert all(entry["source"] == "weights" for entry in report["directions"]["layers"][:layer])
    held_out = block_pixels(HELD_OUT_SEEDS)
    original = build()
    repaired = type(original).from_pretrained(tmp_path / "run" / "model").eval()
    before, after = find_defect_tokens(original, held_out), find_defect_tokens(repaired, held_out)
    ratios = after.max_median_norm_ratio[:, -1]
    assert float(before.max_median_norm_ratio[:, -1].min()) > 100
    assert float(ratios.mean()) <= 5, ratios
    assert not after.high_norm_defect_images.any()
    clean = clean_token_mask(before.token_norms[:, -1])
    cosine = clean_token_cosine(output_features(original, held_out), output_features(repaired, held_out), clean)
    assert cosine >= 0.95, cosine
    # the report's numbers are those of its report images, recomputed here; the summary prints them
    pictures = [Image.open(path).convert("RGB") for path in report["report_images"]]
    report_pixels = torch.stack([prepare_image(picture, 224, 14, ImageNormalization()) for picture in pictures])
    report_after = find_defect_tokens(repaired, report_pixels).max_median_norm_ratio[:, -1]
    assert report["after"]["max_median_norm_ratio_last_layer"] == pytest.approx(report_after.tolist(), rel=1e-4)
    text = summary_text(report, tmp_path / "run")
    assert text.startswith("Repaired: no high-norm defect left")
    assert f"-> {report['after']['mean_max_median_norm_ratio_last_layer']:.1f})" in text.splitlines()[0]


def test_a_run_that_cannot_change_anything_says_so(tmp_path: Path, block_images: Path) -> None:
    """`--lr 1e-12 --max-steps 2`: the outcome is not_repaired, `"repaired": false`, no model is written, the summary
    says so first, and the exit status is 4."""
    build_random_planted_dinov2(seed=0, long_input=True).model.save_pretrained(tmp_path / "source")
    run = tmp_path / "run"
    command = [
        sys.executable,
        "examples/repair.py",
        "--model",
        str(tmp_path / "source"),
        "--data",
        str(block_images),
        "--resolution",
        "224",
        "--lr",
        "1e-12",
        "--max-steps",
        "2",
        "--output-dir",
        str(run),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 4, result.stderr[-2000:]
    assert result.stdout.startswith("Not repaired: no high-norm defect was removed"), result.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["outcome"] == "not_repaired" and report["repaired"] is False and report["steps"] == 2
    assert report["after"]["images_with_defects"] == report["before"]["images_with_defects"] > 0
    assert not (run / "model").exists() and not (run / "adapter").exists()


def test_the_stop_rules() -> None:
    """preserve: stop once the whole (capped) window had no defect; paper: the official rule, a window of 1000 seeded
    with images that had a defect, never capped, so at least 750 clean images are needed."""
    preserve, paper = TrainingArguments(), TrainingArguments(recipe="paper")
    assert preserve.resolved_stop_skip_ratio == 1.0 and not preserve.stop_window_seeded
    assert paper.resolved_stop_skip_ratio == 0.75 and paper.stop_window_seeded
    folder = list(range(48))
    assert capped_stop_window(1000, folder) == 48  # type: ignore[arg-type]
    assert capped_stop_window(1000, folder, seeded=True) == 1000  # type: ignore[arg-type]

    def stop(state: TrainerState, arguments: TrainingArguments, window: int) -> str | None:
        return state.next_stop_reason(
            interrupted=False,
            max_steps=10_000,
            stop_window=window,
            stop_skip_ratio=arguments.resolved_stop_skip_ratio,
            seeded=arguments.stop_window_seeded,
        )

    state = TrainerState()
    for _ in range(47):
        state.record_batch(images=1, skipped=1, stop_window=48)
    assert stop(state, preserve, 48) is None
    state.record_batch(images=1, skipped=1, stop_window=48)
    assert stop(state, preserve, 48) == "skip_ratio"
    state.record_batch(images=1, skipped=0, stop_window=48)
    assert stop(state, preserve, 48) is None  # one defective image in the window
    seeded = TrainerState()
    for image in range(1, 1001):
        seeded.record_batch(images=1, skipped=1, stop_window=1000)
        assert (stop(seeded, paper, 1000) == "skip_ratio") == (image >= 750), image
