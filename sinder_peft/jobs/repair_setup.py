"""What every process of a repair prepares before training: the model, the data, the directions, the selection
sample's defects, and the adapter (built, resumed, or none when nothing needs repair)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import PeftModel
from torch.utils.data import Dataset, IterableDataset

from ..analysis.detection import DefectAnalysis, DefectDirections, find_defect_tokens
from ..analysis.direction_files import load_directions
from ..analysis.preservation import OutputFeatures, output_features
from ..evaluation.sections import check_evaluation_data
from ..images.batching import ImageBatch, UnreadableImageLog, selection_sample
from ..images.datasets import build_dataset
from ..images.preprocessing import MIN_GRID_SIDE
from ..models.loading import load_backbone_and_processor_config
from ..training.arguments import TrainingArguments
from ..training.checkpoints import CHECKPOINT_ADAPTER_DIR, resolve_checkpoint
from ..training.distributed import main_process_value
from ..training.trainer import build_sinder_model, compute_directions
from ..training.window_loss import select_layers_to_transform
from ..tuner.architectures import ImageNormalization, describe_model
from .repair_arguments import RepairArguments, evaluation_settings
from .repair_report import nothing_to_repair

logger = logging.getLogger(__name__)


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
class RepairSetup:
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


def prepare_repair(
    args: RepairArguments, training: TrainingArguments, accelerator: Accelerator, resolution: int
) -> RepairSetup:
    """Load the model and data, measure the defects of the selection sample, and build or resume the adapter."""
    checkpoint = resolve_checkpoint(args.resume) if args.resume else None
    evaluation = evaluation_settings(args, Path(args.output_dir))
    if evaluation is not None:
        check_evaluation_data(evaluation)
    base_model, normalization, processor_config = load_backbone_and_processor_config(args.model, args.model_kwargs)
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
        test=training.defect_test,
    )
    directions = main_process_value(accelerator, before.defect_directions)
    before_features = output_features(base_model, sample[: args.report_images])
    model: PeftModel | None = None
    if checkpoint is not None:
        model = PeftModel.from_pretrained(base_model, checkpoint / CHECKPOINT_ADAPTER_DIR, is_trainable=True)
    elif nothing_to_repair(before):
        logger.info(
            "%s. Nothing to repair: no block makes a high-norm token in the %d selection images.",
            directions.describe(),
            len(selection.paths),
        )
    else:
        layers = select_layers_to_transform(
            before.first_defective_layer.tolist(), description.num_layers, training.limit_layers
        )
        model = build_sinder_model(base_model, layers, shift=training.shift, fuse_gated_mlp=training.fuse_gated_mlp)
    if model is not None:
        found = sorted({layer for layer in before.first_defective_layer.tolist() if layer >= 0})
        born = sorted({layer for layer in before.first_high_norm_defect_layer.tolist() if layer >= 0})
        logger.info("%s.", directions.describe())
        logger.info(
            "On %d sample images spread over the data, high-norm defects are born at layers %s and the defect test "
            "finds first defective layers %s; adapting blocks %s (of %d; more if training finds defects elsewhere).",
            len(selection.paths),
            born or "none",
            found or "none",
            model.peft_config["default"].layers_to_transform,
            description.num_layers,
        )
    return RepairSetup(
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
