"""Configuration of the SINDER adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .registration import SINDER_PEFT_TYPE


@dataclass
class SinderConfig(PeftConfig):
    """Configuration of a [`SinderModel`]: which linear layers get a trainable singular-value shift.

    Every targeted `nn.Linear` of weight `W = U diag(S) V^T` (thin SVD) applies `U diag(S + delta) V^T` instead, with
    `U`, `S`, `V` frozen and only `delta` (one entry per singular value, largest first, initialised to zero) trained.

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Names (or a regex) of the linear modules to adapt. `None` picks the SINDER defaults of the model's ViT
            family (`sinder_peft.tuner.architectures`): the value and output projections of attention and every MLP
            projection, e.g. `v_proj`, `o_proj`, `fc1`, `fc2` for DINOv2 (`gate_proj`, `up_proj`, `down_proj` for
            the SwiGLU blocks of ViT-g), `v_proj`, `out_proj`, `fc1`, `fc2` for CLIP and SigLIP. Query and key
            projections are never targeted by default.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Names (or a regex) of modules not to adapt. `None` excludes every module outside the blocks of the
            model's ViT backbone, so that heads, necks, poolers and the text tower of a `CLIPModel` are never
            adapted, whatever their layers are named; `[]` excludes nothing.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Indices of the transformer blocks to adapt; `None` adapts every block. The trainer sets this to the
            blocks that can receive gradients.
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the `nn.ModuleList` holding the blocks, used with `layers_to_transform`; `None` picks the
            family's (`"layer"` for DINOv2, `"layers"` for CLIP, SigLIP, ViT and DeiT).
        shift (`str`):
            How a shift acts on a singular value: `"additive"`, `S + delta` (the paper's, and what adapters without
            this field hold), or `"log"`, `S * exp(delta)` (the `preserve` recipe, docs/method.md §7).
        fuse_gated_mlp (`bool`):
            Adapt the gate and up projections of a gated MLP (DINOv2 with SwiGLU, DINOv3's gated MLP) as one target,
            as the official SINDER code adapts the original DINOv2's fused `w12` layer: one SVD of the stacked weight
            `[W_gate; W_up]`, one shift vector of `min(2h, C)` values, merged back into both projections
            (`sinder_peft.tuner.fused_layer`). False (the default, and what adapters without this field hold) adapts
            them as two targets, each with its own SVD and shift. Plain MLPs are the same either way.
        fingerprint_rtol (`Optional[float]`):
            Read from adapter configs written by sinder-peft 0.1.0 and not used: the base-model check done when an
            adapter is loaded now compares each fingerprinted singular value within the change that rounding to the
            weights' dtype can make to it (see `sinder_peft.tuner.layer.fingerprint_tolerances`).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Linear module names or a regex of them to adapt. None uses the SINDER defaults: attention value and "
                "output projections and every MLP projection."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Module names or a regex of them not to adapt. None excludes everything outside the blocks of the "
                "model's ViT backbone."
            )
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the transformer blocks to adapt; None adapts all of them."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the ModuleList of blocks, used with layers_to_transform."}
    )
    shift: Literal["additive", "log"] = field(
        default="additive",
        metadata={"help": "How a shift acts on a singular value: 'additive' (S + delta) or 'log' (S * exp(delta))."},
    )
    fuse_gated_mlp: bool = field(
        default=False,
        metadata={
            "help": "Adapt a gated MLP's gate and up projections as one target: one SVD of [W_gate; W_up] and one "
            "shift vector, as the official code adapts DINOv2's fused w12."
        },
    )
    fingerprint_rtol: float | None = field(
        default=None,
        metadata={"help": "Written by sinder-peft 0.1.0; not used (the fingerprint tolerance follows from rounding)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SINDER_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.shift not in ("additive", "log"):
            raise ValueError(f"`shift` must be 'additive' or 'log', got {self.shift!r}.")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only makes sense together with `layers_to_transform`.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
