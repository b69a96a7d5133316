"""The SINDER adapter layer: a linear map with frozen singular vectors and a trainable singular-value shift.

A targeted `nn.Linear` with weight `W = U diag(S) V^T` (thin SVD, `r = min(in, out)` singular values, largest first)
applies `U diag(S + delta) V^T` instead, where only `delta` (shape `(r,)`, zero at initialisation) trains.

Forward form. Three exact ways compute `x -> x (U diag(S + delta) V^T)^T + b`:

* factored, `((x V) * (S + delta)) U^T + b`, which *replaces* the base matmul: `T (in + out) r` multiply-adds for
  `T` tokens, i.e. 2x the base matmul for a square layer and 1.25x for the 4x-wide MLP projections;
* additive, `base(x) + ((x V) * delta) U^T`: the factored cost *plus* the base matmul;
* rebuilding `W + U diag(delta) V^T` each call: `in out r` multiply-adds per call for the rebuild plus the base
  matmul, and in the backward pass a full weight gradient projected back onto the singular vectors.

At the sizes SINDER trains (ViT-S to ViT-g, 256 to 1,400 tokens per image, one image per step) the factored form is
the cheapest in forward and backward (see `benchmarks/` and `docs/performance.md`), so it is the only one used. It is
exact up to float32 rounding: the factors come from a float64 SVD, rounded once to float32.

The SVD is of the *original* base weight `W0` and is computed once, when the layer is created; `U`, `S` and `V^T` are
non-persistent buffers (never saved: reloading recomputes them from the base weights). Merging adds
`U diag(delta) V^T` to the base weight, unmerging subtracts it.

A small fingerprint of the spectrum (the four largest singular values and the sum of all of them) is saved with each
adapter; loading an adapter whose fingerprint does not match the base weight it is loaded onto raises an error, so an
adapter cannot be silently applied to the wrong base model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F

from .config import SinderConfig

FINGERPRINT_TOP_VALUES = 4


def spectrum_fingerprint(singular_values: torch.Tensor) -> torch.Tensor:
    """Return a float32 vector summarising a spectrum: its `FINGERPRINT_TOP_VALUES` largest values (zero-padded) and
    the sum of all of them.

    Two weights of the same shape from different checkpoints differ in these numbers by far more than float32 or
    bfloat16 rounding does, which makes the vector a cheap check that an adapter is loaded onto its own base model.
    """
    top = torch.zeros(FINGERPRINT_TOP_VALUES, dtype=torch.float64, device=singular_values.device)
    count = min(FINGERPRINT_TOP_VALUES, singular_values.numel())
    top[:count] = singular_values[:count].to(torch.float64)
    return torch.cat([top, singular_values.to(torch.float64).sum().reshape(1)]).to(torch.float32)


def _factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the stored singular factors: float32, or float64 for a float64 base weight.

    Half-precision bases (bfloat16, float16) keep float32 factors so that `S + delta` resolves small shifts.
    """
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class SinderLayer(BaseTunerLayer):
    """State shared by SINDER adapter layers: frozen singular factors of the base weight, one shift per adapter."""

    adapter_layer_names: tuple[str, ...] = ("sinder_delta",)
    other_param_names: tuple[str, ...] = ("sinder_fingerprint",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sinder_delta = nn.ParameterDict({})
        self.sinder_fingerprint = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"SINDER adapts `torch.nn.Linear` layers only, got {type(base_layer).__name__}. Check "
                "`SinderConfig.target_modules`."
            )
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._register_singular_factors(base_layer.weight)
        self.register_load_state_dict_pre_hook(_check_fingerprints_on_load)

    def _register_singular_factors(self, weight: torch.Tensor) -> None:
        """Compute the thin SVD of `weight` in float64 and keep `U`, `S`, `V^T` as non-persistent buffers.

        A wide weight (fewer rows than columns, e.g. an MLP's output projection) is decomposed through its transpose,
        `W^T = V S U^T`: LAPACK's SVD took half the time on the tall orientation of a 1536 x 4096 matrix (3.2 s
        against 6.7 s in float64 on one CPU thread), and the factors are the same up to the signs of singular vector
        pairs, which `U diag(S + delta) V^T` does not see.
        """
        if weight.device.type == "meta":
            raise ValueError(
                "SINDER needs the base weights to compute their SVD, but they are on the meta device; load the "
                "adapter without `low_cpu_mem_usage=True`."
            )
        dtype = _factor_dtype(weight.dtype)
        matrix = weight.detach().to(torch.float64)
        if matrix.shape[0] < matrix.shape[1]:
            right, singular_values, left_transposed = torch.linalg.svd(matrix.T, full_matrices=False)
            left, right_transposed = left_transposed.T, right.T
        else:
            left, singular_values, right_transposed = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("sinder_u", left.to(dtype).contiguous(), persistent=False)
        self.register_buffer("sinder_s", singular_values.to(dtype), persistent=False)
        self.register_buffer("sinder_vh", right_transposed.to(dtype).contiguous(), persistent=False)

    @property
    def rank(self) -> int:
        """Number of singular values, `min(in_features, out_features)`: the length of each shift vector."""
        return self.sinder_s.numel()

    def update_layer(self, adapter_name: str, config: SinderConfig, **kwargs: Any) -> None:
        """Add adapter `adapter_name`: a zero shift (float32, or float64 on a float64 base) and the spectrum
        fingerprint of the base weight."""
        self.sinder_delta[adapter_name] = nn.Parameter(torch.zeros_like(self.sinder_s))
        self.sinder_fingerprint[adapter_name] = spectrum_fingerprint(self.sinder_s)
        self.fingerprint_rtol = config.fingerprint_rtol
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Return `U diag(delta) V^T` of one adapter in the base weight's dtype: what merging adds to the weight.

        Computed in float64 so that merging and unmerging are exact to the base dtype's rounding.
        """
        delta = self.sinder_delta[adapter_name].detach().to(torch.float64)
        left = self.sinder_u.to(torch.float64)
        right_transposed = self.sinder_vh.to(torch.float64)
        delta_weight = (left * delta) @ right_transposed
        return delta_weight.to(self.get_base_layer().weight.dtype)

    def _shifted_singular_values(self) -> torch.Tensor:
        """Return `S + sum(delta)` over the adapters that act on the output: merged ones (already in the base weight,
        which the factored form replaces) and active ones."""
        singular_values = self.sinder_s
        for adapter_name in dict.fromkeys([*self.merged_adapters, *self.active_adapters]):
            if adapter_name in self.sinder_delta:
                singular_values = singular_values + self.sinder_delta[adapter_name].to(singular_values.dtype)
        return singular_values


class Linear(nn.Module, SinderLayer):
    """A SINDER-adapted `nn.Linear`, computing `((x V) * (S + delta)) U^T + b` (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SinderConfig, **kwargs: Any) -> None:
        super().__init__()
        SinderLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add `U diag(delta) V^T` of the given (default: active) adapters to the base weight.

        Args:
            safe_merge: compute the merged weight in a copy first and refuse it if it holds NaN or inf.
            adapter_names: adapters to merge; `None` merges the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.sinder_delta:
                continue
            merged_weight = base_layer.weight.data + self.get_delta_weight(adapter_name)
            if safe_merge and not torch.isfinite(merged_weight).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken."
                )
            base_layer.weight.data = merged_weight
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's `U diag(delta) V^T` from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.sinder_delta:
                base_layer.weight.data = base_layer.weight.data - self.get_delta_weight(adapter_name)

    def effective_weight(self) -> torch.Tensor:
        """Return the weight this layer currently applies, differentiable in the active shifts.

        With adapters disabled, or all active adapters merged, that is the base weight; otherwise
        `U diag(S + delta) V^T` in the base weight's dtype.
        """
        base_weight = self.get_base_layer().weight
        if self.disable_adapters or not self._has_unmerged_active_adapter():
            return base_weight
        weight = (self.sinder_u * self._shifted_singular_values()) @ self.sinder_vh
        return weight.to(base_weight.dtype)

    def _has_unmerged_active_adapter(self) -> bool:
        """Whether some active adapter is not merged, i.e. the base weight alone is not what this layer applies."""
        return any(name in self.sinder_delta and name not in self.merged_adapters for name in self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not self._has_unmerged_active_adapter():
            return self.base_layer(x, *args, **kwargs)
        base_layer = self.get_base_layer()
        factors = x.to(self.sinder_vh.dtype)
        factors = F.linear(factors, self.sinder_vh) * self._shifted_singular_values()
        bias = None if base_layer.bias is None else base_layer.bias.to(self.sinder_u.dtype)
        return F.linear(factors, self.sinder_u, bias).to(x.dtype)

    def __repr__(self) -> str:
        return "sinder." + super().__repr__()


def _check_fingerprints_on_load(
    module: SinderLayer,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """`load_state_dict` pre-hook: refuse saved shifts whose spectrum fingerprint does not match this base weight.

    The fingerprint of the base weight is recomputed at injection, so a mismatch means the adapter was trained on a
    different base model (or the base weights were modified, e.g. already merged), and its shifts would be applied
    to the wrong singular vectors.
    """
    key_prefix = f"{prefix}sinder_fingerprint."
    expected = spectrum_fingerprint(module.sinder_s)
    for key, saved in state_dict.items():
        if not key.startswith(key_prefix):
            continue
        saved = saved.to(device=expected.device, dtype=torch.float32)
        tolerance = module.fingerprint_rtol * float(expected.abs().max())
        if saved.shape != expected.shape or float((saved - expected).abs().max()) > tolerance:
            raise ValueError(
                f"The SINDER adapter does not belong to this base model: the saved spectrum fingerprint of "
                f"'{prefix.rstrip('.')}' is {saved.tolist()}, but the base weight gives {expected.tolist()} "
                f"(relative tolerance {module.fingerprint_rtol}). Load the adapter onto the base model it was "
                "trained from (and not onto an already merged model)."
            )


def effective_linear_weight(module: nn.Module) -> torch.Tensor:
    """Return the weight a linear module currently applies: `weight` of an `nn.Linear`, or, for a SINDER layer,
    `U diag(S + delta) V^T` with the active shifts (the base weight when adapters are disabled or merged)."""
    if isinstance(module, Linear):
        return module.effective_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"Expected an nn.Linear or a SINDER layer, got {type(module).__name__}.")
