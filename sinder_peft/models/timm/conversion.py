"""Exact conversions between timm Vision Transformers and the transformers models of the same architecture.

A timm model enters sinder-peft as the transformers class of its architecture (`timm_to_transformers`) and leaves
the same way (`transformers_to_timm`): both directions read one table of links between the two state dicts
(`links.Link`, per family in `plans`), built from the timm model's own modules, so that they cannot drift
apart. timm fuses what transformers keeps apart: the query, key and value projections are one `attn.qkv` matrix (split
in that order along the output rows), and a packed SwiGLU MLP (`GluMlp`, timm's `SwiGLUPacked`) computes its gate and
its value with one `mlp.fc1`, gate first when `gate_last=False` (`act(x1) * x2`, as timm's DINOv2 and DINOv3 models
have it), gate second otherwise; the split SwiGLU (`SwiGLU`: `fc1_g`, `fc1_x`) maps one to one.

Supported (`TIMM_TO_TRANSFORMERS`), decided from the modules, not from the name:

- `VisionTransformer` with a distillation token (`deit_*_distilled_*`) -> `DeiTModel`;
- without class token (SigLIP, `vit_*_siglip_*`) -> `SiglipVisionModel`. The attention-pool head (`global_pool='map'`)
  is converted into the model's `head` (`pooler_output` equals timm's `forward_head(x, pre_logits=True)`) when its
  options are those of transformers' head; otherwise, and for SigLIP without that head (`*_siglip_gap_*`), the model
  is built with `vision_use_head=False` and the timm head stays in the timm model only;
- with `norm_pre` (CLIP image towers, `vit_*_clip_*`) -> `CLIPVisionModel`. Its `last_hidden_state` is the tokens
  before `post_layernorm`; timm's `forward_features` is `post_layernorm` applied to every token. The activation is
  the one the timm model runs: timm's `vit_*_clip_*.openai` models run OpenAI's weights with GELU, so they convert with
  `hidden_act="gelu"`; the original QuickGELU is timm's `vit_*_clip_quickgelu_*` (`hidden_act="quick_gelu"`);
- with layer scale, register tokens or a SwiGLU MLP (DINOv2, `vit_*_patch14_dinov2`, `vit_*_patch14_reg4_dinov2`; also
  other layer-scale ViTs such as `deit3_*`, which `Dinov2Model` computes exactly) -> `Dinov2Model`, or
  `Dinov2WithRegistersModel` with register tokens. timm keeps no position for the class and register tokens of its
  register models (`no_embed_class=True`; its checkpoint filter folds the original class position into the class
  token): their transformers class position is zero, which is exact, and the registers have none in either;
- any other `VisionTransformer` (ViT, DeiT without distillation) -> `ViTModel`;
- `Eva` with DINOv3's RoPE (`vit_*_patch16_dinov3*`) -> `DINOv3ViTModel`.

Decisions on timm options:

- Refused (ValueError), because transformers' model computes something else: any other model class (ConvNeXt, EVA-02,
  ...); `qk_norm`, `scale_attn_norm` / `scale_attn_inner`, `scale_mlp_norm`, gated attention, another block type
  (`ResPostBlock`, parallel blocks), another norm (`RmsNorm`), another activation, a patch-embedding norm,
  `dynamic_img_pad`, a non-square image or patch, `pos_embed='none'`, `fc_norm` (`global_pool='avg'` without
  `fc_norm=False`) and `final_norm=False` (timm's `forward_features` then ends without a norm, transformers' always
  with one), register tokens that have positions (`no_embed_class=False`), `norm_pre` outside CLIP, a DINOv2 MLP
  width no integer `mlp_ratio` reproduces, DINOv3 with absolute positions or another RoPE layout.
- Accepted, with zeros or ones in transformers' model where timm has no tensor: no bias (`qkv_bias=False`,
  `proj_bias=False`), no layer scale in a DINOv2 (ones), `no_embed_class=True` (a zero class position). Writing back
  refuses a transformers model whose such tensor is no longer zero (or one).
- Accepted, and not reproduced at every size: `dynamic_img_size`. At the size the timm model was built for both
  models are equal. At another size, timm resamples the position table with bicubic interpolation *with*
  antialiasing; transformers' `Dinov2WithRegistersModel` does the same (exact), DINOv3 has no table (RoPE, exact
  to float32 rounding), but `Dinov2Model`, `ViTModel`, `DeiTModel`, `CLIPVisionModel` and `SiglipVisionModel`
  interpolate *without* antialiasing: the features then differ (by 2-11 % of their scale, up and down, with the
  random position tables of the tests). To compare at another size exactly, resize the timm model first
  (`set_input_size`, or `create_model(..., img_size=...)` for pretrained weights) and convert it then. The
  difference exists whether or not timm's flag is set (the transformers model interpolates any converted model), so
  the flag itself is not refused, only warned about.
- Ignored, because they are not part of `forward_features`: dropout, drop path, patch dropout (inactive in eval
  mode), the classifier (`head`, `head_dist`), the attention-pool head outside SigLIP. `transformers_to_timm`
  leaves them as they are; `ViTModel` and `DeiTModel` are built without their pooler (`add_pooling_layer=False`),
  and a pooler found when writing back is ignored.

Files (`loading`): `save_timm_model` writes timm's own Hub layout (`config.json` with the architecture arguments
and the pretrained configuration, `model.safetensors`) with timm's `save_for_hf`; `load_timm_model` reads it back with
`timm.create_model("local-dir:PATH", pretrained=True)`, or loads a timm model name whose weights are in the local
Hugging Face cache. timm is an optional dependency (`pip install 'sinder-peft[timm]'`), imported by `require_timm`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
)

from .links import HEAD_PREFIXES, Fill, Plan, Rows, split_tensor, timm_keys
from .loading import require_timm
from .plans import conversion_plan

logger = logging.getLogger(__name__)

# transformers parameters without timm counterpart, ignored when writing back (ViT's and DeiT's pooler).
_IGNORED_TRANSFORMERS_PREFIXES: tuple[str, ...] = ("pooler.",)

# Config values that do not change the forward pass in eval mode (image_size only sizes the position table, which
# is checked by shape), so a transformers model may differ there from the one built for the timm model.
_UNCHECKED_CONFIG: frozenset[str] = frozenset(
    {"image_size", "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"}
)


def _summarize(keys: Sequence[str], limit: int = 12) -> str:
    """Return `keys` as a readable list, cut after `limit` names with a count of the rest."""
    listed = ", ".join(keys[:limit])
    return listed + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _unlinked_timm_keys(plan: Plan, timm_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Return the timm state-dict keys no link reads, refusing any outside the head (`HEAD_PREFIXES`): a tensor
    `forward_features` reads that the plan does not know means an option the conversion does not reproduce."""
    linked = {key for link in plan.links for key in timm_keys(link)}
    unlinked = sorted(key for key in timm_state if key not in linked)
    unknown = [key for key in unlinked if not key.startswith(HEAD_PREFIXES)]
    if unknown:
        raise ValueError(
            f"The timm model has tensors the conversion to {plan.model_class.__name__} does not know: "
            f"{_summarize(unknown)}. It was built with an option the conversion does not reproduce."
        )
    return unlinked


