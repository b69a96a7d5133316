"""timm models in and out: the `NAME_OR_DIR` of `--model timm:...`, loaded offline (a directory in timm's Hub layout,
a timm model name whose weights are in the local Hugging Face cache, or a Hub repository `hf-hub:ORG/NAME[@REVISION]`
in that cache), with the keyword arguments of `--model-kwargs` and of the repository's preset; its preprocessing
(`pretrained_cfg`); and saving a directory that `timm.create_model("local-dir:PATH", pretrained=True, **LAYERS)`
loads. The conversion itself is `conversion`.

A Hub repository is read from the cache as `timm.create_model("hf-hub:ORG/NAME", pretrained=True)` reads it: the
snapshot's `config.json` (timm's format: `architecture`, `model_args`, `pretrained_cfg`) and its weights
(`model.safetensors` or `pytorch_model.bin`), through timm's own `local-dir:` loader on the snapshot directory, so
that nothing is looked up online.

`timm` is optional: it is imported only through `require_timm`, when a function here needs it.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from ...tuner.architectures import ImageNormalization
from ..extras import import_extra
from .arguments import is_dotted_name, json_model_args, loading_line, parse_model_kwargs, resolve_model_kwargs
from .presets import find_preset, merge_model_kwargs

logger = logging.getLogger(__name__)

# Weight files timm's `local-dir:` loader reads, in its order of preference.
_TIMM_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")

HUB_PREFIXES: tuple[str, ...] = ("hf-hub:", "hf_hub:")
"""timm's prefixes of a Hugging Face Hub repository (`hf_hub:` is its older spelling)."""


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


def save_timm_model(model: nn.Module, directory: str | Path, *, load_path: str | Path | None = None) -> Path:
    """Write `model` in timm's Hub layout into `directory` and return the directory.

    timm's own writer (`timm.models.save_for_hf`) writes `config.json`, with the architecture arguments the model was
    created with and its pretrained configuration (mean, std, interpolation, crop, the current input size), and
    `model.safetensors`. Arguments that are Python objects (`mlp_layer=SwiGLUPacked`, `act_layer=nn.SiLU`) are
    written as the names `--model-kwargs` takes (`arguments.json_model_args`: "timm.layers.SwiGLUPacked", "silu"),
    the replacements timm asks for. `README.md` states the line that loads the directory with timm alone,
    `timm.create_model("local-dir:LOAD_PATH", pretrained=True, **LAYERS)`: the layers passed again as objects (timm
    reads timm's activation names itself, not the other names). `load_path` is where the directory will be read
    from (default: `directory`).

    Raises:
        ImportError: if timm is not installed.
        ValueError: if `model` was not created by `timm.create_model` (it has no `pretrained_cfg`), or an argument
            it was created with has no JSON form.
    """
    timm = require_timm()
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise ValueError(
            f"{type(model).__name__} has no timm pretrained_cfg: only models created by `timm.create_model` can be "
            "saved in timm's layout."
        )
    directory = Path(directory)
    replacements = json_model_args(getattr(model, "_model_args", {}), timm)
    timm.models.save_for_hf(model, directory, model_args=replacements, safe_serialization=True)
    layers = {key: value for key, value in replacements.items() if is_dotted_name(value)}
    architecture = model.pretrained_cfg.get("architecture")
    (directory / "README.md").write_text(_timm_card(str(architecture), str(load_path or directory), layers))
    logger.info("Saved the timm model %s to %s.", architecture, directory)
    return directory


def _timm_card(architecture: str, path: str, layers: Mapping[str, str]) -> str:
    """Return the README.md of a saved timm model: what it is and the exact line that loads it."""
    imports = "import timm" + (", torch" if any(name.startswith("torch.") for name in layers.values()) else "")
    return (
        f"# {architecture} (timm)\n\n"
        "Saved by sinder-peft in timm's Hub layout (`config.json`, `model.safetensors`). Load it with timm alone:\n\n"
        f"```python\n{imports}\n\n{loading_line(path, layers)}\n```\n"
    )


