"""The SINDER adapter for PEFT, laid out as PEFT's own tuners are (`peft/tuners/<name>/`).

- `config.py`: `SinderConfig`, the adapter's settings;
- `layer.py`: `SinderLayer` and `Linear`, W = U·diag(S + δ)·Vᵀ with only δ trained (factored forward, merge);
- `fused_layer.py`: a gated MLP's gate and up projections as one target, one SVD of [W_gate; W_up] and one shift;
- `model.py`: `SinderModel`, the tuner that injects the layers and fills in each family's default targets;
- `registration.py`: registering the "SINDER" type with PEFT's closed `PeftType` enum;
- `descriptions.py`, `architectures.py`: the architecture registry, what every family's blocks are made of and how to
  run them (the tuner takes its default targets from it; analysis, training and evaluation run models through it).

Importing this package registers the adapter type, so `get_peft_model`, `PeftModel.from_pretrained` and
`PeftConfig.from_pretrained` handle SINDER adapters. It imports nothing of sinder-peft outside itself.
"""

from .config import SinderConfig
from .layer import Linear, SinderLayer
from .model import SinderModel
from .registration import SINDER_PEFT_TYPE, register_sinder

__all__ = ["SINDER_PEFT_TYPE", "Linear", "SinderConfig", "SinderLayer", "SinderModel"]

register_sinder(SinderConfig, SinderModel)