def _timm_tensor(timm_state: Mapping[str, torch.Tensor], part: str | Rows) -> torch.Tensor:
    """Return the timm tensor (or the rows of one) that `part` names: a view, so that writing into it writes into
    the timm model."""
    if isinstance(part, Rows):
        return timm_state[part.key].narrow(0, part.start, part.length)
    return timm_state[part]


def _part(timm_state: Mapping[str, torch.Tensor], part: str | Rows | Fill) -> torch.Tensor:
    """Return the timm tensor `part` names, or the fill's constant tensor, in float32 on the CPU."""
    if isinstance(part, Fill):
        return torch.full(part.shape, part.value, dtype=torch.float32)
    return _timm_tensor(timm_state, part).detach().to(device="cpu", dtype=torch.float32)


def _holds_fill(piece: torch.Tensor, fill: Fill, scale: float) -> bool:
    """Whether `piece` still holds the fill's value: exactly, or within its tolerance relative to `scale` (the
    largest magnitude of the transformers tensor it was cut from)."""
    if fill.tolerance == 0:
        return bool((piece == fill.value).all())
    return float((piece.float() - fill.value).abs().max()) <= fill.tolerance * scale


def timm_to_transformers(model: nn.Module) -> PreTrainedModel:
    """Return the transformers model of the timm model's architecture, holding the same weights.

    Query, key and value come out of timm's fused `qkv` (split in that order), a SwiGLU's gate and value out of a
    packed `fc1` (in the order timm's `gate_last` says); every other tensor is copied, reshaped where the layouts
    differ (CLIP's class embedding and position table). The family follows from the timm model's modules
    (`TIMM_TO_TRANSFORMERS`; the module docstring says what is refused and why). The classifier head (and, outside
    SigLIP, the attention-pool head) has no counterpart and stays in the timm model only.

    Returns:
        A `Dinov2Model`, `Dinov2WithRegistersModel`, `DINOv3ViTModel`, `CLIPVisionModel`, `SiglipVisionModel`,
        `ViTModel` or `DeiTModel`, in eval mode and float32 on the CPU, whose features equal timm's
        `forward_features` at the timm model's size up to float32 rounding (for CLIP after `post_layernorm`, which
        transformers' `last_hidden_state` does not include).

    Raises:
        ImportError: if timm is not installed.
        ValueError: for an architecture with no transformers equivalent (naming the supported ones), or a timm
            option that changes the forward pass in a way the conversion does not reproduce.
    """
    timm = require_timm()
    plan = conversion_plan(model, timm)
    timm_state = model.state_dict()
    kept = _unlinked_timm_keys(plan, timm_state)
    converted = plan.build()
    expected = converted.state_dict()
    state: dict[str, torch.Tensor] = {}
    for link in plan.links:
        source = torch.cat([_part(timm_state, part) for part in link.timm], dim=link.timm_dim)
        pieces = split_tensor(source, [expected[key].shape for key in link.hf], link.hf_dim)
        for key, piece in zip(link.hf, pieces, strict=True):
            state[key] = piece.clone(memory_format=torch.contiguous_format)
    converted.load_state_dict(state, strict=True)
    if getattr(model, "dynamic_img_size", False) and not plan.interpolates_like_timm:
        logger.warning(
            "The timm model resizes its position table at other image sizes with antialiasing (dynamic_img_size); "
            "%s interpolates without, so the two agree exactly only at %d px. To convert exactly for another size, "
            "call `set_input_size` on the timm model first.",
            plan.model_class.__name__,
            plan.config_kwargs["image_size"],
        )
    if kept:
        logger.info(
            "Left in the timm model only (no %s counterpart): %s.", plan.model_class.__name__, _summarize(kept)
        )
    logger.info("Converted the timm %s model to a %s.", plan.family, plan.model_class.__name__)
    return converted.to(torch.float32).eval()


