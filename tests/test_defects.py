"""Tests of the defect directions (block linearization) and of defect-token detection."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import integrate
from scipy.stats import norm
from transformers import Dinov2Config, Dinov2Model
from transformers.activations import ACT2FN

from sinder_peft.analysis.detection import (
    DefectAnalysis,
    DefectTest,
    defect_token_mask,
    direction_cosines,
    find_defect_tokens,
)
from sinder_peft.analysis.directions import (
    expected_activation_jacobian,
    expected_gated_jacobian,
    expected_gelu_derivative,
    expected_mlp_jacobian,
    expected_swiglu_jacobian,
    leading_left_singular_vector,
    linearized_block,
    sampled_mlp_jacobian,
    singular_defect_directions,
)
from sinder_peft.synthetic.demo import build_planted_defect_model, generate_demo_image
from sinder_peft.synthetic.planting import build_planted_model, spot_pixel_values
from sinder_peft.synthetic.tiny_models import build_tiny_model
from sinder_peft.tuner.architectures import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    describe_model,
    get_blocks,
    patchify,
    unwrap_backbone,
)
from sinder_peft.tuner.descriptions import ArchitectureDescription

FRESH_IMAGE_SEEDS = tuple(range(1000, 1012))


def to_pixel_values(images: list[Image.Image], patch_size: int = 14) -> torch.Tensor:
    """Centre-crop each image to a multiple of the patch size and normalize it with the ImageNet statistics."""
    tensors = []
    for image in images:
        width, height = image.size
        new_width, new_height = width - width % patch_size, height - height % patch_size
        left, top = (width - new_width) // 2, (height - new_height) // 2
        array = np.asarray(image.convert("RGB").crop((left, top, left + new_width, top + new_height)), np.float32)
        tensor = torch.from_numpy(array / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        tensors.append((tensor - mean) / std)
    return torch.stack(tensors)


def abs_cos(first: torch.Tensor, second: torch.Tensor) -> float:
    """|cos| between two vectors."""
    first, second = first.double(), second.double()
    return abs(float(first @ second / (first.norm() * second.norm())))


# ---------------------------------------------------------------------------------------------------------------
# Independent reference computations
# ---------------------------------------------------------------------------------------------------------------


def reference_gelu_slope(mean: float, std: float) -> float:
    """E[gelu'(z)], z ~ N(mean, std²), gelu'(z) = Φ(z) + z φ(z), by adaptive numerical integration (scipy)."""

    def integrand(z: float) -> float:
        return (norm.cdf(z) + z * norm.pdf(z)) * norm.pdf(z, loc=mean, scale=std)

    value, _ = integrate.quad(integrand, mean - 12 * std, mean + 12 * std, points=[0.0], limit=400, epsabs=1e-13)
    return value


def reference_gelu_slopes(means: np.ndarray, stds: np.ndarray, points: int = 40_001) -> np.ndarray:
    """E[gelu'(z)] for many (mean, std) at once, by the trapezoid rule on a fine grid over ±12 std (vectorized)."""
    offsets = np.linspace(-12.0, 12.0, points)
    z = means[:, None] + stds[:, None] * offsets[None, :]
    integrand = (norm.cdf(z) + z * norm.pdf(z)) * norm.pdf(offsets)[None, :]
    return np.trapezoid(integrand, offsets, axis=1)


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


def _silu_slope(z: np.ndarray) -> np.ndarray:
    sigmoid = 1 / (1 + np.exp(-z))
    return sigmoid * (1 + z * (1 - sigmoid))


def gated_jacobian_by_integration(
    gate_weight: np.ndarray,
    gate_bias: np.ndarray,
    up_weight: np.ndarray,
    up_bias: np.ndarray,
    act: Callable[[np.ndarray], np.ndarray],
    slope: Callable[[np.ndarray], np.ndarray],
    nodes: int,
) -> np.ndarray:
    """E[∇ₓ act(g·x + a)(h·x + c)] for x ~ N(0, I), by a 2-D Gauss–Hermite rule over the joint law of (z₁, z₂).

    Independent of the library's 1-D reduction: (z₁, z₂) is written through its Cholesky factor and
    E[act'(z₁) z₂] integrated over both variables; `slope` is act'.
    """
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    weights = weights / math.sqrt(2 * math.pi)
    first, second = np.meshgrid(points, points, indexing="ij")
    pair_weights = np.outer(weights, weights)
    rows = []
    for g, a, h, c in zip(gate_weight, gate_bias, up_weight, up_bias, strict=True):
        s1, s2 = np.linalg.norm(g), np.linalg.norm(h)
        rho = g @ h / (s1 * s2)
        z1 = a + s1 * first
        z2 = c + s2 * (rho * first + math.sqrt(max(1 - rho**2, 0.0)) * second)
        slope_times_up = np.sum(pair_weights * slope(z1) * z2)
        mean_value = np.sum(weights * act(a + s1 * points))
        rows.append(slope_times_up * g + mean_value * h)
    return np.stack(rows)


def reference_swiglu_jacobian(
    gate_weight: np.ndarray, gate_bias: np.ndarray, up_weight: np.ndarray, up_bias: np.ndarray, nodes: int = 80
) -> np.ndarray:
    """E[∇ₓ silu(g·x + a)(h·x + c)] for x ~ N(0, I) (`gated_jacobian_by_integration`, silu' in closed form)."""
    return gated_jacobian_by_integration(gate_weight, gate_bias, up_weight, up_bias, _silu, _silu_slope, nodes)


def reference_block_matrix(block: torch.nn.Module, swiglu: bool) -> np.ndarray:
    """B = A_mlp · A_attn of docs/method.md §1, built with explicit dense matrices in numpy float64."""

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().double().numpy()

    size = block.norm1.weight.shape[0]
    identity = np.eye(size)
    centering = identity - np.ones((size, size)) / size
    attention = block.attention
    a_attn = (
        identity
        + np.diag(array(block.layer_scale1.lambda1))
        @ array(attention.o_proj.weight)
        @ array(attention.v_proj.weight)
        @ np.diag(array(block.norm1.weight))
        @ centering
    )
    mlp = block.mlp
    if swiglu:
        jacobian = reference_swiglu_jacobian(
            array(mlp.gate_proj.weight), array(mlp.gate_proj.bias), array(mlp.up_proj.weight), array(mlp.up_proj.bias)
        )
        output = array(mlp.down_proj.weight)
    else:
        weight, bias = array(mlp.fc1.weight), array(mlp.fc1.bias)
        jacobian = reference_gelu_slopes(bias, np.linalg.norm(weight, axis=1))[:, None] * weight
        output = array(mlp.fc2.weight)
    a_mlp = (
        identity
        + np.diag(array(block.layer_scale2.lambda1))
        @ output
        @ jacobian
        @ np.diag(array(block.norm2.weight))
        @ centering
    )
    return a_mlp @ a_attn


def tiny_random_model(swiglu: bool, seed: int = 0) -> Dinov2Model:
    """A 2-layer, 16-wide DINOv2 with random weights, LayerNorm scales and layer scales (all matter)."""
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=42,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        initializer_range=0.25,
    )
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lambda1") or (".norm" in name and name.endswith("weight")):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def planted_gelu():
    return build_planted_defect_model()


@pytest.fixture(scope="module")
def planted_swiglu():
    return build_planted_defect_model(swiglu=True)


@pytest.fixture(scope="module")
def fresh_pixel_values() -> torch.Tensor:
    return to_pixel_values([generate_demo_image(seed) for seed in FRESH_IMAGE_SEEDS])


# ---------------------------------------------------------------------------------------------------------------
# Expected Jacobians
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (-2.0, 0.5), (1.5, 3.0), (-4.0, 8.0), (0.3, 0.01), (2.0, 25.0)])
def test_expected_gelu_derivative_matches_numerical_integration(mean: float, std: float) -> None:
    closed_form = expected_gelu_derivative(torch.tensor([mean], dtype=torch.float64), torch.tensor([std]).double())
    assert float(closed_form) == pytest.approx(reference_gelu_slope(mean, std), abs=1e-9)


