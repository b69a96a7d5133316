"""The optional libraries of sinder-peft's extras (`[timm]`, `[open_clip]`), imported when a function first needs
one, so that sinder-peft imports and runs without them and a missing install is reported with the command that
fixes it."""

from __future__ import annotations

import importlib
import types


def import_extra(module: str, extra: str, purpose: str) -> types.ModuleType:
    """Return the library `module`, imported now.

    Raises:
        ImportError: if it cannot be imported, saying that `purpose` needs it and that
            `pip install 'sinder-peft[EXTRA]'` installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional library {module}, which could not be imported ({error}). Install it with "
            f"`pip install 'sinder-peft[{extra}]'`."
        ) from error
