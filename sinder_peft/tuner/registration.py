"""Registering "SINDER" as a PEFT adapter type.

PEFT keeps its adapter types in a closed enum (`peft.utils.PeftType`) and looks every type up in a few mappings
(type -> config class, tuner class, parameter prefix). PEFT >= 0.15 fills those mappings through
`peft.utils.register_peft_method`, which refuses names that are not members of the enum. So registering an external
type takes two steps:

1. add a `SINDER` member to `PeftType`, the same way `enum` itself builds members (a `str` subclass instance with
   `_name_`/`_value_`, entered in the enum's member tables), so that `PeftType("SINDER")`, `PeftType.SINDER` and
   `"SINDER" in list(PeftType)` all work, and `adapter_config.json` files round-trip;
2. call `register_peft_method(name="sinder", ...)`.

Both steps are idempotent, run at `import sinder_peft`, and fail with a clear `ImportError` on a PEFT release that has
no `register_peft_method`.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType

SINDER_NAME = "sinder"
SINDER_PREFIX = "sinder_"


def _add_peft_type_member(name: str) -> PeftType:
    """Add `name` to the `PeftType` enum (if absent) and return the member.

    Returns the existing member when `name` is already there, so importing twice, or a future PEFT release that ships
    the type itself, both work.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # Bypass EnumType.__setattr__, which forbids (re)assigning members, to make `PeftType.SINDER` resolve.
    type.__setattr__(PeftType, name, member)
    if not isinstance(PeftType[name], enum.Enum) or PeftType(name) is not member:
        raise ImportError(f"Could not add {name!r} to peft.utils.PeftType with PEFT {peft.__version__}.")
    return member


SINDER_PEFT_TYPE: PeftType = _add_peft_type_member(SINDER_NAME.upper())


def register_sinder(config_cls: type, model_cls: type) -> None:
    """Register the SINDER config and tuner classes with PEFT (once per process).

    After this, `get_peft_model(model, SinderConfig())`, `PeftConfig.from_pretrained(path)` and
    `PeftModel.from_pretrained(base, path)` dispatch to sinder-peft.

    Raises:
        ImportError: if the installed PEFT cannot register external adapter types.
    """
    try:
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import register_peft_method
    except ImportError as error:
        raise ImportError(
            f"sinder-peft needs a PEFT release with `peft.utils.register_peft_method` (PEFT >= 0.15); "
            f"found PEFT {peft.__version__}. Install a supported version: pip install 'peft>=0.18,<0.22'."
        ) from error
    if PEFT_TYPE_TO_TUNER_MAPPING.get(SINDER_PEFT_TYPE) is model_cls:
        return
    register_peft_method(name=SINDER_NAME, config_cls=config_cls, model_cls=model_cls, prefix=SINDER_PREFIX)
