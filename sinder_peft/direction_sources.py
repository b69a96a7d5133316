"""Where each layer's defect direction comes from: the weights, the data, or whichever explains the high-norm tokens.

SINDER's defect direction of layer l is computed from the weights alone (`defects.singular_defect_directions`, the
leading left singular vector of the linearized blocks up to l). That explains the high-norm tokens of the models the
paper studied, but not of every checkpoint: a sparse MLP unit that fires on a few patches (a "register neuron") has
almost no weight in a linear fit, yet writes the largest tokens (docs/method.md §9). So the tool measures, per layer,
how well the weights' direction explains the high-norm tokens, and can take the direction from those tokens instead:

* a **high-norm token** of an image at a layer is a patch token whose norm is at least `HIGH_NORM_FACTOR` (4) times
  the median patch-token norm of that image at that layer (`high_norm_token_mask`);
* the **weights' cosine** of a layer is the mean |cos| between its high-norm tokens (pooled over the images) and the
  weights' direction: near 1 when the theory explains them, near 0 when it does not;
* the **data direction** of a layer is the leading right singular vector of its pooled high-norm tokens
  (`data_direction`): the direction they share;
* `choose_direction` picks per layer: `weights` always the weights' direction (the paper); `data` the data direction
  wherever there are at least `min_tokens` high-norm tokens; `auto` (the default) the weights' direction where its
  cosine reaches `AUTO_COSINE_THRESHOLD` (0.5), the data direction where it does not. A layer with fewer than
  `min_tokens` high-norm tokens keeps the weights' direction under every source.

Everything here is a pure function of tensors; `defects.find_defect_tokens` and `defects.estimate_defect_directions`
run the model and call it. `DefectDirections` records the choice, with the numbers behind it, and is saved with
training checkpoints (`save_directions`, `load_directions`) so that a resumed repair uses the same directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DirectionSource = Literal["weights", "data", "auto"]
DIRECTION_SOURCES: tuple[str, ...] = ("weights", "data", "auto")
DIRECTION_SOURCE_HELP = (
    "Where each layer's defect direction comes from. weights: the paper's, computed from the weights alone; data: "
    "the leading direction of the high-norm tokens (>= 4x their image's median norm) of the analysed images, at "
    "layers with at least min-tokens of them; auto: the weights' direction where it explains the high-norm tokens "
    "(mean |cos| >= 0.5), the data direction where it does not (docs/method.md §9)."
)

HIGH_NORM_FACTOR = 4.0
"""A patch token is high-norm when its norm is at least this many times its image's median patch-token norm (at the
same layer). Defect tokens of DINOv2 reach 10-100x; clean tokens of the models we measured stay below 3x."""

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


DIRECTIONS_TENSORS_FILE = "directions.safetensors"


def directions_to_tensors(directions: DefectDirections) -> dict[str, torch.Tensor]:
    """Return `directions` as tensors only (for safetensors files): the two [L, C] direction tensors, and per layer
    `from_data` (1 where the direction comes from the data), `weights_cosines` (NaN where None) and
    `high_norm_tokens`. `directions_from_tensors` inverts it."""
    cosines = [float("nan") if cosine is None else cosine for cosine in directions.weights_cosines]
    return {
        "directions": directions.directions.contiguous(),
        "weights_directions": directions.weights_directions.contiguous(),
        "from_data": torch.tensor([source == "data" for source in directions.sources], dtype=torch.uint8),
        "weights_cosines": torch.tensor(cosines, dtype=torch.float64),
        "high_norm_tokens": torch.tensor(directions.high_norm_tokens, dtype=torch.int64),
    }


def directions_from_tensors(tensors: dict[str, torch.Tensor], requested: str) -> DefectDirections:
    """Return the `DefectDirections` that `directions_to_tensors` stored in `tensors` (other entries are ignored)."""
    return DefectDirections(
        directions=tensors["directions"],
        weights_directions=tensors["weights_directions"],
        sources=tuple("data" if flag else "weights" for flag in tensors["from_data"].tolist()),
        weights_cosines=tuple(None if cosine != cosine else cosine for cosine in tensors["weights_cosines"].tolist()),
        high_norm_tokens=tuple(int(count) for count in tensors["high_norm_tokens"].tolist()),
        requested=requested,
    )


def save_directions(directions: DefectDirections, directory: Path) -> Path:
    """Write `directions` to `directory/directions.safetensors` (`directions_to_tensors`, the requested source as
    metadata); return the file."""
    path = Path(directory) / DIRECTIONS_TENSORS_FILE
    save_file(directions_to_tensors(directions), str(path), metadata={"requested": directions.requested})
    return path


def load_directions(directory: Path) -> DefectDirections | None:
    """Return the directions saved in `directory` by `save_directions`, or None when it holds none."""
    path = Path(directory) / DIRECTIONS_TENSORS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        requested = handle.metadata()["requested"]
    return directions_from_tensors(load_file(str(path)), requested)
