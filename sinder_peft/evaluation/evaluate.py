"""`sinder evaluate`: show in numbers that a repaired backbone lost its defects and kept its features.

For every model (a Hub id, a local directory, `demo`, or an in-memory model) and every data set given:

- kNN (`--knn-data`): DINOv2's kNN protocol on the CLS token after the final norm (`probes.knn_top1_accuracy`):
  top-1 accuracy for k = 10, 20, 100, 200, with k = 20 the headline.
- Dense linear probe (`--seg-data`): a linear classifier on frozen last-layer patch tokens, trained with a fixed,
  seeded recipe on the training split (`probes.train_linear_segmentation_probe`), scored as mIoU and per-class IoU
  on the validation split with logits upsampled bilinearly to the mask size and label 255 ignored.
- Defects (`--defect-data`, default: some validation images): the mean last-layer max/median token-norm ratio, the
  share of high-norm and of flagged defect tokens, and the ratio of every layer
  (`analysis.detection.find_defect_tokens`).

The output directory receives `evaluation.json`, `evaluation.md` (tables), `evaluation.png` (the models side by
side) and `norm_maps.png` (last-layer norm maps, one column per model), and `cache/` with the features: a second
run with other probe settings reads them instead of running the models. Percentages are 0–100.

Run it as `sinder evaluate MODEL [MODEL ...] ...`, `accelerate launch examples/evaluate.py ...` (several processes
share the feature extraction), `evaluate([...], output_dir=...)` for models by name, or `evaluate_models` for
models already in memory (what `sinder repair` uses for the original and the repaired model).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from torch import nn
from transformers import HfArgumentParser

from ..images.preprocessing import resize_and_crop
from ..models.loading import ModelNotAvailableError, load_backbone
from ..models.other_libraries import parse_model_name
from ..tuner.architectures import ImageNormalization
from ..version import __version__
from ..visualization.figures import save_depth_comparison, save_evaluation_comparison, save_norm_map_comparison
from .arguments import EvaluationArguments
from .context import EvaluationContext, ModelResult
from .features import ProcessState
from .image_sources import ImageSource
from .sections import evaluate_model, load_context

logger = logging.getLogger(__name__)

RESULTS_NAME = "evaluation.json"
TABLE_NAME = "evaluation.md"
COMPARISON_FIGURE_NAME = "evaluation.png"
NORM_MAPS_FIGURE_NAME = "norm_maps.png"
DEPTH_FIGURE_NAME = "depth_maps.png"


def _format(value: float | None, digits: int = 1) -> str:
    """Return `value` rounded for a table, or "–" when it was not measured."""
    return "–" if value is None else f"{value:.{digits}f}"


def evaluation_table(results: dict[str, Any]) -> str:
    """Return the Markdown of evaluation.md: a summary table of the models, then kNN by k and IoU by class."""
    entries = results["models"]
    lines = ["# Evaluation", ""]
    headline_k = next((entry["knn"]["k"] for entry in entries if "knn" in entry), None)
    columns = ["model"]
    if headline_k is not None:
        columns.append(f"kNN top-1, k = {headline_k} (%)")
    if any("segmentation" in entry for entry in entries):
        columns += ["mIoU (%)", "pixel accuracy (%)"]
    if any("depth" in entry for entry in entries):
        columns += ["depth RMSE (m)", "depth AbsRel", "depth δ < 1.25"]
    if any("unsupervised" in entry for entry in entries):
        columns += ["unsupervised mIoU (%)", "unsupervised pixel accuracy (%)"]
    if any("defects" in entry for entry in entries):
        columns += [
            "max/median norm",
            "high-norm tokens (%)",
            "images with high-norm defects (%)",
            "defect tokens (%)",
            "images with defects (%)",
        ]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in entries:
        row = [f"`{entry['model']}`"]
        if headline_k is not None:
            row.append(_format(entry.get("knn", {}).get("top1")))
        if "mIoU (%)" in columns:
            segmentation = entry.get("segmentation", {})
            row += [_format(segmentation.get("miou")), _format(segmentation.get("pixel_accuracy"))]
        if "depth RMSE (m)" in columns:
            depth = entry.get("depth", {})
            row += [_format(depth.get("rmse"), 3), _format(depth.get("abs_rel"), 3), _format(depth.get("delta1"), 3)]
        if "unsupervised mIoU (%)" in columns:
            unsupervised = entry.get("unsupervised", {})
            row += [_format(unsupervised.get("miou")), _format(unsupervised.get("pixel_accuracy"))]
        if "max/median norm" in columns:
            defects = entry.get("defects", {})
            row += [
                _format(defects.get("norm_ratio"), 2),
                _format(defects.get("high_norm_share"), 2),
                _format(defects.get("images_with_high_norm_defects")),
                _format(defects.get("defect_token_share"), 2),
                _format(defects.get("images_with_defects")),
            ]
        lines.append("| " + " | ".join(row) + " |")
    protocols = sorted({entry["unsupervised"]["protocol"] for entry in entries if "unsupervised" in entry})
    if protocols:
        named = {"kmeans": "spherical k-means on the patch tokens", "cause": "CAUSE, the SINDER paper's protocol"}
        lines += ["", "Unsupervised segmentation: " + "; ".join(named[protocol] for protocol in protocols) + "."]
    if headline_k is not None:
        ks = list(next(entry["knn"]["by_k"] for entry in entries if "knn" in entry))
        lines += ["", "## kNN top-1 (%) by k", "", "| model | " + " | ".join(f"k = {k}" for k in ks) + " |"]
        lines.append("|" + "---|" * (len(ks) + 1))
        for entry in entries:
            by_k = entry.get("knn", {}).get("by_k", {})
            lines.append(f"| `{entry['model']}` | " + " | ".join(_format(by_k.get(k)) for k in ks) + " |")
    segmented = [entry for entry in entries if "segmentation" in entry]
    if segmented:
        lines += [
            "",
            "## IoU (%) by class",
            "",
            "| class | " + " | ".join(f"`{e['model']}`" for e in segmented) + " |",
        ]
        lines.append("|" + "---|" * (len(segmented) + 1))
        for index in range(segmented[0]["segmentation"]["num_classes"]):
            values = [entry["segmentation"]["per_class_iou"][index] for entry in segmented]
            lines.append(f"| {index} | " + " | ".join(_format(value) for value in values) + " |")
    return "\n".join(lines) + "\n"


def _shown_images(images: ImageSource, resolution: int, patch_size: int) -> list[Image.Image]:
    """Return the readable images of `images` as the models saw them (the crop of `PreparedImages`)."""
    shown = []
    for index in range(len(images)):
        try:
            shown.append(resize_and_crop(images.load(index), resolution, patch_size, square=True))
        except (FileNotFoundError, ValueError):
            continue
    return shown


def _write_outputs(context: EvaluationContext, results: list[ModelResult]) -> dict[str, Any]:
    """Write evaluation.json, evaluation.md and the figures; return the content of evaluation.json."""
    args = context.args
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = [result.entry for result in results]
    names = [entry["model"] for entry in entries]
    figures = [COMPARISON_FIGURE_NAME]
    scores: dict[str, list[float | None]] = {}
    if context.knn is not None:
        scores[f"kNN top-1, k = {args.knn_headline_k} (%)"] = [entry["knn"]["top1"] for entry in entries]
    if context.segmentation is not None:
        scores["mIoU (%)"] = [entry["segmentation"]["miou"] for entry in entries]
    if context.depth is not None:
        scores["depth RMSE (m)"] = [entry["depth"]["rmse"] for entry in entries]
    if context.unsupervised is not None:
        scores["unsupervised mIoU (%)"] = [entry["unsupervised"]["miou"] for entry in entries]
    layer_ratios = None
    if context.defect_images is not None:
        scores["last-layer max/median norm"] = [entry["defects"]["norm_ratio"] for entry in entries]
        layer_ratios = [entry["defects"]["per_layer_norm_ratio"] for entry in entries]
    save_evaluation_comparison(names, scores, output_dir / COMPARISON_FIGURE_NAME, layer_ratios)
    if context.defect_images is not None and results[0].norm_maps:
        pictures = _shown_images(context.defect_images, args.defect_resolution, results[0].patch_size)
        rows = min(len(pictures), *(len(result.norm_maps) for result in results))
        if rows and len({tuple(result.norm_maps[0].shape) for result in results}) == 1:
            maps = [[result.norm_maps[row] for result in results] for row in range(rows)]
            save_norm_map_comparison(pictures[:rows], maps, names, output_dir / NORM_MAPS_FIGURE_NAME)
            figures.append(NORM_MAPS_FIGURE_NAME)
    if context.depth is not None and results[0].depth_truth:
        pictures = _shown_images(context.depth.val.images, args.depth_resolution, results[0].patch_size)
        rows = min(len(pictures), *(len(result.depth_maps) for result in results))
        if rows and len({tuple(result.depth_maps[0].shape) for result in results}) == 1:
            maps = [[result.depth_maps[row] for result in results] for row in range(rows)]
            truth = results[0].depth_truth[:rows]
            save_depth_comparison(pictures[:rows], truth, maps, names, output_dir / DEPTH_FIGURE_NAME)
            figures.append(DEPTH_FIGURE_NAME)
    payload = {
        "models": entries,
        "data": {
            "knn": context.knn.source if context.knn is not None else None,
            "segmentation": context.segmentation.source if context.segmentation is not None else None,
            "depth": context.depth.source if context.depth is not None else None,
            "unsupervised": context.unsupervised.source if context.unsupervised is not None else None,
            "defects": context.defect_source,
        },
        "settings": asdict(args),
        "figures": figures,
        "table": TABLE_NAME,
        "sinder_peft_version": __version__,
    }
    (output_dir / RESULTS_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    (output_dir / TABLE_NAME).write_text(evaluation_table(payload))
    logger.info("Evaluation written to %s.", output_dir / RESULTS_NAME)
    return payload


def evaluate_models(
    models: Sequence[tuple[str, nn.Module, ImageNormalization]],
    args: EvaluationArguments,
    state: ProcessState | None = None,
) -> dict[str, Any]:
    """Evaluate models already in memory and write the outputs to `args.output_dir`.

    Each model is evaluated where its parameters are (nothing is moved), in eval mode (its mode is restored
    afterwards). With a multi-process `state` (an `Accelerator` or `PartialState`), call this on every process: the
    feature extraction is shared, the probes run and the files are written on the main process.

    Args:
        models: `(name, model, normalization)` per model, in the order of the outputs, e.g.
            `[("facebook/dinov2-base", base, norm), ("repaired", merged, norm)]`. Names label the results only;
            the cache is keyed by the weights.
        args: the settings (data, probes, output directory).
        state: the Accelerate state of a multi-process run; None runs everything in this process.

    Returns:
        The content of evaluation.json on the main process, an empty dict on the others.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: a data set is missing or not in its layout, a mask does
            not fit its image, or the data holds a single class (raised before any model runs).
    """
    if not models:
        raise ValueError("No model to evaluate.")
    context = load_context(args, state)
    results = [evaluate_model(context, name, model, normalization) for name, model, normalization in models]
    if not context.is_main:
        context.wait()
        return {}
    payload = _write_outputs(context, [result for result in results if result is not None])
    context.wait()
    return payload


def _default_state(device: str | None) -> PartialState:
    """Return Accelerate's process state: several processes under `accelerate launch`/`torchrun`, else one."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (device is not None and torch.device(device).type == "cpu")
    return PartialState(cpu=cpu)


