"""The SINDER adapter layer: a linear map with frozen singular vectors and a trainable singular-value shift.

A targeted `nn.Linear` with weight `W = U diag(S) V^T` (thin SVD, `r = min(in, out)` singular values, largest first)
applies `U diag(S') V^T` instead, where only `delta` (shape `(r,)`, zero at initialisation) trains and `S'` is

* `S + delta` with the paper's additive shift (`SinderConfig(shift="additive")`, the default), or
* `S * exp(delta)` with the log-scale shift (`shift="log"`, the `preserve` recipe): each singular value moves by a
  factor, so a step of a given size changes large and small singular values by the same fraction of themselves, and
  none changes sign (docs/method.md §7).

Below, `S + delta` stands for either.

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
`U diag(delta) V^T` to the base weight, unmerging subtracts it. A layer may also apply some rows of the SVD of a
larger matrix whose `S`, `V^T` and shifts another layer owns (its `shift_owner`): the gate and up projections of a
fused gated MLP share the SVD of `[W_gate; W_up]` (`sinder_peft.tuner.fused_layer`).

A small fingerprint of the spectrum (the four largest singular values, the sum of all of them, and the rounding unit of
the weight's dtype) is saved with each adapter; loading an adapter whose fingerprint does not match the base weight it
is loaded onto raises an error, so an adapter cannot be silently applied to the wrong base model, or twice to a model
it is already merged into. Each fingerprinted value is compared with a tolerance of its own, the change that rounding
the weight to the coarser of the two dtypes (float32, bfloat16...) can make to it: see `fingerprint_tolerances`.

What the fingerprint catches: a different base model (its spectra differ by far more than rounding); a model into
which the adapter is already merged, as soon as the adapter shifts one of the four largest singular values of some
layer by more than the rounding tolerance (for a bfloat16 weight with a flat spectrum about 1.5 % of that value, far
less for the peaked spectra of trained weights; for float32, about 1e-7) or their sum by more than its tolerance.
What it cannot catch: an adapter whose shifts of every layer leave the four largest singular values and the sum
within rounding (e.g. shifts of small singular values that cancel in the sum), and changes of the singular vectors
that keep every fingerprinted value (a rotation of the weight).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F

from .config import SinderConfig

FINGERPRINT_TOP_VALUES = 4
FINGERPRINT_SIZE = FINGERPRINT_TOP_VALUES + 2
"""Values saved per adapted layer: the top singular values, their sum, the rounding unit of the weight's dtype."""
FINGERPRINT_ROUNDING_SLACK = 2.0
"""Tolerances are this many times the estimated spectral norm of the weight's rounding error (see
`fingerprint_tolerances`): twice the typical change, five times below a shift of 2 % of the largest singular value of
a bfloat16 weight with a flat spectrum."""


def rounding_unit(dtype: torch.dtype) -> float:
    """Return the unit roundoff of a floating dtype: half its machine epsilon (2⁻²⁴ for float32, 2⁻⁸ for bfloat16)."""
    return torch.finfo(dtype).eps / 2


