"""OpenCLIP models in and out: the `ARCH[/PRETRAINED_OR_FILE]` names of `--model open_clip:...`, loading them
offline (a pretrained tag from the local cache, or a checkpoint file), their preprocessing, and saving a checkpoint
that `open_clip.create_model_and_transforms(ARCH, pretrained=FILE)` loads. The conversion of the image tower itself
is `conversion`.

`open_clip` is optional: it is imported only through `require_open_clip`, when a function here needs it.
"""

from __future__ import annotations

import difflib
import logging
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_file as save_safetensors
from torch import nn

from ...tuner.architectures import ImageNormalization
from ..extras import import_extra

logger = logging.getLogger(__name__)

# The schemas of `open_clip.create_model` ("hf-hub:org/repo", "local-dir:/path"), which an ARCH[/PRETRAINED] spec
# cannot express: their own "/" would be read as the separator.
_OPEN_CLIP_SCHEMAS: tuple[str, ...] = ("hf-hub:", "local-dir:")

# Where `open_clip.pretrained.download_pretrained_from_url` caches the files of URL-only pretrained tags.
OPEN_CLIP_URL_CACHE = Path("~/.cache/clip")

# Checkpoint formats that `open_clip.factory.load_state_dict` reads and `save_open_clip_model` writes.
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin")

# How many architecture names an error message lists besides the closest matches.
MAX_LISTED_ARCHITECTURES = 12


def require_open_clip() -> types.ModuleType:
    """Return the `open_clip` module, imported now.

    Every function of this module that needs OpenCLIP calls this first, so that sinder-peft imports and runs without
    the optional package and a missing install is reported once, with the command that fixes it.

    Raises:
        ImportError: if `open_clip` (the `open_clip_torch` package) is not installed.
    """
    return import_extra("open_clip", "open_clip", "Using OpenCLIP models (open_clip_torch)")


@dataclass(frozen=True)
class OpenClipSpec:
    """An OpenCLIP model named as `ARCH[/PRETRAINED]`.

    Attributes:
        architecture: the OpenCLIP model name (`open_clip.list_models()`), e.g. `ViT-B-16`.
        pretrained: a pretrained tag of that architecture (`open_clip.list_pretrained_tags_by_model`), e.g. `openai`,
            or a checkpoint file; None for random weights.
    """

    architecture: str
    pretrained: str | None = None


def parse_open_clip_spec(spec: str) -> OpenClipSpec:
    """Return the architecture and pretrained tag or file named by `spec`, `ARCH[/PRETRAINED_OR_FILE]`.

    Everything after the first "/" is the tag or the file, so a relative path keeps its folders
    (`ViT-B-16/runs/ckpt.safetensors`) and an absolute path follows a double slash (`ViT-B-16//data/ckpt.pt`).

    Raises:
        ValueError: for an empty spec or architecture (a spec that starts with "/" is a path without its
            architecture), a trailing "/" with nothing after it, or OpenCLIP's `hf-hub:` / `local-dir:` schemas.
    """
    if spec.startswith(_OPEN_CLIP_SCHEMAS):
        raise ValueError(
            f"OpenCLIP spec {spec!r} uses an open_clip schema ({', '.join(_OPEN_CLIP_SCHEMAS)}), which is not "
            "supported here: name a built-in or registered architecture and a local checkpoint, ARCH/PATH "
            "(e.g. 'ViT-B-16//abs/path/open_clip_model.safetensors')."
        )
    architecture, separator, pretrained = spec.partition("/")
    if not architecture:
        hint = " An absolute path needs the architecture first: 'ViT-B-16//abs/path.safetensors'." if spec else ""
        raise ValueError(f"OpenCLIP spec {spec!r} names no architecture; expected ARCH[/PRETRAINED_OR_FILE].{hint}")
    if separator and not pretrained:
        raise ValueError(
            f"OpenCLIP spec {spec!r} ends with '/' but names no pretrained tag or file; drop the '/' for random "
            "weights, or write ARCH/TAG or ARCH/PATH."
        )
    return OpenClipSpec(architecture=architecture, pretrained=pretrained or None)


@dataclass(frozen=True)
class OpenClipPreprocessing:
    """How OpenCLIP prepares images for a model (its `PreprocessCfg`), in the terms sinder-peft uses.

    Attributes:
        normalization: the per-channel mean and std applied to RGB pixels in [0, 1].
        image_size: (height, width) the images are resized and cropped to, the tower's native resolution.
        interpolation: the resampling filter of the resize, as OpenCLIP names it (`bicubic`, `bilinear`, ...).
        resize_mode: OpenCLIP's resize mode for inference: `shortest` (resize the short side, then center-crop),
            `longest` (resize the long side, then pad) or `squash` (resize to the size, ignoring the aspect ratio).
    """

    normalization: ImageNormalization
    image_size: tuple[int, int]
    interpolation: str
    resize_mode: str


