"""Models of other libraries: `timm:NAME_OR_DIR` and `open_clip:ARCH[/PRETRAINED_OR_FILE]`.

The tool keeps one internal representation, the transformers class of the same architecture. A timm or OpenCLIP model
enters through an exact conversion (`timm_conversion`, `open_clip_conversion`: the same outputs up to float32
rounding) and leaves the same way: a repair writes the repaired weights back into the source model and saves it in
its own library's format, so that `timm.create_model("local-dir:PATH")` or
`open_clip.create_model_and_transforms(ARCH, pretrained=FILE)` loads the result without sinder-peft.

Images are prepared with the source's own pretrained configuration: its mean and std, and, for the image processor
saved beside the transformers version, its interpolation and crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from ..tuner.architectures import ImageNormalization
from .open_clip_conversion import open_clip_to_transformers, transformers_to_open_clip
from .open_clip_loading import load_open_clip_model, open_clip_preprocessing, save_open_clip_model
from .processor import bit_image_processor
from .timm_conversion import timm_to_transformers, transformers_to_timm
from .timm_loading import load_timm_model, save_timm_model, timm_preprocessing

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


@dataclass(frozen=True)
class ModelName:
    """What `--model` names: the library it comes from and the name within it.

    Attributes:
        library: "transformers" (a Hub id, a directory written by `save_pretrained`, or `demo`), "timm" or
            "open_clip".
        name: the name without its prefix (`NAME_OR_DIR` for timm, `ARCH[/PRETRAINED_OR_FILE]` for OpenCLIP).
    """

    library: ModelLibrary
    name: str

    @property
    def is_foreign(self) -> bool:
        """Whether the model comes from timm or OpenCLIP."""
        return self.library != "transformers"


def parse_model_name(model: str) -> ModelName:
    """Return the library and name that `--model` names.

    A name with a prefix `timm:` or `open_clip:` is a model of that library; any other name is a transformers model.
    A name that starts like a prefix (`word:`) but is neither a known prefix nor an existing path is refused, so
    that a typo (`tim:...`) does not end in a confusing "no such Hub id".

    Raises:
        ValueError: for an unknown prefix, or a prefix without a name.
    """
    for prefix, library in MODEL_PREFIXES.items():
        if model.startswith(prefix):
            name = model[len(prefix) :]
            if not name:
                raise ValueError(f"--model {model!r} names no model after {prefix!r}.")
            return ModelName(library, name)
    head, colon, _ = model.partition(":")
    if colon and head.isidentifier() and len(head) > 1 and not Path(model).expanduser().exists():
        known = ", ".join(MODEL_PREFIXES)
        raise ValueError(
            f"--model {model!r} has an unknown prefix {head + ':'!r}; the prefixes are {known} (timm:NAME_OR_DIR, "
            "open_clip:ARCH[/PRETRAINED_OR_FILE]), and a transformers model needs none."
        )
    return ModelName("transformers", model)


def load_foreign_model(model: ModelName) -> nn.Module:
    """Return the timm or OpenCLIP model `model` names, in its own library's class (eval mode)."""
    if model.library == "timm":
        return load_timm_model(model.name)
    loaded, _ = load_open_clip_model(model.name)
    return loaded


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


def save_in_source_format(model: ModelName, repaired: PreTrainedModel, directory: Path) -> Path:
    """Write the repaired transformers model back in the format of the library it came from, into `directory`, and
    return what a user loads:

    - timm: the source model (loaded again) with the repaired weights written into it, saved as `config.json` and
      `model.safetensors`, which `timm.create_model("local-dir:DIRECTORY")` loads (its pretrained configuration,
      and so its preprocessing, kept);
    - OpenCLIP: the whole source model (text tower untouched) with the repaired image tower, as
      `DIRECTORY/open_clip_model.safetensors`, which `open_clip.create_model_and_transforms(ARCH, pretrained=FILE)`
      loads.
    """
    native = load_foreign_model(model)
    directory = Path(directory)
    if model.library == "timm":
        transformers_to_timm(repaired, native)
        return save_timm_model(native, directory)
    transformers_to_open_clip(repaired, native)
    directory.mkdir(parents=True, exist_ok=True)
    return save_open_clip_model(native, directory / OPEN_CLIP_FILE)
