"""Defect detection: which tokens are defects, which are high-norm, and which direction each layer is tested along.

This is the one module that decides. `find_defect_tokens` (diagnose, evaluate, the repair's selection sample and its
report) runs a model block by block and reports every layer; the training step runs its own pass and asks
`detect_layer_defects` at each layer (docs/method.md §2). Both apply the same `DefectTest`, the recipe's:

* a **defect is born in a block**: a patch token x_l is a *high-norm defect token* at layer l when its norm is at
  least `HIGH_NORM_FACTOR` (4) times its image's median patch-token norm at l *and* so is the length the blocks added
  to it, ‖x_l − x_0‖, x_0 being the same token at the embedding output, the input of the first block
  (`born_high_norm_mask`). A token that is long because it already was before any block ran is an *input feature*
  of the image (a white patch, a bright sky), not an artifact: it is reported as a *high-norm input token* and never
  decides anything;
* a **flagged token** of an image at layer l is a patch token whose |cos| with the layer's defect direction is an
  outlier among the image's tokens, above mean + k·std (`defect_token_mask`, k = `mask_thr`, 4 in the paper); the
  border ring is never flagged;
* the **test** (`DefectTest`): layer l is defective for an image when at least `min_tokens` (3) tokens are flagged,
  and, with a `norm_gap` (the `preserve` recipe's, 4), one of them is a high-norm defect token at `norm_gap` times the
  median; the `paper` recipe's test has no norm gap (the cosine test alone, as the paper and its code). An image's
  *first defective layer* is the first that passes.

Whatever the test, the norms say whether an image has a **high-norm defect**: a high-norm defect token at some layer
(`DefectAnalysis.high_norm_defect_images`). Reports count those; a model whose images have none has nothing to
repair.

The defect direction of layer l is SINDER's, computed from the weights alone (`directions.singular_defect_directions`).
That explains the defects of the models the paper studied, but not of every checkpoint: a sparse MLP unit that fires
on a few patches (a "register neuron") has almost no weight in a linear fit, yet writes the largest tokens
(docs/method.md §9). So the tool measures, per layer, how well the weights' direction explains the high-norm defect
tokens, and can take the direction from those tokens instead:

* the **weights' cosine** of a layer is the mean |cos| between its high-norm defect tokens (pooled over the images)
  and the weights' direction: near 1 when the theory explains them, near 0 when it does not;
* the **data direction** of a layer is the leading right singular vector of its pooled high-norm defect tokens
  (`data_direction`): the direction they share;
* `choose_direction` picks per layer: `weights` always the weights' direction (the paper); `data` the data direction
  wherever there are at least `min_tokens` high-norm defect tokens; `auto` (the default) the weights' direction where
  its cosine reaches `AUTO_COSINE_THRESHOLD` (0.5), the data direction where it does not. A layer with fewer than
  `min_tokens` high-norm defect tokens keeps the weights' direction under every source, so high-norm input tokens
  never give a direction.

`DefectDirections` records the choice, with the numbers behind it (saved with training checkpoints by
`direction_files`, so that a resumed repair uses the same directions); `DefectAnalysis` holds what
`find_defect_tokens` measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..tuner.architectures import describe_config, unwrap_backbone
from ..tuner.descriptions import ArchitectureDescription
from .directions import singular_defect_directions

DirectionSource = Literal["weights", "data", "auto"]
Recipe = Literal["preserve", "paper"]
RECIPES: tuple[str, ...] = ("preserve", "paper")
DIRECTION_SOURCES: tuple[str, ...] = ("weights", "data", "auto")
DIRECTION_SOURCE_HELP = (
    "Where each layer's defect direction comes from. weights: the paper's, computed from the weights alone; data: "
    "the leading direction of the high-norm defect tokens (>= 4x their image's median norm, and grown >= 2x since "
    "the embedding) of the analysed images, at layers with at least min-tokens of them; auto: the weights' "
    "direction where it explains those tokens "
    "(mean |cos| >= 0.5), the data direction where it does not (docs/method.md §9)."
)

HIGH_NORM_FACTOR = 4.0
"""A patch token is high-norm when its norm is at least this many times its image's median patch-token norm (at the
same layer). Defect tokens of DINOv2 reach 10-100x; clean tokens of the models we measured stay below 3x (a trained
DINOv2 ViT-S/14 without defect: at most 2.3x at every layer, at 224 and 518 px)."""

RECIPE_HELP = (
    "Whose defect test decides: preserve (the default repair's: at least min-tokens |cos| outliers, one of them a "
    "high-norm defect token, >= 4x the median norm and grown since the embedding) or paper (the cosine test alone, "
    "as the paper's code)."
)

RECIPE_NORM_GAPS: dict[str, float | None] = {"preserve": HIGH_NORM_FACTOR, "paper": None}
"""The norm gap of each recipe's defect test: `preserve` counts a layer only where a flagged token is a high-norm
defect token; `paper` is the paper's cosine test alone."""

