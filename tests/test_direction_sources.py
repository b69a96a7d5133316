"""Directions from the data where the weights miss (docs/method.md §8): the pure functions against independent
computations, and the repair, diagnose and evaluate on sparse-unit models whose high-norm tokens the weights'
directions do not explain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import launch_two_processes
from transformers import AutoModel

from sinder_peft import find_defect_tokens, singular_defect_directions
from sinder_peft.analysis.detection import (
    AUTO_COSINE_THRESHOLD,
    DefectDirections,
    choose_direction,
    data_direction,
    high_norm_token_mask,
)
from sinder_peft.analysis.direction_files import load_directions, save_directions
from sinder_peft.analysis.preservation import clean_token_mask, output_features
from sinder_peft.evaluation.arguments import EvaluationArguments
from sinder_peft.evaluation.evaluate import evaluate_models
from sinder_peft.jobs.diagnose import diagnose
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.synthetic.demo import build_demo_model, generate_demo_image
from sinder_peft.synthetic.planting import build_planted_model, save_planted_model, spot_pixel_values
from sinder_peft.synthetic.random_planting import build_random_planted_dinov2, build_sparse_unit_dinov2
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.tuner.architectures import ImageNormalization

HELD_OUT_SEEDS = range(500, 510)
TRAINING_IMAGES = 18


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------


def test_high_norm_token_mask_matches_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    norms = torch.rand(3, 2, 5, 6, generator=generator) + 0.5
    norms[0, 1, 2, 3] = 10.0
    expected = np.zeros(norms.shape, dtype=bool)
    for index in np.ndindex(*norms.shape[:2]):
        grid = norms[index].numpy()
        # torch.median is the lower middle value of an even count
        median = np.sort(grid.ravel())[(grid.size - 1) // 2]
        expected[index] = grid >= 4.0 * median
    assert (high_norm_token_mask(norms).numpy() == expected).all()
    assert high_norm_token_mask(norms)[0, 1, 2, 3] and int(high_norm_token_mask(norms).sum()) == 1


def test_data_direction_is_the_leading_right_singular_vector() -> None:
    generator = torch.Generator().manual_seed(1)
    shared = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    tokens = 20 * torch.randn(30, 1, generator=generator) * shared + torch.randn(30, 16, generator=generator)
    direction = data_direction(tokens)
    # independent: power iteration on tokensᵀ tokens in numpy
    gram = tokens.double().numpy().T @ tokens.double().numpy()
    vector = np.ones(16)
    for _ in range(500):
        vector = gram @ vector
        vector /= np.linalg.norm(vector)
    assert abs(float(np.dot(direction.double().numpy(), vector))) > 1 - 1e-6
    assert abs(float(direction @ shared)) > 0.99
    assert direction[direction.abs().argmax()] > 0 and abs(float(direction.norm()) - 1) < 1e-6
    with pytest.raises(ValueError, match="non-empty"):
        data_direction(torch.zeros(0, 16))


def test_choose_direction_follows_the_source_and_the_threshold() -> None:
    generator = torch.Generator().manual_seed(2)
    weights = torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)
    other = torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)
    other = torch.nn.functional.normalize(other - (other @ weights) * weights, dim=0)
    along_other = torch.stack([3 * other, -5 * other, 4 * other + 0.01 * weights])
    along_weights = torch.stack([3 * weights, -2 * weights, 6 * weights])
    cases = {
        ("weights", "other"): "weights",
        ("data", "other"): "data",
        ("auto", "other"): "data",
        ("auto", "weights"): "weights",
        ("data", "weights"): "data",
    }
    for (source, tokens_name), expected in cases.items():
        tokens = along_other if tokens_name == "other" else along_weights
        chosen = choose_direction(tokens, weights, source)
        assert chosen.source == expected, (source, tokens_name)
        assert chosen.high_norm_tokens == 3
        reference = weights if expected == "weights" or tokens_name == "weights" else other
        assert abs(float(chosen.direction @ reference)) > 0.999
    assert choose_direction(along_other, weights, "auto").weights_cosine == pytest.approx(
        float((torch.nn.functional.normalize(along_other, dim=1) @ weights).abs().mean()), abs=1e-6
    )
    # fewer than min_tokens high-norm tokens: the weights' direction under every source
    assert choose_direction(along_other[:2], weights, "data").source == "weights"
    assert choose_direction(torch.zeros(0, 8), weights, "auto").weights_cosine is None
    # the threshold: a cosine just above it keeps the weights' direction, just below it does not
    mixed = AUTO_COSINE_THRESHOLD + 0.01
    tokens = torch.stack([mixed * weights + (1 - mixed**2) ** 0.5 * other] * 3)
    assert choose_direction(tokens, weights, "auto").source == "weights"
    mixed = AUTO_COSINE_THRESHOLD - 0.01
    tokens = torch.stack([mixed * weights + (1 - mixed**2) ** 0.5 * other] * 3)
    assert choose_direction(tokens, weights, "auto").source == "data"
    with pytest.raises(ValueError, match="directions must be one of"):
        choose_direction(tokens, weights, "linear")  # type: ignore[arg-type]


def test_directions_round_trip_through_safetensors(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    directions = DefectDirections(
        directions=torch.randn(3, 8, generator=generator),
        weights_directions=torch.randn(3, 8, generator=generator),
        sources=("weights", "data", "data"),
        weights_cosines=(None, 0.25, 0.125),
        high_norm_tokens=(0, 7, 9),
        requested="auto",
    )
    save_directions(directions, tmp_path)
    loaded = load_directions(tmp_path)
    assert loaded is not None
    assert torch.equal(loaded.directions, directions.directions)
    assert torch.equal(loaded.weights_directions, directions.weights_directions)
    assert loaded.to_dict() == directions.to_dict() and loaded.data_layers == [1, 2]
    assert load_directions(tmp_path / "nowhere") is None


# ----------------------------------------------------------------------------------------------------------------
# Sparse-unit models: the weights' directions miss
# ----------------------------------------------------------------------------------------------------------------

SPARSE_CASES = {
    "gelu-8": {"seed": 0},
    "gelu-12": {"seed": 1, "num_layers": 12},
    "swiglu-8": {"seed": 2, "swiglu": True},
}


def held_out_pixels() -> torch.Tensor:
    return spot_pixel_values(HELD_OUT_SEEDS, ImageNormalization(), size=224, patch=14)


def test_sparse_unit_is_a_real_miss_of_the_weights() -> None:
    """On each sparse-unit model, the unit fires on at most 3 % of the patches, its tokens reach far above 4x the
    median norm, and their |cos| with the weights' direction is below 0.5 at every layer from the unit on; the
    weights' directions of the model equal those of the model without the unit."""
    pixels = held_out_pixels()
    for name, case in SPARSE_CASES.items():
        planted = build_sparse_unit_dinov2(**case)
        reference = build_sparse_unit_dinov2(**case, with_unit=False)
        weights = find_defect_tokens(planted.model, pixels, direction_source="weights")
        layer = planted.defect_layer
        share = float(weights.high_norm_masks[:, layer].float().mean())
        assert 0 < share <= 0.03, (name, share)
        assert float(weights.max_median_norm_ratio[:, -1].mean()) > 40, name
        cosines = weights.high_norm_weights_cosines()
        assert all(cosines[index] is not None and cosines[index] < 0.5 for index in range(layer, weights.num_layers))
        for mine, theirs in zip(
            singular_defect_directions(planted.model), singular_defect_directions(reference.model), strict=True
        ):
            assert abs(float(mine @ theirs)) > 0.99, name
        # along the weights' directions no high-norm token is flagged, at any layer
        assert not bool((weights.masks & weights.high_norm_masks).any()), name
        for source in ("auto", "data"):
            analysis = find_defect_tokens(planted.model, pixels, direction_source=source)
            assert (analysis.defect_token_counts[:, layer] >= 3).all(), (name, source)
            assert analysis.high_norm_defect_images.all(), (name, source)
            assert (analysis.first_defective_layer == layer).all(), (name, source)
            assert analysis.defect_directions.sources[layer] == "data"
            assert abs(float(analysis.directions[layer] @ planted.direction)) > 0.99
            planted_positions = planted.planted_positions(pixels)
            flagged = analysis.masks[torch.arange(len(pixels)), layer]
            assert (flagged <= planted_positions).all() and flagged.sum() >= 3 * len(pixels)


