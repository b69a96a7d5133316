"""Planted-defect models of every ViT family (`synthetic.planting`): the trigger, the recovered direction, the
detected tokens, and the saved model with its image processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor

from sinder_peft.analysis.detection import find_defect_tokens
from sinder_peft.analysis.directions import singular_defect_directions
from sinder_peft.synthetic.demo import generate_demo_image
from sinder_peft.synthetic.planting import (
    build_planted_model,
    generate_spot_image,
    save_planted_model,
    spot_pixel_values,
)
from sinder_peft.synthetic.tiny_models import PLANTED_FAMILIES, default_patch_size
from sinder_peft.tuner.architectures import describe_model, patchify, unwrap_backbone

IMAGE_SEEDS = tuple(range(6))


def abs_cos(first: torch.Tensor, second: torch.Tensor) -> float:
    return abs(float(first.double() @ second.double() / (first.double().norm() * second.double().norm())))


@pytest.mark.parametrize("family", PLANTED_FAMILIES)
def test_planted_defect_is_loud_recovered_and_detected(family: str) -> None:
    planted = build_planted_model(family)
    assert not planted.model.training
    description = describe_model(planted.model)
    pixel_values = spot_pixel_values(IMAGE_SEEDS, planted.normalization, patch=planted.patch_size)

    # The last block's raw patch tokens: the bright patches stand out by a factor of 40 or more.
    with torch.no_grad():
        last = description.block_outputs(unwrap_backbone(planted.model), pixel_values)[-1]
    norms = last[:, description.num_prefix_tokens :].norm(dim=-1)
    ratios = norms.max(dim=1).values / norms.median(dim=1).values
    assert ratios.min() >= 40, ratios

    # The weights alone point at u from the planted block on.
    directions = singular_defect_directions(planted.model)
    for layer, direction in enumerate(directions):
        if layer >= planted.defect_layer:
            assert abs_cos(direction, planted.direction) >= 0.98, (layer, abs_cos(direction, planted.direction))
        else:
            assert abs_cos(direction, planted.direction) < 0.1

    # Detection flags exactly the bright patches, first at the planted layer.
    analysis = find_defect_tokens(planted.model, pixel_values, directions)
    truth = planted.planted_positions(pixel_values)
    assert truth.flatten(1).sum(dim=1).min() >= 3
    assert (analysis.first_defective_layer == planted.defect_layer).all()
    flagged = analysis.masks[:, planted.defect_layer]
    true_positives = int((flagged & truth).sum())
    assert true_positives / int(flagged.sum()) >= 0.95
    assert true_positives / int(truth.sum()) >= 0.95


def test_building_is_deterministic_and_keeps_the_callers_random_state() -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_planted_model("clip", seed=4)
    assert torch.equal(torch.rand(3), expected_draw)
    second = build_planted_model("clip", seed=4)
    other = build_planted_model("clip", seed=5)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not torch.equal(first.direction, other.direction)


def test_options_and_errors() -> None:
    planted = build_planted_model("vit", num_layers=3, defect_layer=0, hidden_size=32, patch_size=14)
    description = describe_model(planted.model)
    assert (description.num_layers, description.hidden_size, description.patch_size) == (3, 32, 14)
    assert default_patch_size("dinov2_registers") == default_patch_size("depth_anything") == 14
    assert default_patch_size("dinov3") == default_patch_size("siglip2") == 16
    with pytest.raises(ValueError, match="Unknown family 'beit'.*'dinov2'"):
        build_planted_model("beit")
    with pytest.raises(ValueError, match="defect_layer"):
        build_planted_model("vit", num_layers=2, defect_layer=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_planted_model("vit", hidden_size=40)


def test_spot_images() -> None:
    for seed in (0, 3):
        assert np.array_equal(np.asarray(generate_spot_image(seed, 224, 14)), np.asarray(generate_demo_image(seed)))
    image = np.asarray(generate_spot_image(2, 224, 16), dtype=np.float32) / 255
    patches = image.reshape(14, 16, 14, 16, 3).min(axis=(1, 3, 4))
    white = patches == 1.0
    assert 3 <= white.sum() <= 12
    assert not white[:2].any() and not white[-2:].any() and not white[:, :2].any() and not white[:, -2:].any()
    planted = build_planted_model("siglip")
    truth = planted.planted_positions(spot_pixel_values([2], planted.normalization, patch=16))[0]
    assert torch.equal(truth, torch.from_numpy(white))


@pytest.mark.parametrize("family", ["dinov2_registers", "depth_anything", "dinov3", "clip", "siglip2", "deit"])
def test_saved_processor_reproduces_the_normalization(family: str, tmp_path: Path) -> None:
    """The saved image processor (PIL back end, no torchvision needed) turns a spot image into the pixel values the
    brightness threshold was computed for."""
    planted = build_planted_model(family, num_layers=2)
    save_planted_model(planted, tmp_path)
    assert (tmp_path / "config.json").is_file()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__.endswith("Pil")
    assert type(processor) is type(planted.image_processor)
    image = generate_spot_image(1, 224, planted.patch_size)
    processed = processor(images=image, return_tensors="pt")
    expected = spot_pixel_values([1], planted.normalization, patch=planted.patch_size)
    if family == "siglip2":
        expected = patchify(expected, planted.patch_size)
        assert processed["pixel_attention_mask"].all()
    torch.testing.assert_close(processed["pixel_values"], expected, rtol=0, atol=0.02)