def spectrum_fingerprint(singular_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return a float32 vector summarising the spectrum of a weight of dtype `dtype`: its `FINGERPRINT_TOP_VALUES`
    largest singular values (zero-padded), the sum of all of them, and `rounding_unit(dtype)`.

    Two weights of the same shape from different checkpoints differ in these numbers by far more than float32 or
    bfloat16 rounding does, which makes the vector a cheap check that an adapter is loaded onto its own base model.
    The rounding unit tells the check how precise the saved values are.
    """
    top = torch.zeros(FINGERPRINT_TOP_VALUES, dtype=torch.float64, device=singular_values.device)
    count = min(FINGERPRINT_TOP_VALUES, singular_values.numel())
    top[:count] = singular_values[:count].to(torch.float64)
    total = singular_values.to(torch.float64).sum().reshape(1)
    unit = torch.tensor([rounding_unit(dtype)], dtype=torch.float64, device=singular_values.device)
    return torch.cat([top, total, unit]).to(torch.float32)


def fingerprint_tolerances(singular_values: torch.Tensor, shape: tuple[int, int], unit: float) -> torch.Tensor:
    """Return, for each value of `spectrum_fingerprint`'s top values and sum, how far rounding can move it.

    Rounding an m×n weight W to a dtype of unit roundoff u changes each entry by at most u·|w|, a perturbation E
    whose spectral norm is about u·rms(W)·(√m + √n)/√3 for the unstructured rounding errors of a real weight, and
    by Weyl's inequality no singular value moves by more than ‖E‖₂. Each top value gets
    `FINGERPRINT_ROUNDING_SLACK`·u·rms(W)·(√m + √n), and the sum of the r singular values √r times that (their
    rounding changes are nearly independent). A float64 floor of 1e-9 times the largest value covers the SVD's own
    rounding.

    Returns a float64 vector of `FINGERPRINT_TOP_VALUES` + 1 tolerances.
    """
    values = singular_values.to(torch.float64)
    rows, columns = shape
    rms = values.square().sum().sqrt() / math.sqrt(rows * columns)
    spread = FINGERPRINT_ROUNDING_SLACK * unit * rms * (math.sqrt(rows) + math.sqrt(columns))
    floor = 1e-9 * values.max()
    per_value = torch.full((FINGERPRINT_TOP_VALUES,), float(spread + floor), dtype=torch.float64)
    total = float(spread * math.sqrt(values.numel()) + floor)
    return torch.cat([per_value, torch.tensor([total], dtype=torch.float64)])


def _factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the stored singular factors: float32, or float64 for a float64 base weight.

    Half-precision bases (bfloat16, float16) keep float32 factors so that `S + delta` resolves small shifts.
    """
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the thin SVD `U, S, V^T` of `matrix` (m × n), computed in float64: `U` m × r, `S` r (largest first),
    `V^T` r × n, r = min(m, n).

    A wide matrix (fewer rows than columns, e.g. an MLP's output projection) is decomposed through its transpose,
    `W^T = V S U^T`: LAPACK's SVD took half the time on the tall orientation of a 1536 x 4096 matrix (3.2 s against
    6.7 s in float64 on one CPU thread), and the factors are the same up to the signs of singular vector pairs, which
    `U diag(S + delta) V^T` does not see.
    """
    matrix = matrix.detach().to(torch.float64)
    if matrix.shape[0] < matrix.shape[1]:
        right, singular_values, left_transposed = torch.linalg.svd(matrix.T, full_matrices=False)
        return left_transposed.T, singular_values, right.T
    return torch.linalg.svd(matrix, full_matrices=False)


def check_not_meta(weight: torch.Tensor) -> None:
    """Raise if `weight` is on the meta device, where it has no values to decompose."""
    if weight.device.type == "meta":
        raise ValueError(
            "SINDER needs the base weights to compute their SVD, but they are on the meta device; load the "
            "adapter without `low_cpu_mem_usage=True`."
        )


class SinderLayer(BaseTunerLayer):
    """State and math shared by SINDER adapter layers: frozen singular factors of a weight, one shift per adapter.

    A layer applies `U diag(S') V^T` to its input, with `S'` the singular values shifted by every active adapter. The
    factors and the shifts usually belong to the layer itself (`Linear`). A layer may also apply rows of the SVD of a
    larger matrix whose shifts another layer owns: the up projection of a fused gated MLP
    (`sinder_peft.tuner.fused_layer`) keeps only its rows of `U` and reads `S`, `V^T` and the shifts from the gate
    projection's layer, its `shift_owner`.
    """

    adapter_layer_names: tuple[str, ...] = ("sinder_delta",)
    other_param_names: tuple[str, ...] = ("sinder_fingerprint",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sinder_delta = nn.ParameterDict({})
        self.sinder_shift: dict[str, str] = {}
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
        check_not_meta(base_layer.weight)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.register_load_state_dict_pre_hook(_check_fingerprints_on_load)

    def _register_singular_factors(
        self, left: torch.Tensor, singular_values: torch.Tensor, right_transposed: torch.Tensor
    ) -> None:
        """Keep `U` (this layer's rows), `S` and `V^T` as non-persistent buffers, in `_factor_dtype` of the base
        weight, and remember the shape of the matrix they decompose (`decomposed_shape`, for the fingerprint)."""
        dtype = _factor_dtype(self.get_base_layer().weight.dtype)
        self.register_buffer("sinder_u", left.to(dtype).contiguous(), persistent=False)
        self.register_buffer("sinder_s", singular_values.to(dtype), persistent=False)
        self.register_buffer("sinder_vh", right_transposed.to(dtype).contiguous(), persistent=False)
        self.decomposed_shape = (self.sinder_u.shape[0], self.sinder_vh.shape[1])

    @property
    def shift_owner(self) -> SinderLayer:
        """The layer holding `S`, `V^T` and the shifts this layer applies: itself, except for the up projection of a
        fused gated MLP."""
        return self

    @property
    def rank(self) -> int:
        """Number of singular values, `min` of the decomposed matrix's sides: the length of each shift vector."""
        return self.shift_owner.sinder_s.numel()

    def update_layer(self, adapter_name: str, config: SinderConfig, **kwargs: Any) -> None:
        """Add adapter `adapter_name`: a zero shift (float32, or float64 on a float64 base) of the config's kind
        (`shift`) and the spectrum fingerprint of the decomposed weight."""
        self.sinder_shift[adapter_name] = config.shift
        self.sinder_delta[adapter_name] = nn.Parameter(torch.zeros_like(self.sinder_s))
        self.sinder_fingerprint[adapter_name] = spectrum_fingerprint(self.sinder_s, self.get_base_layer().weight.dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def has_shift(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` has a shift that this layer applies."""
        return adapter_name in self.shift_owner.sinder_delta

    def singular_value_change(self, adapter_name: str) -> torch.Tensor:
        """Return `S' - S` of one adapter, differentiable in its shift: `delta` for the additive shift,
        `S * (exp(delta) - 1)` for the log-scale one (in the shift's dtype)."""
        owner = self.shift_owner
        delta = owner.sinder_delta[adapter_name]
        if owner.sinder_shift[adapter_name] == "log":
            return owner.sinder_s.to(delta.dtype) * torch.expm1(delta)
        return delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Return `U diag(S' - S) V^T` of one adapter (this layer's rows of `U`) in the base weight's dtype: what
        merging adds to the weight."""
        return self._float64_delta_weight(adapter_name).to(self.get_base_layer().weight.dtype)

    def _float64_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Return `U diag(S' - S) V^T` of one adapter in float64."""
        change = self.singular_value_change(adapter_name).detach().to(torch.float64)
        left = self.sinder_u.to(torch.float64)
        right_transposed = self.shift_owner.sinder_vh.to(torch.float64)
        return (left * change) @ right_transposed

    def _shifted_base_weight(self, adapter_name: str, sign: float) -> torch.Tensor:
        """Return the base weight plus (`sign` = 1) or minus (`sign` = -1) an adapter's `U diag(delta) V^T`, added in
        float64 and rounded once to the base weight's dtype: a bfloat16 weight is rounded once, not once for the
        delta and again for the sum."""
        weight = self.get_base_layer().weight.data
        shifted = weight.to(torch.float64) + sign * self._float64_delta_weight(adapter_name)
        return shifted.to(weight.dtype)

    def _shifted_singular_values(self) -> torch.Tensor:
        """Return `S` plus the change of every adapter that acts on the output: merged ones (already in the base
        weight, which the factored form replaces) and active ones."""
        singular_values = self.shift_owner.sinder_s
        for adapter_name in dict.fromkeys([*self.merged_adapters, *self.active_adapters]):
            if self.has_shift(adapter_name):
                singular_values = singular_values + self.singular_value_change(adapter_name).to(singular_values.dtype)
        return singular_values

    def _has_unmerged_active_adapter(self) -> bool:
        """Whether some active adapter is not merged, i.e. the base weight alone is not what this layer applies."""
        return any(self.has_shift(name) and name not in self.merged_adapters for name in self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add `U diag(delta) V^T` of the given (default: active) adapters to the base weight (in float64, rounded
        once to the weight's dtype).

        Args:
            safe_merge: compute the merged weight in a copy first and refuse it if it holds NaN or inf.
            adapter_names: adapters to merge; `None` merges the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for adapter_name in adapter_names:
            if not self.has_shift(adapter_name):
                continue
            merged_weight = self._shifted_base_weight(adapter_name, 1.0)
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
            if self.has_shift(adapter_name):
                base_layer.weight.data = self._shifted_base_weight(adapter_name, -1.0)

    def effective_weight(self) -> torch.Tensor:
        """Return the weight this layer currently applies, differentiable in the active shifts.

        With adapters disabled, or all active adapters merged, that is the base weight; otherwise
        `U diag(S + delta) V^T` in the base weight's dtype.
        """
        base_weight = self.get_base_layer().weight
        if self.disable_adapters or not self._has_unmerged_active_adapter():
            return base_weight
        weight = (self.sinder_u * self._shifted_singular_values()) @ self.shift_owner.sinder_vh
        return weight.to(base_weight.dtype)

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the layer's output: `((x V) * (S + delta)) U^T + b` while an active adapter is unmerged, the base
        layer's output otherwise (see the module docstring)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not self._has_unmerged_active_adapter():
            return self.base_layer(x, *args, **kwargs)
        base_layer = self.get_base_layer()
        right_transposed = self.shift_owner.sinder_vh
        factors = F.linear(x.to(right_transposed.dtype), right_transposed) * self._shifted_singular_values()
        bias = None if base_layer.bias is None else base_layer.bias.to(self.sinder_u.dtype)
        return F.linear(factors, self.sinder_u, bias).to(x.dtype)


class Linear(nn.Module, SinderLayer):
    """A SINDER-adapted `nn.Linear`, computing `((x V) * (S + delta)) U^T + b` (see the module docstring).

    Args:
        base_layer: the `nn.Linear` to adapt.
        adapter_name: the adapter to add.
        config: its configuration.
        factors: the factors `(U, S, V^T)` this layer applies, when they are not the SVD of its own weight (the gate
            projection of a fused gated MLP applies its rows of the stacked weight's SVD); None computes that SVD.
        decomposed_shape: the shape of the matrix `factors` decompose, for the fingerprint's tolerance; None for the
            shape of `U diag(S) V^T` itself.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SinderConfig,
        factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        decomposed_shape: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SinderLayer.__init__(self, base_layer, **kwargs)
        self._register_singular_factors(*(factors if factors is not None else thin_svd(self.get_base_layer().weight)))
        if decomposed_shape is not None:
            self.decomposed_shape = decomposed_shape
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._adapted_forward(x, *args, **kwargs)

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

    The fingerprint of the base weight is recomputed at injection. Each of its top values and its sum is compared
    with the saved one within a tolerance of its own (`fingerprint_tolerances`), for the coarser of the saved and the
    current weight's dtype. A mismatch means the adapter was trained on a different base model, or on this one
    before the adapter was merged into it, and its shifts would be applied to the wrong singular values. Fingerprints
    saved by sinder-peft 0.1.0 (without the rounding unit) are compared at the current weight's rounding unit.
    """
    key_prefix = f"{prefix}sinder_fingerprint."
    weight = module.get_base_layer().weight
    current_unit = rounding_unit(weight.dtype)
    compared = FINGERPRINT_SIZE - 1
    for key, saved in state_dict.items():
        if not key.startswith(key_prefix):
            continue
        saved = saved.detach().to(device="cpu", dtype=torch.float64)
        if saved.ndim != 1 or saved.numel() not in (compared, compared + 1):
            raise ValueError(
                f"The SINDER adapter's fingerprint of '{prefix.rstrip('.')}' has shape {tuple(saved.shape)}; expected "
                f"{compared + 1} values. The adapter file is damaged or was not written by sinder-peft."
            )
        if saved.numel() == compared:
            # Written by sinder-peft 0.1.0: give it the rounding unit of this weight, the shape the buffer has now.
            state_dict[key] = torch.cat([saved, torch.tensor([current_unit], dtype=torch.float64)]).to(torch.float32)
        unit = max(current_unit, float(saved[compared])) if saved.numel() > compared else current_unit
        values = module.sinder_s.detach().to(device="cpu", dtype=torch.float64)
        expected = spectrum_fingerprint(values, weight.dtype).to(torch.float64)[:compared]
        tolerances = fingerprint_tolerances(values, module.decomposed_shape, unit)
        differences = (saved[:compared] - expected).abs()
        if bool((differences <= tolerances).all()):
            continue
        worst = int((differences / tolerances).argmax())
        what = f"singular value {worst + 1}" if worst < FINGERPRINT_TOP_VALUES else "sum of the singular values"
        relative = float(differences[worst] / expected[worst].abs().clamp_min(1e-30))
        raise ValueError(
            f"The SINDER adapter does not match the base weight of '{prefix.rstrip('.')}': its {what} is "
            f"{float(expected[worst]):.6g} here but was {float(saved[worst]):.6g} when the adapter was made "
            f"({100 * relative:.3g} % apart; rounding to {weight.dtype} explains at most "
            f"{100 * float(tolerances[worst] / expected[worst].abs().clamp_min(1e-30)):.3g} %). Either this model "
            "already has the adapter merged into it (e.g. the `model/` of a `sinder repair` run, or the result of "
            "`merge_and_unload`): use it as it is, without the adapter; or it is another model: load the adapter onto "
            "the base model it was trained from (`base_model_name_or_path` in adapter_config.json)."
        )


def effective_linear_weight(module: nn.Module) -> torch.Tensor:
    """Return the weight a linear module currently applies: `weight` of an `nn.Linear`, or, for a SINDER layer,
    `U diag(S + delta) V^T` with the active shifts (the base weight when adapters are disabled or merged)."""
    if isinstance(module, SinderLayer):
        return module.effective_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"Expected an nn.Linear or a SINDER layer, got {type(module).__name__}.")