AUTO_COSINE_THRESHOLD = 0.5
"""`auto` keeps the weights' direction of a layer when the mean |cos| of its high-norm tokens with it is at least
this: the planted and paper defects sit above 0.9, the register-neuron tokens the weights miss below 0.25."""

MAX_DIRECTION_TOKENS = 8192
"""At most this many high-norm tokens per layer enter a data direction (the first ones met): enough for a leading
singular vector, and a bound on memory for a layer where many tokens are long."""


def high_norm_token_mask(norms: torch.Tensor, factor: float = HIGH_NORM_FACTOR) -> torch.Tensor:
    """Return the high-norm tokens of patch grids: True where a norm is at least `factor` times its grid's median.

    `norms` is [..., H, W] (e.g. [B, L, H, W] token norms); the median (the lower middle value for an even count, as
    `torch.median`) is taken per grid over all H·W tokens. Returns a bool tensor shaped like `norms`.
    """
    median = norms.flatten(-2).median(dim=-1).values[..., None, None]
    return norms >= factor * median


def born_high_norm_mask(
    norms: torch.Tensor, added_norms: torch.Tensor, factor: float = HIGH_NORM_FACTOR
) -> torch.Tensor:
    """Return the high-norm defect tokens: True where both a token's norm `norms` [..., H, W] and the norm of what the
    blocks added to it since the embedding output, `added_norms` [..., H, W] (‖x_l − x_0‖), are at least `factor`
    times the median of `norms` over its grid: a token the blocks made long, not one that entered the first block
    long (docs/method.md §2)."""
    median = norms.flatten(-2).median(dim=-1).values[..., None, None]
    return (norms >= factor * median) & (added_norms >= factor * median)


def _fix_sign(vector: torch.Tensor) -> torch.Tensor:
    """Return `vector` with its largest-magnitude entry made positive (the convention of every direction here)."""
    return vector * torch.sign(vector[vector.abs().argmax()])


