"""Defect directions on disk: the `DefectDirections` of a repair as tensors, in a safetensors file.

A repair saves its directions in every checkpoint (`save_directions`), so that a resumed run tests the same
directions; the evaluation cache stores them as tensors beside its statistics (`directions_to_tensors`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .detection import DefectDirections

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
