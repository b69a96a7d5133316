"""A small DINOv2 with one planted singular defect, and the sample images that trigger it.

The demo model lets everything in sinder-peft run offline and in seconds, with a known answer. Three fixed
orthonormal directions of the residual stream play a role: d (brightness), u (the defect direction) and q (carried by
no token). All of them are orthogonal to the all-ones vector, so LayerNorm's centring leaves them alone.

* The patch embedding writes a *brightness* feature along d: α · (mean normalized pixel value − threshold), positive
  only for patches brighter than a light grey (`BRIGHTNESS_LEVEL`). The rest of the embedding (a random projection
  of the patch's texture, random position embeddings) avoids d and q; the position embeddings give every patch token
  a small random component along u, the natural spread any direction has in a real model.
* At block `defect_layer`, MLP hidden unit 0 reads d (GELU: an `fc1` row κ·d; SwiGLU: a `gate_proj` row κ·d and an
  `up_proj` row along q with bias 1, so the up factor is 1 on every real token) and its output column writes β·u.
  Bright patches fire it and become high-norm tokens aligned with u, as the defect tokens of a real DINOv2 are
  aligned with its singular defect direction.
* (u, e₀, β) is an exact singular triple of that block's output projection and (e₀, d, κ) of its input projection:
  shrinking either singular value — what a SINDER adapter trains — removes the defect. The linearized block has one
  large singular value (κβ/2 ≈ 25) with left vector ≈ u, so `singular_defect_directions` recovers u at and after
  `defect_layer`.
* Every other projection of the blocks up to `defect_layer` is exactly zero (those blocks are the identity apart from
  the planted units). These are the blocks the repair trains, and a zero weight is a saddle of the SINDER loss, so
  the repair can only work by shrinking the plant: it cannot, for instance, learn to shift every token's brightness.
  Blocks after `defect_layer` have small random weights that neither read nor write d, u or q.
* Before `defect_layer`, a *silent* unit per block reads q and writes along d. It never fires (no token carries q and
  gelu(0) = silu(0) = 0) but makes d the leading direction of those layers' linearization. Every token has a large,
  smoothly varying component along d, so nothing is flagged before the defect layer; with arbitrary directions there,
  a few low-norm tokens could be.

`build_demo_model()` is what `--model demo` loads; `demo_images()` are the bundled pictures.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from ..tuner.architectures import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


PATCH_SIZE = 14
DEMO_IMAGE_SIZE = 224
DEMO_IMAGE_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)

# A patch is "bright" (and fires the plant) when its mean pixel value, over pixels and channels, exceeds that of a
# uniform grey of this level (pixel values in [0, 1]). Demo backgrounds stay below BACKGROUND_MAX, spots are white.
BRIGHTNESS_LEVEL = 0.85
BACKGROUND_MAX = 0.7

# Scales of the construction (see the module docstring). On the demo images they give a last-layer max/median
# token-norm ratio of about 80–95; the defect layer's linearization has a leading singular value of about 25 against
# about 1 for the next one, so its leading left singular vector is within 0.999 |cos| of u. Read and write are
# equal so that the repair, which shrinks both by gradient descent, is well conditioned.
_BRIGHTNESS_GAIN = 2.0  # α: d-component per unit of normalized brightness above the threshold
_PLANT_READ = 7.0  # κ: norm of the planted input row (fc1 / gate_proj), along d
_PLANT_WRITE = 7.0  # β: norm of the planted output column (fc2 / down_proj), along u
_PLANT_UP_READ = 1.0  # SwiGLU only: norm of the planted up_proj row, along q (no token carries q)
_PLANT_UP_BIAS = 1.0  # SwiGLU only: bias of the planted up_proj row: the up factor is 1 on every real token
_SILENT_READ = 1.0  # norm of the silent units' input rows, along q
_SILENT_WRITE = 10.0  # norm of the silent units' output columns, along d
_WEIGHT_STD = 0.02  # std of the random projection weights of the blocks after the defect layer
_BIAS_STD = 0.02  # std of their random biases (and of the patch-embedding bias)
_EMBEDDING_STD = 0.004  # std of the random part of the patch embedding (per pixel weight)
_TOKEN_STD = 0.1  # std of position embeddings, CLS and register tokens
_DEFECT_SPREAD = 0.3  # std of the position embeddings' component along u


@dataclass
class PlantedDefectModel:
    """A DINOv2 with one planted defect, and the ground truth about it.

    Attributes:
        model: the `Dinov2Model` (or `Dinov2WithRegistersModel`), float32, in eval mode.
        direction: u, the unit defect direction written by the planted unit (hidden_size,).
        brightness_direction: d, the unit direction along which the patch embedding writes brightness.
        defect_layer: index of the block holding the planted unit (0-based, as `DefectAnalysis` counts layers).
        planted_unit: index of the planted hidden unit in that block's MLP.
    """

    model: Dinov2Model | Dinov2WithRegistersModel
    direction: torch.Tensor
    brightness_direction: torch.Tensor
    defect_layer: int
    planted_unit: int

    def planted_positions(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return the ground-truth defect patches of normalized images [B, 3, H·14, W·14] as a bool [B, H, W].

        A patch is a defect exactly when its brightness feature is positive, i.e. its mean normalized pixel value
        (over its pixels and channels) exceeds that of a uniform grey of level `BRIGHTNESS_LEVEL`.
        """
        patch_size = self.model.config.patch_size
        brightness = torch.nn.functional.avg_pool2d(pixel_values.float().mean(dim=1, keepdim=True), patch_size)
        return brightness[:, 0] > brightness_threshold()


