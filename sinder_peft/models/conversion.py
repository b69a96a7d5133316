"""`sinder convert`: a model from one format to another (`convert_model`): an original-layout DINOv2 checkpoint
file into a transformers model directory with a card that names its source (`convert_checkpoint`), timm and
OpenCLIP models into transformers and back, a transformers model into the original layout; optionally onto the Hub.
The mappings themselves are `original_layout`, `timm.conversion` and `open_clip.conversion`."""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from ..version import __version__
from .hub import push_folder_to_hub
from .loading import ModelNotAvailableError, load_backbone
from .original_layout import (
    DinoV2Backbone,
    describe_original_config,
    export_original_checkpoint,
    load_original_checkpoint,
)
from .other_libraries import (
    ModelKwargsArguments,
    foreign_processor_config,
    foreign_to_transformers,
    load_foreign_model,
    parse_model_name,
    save_in_source_format,
)
from .processor import save_image_processor

logger = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks (checkpoints reach several GiB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_card(model: DinoV2Backbone, source: Path, sha256: str, repo_id: str | None) -> str:
    """Return the README.md of a converted model: provenance (file name, SHA-256, converter) and how to load it."""
    location = repo_id if repo_id is not None else "path/to/this/directory"
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    return f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags:
- dinov2
- sinder-peft
---

# {type(model).__name__} converted from an original DINOv2-layout checkpoint

These weights were converted to the transformers layout by sinder-peft {__version__} (`sinder convert`), without
changing any value.

- Source file: `{source.name}`
- SHA-256 of the source file: `{sha256}`
- Architecture: {describe_original_config(model.config)}; {num_parameters:,} parameters
- Converted with `sinder_peft.load_original_checkpoint` (query/key/value and SwiGLU gate/up matrices split, every
  key checked, strict loading)

## Usage

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("{location}")
pixel_values = torch.randn(1, 3, 224, 224)  # ImageNet-normalized images, sides multiple of {model.config.patch_size}
features = model(pixel_values=pixel_values).last_hidden_state
```

At the native resolution ({model.config.image_size} px) the features equal those of the original code. At other
resolutions transformers interpolates the position embeddings with its own settings, which can differ slightly from
the original repository's (`interpolate_offset`, `interpolate_antialias`).
"""


def convert_checkpoint(checkpoint: str | Path, output_dir: str | Path, repo_id: str | None = None) -> Path:
    """Convert an original-layout checkpoint file into a transformers model directory and return its path.

    The directory holds `config.json`, `model.safetensors` (via `save_pretrained`) and a `README.md` model card
    naming the source file and its SHA-256; `repo_id`, if given, is the repository the card's snippet loads from.
    """
    checkpoint = Path(checkpoint)
    model = load_original_checkpoint(checkpoint)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    card = _model_card(model, checkpoint, _file_sha256(checkpoint), repo_id)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    logger.info("Wrote the converted model to %s.", output_dir)
    return output_dir


CONVERSION_FORMATS: tuple[str, ...] = ("original", "transformers", "timm", "open_clip")
"""What `sinder convert --from/--to` take: the original DINOv2 checkpoint layout, a transformers model directory, a
timm model (NAME_OR_DIR) and an OpenCLIP model (ARCH[/PRETRAINED_OR_FILE])."""


def convert_model(
    source: str,
    output: str | Path,
    *,
    source_format: str,
    target_format: str,
    template: str | None = None,
    model_kwargs: str | Mapping[str, Any] | None = None,
) -> Path:
    """Convert the model `source` (in `source_format`) to `target_format` at `output`, and return what was written.

    - original -> transformers: `convert_checkpoint` (a model directory with a provenance card);
    - timm / open_clip -> transformers: the exact conversion of `other_libraries`, saved with `save_pretrained` and
      the image processor that reproduces the source's preprocessing;
    - transformers -> original: `export_original_checkpoint` (a `.pth`, `.pt` or `.safetensors` file);
    - transformers -> timm / open_clip: the weights written into `template` (a model of that library with the same
      architecture, e.g. the one the transformers model was converted from) and saved in its own format.

    `model_kwargs` (`--model-kwargs`) are the `timm.create_model` arguments of the timm source or template.

    Raises:
        ValueError: for a pair of formats that has no conversion, or a missing `template`.
    """
    output = Path(output)
    pair = (source_format, target_format)
    if pair == ("original", "transformers"):
        return convert_checkpoint(source, output)
    if source_format in ("timm", "open_clip") and target_format == "transformers":
        name = parse_model_name(f"{source_format}:{source}", model_kwargs)
        native = load_foreign_model(name)
        converted, normalization = foreign_to_transformers(name, native)
        converted.save_pretrained(output)
        processor_config = foreign_processor_config(name, native)
        save_image_processor(output, processor_config, normalization, converted.config.image_size)
        return output
    if source_format == "transformers" and target_format in ("original", "timm", "open_clip"):
        model, _ = load_backbone(source)
        if target_format == "original":
            export_original_checkpoint(model, output)
            return output
        if template is None:
            raise ValueError(
                f"--to {target_format} needs --template: the {target_format} model of the same architecture to "
                "write the weights into (e.g. the one the transformers model was converted from)."
            )
        return save_in_source_format(parse_model_name(f"{target_format}:{template}", model_kwargs), model, output)
    raise ValueError(
        f"No conversion from {source_format} to {target_format}: sinder convert converts original, timm and "
        "open_clip models to transformers, and transformers models to original, timm and open_clip."
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `convert` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert between the original DINOv2 layout, transformers, timm and OpenCLIP",
        description=(
            "Convert a model between the original DINOv2 checkpoint layout (torch.hub dinov2_vit*14, the published "
            "SINDER weights), transformers, timm and OpenCLIP. The default converts an original-layout checkpoint "
            "into a directory that transformers' AutoModel.from_pretrained loads."
        ),
        parents=[HfArgumentParser(ModelKwargsArguments, add_help=False)],
    )
    parser.add_argument(
        "source",
        help="the model: an original-layout checkpoint (.pth, .pt, .safetensors), a transformers model directory or "
        "Hub id, a timm NAME_OR_DIR, or an OpenCLIP ARCH[/PRETRAINED_OR_FILE]",
    )
    parser.add_argument("output", type=Path, help="directory (or, for --to original, file) to write")
    parser.add_argument("--from", dest="source_format", choices=CONVERSION_FORMATS, default="original")
    parser.add_argument("--to", dest="target_format", choices=CONVERSION_FORMATS, default="transformers")
    parser.add_argument(
        "--template",
        default=None,
        help="for --to timm or open_clip: the timm NAME_OR_DIR or OpenCLIP ARCH[/PRETRAINED_OR_FILE] of the same "
        "architecture to write the weights into",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the directory to REPO")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `sinder convert`; return the exit status (0 on success, 1 if the model is refused or not found, or a
    library it needs is missing)."""
    try:
        if (args.source_format, args.target_format) == ("original", "transformers"):
            output = convert_checkpoint(args.source, args.output, repo_id=args.push_to_hub)
        else:
            output = convert_model(
                args.source,
                args.output,
                source_format=args.source_format,
                target_format=args.target_format,
                template=args.template,
                model_kwargs=args.model_kwargs,
            )
    except (ValueError, FileNotFoundError, ModelNotAvailableError, ImportError) as error:
        logger.error("%s", error)
        return 1
    if args.push_to_hub:
        push_folder_to_hub(output, args.push_to_hub, commit_message="Add ViT weights converted by sinder-peft")
    return 0