def run_evaluation(
    models: Sequence[str], args: EvaluationArguments, state: ProcessState | None = None
) -> dict[str, Any]:
    """Load each named model in turn (`models.loading.load_backbone`) and evaluate them all (see `evaluate_models`).

    Models are loaded one at a time, so only one is in memory at once. Without a `state`, Accelerate's process
    state is used: several processes when launched with `accelerate launch`, one otherwise. A single process runs
    on `args.device` (default: CUDA when available).

    Returns:
        The content of evaluation.json on the main process, an empty dict on the others.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError, ModelNotAvailableError: bad data or models (data
            layouts are checked before any model is loaded).
    """
    if not models:
        raise ValueError("No model to evaluate: pass one or more Hub ids, directories or 'demo'.")
    state = state if state is not None else _default_state(args.device)
    single_device = state.num_processes == 1 and args.device is not None
    device = torch.device(args.device) if single_device else state.device
    context = load_context(args, state)
    results = []
    for name in models:
        timm_kwargs = args.model_kwargs if parse_model_name(name).library == "timm" else None
        backbone, normalization = load_backbone(name, model_kwargs=timm_kwargs)
        results.append(evaluate_model(context, name, backbone.to(device), normalization))
        del backbone
    if not context.is_main:
        context.wait()
        return {}
    payload = _write_outputs(context, [result for result in results if result is not None])
    context.wait()
    return payload


