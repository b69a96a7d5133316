"""Convert between OpenCLIP's ViT image towers and transformers' `CLIPVisionModel`, in both directions, exactly.

OpenCLIP (`open_clip`, the `open_clip_torch` package) builds its image tower as a `VisionTransformer` whose blocks
keep the query, key and value projections fused in one `nn.MultiheadAttention.in_proj_weight` (and `in_proj_bias`),
stacked along dim 0 in that order. transformers' `CLIPVisionModel` computes the same function with separate `q_proj`,
`k_proj` and `v_proj`: `pre_layrnorm` after the embeddings, pre-norm blocks, `post_layernorm` on the pooled class
token. This module maps one layout onto the other from a single table (`_EMBEDDING_KEYS`, `_BLOCK_KEYS`), so that the
two directions cannot drift, and refuses every tower option that `CLIPVisionModel` cannot reproduce instead of
converting it approximately (`_unsupported_features`).

The repair itself runs on the `CLIPVisionModel`; `transformers_to_open_clip` writes its weights back into the OpenCLIP
model, whose projection `proj` and whole text tower stay untouched, and `save_open_clip_model` writes a checkpoint that
`open_clip.create_model_and_transforms(ARCH, pretrained=FILE)` loads without sinder-peft.

`open_clip` is optional: it is imported only through `require_open_clip`, when a function here needs it.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Mapping

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.initialization import no_init_weights

from ...tuner.architectures import unwrap_backbone
from .loading import require_open_clip

logger = logging.getLogger(__name__)


# OpenCLIP key inside the `VisionTransformer` -> transformers key(s) inside the `CLIPVisionModel` backbone; several
# targets are stacked along dim 0 in OpenCLIP, in this order (query, key, value).
_EMBEDDING_KEYS: dict[str, tuple[str, ...]] = {
    "conv1.weight": ("embeddings.patch_embedding.weight",),
    "class_embedding": ("embeddings.class_embedding",),
    "positional_embedding": ("embeddings.position_embedding.weight",),
    "ln_pre.weight": ("pre_layrnorm.weight",),
    "ln_pre.bias": ("pre_layrnorm.bias",),
    "ln_post.weight": ("post_layernorm.weight",),
    "ln_post.bias": ("post_layernorm.bias",),
}

# OpenCLIP key inside `transformer.resblocks.{i}.` -> transformers key(s) inside `encoder.layers.{i}.`.
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "ln_1.weight": ("layer_norm1.weight",),
    "ln_1.bias": ("layer_norm1.bias",),
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out_proj.weight": ("self_attn.out_proj.weight",),
    "attn.out_proj.bias": ("self_attn.out_proj.bias",),
    "ln_2.weight": ("layer_norm2.weight",),
    "ln_2.bias": ("layer_norm2.bias",),
    "mlp.c_fc.weight": ("mlp.fc1.weight",),
    "mlp.c_fc.bias": ("mlp.fc1.bias",),
    "mlp.c_proj.weight": ("mlp.fc2.weight",),
    "mlp.c_proj.bias": ("mlp.fc2.bias",),
}

# Tower keys that `CLIPVisionModel` has no place for and that the conversion leaves as they are: the output projection
# `proj`, and layer scales whose gamma is exactly one (the identity; any other gamma is refused).
_UNTOUCHED_KEY = re.compile(r"^(proj|transformer\.resblocks\.\d+\.ls_[12]\.gamma)$")

# The config fields of a `CLIPVisionModel` that must agree with the OpenCLIP tower its weights are written into.
_MATCHED_CONFIG_FIELDS: tuple[str, ...] = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


def _image_tower(open_clip: types.ModuleType, model: nn.Module) -> nn.Module:
    """Return the OpenCLIP `VisionTransformer` of `model`: `model.visual` (a `CLIP`, `CustomTextCLIP`, ...) or
    `model` itself.

    Raises:
        ValueError: if `model` has no image tower, or its tower is not OpenCLIP's `VisionTransformer`.
    """
    vision_transformer = open_clip.transformer.VisionTransformer
    if isinstance(model, vision_transformer):
        return model
    tower = getattr(model, "visual", None)
    if tower is None:
        raise ValueError(
            f"{type(model).__name__} is neither an OpenCLIP model with an image tower (`.visual`) nor an OpenCLIP "
            "VisionTransformer."
        )
    if not isinstance(tower, vision_transformer):
        raise ValueError(
            f"The image tower of this OpenCLIP model is a {type(tower).__module__}.{type(tower).__name__}, not "
            "OpenCLIP's VisionTransformer: only ViT towers built by OpenCLIP itself convert to a CLIPVisionModel "
            "(not ModifiedResNet towers, the RN50 family, nor timm towers, `timm_model_name`)."
        )
    return tower


def _is_identity_layer_scale(module: nn.Module) -> bool:
    """Whether an OpenCLIP `ls_1` / `ls_2` is the identity: `nn.Identity` or a `LayerScale` whose gamma is all ones."""
    if isinstance(module, nn.Identity):
        return True
    gamma = getattr(module, "gamma", None)
    return isinstance(gamma, torch.Tensor) and bool(torch.all(gamma == 1))


def _hidden_act(open_clip: types.ModuleType, activation: nn.Module | None) -> str | None:
    """Return transformers' name (`ACT2FN`) of the MLP activation `activation`, None when it has none."""
    if isinstance(activation, open_clip.transformer.QuickGELU):
        return "quick_gelu"
    if type(activation) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(activation.approximate)
    return None