def _hub_repository(name: str) -> tuple[str, str | None] | None:
    """Return the repository id and revision of `hf-hub:ORG/NAME[@REVISION]` (or `hf_hub:`), None for other names."""
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            repo_id, _, revision = name[len(prefix) :].partition("@")
            return repo_id, revision or None
    return None


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Return the snapshot directory of the Hub repository `repo_id` in the local Hugging Face cache
    (`HF_HUB_CACHE`: `models--ORG--NAME/refs/REVISION` and `snapshots/COMMIT/`), without any network access.

    Raises:
        FileNotFoundError: if it is not cached, naming the command that downloads it.
    """
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as error:
        revision_flag = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"The Hub repository {repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}). "
            f"Download it first, on a machine with network access: `hf download {repo_id}{revision_flag}` (older "
            f"huggingface_hub: `huggingface-cli download {repo_id}`; gated repositories need `hf auth login` and "
            "the access granted on the repository's page), and copy the cache over if needed."
        ) from error
    if not (snapshot / "config.json").is_file() or not any((snapshot / f).is_file() for f in _TIMM_WEIGHT_FILES):
        raise FileNotFoundError(
            f"The cached snapshot {snapshot} of {repo_id} lacks timm's config.json or weights "
            f"({', '.join(_TIMM_WEIGHT_FILES)}); download the whole repository: `hf download {repo_id}`."
        )
    return snapshot


def _recorded_model_args(directory: Path) -> dict[str, Any]:
    """Return the `model_args` of the timm `config.json` in `directory` (empty when it records none)."""
    config = json.loads((directory / "config.json").read_text())
    recorded = config.get("model_args", {}) if isinstance(config, dict) else {}
    return dict(recorded) if isinstance(recorded, dict) else {}


def timm_model_kwargs(name_or_dir: str, model_kwargs: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the keyword arguments `load_timm_model` creates `name_or_dir` with, in `--model-kwargs` form (JSON):

    - for a Hub repository with a preset (`presets.PRESETS`), the preset's, without the sizes its `config.json`
      records;
    - the layers its `config.json` records by dotted name (what `save_timm_model` writes), which timm alone would
      pass on as strings;
    - overridden key by key by `model_kwargs` (`--model-kwargs`).

    Nothing is imported; the repository's `config.json` is read from the cache when there is one.

    Raises:
        ValueError: for malformed `model_kwargs` or a dotted name outside timm and torch (in `model_kwargs` or the
            recorded layers).
    """
    given = parse_model_kwargs(model_kwargs)
    repository = _hub_repository(name_or_dir)
    directory: Path | None = None
    preset: Mapping[str, Any] = {}
    if repository is not None:
        found = find_preset(repository[0])
        preset = found.kwargs if found is not None else {}
        try:
            directory = cached_snapshot(*repository)
        except FileNotFoundError:
            directory = None
    elif Path(name_or_dir).expanduser().is_dir():
        directory = Path(name_or_dir).expanduser()
    has_config = directory is not None and (directory / "config.json").is_file()
    recorded = _recorded_model_args(directory) if has_config else {}
    recorded_layers = parse_model_kwargs({key: value for key, value in recorded.items() if is_dotted_name(value)})
    return {**recorded_layers, **merge_model_kwargs(preset, recorded, given)}


def _create(timm: types.ModuleType, name: str, what: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Return `timm.create_model(name, pretrained=True, **kwargs)` with the arguments resolved, turning the errors of
    an unknown or mistyped argument into one that names the arguments."""
    resolved = resolve_model_kwargs(kwargs, timm)
    try:
        return timm.create_model(name, pretrained=True, **resolved)
    except TypeError as error:
        given = ", ".join(sorted(kwargs)) or "none"
        raise ValueError(
            f"timm cannot create {what} with the keyword arguments given ({given}): {error}. Check --model-kwargs "
            "against the model card (an unknown argument, or a value of the wrong kind)."
        ) from error


def _load_timm_directory(timm: types.ModuleType, directory: Path, kwargs: Mapping[str, Any], what: str) -> nn.Module:
    """Return the timm model of a directory in timm's Hub layout (`save_timm_model`, or a cached Hub snapshot)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json, so it is not a timm model directory (written by `save_timm_model` or "
            "timm's `save_for_hf`)."
        )
    if not any((directory / name).is_file() for name in _TIMM_WEIGHT_FILES):
        raise FileNotFoundError(f"{directory} has a config.json but no weights ({', '.join(_TIMM_WEIGHT_FILES)}).")
    return _create(timm, f"local-dir:{directory.resolve()}", what, kwargs)


def _load_cached_timm_model(timm: types.ModuleType, name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Return the timm model `name` (`architecture[.tag]`) with its pretrained weights from the Hugging Face cache."""
    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is neither a directory nor a timm model name; e.g. 'vit_small_patch14_dinov2.lvd142m' "
            "(`timm.list_models(pretrained=True)` lists them), or a Hub repository 'hf-hub:ORG/NAME'."
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
    return _create(timm, name, f"the timm model {name}", kwargs)


def load_timm_model(name_or_dir: str, model_kwargs: str | Mapping[str, Any] | None = None) -> nn.Module:
    """Return a timm model in eval mode: from a directory in timm's Hub layout (`save_timm_model`: `config.json` and
    `model.safetensors`, loaded by `timm.create_model("local-dir:PATH", pretrained=True)`), a Hub repository
    `hf-hub:ORG/NAME[@REVISION]` (or `hf_hub:`) in the local Hugging Face cache, or a timm model name
    (`architecture[.tag]`) with its pretrained weights from that cache. The keyword arguments are
    `timm_model_kwargs(name_or_dir, model_kwargs)`: a preset's for well-known repositories, overridden key by key
    by `model_kwargs` (`--model-kwargs`, JSON or a mapping).

    Raises:
        ImportError: if timm is not installed.
        FileNotFoundError: for a path that is not a timm model directory, a repository or name that is not cached.
        ValueError: for a name timm does not know, weights not on the Hub, malformed or refused `model_kwargs`, or
            arguments timm does not accept.
    """
    kwargs = timm_model_kwargs(name_or_dir, model_kwargs)
    timm = require_timm()
    repository = _hub_repository(name_or_dir)
    path = Path(name_or_dir).expanduser()
    if repository is not None:
        what = f"the Hub repository {repository[0]}"
        model = _load_timm_directory(timm, cached_snapshot(*repository), kwargs, what)
    elif path.is_dir():
        model = _load_timm_directory(timm, path, kwargs, f"the timm model in {path}")
    elif path.exists() or any(separator in name_or_dir for separator in ("/", "\\")) or name_or_dir.startswith("."):
        raise FileNotFoundError(
            f"{name_or_dir} is not a directory holding a timm model (config.json and weights); a Hub repository is "
            "named hf-hub:ORG/NAME."
        )
    else:
        model = _load_cached_timm_model(timm, name_or_dir, kwargs)
    logger.info("Loaded the timm model %s (%s) with the arguments %s.", name_or_dir, type(model).__name__, kwargs)
    return model.eval()
