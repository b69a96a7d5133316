"""sinder-peft: repair the singular defects of Vision Transformers (SINDER, ECCV 2024) as a PEFT adapter.

Importing this package registers the "SINDER" adapter type with PEFT, so that `peft.get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` handle SINDER adapters.

Every name of the public API is importable from here (`__all__`); the subpackages are laid out by job, lower layers
first (the README's map of the code):

- `tuner`: the PEFT adapter (config, layer, model, registration) and the architecture registry;
- `analysis`: defect directions from the weights, defect and high-norm token detection, feature preservation;
- `visualization`: figures;
- `synthetic`: the demo model and images, planted-defect models;
- `models`, `images`: models and images in and out (loading, the Hub, conversion; preprocessing, datasets);
- `training`, `evaluation`: the repair's training loop; `sinder evaluate`;
- `jobs`: `sinder repair` and `sinder diagnose`; `cli`: the `sinder` command.
"""

from .analysis.detection import (
    DefectAnalysis,
    DefectDirections,
    DefectTest,
    born_high_norm_mask,
    defect_token_mask,
    direction_cosines,
    estimate_defect_directions,
    find_defect_tokens,
    high_norm_token_mask,
)
from .analysis.direction_files import load_directions, save_directions
from .analysis.directions import singular_defect_directions
from .evaluation.arguments import EvaluationArguments
from .evaluation.evaluate import evaluate, evaluate_models
from .images.datasets import build_dataset
from .images.preprocessing import prepare_image
from .jobs.diagnose import diagnose
from .jobs.repair import RepairResult, repair
from .jobs.repair_arguments import RepairArguments
from .models.conversion import convert_checkpoint, convert_model
from .models.hub import HubUploadError
from .models.loading import ModelNotAvailableError, load_backbone
from .models.open_clip.conversion import open_clip_to_transformers, transformers_to_open_clip
from .models.open_clip.loading import load_open_clip_model, save_open_clip_model
from .models.original_layout import export_original_checkpoint, load_original_checkpoint
from .models.timm.conversion import timm_to_transformers, transformers_to_timm
from .models.timm.loading import load_timm_model, save_timm_model
from .synthetic.demo import build_demo_model, demo_images
from .synthetic.planting import PlantedModel, build_planted_model, save_planted_model
from .training.arguments import TrainingArguments
from .training.loss import smooth_neighbourhood_loss
from .training.state import TrainerState
from .training.trainer import SinderTrainer, build_sinder_model
from .tuner import SINDER_PEFT_TYPE, SinderConfig, SinderLayer, SinderModel
from .tuner import Linear as SinderLinear
from .tuner.architectures import (
    SUPPORTED_FAMILIES,
    SUPPORTED_MODEL_TYPES,
    ImageNormalization,
    describe_model,
    unwrap_backbone,
)
from .tuner.descriptions import ArchitectureDescription
from .version import __version__
from .visualization.figures import before_after_figure, diagnosis_figure

__all__ = [
    "SINDER_PEFT_TYPE",
    "SUPPORTED_FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureDescription",
    "DefectAnalysis",
    "DefectDirections",
    "DefectTest",
    "born_high_norm_mask",
    "EvaluationArguments",
    "HubUploadError",
    "ImageNormalization",
    "ModelNotAvailableError",
    "PlantedModel",
    "RepairArguments",
    "RepairResult",
    "SinderConfig",
    "SinderLayer",
    "SinderLinear",
    "SinderModel",
    "SinderTrainer",
    "TrainerState",
    "TrainingArguments",
    "__version__",
    "before_after_figure",
    "build_dataset",
    "build_demo_model",
    "build_planted_model",
    "build_sinder_model",
    "convert_checkpoint",
    "convert_model",
    "defect_token_mask",
    "demo_images",
    "describe_model",
    "diagnose",
    "diagnosis_figure",
    "direction_cosines",
    "estimate_defect_directions",
    "evaluate",
    "evaluate_models",
    "export_original_checkpoint",
    "find_defect_tokens",
    "high_norm_token_mask",
    "load_backbone",
    "load_directions",
    "load_open_clip_model",
    "load_original_checkpoint",
    "load_timm_model",
    "open_clip_to_transformers",
    "prepare_image",
    "repair",
    "save_directions",
    "save_open_clip_model",
    "save_planted_model",
    "save_timm_model",
    "singular_defect_directions",
    "smooth_neighbourhood_loss",
    "timm_to_transformers",
    "transformers_to_open_clip",
    "transformers_to_timm",
    "unwrap_backbone",
]