def data_direction(tokens: torch.Tensor) -> torch.Tensor:
    """Return the data direction of a set of tokens `tokens` [n, C]: their leading right singular vector.

    The tokens are not centred: high-norm tokens share one long component, which is the direction wanted. Computed in
    float64; returns a float32 unit vector [C], largest-magnitude entry positive.

    Raises:
        ValueError: when `tokens` is empty.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"data_direction needs a non-empty [n, C] set of tokens, got shape {tuple(tokens.shape)}.")
    _, _, right = torch.linalg.svd(tokens.double(), full_matrices=False)
    return _fix_sign(right[0]).float()


def mean_abs_cosine(tokens: torch.Tensor, direction: torch.Tensor) -> float | None:
    """Return the mean |cos| between the rows of `tokens` [n, C] and `direction` [C]; None when there is no row."""
    if tokens.shape[0] == 0:
        return None
    unit = nn.functional.normalize(direction.to(device=tokens.device, dtype=torch.float64), dim=0)
    return float((nn.functional.normalize(tokens.double(), dim=-1) @ unit).abs().mean())


@dataclass(frozen=True)
class LayerDirection:
    """The direction one layer uses, and why.

    Attributes:
        direction: the unit direction [C] (float32).
        source: "weights" or "data".
        weights_cosine: the mean |cos| of the layer's high-norm tokens with the weights' direction; None without any.
        high_norm_tokens: how many high-norm tokens the choice saw (capped at `MAX_DIRECTION_TOKENS`).
    """

    direction: torch.Tensor
    source: str
    weights_cosine: float | None
    high_norm_tokens: int


def choose_direction(
    high_norm_tokens: torch.Tensor,
    weights_direction: torch.Tensor,
    source: DirectionSource,
    *,
    min_tokens: int = 3,
    threshold: float = AUTO_COSINE_THRESHOLD,
) -> LayerDirection:
    """Return the direction of one layer from its pooled high-norm tokens [n, C] and the weights' direction [C].

    `weights` keeps the weights' direction; `data` takes `data_direction(high_norm_tokens)`; `auto` keeps the
    weights' direction when `mean_abs_cosine(high_norm_tokens, weights_direction) >= threshold` and takes the data
    direction otherwise. With fewer than `min_tokens` high-norm tokens every source keeps the weights' direction.
    """
    if source not in DIRECTION_SOURCES:
        raise ValueError(f"directions must be one of {', '.join(DIRECTION_SOURCES)}, got {source!r}.")
    cosine = mean_abs_cosine(high_norm_tokens, weights_direction)
    count = int(high_norm_tokens.shape[0])
    weights = nn.functional.normalize(weights_direction.detach().float(), dim=0)
    explained = cosine is not None and cosine >= threshold
    if source == "weights" or count < min_tokens or (source == "auto" and explained):
        return LayerDirection(weights, "weights", cosine, count)
    direction = data_direction(high_norm_tokens).to(weights.device)
    return LayerDirection(direction, "data", cosine, count)


@dataclass(frozen=True, eq=False)
class DefectDirections:
    """The defect direction of every layer, where each came from, and the numbers behind the choice.

    Attributes:
        directions: [L, C] the directions used (float32, CPU).
        weights_directions: [L, C] the weights' directions they were chosen against.
        sources: per layer, "weights" or "data".
        weights_cosines: per layer, the mean |cos| of the high-norm tokens with the weights' direction (None: none).
        high_norm_tokens: per layer, the number of high-norm tokens seen.
        requested: the source asked for ("weights", "data" or "auto").
    """

    directions: torch.Tensor
    weights_directions: torch.Tensor
    sources: tuple[str, ...]
    weights_cosines: tuple[float | None, ...]
    high_norm_tokens: tuple[int, ...]
    requested: str

    @classmethod
    def from_layers(
        cls, layers: Sequence[LayerDirection], weights_directions: torch.Tensor, requested: str
    ) -> DefectDirections:
        """Return the directions of `layers` (one `LayerDirection` per layer, in order)."""
        return cls(
            directions=torch.stack([layer.direction.detach().float().cpu() for layer in layers]),
            weights_directions=weights_directions.detach().float().cpu(),
            sources=tuple(layer.source for layer in layers),
            weights_cosines=tuple(layer.weights_cosine for layer in layers),
            high_norm_tokens=tuple(layer.high_norm_tokens for layer in layers),
            requested=requested,
        )

    @property
    def data_layers(self) -> list[int]:
        """The layers whose direction comes from the data."""
        return [layer for layer, source in enumerate(self.sources) if source == "data"]

    def to_dict(self) -> dict[str, Any]:
        """Return the choice as JSON values: the requested source and, per layer, its source, the weights' cosine
        of its high-norm tokens and their number (report.json's `directions`)."""
        return {
            "requested": self.requested,
            "high_norm_factor": HIGH_NORM_FACTOR,
            "auto_cosine_threshold": AUTO_COSINE_THRESHOLD,
            "layers": [
                {"layer": layer, "source": source, "weights_cosine": cosine, "high_norm_tokens": count}
                for layer, (source, cosine, count) in enumerate(
                    zip(self.sources, self.weights_cosines, self.high_norm_tokens, strict=True)
                )
            ],
        }

    def describe(self) -> str:
        """Return a one-line account for the log: which layers use data directions, with their weights' cosine."""
        data = self.data_layers
        if not data:
            return f"directions ({self.requested}): the weights' at every layer"
        details = ", ".join(f"{layer} (|cos| with the weights' {self.weights_cosines[layer]:.2f})" for layer in data)
        return f"directions ({self.requested}): from the data at layers {details}; the weights' elsewhere"


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


@dataclass(frozen=True)
class DefectTest:
    """The defect test of a recipe (docs/method.md §2): the same one in diagnose, evaluate, the selection sample, the
    training step, the stop rule and the report.

    Attributes:
        mask_thr: the outlier threshold k of the cosine test (`defect_token_mask`).
        min_tokens: flagged tokens from which a layer counts for an image (the paper's `skip_less_than`).
        border: the border ring of this width is never flagged (kernel // 2).
        norm_gap: with a value, a layer counts only when one of its flagged tokens is a high-norm defect token at
            this many times the median (`born_high_norm_mask`); None is the paper's cosine test alone.
    """

    mask_thr: float = 4.0
    min_tokens: int = 3
    border: int = 1
    norm_gap: float | None = HIGH_NORM_FACTOR

    @classmethod
    def for_recipe(
        cls,
        recipe: Recipe,
        *,
        mask_thr: float = 4.0,
        min_tokens: int = 3,
        kernel: int = 3,
        norm_gap: float | None = None,
    ) -> DefectTest:
        """Return the test of `recipe` ("preserve" or "paper"); `norm_gap`, when given, replaces the recipe's."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}.")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {kernel}.")
        gap = norm_gap if norm_gap is not None else RECIPE_NORM_GAPS[recipe]
        return cls(mask_thr=mask_thr, min_tokens=min_tokens, border=kernel // 2, norm_gap=gap)

    def to_dict(self) -> dict[str, Any]:
        """Return the test as JSON values (report.json's `defect_test`)."""
        return {
            "mask_thr": self.mask_thr,
            "min_tokens": self.min_tokens,
            "border": self.border,
            "norm_gap": self.norm_gap,
            "high_norm_factor": HIGH_NORM_FACTOR,
        }

    def apply(self, masks: torch.Tensor, norms: torch.Tensor, added_norms: torch.Tensor) -> torch.Tensor:
        """Return, per grid, whether the layer is defective: `masks` [..., H, W] the flagged tokens, `norms`
        [..., H, W] the token norms, `added_norms` the norms of what the blocks added since the embedding output
        (`born_high_norm_mask`). A bool tensor [...]."""
        defective = masks.flatten(-2).sum(dim=-1) >= self.min_tokens
        if self.norm_gap is not None:
            born = born_high_norm_mask(norms, added_norms, self.norm_gap)
            defective = defective & (masks & born).flatten(-2).any(dim=-1)
        return defective


@dataclass(frozen=True, eq=False)
class LayerDefects:
    """The defect test of one layer for a batch of patch grids.

    Attributes:
        cosines: [B, H, W] |cos(token, direction)|.
        masks: [B, H, W] the flagged tokens (`defect_token_mask`).
        defective: per image, whether the layer is defective for it under the `DefectTest`.
    """

    cosines: torch.Tensor
    masks: torch.Tensor
    defective: list[bool]


def detect_layer_defects(
    patches: torch.Tensor, direction: torch.Tensor, input_patches: torch.Tensor, test: DefectTest
) -> LayerDefects:
    """Return the defect test of one layer for the patch grids `patches` [B, H, W, C] along `direction` [C], with
    `input_patches` [B, H, W, C] the same tokens at the embedding output: the test the training step makes at every
    layer it runs (docs/method.md §2), under `torch.no_grad()`."""
    with torch.no_grad():
        cosines = direction_cosines(patches, direction)
        masks = defect_token_mask(cosines, test.mask_thr, test.border)
        added = (patches - input_patches.to(patches.device)).norm(dim=-1)
        defective = test.apply(masks, patches.norm(dim=-1), added)
    return LayerDefects(cosines=cosines, masks=masks, defective=defective.tolist())


@dataclass(frozen=True, eq=False)
class DefectAnalysis:
    """Defect statistics of a batch of images, per layer (layers indexed from 0 = output of the first block).

    All tensors are float32/bool/int64 on the CPU. Token features are the outputs of each block, *before* the final
    LayerNorm, restricted to the patch grid (CLS, register and distillation tokens are left out).

    Attributes:
        grid_size: (H, W), the patch grid.
        directions: [L, C] the defect directions the cosines were measured against.
        cosines: [B, L, H, W] |cos(token, direction of its layer)|.
        masks: [B, L, H, W] flagged tokens per layer (`defect_token_mask`).
        defective: [B, L] whether each layer is defective for each image under `test`.
        first_defective_layer: [B] the first defective layer of each image; −1 when there is none.
        token_norms: [B, L, H, W] Euclidean norm of every patch token.
        added_norms: [B, L, H, W] the norm of what the blocks added to each token since the embedding output (the input
            of the first block), ‖x_l − x_0‖: a token long only through `token_norms`, not here, is an input feature.
        max_median_norm_ratio: [B, L] largest over median patch-token norm (median: the lower middle value for an
            even count, as `torch.median`).
        high_norm_share: [B, L] share of patch tokens whose norm exceeds `norm_threshold`, or, when that is None,
            4 × the median patch-token norm of the same image and layer.
        last_patch_features: [B, H, W, C] the last block's patch tokens before the final LayerNorm (for PCA maps).
        test: the defect test applied (`DefectTest`, the recipe's).
        norm_threshold: the absolute norm threshold of `high_norm_share`, or None for the relative default.
        defect_directions: where each layer's direction came from (`detection.DefectDirections`).
        weights_cosines: [B, L, H, W] |cos(token, the weights' direction of its layer)|, equal to `cosines` at the
            layers whose direction is the weights'.
    """

    grid_size: tuple[int, int]
    directions: torch.Tensor
    cosines: torch.Tensor
    masks: torch.Tensor
    defective: torch.Tensor
    first_defective_layer: torch.Tensor
    token_norms: torch.Tensor
    added_norms: torch.Tensor
    max_median_norm_ratio: torch.Tensor
    high_norm_share: torch.Tensor
    last_patch_features: torch.Tensor
    test: DefectTest
    norm_threshold: float | None
    defect_directions: DefectDirections
    weights_cosines: torch.Tensor

    PER_IMAGE_FIELDS: ClassVar[tuple[str, ...]] = (
        "cosines",
        "masks",
        "defective",
        "first_defective_layer",
        "token_norms",
        "added_norms",
        "max_median_norm_ratio",
        "high_norm_share",
        "last_patch_features",
        "weights_cosines",
    )
    """The fields with one row per image (`first_images` keeps their first rows)."""

    @property
    def num_images(self) -> int:
        """Number of images analysed."""
        return self.masks.shape[0]

    @property
    def num_layers(self) -> int:
        """Number of layers analysed."""
        return self.masks.shape[1]

    def first_images(self, count: int) -> DefectAnalysis:
        """Return the analysis of the first `count` images only."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values.update({name: values[name][:count] for name in self.PER_IMAGE_FIELDS})
        return DefectAnalysis(**values)

    @property
    def defect_token_counts(self) -> torch.Tensor:
        """[B, L] number of flagged tokens per image and layer."""
        return self.masks.flatten(2).sum(dim=-1)

    @property
    def high_norm_masks(self) -> torch.Tensor:
        """[B, L, H, W] the high-norm tokens: a norm at least `HIGH_NORM_FACTOR` times the image's median at that
        layer (`detection.high_norm_token_mask`), border included, born in a block or not."""
        return high_norm_token_mask(self.token_norms)

    @property
    def high_norm_defect_masks(self) -> torch.Tensor:
        """[B, L, H, W] the high-norm defect tokens: high-norm, and so is what the blocks added to them since the
        embedding (`born_high_norm_mask`)."""
        return born_high_norm_mask(self.token_norms, self.added_norms)

    @property
    def high_norm_defect_counts(self) -> torch.Tensor:
        """[B, L] number of high-norm defect tokens per image and layer."""
        return self.high_norm_defect_masks.flatten(2).sum(dim=-1)

    @property
    def high_norm_input_counts(self) -> torch.Tensor:
        """[B, L] number of high-norm *input* tokens per image and layer: high-norm, but already as long at the
        embedding (an input feature of the image, not a defect)."""
        return (self.high_norm_masks & ~self.high_norm_defect_masks).flatten(2).sum(dim=-1)

    @property
    def high_norm_defect_images(self) -> torch.Tensor:
        """bool [B]: whether each image has a high-norm defect token at some layer (what the norms show, whatever
        the directions and the test)."""
        return self.high_norm_defect_counts.sum(dim=1) > 0

    @property
    def first_high_norm_defect_layer(self) -> torch.Tensor:
        """[B] the first layer with a high-norm defect token (where the image's defect is born); −1 when none."""
        born = self.high_norm_defect_counts > 0
        return torch.where(
            born.any(dim=1), born.int().argmax(dim=1), torch.full_like(born[:, 0], -1, dtype=torch.long)
        )

    def high_norm_weights_cosines(self) -> list[float | None]:
        """Return, per layer, the mean |cos| between the high-norm defect tokens of all analysed images and the
        weights' direction of that layer (None where there is none): how well the weights' theory explains them."""
        masks = self.high_norm_defect_masks
        values: list[float | None] = []
        for layer in range(self.num_layers):
            selected = self.weights_cosines[:, layer][masks[:, layer]]
            values.append(float(selected.double().mean()) if selected.numel() else None)
        return values

    def high_norm_defect_layers(self) -> list[int]:
        """Return the layers at which some analysed image has a high-norm defect token."""
        return torch.nonzero(self.high_norm_defect_counts.sum(dim=0) > 0).flatten().tolist()

    def to_dict(self) -> dict[str, Any]:
        """Return the settings and per-image numbers as plain JSON-serializable Python values.

        Each image gets its first defective layer (the test's) and the first layer of a high-norm defect token, the
        flagged-token count, max/median norm ratio, high-norm share, high-norm defect and input token counts of
        every layer, and the (row, column) positions of the tokens flagged at its first defective layer.
        """
        counts = self.defect_token_counts
        defect_counts = self.high_norm_defect_counts
        input_counts = self.high_norm_input_counts
        born = self.first_high_norm_defect_layer
        images = []
        for index in range(self.num_images):
            layer = int(self.first_defective_layer[index])
            positions = torch.nonzero(self.masks[index, layer]).tolist() if layer >= 0 else []
            images.append(
                {
                    "first_defective_layer": layer,
                    "first_high_norm_defect_layer": int(born[index]),
                    "defect_tokens_at_first_defective_layer": positions,
                    "num_defect_tokens": counts[index].tolist(),
                    "max_median_norm_ratio": self.max_median_norm_ratio[index].tolist(),
                    "high_norm_share": self.high_norm_share[index].tolist(),
                    "num_high_norm_defect_tokens": defect_counts[index].tolist(),
                    "num_high_norm_input_tokens": input_counts[index].tolist(),
                }
            )
        return {
            "grid_size": list(self.grid_size),
            "num_layers": self.num_layers,
            "defect_test": self.test.to_dict(),
            "norm_threshold": self.norm_threshold,
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
    """Yield the patch grids [B, H, W, C] (float32) of `pixel_values`: first the embedding output (the input of the
    first block), then each block's output, with the description's `embed` and `run_block` under `torch.no_grad()`."""
    with torch.no_grad():
        embedded = description.embed(backbone, pixel_values)
        hidden = embedded.hidden
        yield patch_grid(hidden, description, height, width)
        for block in backbone.get_submodule(description.layers):
            hidden = description.run_block(block, hidden, embedded.block_kwargs)
            yield patch_grid(hidden, description, height, width)


def _high_norm_defect_rows(
    patches: torch.Tensor, added_norms: torch.Tensor, limit: int = MAX_DIRECTION_TOKENS
) -> torch.Tensor:
    """Return the high-norm defect tokens of a patch grid [B, H, W, C] (`born_high_norm_mask`; `added_norms`
    [B, H, W] the norms of what the blocks added since the embedding) as rows [n, C] (at most `limit`, the first)."""
    return patches[born_high_norm_mask(patches.norm(dim=-1), added_norms)][:limit]


def estimate_defect_directions(
    model: nn.Module,
    images: Iterable[torch.Tensor],
    source: DirectionSource = "auto",
    directions: list[torch.Tensor] | torch.Tensor | None = None,
    *,
    min_tokens: int = 3,
) -> DefectDirections:
    """Return the defect direction of every layer of `model` chosen by `source` from the high-norm defect tokens of
    `images` (an iterable of normalized [B, 3, H, W] batches, of any sizes that are multiples of the patch size).

    The high-norm defect tokens of all batches (`born_high_norm_mask`: tokens a block made long, never those long
    from the embedding on) are pooled per layer, and `detection.choose_direction` picks each layer's direction
    (docs/method.md §9). `directions` are the weights' directions (computed when None). Use this when the analysed
    images do not fit one batch; `find_defect_tokens` makes the same choice inside its own pass.
    """
    backbone = unwrap_backbone(model)
    description = describe_config(backbone.config)
    weights = _weights_direction_matrix(backbone, description, directions)
    pooled: list[list[torch.Tensor]] = [[] for _ in range(description.num_layers)]
    for pixel_values in images:
        height, width = patch_grid_size(pixel_values, description.patch_size)
        grids = _layer_patch_grids(backbone, description, pixel_values, height, width)
        input_patches = next(grids)
        for index, patches in enumerate(grids):
            kept = sum(rows.shape[0] for rows in pooled[index])
            added = (patches - input_patches).norm(dim=-1)
            pooled[index].append(_high_norm_defect_rows(patches, added, MAX_DIRECTION_TOKENS - kept).cpu())
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
    test: DefectTest | None = None,
    norm_threshold: float | None = None,
) -> DefectAnalysis:
    """Run the model block by block on `pixel_values` and report its defect tokens at every layer (docs/method.md §2).

    The embeddings and each block are run under `torch.no_grad()` with the description's `embed` and `run_block`
    (the full forward is not called, so the output of every block is seen before the final LayerNorm), at any image
    size that is a multiple of the patch size. The model runs in its current mode: call `model.eval()` first for
    deterministic results (a DINOv3 backbone in train mode is refused, see `ArchitectureDescription.embed`).

    Each layer's direction is chosen in the same pass (`detection.choose_direction`, from the high-norm defect
    tokens of this batch at that layer), unless `directions` is a `DefectDirections`, which is used as it is.

    Args:
        model: a model of a supported family in any form `unwrap_backbone` accepts.
        pixel_values: [B, 3, height, width] normalized images; height and width multiples of the patch size.
        directions: the weights' directions, one per layer (computed with `singular_defect_directions(model)` when
            None), or a `DefectDirections` already chosen (e.g. on a repair's selection sample).
        direction_source: "weights", "data" or "auto" (docs/method.md §9); ignored when `directions` is a
            `DefectDirections`.
        test: the defect test (`DefectTest`; default: the `preserve` recipe's, `DefectTest.for_recipe("preserve")`).
            Its `min_tokens` is also the number of high-norm defect tokens a layer needs for a data direction.
        norm_threshold: absolute norm above which a token counts in `high_norm_share`; None means 4 × the median
            norm of the same image and layer.

    Returns:
        A `DefectAnalysis` with every tensor on the CPU.
    """
    test = test or DefectTest.for_recipe("preserve")
    backbone = unwrap_backbone(model)
    description = describe_config(backbone.config)
    height, width = patch_grid_size(pixel_values, description.patch_size, 2 * test.border + 1)
    chosen = directions if isinstance(directions, DefectDirections) else None
    weights = _weights_direction_matrix(
        backbone, description, chosen.weights_directions if chosen is not None else directions
    )
    cosines, weights_cosines, norms, added_norms, layers = [], [], [], [], []
    grids = _layer_patch_grids(backbone, description, pixel_values, height, width)
    input_patches = next(grids)
    for index, patches in enumerate(grids):
        added = (patches - input_patches).norm(dim=-1)
        if chosen is None:
            layer = choose_direction(
                _high_norm_defect_rows(patches, added),
                weights[index],
                direction_source,
                min_tokens=test.min_tokens,
            )
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
        added_norms.append(added.cpu())
    cosine_tensor = torch.stack(cosines, dim=1)
    norm_tensor = torch.stack(norms, dim=1)
    added_tensor = torch.stack(added_norms, dim=1)
    masks = defect_token_mask(cosine_tensor, mask_thr=test.mask_thr, border=test.border)
    defective = test.apply(masks, norm_tensor, added_tensor)
    first_layer = torch.where(
        defective.any(dim=1), defective.int().argmax(dim=1), torch.full((pixel_values.shape[0],), -1)
    )
    flat_norms = norm_tensor.flatten(2)
    median = flat_norms.median(dim=-1).values
    threshold = torch.full_like(median, norm_threshold) if norm_threshold is not None else 4 * median
    defect_directions = chosen or DefectDirections.from_layers(layers, weights, direction_source)
    return DefectAnalysis(
        grid_size=(height, width),
        directions=defect_directions.directions,
        cosines=cosine_tensor,
        masks=masks,
        defective=defective,
        first_defective_layer=first_layer.long(),
        token_norms=norm_tensor,
        added_norms=added_tensor,
        max_median_norm_ratio=flat_norms.max(dim=-1).values / median,
        high_norm_share=(flat_norms > threshold[..., None]).float().mean(dim=-1),
        last_patch_features=patches.cpu(),
        test=test,
        norm_threshold=norm_threshold,
        defect_directions=defect_directions,
        weights_cosines=torch.stack(weights_cosines, dim=1),
    )
