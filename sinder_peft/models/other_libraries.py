"""Models of other libraries: `timm:NAME_OR_DIR` and `open_clip:ARCH[/PRETRAINED_OR_FILE]`.

The tool keeps one internal representation, the transformers class of the same architecture. A timm or OpenCLIP model
enters through an exact conversion (`timm.conversion`, `open_clip.conversion`: the same outputs up to float32
rounding) and leaves the same way: a repair writes the repaired weights back into the source model and saves it in
its own library's format, so that `timm.create_model("local-dir:PATH")` or
`open_clip.create_model_and_transforms(ARCH, pretrained=FILE)` loads the result without sinder-peft.

Images are prepared with the source's own pretrained configuration: its mean and std, and, for the image processor
saved beside the transformers version, its interpolation and crop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from ..tuner.architectures import ImageNormalization
from .open_clip.conversion import open_clip_to_transformers, transformers_to_open_clip
from .open_clip.loading import load_open_clip_model, open_clip_preprocessing, save_open_clip_model
from .processor import bit_image_processor
from .timm.arguments import parse_model_kwargs
from .timm.conversion import timm_to_transformers, transformers_to_timm
from .timm.loading import load_timm_model, save_timm_model, timm_model_kwargs, timm_preprocessing

ModelLibrary = Literal["transformers", "timm", "open_clip"]
MODEL_PREFIXES: dict[str, ModelLibrary] = {"timm:": "timm", "open_clip:": "open_clip"}
"""`--model` prefixes that name a model of another library, and the library."""
OPEN_CLIP_FILE = "open_clip_model.safetensors"
"""The checkpoint a repair of an OpenCLIP model writes in `model/`."""

_RESAMPLING: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


MODEL_KWARGS_HELP = (
    "timm models: keyword arguments of timm.create_model as a JSON object, e.g. "
    '\'{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "init_values": 1e-5}\' (layers by '
    'dotted names inside timm and torch, or timm\'s activation names such as "silu"); overrides the preset of a '
    "known Hub repository key by key"
)


@dataclass
class ModelKwargsArguments:
    """The `--model-kwargs` flag, defined once for `sinder repair`, `diagnose`, `evaluate` and `convert` (their
    argument dataclasses derive from this one, the argparse parsers take it as a parent:
    `HfArgumentParser(ModelKwargsArguments, add_help=False)`). The JSON is checked when the arguments are made,
    before anything is loaded or written."""

    model_kwargs: str | None = field(default=None, kw_only=True, metadata={"help": MODEL_KWARGS_HELP})

    def __post_init__(self) -> None:
        parse_model_kwargs(self.model_kwargs)


@dataclass(frozen=True)
class ModelName:
    """What `--model` names: the library it comes from and the name within it.

    Attributes:
        library: "transformers" (a Hub id, a directory written by `save_pretrained`, or `demo`), "timm" or
            "open_clip".
        name: the name without its prefix (`NAME_OR_DIR` for timm, `ARCH[/PRETRAINED_OR_FILE]` for OpenCLIP).
        kwargs: for timm, the keyword arguments of `timm.create_model` given with `--model-kwargs` (JSON form,
            checked); the preset of a known Hub repository adds its own when the model is loaded.
    """

    library: ModelLibrary
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_foreign(self) -> bool:
        """Whether the model comes from timm or OpenCLIP."""
        return self.library != "transformers"


def parse_model_name(model: str, model_kwargs: str | Mapping[str, Any] | None = None) -> ModelName:
    """Return the library and name that `--model` names, with the keyword arguments `model_kwargs`
    (`--model-kwargs`, JSON or a mapping) for a timm model.

    A name with a prefix `timm:` or `open_clip:` is a model of that library; any other name is a transformers model.
    A name that starts like a prefix (`word:`) but is neither a known prefix nor an existing path is refused, so
    that a typo (`tim:...`) does not end in a confusing "no such Hub id".

    Raises:
        ValueError: for an unknown prefix, a prefix without a name, malformed or refused `model_kwargs`
            (`timm.arguments.parse_model_kwargs`), or `model_kwargs` for a model that is not a timm model.
    """
    kwargs = parse_model_kwargs(model_kwargs)
    if kwargs and not model.startswith("timm:"):
        raise ValueError(
            f"--model-kwargs applies to timm models (timm:NAME_OR_DIR, timm:hf-hub:ORG/NAME), not to {model!r}."
        )
    for prefix, library in MODEL_PREFIXES.items():
        if model.startswith(prefix):
            name = model[len(prefix) :]
            if not name:
                raise ValueError(f"--model {model!r} names no model after {prefix!r}.")
            return ModelName(library, name, kwargs)
    head, colon, _ = model.partition(":")
    if colon and head.isidentifier() and len(head) > 1 and not Path(model).expanduser().exists():
        known = ", ".join(MODEL_PREFIXES)
        raise ValueError(
            f"--model {model!r} has an unknown prefix {head + ':'!r}; the prefixes are {known} (timm:NAME_OR_DIR, "
            "timm:hf-hub:ORG/NAME, open_clip:ARCH[/PRETRAINED_OR_FILE]), and a transformers model needs none."
        )
    return ModelName("transformers", model)


def load_foreign_model(model: ModelName) -> nn.Module:
    """Return the timm or OpenCLIP model `model` names, in its own library's class (eval mode)."""
    if model.library == "timm":
        return load_timm_model(model.name, model.kwargs)
    loaded, _ = load_open_clip_model(model.name)
    return loaded


