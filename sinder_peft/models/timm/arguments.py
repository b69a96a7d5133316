"""The keyword arguments of `timm.create_model`, given as JSON (`--model-kwargs`) and written back as JSON.

A model card passes Python objects to `timm.create_model` (`mlp_layer=timm.layers.SwiGLUPacked`,
`act_layer=torch.nn.SiLU`); on the command line and in `config.json` they are names:

- a dotted name inside `timm` or `torch` ("timm.layers.SwiGLUPacked", "torch.nn.SiLU"), resolved by importing the
  module and reading the attribute. Any other root ("os.system", "builtins.eval"), a private part ("torch._C") or an
  object whose own module lies outside timm and torch ("torch.os.system" is the `os` module's) is refused: the JSON
  may come from a shared command line or a downloaded `config.json`, and must not reach arbitrary code;
- one of timm's activation names ("silu", "gelu", ...) for an activation (`act_layer`), as timm's `get_act_layer`
  reads them; for another layer argument (`mlp_layer`, `norm_layer`, ...), a public name of `timm.layers`
  ("SwiGLUPacked" is "timm.layers.SwiGLUPacked").

`parse_model_kwargs` reads and checks the JSON without importing anything, so a refusal comes before any model is
loaded or any file written; `resolve_model_kwargs` turns the names into objects (it needs timm); `json_model_args`
goes back: the names of the objects, for `config.json` (timm's `save_for_hf` asks for a JSON replacement of every
argument that is not JSON) and for the loading line of the model card.
"""

from __future__ import annotations

import importlib
import json
import re
import types
from collections.abc import Mapping
from functools import partial
from typing import Any

ALLOWED_ROOTS: tuple[str, ...] = ("timm", "torch")
"""The packages whose objects a dotted name may name."""

_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_ARGUMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Namespaces searched first for a public dotted name of an object (`json_model_args`), in this order.
_PUBLIC_NAMESPACES: tuple[str, ...] = ("timm.layers", "torch.nn")


def is_activation_argument(key: str) -> bool:
    """Whether the argument `key` takes an activation layer (`act_layer`, `mlp_act_layer`, ...), whose value may be
    one of timm's activation names."""
    return key == "act_layer" or key.endswith("_act_layer")


def is_dotted_name(value: object) -> bool:
    """Whether `value` is a string shaped like a dotted name (`package.module.Object`)."""
    return isinstance(value, str) and _DOTTED_NAME.match(value) is not None


def _check_dotted_name(name: str, key: str) -> None:
    """Refuse a dotted name outside timm and torch, or with a private part, naming the argument it was given for."""
    parts = name.split(".")
    if parts[0] not in ALLOWED_ROOTS:
        raise ValueError(
            f"--model-kwargs: {key}={name!r} names an object outside timm and torch; only dotted names inside "
            f"{' and '.join(ALLOWED_ROOTS)} are resolved (e.g. 'timm.layers.SwiGLUPacked', 'torch.nn.SiLU')."
        )
    if any(part.startswith("_") for part in parts):
        raise ValueError(f"--model-kwargs: {key}={name!r} names a private object; only public names are resolved.")


def _check_value(value: object, key: str) -> None:
    """Check every dotted name in `value` (strings, and those inside lists and objects)."""
    if is_dotted_name(value):
        _check_dotted_name(str(value), key)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, key)
    elif isinstance(value, dict):
        for item in value.values():
            _check_value(item, key)


def parse_model_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the keyword arguments that `text` (a JSON object, or an already parsed mapping) gives, checked but not
    resolved: nothing is imported.

    Raises:
        ValueError: for malformed JSON, JSON that is not an object, an argument name that is not a Python
            identifier, or a dotted name outside timm and torch (`_check_dotted_name`).
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        kwargs = dict(text)
    else:
        try:
            kwargs = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(
                f"--model-kwargs is not valid JSON ({error}): {text!r}. Give a JSON object, e.g. "
                '\'{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "init_values": 1e-5}\'.'
            ) from error
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object (keyword: value), not {type(kwargs).__name__}.")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _ARGUMENT_NAME.match(key):
            raise ValueError(f"--model-kwargs: {key!r} is not a keyword argument name.")
        _check_value(value, key)
    return kwargs


def _in_allowed_package(obj: object) -> bool:
    """Whether `obj` (a module, class, function or `functools.partial`) is defined inside timm or torch."""
    if isinstance(obj, partial):
        return _in_allowed_package(obj.func)
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return isinstance(module, str) and module.split(".")[0] in ALLOWED_ROOTS


