"""Convert between the original DINOv2 checkpoint layout and transformers' DINOv2 models.

The original repository (facebookresearch/dinov2, torch.hub `dinov2_vit*14[_reg]`) and code built on it, including the
published SINDER checkpoint, store a ViT as `cls_token`, `pos_embed`, `mask_token`, `register_tokens`,
`patch_embed.proj.*`, `blocks.{i}.*` and `norm.*`, with the query, key and value projections stacked in one
`attn.qkv` matrix and, for SwiGLU models, the gate and up projections stacked in one `mlp.w12` matrix. transformers'
`Dinov2Model` / `Dinov2WithRegistersModel` keep every projection separate. This module maps one layout onto the other
in both directions, from a single table (`_BLOCK_KEYS`, `_EMBEDDING_KEYS`) so that the two directions cannot drift.

Checkpoints saved by older transformers releases (`attention.attention.query`, `attention.output.dense`,
`mlp.weights_in`, `mlp.weights_out`) need nothing from here: transformers 5 renames them itself in `from_pretrained`
(its `conversion_mapping.py` entries for `Dinov2Model` and `Dinov2WithRegistersModel`).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
)

from ..tuner.architectures import unwrap_backbone
from ..tuner.layer import effective_linear_weight

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights, tried in this order ({"model": {"teacher.backbone.…"}}, …).
WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "teacher")

# Prefixes removed from every key (distributed wrappers).
STRIPPED_PREFIXES: tuple[str, ...] = ("module.",)

# Prefixes that mark the backbone inside a training checkpoint; keys outside them (heads, student) are dropped.
BACKBONE_PREFIXES: tuple[str, ...] = ("teacher.backbone.", "backbone.")

# DINOv2 uses 64-dimensional attention heads in every released size (S/14: 6 heads, B: 12, L: 16, g: 24).
HEAD_DIM = 64

# LayerNorm epsilon of the original DinoVisionTransformer (`partial(nn.LayerNorm, eps=1e-6)`).
LAYER_NORM_EPS = 1e-6

# Largest integer `mlp_ratio` tried when inferring the MLP width (released models use 4).
MAX_MLP_RATIO = 64

# How many key names an error message lists per category before summarizing the rest.
MAX_LISTED_KEYS = 20

# original key (outside the blocks) -> transformers key
_EMBEDDING_KEYS: dict[str, str] = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}

# original key inside `blocks.{i}.` -> transformers key(s) inside `encoder.layer.{i}.`; several targets are stacked
# along dim 0 in the original, in this order (query, key, value; gate, up).
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "norm1.weight": ("norm1.weight",),
    "norm1.bias": ("norm1.bias",),
    "attn.qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
    "attn.qkv.bias": ("attention.q_proj.bias", "attention.k_proj.bias", "attention.v_proj.bias"),
    "attn.proj.weight": ("attention.o_proj.weight",),
    "attn.proj.bias": ("attention.o_proj.bias",),
    "ls1.gamma": ("layer_scale1.lambda1",),
    "norm2.weight": ("norm2.weight",),
    "norm2.bias": ("norm2.bias",),
    "mlp.fc1.weight": ("mlp.fc1.weight",),
    "mlp.fc1.bias": ("mlp.fc1.bias",),
    "mlp.fc2.weight": ("mlp.fc2.weight",),
    "mlp.fc2.bias": ("mlp.fc2.bias",),
    "mlp.w12.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.w12.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.w3.weight": ("mlp.down_proj.weight",),
    "mlp.w3.bias": ("mlp.down_proj.bias",),
    "ls2.gamma": ("layer_scale2.lambda1",),
}
_GELU_MLP_KEYS: tuple[str, ...] = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_SWIGLU_MLP_KEYS: tuple[str, ...] = ("mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias")
_LAYER_SCALE_KEYS: tuple[str, ...] = ("ls1.gamma", "ls2.gamma")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
DinoV2Backbone = Dinov2Model | Dinov2WithRegistersModel


def _summarize_keys(keys: list[str]) -> str:
    """Return `keys` as a readable list, cut after `MAX_LISTED_KEYS` names with a count of the rest."""
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        listed += f", … and {len(keys) - MAX_LISTED_KEYS} more"
    return listed


def _load_checkpoint_file(path: Path) -> object:
    """Return the object stored in a `.safetensors` file or a `torch.save` file (read with `weights_only=True`).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file holds a pickled module or other object that `weights_only` loading refuses.
    """
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.suffix == ".safetensors":
        return load_safetensors(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a plain state dict: torch.load(weights_only=True) refused it ({error}). It probably holds "
            "a whole pickled model (e.g. written with `torch.save(model)`); load it with the code that wrote it and "
            "save `model.state_dict()` instead."
        ) from error


def _unwrap(checkpoint: object) -> Mapping[str, object]:
    """Return the state dict nested in `checkpoint` under the first of `WRAPPER_KEYS` found, level after level."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}.")
    while True:
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)), None)
        if wrapper is None:
            return checkpoint
        logger.info("Using the state dict stored under %r.", wrapper)
        checkpoint = checkpoint[wrapper]


