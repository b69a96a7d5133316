"""Load a model with a ViT backbone of a supported family, and the image normalization it was trained with, from
whatever `--model` names.

`--model` may be `"demo"` (the planted-defect demo model, no download), a local directory written by
`save_pretrained` (or the output directory of `sinder repair`, which holds one in `model/`), a Hub id such as
`facebook/dinov2-base`, or a timm or OpenCLIP model (`timm:NAME_OR_DIR`, `open_clip:ARCH[/PRETRAINED_OR_FILE]`),
converted to the transformers class of the same architecture (`other_libraries`). The model is loaded as the class it
was saved as (`config.architectures`), so a task model or a whole model (`Dinov2ForImageClassification`,
`DepthAnythingForDepthEstimation`, `CLIPModel`...) comes back whole: the repair adapts its backbone and merges into the
whole model.

Hub ids are looked up in the local Hugging Face cache first, so a cached model loads without any network access; only
when it is not cached (and the Hub is not switched off with `HF_HUB_OFFLINE=1`) is it downloaded. Every way this
can fail ends in one exception with a message that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from huggingface_hub import constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import AutoConfig, AutoModel, ImageProcessingMixin, PretrainedConfig, PreTrainedModel

from ..synthetic.demo import build_demo_model
from ..tuner.architectures import ImageNormalization, describe_config, describe_model
from .other_libraries import (
    ModelName,
    foreign_processor_config,
    foreign_to_transformers,
    load_foreign_model,
    parse_model_name,
)

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"
TRANSFORMERS_MODEL_DIR = "model-transformers"
"""Where a repair of a timm or OpenCLIP model writes the transformers version (`model/` holds the source's format)."""

_Loaded = TypeVar("_Loaded")


class ModelNotAvailableError(RuntimeError):
    """The model is neither a local directory nor in the local Hugging Face cache, and could not be downloaded."""


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` is a valid Hub repository id (`name` or `namespace/name`) rather than a file system path."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _resolve_local_directory(directory: Path) -> Path:
    """Return the directory holding `config.json`: `directory` itself, or, in a `sinder repair` output directory, its
    `model-transformers/` (the transformers version of a repaired timm or OpenCLIP model) or its `model/`.

    Raises:
        FileNotFoundError: if none holds a `config.json`.
    """
    if (directory / "config.json").is_file():
        return directory
    if (directory / TRANSFORMERS_MODEL_DIR / "config.json").is_file():
        logger.info("Loading the transformers version in %s/%s.", directory, TRANSFORMERS_MODEL_DIR)
        return directory / TRANSFORMERS_MODEL_DIR
    if (directory / "model" / "config.json").is_file():
        logger.info("Loading the merged model in %s/model (a `sinder repair` output directory).", directory)
        return directory / "model"
    hint = ""
    if (directory / "adapter_config.json").is_file():
        hint = (
            " It holds a PEFT adapter (adapter_config.json), not a full model: pass the merged `model/` directory "
            "written next to it by `sinder repair`, or load the base model and `PeftModel.from_pretrained` it."
        )
    raise FileNotFoundError(
        f"The directory {str(directory)!r} has no config.json, so it is not a model written by "
        f"`save_pretrained`.{hint}"
    )


def _cache_first(loader: Callable[..., _Loaded], source: str, **kwargs: Any) -> _Loaded:
    """Call `loader(source, **kwargs)` on the local cache only, then, if that fails and the Hub is allowed, online.

    Trying the cache first makes a cached model load instantly without network access (transformers would otherwise
    contact the Hub, and retry for tens of seconds when it cannot be reached).
    """
    try:
        return loader(source, local_files_only=True, **kwargs)
    except OSError:
        if constants.HF_HUB_OFFLINE:
            raise
    return loader(source, **kwargs)


def _not_available(name: str, error: OSError) -> ModelNotAvailableError:
    """Build the error raised when the Hub id `name` is neither cached nor downloadable, keeping the cause short."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = (
        "the Hub is switched off (HF_HUB_OFFLINE=1)"
        if constants.HF_HUB_OFFLINE
        else "it could not be downloaded (no network, or no such repository)"
    )
    return ModelNotAvailableError(
        f"Cannot load the model {name!r}: there is no local directory of that name, it is not in the local Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}), and {offline}. To get it, run `hf download {name}` (older "
        f"huggingface_hub: `huggingface-cli download {name}`) on a machine with network access and copy the cache "
        "over, or pass a local directory written by `save_pretrained`. "
        f"Cause: {reason}"
    )


def _per_channel(value: float | Sequence[float]) -> tuple[float, ...]:
    """Return an image processor's mean or std as a tuple of floats (a single number applies to every channel)."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(entry) for entry in value)


def load_image_processor_config(source: str | Path) -> dict[str, Any] | None:
    """Return the image processor config (`preprocessor_config.json`, what `AutoImageProcessor` loads) of the model
    at `source` as a dict, or None when it has none.

    `source` is a local model directory or a Hub id (local cache first, the Hub when online). The config is read as
    a dict rather than instantiated, so no image-processing backend (torchvision) is needed.
    """
    try:
        config, _ = _cache_first(ImageProcessingMixin.get_image_processor_dict, str(source))
    except (OSError, ValueError) as error:
        logger.info("No image processor config found for %s (%s).", source, error)
        return None
    return config


def normalization_from_processor_config(
    config: dict[str, Any] | None, default: ImageNormalization | None = None
) -> ImageNormalization:
    """Return the `image_mean` / `image_std` of an image processor config, or `default` (the ImageNet mean/std when
    None) when there is no config or it does not set both."""
    default = default or ImageNormalization()
    if config is None:
        return default
    mean, std = config.get("image_mean"), config.get("image_std")
    if mean is None or std is None:
        logger.info(
            "The image processor sets no image_mean/image_std; using mean %s, std %s.", default.mean, default.std
        )
        return default
    return ImageNormalization(mean=_per_channel(mean), std=_per_channel(std))


def load_normalization(source: str | Path, default: ImageNormalization | None = None) -> ImageNormalization:
    """Return the image normalization of the model at `source` (local directory or Hub id): that of its image
    processor config, or `default` (the ImageNet mean/std when None) when it has none."""
    return normalization_from_processor_config(load_image_processor_config(source), default)


def _resolve_source(model: str) -> tuple[str, bool]:
    """Return where to load `model` (not "demo") from, and whether that is a Hub id.

    Raises:
        FileNotFoundError: `model` is a file, a directory without a model, or neither a path nor a Hub id.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(_resolve_local_directory(path)), False
    if path.exists():
        raise FileNotFoundError(
            f"{model!r} is a file; --model takes a directory written by `save_pretrained`, a Hub id or 'demo'."
        )
    if looks_like_hub_id(model):
        return model, True
    raise FileNotFoundError(
        f"{model!r} does not exist and is not a Hub id (like 'facebook/dinov2-base'); --model takes a directory "
        "written by `save_pretrained`, a Hub id or 'demo'."
    )


def _load_config(source: str, name: str, from_hub: bool) -> PretrainedConfig:
    """Load the config of `source` and check that the model has a backbone of a supported ViT family, before any
    weights are read.

    Raises:
        ModelNotAvailableError: if `source` is a Hub id that is neither cached nor downloadable.
        ValueError: if the model has no backbone of a supported family.
    """
    if from_hub:
        try:
            config = _cache_first(AutoConfig.from_pretrained, source)
        except OSError as error:
            raise _not_available(name, error) from error
    else:
        config = AutoConfig.from_pretrained(source)
    try:
        describe_config(config)
    except ValueError as error:
        raise ValueError(f"Cannot use {name!r}: {error}") from error
    return config


def model_class(config: PretrainedConfig) -> type[PreTrainedModel] | type[AutoModel]:
    """Return the class to load a model of config `config` with: the transformers class it was saved as
    (`config.architectures[0]`), or `AutoModel` when the config names none that transformers has.

    The saved class keeps task models and whole models whole (`AutoModel` would load a `Dinov2Backbone` as a
    `Dinov2Model`, drop the head of `Dinov2ForImageClassification`, and refuses `DepthAnythingForDepthEstimation`);
    `AutoBackbone.from_pretrained` of a local directory is broken in transformers 5.24, the class itself is not.
    """
    for name in getattr(config, "architectures", None) or ():
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, PreTrainedModel):
            return candidate
    return AutoModel


def load_backbone(
    model: str, *, dtype: torch.dtype | None = None, model_kwargs: str | Mapping[str, Any] | None = None
) -> tuple[nn.Module, ImageNormalization]:
    """Load the model named by `model`, in eval mode, with the normalization its images need.

    Args:
        model: `"demo"`, a local directory written by `save_pretrained` (or a `sinder repair` output directory), a
            Hub id such as `facebook/dinov2-base`, `facebook/dinov2-with-registers-small` or
            `openai/clip-vit-base-patch16`, or a model of another library: `timm:NAME_OR_DIR` (a timm model name
            with weights in the local cache, or a directory timm's `local-dir:` loads) or
            `open_clip:ARCH[/PRETRAINED_OR_FILE]`, converted exactly to the transformers class of the same
            architecture (`other_libraries`); `timm:hf-hub:ORG/NAME` is a Hub repository in the local cache.
        dtype: dtype to load the weights in; `None` keeps the checkpoint's.
        model_kwargs: for a timm model, keyword arguments of `timm.create_model` (`--model-kwargs`: JSON or a
            mapping; layers as dotted names inside timm and torch), over the preset of a known Hub repository.

    Returns:
        The whole model, as the class it was saved as (see `model_class`): a bare backbone (`Dinov2Model`,
        `CLIPVisionModel`...) or a model holding one (`CLIPModel`, `DepthAnythingForDepthEstimation`...), whose
        backbone `sinder_peft.tuner.architectures.unwrap_backbone` finds; and the `ImageNormalization` from its image
        processor (the family's usual mean/std when it has none: ImageNet for DINOv2, DINOv3 and DeiT, OpenAI's
        for CLIP, 0.5/0.5 for SigLIP and ViT).

    Raises:
        FileNotFoundError: `model` is neither an existing path nor shaped like a Hub id, or a directory without a
            model in it.
        ModelNotAvailableError: a Hub id that is not cached and cannot be downloaded (offline, no network, no such
            repository).
        ValueError: the model has no ViT backbone of a supported family (the message names the supported ones), an
            unknown `prefix:`, or `model_kwargs` malformed, refused or given for a model that is not a timm model.
        ImportError: a timm or OpenCLIP model without that library installed (the message says what to install).
    """
    name = parse_model_name(model, model_kwargs)
    if name.is_foreign:
        converted, normalization, _ = _load_converted(name, dtype)
        return converted, normalization
    if model == DEMO_MODEL_NAME:
        backbone = build_demo_model()
        if dtype is not None:
            backbone = backbone.to(dtype)
        return backbone.eval(), ImageNormalization()

    source, from_hub = _resolve_source(model)

    config = _load_config(source, model, from_hub)
    loader = model_class(config)
    load_kwargs: dict[str, Any] = {"config": config}
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if from_hub:
        try:
            loaded = _cache_first(loader.from_pretrained, source, **load_kwargs)
        except OSError as error:
            raise _not_available(model, error) from error
    else:
        loaded = loader.from_pretrained(source, **load_kwargs)
    try:
        description = describe_model(loaded)
    except ValueError as error:
        raise ValueError(f"Cannot use {model!r}: {error}") from error
    logger.info("Loaded %s (%s) from %s.", type(loaded).__name__, config.model_type, source)
    family_default = ImageNormalization(mean=description.image_mean, std=description.image_std)
    return loaded.eval(), load_normalization(source, family_default)


def _load_converted(name: ModelName, dtype: torch.dtype | None) -> tuple[nn.Module, ImageNormalization, nn.Module]:
    """Return the transformers version of the timm or OpenCLIP model `name` (in `dtype` when given), its
    normalization, and the source model itself."""
    native = load_foreign_model(name)
    converted, normalization = foreign_to_transformers(name, native)
    logger.info(
        "Converted %s:%s (%s) to %s.", name.library, name.name, type(native).__name__, type(converted).__name__
    )
    return (converted.to(dtype) if dtype is not None else converted), normalization, native


def load_backbone_and_processor_config(
    model: str, model_kwargs: str | Mapping[str, Any] | None = None
) -> tuple[nn.Module, ImageNormalization, dict[str, Any] | None]:
    """Return `load_backbone(model, model_kwargs=model_kwargs)` and the model's image processor config, or None when
    it has none (the demo model). For a timm or OpenCLIP model the config is the `BitImageProcessor` that reproduces
    the source's own preprocessing (`other_libraries.foreign_processor_config`), and the source is loaded once for
    both."""
    name = parse_model_name(model, model_kwargs)
    if name.is_foreign:
        converted, normalization, native = _load_converted(name, None)
        return converted, normalization, foreign_processor_config(name, native)
    backbone, normalization = load_backbone(model)
    if model == DEMO_MODEL_NAME:
        return backbone, normalization, None
    source, _ = _resolve_source(model)
    return backbone, normalization, load_image_processor_config(source)