def test_auto_keeps_the_weights_where_they_explain_the_defect() -> None:
    """On the planted models whose defect the weights do see, `auto` takes the weights' direction at every layer
    with high-norm tokens, so the analysis equals the paper's."""
    models = [
        (build_demo_model(), spot_pixel_values(range(3), ImageNormalization(), size=224, patch=14)),
        (build_planted_model("dinov2").model, spot_pixel_values(range(3), ImageNormalization())),
        (build_planted_model("siglip").model, spot_pixel_values(range(3), ImageNormalization((0.5,) * 3, (0.5,) * 3))),
    ]
    for seed in (0, 1):
        planted = build_random_planted_dinov2(seed=seed)
        models.append((planted.model, spot_pixel_values(range(3), ImageNormalization(), size=224, patch=14)))
    for model, pixels in models:
        auto = find_defect_tokens(model, pixels, direction_source="auto")
        weights = find_defect_tokens(model, pixels, direction_source="weights")
        assert auto.high_norm_defect_layers(), type(model).__name__
        assert auto.defect_directions.sources == ("weights",) * auto.num_layers
        assert torch.equal(auto.masks, weights.masks) and torch.equal(
            auto.first_defective_layer, weights.first_defective_layer
        )


@pytest.fixture(scope="module")
def training_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sparse-images")
    for index in range(TRAINING_IMAGES):
        generate_demo_image(1000 + index).save(folder / f"{index}.png")
    return folder