def test_expected_gelu_jacobian_matches_monte_carlo_of_autograd_jacobian() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    inputs = torch.randn(400_000, 4, generator=generator, dtype=torch.float64)
    pre_activation = inputs @ weight.T + bias
    # d gelu(Wx + b) / dx = gelu'(Wx + b)[:, None] * W; average over the samples.
    slopes = torch.special.ndtr(pre_activation) + pre_activation * torch.exp(-0.5 * pre_activation**2) / math.sqrt(
        2 * math.pi
    )
    monte_carlo = slopes.mean(dim=0)[:, None] * weight
    expected = expected_activation_jacobian(weight, bias, "gelu")
    assert torch.allclose(expected, monte_carlo, atol=5e-3)


@pytest.mark.parametrize(
    ("activation", "derivative", "tolerance"),
    [
        ("gelu_new", None, 1e-9),
        ("quick_gelu", lambda z: (s := 1 / (1 + np.exp(-1.702 * z))) + 1.702 * z * s * (1 - s), 1e-9),
        ("relu", lambda z: (z > 0).astype(float), 3e-3),
    ],
)
def test_other_activations_use_quadrature(activation: str, derivative, tolerance: float) -> None:
    if derivative is None:  # derivative of the tanh approximation, by central differences
        from transformers.activations import ACT2FN

        function = ACT2FN[activation]

        def derivative(z: np.ndarray) -> np.ndarray:
            step = 1e-5
            plus = function(torch.as_tensor(z + step, dtype=torch.float64)).numpy()
            minus = function(torch.as_tensor(z - step, dtype=torch.float64)).numpy()
            return (plus - minus) / (2 * step)

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 3, generator=generator, dtype=torch.float64) * 2
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    result = expected_activation_jacobian(weight, bias, activation)
    for row, (w, b) in enumerate(zip(weight.numpy(), bias.numpy(), strict=True)):
        std = np.linalg.norm(w)

        def integrand(z: float, mean: float = b, scale: float = std) -> float:
            return float(derivative(np.asarray(z))) * norm.pdf(z, loc=mean, scale=scale)

        slope, _ = integrate.quad(
            integrand,
            b - 12 * std,
            b + 12 * std,
            points=[0.0],
            limit=400,
        )
        assert np.allclose(result[row].numpy(), slope * w, atol=tolerance * std)


