"""Singular defect directions (docs/method.md §1) and defect-token detection (docs/method.md §2).

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from numpy.polynomial.legendre import leggauss
from torch import nn
from transformers.activations import ACT2FN

from .architectures import ArchitectureDescription, BlockDescription, describe_config, unwrap_backbone
from .direction_sources import (
    HIGH_NORM_FACTOR,
    MAX_DIRECTION_TOKENS,
    DefectDirections,
    DirectionSource,
    LayerDirection,
    choose_direction,
    high_norm_token_mask,
)
from .layer import effective_linear_weight

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
            model wrapping any of these; see `architectures.unwrap_backbone`).
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


# ----------------------------------------------------------------------------------------------------------------
# Defect tokens
# ----------------------------------------------------------------------------------------------------------------


def direction_cosines(patch_tokens: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Return |cos(token, direction)| for every token: `patch_tokens` [..., C] and `direction` [C] give [...].

    The absolute value makes the result independent of the arbitrary sign of the direction.
    """
    tokens = nn.functional.normalize(patch_tokens, dim=-1)
    unit = nn.functional.normalize(direction.to(device=patch_tokens.device, dtype=patch_tokens.dtype), dim=0)
    return (tokens @ unit).abs()


def defect_token_mask(cosines: torch.Tensor, mask_thr: float = 4.0, border: int = 1) -> torch.Tensor:
    """Return the defect-token mask of each patch grid: True where c > mean(c) + mask_thr · std(c).

    `cosines` is [..., H, W] (e.g. [B, H, W]); the statistics are taken per grid (per image, and per layer when
    there is a layer axis) over *all* H·W tokens, border included, with the unbiased standard deviation — exactly
    as the reference implementation does. Tokens in the border ring of
    width `border` are never flagged, since the smoothing window of the loss does not fit around them.

    Returns:
        A bool tensor shaped like `cosines`.
    """
    if border < 0:
        raise ValueError(f"border must be non-negative, got {border}.")
    flat = cosines.flatten(-2)
    mean = flat.mean(dim=-1)[..., None, None]
    std = flat.std(dim=-1)[..., None, None]
    mask = cosines > mean + mask_thr * std
    if border > 0:
        interior = torch.zeros_like(mask)
        interior[..., border:-border, border:-border] = True
        mask = mask & interior
    return mask


DEFECT_NORM_GAP = 4.0
"""A flagged image counts as defective in reports when a flagged token reaches this many times the median norm."""