def evaluate(
    models: Sequence[str],
    *,
    output_dir: str | Path,
    knn_data: str | None = None,
    seg_data: str | None = None,
    depth_data: str | None = None,
    unsupervised_data: str | None = None,
    defect_data: str | None = None,
    state: ProcessState | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate models named by Hub id, local directory or `"demo"`; the Python form of `sinder evaluate`.

    Args:
        models: the models, in the order of the outputs (usually the original, then its repair).
        output_dir: where evaluation.json, evaluation.md, the figures and the feature cache go.
        knn_data, seg_data, depth_data, unsupervised_data, defect_data: the data sets (see `EvaluationArguments`);
            a section is left out when its data is not given (the unsupervised segmentation runs on `seg_data`'s
            validation split when `unsupervised_data` is not given).
        state: the Accelerate state of a multi-process run (default: Accelerate's own).
        settings: any other field of `EvaluationArguments`, e.g. `seg_epochs=20` or `knn_max_train=10000`.

    Returns:
        The content of evaluation.json (main process; an empty dict on the others).
    """
    args = EvaluationArguments(
        output_dir=str(output_dir),
        knn_data=knn_data,
        seg_data=seg_data,
        depth_data=depth_data,
        unsupervised_data=unsupervised_data,
        defect_data=defect_data,
        **settings,
    )
    return run_evaluation(models, args, state)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_argument_parser(**kwargs: Any) -> HfArgumentParser:
    """Return the parser of `sinder evaluate`: MODEL [MODEL ...] and one flag per `EvaluationArguments` field."""
    parser = HfArgumentParser(EvaluationArguments, **kwargs)
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="Hub ids (facebook/dinov2-base, ...), model directories, 'demo', timm:NAME_OR_DIR, "
        "timm:hf-hub:ORG/NAME or open_clip:ARCH[/PRETRAINED_OR_FILE]",
    )
    return parser


def arguments_from_namespace(namespace: argparse.Namespace) -> tuple[list[str], EvaluationArguments]:
    """Return the models and the `EvaluationArguments` of parsed command-line flags."""
    values = {item.name: getattr(namespace, item.name) for item in fields(EvaluationArguments)}
    return list(namespace.models), EvaluationArguments(**values)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `evaluate` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "evaluate",
        parents=[build_argument_parser(add_help=False)],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="kNN, linear segmentation and depth probes, unsupervised segmentation and defect figures for one or "
        "more models, side by side",
        description=(
            "Evaluate models with a kNN classifier (--knn-data), a linear segmentation probe (--seg-data), a "
            "linear depth probe (--depth-data), unsupervised segmentation (--unsupervised-data, default: the "
            "validation split of --seg-data) and their defect figures (--defect-data, default: validation images). "
            "Writes evaluation.json, evaluation.md, evaluation.png, norm_maps.png and depth_maps.png to --output-dir."
        ),
    )
    parser.set_defaults(handler=run)
    return parser


def run(namespace: argparse.Namespace) -> int:
    """Run an evaluation from parsed flags, print its table, and return the exit code.

    Errors the user can fix (missing data, wrong layout, mask size, a single class, unavailable model) are printed
    as one line on stderr with exit code 1, without a traceback.
    """
    try:
        models, args = arguments_from_namespace(namespace)
        results = run_evaluation(models, args)
    except (FileNotFoundError, NotADirectoryError, ValueError, ModelNotAvailableError, ImportError) as error:
        print(f"sinder evaluate: error: {error}", file=sys.stderr)
        return 1
    if results:
        print(evaluation_table(results))
        print(f"Results and figures in {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `examples/evaluate.py` (run it with `accelerate launch` or plain `python`)."""
    parser = build_argument_parser(prog="evaluate.py", description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
