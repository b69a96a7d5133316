"""`sinder diagnose`: find the singular defects of a ViT on a few images, and draw them.

For every image the model is run block by block (`find_defect_tokens`, one image at a time since images keep their
aspect ratio), and the output directory receives:

- `report.json`: the model and settings, the layer-to-layer |cos| of the defect directions, and per image its patch
  grid, first defective layer, and per layer the max/median token-norm ratio, the share of high-norm tokens and the
  number of flagged defect tokens;
- `NAME_diagnosis.png` per image: the image, the token-norm map and the PCA map of the last layer;
- `layer_norms.png`: the max/median norm ratio through the layers for all images, first defective layer marked.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import HfArgumentParser

from ..analysis.detection import (
    DIRECTION_SOURCE_HELP,
    DIRECTION_SOURCES,
    HIGH_NORM_FACTOR,
    RECIPE_HELP,
    RECIPES,
    DefectAnalysis,
    DefectTest,
    DirectionSource,
    Recipe,
    estimate_defect_directions,
    find_defect_tokens,
)
from ..analysis.directions import singular_defect_directions
from ..images.datasets import find_image_files
from ..images.preprocessing import load_image, normalize_image, resize_and_crop
from ..models.loading import DEMO_MODEL_NAME, ModelNotAvailableError, load_backbone
from ..models.other_libraries import ModelKwargsArguments
from ..synthetic.demo import demo_image_paths
from ..tuner.architectures import describe_model
from ..visualization.figures import save_diagnosis_figure, save_layer_norm_plot

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
LAYER_PLOT_NAME = "layer_norms.png"
DEFAULT_RESOLUTION = 518
DEFAULT_KERNEL = 3


def resolve_image_paths(images: Sequence[str | Path], model: str) -> list[Path]:
    """Return the image files to diagnose: the given files, folders expanded to their images (sorted).

    With no images and `model == "demo"`, returns the bundled demo images.

    Raises:
        ValueError: if no image is given (and the model is not the demo), or a folder holds no image.
        FileNotFoundError: if a path does not exist.
    """
    if not images:
        if model == DEMO_MODEL_NAME:
            return [Path(path) for path in demo_image_paths()]
        raise ValueError("No image given: pass one or more image files or folders (or use --model demo).")
    paths: list[Path] = []
    for image in images:
        path = Path(image).expanduser()
        if path.is_dir():
            found = find_image_files(path)
            if not found:
                raise ValueError(f"The folder {str(path)!r} holds no jpg, jpeg, png or webp image.")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"No image file at {str(path)!r}.")
    return paths


def _figure_names(paths: Sequence[Path]) -> list[str]:
    """Return a distinct `STEM_diagnosis.png` file name per image (`STEM_2_diagnosis.png`, … for repeated stems)."""
    names, seen = [], {}
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stem = path.stem if count == 1 else f"{path.stem}_{count}"
        names.append(f"{stem}_diagnosis.png")
    return names


def _direction_cosines(directions: Sequence[torch.Tensor]) -> list[float]:
    """Return |cos| between the defect directions of consecutive layers (l, l + 1), one value per pair."""
    matrix = torch.nn.functional.normalize(torch.stack([d.detach().double().cpu() for d in directions]), dim=1)
    return (matrix[:-1] * matrix[1:]).sum(dim=1).abs().tolist()


def image_report(
    path: Path, image: Image.Image, pixel_values: torch.Tensor, analysis: DefectAnalysis
) -> dict[str, Any]:
    """Return the report entry of one image from its analysis (batch of one).

    Layers are block indices from 0. `defect_tokens` lists the (row, column) grid positions flagged at the first
    defective layer (empty when there is none).
    """
    layer = int(analysis.first_defective_layer[0])
    return {
        "path": str(path),
        "image_size": list(image.size),
        "input_size": [int(pixel_values.shape[-2]), int(pixel_values.shape[-1])],
        "grid_size": list(analysis.grid_size),
        "first_defective_layer": layer,
        "first_high_norm_defect_layer": int(analysis.first_high_norm_defect_layer[0]),
        "defect_tokens": torch.nonzero(analysis.masks[0, layer]).tolist() if layer >= 0 else [],
        "max_median_norm_ratio": analysis.max_median_norm_ratio[0].tolist(),
        "high_norm_share": analysis.high_norm_share[0].tolist(),
        "num_defect_tokens": analysis.defect_token_counts[0].tolist(),
        "num_high_norm_defect_tokens": analysis.high_norm_defect_counts[0].tolist(),
        "num_high_norm_input_tokens": analysis.high_norm_input_counts[0].tolist(),
    }


def image_headline(entry: dict[str, Any]) -> str:
    """Return what `diagnose` says of one image's report entry: its first defective layer (the recipe's test) and
    where its high-norm defect is born, or, when the test finds none, whether it still has high-norm defect tokens
    (never "no defect" beside tokens a block made several times the median norm), and its high-norm input tokens."""
    layer = entry["first_defective_layer"]
    born = entry["first_high_norm_defect_layer"]
    input_layers = [index for index, count in enumerate(entry["num_high_norm_input_tokens"]) if count > 0]
    inputs = (
        f"; high-norm input tokens (long from the embedding on, not defects) at layers {input_layers[0]}-"
        f"{input_layers[-1]}"
        if input_layers
        else ""
    )
    if layer >= 0:
        birth = f", high-norm defect born at layer {born}" if born >= 0 else ", no high-norm defect token"
        return f"first defective layer {layer}, {len(entry['defect_tokens'])} defect tokens there{birth}{inputs}"
    if born >= 0:
        return (
            f"no defective layer along the directions, but a high-norm defect (>= {HIGH_NORM_FACTOR:g}x the median) "
            f"born at layer {born}{inputs}"
        )
    return f"no defective layer, no high-norm defect{inputs}"


def diagnose(
    model: str,
    images: Sequence[str | Path],
    *,
    output_dir: str | Path,
    resolution: int = DEFAULT_RESOLUTION,
    mask_thr: float = 4.0,
    min_tokens: int = 3,
    directions: DirectionSource = "auto",
    recipe: Recipe = "preserve",
    device: str | torch.device | None = None,
    model_kwargs: str | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Diagnose the singular defects of `model` on `images` and write the report and figures to `output_dir`.

    Args:
        model: a Hub id, a local directory written by `save_pretrained`, `"demo"`, or a timm or OpenCLIP model
            (`timm:...`, `open_clip:...`; see `load_backbone`).
        images: image files or folders of images; may be empty with `model="demo"` (the bundled demo images).
        output_dir: directory for `report.json`, `NAME_diagnosis.png` per image and `layer_norms.png` (created).
        resolution: short side of the images after resizing, in pixels (cropped to whole patches).
        mask_thr: outlier threshold k of the defect-token test (docs/method.md §2).
        min_tokens: flagged tokens from which a layer counts as defective.
        directions: where each layer's defect direction comes from ("weights", "data" or "auto"), chosen once
            from the high-norm defect tokens of all the images (`analysis.detection.estimate_defect_directions`).
        recipe: whose defect test decides (`DefectTest.for_recipe`): "preserve" (the default repair's: a flagged
            token must be a high-norm defect token) or "paper" (the cosine test alone).
        device: where to run the model; default CUDA when available, else CPU.
        model_kwargs: for a timm model, keyword arguments of `timm.create_model` (`--model-kwargs`; see
            `load_backbone`).

    Returns:
        The report written to `report.json`.

    Raises:
        FileNotFoundError: an image path or the model directory does not exist.
        ValueError: an image is unreadable or too small (the message names it), or the model is of no supported
            ViT family.
        ModelNotAvailableError: a Hub model is neither cached nor downloadable.
    """
    paths = resolve_image_paths(images, model)
    pictures = [load_image(path) for path in paths]
    backbone, normalization = load_backbone(model, model_kwargs=model_kwargs)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = backbone.to(device)
    description = describe_model(backbone)

    displayed, inputs = [], []
    for path, picture in zip(paths, pictures, strict=True):
        try:
            cropped = resize_and_crop(picture, resolution, description.patch_size)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        displayed.append(cropped)
        inputs.append(normalize_image(cropped, normalization)[None])

    test = DefectTest.for_recipe(recipe, mask_thr=mask_thr, min_tokens=min_tokens, kernel=DEFAULT_KERNEL)
    weights_directions = singular_defect_directions(backbone)
    chosen = estimate_defect_directions(backbone, inputs, directions, weights_directions, min_tokens=min_tokens)
    logger.info("%s.", chosen.describe())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for path, picture, cropped, pixel_values, figure_name in zip(
        paths, pictures, displayed, inputs, _figure_names(paths), strict=True
    ):
        analysis = find_defect_tokens(backbone, pixel_values, chosen, test=test)
        entry = image_report(path, picture, pixel_values, analysis)
        found = image_headline(entry)
        ratio = entry["max_median_norm_ratio"][-1]
        save_diagnosis_figure(
            cropped,
            analysis.token_norms[0, -1],
            analysis.last_patch_features[0],
            output_dir / figure_name,
            title=f"{path.name}: {found}; last layer max/median norm {ratio:.1f}",
        )
        entry["figure"] = figure_name
        entries.append(entry)
        logger.info("%s: %s.", path, found)

    first_layers = [entry["first_defective_layer"] for entry in entries if entry["first_defective_layer"] >= 0]
    earliest = min(first_layers) if first_layers else None
    save_layer_norm_plot(
        [entry["max_median_norm_ratio"] for entry in entries],
        earliest,
        output_dir / LAYER_PLOT_NAME,
        labels=[Path(entry["path"]).name for entry in entries],
    )
    report = {
        "model": model,
        "model_type": description.model_type,
        "num_layers": description.num_layers,
        "hidden_size": description.hidden_size,
        "patch_size": description.patch_size,
        "resolution": resolution,
        "recipe": recipe,
        "defect_test": test.to_dict(),
        "kernel": DEFAULT_KERNEL,
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "direction_consecutive_abs_cos": _direction_cosines(list(chosen.weights_directions)),
        "directions": chosen.to_dict(),
        "high_norm_factor": HIGH_NORM_FACTOR,
        "high_norm_weights_cosine": list(chosen.weights_cosines),
        "num_images": len(entries),
        "num_defective_images": len(first_layers),
        "num_images_with_high_norm_defects": sum(1 for entry in entries if entry["first_high_norm_defect_layer"] >= 0),
        "num_images_with_high_norm_input_tokens": sum(
            1 for entry in entries if any(entry["num_high_norm_input_tokens"])
        ),
        "earliest_first_defective_layer": earliest,
        "layer_plot": LAYER_PLOT_NAME,
        "images": entries,
    }
    (output_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `diagnose` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "diagnose",
        parents=[HfArgumentParser(ModelKwargsArguments, add_help=False)],
        help="find and draw the singular defects of a ViT on images",
        description=(
            "Find the high-norm defect tokens of a ViT on some images. Writes report.json, one "
            "NAME_diagnosis.png per image (image, token norms, PCA of features) and layer_norms.png to --output-dir."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Hub id (e.g. facebook/dinov2-base), a save_pretrained directory, 'demo', timm:NAME_OR_DIR, "
        "timm:hf-hub:ORG/NAME or open_clip:ARCH[/PRETRAINED_OR_FILE]",
    )
    parser.add_argument(
        "images", nargs="*", help="image files or folders of images (default with --model demo: the demo images)"
    )
    parser.add_argument("--output-dir", required=True, help="where to write the report and figures")
    parser.add_argument(
        "--resolution", type=int, default=DEFAULT_RESOLUTION, help="short side of the resized images, in pixels"
    )
    parser.add_argument("--mask-thr", type=float, default=4.0, help="defect-token outlier threshold k (std units)")
    parser.add_argument(
        "--min-tokens", type=int, default=3, help="flagged tokens from which a layer counts as defective"
    )
    parser.add_argument("--directions", choices=DIRECTION_SOURCES, default="auto", help=DIRECTION_SOURCE_HELP)
    parser.add_argument("--recipe", choices=RECIPES, default="preserve", help=RECIPE_HELP)
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `diagnose` with the parsed command-line `args`, print a short summary, and return the exit code.

    Errors the user can fix (missing or unreadable image, unsupported or unavailable model) are printed as one
    line on stderr with exit code 1, without a traceback.
    """
    try:
        report = diagnose(
            args.model,
            args.images,
            output_dir=args.output_dir,
            resolution=args.resolution,
            mask_thr=args.mask_thr,
            min_tokens=args.min_tokens,
            directions=args.directions,
            recipe=args.recipe,
            device=args.device,
            model_kwargs=args.model_kwargs,
        )
    except (FileNotFoundError, ValueError, ModelNotAvailableError, ImportError) as error:
        print(f"sinder diagnose: error: {error}", file=sys.stderr)
        return 1
    print(
        f"{report['model']} ({report['model_type']}, {report['num_layers']} layers), resolution "
        f"{report['resolution']}, {report['recipe']} recipe's defect test: {report['num_defective_images']} of "
        f"{report['num_images']} images are defective, {report['num_images_with_high_norm_defects']} have a "
        f"high-norm defect, {report['num_images_with_high_norm_input_tokens']} have high-norm input tokens (long "
        "from the embedding on: a feature of the image, not a defect)."
    )
    for entry in report["directions"]["layers"]:
        if entry["high_norm_tokens"]:
            print(
                f"  layer {entry['layer']}: {entry['high_norm_tokens']} high-norm defect tokens, |cos| with the "
                f"weights' direction {entry['weights_cosine']:.2f}, direction from the {entry['source']}"
            )
    for entry in report["images"]:
        status = image_headline(entry)
        print(f"  {entry['path']}: {status}; last-layer max/median norm {entry['max_median_norm_ratio'][-1]:.1f}")
    print(f"Report and figures in {args.output_dir}")
    return 0