def brightness_threshold() -> float:
    """Return the normalized brightness (mean over channels) of a uniform grey of level `BRIGHTNESS_LEVEL`."""
    return sum((BRIGHTNESS_LEVEL - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)) / 3


def _reserved_directions(size: int, generator: torch.Generator) -> torch.Tensor:
    """Return three random orthonormal rows (d, u, q), all orthogonal to the all-ones vector (LayerNorm keeps them)."""
    basis = torch.cat([torch.ones(size, 1), torch.randn(size, 3, generator=generator)], dim=1)
    orthonormal, _ = torch.linalg.qr(basis.double())
    return orthonormal[:, 1:].T.float().contiguous()


def _random(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Return a float32 tensor of N(0, std²) entries."""
    return torch.randn(shape, generator=generator) * std


def _fill_linear(
    linear: torch.nn.Linear,
    generator: torch.Generator,
    *,
    reads_residual: bool,
    writes_residual: bool,
    projector: torch.Tensor,
) -> None:
    """Set random weights on `linear`, keeping d, u and q out of whatever side touches the residual stream."""
    weight = _random(tuple(linear.weight.shape), _WEIGHT_STD, generator)
    bias = _random(tuple(linear.bias.shape), _BIAS_STD, generator)
    if reads_residual:
        weight = weight @ projector
    if writes_residual:
        weight = projector @ weight
        bias = projector @ bias
    linear.weight.copy_(weight)
    linear.bias.copy_(bias)


def build_planted_defect_model(
    *,
    swiglu: bool = False,
    num_register_tokens: int = 0,
    hidden_size: int = 96,
    num_layers: int = 6,
    defect_layer: int = 2,
    seed: int = 0,
) -> PlantedDefectModel:
    """Build a small DINOv2 (224-px, patch 14, 4 heads, MLP ratio 4) with a planted defect at `defect_layer`.

    Args:
        swiglu: use SwiGLU MLPs (as DINOv2 ViT-g) instead of GELU ones.
        num_register_tokens: > 0 builds a `Dinov2WithRegistersModel` with that many registers.
        hidden_size: residual width; a multiple of 4 (the number of heads).
        num_layers: number of blocks.
        defect_layer: index of the block that holds the planted unit.
        seed: seed of every random weight; the same arguments always give the same model.

    Returns:
        A `PlantedDefectModel` holding the eval-mode float32 model, u, d and the defect layer.
    """
    if not 0 <= defect_layer < num_layers:
        raise ValueError(f"defect_layer must be in [0, {num_layers}), got {defect_layer}.")
    if hidden_size % 4 or hidden_size < 8:
        raise ValueError(f"hidden_size must be a multiple of 4 and at least 8, got {hidden_size}.")
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "mlp_ratio": 4,
        "image_size": DEMO_IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "use_swiglu_ffn": swiglu,
        "hidden_act": "gelu",
        "layerscale_value": 1.0,
    }
    # The models' own initialization draws from the global generator; every weight is overwritten below, so keep
    # the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        if num_register_tokens > 0:
            config = Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **common)
            model: Dinov2Model | Dinov2WithRegistersModel = Dinov2WithRegistersModel(config)
        else:
            model = Dinov2Model(Dinov2Config(**common))
    generator = torch.Generator().manual_seed(seed)
    reserved = _reserved_directions(hidden_size, generator)
    brightness, defect, silent = reserved
    projector = torch.eye(hidden_size) - reserved.T @ reserved
    with torch.no_grad():
        _set_embeddings(model, brightness, defect, projector, generator)
        for index, block in enumerate(model.encoder.layer):
            if index > defect_layer:
                _set_block(block, projector, generator)
            else:
                _clear_block(block)
            if index < defect_layer:
                _set_silent_unit(block, swiglu, silent, brightness)
        unit = _plant(model.encoder.layer[defect_layer], swiglu, brightness, defect, silent)
    model.eval()
    logger.debug(
        "Built a planted-defect model (swiglu=%s, registers=%d, defect layer %d).",
        swiglu,
        num_register_tokens,
        defect_layer,
    )
    return PlantedDefectModel(
        model=model, direction=defect, brightness_direction=brightness, defect_layer=defect_layer, planted_unit=unit
    )


def _set_embeddings(
    model: Dinov2Model | Dinov2WithRegistersModel,
    brightness: torch.Tensor,
    defect: torch.Tensor,
    projector: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Random patch embedding off span{d, u, q} plus the brightness feature along d; random CLS, registers and
    positions off span{d, u, q}, plus the positions' spread along u."""
    embeddings = model.embeddings
    projection = embeddings.patch_embeddings.projection
    hidden_size = projection.weight.shape[0]
    pixels_per_patch = projection.weight[0].numel()
    random_part = projector @ _random((hidden_size, pixels_per_patch), _EMBEDDING_STD, generator)
    # The random part ignores a patch's overall brightness, which only the brightness feature carries.
    random_part = random_part - random_part.mean(dim=1, keepdim=True)
    brightness_row = torch.full((pixels_per_patch,), _BRIGHTNESS_GAIN / pixels_per_patch)
    weight = random_part + torch.outer(brightness, brightness_row)
    projection.weight.copy_(weight.reshape(projection.weight.shape))
    bias = projector @ _random((hidden_size,), _BIAS_STD, generator)
    projection.bias.copy_(bias - _BRIGHTNESS_GAIN * brightness_threshold() * brightness)
    embeddings.cls_token.copy_(_random(tuple(embeddings.cls_token.shape), _TOKEN_STD, generator) @ projector)
    positions = _random(tuple(embeddings.position_embeddings.shape), _TOKEN_STD, generator) @ projector
    # A natural spread of the patch tokens along u, as along any direction of a real model: once the planted write
    # is repaired, the former defect tokens fall back inside this spread and stop being flagged.
    spread = _random(tuple(embeddings.position_embeddings.shape[:2]), _DEFECT_SPREAD, generator)
    embeddings.position_embeddings.copy_(positions + spread[..., None] * defect)
    registers = getattr(embeddings, "register_tokens", None)
    if registers is not None:
        registers.copy_(_random(tuple(registers.shape), _TOKEN_STD, generator) @ projector)


def _set_block(block: torch.nn.Module, projector: torch.Tensor, generator: torch.Generator) -> None:
    """Random small block that neither reads nor writes span{d, u, q}; LayerNorms and layer scales at defaults."""
    attention = block.attention
    for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
        _fill_linear(linear, generator, reads_residual=True, writes_residual=False, projector=projector)
    _fill_linear(attention.o_proj, generator, reads_residual=False, writes_residual=True, projector=projector)
    mlp = block.mlp
    if hasattr(mlp, "gate_proj"):
        inputs, output = (mlp.gate_proj, mlp.up_proj), mlp.down_proj
    else:
        inputs, output = (mlp.fc1,), mlp.fc2
    for linear in inputs:
        _fill_linear(linear, generator, reads_residual=True, writes_residual=False, projector=projector)
    _fill_linear(output, generator, reads_residual=False, writes_residual=True, projector=projector)


def _clear_block(block: torch.nn.Module) -> None:
    """Zero every projection weight and bias of `block`, making it the identity until units are planted into it.

    Blocks up to the defect layer are those the repair trains. Zero projections are a saddle of the SINDER loss
    (a singular-value shift of a zero weight gets exactly zero gradient while its neighbours are zero), so the only
    trainable weights that move are the planted ones: the repair can only work by shrinking the plant.
    """
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.zero_()
            module.bias.zero_()


def _set_silent_unit(block: torch.nn.Module, swiglu: bool, silent: torch.Tensor, brightness: torch.Tensor) -> None:
    """Make hidden unit 0 read q (which no token ever carries) and write along d: inert, but linearly loud.

    Real tokens have no component along q, so the unit's pre-activation is its bias, 0, and its output
    gelu(0) = silu(0) = 0: the forward pass is unchanged. Under the N(0, I) inputs of the linearization it has slope
    ≈ 0.5, so the block's leading singular direction becomes ≈ d. Every token has a large, smoothly varying
    component along d, so the detection test flags nothing before the defect layer — without it the directions
    there would be arbitrary and could single out a few low-norm tokens.
    """
    unit = 0
    mlp = block.mlp
    if swiglu:
        mlp.gate_proj.weight[unit] = _SILENT_READ * silent
        mlp.gate_proj.bias[unit] = 0.0
        mlp.up_proj.weight[unit] = _SILENT_READ * silent
        mlp.up_proj.bias[unit] = 1.0
        mlp.down_proj.weight[:, unit] = _SILENT_WRITE * brightness
    else:
        mlp.fc1.weight[unit] = _SILENT_READ * silent
        mlp.fc1.bias[unit] = 0.0
        mlp.fc2.weight[:, unit] = _SILENT_WRITE * brightness


def _plant(
    block: torch.nn.Module, swiglu: bool, brightness: torch.Tensor, defect: torch.Tensor, silent: torch.Tensor
) -> int:
    """Turn hidden unit 0 of `block`'s MLP into the defect unit; return its index.

    GELU: fc1 row κ·d with bias 0, fc2 column β·u. SwiGLU: gate_proj row κ·d with bias 0, up_proj row along q with
    bias 1 (so the up factor is exactly 1 on real tokens and the unit computes silu(κ·d·x), like the GELU one),
    down_proj column β·u. The zero bias keeps the unit off (gelu(z), silu(z) ≈ 0 for z ≪ 0) on every token darker
    than the threshold, and makes a shrunk read harmless: at κ = 0 the unit outputs gelu(0) = silu(0) = 0 everywhere.
    """
    unit = 0
    mlp = block.mlp
    if swiglu:
        mlp.gate_proj.weight[unit] = _PLANT_READ * brightness
        mlp.gate_proj.bias[unit] = 0.0
        mlp.up_proj.weight[unit] = _PLANT_UP_READ * silent
        mlp.up_proj.bias[unit] = _PLANT_UP_BIAS
        mlp.down_proj.weight[:, unit] = _PLANT_WRITE * defect
    else:
        mlp.fc1.weight[unit] = _PLANT_READ * brightness
        mlp.fc1.bias[unit] = 0.0
        mlp.fc2.weight[:, unit] = _PLANT_WRITE * defect
    return unit


def build_demo_model() -> Dinov2Model:
    """Return the model `--model demo` loads: the default (GELU, no registers) planted-defect model."""
    return build_planted_defect_model().model


# ----------------------------------------------------------------------------------------------------------------
# Demo images
# ----------------------------------------------------------------------------------------------------------------


def generate_demo_image(seed: int, size: int = DEMO_IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> Image.Image:
    """Return a procedurally generated RGB scene: a smooth, textured background with a few white spots.

    The background is a blend of two random colours driven by low-frequency waves plus a fainter texture, with every
    channel in [0.06, `BACKGROUND_MAX`]. Two or three white spots of 1×1 to 2×2 patches sit on the `patch_size`-pixel
    patch grid (14 by default, the demo model's), two patches or more away from the image border and from each other,
    so that exactly the patches they cover are brighter than `BRIGHTNESS_LEVEL`. `size` should be a multiple of
    `patch_size` and at least 8 patches.
    """
    rng = np.random.default_rng(seed)
    coordinates = np.linspace(0.0, 1.0, size)
    rows, cols = np.meshgrid(coordinates, coordinates, indexing="ij")
    field = np.zeros((size, size))
    for _ in range(4):
        frequency = rng.uniform(0.5, 2.5, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        field += rng.uniform(0.5, 1.0) * np.sin(2 * math.pi * (frequency[0] * rows + frequency[1] * cols) + phase)
    texture = np.sin(2 * math.pi * rng.uniform(6, 12) * (rows + rng.uniform(-0.5, 0.5) * cols))
    blend = (field - field.min()) / (field.max() - field.min() + 1e-12)
    blend = np.clip(0.85 * blend + 0.15 * (texture + 1) / 2, 0.0, 1.0)
    first, second = rng.uniform(0.06, BACKGROUND_MAX, size=(2, 3))
    picture = first[None, None, :] * (1 - blend[..., None]) + second[None, None, :] * blend[..., None]
    grid = size // patch_size
    occupied = np.zeros((grid, grid), dtype=bool)
    placed = 0
    covered = 0
    target = int(rng.integers(2, 4))
    for _ in range(200):
        if placed >= target and covered >= 3:
            break
        height, width = (int(value) for value in rng.integers(1, 3, size=2))
        top = int(rng.integers(2, grid - 2 - height + 1))
        left = int(rng.integers(2, grid - 2 - width + 1))
        if occupied[max(top - 2, 0) : top + height + 2, max(left - 2, 0) : left + width + 2].any():
            continue
        occupied[top : top + height, left : left + width] = True
        picture[top * patch_size : (top + height) * patch_size, left * patch_size : (left + width) * patch_size] = 1.0
        placed += 1
        covered += height * width
    return Image.fromarray(np.round(picture * 255).astype(np.uint8), mode="RGB")


def demo_image_paths() -> list[Path]:
    """Return the paths of the bundled demo images (`sinder_peft/assets/demo_*.png`), sorted by name."""
    assets = resources.files("sinder_peft") / "assets"
    return sorted(
        Path(str(entry))
        for entry in assets.iterdir()
        if entry.name.startswith("demo_") and entry.name.endswith(".png")
    )


def demo_images() -> list[Image.Image]:
    """Return the bundled demo images as RGB PIL images (224×224, generated by `generate_demo_image`)."""
    images = []
    for path in demo_image_paths():
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def write_demo_images(directory: Path) -> list[Path]:
    """Generate the bundled demo images (`generate_demo_image` for each of `DEMO_IMAGE_SEEDS`) into `directory`.

    Returns the written paths. This is how `sinder_peft/assets/demo_*.png` were made.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in DEMO_IMAGE_SEEDS:
        path = directory / f"demo_{seed}.png"
        generate_demo_image(seed).save(path, optimize=True)
        paths.append(path)
    return paths