def test_swiglu_jacobian_matches_two_dimensional_integration() -> None:
    generator = torch.Generator().manual_seed(2)
    gate_weight = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 0.6
    up_weight = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 0.6
    up_weight[0] = 0.8 * gate_weight[0]  # strongly correlated gate and up
    gate_bias = torch.randn(6, generator=generator, dtype=torch.float64)
    up_bias = torch.randn(6, generator=generator, dtype=torch.float64)
    result = expected_swiglu_jacobian(gate_weight, gate_bias, up_weight, up_bias)
    reference = reference_swiglu_jacobian(gate_weight.numpy(), gate_bias.numpy(), up_weight.numpy(), up_bias.numpy())
    assert np.allclose(result.numpy(), reference, atol=1e-9)


def test_swiglu_jacobian_with_large_gate_std_matches_monte_carlo() -> None:
    # A pre-activation std of 12 is where Gauss–Hermite rules break down; the composite rule must not.
    generator = torch.Generator().manual_seed(3)
    gate_weight = torch.randn(3, 4, generator=generator, dtype=torch.float64) * 6
    up_weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    gate_bias, up_bias = torch.tensor([0.5, -3.0, 2.0]).double(), torch.tensor([1.0, 0.0, -1.0]).double()
    inputs = torch.randn(1_000_000, 4, generator=generator, dtype=torch.float64)
    gate, up = inputs @ gate_weight.T + gate_bias, inputs @ up_weight.T + up_bias
    sigmoid = torch.sigmoid(gate)
    slope = sigmoid * (1 + gate * (1 - sigmoid))
    monte_carlo = (slope * up).mean(0)[:, None] * gate_weight + (gate * sigmoid).mean(0)[:, None] * up_weight
    result = expected_swiglu_jacobian(gate_weight, gate_bias, up_weight, up_bias)
    scale = gate_weight.abs().max()
    assert torch.allclose(result, monte_carlo, atol=0.02 * scale)