def held_out_numbers(model_dir: Path, reference: torch.nn.Module, original: torch.nn.Module) -> tuple[float, float]:
    """Return the held-out last-layer max/median norm of the model in `model_dir` and the mean cosine of its clean
    output tokens to `reference` (clean: below 4x the median norm in `original`)."""
    pixels = held_out_pixels()
    repaired = AutoModel.from_pretrained(model_dir).eval()
    ratio = float(find_defect_tokens(repaired, pixels, direction_source="weights").max_median_norm_ratio[:, -1].max())
    clean = clean_token_mask(find_defect_tokens(original, pixels, direction_source="weights").token_norms[:, -1])
    cosines = torch.nn.functional.cosine_similarity(
        output_features(repaired, pixels).patch_tokens, output_features(reference, pixels).patch_tokens, dim=-1
    )
    return ratio, float(cosines[clean].mean())


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_auto_repairs_what_the_weights_miss(name: str, tmp_path: Path, training_images: Path) -> None:
    """`sinder repair` with the default settings (auto directions, preserve recipe) removes the sparse unit's
    defect on held-out images (max/median <= 5) and keeps the clean tokens where the model without the unit puts
    them (cosine >= 0.98); report.json says which layers took their direction from the data, with the |cos|."""
    case = SPARSE_CASES[name]
    planted = build_sparse_unit_dinov2(**case)
    reference = build_sparse_unit_dinov2(**case, with_unit=False).model
    source = save_planted_model(planted, tmp_path / "source")
    arguments = RepairArguments(
        model=str(source), data=str(training_images), resolution=224, output_dir=str(tmp_path / "run")
    )
    result = repair(arguments, TrainingArguments(max_steps=200))
    assert result.report["repaired"] and result.state.step >= 1
    ratio, cosine = held_out_numbers(tmp_path / "run" / "model", reference, planted.model)
    assert ratio <= 5 and cosine >= 0.98, (ratio, cosine)
    layers = result.report["directions"]["layers"]
    assert layers[planted.defect_layer]["source"] == "data"
    assert layers[planted.defect_layer]["weights_cosine"] < 0.5
    assert all(entry["source"] == "weights" for entry in layers[: planted.defect_layer])
    before = result.report["before"]
    assert before["images_with_defects"] > 0 and before["high_norm_defect_tokens_per_layer"][planted.defect_layer]
    assert result.report["after"]["images_with_defects"] == 0 and result.report["outcome"] == "repaired"


