"""The repair job: `accelerate launch examples/repair.py` / `sinder repair`.

Loads a ViT (any supported family) and images, measures its defects, adapts the blocks that can train, runs
`SinderTrainer`, and writes the output directory:

    model/        the merged, repaired model (plain transformers weights) with its README.md model card
    adapter/      the PEFT adapter (singular-value shifts only)
    report.json   defect statistics before/after, training numbers
    figures/      before/after norm and PCA maps, per-layer norm plots
    checkpoints/  the last training checkpoint (for --resume)

When nothing needs repair (`nothing_to_repair`: the selection sample has neither a high-norm token nor a defect, or
training took no step because the data showed no defect), no model that differs from the input is written: there is
no `model/` and no `adapter/`, and report.json and the summary say so.

Every input is checked before anything is written: a bad model, an empty or unreadable data folder or too-small
images fail with a clear message and leave no output directory behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from transformers import HfArgumentParser

from . import __version__
from .architectures import describe_model
from .checkpoints import CHECKPOINT_ADAPTER_DIR, resolve_checkpoint
from .data import (
    MIN_GRID_SIDE,
    ImageBatch,
    ImageFileDataset,
    UnreadableImageLog,
    build_dataset,
    selection_sample,
)
from .defects import DEFECT_NORM_GAP, DefectAnalysis, find_defect_tokens
from .direction_sources import DefectDirections, load_directions
from .distributed import FailedOnAnotherProcess, main_process_value, run_on_every_process, run_on_main_process
from .evaluate import EvaluationArguments, check_evaluation_data, evaluate_models
from .loading import DEMO_MODEL_NAME, ImageNormalization, load_backbone, load_model_image_processor_config
from .preservation import OutputFeatures, clean_token_cosine, clean_token_mask, output_features, pooled_cosine
from .processor import save_image_processor
from .trainer import SinderTrainer, TrainingArguments, build_sinder_model, capped_stop_window, compute_directions
from .trainer_state import TrainerState
from .window import select_layers_to_transform

logger = logging.getLogger(__name__)

DEFAULT_RESOLUTION = 518
DEMO_RESOLUTION = 224
DEMO_STOP_WINDOW = 6
MAX_LISTED_UNREADABLE = 100


@dataclass
class RepairArguments:
    """Inputs and outputs of a repair run; the training hyperparameters are `TrainingArguments`. Each field is also a
    command-line flag of `sinder repair` (`transformers.HfArgumentParser` builds them from the fields)."""

    model: str = field(
        default=DEMO_MODEL_NAME,
        metadata={"help": "Hub id (facebook/dinov2-base, ...), a local model directory, or 'demo'."},
    )
    output_dir: str = field(
        default="runs/sinder", metadata={"help": "Where to write model/, adapter/, report.json and figures/."}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Image folder (searched recursively), or a 🤗 datasets name or saved dataset; default: the "
            "bundled demo images."
        },
    )
    data_split: str = field(default="train", metadata={"help": "Split of a 🤗 dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of a 🤗 dataset."})
    streaming: bool = field(default=False, metadata={"help": "Stream the 🤗 dataset (large sets such as ImageNet)."})
    resolution: int | None = field(
        default=None,
        metadata={
            "help": f"Side of the square training crops, rounded down to whole patches (default: "
            f"{DEFAULT_RESOLUTION}; {DEMO_RESOLUTION} for the demo)."
        },
    )
    selection_images: int = field(
        default=8, metadata={"help": "Images, spread over the data, analysed to choose the blocks to adapt."}
    )
    report_images: int = field(default=4, metadata={"help": "Images in report.json and the figures."})
    resume: str | None = field(default=None, metadata={"help": "Continue from a checkpoint or a run's output dir."})
    overwrite: bool = field(default=False, metadata={"help": "Write into a non-empty --output-dir."})
    report_to: str | None = field(
        default=None, metadata={"help": "Accelerate tracker(s) to log to: tensorboard, wandb, all, ..."}
    )
    mixed_precision: Literal["no", "bf16"] | None = field(
        default=None,
        metadata={
            "help": "bf16: bfloat16 autocast of the forward passes (GPUs); default: Accelerate's setting "
            "(`accelerate launch --mixed_precision`), else no."
        },
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repository to upload model/ to."})
    push_adapter: bool = field(default=False, metadata={"help": "With --push-to-hub, also upload adapter/."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_endpoint: str | None = field(
        default=None, metadata={"help": "Hub URL (default: HF_ENDPOINT or huggingface.co)."}
    )
    evaluate_knn_data: str | None = field(
        default=None,
        metadata={
            "help": "After the repair, kNN-evaluate the original and the repaired model on this data (the "
            "layouts of `sinder evaluate --knn-data`); the result goes into report.json and evaluation/."
        },
    )
    evaluate_seg_data: str | None = field(
        default=None,
        metadata={
            "help": "After the repair, evaluate both models with the linear segmentation probe on this data "
            "(`sinder evaluate --seg-data` layouts)."
        },
    )
    evaluate_defect_data: str | None = field(
        default=None,
        metadata={
            "help": "After the repair, compare both models' defect figures on these images (default with "
            "another --evaluate-* flag: its validation images)."
        },
    )

    @property
    def evaluates(self) -> bool:
        """Whether the run ends with an evaluation of the original and the repaired model."""
        return any((self.evaluate_knn_data, self.evaluate_seg_data, self.evaluate_defect_data))


@dataclass
class RepairResult:
    """What a repair run produced.

    Attributes:
        output_dir: the run's output directory.
        report: the content of report.json.
        state: the trainer's final state.
    """

    output_dir: Path
    report: dict[str, Any]
    state: TrainerState


def _analysis_summary(analysis: DefectAnalysis) -> dict[str, Any]:
    """Return report.json's summary of an analysis: last-layer norm ratios, defect-token shares, defective layers.

    `images_with_defects` counts the images with a defect that is a real norm outlier (`high_norm_defects`: a
    flagged token at 4x its image's median norm or more); `images_with_cosine_outliers` those with a defective layer
    by the cosine test alone, which a flat, repaired model can still show by chance. `images_with_high_norm_tokens`
    counts the images with a high-norm token (4x the median norm) at any layer, whether or not a direction explains
    it; `high_norm_tokens_per_layer` and `high_norm_weights_cosine` (the mean |cos| of those tokens with the
    weights' direction, None where there is none) give them per layer.
    """
    last = analysis.num_layers - 1
    tokens = analysis.grid_size[0] * analysis.grid_size[1]
    at_first = [
        int(analysis.masks[image, layer].sum()) if layer >= 0 else 0
        for image, layer in enumerate(analysis.first_defective_layer.tolist())
    ]
    ratios = analysis.max_median_norm_ratio[:, last]
    high_norm_counts = analysis.high_norm_counts
    return {
        "max_median_norm_ratio_last_layer": ratios.tolist(),
        "mean_max_median_norm_ratio_last_layer": float(ratios.mean()),
        "defect_token_share": [count / tokens for count in at_first],
        "mean_defect_token_share": sum(at_first) / (tokens * analysis.num_images),
        "first_defective_layer": analysis.first_defective_layer.tolist(),
        "images_with_defects": int(analysis.high_norm_defects(DEFECT_NORM_GAP).sum()),
        "images_with_cosine_outliers": int((analysis.first_defective_layer >= 0).sum()),
        "images_with_high_norm_tokens": int((high_norm_counts.sum(dim=1) > 0).sum()),
        "high_norm_tokens_per_layer": high_norm_counts.sum(dim=0).tolist(),
        "high_norm_weights_cosine": analysis.high_norm_weights_cosines(),
    }


def nothing_to_repair(analysis: DefectAnalysis) -> bool:
    """Return whether the analysis of a selection sample shows nothing to repair: no image has a high-norm token
    (`direction_sources.HIGH_NORM_FACTOR` times its median norm) at any layer, and none has a defect whose flagged
    tokens reach `DEFECT_NORM_GAP` times the median norm. Cosine outliers among tokens of ordinary norm, which every
    image shows by chance, are not defects to repair."""
    return not analysis.high_norm_layers() and not bool(analysis.high_norm_defects(DEFECT_NORM_GAP).any())


def _check_output_dir(args: RepairArguments) -> Path:
    """Return the output directory, refusing a non-empty one unless resuming into it or `overwrite` is set."""
    output_dir = Path(args.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {str(output_dir)!r} is a file.")
    busy = output_dir.is_dir() and any(output_dir.iterdir())
    resuming_here = args.resume is not None and Path(args.resume).expanduser().resolve().is_relative_to(
        output_dir.resolve()
    )
    if busy and not (args.overwrite or resuming_here):
        raise FileExistsError(
            f"--output-dir {str(output_dir)!r} is not empty; pass --overwrite, choose another directory, or "
            f"--resume {str(output_dir)!r} to continue that run."
        )
    return output_dir


def training_resolution(resolution: int, patch_size: int) -> int:
    """Return the side of the square training crop for a requested `resolution`: the largest multiple of the patch
    size not above it (logged when that differs from the request).

    Raises:
        ValueError: if that is less than 3 patches.
    """
    side = (resolution // patch_size) * patch_size
    if side < MIN_GRID_SIDE * patch_size:
        raise ValueError(
            f"--resolution {resolution} gives crops smaller than {MIN_GRID_SIDE}×{MIN_GRID_SIDE} patches of "
            f"{patch_size} pixels: use at least {MIN_GRID_SIDE * patch_size}."
        )
    if side != resolution:
        logger.warning(
            "--resolution %d is not a multiple of the patch size %d: training on %dx%d crops (%dx%d patches) of "
            "images resized to a short side of %d.",
            resolution,
            patch_size,
            side,
            side,
            side // patch_size,
            side // patch_size,
            side,
        )
    return side


@dataclass
class _Setup:
    """What every process prepares before training (see `repair`); `model` is None when there is nothing to repair
    (`nothing_to_repair`), which builds no adapter."""

    model: PeftModel | None
    normalization: ImageNormalization
    processor_config: dict[str, Any] | None
    dataset: Dataset | IterableDataset
    resolution: int
    directions: DefectDirections
    selection: ImageBatch
    before: DefectAnalysis
    before_features: OutputFeatures
    checkpoint: Path | None


def _prepare(args: RepairArguments, training: TrainingArguments, accelerator: Accelerator, resolution: int) -> _Setup:
    """Load the model and data, measure the defects of the selection sample, and build or resume the adapter."""
    checkpoint = resolve_checkpoint(args.resume) if args.resume else None
    evaluation = _evaluation_settings(args, Path(args.output_dir))
    if evaluation is not None:
        check_evaluation_data(evaluation)
    base_model, normalization = load_backbone(args.model)
    processor_config = load_model_image_processor_config(args.model)
    base_model = base_model.to(accelerator.device)
    description = describe_model(base_model)
    resolution = training_resolution(resolution, description.patch_size)
    dataset = build_dataset(
        args.data,
        resolution,
        description.patch_size,
        normalization,
        split=args.data_split,
        image_column=args.image_column,
        streaming=args.streaming,
    )
    if not isinstance(dataset, IterableDataset) and len(dataset) < accelerator.num_processes:
        raise ValueError(
            f"The data holds {len(dataset)} image(s), fewer than the {accelerator.num_processes} processes: every "
            "process needs at least one image per epoch."
        )
    log = UnreadableImageLog() if accelerator.is_main_process else None
    selection = selection_sample(dataset, max(args.selection_images, args.report_images), log)
    sample = selection.pixel_values.to(accelerator.device)
    # The directions are chosen once, from the base model, in the same pass that measures the sample's defects; a
    # resume reuses the checkpoint's; every process takes the main process's, so that all train the same way.
    saved = load_directions(checkpoint) if checkpoint is not None else None
    before = find_defect_tokens(
        base_model,
        sample,
        saved if saved is not None else compute_directions(base_model),
        direction_source=training.directions,
        mask_thr=training.mask_thr,
        min_tokens=training.skip_less_than,
        kernel=training.kernel,
    )
    directions = main_process_value(accelerator, before.defect_directions)
    before_features = output_features(base_model, sample[: args.report_images])
    model: PeftModel | None = None
    if checkpoint is not None:
        model = PeftModel.from_pretrained(base_model, checkpoint / CHECKPOINT_ADAPTER_DIR, is_trainable=True)
    elif nothing_to_repair(before):
        logger.info(
            "%s. Nothing to repair: the %d selection images have no high-norm token and no defect.",
            directions.describe(),
            len(selection.paths),
        )
    else:
        layers = select_layers_to_transform(
            before.first_defective_layer.tolist(), description.num_layers, training.limit_layers
        )
        model = build_sinder_model(base_model, layers, shift=training.shift)
    if model is not None:
        found = sorted({layer for layer in before.first_defective_layer.tolist() if layer >= 0})
        logger.info("%s.", directions.describe())
        logger.info(
            "First defective layers on %d sample images spread over the data: %s; adapting blocks %s (of %d; more "
            "if training finds defects elsewhere).",
            len(selection.paths),
            found or "none",
            model.peft_config["default"].layers_to_transform,
            description.num_layers,
        )
    return _Setup(
        model=model,
        normalization=normalization,
        processor_config=processor_config,
        dataset=dataset,
        resolution=resolution,
        directions=directions,
        selection=selection,
        before=before,
        before_features=before_features,
        checkpoint=checkpoint,
    )


def repair(
    args: RepairArguments,
    training: TrainingArguments | None = None,
    *,
    callbacks: Sequence[Callable[[TrainerState], None]] = (),
) -> RepairResult:
    """Run a whole repair (see the module docstring) and return what it produced.

    With several processes, a failure on any one of them (bad input, an image batch that cannot be read, a full
    disk while exporting, a refused upload) ends every process within seconds: the process that failed raises its
    error, the others raise `FailedOnAnotherProcess` (see `distributed.py`).

    Args:
        args: the run's inputs and outputs.
        training: the hyperparameters; None takes the paper's. A `stop_window` of None becomes 1000, or 6 on the
            bundled demo images.
        callbacks: passed to `SinderTrainer` (called with the state after every step).

    Raises:
        FileExistsError, FileNotFoundError, ValueError, ModelNotAvailableError: bad inputs, before anything is
            written.
        HubUploadError: the upload to the Hub failed (the outputs are written).
        FailedOnAnotherProcess: another process failed.
    """
    training = training or TrainingArguments()
    if training.stop_window is None and args.data is None:
        training = replace(training, stop_window=DEMO_STOP_WINDOW)
    output_dir = _check_output_dir(args)
    requested_resolution = args.resolution or (
        DEMO_RESOLUTION if args.model == DEMO_MODEL_NAME else DEFAULT_RESOLUTION
    )
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_dir=str(output_dir) if args.report_to else None,
    )
    try:
        setup = run_on_every_process(accelerator, lambda: _prepare(args, training, accelerator, requested_resolution))
        model = setup.model
        if model is None:
            state = TrainerState(stop_reason="nothing_to_repair")
        else:
            if args.report_to:
                accelerator.init_trackers(
                    "sinder-repair",
                    config={
                        **asdict(training),
                        "model": args.model,
                        "layers": str(model.peft_config["default"].layers_to_transform),
                    },
                )
            trainer = SinderTrainer(
                model,
                setup.directions,
                training,
                accelerator,
                output_dir / "checkpoints",
                callbacks=callbacks,
                unreadable=[image.name for image in setup.selection.unreadable],
            )
            if setup.checkpoint is not None:
                trainer.load_checkpoint(setup.checkpoint)
                logger.info("Resuming from %s at step %d.", setup.checkpoint, trainer.state.step)
            state = trainer.train(setup.dataset)
        report: dict[str, Any] = {}
        if state.stop_reason != "interrupted":
            exported = run_on_main_process(
                accelerator,
                lambda: _export(
                    args,
                    training,
                    output_dir,
                    setup,
                    state=state,
                    processes=accelerator.num_processes,
                    requested_resolution=requested_resolution,
                ),
            )
            report = exported or {}
    finally:
        accelerator.end_training()  # closes the trackers and, with several processes, the process group
    return RepairResult(output_dir=output_dir, report=report, state=state)


def _write_directory(target: Path, write: Any) -> Path:
    """Write a directory through `write(temporary_path)` under a temporary name, then move it into place, so that
    `target` is either complete or absent."""
    temporary = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
    return target


def _export(
    args: RepairArguments,
    training: TrainingArguments,
    output_dir: Path,
    setup: _Setup,
    *,
    state: TrainerState,
    processes: int,
    requested_resolution: int,
) -> dict[str, Any]:
    """Write adapter/, model/ (merged, with its image processor and card), report.json and figures/; evaluate and
    push when asked. Returns the report.

    A run that took no step repaired nothing: it writes neither adapter/ nor model/ (the input is the result), does
    not evaluate or push, and its report says `"repaired": false`.
    """
    from .data import denormalize_image
    from .hub import RepairCard, push_folder_to_hub, write_model_card
    from .visualize import save_before_after_figure, save_diagnosis_figure, save_layer_norm_plot

    model = setup.model
    repaired = model is not None and state.step > 0
    # with the blocks adapted during training
    layers = list(model.peft_config["default"].layers_to_transform) if repaired else []
    report_count = min(args.report_images, len(setup.selection.paths))
    report_paths = setup.selection.paths[:report_count]
    resolution = setup.resolution
    before_report = _subset(setup.before, report_count)
    report_pixels = setup.selection.pixel_values[:report_count]
    merged: nn.Module | None = None
    after, after_features = before_report, setup.before_features
    if repaired:
        _write_directory(output_dir / "adapter", model.save_pretrained)
        merged = model.merge_and_unload().eval()
        report_pixels = report_pixels.to(next(merged.parameters()).device)
        after = find_defect_tokens(
            merged,
            report_pixels,
            compute_directions(merged),
            direction_source=training.directions,
            mask_thr=training.mask_thr,
            min_tokens=training.skip_less_than,
            kernel=training.kernel,
        )
        after_features = output_features(merged, report_pixels)
    clean = clean_token_mask(before_report.token_norms[:, -1])
    selection_images: list[str] | list[int] = (
        setup.selection.paths if isinstance(setup.dataset, ImageFileDataset) else setup.selection.indices
    )
    report = {
        "model": args.model,
        "data": args.data or "bundled demo images",
        "repaired": repaired,
        "resolution": resolution,
        "requested_resolution": requested_resolution,
        "layers_adapted": layers,
        "training": {
            **asdict(training),
            "lr": training.resolved_lr,
            "stop_window": capped_stop_window(training.resolved_stop_window, setup.dataset),
            "norm_gap": training.resolved_norm_gap,
        },
        "directions": setup.directions.to_dict(),
        "processes": processes,
        "steps": state.step,
        "images_seen": state.images_seen,
        "images_skipped": state.images_skipped,
        "images_unreadable": len(state.unreadable),
        "nan_steps": state.nan_steps,
        "stop_reason": state.stop_reason,
        "seconds": round(state.seconds, 2),
        "defective_layers_during_training": state.defective_layers,
        "selection_images": selection_images,
        "report_images": report_paths,
        "unreadable_images": state.unreadable[:MAX_LISTED_UNREADABLE],
        "before": _analysis_summary(before_report),
        "after": _analysis_summary(after),
        "clean_token_cosine": clean_token_cosine(setup.before_features, after_features, clean),
        "cls_cosine": pooled_cosine(setup.before_features, after_features),
        "sinder_peft_version": __version__,
    }

    def write_model(directory: Path) -> None:
        assert merged is not None
        merged.save_pretrained(directory)
        save_image_processor(directory, setup.processor_config, setup.normalization, resolution)
        write_model_card(
            directory,
            RepairCard(
                base_model=args.model,
                data=report["data"],
                steps=state.step,
                images_seen=state.images_seen,
                images_skipped=state.images_skipped,
                learning_rate=training.resolved_lr,
                momentum=training.momentum,
                resolution=resolution,
                layers=layers,
                seconds=state.seconds,
                before=_card_numbers(report["before"]),
                after=_card_numbers(report["after"]),
                clean_token_cosine=report["clean_token_cosine"],
                sinder_peft_version=__version__,
                repo_id=args.push_to_hub,
                num_report_images=len(report_paths),
            ),
        )

    if repaired:
        _write_directory(output_dir / "model", write_model)
    else:  # a model/ or adapter/ left by an earlier run in this directory (--overwrite) is not this run's result
        for stale in ("model", "adapter"):
            shutil.rmtree(output_dir / stale, ignore_errors=True)

    def write_figures(directory: Path) -> None:
        directory.mkdir(parents=True)
        for index, path in enumerate(report_paths):
            picture = denormalize_image(report_pixels[index].cpu(), setup.normalization)
            title = f"{Path(path).name}: last-layer token norms and features"
            if repaired:
                save_before_after_figure(
                    picture,
                    before_report.token_norms[index, -1],
                    before_report.last_patch_features[index],
                    after.token_norms[index, -1],
                    after.last_patch_features[index],
                    directory / f"before_after_{index}_{_file_stem(path)}.png",
                    title=title,
                )
            else:
                save_diagnosis_figure(
                    picture,
                    before_report.token_norms[index, -1],
                    before_report.last_patch_features[index],
                    directory / f"diagnosis_{index}_{_file_stem(path)}.png",
                    title=f"{title} (nothing to repair)",
                )
        save_layer_norm_plot(
            before_report.max_median_norm_ratio.tolist(),
            _first_layer(before_report),
            directory / "layer_norms_before.png",
        )
        if repaired:
            save_layer_norm_plot(
                after.max_median_norm_ratio.tolist(), _first_layer(after), directory / "layer_norms_after.png"
            )

    _write_directory(output_dir / "figures", write_figures)
    evaluation = _evaluation_settings(args, output_dir)
    if evaluation is not None and merged is not None:
        report["evaluation"] = _evaluate_original_and_repaired(args, evaluation, merged, setup.normalization)
    elif evaluation is not None:
        logger.warning("Nothing was repaired: the --evaluate-* evaluation is skipped (the input is the result).")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    if args.push_to_hub and not repaired:
        logger.warning("Nothing was repaired: nothing is pushed to %s.", args.push_to_hub)
    elif args.push_to_hub:
        hub = {"token": args.hub_token, "endpoint": args.hub_endpoint}
        report["pushed_to"] = push_folder_to_hub(output_dir / "model", args.push_to_hub, **hub)
        if args.push_adapter:
            push_folder_to_hub(output_dir / "adapter", args.push_to_hub, path_in_repo="adapter", **hub)
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _evaluation_settings(args: RepairArguments, output_dir: Path) -> EvaluationArguments | None:
    """Return the settings of the evaluation that ends the run (`--evaluate-*`), or None when there is none."""
    if not args.evaluates:
        return None
    return EvaluationArguments(
        output_dir=str(output_dir / "evaluation"),
        knn_data=args.evaluate_knn_data,
        seg_data=args.evaluate_seg_data,
        defect_data=args.evaluate_defect_data,
    )


def _evaluate_original_and_repaired(
    args: RepairArguments, settings: EvaluationArguments, merged: nn.Module, normalization: ImageNormalization
) -> dict[str, Any]:
    """Evaluate the original model (loaded again: the merge wrote into its weights) next to the repaired one with
    `sinder evaluate`'s probes, write `evaluation/`, and return `evaluation.json`'s content."""
    original, _ = load_backbone(args.model)
    original = original.to(next(merged.parameters()).device)
    return evaluate_models([(args.model, original, normalization), ("repaired", merged, normalization)], settings)


def _file_stem(path: str) -> str:
    """Return a file-name-safe stem for an image path (🤗 dataset items are named "source:split:index")."""
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in Path(path).stem)


def _subset(analysis: DefectAnalysis, count: int) -> DefectAnalysis:
    """Return the analysis of the first `count` images only."""
    per_image = (
        "cosines",
        "masks",
        "first_defective_layer",
        "token_norms",
        "max_median_norm_ratio",
        "high_norm_share",
        "last_patch_features",
        "weights_cosines",
    )
    values = {name.name: getattr(analysis, name.name) for name in fields(analysis)}
    values.update({name: values[name][:count] for name in per_image})
    return DefectAnalysis(**values)


def _first_layer(analysis: DefectAnalysis) -> int | None:
    """Return the earliest first defective layer over the analysed images, or None if none is defective."""
    layers = [layer for layer in analysis.first_defective_layer.tolist() if layer >= 0]
    return min(layers) if layers else None


def _card_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """Return the averages of a report summary that the model card shows (NaN where no image is defective)."""
    layers = [layer for layer in summary["first_defective_layer"] if layer >= 0]
    return {
        "max_median_norm_ratio": summary["mean_max_median_norm_ratio_last_layer"],
        "defect_token_share": summary["mean_defect_token_share"],
        "first_defective_layer": sum(layers) / len(layers) if layers else float("nan"),
    }


def build_argument_parser(**kwargs: Any) -> HfArgumentParser:
    """Return the parser of the repair flags: one per field of `RepairArguments` and `TrainingArguments`."""
    return HfArgumentParser((RepairArguments, TrainingArguments), **kwargs)


def arguments_from_namespace(namespace: argparse.Namespace) -> tuple[RepairArguments, TrainingArguments]:
    """Return the `RepairArguments` and `TrainingArguments` of parsed flags (the namespace may hold other entries,
    such as the subcommand's)."""
    return tuple(
        kind(**{item.name: getattr(namespace, item.name) for item in fields(kind) if item.init})
        for kind in (RepairArguments, TrainingArguments)
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `repair` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "repair",
        parents=[build_argument_parser(add_help=False)],
        help="repair the singular defects of a ViT",
        description="Repair the singular defects of a ViT (SINDER) and write a standard, merged model.",
    )
    parser.set_defaults(handler=run)
    return parser


def _high_norm_line(summary: dict[str, Any]) -> str:
    """Return where an analysis summary has high-norm tokens: "none", or the layers with the weights' |cos|."""
    layers = [layer for layer, count in enumerate(summary["high_norm_tokens_per_layer"]) if count > 0]
    if not layers:
        return "none"
    cosines = summary["high_norm_weights_cosine"]
    explained = min(cosines[layer] for layer in layers)
    return (
        f"{summary['images_with_high_norm_tokens']} of {len(summary['first_defective_layer'])} images, layers "
        f"{layers[0]}-{layers[-1]} (lowest |cos| with the weights' direction {explained:.2f})"
    )


def summary_text(report: dict[str, Any], output_dir: Path) -> str:
    """Return the summary `sinder repair` prints for a report: the before/after numbers, or, when nothing was
    repaired, why, and that no model was written."""
    before, after = report["before"], report["after"]
    data_layers = [entry["layer"] for entry in report["directions"]["layers"] if entry["source"] == "data"]
    directions = f"from the data at layers {data_layers}" if data_layers else "the weights' at every layer"
    if not report["repaired"]:
        if before["images_with_high_norm_tokens"]:
            return (
                f"No defect found along the directions in the {report['images_seen']} images checked, but "
                f"high-norm tokens are present: {_high_norm_line(before)}.\n"
                f"  directions: {directions}. A low |cos| means the weights' direction does not explain them: "
                "--directions auto (the default) or data takes it from them.\n"
                f"No model written: the input is unchanged. Report in {output_dir / 'report.json'}"
            )
        reason = (
            f"the {len(report['selection_images'])} selection images have no high-norm token and no defect"
            if report["stop_reason"] == "nothing_to_repair"
            else f"no defect in the {report['images_seen']} images checked (stop window "
            f"{report['training']['stop_window']})"
        )
        return (
            f"Nothing needed repair: {reason}.\n"
            f"  high-norm tokens (>= 4x the median norm): none\n"
            f"No model written: the input is the result. Report in {output_dir / 'report.json'}"
        )
    return (
        f"Repaired in {report['steps']} steps ({report['images_seen']} images, {report['images_skipped']} without "
        f"defect, {report['seconds']:.0f} s; stopped by {report['stop_reason']}).\n"
        f"  max/median token norm, last layer: {before['mean_max_median_norm_ratio_last_layer']:.1f} -> "
        f"{after['mean_max_median_norm_ratio_last_layer']:.1f}\n"
        f"  images with a high-norm defect: {before['images_with_defects']} -> {after['images_with_defects']} "
        f"(of {len(before['first_defective_layer'])})\n"
        f"  images with high-norm tokens: {before['images_with_high_norm_tokens']} -> "
        f"{after['images_with_high_norm_tokens']}; after: {_high_norm_line(after)}\n"
        f"  directions: {directions}\n"
        f"  mean cosine to the original: clean tokens {report['clean_token_cosine']:.3f}, CLS "
        f"{report['cls_cosine']:.3f}\n"
        f"Outputs in {output_dir}: model/ (AutoModel.from_pretrained), adapter/, report.json, figures/"
    )


def run(namespace: argparse.Namespace) -> int:
    """Run a repair from parsed flags and print where the outputs are and the before/after numbers.

    Returns the exit code: 0 on success, 1 (with a one-line message and no traceback) for inputs the user can fix
    and a failed upload, 1 without a message on the processes that stop because another one failed (that one shows
    the error), 130 when interrupted (a checkpoint was saved).
    """
    from .hub import HubUploadError
    from .loading import ModelNotAvailableError

    try:
        result = repair(*arguments_from_namespace(namespace))
    except FailedOnAnotherProcess:
        return 1
    except (
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
        ModelNotAvailableError,
        HubUploadError,
    ) as error:
        print(f"sinder repair: error: {error}", file=sys.stderr)
        return 1
    state = result.state
    if state.stop_reason == "interrupted":
        print(
            f"Interrupted at step {state.step}; checkpoint saved. Continue with: --resume {result.output_dir}",
            file=sys.stderr,
        )
        return 130
    if result.report:
        print(summary_text(result.report, result.output_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `examples/repair.py` (run it with `accelerate launch` or plain `python`)."""
    parser = build_argument_parser(prog="repair.py", description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