def _attention_dropout(attention: nn.Module) -> float:
    """Return the dropout probability on the attention weights of an `nn.MultiheadAttention` or OpenCLIP `Attention`
    (it acts in train mode only; OpenCLIP's image towers set none)."""
    if isinstance(attention, nn.MultiheadAttention):
        return float(attention.dropout)
    return float(attention.attn_drop.p)


def _layer_norms(tower: nn.Module) -> dict[str, nn.Module | None]:
    """Return the tower's norms by name: `ln_pre`, `ln_post` and every block's `ln_1`, `ln_2` (None if absent)."""
    norms: dict[str, nn.Module | None] = {"ln_pre": tower.ln_pre, "ln_post": tower.ln_post}
    for index, block in enumerate(tower.transformer.resblocks):
        norms[f"transformer.resblocks.{index}.ln_1"] = getattr(block, "ln_1", None)
        norms[f"transformer.resblocks.{index}.ln_2"] = getattr(block, "ln_2", None)
    return norms


def _indices(indices: list[int]) -> str:
    """Return block indices as `blocks 0, 1, 2`, for error messages."""
    return f"block{'s' if len(indices) > 1 else ''} {', '.join(str(index) for index in indices)}"


def _attention_problems(open_clip: types.ModuleType, block: nn.Module) -> list[str]:
    """Return what `CLIPAttention` cannot reproduce in one block's attention (empty when it reproduces all of it).

    OpenCLIP's default blocks hold an `nn.MultiheadAttention`; its custom blocks (`block_type='custom'`, or any of the
    options named below) hold OpenCLIP's own `Attention`, which is the same computation when none of them is set.
    """
    attention = block.attn
    problems: list[str] = []
    if isinstance(attention, nn.MultiheadAttention):
        if not attention._qkv_same_embed_dim:
            problems.append("attention with separate key/value widths (kdim, vdim)")
        if attention.bias_k is not None or attention.add_zero_attn:
            problems.append("attention with bias_k/bias_v or add_zero_attn")
    elif isinstance(attention, open_clip.transformer.Attention):
        identity = nn.Identity()
        if getattr(attention, "logit_scale", None) is not None:
            problems.append("scaled cosine attention (scaled_cosine_attn=True)")
        if getattr(attention, "head_scale", None) is not None:
            problems.append("per-head attention scales (scale_heads=True)")
        query_key_norms = (getattr(attention, "ln_q", identity), getattr(attention, "ln_k", identity))
        if not all(isinstance(norm, nn.Identity) for norm in query_key_norms):
            problems.append("query/key normalization (qk_norm=True)")
        if not isinstance(getattr(attention, "ln_inner", identity), nn.Identity):
            problems.append("a norm on the attention context (scale_attn_inner=True)")
    else:
        problems.append(f"an attention module of type {type(attention).__name__}")
    if getattr(attention, "in_proj_bias", None) is None:
        problems.append("attention without query/key/value biases (CLIPVisionModel always has them)")
    if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
        problems.append("a norm after the attention (scale_attn=True)")
    return problems