def test_weights_leave_the_miss_and_say_so(tmp_path: Path, training_images: Path) -> None:
    """With `--directions weights` the sparse unit's defect stays: no step is taken, no model is written, the run
    ends after one pass over the 18 images, and the summary names the high-norm tokens instead of "no defect"."""
    from sinder_peft.jobs.repair_report import summary_text

    planted = build_sparse_unit_dinov2(seed=0)
    source = save_planted_model(planted, tmp_path / "source")
    arguments = RepairArguments(
        model=str(source), data=str(training_images), resolution=224, output_dir=str(tmp_path / "run")
    )
    result = repair(arguments, TrainingArguments(directions="weights", max_steps=200))
    assert result.state.step == 0 and not result.report["repaired"] and result.report["outcome"] == "not_repaired"
    assert result.state.images_seen <= TRAINING_IMAGES and result.report["training"]["stop_window"] == TRAINING_IMAGES
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "adapter").exists()
    text = summary_text(result.report, tmp_path / "run")
    assert text.startswith("Not repaired") and "high-norm defect tokens are present" in text
    assert "Nothing needed repair" not in text and "Repaired" not in text
    assert result.report["before"]["images_with_defects"] > 0


def test_data_directions_in_two_processes(tmp_path: Path, training_images: Path) -> None:
    """`--directions data` in two processes: both train with the main process's directions, the defect goes, and
    the checkpoint holds those directions (a resume uses them as they are)."""
    planted = build_sparse_unit_dinov2(seed=3)
    reference = build_sparse_unit_dinov2(seed=3, with_unit=False).model
    source = save_planted_model(planted, tmp_path / "source")
    run = tmp_path / "run"
    arguments = ["--model", str(source), "--data", str(training_images), "--resolution", "224"]
    launch_two_processes(
        ["examples/repair.py", *arguments, "--directions", "data", "--max-steps", "200", "--output-dir", str(run)]
    )
    report = json.loads((run / "report.json").read_text())
    assert report["processes"] == 2 and report["repaired"]
    assert report["directions"]["requested"] == "data"
    assert report["directions"]["layers"][planted.defect_layer]["source"] == "data"
    ratio, cosine = held_out_numbers(run / "model", reference, planted.model)
    assert ratio <= 5 and cosine >= 0.98, (ratio, cosine)
    checkpoint = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    saved = load_directions(checkpoint)
    assert saved is not None and saved.to_dict() == report["directions"]
    assert abs(float(saved.directions[planted.defect_layer] @ planted.direction)) > 0.99


