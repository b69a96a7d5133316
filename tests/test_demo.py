"""Tests of the planted-defect demo model and of the bundled demo images."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Model, Dinov2WithRegistersModel

from sinder_peft.analysis.detection import find_defect_tokens
from sinder_peft.analysis.directions import singular_defect_directions
from sinder_peft.synthetic.demo import (
    BRIGHTNESS_LEVEL,
    build_demo_model,
    build_planted_defect_model,
    demo_image_paths,
    demo_images,
    generate_demo_image,
)
from sinder_peft.tuner.architectures import IMAGENET_MEAN, IMAGENET_STD


def to_pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """Normalize 224×224 RGB images with the ImageNet statistics: [B, 3, 224, 224]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def last_layer_patch_tokens(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens of the last block, before the final LayerNorm, from the model's own forward: [B, H·W, C]."""
    with torch.no_grad():
        hidden_states = model(pixel_values, output_hidden_states=True).hidden_states
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    return hidden_states[-1][:, prefix:]


def white_patches(image: Image.Image, patch_size: int = 14) -> torch.Tensor:
    """Patches whose every pixel is pure white, read straight from the picture: bool [H, W]."""
    array = np.asarray(image.convert("RGB"))
    grid = array.shape[0] // patch_size
    blocks = array.reshape(grid, patch_size, grid, patch_size, 3)
    return torch.from_numpy((blocks == 255).all(axis=(1, 3, 4)))


@pytest.fixture(scope="module")
def shipped_pixel_values() -> torch.Tensor:
    return to_pixel_values(demo_images())


def test_shipped_images_load_and_match_their_generator() -> None:
    paths = demo_image_paths()
    assert 4 <= len(paths) <= 8
    assert sum(path.stat().st_size for path in paths) < 300_000
    readme = (paths[0].parent / "README.txt").read_text()
    assert "generate_demo_image" in readme and "public domain" in readme
    images = demo_images()
    assert len(images) == len(paths)
    for path, image in zip(paths, images, strict=True):
        assert image.mode == "RGB" and image.size == (224, 224)
        seed = int(re.fullmatch(r"demo_(\d+)\.png", path.name).group(1))
        regenerated = np.asarray(generate_demo_image(seed), dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - regenerated).max() <= 1


def test_planted_positions_are_the_white_spots(shipped_pixel_values: torch.Tensor) -> None:
    planted = build_planted_defect_model()
    positions = planted.planted_positions(shipped_pixel_values)
    assert positions.shape == (len(demo_images()), 16, 16)
    for index, image in enumerate(demo_images()):
        white = white_patches(image)
        assert torch.equal(positions[index], white)
        assert 3 <= int(white.sum()) <= 14  # enough to count as a defective layer, few enough to be outliers
        assert not (white[0].any() or white[-1].any() or white[:, 0].any() or white[:, -1].any())


@pytest.mark.parametrize(("level", "expected"), [(BRIGHTNESS_LEVEL - 0.03, False), (BRIGHTNESS_LEVEL + 0.03, True)])
def test_planted_positions_threshold_is_the_documented_grey(level: float, expected: bool) -> None:
    grey = Image.new("RGB", (224, 224), (round(level * 255),) * 3)
    positions = build_planted_defect_model().planted_positions(to_pixel_values([grey]))
    assert bool(positions.all()) is expected and bool(positions.any()) is expected


@pytest.mark.parametrize("swiglu", [False, True])
def test_norm_ratio_on_demo_images_is_at_least_40(swiglu: bool, shipped_pixel_values: torch.Tensor) -> None:
    model = build_demo_model() if not swiglu else build_planted_defect_model(swiglu=True).model
    norms = last_layer_patch_tokens(model, shipped_pixel_values).norm(dim=-1)
    ratios = norms.max(dim=1).values / norms.median(dim=1).values
    assert (ratios >= 40).all(), ratios


def test_demo_model_is_a_plain_eval_float32_dinov2() -> None:
    model = build_demo_model()
    assert type(model) is Dinov2Model and not model.training
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    registers = build_planted_defect_model(num_register_tokens=4, swiglu=True)
    assert type(registers.model) is Dinov2WithRegistersModel
    assert registers.model.config.num_register_tokens == 4 and registers.model.config.use_swiglu_ffn


def test_construction_is_deterministic_and_directions_are_orthonormal() -> None:
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    first, again, other = (build_planted_defect_model(seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random state is left alone
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    assert not torch.equal(first.model.encoder.layer[0].mlp.fc2.weight, other.model.encoder.layer[0].mlp.fc2.weight)
    u, d = first.direction.double(), first.brightness_direction.double()
    assert float(u.norm()) == pytest.approx(1.0) and float(d.norm()) == pytest.approx(1.0)
    assert abs(float(u @ d)) < 1e-6 and abs(float(u.sum())) < 1e-5 and abs(float(d.sum())) < 1e-5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"defect_layer": 6}, "defect_layer"), ({"defect_layer": -1}, "defect_layer"), ({"hidden_size": 30}, "hidden")],
)
def test_invalid_arguments_raise(arguments: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_planted_defect_model(**arguments)


@pytest.mark.parametrize("swiglu", [False, True])
def test_silent_units_leave_the_forward_unchanged(swiglu: bool, shipped_pixel_values: torch.Tensor) -> None:
    planted = build_planted_defect_model(swiglu=swiglu)
    before = last_layer_patch_tokens(planted.model, shipped_pixel_values[:2])
    with torch.no_grad():
        for block in planted.model.encoder.layer[: planted.defect_layer]:
            output = block.mlp.down_proj if swiglu else block.mlp.fc2
            output.weight[:, 0] = 0.0
    after = last_layer_patch_tokens(planted.model, shipped_pixel_values[:2])
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("swiglu", [False, True])
def test_plant_is_a_singular_triple_whose_removal_repairs_the_model(
    swiglu: bool, shipped_pixel_values: torch.Tensor
) -> None:
    planted = build_planted_defect_model(swiglu=swiglu)
    model, layer, unit = planted.model, planted.defect_layer, planted.planted_unit
    mlp = model.encoder.layer[layer].mlp
    output = mlp.down_proj if swiglu else mlp.fc2
    reader = mlp.gate_proj if swiglu else mlp.fc1
    left, values, right_t = torch.linalg.svd(output.weight.detach().double(), full_matrices=False)
    assert abs(float(left[:, 0] @ planted.direction.double())) > 1 - 1e-6
    assert abs(float(right_t[0, unit])) > 1 - 1e-6
    assert values[0] > 10 * values[1]
    reader_left, _, reader_right_t = torch.linalg.svd(reader.weight.detach().double(), full_matrices=False)
    assert abs(float(reader_right_t[0] @ planted.brightness_direction.double())) > 1 - 1e-6
    assert abs(float(reader_left[unit, 0])) > 1 - 1e-6

    directions = singular_defect_directions(model)
    before = last_layer_patch_tokens(model, shipped_pixel_values)
    truth = planted.planted_positions(shipped_pixel_values).flatten(1)
    shrunk = values.clone()
    shrunk[0] = 0.0
    with torch.no_grad():
        output.weight.copy_((left * shrunk) @ right_t)
    after = last_layer_patch_tokens(model, shipped_pixel_values)
    norms = after.norm(dim=-1)
    assert (norms.max(dim=1).values / norms.median(dim=1).values < 3).all()
    clean_cosines = torch.nn.functional.cosine_similarity(before[~truth], after[~truth], dim=-1)
    assert clean_cosines.min() > 0.99
    analysis = find_defect_tokens(model, shipped_pixel_values, directions)
    assert (analysis.first_defective_layer == -1).all()


@pytest.mark.parametrize("swiglu", [False, True])
def test_only_the_plant_can_move_under_sinder_training(swiglu: bool, shipped_pixel_values: torch.Tensor) -> None:
    """Blocks up to the defect layer are zero apart from the planted units, so every SINDER shift there except the
    planted singular values gets exactly zero gradient, whatever the loss."""
    from peft import get_peft_model

    from sinder_peft import SinderConfig

    planted = build_planted_defect_model(swiglu=swiglu)
    layer = planted.defect_layer
    peft_model = get_peft_model(planted.model, SinderConfig())
    backbone = peft_model.base_model.model
    truth = planted.planted_positions(shipped_pixel_values[:2]).flatten(1)
    hidden = backbone.embeddings(shipped_pixel_values[:2])
    for block in backbone.encoder.layer[: layer + 1]:
        hidden = block(hidden)
    patches = hidden[:, 1:]
    loss = patches[truth].norm(dim=-1).mean() + 0.1 * patches[~truth].norm(dim=-1).mean()
    loss.backward()
    gradients = {name: p.grad for name, p in peft_model.named_parameters() if p.grad is not None}
    largest = max(float(gradient.abs().max()) for gradient in gradients.values())
    # float32 rounding (tokens keep a ~1e-7 component along q, singular factors are stored in float32) leaves
    # gradients of at most ~1e-5 of the largest elsewhere
    moving = {name for name, gradient in gradients.items() if gradient.abs().max() > 1e-4 * largest}
    plant = ("gate_proj", "down_proj") if swiglu else ("fc1", "fc2")
    assert moving == {f"base_model.model.encoder.layer.{layer}.mlp.{name}.sinder_delta.default" for name in plant}
    for name in moving:  # the leading singular value (the planted one) only
        gradient = gradients[name].abs()
        assert gradient[1:].max() < 1e-6 * gradient[0]