def _block_problems(open_clip: types.ModuleType, block: nn.Module) -> list[str]:
    """Return what a `CLIPEncoderLayer` cannot reproduce in one OpenCLIP block (empty when it reproduces all of it)."""
    block_types = (open_clip.transformer.ResidualAttentionBlock, open_clip.transformer.CustomResidualAttentionBlock)
    if not isinstance(block, block_types):
        return [f"a block of type {type(block).__name__}"]
    problems = _attention_problems(open_clip, block)
    if hasattr(block, "ln_1_kv"):
        problems.append("cross-attention blocks")
    if not (_is_identity_layer_scale(block.ls_1) and _is_identity_layer_scale(block.ls_2)):
        problems.append("layer scale ls_1/ls_2 that is not the identity (ls_init_value; CLIPVisionModel has none)")
    if not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity):
        problems.append("a norm inside the MLP (scale_fc=True)")
    if _hidden_act(open_clip, block.mlp.gelu) is None:
        problems.append(f"the MLP activation {block.mlp.gelu!r} (supported: QuickGELU, GELU)")
    return problems


def _unsupported_features(open_clip: types.ModuleType, tower: nn.Module) -> list[str]:
    """Return every feature of an OpenCLIP `VisionTransformer` that `CLIPVisionModel` cannot reproduce.

    Accepted, because `CLIPVisionModel` computes exactly the same: class-token pooling (`pool_type='tok'`) with
    `ln_post` on all tokens or, with `final_ln_after_pool=True`, on the pooled token only (which is what
    `CLIPVisionModel` does: `post_layernorm` on the pooled class token); learnable or fixed sin-cos position tables;
    patch dropout (it acts in train mode only); custom blocks with none of their options set; layer scales whose gamma
    is exactly one. Everything else that changes the computation is named here, one entry per feature (with the
    blocks that have it).
    """
    problems: list[str] = []
    if getattr(tower, "attn_pool", None) is not None:
        problems.append("an attentional pooler (attentional_pool; CLIPVisionModel pools the class token)")
    elif tower.pool_type != "tok":
        problems.append(f"pool_type={tower.pool_type!r} (CLIPVisionModel pools the class token, 'tok')")
    if isinstance(tower.ln_pre, nn.Identity):
        problems.append("no_ln_pre=True (CLIPVisionModel always applies pre_layrnorm)")
    if tower.image_size[0] != tower.image_size[1] or tower.patch_size[0] != tower.patch_size[1]:
        problems.append(
            f"a non-square image size {tuple(tower.image_size)} or patch size {tuple(tower.patch_size)} "
            "(CLIPVisionConfig has one side for each)"
        )
    by_problem: dict[str, list[int]] = {}
    for index, block in enumerate(tower.transformer.resblocks):
        for problem in _block_problems(open_clip, block):
            by_problem.setdefault(problem, []).append(index)
    problems.extend(f"{problem} in {_indices(indices)}" for problem, indices in by_problem.items())
    activations = {
        _hidden_act(open_clip, getattr(getattr(block, "mlp", None), "gelu", None))
        for block in tower.transformer.resblocks
    }
    if len(activations - {None}) > 1:
        problems.append(f"different MLP activations in different blocks ({sorted(activations - {None})})")
    norms = _layer_norms(tower)
    not_affine = [
        name
        for name, norm in norms.items()
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None
    ]
    if not_affine:
        problems.append(f"norms that are not LayerNorms with weight and bias: {', '.join(not_affine)}")
    epsilons = {norm.eps for norm in norms.values() if isinstance(norm, nn.LayerNorm)}
    if len(epsilons) > 1:
        problems.append(f"LayerNorms with different eps {sorted(epsilons)} (CLIPVisionConfig has one layer_norm_eps)")
    return problems