@pytest.mark.parametrize("swiglu", [False, True])
def test_sampled_jacobian_converges_to_expected_jacobian(swiglu: bool) -> None:
    model = tiny_random_model(swiglu)
    description = describe_model(model)
    block = get_blocks(model)[0]
    expected = expected_mlp_jacobian(block, description)
    sampled = sampled_mlp_jacobian(block, description, num_samples=200_000, generator=torch.Generator().manual_seed(0))
    assert expected.shape == sampled.shape
    assert (expected - sampled).abs().max() < 0.02 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Directions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swiglu", [False, True])
def test_directions_equal_dense_recomputation(swiglu: bool) -> None:
    model = tiny_random_model(swiglu)
    description = describe_model(model)
    directions = singular_defect_directions(model)
    accumulated = np.eye(16)
    for index, block in enumerate(get_blocks(model)):
        reference = reference_block_matrix(block, swiglu)
        assert np.allclose(linearized_block(block, description).numpy(), reference, atol=1e-9)
        accumulated = reference @ accumulated
        left, _, _ = np.linalg.svd(accumulated)
        direction = directions[index]
        assert direction.dtype == torch.float32 and direction.shape == (16,)
        assert abs_cos(direction, torch.from_numpy(left[:, 0])) > 1 - 1e-6
        assert float(direction.norm()) == pytest.approx(1.0, abs=1e-6)
        # the documented sign convention: the largest-magnitude entry is positive
        assert float(direction[direction.abs().argmax()]) > 0


@pytest.mark.parametrize("swiglu", [False, True])
def test_exact_and_sampling_directions_agree(swiglu: bool, planted_gelu, planted_swiglu) -> None:
    planted = planted_swiglu if swiglu else planted_gelu
    exact = singular_defect_directions(planted.model)
    sampled = singular_defect_directions(planted.model, method="sampling", num_samples=10_000, seed=3)
    assert len(exact) == len(sampled) == planted.model.config.num_hidden_layers
    for first, second in zip(exact, sampled, strict=True):
        assert abs_cos(first, second) > 0.999