def _strip_prefixes(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Return `state_dict` with `STRIPPED_PREFIXES` removed and, if present, only the keys under a backbone prefix.

    A DINOv2 training checkpoint holds the teacher and student backbones and their heads; the teacher backbone is the
    released model, so `teacher.backbone.` wins over `backbone.`, and the other keys are dropped (logged).
    """
    stripped: dict[str, object] = {}
    for key, value in state_dict.items():
        for prefix in STRIPPED_PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    for prefix in BACKBONE_PREFIXES:
        selected = {key[len(prefix) :]: value for key, value in stripped.items() if key.startswith(prefix)}
        if selected:
            dropped = sorted({key.split(".", 1)[0] for key in stripped if not key.startswith(prefix)})
            if dropped:
                logger.info("Keeping the keys under %r; dropping the other top-level entries %s.", prefix, dropped)
            return selected
    return stripped


def _unchunk_blocks(state_dict: dict[str, object]) -> dict[str, object]:
    """Return `state_dict` with `blocks.{chunk}.{i}.…` (the original `BlockChunk` layout) renamed to `blocks.{i}.…`.

    The original code pads every chunk with `nn.Identity()` so that `i` is already the global block index; a checkpoint
    whose chunks restart at 0 is renumbered in (chunk, index) order instead.
    """
    chunked = {key: _CHUNKED_BLOCK_KEY.match(key) for key in state_dict}
    positions = sorted({(int(match[1]), int(match[2])) for match in chunked.values() if match is not None})
    if not positions:
        return state_dict
    if len({index for _, index in positions}) == len(positions):
        global_index = {position: position[1] for position in positions}
    else:
        global_index = {position: rank for rank, position in enumerate(positions)}
    logger.info("Flattening %d chunked blocks (blocks.{chunk}.{index}) into blocks.{index}.", len(positions))
    flattened: dict[str, object] = {}
    for key, value in state_dict.items():
        match = chunked[key]
        if match is not None:
            key = f"blocks.{global_index[(int(match[1]), int(match[2]))]}.{match[3]}"
        if key in flattened:
            raise ValueError(f"The checkpoint holds block key {key} twice (chunked and plain).")
        flattened[key] = value
    return flattened


def read_original_state_dict(
    path_or_state_dict: str | Path | Mapping[str, object] | nn.Module,
) -> dict[str, torch.Tensor]:
    """Return the original-layout state dict held by a file, a (possibly wrapped) dict or a module.

    Files: `.safetensors`, or anything `torch.load(map_location="cpu", weights_only=True)` reads (`.pth`, `.pt`).
    The dict is unwrapped from `WRAPPER_KEYS`, stripped of `STRIPPED_PREFIXES` and `BACKBONE_PREFIXES`, and chunked
    blocks are flattened, so the keys returned are the plain ones (`cls_token`, `blocks.3.attn.qkv.weight`, …).
    Nothing is checked against an architecture yet: that is `load_original_checkpoint`'s job.

    Raises:
        FileNotFoundError: if a path is given and does not exist.
        ValueError: if the content is not a mapping of names to tensors.
    """
    if isinstance(path_or_state_dict, str | Path):
        checkpoint = _load_checkpoint_file(Path(path_or_state_dict))
    else:
        checkpoint = path_or_state_dict
    state_dict = _unchunk_blocks(_strip_prefixes(_unwrap(checkpoint)))
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"These checkpoint entries are not tensors: {_summarize_keys(not_tensors)}.")
    return {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def _require(state_dict: Mapping[str, torch.Tensor], key: str, purpose: str) -> torch.Tensor:
    """Return `state_dict[key]`, or raise a ValueError saying that `key` is needed for `purpose`."""
    if key not in state_dict:
        raise ValueError(f"The checkpoint has no {key!r}, which is needed to infer {purpose}.")
    return state_dict[key]


def _gelu_mlp_ratio(hidden_size: int, mlp_width: int) -> int | None:
    """Return the integer `mlp_ratio` for which transformers' `Dinov2MLP` is `mlp_width` wide, if any."""
    ratio = mlp_width // hidden_size
    return ratio if ratio >= 1 and int(hidden_size * ratio) == mlp_width else None


def _swiglu_mlp_ratio(hidden_size: int, mlp_width: int) -> int | None:
    """Return the smallest integer `mlp_ratio` for which transformers' `Dinov2SwiGLUFFN` is `mlp_width` wide, if any.

    transformers (like the original `SwiGLUFFNFused`) keeps two thirds of `hidden_size * mlp_ratio`, rounded up to a
    multiple of 8; `Dinov2Config.mlp_ratio` must be an int, so only integer ratios can reproduce a checkpoint.
    """
    for ratio in range(1, MAX_MLP_RATIO + 1):
        if (int(int(hidden_size * ratio) * 2 / 3) + 7) // 8 * 8 == mlp_width:
            return ratio
    return None


def infer_original_config(state_dict: Mapping[str, torch.Tensor]) -> Dinov2Config | Dinov2WithRegistersConfig:
    """Return the transformers config that reproduces an original-layout state dict's architecture.

    Read from the tensors: hidden size and channels (`patch_embed.proj.weight`), patch size (its square kernel),
    image size (`pos_embed` holds 1 + M² positions: image size = M · patch size), depth (largest block index + 1),
    registers (`register_tokens`), SwiGLU (`mlp.w12` present) and the MLP width (turned into the integer `mlp_ratio`
    that makes transformers build the same shapes), query/key/value biases (`attn.qkv.bias`). Heads are
    hidden size / 64, as in every DINOv2 size; pass an explicit config to `load_original_checkpoint` otherwise.

    Raises:
        ValueError: if a tensor needed for inference is missing or has a shape no DINOv2 config reproduces.
    """
    patch_weight = _require(state_dict, "patch_embed.proj.weight", "the hidden size and patch size")
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ValueError(
            f"'patch_embed.proj.weight' has shape {tuple(patch_weight.shape)}; expected a square convolution kernel "
            "(hidden_size, channels, patch_size, patch_size)."
        )
    hidden_size, num_channels, patch_size = (int(size) for size in patch_weight.shape[:3])
    pos_embed = _require(state_dict, "pos_embed", "the image size")
    num_positions = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else -1
    grid = int(round(max(num_positions, 0) ** 0.5))
    if pos_embed.ndim != 3 or num_positions < 1 or grid * grid != num_positions:
        raise ValueError(
            f"'pos_embed' has shape {tuple(pos_embed.shape)}; expected (1, 1 + M*M, hidden_size) for a square M x M "
            "patch grid."
        )
    block_indices = {int(match[1]) for key in state_dict if (match := _BLOCK_KEY.match(key))}
    if not block_indices:
        raise ValueError("The checkpoint has no 'blocks.{i}.…' keys, so its depth cannot be inferred.")
    depth = max(block_indices) + 1
    first = f"blocks.{min(block_indices)}."
    if f"{first}mlp.w12.weight" in state_dict:
        use_swiglu = True
        mlp_width = state_dict[f"{first}mlp.w12.weight"].shape[0]
        mlp_ratio = _swiglu_mlp_ratio(hidden_size, mlp_width // 2) if mlp_width % 2 == 0 else None
        mlp_shape = f"'{first}mlp.w12.weight' of shape {tuple(state_dict[f'{first}mlp.w12.weight'].shape)}"
    else:
        use_swiglu = False
        fc1 = _require(state_dict, f"{first}mlp.fc1.weight", "the MLP width (no mlp.w12 either)")
        mlp_ratio = _gelu_mlp_ratio(hidden_size, fc1.shape[0])
        mlp_shape = f"'{first}mlp.fc1.weight' of shape {tuple(fc1.shape)}"
    if mlp_ratio is None:
        raise ValueError(
            f"No integer mlp_ratio makes transformers' DINOv2 {'SwiGLU' if use_swiglu else 'GELU'} MLP match "
            f"{mlp_shape} at hidden size {hidden_size} (transformers' Dinov2Config.mlp_ratio must be an int)."
        )
    if hidden_size % HEAD_DIM != 0:
        raise ValueError(
            f"Hidden size {hidden_size} is not a multiple of {HEAD_DIM}, so the number of attention heads cannot be "
            "inferred; pass `config=` with the right `num_attention_heads`."
        )
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": depth,
        "num_attention_heads": hidden_size // HEAD_DIM,
        "mlp_ratio": mlp_ratio,
        "use_swiglu_ffn": use_swiglu,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "num_channels": num_channels,
        "qkv_bias": f"{first}attn.qkv.bias" in state_dict,
        "layer_norm_eps": LAYER_NORM_EPS,
        "layerscale_value": 1.0,
    }
    if "register_tokens" in state_dict:
        register_tokens = state_dict["register_tokens"]
        if register_tokens.ndim != 3:
            raise ValueError(
                f"'register_tokens' has shape {tuple(register_tokens.shape)}; expected (1, registers, hidden_size)."
            )
        return Dinov2WithRegistersConfig(num_register_tokens=int(register_tokens.shape[1]), **common)
    return Dinov2Config(**common)


def _original_layout(config: PretrainedConfig) -> dict[str, tuple[str, ...]]:
    """Return every original key a model with `config` has, mapped to the transformers key(s) it holds."""
    layout = {key: (target,) for key, target in _EMBEDDING_KEYS.items()}
    if config.model_type != "dinov2_with_registers":
        del layout["register_tokens"]
    skipped = set(_GELU_MLP_KEYS if config.use_swiglu_ffn else _SWIGLU_MLP_KEYS)
    if not config.qkv_bias:
        skipped.add("attn.qkv.bias")
    for index in range(config.num_hidden_layers):
        for key, targets in _BLOCK_KEYS.items():
            if key not in skipped:
                layout[f"blocks.{index}.{key}"] = tuple(f"encoder.layer.{index}.{target}" for target in targets)
    return layout


def _is_linear(module: nn.Module) -> bool:
    """Whether `module` is a Linear layer or an adapter layer wrapping one."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _read_tensor(backbone: nn.Module, name: str) -> torch.Tensor | None:
    """Return the tensor a backbone applies under the transformers parameter name `name` (None if it has none).

    Linear weights go through `effective_linear_weight`, so an adapter-wrapped model exports the weights it computes
    with; biases and other parameters are read from the (base) module.
    """
    module_name, _, attribute = name.rpartition(".")
    module = backbone.get_submodule(module_name)
    if attribute == "weight" and _is_linear(module):
        return effective_linear_weight(module)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(base, attribute)


def _original_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Return `backbone`'s weights in the original layout (tensors share memory with the model where possible).

    A transformers model built with `use_mask_token=False` has no mask token, which the original architecture always
    has; it is written as zeros, the original initialization (it only replaces masked patches during pre-training).
    """
    state_dict: dict[str, torch.Tensor] = {}
    for key, targets in _original_layout(backbone.config).items():
        tensors = [_read_tensor(backbone, target) for target in targets]
        if key == "mask_token" and tensors[0] is None:
            reference = backbone.embeddings.cls_token
            tensors = [torch.zeros(1, reference.shape[-1], dtype=reference.dtype, device=reference.device)]
        state_dict[key] = tensors[0].detach() if len(tensors) == 1 else torch.cat(tensors).detach()
    return state_dict


def _complete_optional_entries(
    state_dict: dict[str, torch.Tensor], layout: Mapping[str, tuple[str, ...]], hidden_size: int
) -> dict[str, torch.Tensor]:
    """Return `state_dict` with the entries the original architecture may legitimately lack filled in.

    - No layer scale at all (original models built with `init_values=None` use `nn.Identity`): scales of 1.
    - No `mask_token`: zeros, the original initialization (it is only used for masked pre-training inputs).
    A checkpoint that has some layer scales but not others is left as it is, and refused as incomplete.
    """
    completed = dict(state_dict)
    dtype = next((tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()), torch.float32)
    layer_scale_keys = [key for key in layout if key.endswith((".ls1.gamma", ".ls2.gamma"))]
    if not any(key in state_dict for key in layer_scale_keys):
        logger.info("The checkpoint has no layer scale (ls1/ls2.gamma); using scales of 1, which is equivalent.")
        completed.update({key: torch.ones(hidden_size, dtype=dtype) for key in layer_scale_keys})
    if "mask_token" not in state_dict:
        logger.warning("The checkpoint has no 'mask_token'; using zeros (it only matters for masked pre-training).")
        completed["mask_token"] = torch.zeros(1, hidden_size, dtype=dtype)
    return completed


def _check_against_layout(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model_name: str
) -> None:
    """Raise a ValueError naming every missing, unexpected and mis-shaped key of `state_dict` (original names)."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} has shape {tuple(state_dict[key].shape)} but the model expects {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarize_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarize_keys(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped keys: {_summarize_keys(mismatched)}")
    if problems:
        raise ValueError(f"The checkpoint does not match {model_name}: " + "; ".join(problems) + ".")


def describe_original_config(config: PretrainedConfig) -> str:
    """Return a one-line summary of a DINOv2 config (for messages and the model card)."""
    mlp = "SwiGLU" if config.use_swiglu_ffn else "GELU"
    registers = getattr(config, "num_register_tokens", 0)
    return (
        f"hidden size {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"patch {config.patch_size}, image size {config.image_size}, {mlp} MLP (mlp_ratio {config.mlp_ratio}), "
        f"{registers} register tokens"
    )


def load_original_checkpoint(
    path_or_state_dict: str | Path | Mapping[str, object] | nn.Module,
    config: PretrainedConfig | None = None,
) -> DinoV2Backbone:
    """Return a transformers DINOv2 model holding the weights of an original-layout checkpoint.

    Args:
        path_or_state_dict: a `.pth`/`.pt`/`.safetensors` file, a state dict (possibly wrapped in `{"model": …}`,
            `{"state_dict": …}`, `{"teacher": …}`, prefixed with `module.`, `backbone.`, `teacher.backbone.`, or with
            chunked blocks `blocks.{chunk}.{i}.…`) or an original-code module.
        config: a `Dinov2Config` or `Dinov2WithRegistersConfig` to build instead of the one `infer_original_config`
            reads from the tensors (e.g. for a head width other than 64); the checkpoint must match it.

    Returns:
        A `Dinov2Model`, or a `Dinov2WithRegistersModel` when the checkpoint has register tokens, in eval mode, with
        the checkpoint's dtype. It computes the original model's features exactly at the native resolution; at other
        resolutions transformers' position-embedding interpolation applies (see docs/models.md).

    Raises:
        ValueError: naming every missing, unexpected or mis-shaped key, or the shape nothing can reproduce.
    """
    state_dict = read_original_state_dict(path_or_state_dict)
    if config is None:
        config = infer_original_config(state_dict)
    if config.model_type == "dinov2_with_registers":
        model_class: type[DinoV2Backbone] = Dinov2WithRegistersModel
    elif config.model_type == "dinov2":
        model_class = Dinov2Model
    else:
        raise ValueError(f"Expected a Dinov2Config or Dinov2WithRegistersConfig, got {type(config).__name__}.")
    with torch.device("meta"):
        model = model_class(config)
    model_name = f"a {model_class.__name__} with {describe_original_config(config)}"
    layout = _original_layout(config)
    state_dict = _complete_optional_entries(state_dict, layout, config.hidden_size)
    _check_against_layout(state_dict, _original_state_dict(model), model_name)
    converted: dict[str, torch.Tensor] = {}
    for key, targets in layout.items():
        if key == "mask_token" and model.embeddings.mask_token is None:
            continue
        for target, tensor in zip(targets, state_dict[key].chunk(len(targets)), strict=True):
            converted[target] = tensor.clone()
    model.load_state_dict(converted, strict=True, assign=True)
    logger.info("Loaded %s.", model_name)
    return model.eval()


def export_original_checkpoint(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Write `model`'s weights in the original DINOv2 layout with `torch.save` and return that state dict.

    `model` is anything `unwrap_backbone` accepts (a DINOv2 backbone, a task model around one, a PEFT model); linear
    weights are read with `effective_linear_weight`, so an adapter-wrapped model exports what it computes. The file
    loads with `strict=True` into the original `DinoVisionTransformer` built with layer scale (as every released
    DINOv2 is), `block_chunks=0` and the matching `num_register_tokens` / `ffn_layer`. A path ending in
    `.safetensors` is written with safetensors instead.
    """
    backbone = unwrap_backbone(model)
    state_dict = {key: tensor.cpu().clone().contiguous() for key, tensor in _original_state_dict(backbone).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_safetensors(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    logger.info("Wrote %d tensors in the original DINOv2 layout to %s.", len(state_dict), path)
    return state_dict