def _clip_vision_config(open_clip: types.ModuleType, tower: nn.Module) -> CLIPVisionConfig:
    """Return the `CLIPVisionConfig` of the `CLIPVisionModel` that computes what the OpenCLIP tower computes.

    Raises:
        ValueError: naming every feature of the tower that `CLIPVisionModel` cannot reproduce
            (`_unsupported_features`), so that nothing is converted approximately.
    """
    problems = _unsupported_features(open_clip, tower)
    if problems:
        raise ValueError(
            "This OpenCLIP image tower cannot be converted to a CLIPVisionModel, which cannot reproduce: "
            + "; ".join(problems)
            + "."
        )
    if not isinstance(tower.patch_dropout, nn.Identity):
        logger.info(
            "The OpenCLIP tower has patch dropout (p=%s), which acts in train mode only; CLIPVisionModel has none.",
            tower.patch_dropout.prob,
        )
    first_block = tower.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=tower.conv1.out_channels,
        intermediate_size=first_block.mlp.c_fc.out_features,
        num_hidden_layers=len(tower.transformer.resblocks),
        num_attention_heads=first_block.attn.num_heads,
        num_channels=tower.conv1.in_channels,
        image_size=int(tower.image_size[0]),
        patch_size=int(tower.patch_size[0]),
        hidden_act=_hidden_act(open_clip, first_block.mlp.gelu),
        layer_norm_eps=tower.ln_pre.eps,
        attention_dropout=_attention_dropout(first_block.attn),
        projection_dim=tower.output_dim,
    )