@pytest.mark.parametrize(("swiglu", "registers"), [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_planted_direction_is_recovered(swiglu: bool, registers: int) -> None:
    planted = build_planted_defect_model(swiglu=swiglu, num_register_tokens=registers, seed=5)
    directions = singular_defect_directions(planted.model)
    for layer, direction in enumerate(directions):
        if layer >= planted.defect_layer:
            assert abs_cos(direction, planted.direction) >= 0.99
        else:
            assert abs_cos(direction, planted.direction) < 0.1


def test_unknown_method_raises(planted_gelu) -> None:
    with pytest.raises(ValueError, match="method"):
        singular_defect_directions(planted_gelu.model, method="power")


def test_peft_wrapped_model_uses_the_adapted_weights(planted_gelu) -> None:
    from peft import get_peft_model

    from sinder_peft import SinderConfig

    bare = planted_gelu.model
    bare_directions = singular_defect_directions(bare)
    peft_model = get_peft_model(copy.deepcopy(bare), SinderConfig())
    for first, second in zip(singular_defect_directions(peft_model), bare_directions, strict=True):
        assert abs_cos(first, second) > 1 - 1e-6

    # Shift away the planted singular value of the defect layer's fc2: the adapted model must now behave like a bare
    # copy whose planted column is removed, both for the directions and for the detected tokens.
    layer = planted_gelu.defect_layer
    fc2 = get_blocks(peft_model)[layer].mlp.fc2
    planted_value = torch.linalg.svdvals(bare.encoder.layer[layer].mlp.fc2.weight.double())[0]
    with torch.no_grad():
        fc2.sinder_delta["default"][0] = -float(planted_value)
    repaired = copy.deepcopy(bare)
    with torch.no_grad():
        repaired.encoder.layer[layer].mlp.fc2.weight[:, planted_gelu.planted_unit] = 0.0
    adapted, manual = singular_defect_directions(peft_model), singular_defect_directions(repaired)
    for first, second in zip(adapted, manual, strict=True):
        assert abs_cos(first, second) > 1 - 1e-4
    assert abs_cos(adapted[layer], planted_gelu.direction) < 0.5

    pixel_values = to_pixel_values([generate_demo_image(seed) for seed in FRESH_IMAGE_SEEDS[:3]])
    analysis = find_defect_tokens(peft_model, pixel_values, bare_directions)
    assert (analysis.first_defective_layer == -1).all()
    assert analysis.max_median_norm_ratio.max() < 5


# ---------------------------------------------------------------------------------------------------------------
# Defect tokens
# ---------------------------------------------------------------------------------------------------------------


def test_direction_cosines_match_hand_computation() -> None:
    tokens = torch.tensor([[[[3.0, 4.0], [0.0, -2.0]], [[-1.0, 0.0], [1.0, 1.0]]]])  # [1, 2, 2, 2]
    cosines = direction_cosines(tokens, torch.tensor([2.0, 0.0]))
    expected = torch.tensor([[[0.6, 0.0], [1.0, 1 / math.sqrt(2)]]])
    assert torch.allclose(cosines, expected, atol=1e-6)


def _hand_threshold(values: list[list[float]], mask_thr: float) -> float:
    """mean + mask_thr · (unbiased) std over every value of the grid, in plain Python."""
    flat = [value for row in values for value in row]
    mean = sum(flat) / len(flat)
    return mean + mask_thr * math.sqrt(sum((value - mean) ** 2 for value in flat) / (len(flat) - 1))


def test_defect_token_mask_matches_hand_computation() -> None:
    values = [[0.1] * 5 for _ in range(5)]
    values[2][2] = 0.9  # interior outlier
    values[0][3] = 0.95  # border outlier: never flagged with border=1
    values[1][1] = 0.3  # just below the threshold with the unbiased std, just above it with the biased one
    mask_thr = 0.555
    threshold = _hand_threshold(values, mask_thr)
    assert 0.3 < threshold < 0.9
    cosines = torch.tensor(values).unsqueeze(0)

    mask = defect_token_mask(cosines, mask_thr=mask_thr, border=1)
    expected = torch.zeros(1, 5, 5, dtype=torch.bool)
    expected[0, 2, 2] = True
    assert torch.equal(mask, expected)

    unbordered = defect_token_mask(cosines, mask_thr=mask_thr, border=0)
    assert unbordered[0, 0, 3] and unbordered[0, 2, 2] and int(unbordered.sum()) == 2
    # any number of leading dimensions: each grid gets its own statistics
    stacked = torch.stack([cosines[0], torch.full((5, 5), 0.5)])[None]  # [1, 2, 5, 5]
    stacked_mask = defect_token_mask(stacked, mask_thr=mask_thr, border=1)
    assert torch.equal(stacked_mask[0, 0], expected[0]) and not stacked_mask[0, 1].any()


def test_defect_token_mask_statistics_include_the_border() -> None:
    # Large border values inflate the whole-grid std, so the interior 0.5 is not flagged; statistics over the
    # interior alone would flag it.
    values = [[0.1] * 5 for _ in range(5)]
    for col in range(5):
        values[0][col] = 1.0
    values[2][2] = 0.5
    assert _hand_threshold(values, 1.0) > 0.5
    assert _hand_threshold([row[1:4] for row in values[1:4]], 1.0) < 0.5
    assert not defect_token_mask(torch.tensor(values), mask_thr=1.0, border=1).any()


def test_leading_left_singular_vector_sign_convention() -> None:
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        matrix = torch.randn(6, 6, generator=generator, dtype=torch.float64)
        vector = leading_left_singular_vector(matrix)
        reference = np.linalg.svd(matrix.numpy())[0][:, 0]
        assert abs(float(vector @ torch.from_numpy(reference))) == pytest.approx(1.0)
        assert float(vector[vector.abs().argmax()]) > 0
        assert torch.allclose(leading_left_singular_vector(-matrix), vector)


@pytest.mark.parametrize(("swiglu", "registers"), [(False, 0), (True, 0), (False, 4)])
def test_defect_tokens_on_fresh_images_match_planted_positions(
    swiglu: bool, registers: int, fresh_pixel_values: torch.Tensor
) -> None:
    planted = build_planted_defect_model(swiglu=swiglu, num_register_tokens=registers)
    analysis = find_defect_tokens(planted.model, fresh_pixel_values)
    truth = planted.planted_positions(fresh_pixel_values)
    assert truth.flatten(1).sum(1).min() >= 3
    assert (analysis.first_defective_layer == planted.defect_layer).all()
    for layer in range(planted.defect_layer, analysis.num_layers):
        flagged = analysis.masks[:, layer]
        true_positives = int((flagged & truth).sum())
        assert true_positives / int(flagged.sum()) >= 0.95  # precision
        assert true_positives / int(truth.sum()) >= 0.95  # recall


def test_analysis_fields_agree_with_the_full_forward(planted_gelu, fresh_pixel_values: torch.Tensor) -> None:
    model = planted_gelu.model
    pixel_values = fresh_pixel_values[:3]
    directions = singular_defect_directions(model)
    analysis = find_defect_tokens(model, pixel_values, directions, norm_threshold=20.0)
    assert isinstance(analysis, DefectAnalysis)
    with torch.no_grad():
        hidden_states = model(pixel_values, output_hidden_states=True).hidden_states
    num_layers, grid = model.config.num_hidden_layers, analysis.grid_size
    assert grid == (16, 16)
    assert analysis.masks.shape == analysis.token_norms.shape == (3, num_layers, 16, 16)
    for layer in range(num_layers):
        patches = hidden_states[layer + 1][:, 1:].reshape(3, 16, 16, -1)
        norms = patches.norm(dim=-1)
        assert torch.allclose(analysis.token_norms[:, layer], norms, rtol=1e-5)
        cosines = (patches @ directions[layer]).abs() / norms
        assert torch.allclose(analysis.cosines[:, layer], cosines, atol=1e-5)
        flat = norms.flatten(1)
        median = flat.median(dim=1).values
        assert torch.allclose(analysis.max_median_norm_ratio[:, layer], flat.max(dim=1).values / median, rtol=1e-5)
        assert torch.allclose(analysis.high_norm_share[:, layer], (flat > 20.0).float().mean(dim=1))
    assert torch.allclose(analysis.last_patch_features, hidden_states[-1][:, 1:].reshape(3, 16, 16, -1))
    relative = find_defect_tokens(model, pixel_values, directions)
    default_share = relative.token_norms.flatten(2) > 4 * relative.token_norms.flatten(2).median(-1).values[..., None]
    assert torch.allclose(relative.high_norm_share, default_share.float().mean(-1))
    # directions default to the exact singular defect directions
    assert torch.equal(find_defect_tokens(model, pixel_values).masks, relative.masks)


def test_analysis_to_dict_is_json_serializable(planted_gelu, fresh_pixel_values: torch.Tensor) -> None:
    analysis = find_defect_tokens(planted_gelu.model, fresh_pixel_values[:2])
    report = json.loads(json.dumps(analysis.to_dict()))
    assert report["grid_size"] == [16, 16] and report["num_layers"] == 6
    assert report["defect_test"]["mask_thr"] == 4.0 and report["defect_test"]["norm_gap"] == 4.0
    for index, image in enumerate(report["images"]):
        layer = image["first_defective_layer"]
        assert layer == int(analysis.first_defective_layer[index]) == planted_gelu.defect_layer
        assert image["num_defect_tokens"] == analysis.defect_token_counts[index].tolist()
        positions = {tuple(position) for position in image["defect_tokens_at_first_defective_layer"]}
        assert positions == {tuple(p) for p in torch.nonzero(analysis.masks[index, layer]).tolist()}
        assert image["max_median_norm_ratio"] == pytest.approx(analysis.max_median_norm_ratio[index].tolist())


def test_no_defect_gives_minus_one(planted_gelu) -> None:
    pixel_values = to_pixel_values([Image.new("RGB", (70, 56), (90, 120, 60))])
    analysis = find_defect_tokens(planted_gelu.model, pixel_values)
    assert analysis.grid_size == (4, 5)
    assert int(analysis.first_defective_layer[0]) == -1
    assert analysis.to_dict()["images"][0]["defect_tokens_at_first_defective_layer"] == []


@pytest.mark.parametrize(
    ("shape", "kernel", "message"),
    [
        ((1, 3, 28, 42), 3, "at least 3×3"),
        ((1, 3, 42, 30), 3, "multiples of the patch size"),
        ((1, 3, 56, 56), 5, "at least 5×5"),
        ((3, 42, 42), 3, "batch"),
    ],
)
def test_unusable_images_raise(planted_gelu, shape: tuple[int, ...], kernel: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        find_defect_tokens(planted_gelu.model, torch.zeros(shape), test=DefectTest(border=kernel // 2))


def test_smallest_grid_and_wrong_directions(planted_gelu) -> None:
    analysis = find_defect_tokens(planted_gelu.model, torch.zeros(1, 3, 42, 42))
    assert analysis.grid_size == (3, 3)
    with pytest.raises(ValueError, match="directions"):
        find_defect_tokens(planted_gelu.model, torch.zeros(1, 3, 42, 42), [torch.ones(96)] * 2)


# ---------------------------------------------------------------------------------------------------------------
# Other ViT families: activations, gated MLPs, blocks without layer scale, block calls
# ---------------------------------------------------------------------------------------------------------------


def reference_gated_jacobian(
    gate_weight: np.ndarray,
    gate_bias: np.ndarray,
    up_weight: np.ndarray,
    up_bias: np.ndarray,
    activation: str,
    nodes: int = 120,
) -> np.ndarray:
    """E[∇ₓ act(g·x + a)(h·x + c)] for x ~ N(0, I) (`gated_jacobian_by_integration`), with act and act′ evaluated
    by torch (act′ by central differences), independent of the library's 1-D reduction."""
    function = ACT2FN[activation]

    def act(z: np.ndarray) -> np.ndarray:
        return function(torch.from_numpy(z)).numpy()

    def slope(z: np.ndarray, step: float = 1e-6) -> np.ndarray:
        return (act(z + step) - act(z - step)) / (2 * step)

    return gated_jacobian_by_integration(gate_weight, gate_bias, up_weight, up_bias, act, slope, nodes)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_gated_jacobian_with_any_activation_matches_two_dimensional_integration(activation: str) -> None:
    generator = torch.Generator().manual_seed(7)
    gate_weight = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 0.6
    up_weight = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 0.6
    up_weight[0] = -0.7 * gate_weight[0]
    gate_bias = torch.randn(6, generator=generator, dtype=torch.float64)
    up_bias = torch.randn(6, generator=generator, dtype=torch.float64)
    result = expected_gated_jacobian(gate_weight, gate_bias, up_weight, up_bias, activation)
    reference = reference_gated_jacobian(
        *(t.numpy() for t in (gate_weight, gate_bias, up_weight, up_bias)), activation
    )
    assert np.allclose(result.numpy(), reference, atol=1e-7)
    if activation == "silu":
        assert torch.equal(result, expected_swiglu_jacobian(gate_weight, gate_bias, up_weight, up_bias))


def family_reference_block_matrix(block: torch.nn.Module, description: ArchitectureDescription) -> np.ndarray:
    """B = A_mlp · A_attn of docs/method.md §1 for any family, with dense numpy matrices: γ = 1 without layer scale,
    J by a trapezoid rule (plain MLP) or the 2-D rule of `reference_gated_jacobian` (gated MLP)."""
    names = description.block

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().double().numpy()

    def module(name: str) -> torch.nn.Module:
        return block.get_submodule(name)

    size = description.hidden_size
    identity = np.eye(size)
    centering = identity - np.ones((size, size)) / size

    def scale(name: str | None) -> np.ndarray:
        return np.ones(size) if name is None else array(block.get_parameter(name))

    a_attn = (
        identity
        + np.diag(scale(names.layer_scale1))
        @ array(module(names.output).weight)
        @ array(module(names.value).weight)
        @ np.diag(array(module(names.norm1).weight))
        @ centering
    )
    mlp = module(names.mlp_prefix)
    inputs = [mlp.get_submodule(name) for name in names.mlp.input_projections]
    if names.mlp.kind == "gated":
        jacobian = reference_gated_jacobian(
            *(array(t) for t in (inputs[0].weight, inputs[0].bias, inputs[1].weight, inputs[1].bias)),
            names.mlp.activation,
        )
    else:
        # E[act′(z)], z ~ N(b, ‖w‖²), by the trapezoid rule on a fine grid over ±12 std, act′ by central differences.
        function = ACT2FN[names.mlp.activation]
        weight, bias = array(inputs[0].weight), array(inputs[0].bias)
        offsets = np.linspace(-12.0, 12.0, 20_001)
        points = torch.from_numpy(bias[:, None] + np.linalg.norm(weight, axis=1)[:, None] * offsets[None, :])
        step = 1e-6
        slopes = ((function(points + step) - function(points - step)) / (2 * step)).numpy()
        jacobian = np.trapezoid(slopes * norm.pdf(offsets)[None, :], offsets, axis=1)[:, None] * weight
    output = array(mlp.get_submodule(names.mlp.output_projection).weight)
    a_mlp = (
        identity
        + np.diag(scale(names.layer_scale2))
        @ output
        @ jacobian
        @ np.diag(array(module(names.norm2).weight))
        @ centering
    )
    return a_mlp @ a_attn


@pytest.mark.parametrize("family", ["dinov3_gated", "clip_vision", "siglip", "vit"])
def test_linearized_block_of_other_families_equals_dense_recomputation(family: str) -> None:
    model = build_tiny_model(family, num_layers=1, hidden_size=32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make the MLP nonlinearity, the norms and the layer scales matter
        for name, parameter in model.named_parameters():
            if name.endswith("lambda1") or "norm" in name and name.endswith("weight"):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            elif name.endswith("bias"):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
            elif "mlp" in name and name.endswith("weight"):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    description = describe_model(model)
    block = get_blocks(model)[0]
    expected = family_reference_block_matrix(block, description)
    assert np.allclose(linearized_block(block, description).numpy(), expected, atol=1e-6)
    sampled = sampled_mlp_jacobian(block, description, num_samples=100_000, generator=torch.Generator().manual_seed(0))
    exact = expected_mlp_jacobian(block, description)
    assert (exact - sampled).abs().max() < 0.05 * exact.abs().max()  # sampling noise: ~0.03 for a gated MLP


def test_per_channel_layer_scales_are_part_of_the_directions() -> None:
    """The planted DINOv3 block writes exactly β·u through per-channel layer scales: without them, the direction
    misses u."""
    planted = build_planted_model("dinov3_gated")
    description = describe_model(planted.model)
    unscaled = dataclasses.replace(description.block, layer_scale1=None, layer_scale2=None)
    accumulated = torch.eye(description.hidden_size, dtype=torch.float64)
    for block in get_blocks(planted.model)[: planted.defect_layer + 1]:
        accumulated = linearized_block(block, unscaled) @ accumulated
    assert abs_cos(leading_left_singular_vector(accumulated), planted.direction) < 0.9
    directions = singular_defect_directions(planted.model)
    assert abs_cos(directions[planted.defect_layer], planted.direction) > 0.99


@pytest.mark.parametrize("family", ["clip", "siglip2", "dinov3"])
def test_defect_tokens_are_measured_on_the_models_own_block_outputs(family: str) -> None:
    """CLIP needs its pre-norm, SigLIP 2 its patchifying, DINOv3 its RoPE: the analysed tokens are the model's."""
    planted = build_planted_model(family, num_layers=3)
    backbone, description = unwrap_backbone(planted.model), describe_model(planted.model)
    # Two images with 5 and 4 bright patches: on a 10×10 grid, 6 or more are too many for the mean + 4 std test.
    pixel_values = spot_pixel_values([1, 4], planted.normalization, size=160, patch=planted.patch_size)
    analysis = find_defect_tokens(planted.model, pixel_values)
    grid = analysis.grid_size
    assert grid == (10, 10)
    with torch.no_grad():
        if family == "siglip2":
            hidden_states = backbone(
                pixel_values=patchify(pixel_values, planted.patch_size),
                pixel_attention_mask=torch.ones(2, 100, dtype=torch.long),
                spatial_shapes=torch.tensor([[10, 10]] * 2),
                output_hidden_states=True,
            ).hidden_states
        else:
            kwargs = {"interpolate_pos_encoding": True} if family == "clip" else {}
            hidden_states = backbone(pixel_values, output_hidden_states=True, **kwargs).hidden_states
    for layer in range(description.num_layers):
        patches = hidden_states[layer + 1][:, description.num_prefix_tokens :].reshape(2, *grid, -1)
        torch.testing.assert_close(analysis.token_norms[:, layer], patches.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert (analysis.first_defective_layer == planted.defect_layer).all()