def open_clip_preprocessing(model: nn.Module) -> OpenClipPreprocessing:
    """Return the preprocessing that OpenCLIP attached to `model` (or to `model.visual`).

    `open_clip.create_model` stores the final `PreprocessCfg` (the architecture's defaults, the pretrained tag's
    values, the overrides) as `visual.preprocess_cfg`; that is what is read here. A model built from OpenCLIP's classes
    directly has none: OpenCLIP's own defaults (`PreprocessCfg()`, OpenAI's mean and std, bicubic, `shortest`) with
    the tower's image size are returned then, as `open_clip.model.get_model_preprocess_cfg` would see them.

    Raises:
        ImportError: if open_clip is not installed.
        ValueError: if the mean or std has not 3 values (R, G, B) or a std is not positive.
    """
    open_clip = require_open_clip()
    tower = getattr(model, "visual", model)
    preprocess_cfg = getattr(tower, "preprocess_cfg", None)
    if not preprocess_cfg:
        logger.info(
            "%s carries no preprocess_cfg (it was not made by open_clip.create_model): using OpenCLIP's defaults.",
            type(model).__name__,
        )
        preprocess_cfg = open_clip.transform.merge_preprocess_dict(
            open_clip.transform.PreprocessCfg(), open_clip.model.get_model_preprocess_cfg(model)
        )
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return OpenClipPreprocessing(
        normalization=ImageNormalization(
            mean=tuple(float(value) for value in preprocess_cfg["mean"]),
            std=tuple(float(value) for value in preprocess_cfg["std"]),
        ),
        image_size=(height, width),
        interpolation=str(preprocess_cfg["interpolation"]),
        resize_mode=str(preprocess_cfg["resize_mode"]),
    )


def _check_architecture(open_clip: types.ModuleType, architecture: str) -> None:
    """Raise a ValueError naming close and other known architectures if OpenCLIP does not know `architecture`."""
    known = open_clip.list_models()
    if architecture in known:
        return
    close = difflib.get_close_matches(architecture, known, n=5)
    others = [name for name in known if name not in close][:MAX_LISTED_ARCHITECTURES]
    suggestion = f" Closest: {', '.join(close)}." if close else ""
    raise ValueError(
        f"Unknown OpenCLIP architecture {architecture!r}.{suggestion} Others: {', '.join(others)}, ... "
        f"({len(known)} in all, `open_clip.list_models()`). A custom architecture must be registered first with "
        "`open_clip.add_model_config(path)`, a JSON model config or a folder of them."
    )


def _safetensors_alternatives(open_clip: types.ModuleType, filename: str) -> list[str]:
    """Return the file names OpenCLIP tries for a Hub file `filename`, in its order: the safetensors twin first."""
    constants = open_clip.constants
    if filename == constants.HF_WEIGHTS_NAME:
        return [constants.HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[: -len(".bin")] + SAFETENSORS_SUFFIX, filename]
    return [filename]


def _cached_pretrained_file(
    open_clip: types.ModuleType, tag_cfg: Mapping[str, object]
) -> tuple[str | None, list[str]]:
    """Return the local file of a pretrained tag's weights, if already cached, and the places looked at.

    Nothing is downloaded: the Hugging Face cache is read with `try_to_load_from_cache` (the `hf_hub` entry,
    `org/repo/filename`, whose default file is OpenCLIP's `open_clip_pytorch_model.bin` and its safetensors twin), then
    OpenCLIP's own URL cache (`~/.cache/clip/<file name of the url>`), as `open_clip.pretrained.download_pretrained`
    would find them.
    """
    looked_at: list[str] = []
    if tag_cfg.get("file"):
        file = Path(str(tag_cfg["file"])).expanduser()
        looked_at.append(str(file))
        if file.is_file():
            return str(file), looked_at
    hf_hub = str(tag_cfg.get("hf_hub") or "")
    if hf_hub:
        repo_id, filename = os.path.split(hf_hub)
        for name in _safetensors_alternatives(open_clip, filename or open_clip.constants.HF_WEIGHTS_NAME):
            looked_at.append(f"Hugging Face cache: {repo_id}/{name}")
            cached = try_to_load_from_cache(repo_id, name)
            if isinstance(cached, str):
                return cached, looked_at
    url = str(tag_cfg.get("url") or "")
    if url:
        target = OPEN_CLIP_URL_CACHE.expanduser() / os.path.basename(url)
        looked_at.append(str(target))
        if target.is_file():
            return str(target), looked_at
    return None, looked_at


