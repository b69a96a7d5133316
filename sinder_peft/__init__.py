"""sinder-peft: repair the singular defects of DINOv2 (SINDER, ECCV 2024) as a PEFT adapter.

Importing this package registers the "SINDER" adapter type with PEFT, so that `peft.get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` handle SINDER adapters.
"""

from .config import SinderConfig
from .defects import DefectAnalysis, find_defect_tokens, singular_defect_directions
from .layer import Linear as SinderLinear
from .layer import SinderLayer
from .model import SinderModel
from .registration import SINDER_PEFT_TYPE, register_sinder

__version__ = "0.1.0"

register_sinder(SinderConfig, SinderModel)

__all__ = [
    "SINDER_PEFT_TYPE",
    "DefectAnalysis",
    "SinderConfig",
    "SinderLayer",
    "SinderLinear",
    "SinderModel",
    "__version__",
    "find_defect_tokens",
    "singular_defect_directions",
]
