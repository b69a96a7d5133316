"""Singular defect directions from the weights alone: the linearization of docs/method.md §1.

A pre-norm ViT block, linearized around the residual stream and stripped of its biases and of the 1/σ scale of its
LayerNorms, is an N×N matrix B_l = A_mlp · A_attn with

    A_attn = I + diag(γ₁) · W_o · W_v · diag(w₁) · C
    A_mlp  = I + diag(γ₂) · W_out · J · diag(w₂) · C,      C = I − 11ᵀ/N,

where J is the best linear map from the MLP input to the MLP hidden activation when the input is x ~ N(0, I), and
γ₁, γ₂ are the layer scales (1 in families without them). Every piece is read through the model's
`ArchitectureDescription`, so the same code serves every supported family (DINOv2, DINOv3, CLIP, SigLIP, ViT...).
The *singular defect direction* of layer l is the leading left singular vector of P_l = B_l ··· B_1: the direction
the first l blocks amplify most. Tokens whose features line up with it are the high-norm "defect" tokens.

Everything here reads weights through `effective_linear_weight`, so a model wrapped by PEFT (with any adapter that
layer understands) is analysed with the weights it currently applies. All linear algebra runs in float64.

Sign convention: a singular vector is only defined up to sign. Every direction returned here has its
largest-magnitude entry positive, so results are deterministic; every comparison with a direction (here, in the
trainer and in the tests) uses |cos|.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from numpy.polynomial.legendre import leggauss
from torch import nn
from transformers.activations import ACT2FN

from ..tuner.architectures import describe_config, unwrap_backbone
from ..tuner.descriptions import ArchitectureDescription, BlockDescription
from ..tuner.layer import effective_linear_weight

logger = logging.getLogger(__name__)

DirectionMethod = Literal["exact", "sampling"]

# Activation names (keys of `transformers.activations.ACT2FN`) that are the exact, erf-based GELU.
EXACT_GELU_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_python")

# Composite Gauss–Legendre rule for E[f(Z)], Z ~ N(0, 1): 128 panels of 8 nodes on [-10, 10]. Gauss–Hermite rules
# lose accuracy once the pre-activation std exceeds ~5 (the activation's bend then falls between nodes); this rule
# stays accurate to ~1e-12 up to a std of ~30 and to ~1e-6 at 100. The mass beyond ±10 is ~1.5e-23.
_QUADRATURE_PANELS = 128
_QUADRATURE_ORDER = 8
_QUADRATURE_HALF_WIDTH = 10.0

# Rows of samples per chunk when fitting J by least squares (method="sampling").
_SAMPLING_CHUNK = 8192


# ----------------------------------------------------------------------------------------------------------------
# Reading a block's weights
# ----------------------------------------------------------------------------------------------------------------


def _block_description(description: ArchitectureDescription | BlockDescription) -> BlockDescription:
    """Return the block description inside `description` (which may already be one)."""
    return description.block if isinstance(description, ArchitectureDescription) else description


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """Return the weight `module` currently applies, as a detached float64 tensor."""
    return effective_linear_weight(module).detach().to(torch.float64)


def _linear_bias(module: nn.Module) -> torch.Tensor:
    """Return the bias of a (possibly adapter-wrapped) linear module as float64; zeros when it has none.

    Adapters wrap the original `nn.Linear` (PEFT's `get_base_layer()`); biases are never adapted, so the base
    layer's bias is the one applied.
    """
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    bias = getattr(base, "bias", None)
    if bias is None:
        return torch.zeros(base.weight.shape[0], dtype=torch.float64, device=base.weight.device)
    return bias.detach().to(torch.float64)


def _norm_weight(block: nn.Module, name: str, size: int, device: torch.device) -> torch.Tensor:
    """Return the elementwise scale w of the LayerNorm `name` in `block` (ones for a LayerNorm without one)."""
    norm = block.get_submodule(name)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(size, dtype=torch.float64, device=device)
    return weight.detach().to(torch.float64)


def _layer_scale(block: nn.Module, name: str | None, size: int, device: torch.device) -> torch.Tensor:
    """Return the per-channel layer scale γ named `name` in `block` as float64; ones for a family without one."""
    if name is None:
        return torch.ones(size, dtype=torch.float64, device=device)
    return block.get_parameter(name).detach().to(torch.float64)


def _centered_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Return `matrix @ C` with C = I − 11ᵀ/N, i.e. `matrix` minus its row means."""
    return matrix - matrix.mean(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# Expected Jacobians of the MLP hidden activation (J)
# ----------------------------------------------------------------------------------------------------------------


def _standard_normal_quadrature(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return nodes and weights with `sum(weights * f(nodes)) ≈ E[f(Z)]` for Z ~ N(0, 1)."""
    legendre_nodes, legendre_weights = (torch.from_numpy(array) for array in leggauss(_QUADRATURE_ORDER))
    edges = torch.linspace(-_QUADRATURE_HALF_WIDTH, _QUADRATURE_HALF_WIDTH, _QUADRATURE_PANELS + 1, dtype=dtype)
    left, right = edges[:-1, None], edges[1:, None]
    half = (right - left) / 2
    nodes = ((left + right) / 2 + half * legendre_nodes.to(dtype)).flatten()
    density = torch.exp(-0.5 * nodes**2) / math.sqrt(2 * math.pi)
    weights = (half * legendre_weights.to(dtype)).flatten() * density
    return nodes.to(device), weights.to(device)


def gaussian_expectation(
    function: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Return E[function(Z_j)] for independent Z_j ~ N(mean_j, std_j²), one value per entry of `mean`.

    `function` is applied elementwise to a [len(mean), num_nodes] tensor of quadrature points, so the expectation is
    vectorized over all hidden units at once. Accurate to ~1e-12 for smooth functions while std ≤ 30.
    """
    nodes, weights = _standard_normal_quadrature(mean.dtype, mean.device)
    points = mean[:, None] + std[:, None] * nodes[None, :]
    return function(points) @ weights


def expected_gelu_derivative(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Return E[gelu′(z)] for z ~ N(mean, std²), gelu(z) = z·Φ(z) (exact, erf-based GELU), in closed form.

    With t = mean / √(1 + std²): E[gelu′(z)] = Φ(t) + mean · φ(t) / (1 + std²)^{3/2}. By Stein's lemma, row j of the
    expected Jacobian of gelu(W x + b) under x ~ N(0, I) is this value (mean = b_j, std = ‖w_j‖) times w_jᵀ.
    """
    variance = 1.0 + std**2
    t = mean / torch.sqrt(variance)
    density = torch.exp(-0.5 * t**2) / math.sqrt(2 * math.pi)
    return torch.special.ndtr(t) + mean * density / variance**1.5


def _activation_derivative(activation: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function computing activation′ elementwise (by autograd, so it works for any `ACT2FN` entry)."""

    def derivative(points: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            inputs = points.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(activation(inputs).sum(), inputs)
        return gradient

    return derivative


def expected_activation_jacobian(weight: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """Return E[∂ act(W x + b) / ∂x] for x ~ N(0, I): an [M, N] matrix (M hidden units, N inputs).

    Row j is E[act′(z_j)] · w_jᵀ with z_j ~ N(b_j, ‖w_j‖²) (Stein's lemma). The one-dimensional expectation is the
    closed form of `expected_gelu_derivative` for the exact GELU and a quadrature (derivative by autograd) for any
    other `transformers.activations.ACT2FN` name, e.g. "gelu_new", "quick_gelu" or "relu".
    """
    mean, std = bias, weight.norm(dim=1)
    if activation in EXACT_GELU_ACTIVATIONS:
        slope = expected_gelu_derivative(mean, std)
    else:
        slope = gaussian_expectation(_activation_derivative(ACT2FN[activation]), mean, std)
    return slope[:, None] * weight


def _silu_derivative(points: torch.Tensor) -> torch.Tensor:
    """silu′(z) = σ(z) · (1 + z · (1 − σ(z)))."""
    sigmoid = torch.sigmoid(points)
    return sigmoid * (1 + points * (1 - sigmoid))


def _derivative_of(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the elementwise derivative of the `ACT2FN` activation `activation`: closed form for silu, autograd
    for any other."""
    if activation == "silu":
        return _silu_derivative
    return _activation_derivative(ACT2FN[activation])


def expected_gated_jacobian(
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Return E[∂ (act(G x + a) ⊙ (H x + c)) / ∂x] for x ~ N(0, I): an [M, N] matrix (M hidden units, N inputs).

    `activation` is the gate's `transformers.activations.ACT2FN` name: "silu" for DINOv2's SwiGLU, the config's
    `hidden_act` for DINOv3's gated MLP. For unit j with z₁ = g·x + a and z₂ = h·x + c, the row is
    E[act′(z₁) z₂] · gᵀ + E[act(z₁)] · hᵀ, and since E[z₂ | z₁] = c + (g·h / ‖g‖²)(z₁ − a),
    E[act′(z₁) z₂] = c · E[act′(z₁)] + (g·h / ‖g‖²) · E[act′(z₁)(z₁ − a)]. All three are one-dimensional
    expectations over z₁ ~ N(a, ‖g‖²), computed by quadrature for all units at once (act′ in closed form for silu,
    by autograd otherwise).
    """
    function, derivative = ACT2FN[activation], _derivative_of(activation)
    gate_norm_sq = (gate_weight**2).sum(dim=1)
    gate_std = gate_norm_sq.sqrt()
    mean_slope = gaussian_expectation(derivative, gate_bias, gate_std)
    # E[act′(z₁)(z₁ − a)]: the quadrature points minus the mean are std · node.
    mean_slope_times_offset = gaussian_expectation(
        lambda points: derivative(points) * (points - gate_bias[:, None]), gate_bias, gate_std
    )
    mean_value = gaussian_expectation(function, gate_bias, gate_std)
    overlap = (gate_weight * up_weight).sum(dim=1)
    regression = torch.where(
        gate_norm_sq > 0, overlap / gate_norm_sq.clamp_min(torch.finfo(gate_weight.dtype).tiny), 0
    )
    gate_coefficient = up_bias * mean_slope + regression * mean_slope_times_offset
    return gate_coefficient[:, None] * gate_weight + mean_value[:, None] * up_weight


def expected_swiglu_jacobian(
    gate_weight: torch.Tensor, gate_bias: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor
) -> torch.Tensor:
    """Return E[∂ (silu(G x + a) ⊙ (H x + c)) / ∂x] for x ~ N(0, I): `expected_gated_jacobian` with silu, the
    SwiGLU MLP of DINOv2 ViT-g."""
    return expected_gated_jacobian(gate_weight, gate_bias, up_weight, up_bias, "silu")


def _mlp_input_parameters(
    block: nn.Module, block_description: BlockDescription
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return (weight, bias) in float64 of each MLP input projection, in the order of `MlpDescription`."""
    mlp = block.get_submodule(block_description.mlp_prefix)
    parameters = []
    for name in block_description.mlp.input_projections:
        projection = mlp.get_submodule(name)
        parameters.append((_linear_weight(projection), _linear_bias(projection)))
    return parameters


def _hidden_activation(
    block_description: BlockDescription, parameters: list[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the map from MLP input to MLP hidden activation (the input of the output projection), in float64."""
    activation = ACT2FN[block_description.mlp.activation]
    if block_description.mlp.kind == "gated":
        (gate_weight, gate_bias), (up_weight, up_bias) = parameters

        def gated(inputs: torch.Tensor) -> torch.Tensor:
            gate = nn.functional.linear(inputs, gate_weight, gate_bias)
            return activation(gate) * nn.functional.linear(inputs, up_weight, up_bias)

        return gated
    ((weight, bias),) = parameters

    def plain(inputs: torch.Tensor) -> torch.Tensor:
        return activation(nn.functional.linear(inputs, weight, bias))

    return plain


def sampled_mlp_jacobian(
    block: nn.Module,
    description: ArchitectureDescription | BlockDescription,
    *,
    num_samples: int = 100_000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return J fitted as in the reference implementation: least squares from x ~ N(0, I) to the hidden activation.

    Draws `num_samples` inputs, evaluates the MLP hidden activation (biases included) and solves the least-squares
    problem on [x, 1] (slope plus intercept) through its normal equations, accumulated in float64 over chunks of
    samples so memory stays bounded. Returns the slope, an [M, N] matrix; it converges to the expected Jacobian of
    `expected_mlp_jacobian` as num_samples grows (Stein's lemma), with O(1/√num_samples) noise.
    """
    block_description = _block_description(description)
    parameters = _mlp_input_parameters(block, block_description)
    hidden = _hidden_activation(block_description, parameters)
    weight = parameters[0][0]
    num_inputs, device = weight.shape[1], weight.device
    if num_samples <= num_inputs + 1:
        raise ValueError(f"num_samples must exceed the input width + 1 ({num_inputs + 1}), got {num_samples}.")
    gram = torch.zeros(num_inputs + 1, num_inputs + 1, dtype=torch.float64, device=device)
    cross = torch.zeros(num_inputs + 1, weight.shape[0], dtype=torch.float64, device=device)
    for start in range(0, num_samples, _SAMPLING_CHUNK):
        rows = min(_SAMPLING_CHUNK, num_samples - start)
        inputs = torch.randn(rows, num_inputs, dtype=torch.float64, device=device, generator=generator)
        with_intercept = torch.cat([inputs, torch.ones(rows, 1, dtype=torch.float64, device=device)], dim=1)
        gram += with_intercept.T @ with_intercept
        cross += with_intercept.T @ hidden(inputs)
    solution = torch.linalg.solve(gram, cross)
    return solution[:num_inputs].T


def expected_mlp_jacobian(block: nn.Module, description: ArchitectureDescription | BlockDescription) -> torch.Tensor:
    """Return J in closed form: the expected Jacobian of the MLP hidden activation under x ~ N(0, I), [M, N] float64.

    Plain MLPs use `expected_activation_jacobian` (closed form for the exact GELU, quadrature for any other
    activation: CLIP's quick_gelu, SigLIP's tanh GELU...), gated ones `expected_gated_jacobian` with their gate's
    activation. This is the limit of the reference implementation's least-squares fit (`sampled_mlp_jacobian`),
    without its sampling noise and at a fraction of its cost.
    """
    block_description = _block_description(description)
    parameters = _mlp_input_parameters(block, block_description)
    if block_description.mlp.kind == "gated":
        (gate_weight, gate_bias), (up_weight, up_bias) = parameters
        return expected_gated_jacobian(gate_weight, gate_bias, up_weight, up_bias, block_description.mlp.activation)
    ((weight, bias),) = parameters
    return expected_activation_jacobian(weight, bias, block_description.mlp.activation)


# ----------------------------------------------------------------------------------------------------------------
# Linearized blocks and defect directions
# ----------------------------------------------------------------------------------------------------------------


def linearized_attention(block: nn.Module, description: ArchitectureDescription | BlockDescription) -> torch.Tensor:
    """Return A_attn = I + diag(γ₁) · W_o · W_v · diag(w₁) · C, the attention sub-block through its value path.

    Returns an N×N float64 matrix (N = hidden size) on the device of the block's weights.
    """
    block_description = _block_description(description)
    value = _linear_weight(block.get_submodule(block_description.value))
    output = _linear_weight(block.get_submodule(block_description.output))
    size, device = output.shape[0], output.device
    scale = _layer_scale(block, block_description.layer_scale1, size, device)
    norm_weight = _norm_weight(block, block_description.norm1, size, device)
    update = scale[:, None] * (output @ value) * norm_weight[None, :]
    return torch.eye(size, dtype=torch.float64, device=device) + _centered_columns(update)


def linearized_mlp(
    block: nn.Module, description: ArchitectureDescription | BlockDescription, jacobian: torch.Tensor
) -> torch.Tensor:
    """Return A_mlp = I + diag(γ₂) · W_out · J · diag(w₂) · C for a given hidden-activation Jacobian J ([M, N]).

    Returns an N×N float64 matrix on the device of the block's weights.
    """
    block_description = _block_description(description)
    output = _linear_weight(
        block.get_submodule(block_description.mlp_prefix).get_submodule(block_description.mlp.output_projection)
    )
    size, device = output.shape[0], output.device
    scale = _layer_scale(block, block_description.layer_scale2, size, device)
    norm_weight = _norm_weight(block, block_description.norm2, size, device)
    update = scale[:, None] * (output @ jacobian.to(torch.float64)) * norm_weight[None, :]
    return torch.eye(size, dtype=torch.float64, device=device) + _centered_columns(update)


def linearized_block(
    block: nn.Module,
    description: ArchitectureDescription | BlockDescription,
    *,
    method: DirectionMethod = "exact",
    num_samples: int = 100_000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return B_l = A_mlp · A_attn, the linearization of one block (docs/method.md §1): an N×N float64 matrix.

    Args:
        block: one transformer block (`get_blocks(model)[l]`), possibly with adapter-wrapped projections.
        description: the model's `ArchitectureDescription` (or just its `BlockDescription`).
        method: "exact" uses the closed-form expected Jacobian J; "sampling" fits J by least squares on
            `num_samples` Gaussian inputs drawn from `generator`, as the reference implementation does.
    """
    if method == "exact":
        jacobian = expected_mlp_jacobian(block, description)
    elif method == "sampling":
        jacobian = sampled_mlp_jacobian(block, description, num_samples=num_samples, generator=generator)
    else:
        raise ValueError(f"method must be 'exact' or 'sampling', got {method!r}.")
    return linearized_mlp(block, description, jacobian) @ linearized_attention(block, description)


def leading_left_singular_vector(matrix: torch.Tensor) -> torch.Tensor:
    """Return the first left singular vector of `matrix` (unit norm, same dtype), largest-|entry| made positive."""
    left, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    vector = left[:, 0]
    return vector * torch.sign(vector[vector.abs().argmax()])


def singular_defect_directions(
    model: nn.Module,
    *,
    method: DirectionMethod = "exact",
    num_samples: int = 100_000,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Return the singular defect direction of every layer: the leading left singular vector of P_l = B_l ··· B_1.

    Args:
        model: a model of a supported ViT family (its backbone, a task model or a whole model holding one, a PEFT
            model wrapping any of these; see `tuner.architectures.unwrap_backbone`).
        method: "exact" (default) linearizes the MLPs with their closed-form expected Jacobian; "sampling"
            reproduces the reference implementation's least-squares fit on `num_samples` Gaussian inputs
            (seeded by `seed`), which converges to the same directions.
        num_samples: samples per layer for method="sampling".
        seed: seed of the sampling generator (method="sampling" only).

    Returns:
        One float32 unit vector of size hidden_size per layer, on the device of the model's weights, sign fixed so
        its largest-magnitude entry is positive (compare directions with |cos|). Directions of layers before any
        dominant singular value emerges are valid but not meaningful.
    """
    backbone = unwrap_backbone(model)
    description = describe_config(backbone.config)
    blocks = backbone.get_submodule(description.layers)
    device = next(backbone.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if method == "sampling" else None
    accumulated = torch.eye(description.hidden_size, dtype=torch.float64, device=device)
    directions = []
    for block in blocks:
        step = linearized_block(block, description, method=method, num_samples=num_samples, generator=generator)
        accumulated = step @ accumulated
        # Rescaling changes no singular vector and keeps deep products from overflowing.
        accumulated = accumulated / accumulated.norm()
        directions.append(leading_left_singular_vector(accumulated).to(torch.float32))
    logger.debug("Computed %d singular defect directions (method=%s).", len(directions), method)
    return directions