def _key_pairs(num_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """Return every (OpenCLIP tower key, transformers backbone keys) pair of a tower with `num_layers` blocks."""
    pairs = list(_EMBEDDING_KEYS.items())
    for index in range(num_layers):
        pairs.extend(
            (f"transformer.resblocks.{index}.{source}", tuple(f"encoder.layers.{index}.{key}" for key in targets))
            for source, targets in _BLOCK_KEYS.items()
        )
    return pairs


def _check_tower_keys(tower_state: Mapping[str, torch.Tensor], num_layers: int) -> None:
    """Raise a ValueError if the tower's state dict lacks a key of the table or holds one that is neither mapped
    nor deliberately left untouched (`_UNTOUCHED_KEY`): a structure this module does not know is refused."""
    mapped = {source for source, _ in _key_pairs(num_layers)}
    missing = sorted(mapped - set(tower_state))
    unknown = sorted(key for key in tower_state if key not in mapped and not _UNTOUCHED_KEY.match(key))
    if missing or unknown:
        raise ValueError(
            "The OpenCLIP image tower does not have the layout of a CLIPVisionModel: "
            f"missing {missing or 'nothing'}, unknown {unknown or 'nothing'}."
        )


def _to_transformers_state_dict(tower_state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Return the `CLIPVisionModel` backbone state dict holding the tower's weights; fused q/k/v are split."""
    converted: dict[str, torch.Tensor] = {}
    for source, targets in _key_pairs(num_layers):
        for target, tensor in zip(targets, tower_state[source].chunk(len(targets), dim=0), strict=True):
            converted[target] = tensor
    return converted


def _to_open_clip_state_dict(backbone_state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Return the OpenCLIP tower keys holding a `CLIPVisionModel` backbone's weights; q/k/v are fused again."""
    return {
        source: torch.cat([backbone_state[target] for target in targets], dim=0)
        for source, targets in _key_pairs(num_layers)
    }


def open_clip_to_transformers(model: nn.Module) -> CLIPVisionModel:
    """Return a `CLIPVisionModel` (eval mode, on the tower's device and dtype) holding the OpenCLIP image tower's
    weights, which computes what the tower computes.

    `model` is an OpenCLIP model with an image tower (`model.visual` of a `CLIP` or `CustomTextCLIP`) or a bare
    `VisionTransformer`. Mapped: `conv1` to the patch embedding, `class_embedding`, `positional_embedding`, `ln_pre` to
    `pre_layrnorm`, each block's `ln_1`/`ln_2`, fused `in_proj_weight`/`in_proj_bias` split into q/k/v, `out_proj`,
    `mlp.c_fc`/`mlp.c_proj`, and `ln_post` to `post_layernorm`; `hidden_act` is `quick_gelu` for QuickGELU towers
    (OpenAI's weights) and `gelu` for GELU ones. The output projection `proj` has no place in a `CLIPVisionModel`
    and stays in the OpenCLIP model.

    The outputs then agree: `pooler_output` is OpenCLIP's pooled feature before `proj`, and `last_hidden_state` is
    the token sequence before `ln_post` (OpenCLIP's `output_tokens` are after it, unless `final_ln_after_pool`).

    Raises:
        ImportError: if open_clip is not installed.
        ValueError: if the tower is not OpenCLIP's VisionTransformer (ModifiedResNet, timm towers) or has a feature
            `CLIPVisionModel` cannot reproduce, named in the message (layer scale that is not the identity, an
            attentional pooler, pooling other than the class token, no `ln_pre`, QK norm, ...).
    """
    open_clip = require_open_clip()
    tower = _image_tower(open_clip, model)
    config = _clip_vision_config(open_clip, tower)
    tower_state = tower.state_dict()
    _check_tower_keys(tower_state, config.num_hidden_layers)
    reference = tower.conv1.weight
    with no_init_weights():  # every weight is overwritten below
        vision_model = CLIPVisionModel(config).to(device=reference.device, dtype=reference.dtype)
    unwrap_backbone(vision_model).load_state_dict(
        _to_transformers_state_dict(tower_state, config.num_hidden_layers), strict=True
    )
    logger.info(
        "Converted the OpenCLIP image tower (%d blocks, width %d, %s) to a CLIPVisionModel.",
        config.num_hidden_layers,
        config.hidden_size,
        config.hidden_act,
    )
    return vision_model.eval()


def transformers_to_open_clip(model: CLIPVisionModel, open_clip_model: nn.Module) -> nn.Module:
    """Write the weights of a `CLIPVisionModel` (e.g. a repaired one) into the image tower of `open_clip_model`, in
    place, and return `open_clip_model`.

    The inverse of `open_clip_to_transformers`: q/k/v are fused again into `in_proj_weight`/`in_proj_bias`, every
    other tensor is copied as it is. Left untouched: the tower's projection `proj`, identity layer scales, and
    everything outside the tower (the whole text tower, `logit_scale`). `model` may also be a model holding a
    `CLIPVisionModel` backbone; a PEFT model must be merged first (`merge_and_unload()`).

    Raises:
        ImportError: if open_clip is not installed.
        ValueError: if the OpenCLIP tower cannot be converted (see `open_clip_to_transformers`), if the two models'
            architectures differ (each differing config field is named), or if `model`'s weights are not a plain
            `CLIPVisionModel`'s (e.g. an unmerged adapter).
    """
    open_clip = require_open_clip()
    backbone = unwrap_backbone(model)
    if backbone.config.model_type != "clip_vision_model":
        raise ValueError(
            f"Expected a CLIPVisionModel, got a backbone of model_type={backbone.config.model_type!r} "
            f"({type(backbone).__name__})."
        )
    tower = _image_tower(open_clip, open_clip_model)
    expected = _clip_vision_config(open_clip, tower)
    mismatches = [
        f"{field}: {getattr(backbone.config, field)!r} (OpenCLIP tower: {getattr(expected, field)!r})"
        for field in _MATCHED_CONFIG_FIELDS
        if getattr(backbone.config, field) != getattr(expected, field)
    ]
    if mismatches:
        raise ValueError(
            "The CLIPVisionModel and the OpenCLIP image tower have different architectures: " + "; ".join(mismatches)
        )
    _check_tower_keys(tower.state_dict(), expected.num_hidden_layers)
    backbone_state = backbone.state_dict()
    expected_keys = {target for _, targets in _key_pairs(expected.num_hidden_layers) for target in targets}
    missing = sorted(expected_keys - set(backbone_state))
    unknown = sorted(set(backbone_state) - expected_keys)
    if missing or unknown:
        raise ValueError(
            f"The CLIPVisionModel's weights are not a plain CLIPVisionModel's: missing {missing or 'nothing'}, "
            f"unknown {unknown or 'nothing'}. A PEFT model must be merged first (`merge_and_unload()`)."
        )
    if backbone.dtype != tower.conv1.weight.dtype:
        logger.info(
            "Casting the CLIPVisionModel's %s weights to the OpenCLIP tower's %s.",
            backbone.dtype,
            tower.conv1.weight.dtype,
        )
    with torch.no_grad():
        tower.load_state_dict(_to_open_clip_state_dict(backbone_state, expected.num_hidden_layers), strict=False)
    logger.info("Wrote the CLIPVisionModel's weights into the OpenCLIP image tower (proj and text tower untouched).")
    return open_clip_model
