"""The fused gated MLP as one SINDER target: the gate and up projections share one SVD and one shift vector.

A gated MLP computes `down(act(gate(x)) * up(x))`. The original DINOv2 code holds its gate and up projections as one
linear layer `w12` of weight `[W_gate; W_up]` (2h × C), and the official SINDER code adapts that fused weight: one thin
SVD `[W_gate; W_up] = U diag(S) V^T` with `min(2h, C)` singular values, and one shift vector. With
`SinderConfig(fuse_gated_mlp=True)` sinder-peft does the same on transformers' split projections (`gate_proj`,
`up_proj` of DINOv2 with SwiGLU and of DINOv3's gated MLP):

* the gate projection becomes a `FusedGateLinear`, a `Linear` that applies the first h rows of `U`, owns `S`, `V^T`,
  the shift `delta` and the fingerprint (of the stacked weight's spectrum), all saved under its name;
* the up projection becomes a `FusedUpLinear`, which applies the last h rows of `U` with the gate layer's `S`, `V^T`
  and shift: it has no parameter and nothing to save of its own.

Each computes `((x V) * (S + delta)) U_rows^T + b`, so the pair applies exactly `U diag(S + delta) V^T` split into its
two row blocks, and merging adds each projection's rows of `U diag(S' - S) V^T` to its own weight: the merged model
has the input's plain `nn.Linear` projections. Stacking gate above up or up above gate only permutes the rows of `U`,
so either order gives the same result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import SinderConfig
from .layer import Linear, SinderLayer, check_not_meta, thin_svd


class FusedGateLinear(Linear):
    """The gate projection of a fused gated MLP: applies its rows of the stacked `[W_gate; W_up]`'s SVD and owns the
    pair's singular values, right singular vectors, shift and fingerprint (built by `fused_gate_up_layers`)."""


class FusedUpLinear(nn.Module, SinderLayer):
    """The up projection of a fused gated MLP: applies its rows `U_up` of the stacked weight's SVD with the `S`, `V^T`
    and shifts of the gate projection's `FusedGateLinear`, its `shift_owner`.

    The owner is referenced, not registered as a submodule, so that it stays in the model tree under the gate
    projection's name only (one copy in `state_dict`, `named_parameters` and the saved adapter). Merging and unmerging
    change the up projection's own weight, with its own record of merged adapters.

    Args:
        base_layer: the up projection's `nn.Linear`.
        owner: the gate projection's layer, made from the same stacked weight.
        left: `U_up`, the rows of the stacked weight's left singular vectors that belong to the up projection.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, owner: FusedGateLinear, left: torch.Tensor, **kwargs: Any) -> None:
        super().__init__()
        SinderLayer.__init__(self, base_layer, **kwargs)
        # A plain attribute, not a submodule: the owner is registered once, as the gate projection.
        object.__setattr__(self, "_owner", owner)
        self.register_buffer("sinder_u", left.to(owner.sinder_s.dtype).contiguous(), persistent=False)
        self.decomposed_shape = owner.decomposed_shape
        self._active_adapter = owner.active_adapters

    @property
    def shift_owner(self) -> SinderLayer:
        """The gate projection's layer, whose `S`, `V^T` and shifts this layer applies."""
        return self._owner

    def update_layer(self, adapter_name: str, config: SinderConfig, **kwargs: Any) -> None:
        """Nothing to add: the owner holds adapter `adapter_name`'s shift; only the active adapters are followed."""
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._adapted_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "sinder." + super().__repr__()


def fused_gate_up_layers(
    gate: nn.Module, up: nn.Module, adapter_name: str, config: SinderConfig
) -> tuple[FusedGateLinear, FusedUpLinear]:
    """Return the SINDER layers of a fused gated MLP's gate and up projections (`nn.Linear` of the same input width
    and dtype): one float64 thin SVD of `[W_gate; W_up]`, its gate rows applied by the first layer, which owns the
    shift of adapter `adapter_name`, its up rows by the second.

    Raises:
        ValueError: when the two projections do not read the same input width or have different dtypes.
    """
    gate_weight, up_weight = gate.weight, up.weight
    check_not_meta(gate_weight)
    check_not_meta(up_weight)
    if gate_weight.shape[1] != up_weight.shape[1] or gate_weight.dtype != up_weight.dtype:
        raise ValueError(
            "A fused gated MLP needs gate and up projections of the same input width and dtype, got "
            f"{tuple(gate_weight.shape)} {gate_weight.dtype} and {tuple(up_weight.shape)} {up_weight.dtype}."
        )
    left, singular_values, right_transposed = thin_svd(torch.cat([gate_weight.detach(), up_weight.detach()]))
    rows = gate_weight.shape[0]
    owner = FusedGateLinear(
        gate,
        adapter_name,
        config,
        factors=(left[:rows], singular_values, right_transposed),
        decomposed_shape=(left.shape[0], right_transposed.shape[1]),
    )
    return owner, FusedUpLinear(up, owner, left[rows:])