def _resolve_pretrained(open_clip: types.ModuleType, spec: OpenClipSpec) -> tuple[str, dict[str, object]]:
    """Return the checkpoint file that `spec.pretrained` names, and the preprocessing overrides of its tag.

    A file wins over a tag of the same name. A tag is resolved to its already-cached file (`_cached_pretrained_file`)
    and its preprocessing (mean, std, interpolation, resize mode) is returned as `create_model_and_transforms`
    arguments, so that the model is what `create_model_and_transforms(ARCH, pretrained=TAG)` gives, without a download.

    Raises:
        FileNotFoundError: if a tag's weights are not in the local cache, or a path names no file.
        ValueError: if `spec.pretrained` is neither a tag of the architecture nor a path.
    """
    pretrained = str(spec.pretrained)
    file = Path(pretrained).expanduser()
    if file.is_file():
        return str(file), {}
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(spec.architecture, pretrained)
    if tag_cfg:
        cached, looked_at = _cached_pretrained_file(open_clip, tag_cfg)
        if cached is None:
            raise FileNotFoundError(
                f"The weights of OpenCLIP's pretrained tag {spec.architecture}/{pretrained} are not in the local cache"
                f" (looked at: {'; '.join(looked_at)}), and nothing is downloaded here. Download them once where "
                f"there is internet, `open_clip.create_model_and_transforms({spec.architecture!r}, pretrained="
                f"{pretrained!r})`, or name the checkpoint file: {spec.architecture}/PATH."
            )
        model_cfg = open_clip.get_model_config(spec.architecture) or {}
        if bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
            logger.warning(
                "OpenCLIP's tag %s/%s was trained with quick_gelu=%s, but the architecture %s has quick_gelu=%s; "
                "OpenCLIP builds the architecture as named (it only warns too). The QuickGELU variants are named "
                "ARCH-quickgelu.",
                spec.architecture,
                pretrained,
                bool(tag_cfg.get("quick_gelu", False)),
                spec.architecture,
                bool(model_cfg.get("quick_gelu", False)),
            )
        overrides = {
            "image_mean": tag_cfg.get("mean"),
            "image_std": tag_cfg.get("std"),
            "image_interpolation": tag_cfg.get("interpolation"),
            "image_resize_mode": tag_cfg.get("resize_mode"),
        }
        logger.info("Using the cached weights of %s/%s: %s", spec.architecture, pretrained, cached)
        return cached, overrides
    if os.sep in pretrained or "/" in pretrained or file.suffix in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        raise FileNotFoundError(
            f"No OpenCLIP checkpoint file at {file} (from the spec {spec.architecture}/{pretrained})."
        )
    tags = open_clip.list_pretrained_tags_by_model(spec.architecture)
    raise ValueError(
        f"{pretrained!r} is neither a pretrained tag of OpenCLIP's {spec.architecture} (its tags: "
        f"{', '.join(tags) if tags else 'none'}) nor a checkpoint file."
    )


def load_open_clip_model(spec: str | OpenClipSpec) -> tuple[nn.Module, OpenClipPreprocessing]:
    """Return the OpenCLIP model named by `spec` (`ARCH[/PRETRAINED_OR_FILE]`), in eval mode, and its preprocessing.

    The model is built by `open_clip.create_model_and_transforms(ARCH, pretrained=...)`, offline: a pretrained tag is
    read from the local cache (with the tag's preprocessing), a file is loaded as OpenCLIP loads it (a state dict in a
    `.safetensors`, `.pt`, `.pth` or `.bin` file; a position table of another size is resized by OpenCLIP), and no
    pretrained part means random weights (warned about).

    Raises:
        ImportError: if open_clip is not installed.
        ValueError: for a malformed spec, an architecture OpenCLIP does not know (naming close and other ones), or a
            pretrained part that is neither a tag of the architecture nor a path.
        FileNotFoundError: if a tag's weights are not cached, or a path names no file.
    """
    open_clip = require_open_clip()
    if isinstance(spec, str):
        spec = parse_open_clip_spec(spec)
    _check_architecture(open_clip, spec.architecture)
    checkpoint: str | None = None
    overrides: dict[str, object] = {}
    if spec.pretrained is None:
        logger.warning("No pretrained weights named for OpenCLIP's %s: its weights are random.", spec.architecture)
    else:
        checkpoint, overrides = _resolve_pretrained(open_clip, spec)
    model, _, _ = open_clip.create_model_and_transforms(spec.architecture, pretrained=checkpoint, **overrides)
    model.eval()
    return model, open_clip_preprocessing(model)


def save_open_clip_model(model: nn.Module, path: str | Path) -> Path:
    """Write the whole OpenCLIP model's state dict to `path` and return `path`.

    The file is what OpenCLIP's `load_checkpoint` reads: a plain state dict (every tower, `logit_scale`), as
    safetensors for a `.safetensors` path, else with `torch.save` (`.pt`, `.pth`, `.bin`), so that
    `open_clip.create_model_and_transforms(ARCH, pretrained=str(path))` loads it back identically, without sinder-peft.

    Raises:
        ImportError: if open_clip is not installed.
        ValueError: if `model` is a bare image tower (OpenCLIP loads whole models only) or the suffix is none of those.
    """
    open_clip = require_open_clip()
    path = Path(path)
    if isinstance(model, open_clip.transformer.VisionTransformer) or not hasattr(model, "visual"):
        raise ValueError(
            f"save_open_clip_model writes whole OpenCLIP models (with `.visual`), which create_model_and_transforms "
            f"loads; got a {type(model).__name__}."
        )
    if path.suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        raise ValueError(
            f"OpenCLIP reads checkpoints ending in {SAFETENSORS_SUFFIX} or {', '.join(TORCH_SUFFIXES)}; got {path}."
        )
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS_SUFFIX:
        save_safetensors(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    logger.info("Saved the OpenCLIP model (%d tensors) to %s.", len(state_dict), path)
    return path
