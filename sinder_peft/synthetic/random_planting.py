"""Harder planted models: a DINOv2 at transformers' random initialization (`initializer_range` 0.02) with a defect
written into one block, by a trigger unit the weights' linearization sees (`build_random_planted_dinov2`) or by a
sparse unit it does not see (`build_sparse_unit_dinov2`, docs/method.md §9)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from ..analysis.directions import singular_defect_directions
from ..tuner.architectures import ImageNormalization
from .demo import BRIGHTNESS_LEVEL
from .planting import PlantedModel, brightness_threshold, reserved_directions
from .tiny_models import MLP_RATIO, NUM_HEADS, tiny_image_processor

# Scales of `build_random_planted_dinov2`: the brightness gain, the trigger unit's read and write norms.
_HARD_BRIGHTNESS_GAIN = 4.0
_HARD_READ_GAIN = 10.0
_HARD_WRITE_GAIN = 128.0

# Scales of `build_random_planted_dinov2(long_input=True)`: brightness measured from a mid grey, so that the white
# patches of `generate_block_image` pictures are long from the patch embedding on; the unit fires where the normed
# token's d-coordinate exceeds 30 / 10 = 3 (about 6.6 on white patches, about 0 on the grey ones).
_LONG_INPUT_LEVEL = 0.5
_LONG_INPUT_BRIGHTNESS_GAIN = 8.0
_LONG_INPUT_THRESHOLD = 30.0

# Scales of `build_sparse_unit_dinov2`: the unit fires where the normed token's d-coordinate exceeds 60 / 10 = 6.
_SPARSE_BRIGHTNESS_GAIN = 16.0
_SPARSE_READ_GAIN = 10.0
_SPARSE_THRESHOLD = 60.0
_SPARSE_WRITE_GAIN = 400.0


def _random_dinov2_with_brightness(
    seed: int,
    num_layers: int,
    swiglu: bool,
    hidden_size: int,
    brightness_gain: float,
    level: float = BRIGHTNESS_LEVEL,
) -> tuple[transformers.Dinov2Model, torch.Tensor, torch.Tensor]:
    """Return a DINOv2 at transformers' random initialization (`initializer_range` 0.02, layer scale 1) whose patch
    embedding writes `brightness_gain` · (mean normalized pixel value − threshold) along a random unit direction d
    (its filters' own response along d projected out), the threshold being a uniform grey of `level`, with d and a
    second random unit direction u ⊥ d."""
    config = transformers.Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=MLP_RATIO,
        image_size=224,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        initializer_range=0.02,
        hidden_act="gelu",
        layerscale_value=1.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        model = transformers.Dinov2Model(config)
    generator = torch.Generator().manual_seed(20_000 + seed)
    brightness, defect = reserved_directions(hidden_size, 2, generator)
    with torch.no_grad():
        projection = model.embeddings.patch_embeddings.projection
        flat = projection.weight.reshape(hidden_size, -1)
        flat = flat - torch.outer(brightness, brightness @ flat)
        flat = flat + torch.outer(brightness, torch.full((flat.shape[1],), brightness_gain / flat.shape[1]))
        projection.weight.copy_(flat.reshape(projection.weight.shape))
        bias = projection.bias - brightness * (brightness @ projection.bias)
        threshold = brightness_threshold(ImageNormalization(), level)
        projection.bias.copy_(bias - brightness_gain * threshold * brightness)
    return model, brightness, defect


def _middle_layer(num_layers: int, defect_layer: int | None) -> int:
    """Return `defect_layer`, or the middle block `num_layers // 2` when it is None, checked against the depth."""
    layer = num_layers // 2 if defect_layer is None else defect_layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"defect_layer must be in [0, {num_layers}), got {defect_layer}.")
    return layer


def _random_planted_model(
    model: transformers.Dinov2Model, swiglu: bool, defect: torch.Tensor, brightness: torch.Tensor, layer: int
) -> PlantedModel:
    """Return the `PlantedModel` of a random DINOv2 planted at block `layer` (ImageNet normalization, patch 14)."""
    return PlantedModel(
        model=model.eval(),
        family="dinov2_swiglu" if swiglu else "dinov2",
        direction=defect,
        brightness_direction=brightness,
        defect_layer=layer,
        normalization=ImageNormalization(),
        image_processor=tiny_image_processor("dinov2", 14, 224),
        patch_size=14,
    )


def _set_trigger_unit(
    model: transformers.Dinov2Model, layer: int, swiglu: bool, read: torch.Tensor, bias: float, write: torch.Tensor
) -> None:
    """Make MLP hidden unit 0 of block `layer` compute act(read · x + bias) and write it along `write` (SwiGLU: its
    up row zero with bias 1, so that the unit computes silu(read · x + bias))."""
    mlp = model.encoder.layer[layer].mlp
    gate, output = (mlp.gate_proj, mlp.down_proj) if swiglu else (mlp.fc1, mlp.fc2)
    with torch.no_grad():
        gate.weight[0] = read
        gate.bias[0] = bias
        if swiglu:
            mlp.up_proj.weight[0] = 0.0
            mlp.up_proj.bias[0] = 1.0
        output.weight[:, 0] = write


def build_random_planted_dinov2(
    *,
    seed: int = 0,
    num_layers: int = 6,
    swiglu: bool = False,
    hidden_size: int = 96,
    defect_layer: int | None = None,
    long_input: bool = False,
) -> PlantedModel:
    """Build a *harder* planted-defect DINOv2: every weight at transformers' own random initialization
    (`initializer_range` 0.02, layer scale 1), and one trigger unit in a middle block.

    Unlike `build_planted_model` (blocks up to the defect are the identity), nothing is zeroed or reserved: the
    patch embedding writes the brightness feature along a random direction d (its filters' own response along d
    projected out, gain `_HARD_BRIGHTNESS_GAIN`), and hidden unit 0 of block `defect_layer` (default: the middle
    one, `num_layers // 2`) reads `_HARD_READ_GAIN`·d and writes `_HARD_WRITE_GAIN`·u (SwiGLU: its up row zero with
    bias 1, so the unit computes silu(κ d·x)). Its output column becomes by far the largest singular value of that
    block's output projection, and the last-layer max/median norm of `generate_demo_image` pictures is in the
    hundreds. The repair has many ways here to make its loss small (steering the bright tokens upstream), which
    is where the paper's additive shifts move clean tokens and the `preserve` recipe does not (docs/method.md §7).

    With `long_input`, the trigger patches are long *before* any block, as an input feature of the image: the
    embedding measures brightness from a mid grey (`_LONG_INPUT_LEVEL`, gain `_LONG_INPUT_BRIGHTNESS_GAIN`), so on
    `generate_block_image` pictures (flat grey, white blocks) the white patches are at 4-8× their image's median norm
    from the embedding on, and the unit, with bias −`_LONG_INPUT_THRESHOLD`, fires on them only and takes them to
    hundreds of times the median at block `defect_layer`: where the defect is born (docs/method.md §2).

    Returns:
        A `PlantedModel` (family "dinov2" or "dinov2_swiglu", ImageNet normalization, patch 14, 224 px).
    """
    layer = _middle_layer(num_layers, defect_layer)
    if long_input:
        gain, level, bias = _LONG_INPUT_BRIGHTNESS_GAIN, _LONG_INPUT_LEVEL, -_LONG_INPUT_THRESHOLD
    else:
        gain, level, bias = _HARD_BRIGHTNESS_GAIN, BRIGHTNESS_LEVEL, 0.0
    model, brightness, defect = _random_dinov2_with_brightness(seed, num_layers, swiglu, hidden_size, gain, level)
    _set_trigger_unit(model, layer, swiglu, _HARD_READ_GAIN * brightness, bias, _HARD_WRITE_GAIN * defect)
    return _random_planted_model(model, swiglu, defect, brightness, layer)


def build_sparse_unit_dinov2(
    *,
    seed: int = 0,
    num_layers: int = 8,
    swiglu: bool = False,
    hidden_size: int = 96,
    defect_layer: int | None = None,
    with_unit: bool = True,
) -> PlantedModel:
    """Build a random DINOv2 whose defect comes from a *sparse* unit that the weights' linearization does not see
    (a "register neuron", docs/method.md §9).

    Every weight is at transformers' random initialization (0.02, layer scale 1); the patch embedding writes
    brightness along d with gain `_SPARSE_BRIGHTNESS_GAIN` (so that on bright patches d dominates the normed token),
    and hidden unit 0 of block `defect_layer` (default `num_layers // 2`) computes act(`_SPARSE_READ_GAIN` · d·x −
    `_SPARSE_THRESHOLD`) and writes it along u with gain `_SPARSE_WRITE_GAIN`. The unit fires only on the patches
    of `generate_demo_image`'s white spots (1-3 % of them) and makes their last-layer norm about 90 times the median;
    but under the linearization's N(0, I) inputs it is almost never active (slope Φ(−6) ≈ 1e-9), so it adds nothing
    to the linear maps, and u is drawn orthogonal to d and to every weights' direction of the model without the
    unit: the weights' directions do not explain the high-norm tokens (|cos| near 0).

    Args:
        with_unit: False gives the same model without the unit: the reference a repair should come back to.

    Returns:
        A `PlantedModel` (family "dinov2" or "dinov2_swiglu", ImageNet normalization, patch 14, 224 px).
    """
    layer = _middle_layer(num_layers, defect_layer)
    model, brightness, candidate = _random_dinov2_with_brightness(
        seed, num_layers, swiglu, hidden_size, _SPARSE_BRIGHTNESS_GAIN
    )
    avoided = torch.linalg.qr(torch.stack([brightness, *singular_defect_directions(model)]).T.double()).Q.float()
    defect = nn.functional.normalize(candidate - avoided @ (avoided.T @ candidate), dim=0)
    if with_unit:
        read, write = _SPARSE_READ_GAIN * brightness, _SPARSE_WRITE_GAIN * defect
        _set_trigger_unit(model, layer, swiglu, read, -_SPARSE_THRESHOLD, write)
    return _random_planted_model(model, swiglu, defect, brightness, layer)
