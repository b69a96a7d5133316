"""timm models in and out: the `NAME_OR_DIR` of `--model timm:...`, loaded offline (a directory in timm's Hub layout,
or a name whose weights are in the local Hugging Face cache), its preprocessing (`pretrained_cfg`), and saving a
directory that `timm.create_model("local-dir:PATH", pretrained=True)` loads. The conversion itself is
`timm_conversion`.

`timm` is optional: it is imported only through `require_timm`, when a function here needs it.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from ..tuner.architectures import ImageNormalization
from .extras import import_extra

logger = logging.getLogger(__name__)

# Weight files timm's `local-dir:` loader reads, in its order of preference.
_TIMM_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def require_timm() -> types.ModuleType:
    """Return the `timm` module, imported on first use: timm is an optional dependency of sinder-peft.

    Raises:
        ImportError: if timm cannot be imported, saying how to install it.
    """
    return import_extra("timm", "timm", "Using timm models")


@dataclass(frozen=True)
class TimmPreprocessing:
    """How a timm model's images are prepared: its pretrained configuration, completed with timm's defaults.

    Attributes:
        normalization: the per-channel mean and std (`mean`, `std`).
        input_size: (channels, height, width) the model is run at (its own size if it only accepts one).
        interpolation: the resize interpolation, e.g. "bicubic".
        crop_pct: the fraction of the resized image the center crop keeps.
        crop_mode: timm's crop mode ("center", "squash" or "border").
    """

    normalization: ImageNormalization
    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str


def timm_preprocessing(model: nn.Module) -> TimmPreprocessing:
    """Return the preprocessing of a timm model, read from its `pretrained_cfg` by timm's own resolver (which fills
    in timm's defaults, ImageNet's mean and std among them, and the model's current input size when it accepts one
    size only).

    Raises:
        ImportError: if timm is not installed.
        ValueError: if the mean or std does not have 3 values (R, G, B).
    """
    data = require_timm().data
    resolve = getattr(data, "resolve_input_data_config", None) or data.resolve_model_data_config
    config = resolve(model)
    return TimmPreprocessing(
        normalization=ImageNormalization(
            mean=tuple(float(value) for value in config["mean"]), std=tuple(float(value) for value in config["std"])
        ),
        input_size=tuple(int(value) for value in config["input_size"]),
        interpolation=str(config["interpolation"]),
        crop_pct=float(config["crop_pct"]),
        crop_mode=str(config.get("crop_mode", "center")),
    )


def save_timm_model(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` in timm's Hub layout into `directory` and return the directory.

    timm's own writer (`timm.models.save_for_hf`) writes `config.json`, with the architecture arguments the model was
    created with and its pretrained configuration (mean, std, interpolation, crop, the current input size), and
    `model.safetensors`; `timm.create_model("local-dir:DIRECTORY", pretrained=True)` loads the same model back
    without sinder-peft (without `pretrained=True` timm builds the architecture with random weights).

    Raises:
        ImportError: if timm is not installed.
        ValueError: if `model` was not created by `timm.create_model` (it has no `pretrained_cfg`), or an argument
            it was created with cannot be written as JSON (timm's message names it).
    """
    timm = require_timm()
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise ValueError(
            f"{type(model).__name__} has no timm pretrained_cfg: only models created by `timm.create_model` can be "
            "saved in timm's layout."
        )
    directory = Path(directory)
    timm.models.save_for_hf(model, directory, safe_serialization=True)
    logger.info("Saved the timm model %s to %s.", model.pretrained_cfg.get("architecture"), directory)
    return directory


def _load_timm_directory(timm: types.ModuleType, directory: Path) -> nn.Module:
    """Return the timm model of a directory in timm's Hub layout (`save_timm_model`)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json, so it is not a timm model directory (written by `save_timm_model` or "
            "timm's `save_for_hf`)."
        )
    if not any((directory / name).is_file() for name in _TIMM_WEIGHT_FILES):
        raise FileNotFoundError(f"{directory} has a config.json but no weights ({', '.join(_TIMM_WEIGHT_FILES)}).")
    return timm.create_model(f"local-dir:{directory.resolve()}", pretrained=True)


def _load_cached_timm_model(timm: types.ModuleType, name: str) -> nn.Module:
    """Return the timm model `name` (`architecture[.tag]`) with its pretrained weights from the Hugging Face cache."""
    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is neither a directory nor a timm model name; e.g. 'vit_small_patch14_dinov2.lvd142m' "
            "(`timm.list_models(pretrained=True)` lists them)."
        )
    architecture, tag = timm.models.split_model_name_tag(name)
    pretrained_cfg = timm.models.resolve_pretrained_cfg(architecture, pretrained_cfg=tag or None)
    if not pretrained_cfg.hf_hub_id:
        raise ValueError(f"The timm model {name} has no weights on the Hugging Face Hub to load from the cache.")
    repo_id, _, revision = pretrained_cfg.hf_hub_id.partition("@")
    try:
        snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"The weights of the timm model {name} ({repo_id}) are not in the local Hugging Face cache. Download "
            f"them first, e.g. `hf download {repo_id}` or `timm.create_model({name!r}, pretrained=True)` online."
        ) from error
    return timm.create_model(name, pretrained=True)


def load_timm_model(name_or_dir: str) -> nn.Module:
    """Return a timm model in eval mode: from a directory in timm's Hub layout (`save_timm_model`: `config.json` and
    `model.safetensors`, loaded by `timm.create_model("local-dir:PATH", pretrained=True)`), or a timm model name
    (`architecture[.tag]`) with its pretrained weights from the local Hugging Face cache.

    Raises:
        ImportError: if timm is not installed.
        FileNotFoundError: for a path that is not a timm model directory, or a name whose weights are not cached.
        ValueError: for a name timm does not know, or whose weights are not on the Hugging Face Hub.
    """
    timm = require_timm()
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        model = _load_timm_directory(timm, path)
    elif path.exists() or any(separator in name_or_dir for separator in ("/", "\\")) or name_or_dir.startswith("."):
        raise FileNotFoundError(f"{name_or_dir} is not a directory holding a timm model (config.json and weights).")
    else:
        model = _load_cached_timm_model(timm, name_or_dir)
    logger.info("Loaded the timm model %s (%s).", name_or_dir, type(model).__name__)
    return model.eval()
