"""`sinder convert`: an original-layout DINOv2 checkpoint file into a transformers model directory, with a model card
that names its source (`convert_checkpoint`), and optionally onto the Hub. The layout mapping itself is
`original_layout`."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

from ..version import __version__
from .hub import push_folder_to_hub
from .original_layout import DinoV2Backbone, describe_original_config, load_original_checkpoint

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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `convert` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an original DINOv2/SINDER checkpoint into a transformers model directory",
        description=(
            "Convert a checkpoint in the original DINOv2 layout (torch.hub dinov2_vit*14, the published SINDER "
            "weights) into a directory that transformers' AutoModel.from_pretrained loads."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="original-layout checkpoint (.pth, .pt or .safetensors)")
    parser.add_argument("output_dir", type=Path, help="directory to write config, safetensors and model card to")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the directory to REPO")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `sinder convert`; return the exit status (0 on success, 1 if the checkpoint is refused or not found)."""
    try:
        output_dir = convert_checkpoint(args.checkpoint, args.output_dir, repo_id=args.push_to_hub)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 1
    if args.push_to_hub:
        push_folder_to_hub(output_dir, args.push_to_hub, commit_message="Add DINOv2 weights converted by sinder-peft")
    return 0