@dataclass(frozen=True, eq=False)
class DefectAnalysis:
    """Defect statistics of a batch of images, per layer (layers indexed from 0 = output of the first block).

    All tensors are float32/bool/int64 on the CPU. Token features are the outputs of each block, *before* the final
    LayerNorm, restricted to the patch grid (CLS, register and distillation tokens are left out).

    Attributes:
        grid_size: (H, W), the patch grid.
        directions: [L, C] the defect directions the cosines were measured against.
        cosines: [B, L, H, W] |cos(token, direction of its layer)|.
        masks: [B, L, H, W] flagged defect tokens per layer (`defect_token_mask`).
        first_defective_layer: [B] the first layer with at least `min_tokens` flagged tokens; −1 when there is none.
        token_norms: [B, L, H, W] Euclidean norm of every patch token.
        max_median_norm_ratio: [B, L] largest over median patch-token norm (median: the lower middle value for an
            even count, as `torch.median`).
        high_norm_share: [B, L] share of patch tokens whose norm exceeds `norm_threshold`, or, when that is None,
            4 × the median patch-token norm of the same image and layer.
        last_patch_features: [B, H, W, C] the last block's patch tokens before the final LayerNorm (for PCA maps).
        mask_thr: the outlier threshold k used for the masks.
        min_tokens: the flag count from which a layer counts as defective.
        kernel: the loss window; flags are never placed in the border ring of width kernel // 2.
        norm_threshold: the absolute norm threshold of `high_norm_share`, or None for the relative default.
        defect_directions: where each layer's direction came from (`direction_sources.DefectDirections`).
        weights_cosines: [B, L, H, W] |cos(token, the weights' direction of its layer)|, equal to `cosines` at the
            layers whose direction is the weights'.
    """

    grid_size: tuple[int, int]
    directions: torch.Tensor
    cosines: torch.Tensor
    masks: torch.Tensor
    first_defective_layer: torch.Tensor
    token_norms: torch.Tensor
    max_median_norm_ratio: torch.Tensor
    high_norm_share: torch.Tensor
    last_patch_features: torch.Tensor
    mask_thr: float
    min_tokens: int
    kernel: int
    norm_threshold: float | None
    defect_directions: DefectDirections
    weights_cosines: torch.Tensor

    @property
    def num_images(self) -> int:
        """Number of images analysed."""
        return self.masks.shape[0]

    @property
    def num_layers(self) -> int:
        """Number of layers analysed."""
        return self.masks.shape[1]

    @property
    def defect_token_counts(self) -> torch.Tensor:
        """[B, L] number of flagged tokens per image and layer."""
        return self.masks.flatten(2).sum(dim=-1)

    @property
    def high_norm_masks(self) -> torch.Tensor:
        """[B, L, H, W] the high-norm tokens: a norm at least `HIGH_NORM_FACTOR` times the image's median at that
        layer (`direction_sources.high_norm_token_mask`), border included."""
        return high_norm_token_mask(self.token_norms)

    @property
    def high_norm_counts(self) -> torch.Tensor:
        """[B, L] number of high-norm tokens per image and layer."""
        return self.high_norm_masks.flatten(2).sum(dim=-1)

    def high_norm_weights_cosines(self) -> list[float | None]:
        """Return, per layer, the mean |cos| between the high-norm tokens of all analysed images and the weights'
        direction of that layer (None where there is none): how well the weights' theory explains them."""
        masks = self.high_norm_masks
        values: list[float | None] = []
        for layer in range(self.num_layers):
            selected = self.weights_cosines[:, layer][masks[:, layer]]
            values.append(float(selected.double().mean()) if selected.numel() else None)
        return values

    def high_norm_layers(self) -> list[int]:
        """Return the layers at which some analysed image has a high-norm token."""
        return torch.nonzero(self.high_norm_counts.sum(dim=0) > 0).flatten().tolist()

    def high_norm_defects(self, norm_gap: float = DEFECT_NORM_GAP) -> torch.Tensor:
        """Return, bool [B], which images have a defect that is also a real norm outlier.

        The cosine test flags the `mask_thr`-sigma outliers of |cos| in every image, even when no token stands out
        in norm (after a repair the norms are flat, and a 4-sigma cosine outlier is then chance). An image counts
        here when it has a defective layer l and one of the tokens flagged there reaches `norm_gap` times the median
        patch-token norm of its image, at layer l or at a later one (defect tokens keep their grid position and
        grow with depth).
        """
        result = torch.zeros(self.num_images, dtype=torch.bool)
        median = self.token_norms.flatten(2).median(dim=-1).values  # [B, L]
        for image, layer in enumerate(self.first_defective_layer.tolist()):
            if layer < 0:
                continue
            flagged = self.masks[image, layer]  # [H, W]
            ratios = self.token_norms[image, layer:][:, flagged] / median[image, layer:, None]
            result[image] = bool((ratios >= norm_gap).any())
        return result

    def to_dict(self) -> dict[str, Any]:
        """Return the settings and per-image numbers as plain JSON-serializable Python values.

        Each image gets its first defective layer, the flagged-token count, max/median norm ratio and high-norm
        share of every layer, and the (row, column) positions of the tokens flagged at its first defective layer.
        """
        counts = self.defect_token_counts
        high_norm_counts = self.high_norm_counts
        images = []
        for index in range(self.num_images):
            layer = int(self.first_defective_layer[index])
            positions = torch.nonzero(self.masks[index, layer]).tolist() if layer >= 0 else []
            images.append(
                {
                    "first_defective_layer": layer,
                    "defect_tokens_at_first_defective_layer": positions,
                    "num_defect_tokens": counts[index].tolist(),
                    "max_median_norm_ratio": self.max_median_norm_ratio[index].tolist(),
                    "high_norm_share": self.high_norm_share[index].tolist(),
                    "num_high_norm_tokens": high_norm_counts[index].tolist(),
                }
            )
        return {
            "grid_size": list(self.grid_size),
            "num_layers": self.num_layers,
            "mask_thr": self.mask_thr,
            "min_tokens": self.min_tokens,
            "kernel": self.kernel,
            "norm_threshold": self.norm_threshold,
            "high_norm_factor": HIGH_NORM_FACTOR,
            "high_norm_weights_cosine": self.high_norm_weights_cosines(),
            "directions": self.defect_directions.to_dict(),
            "images": images,
        }


def patch_grid(
    hidden_states: torch.Tensor, description: ArchitectureDescription, height: int, width: int
) -> torch.Tensor:
    """Return the patch tokens of a block output `hidden_states` [B, T, C] as a float32 grid [B, H, W, C].

    The prefix tokens (`description.num_prefix_tokens`: CLS, registers, distillation token; none for SigLIP) come
    first in the sequence and are left out; the patches follow in row-major order.
    """
    patches = hidden_states[:, description.num_prefix_tokens :]
    return patches.float().reshape(hidden_states.shape[0], height, width, -1)