def _normalized_config_value(value: object) -> object:
    """Return a config value in a comparable form (lists, as a config read from JSON holds them, as tuples)."""
    if isinstance(value, list | tuple):
        return tuple(value)
    return value


def _check_transformers_model(model: PreTrainedModel, plan: Plan) -> None:
    """Raise a ValueError when `model` is not of the class and architecture the timm model converts to."""
    if not isinstance(model, plan.model_class):
        raise ValueError(
            f"The timm model converts to a {plan.model_class.__name__}, but the transformers model is a "
            f"{type(model).__name__} (a PEFT model must be merged first: `merge_and_unload()`)."
        )
    mismatched = []
    for key, value in plan.config_kwargs.items():
        actual = getattr(model.config, key, None)
        if key not in _UNCHECKED_CONFIG and _normalized_config_value(actual) != _normalized_config_value(value):
            mismatched.append(f"{key}={actual!r} (the timm model's: {value!r})")
    if mismatched:
        raise ValueError(
            f"The transformers model is another architecture than the timm model: {'; '.join(mismatched)}."
        )


def _check_transformers_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming every missing, unexpected and mis-shaped tensor of `state` against `expected`."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected and not key.startswith(_IGNORED_TRANSFORMERS_PREFIXES)]
    mismatched = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(tensor.shape)})"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = [
        f"{what}: {_summarize(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
        if keys
    ]
    if problems:
        raise ValueError("The transformers model does not match the timm model: " + "; ".join(problems) + ".")


def transformers_to_timm(model: PreTrainedModel, timm_model: nn.Module) -> nn.Module:
    """Write the weights of a transformers model (e.g. a repaired one) into `timm_model`, in place, and return it.

    `timm_model` must be of the architecture `model` was converted from (e.g. that very model, loaded again): query,
    key and value are fused into timm's `qkv` again, a SwiGLU's gate and value into its packed `fc1`, in timm's
    dtype and device. Every parameter of `timm_model` without transformers counterpart (the classifier head, the
    attention-pool head outside SigLIP, `fc_norm`, ...) is left as it is, and so are transformers tensors without
    timm counterpart (ViT's and DeiT's pooler). Nothing is written unless everything matches.

    Raises:
        ImportError: if timm is not installed.
        ValueError: if `timm_model` is not convertible (see `timm_to_transformers`), if `model` is not of the class,
            config and tensor shapes `timm_model` converts to, or if a tensor timm cannot hold (a bias or class
            position timm does not have, a layer scale timm does not have) is no longer zero (or one).
    """
    timm = require_timm()
    plan = conversion_plan(timm_model, timm)
    _check_transformers_model(model, plan)
    timm_state = timm_model.state_dict()
    _unlinked_timm_keys(plan, timm_state)
    expected = plan.build(device="meta").state_dict()
    state = model.state_dict()
    _check_transformers_state(state, expected)
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for link in plan.links:
        source = torch.cat([state[key].detach() for key in link.hf], dim=link.hf_dim)
        shapes = [part.shape if isinstance(part, Fill) else _timm_tensor(timm_state, part).shape for part in link.timm]
        pieces = split_tensor(source, shapes, link.timm_dim)
        scale = float(source.abs().max()) if source.numel() else 0.0
        for part, piece in zip(link.timm, pieces, strict=True):
            if not isinstance(part, Fill):
                writes.append((_timm_tensor(timm_state, part), piece))
            elif part.checked and not _holds_fill(piece, part, scale):
                raise ValueError(
                    f"{_summarize(list(link.hf))} of the transformers model holds values where the timm model has no "
                    f"tensor (it computes with {part.value:g} there), so timm cannot hold them."
                )
    with torch.no_grad():
        for target, value in writes:
            target.copy_(value)
    logger.info("Wrote the %s weights of a %s into the timm model.", plan.family, type(model).__name__)
    return timm_model
