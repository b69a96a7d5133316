"""The settings of `sinder repair` that are not training hyperparameters: the model, the data, the outputs, the
evaluation and the upload (`RepairArguments`; the training ones are `training.arguments.TrainingArguments`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..evaluation.arguments import EvaluationArguments
from ..models.loading import DEMO_MODEL_NAME
from ..models.other_libraries import ModelKwargsArguments

DEFAULT_RESOLUTION = 518
DEMO_RESOLUTION = 224
DEMO_STOP_WINDOW = 6
MAX_LISTED_UNREADABLE = 100


@dataclass
class RepairArguments(ModelKwargsArguments):
    """Inputs and outputs of a repair run; the training hyperparameters are `TrainingArguments`. Each field is also a
    command-line flag of `sinder repair` (`transformers.HfArgumentParser` builds them from the fields);
    `--model-kwargs` comes from `ModelKwargsArguments`."""

    model: str = field(
        default=DEMO_MODEL_NAME,
        metadata={
            "help": "Hub id (facebook/dinov2-base, ...), a local model directory, 'demo', timm:NAME_OR_DIR, "
            "timm:hf-hub:ORG/NAME or open_clip:ARCH[/PRETRAINED_OR_FILE] (the result is then written in that "
            "library's format)."
        },
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
    evaluate_depth_data: str | None = field(
        default=None,
        metadata={
            "help": "After the repair, evaluate both models with the linear depth probe on this data "
            "(`sinder evaluate --depth-data` layouts)."
        },
    )
    evaluate_unsupervised_data: str | None = field(
        default=None,
        metadata={
            "help": "After the repair, compare both models' unsupervised segmentation on this data (`sinder "
            "evaluate --unsupervised-data`; default with --evaluate-seg-data: its validation split)."
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
        data = (
            self.evaluate_knn_data,
            self.evaluate_seg_data,
            self.evaluate_depth_data,
            self.evaluate_unsupervised_data,
            self.evaluate_defect_data,
        )
        return any(data)


def evaluation_settings(args: RepairArguments, output_dir: Path) -> EvaluationArguments | None:
    """Return the settings of the evaluation that ends the run (`--evaluate-*`), or None when there is none."""
    if not args.evaluates:
        return None
    return EvaluationArguments(
        output_dir=str(output_dir / "evaluation"),
        knn_data=args.evaluate_knn_data,
        seg_data=args.evaluate_seg_data,
        depth_data=args.evaluate_depth_data,
        unsupervised_data=args.evaluate_unsupervised_data,
        defect_data=args.evaluate_defect_data,
    )