def test_clean_model_has_nothing_to_repair(tmp_path: Path, training_images: Path) -> None:
    """The model without the unit: the selection finds no high-norm token and no defect, so the run ends at once
    (no step, no pass over the data), writes no model/, and `sinder repair` exits 0 saying nothing needed repair."""
    import subprocess

    reference = build_sparse_unit_dinov2(seed=0, with_unit=False)
    source = save_planted_model(reference, tmp_path / "source")
    command = [
        sys.executable,
        "-m",
        "sinder_peft.cli",
        "repair",
        "--model",
        str(source),
        "--data",
        str(training_images),
        "--resolution",
        "224",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing needed repair" in result.stdout and "No model written" in result.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stop_reason"] == "nothing_to_repair" and report["images_seen"] == 0 and not report["repaired"]
    assert report["before"]["images_with_defects"] == 0 and report["outcome"] == "nothing_to_repair"
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_diagnose_and_evaluate_report_the_high_norm_tokens(tmp_path: Path, training_images: Path) -> None:
    """`diagnose` and `evaluate` of a sparse-unit model: with `weights` they find no defect, but report the
    high-norm tokens per layer with their low |cos|; with `auto` they find the defect at the unit's layer."""
    planted = build_sparse_unit_dinov2(seed=0)
    source = save_planted_model(planted, tmp_path / "source")
    images = sorted(training_images.iterdir())[:3]
    layer = planted.defect_layer
    weights = diagnose(str(source), images, output_dir=tmp_path / "weights", resolution=224, directions="weights")
    assert weights["num_defective_images"] == 0 and weights["num_images_with_high_norm_defects"] == 3
    assert weights["high_norm_weights_cosine"][layer] < 0.5
    assert all(entry["num_high_norm_defect_tokens"][layer] > 0 for entry in weights["images"])
    assert all(entry["first_high_norm_defect_layer"] == layer for entry in weights["images"])
    auto = diagnose(str(source), images, output_dir=tmp_path / "auto", resolution=224)
    assert auto["num_defective_images"] == 3 and auto["earliest_first_defective_layer"] == layer
    assert auto["directions"]["layers"][layer]["source"] == "data"
    for directions, defective in (("weights", 0.0), ("auto", 100.0)):
        args = EvaluationArguments(
            output_dir=str(tmp_path / f"evaluation-{directions}"),
            defect_data=str(training_images),
            defect_resolution=224,
            num_workers=0,
            directions=directions,
        )
        section = evaluate_models([("sparse", planted.model, ImageNormalization())], args)["models"][0]["defects"]
        assert section["defect_test"]["norm_gap"] == 4.0  # the default recipe's test, preserve
        assert section["images_with_high_norm_defects"] == 100.0
        assert section["images_with_defects"] == defective, directions
        assert section["per_layer_high_norm_tokens"][layer] > 0
        assert section["per_layer_high_norm_weights_cosine"][layer] < 0.5


def test_resume_reuses_the_saved_directions(
    tmp_path: Path, training_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed repair takes its directions from the checkpoint as they are: the base model's weights' directions
    are not computed again (only the merged model's, for the report), and report.json records the same choice."""
    import sinder_peft.jobs.repair_export as repair_export
    import sinder_peft.jobs.repair_setup as repair_setup

    planted = build_sparse_unit_dinov2(seed=0)
    source = save_planted_model(planted, tmp_path / "source")
    run = tmp_path / "run"
    arguments = RepairArguments(model=str(source), data=str(training_images), resolution=224, output_dir=str(run))
    first = repair(arguments, TrainingArguments(max_steps=1, save_every=1))
    assert first.state.stop_reason == "max_steps"
    calls: list[int] = []
    original = repair_setup.compute_directions

    def counting(model: torch.nn.Module) -> list[torch.Tensor]:
        calls.append(1)
        return original(model)

    monkeypatch.setattr(repair_setup, "compute_directions", counting)
    monkeypatch.setattr(repair_export, "compute_directions", counting)
    resumed = repair(
        RepairArguments(
            model=str(source), data=str(training_images), resolution=224, output_dir=str(run), resume=str(run)
        ),
        TrainingArguments(max_steps=3),
    )
    assert len(calls) == 1  # the merged model's, in the export
    assert resumed.report["directions"] == first.report["directions"]


def test_stop_window_is_capped_by_the_dataset() -> None:
    from sinder_peft.training.trainer import capped_stop_window

    class Sized(torch.utils.data.Dataset):
        def __init__(self, size: int) -> None:
            self.size = size

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, index: int) -> int:
            return index

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(3))

    assert capped_stop_window(1000, Sized(18)) == 18
    assert capped_stop_window(6, Sized(18)) == 6
    assert capped_stop_window(1000, Stream()) == 1000