def foreign_model_kwargs(model: ModelName) -> dict[str, Any]:
    """Return the keyword arguments the model is created with (JSON form): for timm, the preset's and
    `--model-kwargs`' (`timm.loading.timm_model_kwargs`); none for OpenCLIP and transformers models."""
    return timm_model_kwargs(model.name, model.kwargs) if model.library == "timm" else {}


def foreign_to_transformers(model: ModelName, native: nn.Module) -> tuple[PreTrainedModel, ImageNormalization]:
    """Return the transformers version of a timm or OpenCLIP model (`native`), in eval mode, and the normalization
    of its pretrained configuration."""
    if model.library == "timm":
        return timm_to_transformers(native).eval(), timm_preprocessing(native).normalization
    return open_clip_to_transformers(native).eval(), open_clip_preprocessing(native).normalization


def foreign_processor_config(model: ModelName, native: nn.Module) -> dict[str, Any] | None:
    """Return the image processor config (`BitImageProcessor`) that reproduces the source's own preprocessing: resize
    the short side, centre crop, normalize, with its interpolation and crop fraction. None when the source resizes in
    a way that processor does not reproduce (OpenCLIP's `squash` and `longest` modes); the repair then writes its
    own (`processor.default_image_processor`)."""
    if model.library == "timm":
        preprocessing = timm_preprocessing(native)
        _, height, width = preprocessing.input_size
        crop_pct = preprocessing.crop_pct if preprocessing.crop_mode == "center" else 1.0
        short_side = int(min(height, width) / crop_pct)
        interpolation, normalization = preprocessing.interpolation, preprocessing.normalization
    else:
        preprocessing = open_clip_preprocessing(native)
        if preprocessing.resize_mode != "shortest":
            return None
        height, width = preprocessing.image_size
        short_side = min(height, width)
        interpolation, normalization = preprocessing.interpolation, preprocessing.normalization
    resample = _RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)
    processor = bit_image_processor(normalization, short_side, (height, width), resample)
    config = processor.to_dict()
    config["image_processor_type"] = "BitImageProcessor"
    return config


def save_in_source_format(
    model: ModelName, repaired: PreTrainedModel, directory: Path, *, load_path: Path | None = None
) -> Path:
    """Write the repaired transformers model back in the format of the library it came from, into `directory`, and
    return what a user loads:

    - timm: the source model (loaded again, with the same keyword arguments) with the repaired weights written into
      it, saved as `config.json`, `model.safetensors` and a `README.md` with the loading line
      (`timm.loading.save_timm_model`; `load_path` is where the directory will be read from, default `directory`),
      which `timm.create_model("local-dir:DIRECTORY", pretrained=True, **LAYERS)` loads (its pretrained
      configuration, and so its preprocessing, kept);
    - OpenCLIP: the whole source model (text tower untouched) with the repaired image tower, as
      `DIRECTORY/open_clip_model.safetensors`, which `open_clip.create_model_and_transforms(ARCH, pretrained=FILE)`
      loads.
    """
    native = load_foreign_model(model)
    directory = Path(directory)
    if model.library == "timm":
        transformers_to_timm(repaired, native)
        return save_timm_model(native, directory, load_path=load_path)
    transformers_to_open_clip(repaired, native)
    directory.mkdir(parents=True, exist_ok=True)
    return save_open_clip_model(native, directory / OPEN_CLIP_FILE)