def resolve_dotted_name(name: str, key: str = "value") -> Any:
    """Return the object `name` ("timm.layers.SwiGLUPacked") names: the longest importable module prefix, then its
    attributes.

    Raises:
        ValueError: for a name outside timm and torch, a private part, a name that does not resolve, or an object
            (or a module on the way) defined outside timm and torch.
    """
    _check_dotted_name(name, key)
    parts = name.split(".")
    obj: Any = None
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attribute in parts[end:]:
            if not hasattr(obj, attribute):
                raise ValueError(f"--model-kwargs: {key}={name!r} does not exist ({attribute!r} is not in {obj!r}).")
            obj = getattr(obj, attribute)
            if not _in_allowed_package(obj):
                raise ValueError(f"--model-kwargs: {key}={name!r} leads outside timm and torch ({obj!r}); refused.")
        return obj
    raise ValueError(f"--model-kwargs: {key}={name!r} does not name an importable module.")


def _resolve_value(value: Any, key: str, timm: types.ModuleType) -> Any:
    """Return `value` with its dotted names (and, for an activation argument, timm's activation name) resolved."""
    if is_dotted_name(value):
        return resolve_dotted_name(str(value), key)
    if isinstance(value, str) and is_activation_argument(key):
        try:
            return timm.layers.get_act_layer(value)
        except (KeyError, ValueError) as error:
            raise ValueError(f"--model-kwargs: {key}={value!r} is not one of timm's activation names.") from error
    if isinstance(value, str) and key.endswith("_layer") and not value.startswith("_") and hasattr(timm.layers, value):
        # a layer named as timm.layers names it ("SwiGLUPacked"): the same as its dotted name
        return getattr(timm.layers, value)
    if isinstance(value, list):
        return [_resolve_value(item, key, timm) for item in value]
    if isinstance(value, dict):
        return {name: _resolve_value(item, key, timm) for name, item in value.items()}
    return value


def resolve_model_kwargs(kwargs: Mapping[str, Any], timm: types.ModuleType) -> dict[str, Any]:
    """Return the arguments for `timm.create_model`: `kwargs` (checked by `parse_model_kwargs`) with every dotted
    name replaced by the object it names, and timm's activation names by their activation class.

    Raises:
        ValueError: for a name that does not resolve, or resolves outside timm and torch.
    """
    return {key: _resolve_value(value, key, timm) for key, value in kwargs.items()}


def _is_json(value: object) -> bool:
    """Whether `value` can be written as JSON as it is."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def dotted_name(obj: object, key: str, timm: types.ModuleType) -> str:
    """Return a name `resolve_model_kwargs` turns back into `obj`: timm's activation name for an activation argument
    when one names it, else its public dotted name (`timm.layers.X`, `torch.nn.X` first, then its own module's).

    Raises:
        ValueError: if `obj` has no such name (e.g. a lambda or a class defined outside timm and torch).
    """
    if is_activation_argument(key):
        for name in ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "tanh", "sigmoid", "identity"):
            if timm.layers.get_act_layer(name) is obj:
                return name
    for namespace in _PUBLIC_NAMESPACES:
        module = importlib.import_module(namespace)
        for attribute in dir(module):
            if not attribute.startswith("_") and getattr(module, attribute) is obj:
                return f"{namespace}.{attribute}"
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        candidate = f"{module}.{qualname}"
        if is_dotted_name(candidate) and candidate.split(".")[0] in ALLOWED_ROOTS:
            try:
                if resolve_dotted_name(candidate, key) is obj:
                    return candidate
            except ValueError:
                pass
    raise ValueError(
        f"The timm model's argument {key}={obj!r} has no dotted name inside timm or torch, so it cannot be written "
        "into config.json (timm's save_for_hf needs a JSON replacement for it)."
    )


def json_model_args(model_args: Mapping[str, Any], timm: types.ModuleType) -> dict[str, Any]:
    """Return the replacements, by name, of the arguments of `model_args` (a timm model's `_model_args`) that are not
    JSON: each object's dotted name (`dotted_name`). JSON arguments are left out (timm writes them itself).

    Raises:
        ValueError: for an argument without such a name.
    """
    return {key: dotted_name(value, key, timm) for key, value in model_args.items() if not _is_json(value)}


def loading_line(path: str, layer_arguments: Mapping[str, str]) -> str:
    """Return the Python line that loads the timm model saved at `path` with its layer arguments (`json_model_args`),
    e.g. `timm.create_model("local-dir:PATH", pretrained=True, mlp_layer=timm.layers.SwiGLUPacked)`."""
    arguments = "".join(f", {key}={_python_value(value)}" for key, value in layer_arguments.items())
    return f'model = timm.create_model("local-dir:{path}", pretrained=True{arguments})'


def _python_value(name: str) -> str:
    """Return the Python expression of a layer argument's name: a dotted name as it is, an activation name quoted."""
    return name if is_dotted_name(name) else json.dumps(name)
