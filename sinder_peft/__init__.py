"""sinder-peft: repair the singular defects of Vision Transformers (SINDER, ECCV 2024) as a PEFT adapter.

Importing this package registers the "SINDER" adapter type with PEFT, so that `peft.get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` handle SINDER adapters.
"""

from .config import SinderConfig
from .defects import DefectAnalysis, find_defect_tokens, singular_defect_directions
from .evaluate import EvaluationArguments, evaluate, evaluate_models
from .layer import Linear as SinderLinear
from .layer import SinderLayer
from .model import SinderModel
from .registration import SINDER_PEFT_TYPE, register_sinder

__version__ = "0.3.0"

register_sinder(SinderConfig, SinderModel)

__all__ = [
    "SINDER_PEFT_TYPE",
    "DefectAnalysis",
    "EvaluationArguments",
    "SinderConfig",
    "SinderLayer",
    "SinderLinear",
    "SinderModel",
    "__version__",
    "evaluate",
    "evaluate_models",
    "find_defect_tokens",
    "singular_defect_directions",
]