def patch_grid_size(pixel_values: torch.Tensor, patch_size: int, kernel: int = 3) -> tuple[int, int]:
    """Return the patch grid (H, W) of `pixel_values` [B, channels, height, width].

    Raises:
        ValueError: if the tensor is not 4-D, its height or width is not a multiple of `patch_size`, or the grid is
            smaller than 3×3 patches (or than the kernel), leaving no interior token to flag.
    """
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}."
        )
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image height and width must be multiples of the patch size {patch_size}, got {height}×{width}. "
            "Resize or crop the images (e.g. to 224 or 518 pixels)."
        )
    grid = (height // patch_size, width // patch_size)
    smallest = max(3, 2 * (kernel // 2) + 1)
    if min(grid) < smallest:
        raise ValueError(
            f"Images of {height}×{width} pixels give a {grid[0]}×{grid[1]} patch grid; defect detection needs at "
            f"least {smallest}×{smallest} patches ({smallest * patch_size}×{smallest * patch_size} pixels)."
        )
    return grid


def _weights_direction_matrix(
    backbone: nn.Module, description: ArchitectureDescription, directions: list[torch.Tensor] | torch.Tensor | None
) -> torch.Tensor:
    """Return the weights' directions as an [L, C] tensor: `directions` when given (checked), else computed."""
    if directions is None:
        directions = singular_defect_directions(backbone)
    matrix = torch.stack(list(directions)) if not isinstance(directions, torch.Tensor) else directions
    expected_shape = (description.num_layers, description.hidden_size)
    if tuple(matrix.shape) != expected_shape:
        raise ValueError(
            f"Expected {expected_shape[0]} directions of size {expected_shape[1]}, got shape {tuple(matrix.shape)}."
        )
    return matrix.detach().float()


def _layer_patch_grids(
    backbone: nn.Module, description: ArchitectureDescription, pixel_values: torch.Tensor, height: int, width: int
) -> Iterator[torch.Tensor]:
    """Yield, block by block, the patch grid [B, H, W, C] (float32) of each block's output for `pixel_values`, with
    the description's `embed` and `run_block` under `torch.no_grad()`."""
    with torch.no_grad():
        embedded = description.embed(backbone, pixel_values)
        hidden = embedded.hidden
        for block in backbone.get_submodule(description.layers):
            hidden = description.run_block(block, hidden, embedded.block_kwargs)
            yield patch_grid(hidden, description, height, width)


def _high_norm_rows(patches: torch.Tensor, limit: int = MAX_DIRECTION_TOKENS) -> torch.Tensor:
    """Return the high-norm tokens of a patch grid [B, H, W, C] as rows [n, C] (at most `limit`, the first ones)."""
    return patches[high_norm_token_mask(patches.norm(dim=-1))][:limit]


def estimate_defect_directions(
    model: nn.Module,
    images: Iterable[torch.Tensor],
    source: DirectionSource = "auto",
    directions: list[torch.Tensor] | torch.Tensor | None = None,
    *,
    min_tokens: int = 3,
) -> DefectDirections:
    """Return the defect direction of every layer of `model` chosen by `source` from the high-norm tokens of
    `images` (an iterable of normalized [B, 3, H, W] batches, of any sizes that are multiples of the patch size).

    The high-norm tokens of all batches are pooled per layer, and `direction_sources.choose_direction` picks each
    layer's direction (docs/method.md §9). `directions` are the weights' directions (computed when None). Use this
    when the analysed images do not fit one batch; `find_defect_tokens` makes the same choice inside its own pass.
    """
    backbone = unwrap_backbone(model)
    description = describe_config(backbone.config)
    weights = _weights_direction_matrix(backbone, description, directions)
    pooled: list[list[torch.Tensor]] = [[] for _ in range(description.num_layers)]
    for pixel_values in images:
        height, width = patch_grid_size(pixel_values, description.patch_size)
        for index, patches in enumerate(_layer_patch_grids(backbone, description, pixel_values, height, width)):
            kept = sum(rows.shape[0] for rows in pooled[index])
            pooled[index].append(_high_norm_rows(patches, MAX_DIRECTION_TOKENS - kept).cpu())
    layers = [
        choose_direction(torch.cat(rows), weights[index].cpu(), source, min_tokens=min_tokens)
        for index, rows in enumerate(pooled)
    ]
    return DefectDirections.from_layers(layers, weights, source)


def find_defect_tokens(
    model: nn.Module,
    pixel_values: torch.Tensor,
    directions: DefectDirections | list[torch.Tensor] | torch.Tensor | None = None,
    *,
    direction_source: DirectionSource = "auto",
    mask_thr: float = 4.0,
    min_tokens: int = 3,
    kernel: int = 3,
    norm_threshold: float | None = None,
) -> DefectAnalysis:
    """Run the model block by block on `pixel_values` and report its defect tokens at every layer (docs/method.md §2).

    The embeddings and each block are run under `torch.no_grad()` with the description's `embed` and `run_block`
    (the full forward is not called, so the output of every block is seen before the final LayerNorm), at any image
    size that is a multiple of the patch size. The model runs in its current mode: call `model.eval()` first for
    deterministic results (a DINOv3 backbone in train mode is refused, see `ArchitectureDescription.embed`).

    Each layer's direction is chosen in the same pass (`direction_sources.choose_direction`, from the high-norm
    tokens of this batch at that layer), unless `directions` is a `DefectDirections`, which is used as it is.

    Args:
        model: a model of a supported family in any form `unwrap_backbone` accepts.
        pixel_values: [B, 3, height, width] normalized images; height and width multiples of the patch size.
        directions: the weights' directions, one per layer (computed with `singular_defect_directions(model)` when
            None), or a `DefectDirections` already chosen (e.g. on a repair's selection sample).
        direction_source: "weights", "data" or "auto" (docs/method.md §9); ignored when `directions` is a
            `DefectDirections`.
        mask_thr: outlier threshold k of `defect_token_mask`.
        min_tokens: a layer is defective for an image when at least this many tokens are flagged; a layer needs as
            many high-norm tokens for a data direction.
        kernel: the loss window size; tokens in the border ring of width kernel // 2 are never flagged.
        norm_threshold: absolute norm above which a token counts in `high_norm_share`; None means 4 × the median
            norm of the same image and layer.

    Returns:
        A `DefectAnalysis` with every tensor on the CPU.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number, got {kernel}.")
    backbone = unwrap_backbone(model)
    description = describe_config(backbone.config)
    height, width = patch_grid_size(pixel_values, description.patch_size, kernel)
    chosen = directions if isinstance(directions, DefectDirections) else None
    weights = _weights_direction_matrix(
        backbone, description, chosen.weights_directions if chosen is not None else directions
    )
    batch = pixel_values.shape[0]
    cosines, weights_cosines, norms, layers = [], [], [], []
    for index, patches in enumerate(_layer_patch_grids(backbone, description, pixel_values, height, width)):
        if chosen is None:
            layer = choose_direction(_high_norm_rows(patches), weights[index], direction_source, min_tokens=min_tokens)
        else:
            layer = LayerDirection(
                chosen.directions[index],
                chosen.sources[index],
                chosen.weights_cosines[index],
                chosen.high_norm_tokens[index],
            )
        layers.append(layer)
        layer_cosines = direction_cosines(patches, layer.direction).cpu()
        cosines.append(layer_cosines)
        weights_cosines.append(
            layer_cosines if layer.source == "weights" else direction_cosines(patches, weights[index]).cpu()
        )
        norms.append(patches.norm(dim=-1).cpu())
    cosine_tensor = torch.stack(cosines, dim=1)
    norm_tensor = torch.stack(norms, dim=1)
    masks = defect_token_mask(cosine_tensor, mask_thr=mask_thr, border=kernel // 2)
    defective = masks.flatten(2).sum(dim=-1) >= min_tokens
    first_layer = torch.where(defective.any(dim=1), defective.int().argmax(dim=1), torch.full((batch,), -1))
    flat_norms = norm_tensor.flatten(2)
    median = flat_norms.median(dim=-1).values
    threshold = torch.full_like(median, norm_threshold) if norm_threshold is not None else 4 * median
    defect_directions = chosen or DefectDirections.from_layers(layers, weights, direction_source)
    return DefectAnalysis(
        grid_size=(height, width),
        directions=defect_directions.directions,
        cosines=cosine_tensor,
        masks=masks,
        first_defective_layer=first_layer.long(),
        token_norms=norm_tensor,
        max_median_norm_ratio=flat_norms.max(dim=-1).values / median,
        high_norm_share=(flat_norms > threshold[..., None]).float().mean(dim=-1),
        last_patch_features=patches.cpu(),
        mask_thr=mask_thr,
        min_tokens=min_tokens,
        kernel=kernel,
        norm_threshold=norm_threshold,
        defect_directions=defect_directions,
        weights_cosines=torch.stack(weights_cosines, dim=1),
    )
