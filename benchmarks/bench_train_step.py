"""One SINDER training step: sinder-peft against a faithful re-creation of the original code, and a plain floor.

Variants (same random DINOv2, same image, same defect direction):

* `original`: what the original SINDER code (`main.py`, `sinder/repair.py`, `sinder/neighbor_loss.py`) does. Every
  linear layer of every block (query, key, value, output, MLP) is replaced by a module holding frozen `U`, `S`,
  `V^T` (float32 SVD, as the original computes it) and a shift `epsilon`, and rebuilding
  `U @ diag(S + epsilon) @ V^T` in every forward; `epsilon` trains for value/output/MLP in every block and is frozen
  for query/key. The step runs the whole forward with autograd from the embeddings to the defective layer, computes
  the loss, back-propagates through every block, drops the gradients of the blocks below the window
  (`p.grad = None`), checks every gradient for NaN and takes an SGD step. transformers keeps query, key and value as
  three linear layers (the original fuses them into `qkv`, rebuilding the three parts and concatenating): the
  rebuild cost is the same. Likewise ViT-g's SwiGLU keeps `gate_proj` and `up_proj` apart where the original has one
  fused `w12` (same rebuild cost; the fused SVD gives a different parametrization, so only the first loss matches).
* `ours`: `get_peft_model(model, SinderConfig(layers_to_transform=window))`: the factored adapter layer in the
  window only, as in a repair run (`select_layers_to_transform`); embeddings and the blocks below the window run
  under `torch.no_grad()`, the window with autograd, stopping at the defective layer; one finiteness check of the
  shifts' gradients; SGD step.
* `floor`: the plain model with everything frozen but the weights of the targeted projections in the window (the
  full `W` trains, as in ordinary fine-tuning); same step as `ours`. The reference point of issue 6: the cost of the
  window's forward and backward passes with plain linear layers.

Every variant computes SINDER's smooth neighbourhood loss (`sinder_peft.training.loss.smooth_neighbourhood_loss`,
3x3 kernel) at
the output of layer `--layer` for a synthetic defect mask (the 3 highest-norm interior tokens of each image) and
the cosines to a fixed random unit direction. The per-layer defect detection of a real run (the original checks
every block it passes) is left out of every variant. SGD: lr 0.005, momentum 0.9.

The driver (default) builds each variant once, times the variants side by side in one process, interleaving their
steps round by round, and compares their losses on the same input (same weights: equal up to float32 rounding).
Memory: on CPU each variant then runs alone in a subprocess (`--only VARIANT`), since the RSS of a process cannot be
split between variants; on CUDA, where allocated memory is counted per tensor, each variant is measured in the same
process before the timing (`--memory` picks).

Usage:
    python benchmarks/bench_train_step.py --threads 1 --resolution 224 448 --output results/train_step_vitb.json
    python benchmarks/bench_train_step.py --device cuda --model-size g --resolution 518 --output train_step_vitg.json
    python benchmarks/bench_train_step.py --device cuda --model-size g --resolution 518 --bf16 --output ...
    python benchmarks/bench_train_step.py --quick --output /tmp/step.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    PATCH_SIZE,
    PeakMemory,
    add_threads_argument,
    apply_threads,
    current_rss_bytes,
    format_table,
    get_shape,
    machine_description,
    mebibytes,
    random_dinov2,
    synchronize,
    time_callable,
    time_interleaved,
    write_json,
)
from peft import get_peft_model
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import sinder_peft
from sinder_peft import SinderConfig
from sinder_peft.training.loss import smooth_neighbourhood_loss
from sinder_peft.training.window_loss import gradient_window
from sinder_peft.tuner.architectures import describe_config, get_blocks, unwrap_backbone

VARIANTS: tuple[str, ...] = ("original", "ours", "floor")
NUM_DEFECT_TOKENS = 3
KERNEL_SIZE = 3


class OriginalSvdLinear(nn.Module):
    """The original code's `SVDLinearAddition`: frozen `U`, `S`, `V^T` and a shift, rebuilt in every forward.

    Like the original, `U`, `S`, `V^T` and `epsilon` are `nn.Parameter`s (`U`, `S`, `V^T` and the bias frozen) and
    the layer drops its base weight, keeping only the factors.
    """

    def __init__(self, linear: nn.Linear, trainable: bool) -> None:
        super().__init__()
        self.bias = linear.bias
        with torch.no_grad():
            left, singular, right_t = torch.linalg.svd(linear.weight, full_matrices=False)
        self.U = nn.Parameter(left, requires_grad=False)
        self.S = nn.Parameter(singular, requires_grad=False)
        self.Vt = nn.Parameter(right_t, requires_grad=False)
        self.epsilon = nn.Parameter(torch.zeros_like(singular), requires_grad=trainable)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.U @ torch.diag(self.S + self.epsilon) @ self.Vt
        return F.linear(x, weight, self.bias)


def defect_loss(
    hidden_states: torch.Tensor, direction: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Return the smooth neighbourhood loss of the patch tokens of `hidden_states` ([B, N, C]).

    The defect mask flags the `NUM_DEFECT_TOKENS` highest-norm interior tokens of each image; the cosines are those
    of each token to `direction`. Mask and cosines carry no gradient (as in the original).
    """
    batch, _, channels = hidden_states.shape
    tokens = hidden_states[:, num_prefix_tokens:].float().reshape(batch, *grid, channels)
    with torch.no_grad():
        cosines = F.cosine_similarity(tokens, direction.float(), dim=-1)
        pad = KERNEL_SIZE // 2
        interior = (slice(None), slice(pad, grid[0] - pad), slice(pad, grid[1] - pad))
        norms = torch.full(tokens.shape[:3], -1.0, device=tokens.device)
        norms[interior] = tokens[interior].norm(dim=-1)
        top = norms.flatten(1).topk(NUM_DEFECT_TOKENS, dim=1).indices
        mask = torch.zeros(batch, grid[0] * grid[1], dtype=torch.bool, device=tokens.device)
        mask.scatter_(1, top, True)
        mask = mask.reshape(batch, *grid)
    return smooth_neighbourhood_loss(tokens, cosines, mask, kernel_size=KERNEL_SIZE)


@dataclass
class StepInputs:
    """What one step reads: an image batch, the defect direction, the patch grid and the device."""

    pixel_values: torch.Tensor
    direction: torch.Tensor
    grid: tuple[int, int]
    device: torch.device


def _block_target_paths(config: Any) -> tuple[str, ...]:
    """Module paths, relative to a block, of the projections SINDER trains (value, output, every MLP projection)."""
    block = describe_config(config).block
    return (*block.attention_targets, *block.mlp_targets)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when asked, else a no-op context."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainingStep:
    """A variant's model, the tensors it trains and its SGD optimizer; `step(inputs)` runs one training step.

    With `keep_initial`, a copy of the trained tensors is kept in CPU memory so that `reset()` can restore them (and
    clear the momentum), which lets one build (the SVDs are the slow part) serve several resolutions with comparable
    losses.
    """

    def __init__(
        self, model: nn.Module, parameters: list[nn.Parameter], args: argparse.Namespace, keep_initial: bool
    ) -> None:
        self.model = model
        self.backbone = unwrap_backbone(model)
        self.blocks = get_blocks(self.backbone)
        self.num_prefix_tokens = describe_config(self.backbone.config).num_prefix_tokens
        self.parameters = parameters
        self.optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum)
        # On the CPU, so that a GPU variant's measured memory does not hold this copy.
        self.initial = [parameter.detach().to("cpu", copy=True) for parameter in parameters] if keep_initial else None
        self.layer = args.layer
        self.first = gradient_window(args.layer, args.limit_layers).start
        self.bf16 = args.bf16

    @property
    def trainable_entries(self) -> int:
        """Number of trained scalars."""
        return sum(parameter.numel() for parameter in self.parameters)

    def reset(self) -> None:
        """Restore the trained tensors to their values at build time and drop gradients and momentum."""
        if self.initial is None:
            raise RuntimeError("Built without keep_initial: nothing to reset to.")
        with torch.no_grad():
            for parameter, initial in zip(self.parameters, self.initial, strict=True):
                parameter.copy_(initial)
                parameter.grad = None
        self.optimizer.state.clear()

    def loss(self, hidden_states: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """The smooth neighbourhood loss of the defective layer's output (see `defect_loss`)."""
        return defect_loss(hidden_states, inputs.direction, self.num_prefix_tokens, inputs.grid)

    def step(self, inputs: StepInputs) -> float:
        """Run one training step on `inputs` and return its loss."""
        raise NotImplementedError


class OriginalStep(TrainingStep):
    """The original code's step: autograd through every block up to the defective layer, gradients below the window
    dropped after the backward pass, a NaN check of every gradient, SGD."""

    def step(self, inputs: StepInputs) -> float:
        self.backbone.zero_grad()
        with _autocast(inputs.device, self.bf16):
            hidden = self.backbone.embeddings(inputs.pixel_values)
            for block in self.blocks[: self.layer + 1]:
                hidden = block(hidden)
        loss = self.loss(hidden, inputs)
        loss.backward()
        with torch.no_grad():
            for block in self.blocks[: self.first]:
                for parameter in block.parameters():
                    parameter.grad = None
        has_nan = any(
            parameter.grad is not None and bool(torch.isnan(parameter.grad).any())
            for parameter in self.backbone.parameters()
        )
        if not has_nan:
            self.optimizer.step()
        return float(loss.detach())


class WindowedStep(TrainingStep):
    """The step of `ours` and `floor`: no autograd below the window, autograd in it, stop at the defective layer,
    one finiteness check of the trained tensors' gradients, SGD."""

    def step(self, inputs: StepInputs) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(inputs.device, self.bf16):
            with torch.no_grad():
                hidden = self.backbone.embeddings(inputs.pixel_values)
                for block in self.blocks[: self.first]:
                    hidden = block(hidden)
            for block in self.blocks[self.first : self.layer + 1]:
                hidden = block(hidden)
        loss = self.loss(hidden, inputs)
        loss.backward()
        if bool(torch.stack([parameter.grad.isfinite().all() for parameter in self.parameters]).all()):
            self.optimizer.step()
        return float(loss.detach())


def build_original(model: nn.Module, args: argparse.Namespace, keep_initial: bool) -> TrainingStep:
    """Return the original-style step (see the module docstring) on `model`, modified in place."""
    backbone = unwrap_backbone(model)
    block_description = describe_config(backbone.config).block
    trained = set(_block_target_paths(backbone.config))
    backbone.requires_grad_(False)
    for block in get_blocks(backbone):
        for path in (block_description.query, block_description.key, *trained):
            parent_path, name = path.rsplit(".", 1)
            parent = block.get_submodule(parent_path)
            setattr(parent, name, OriginalSvdLinear(getattr(parent, name), trainable=path in trained))
    parameters = [
        parameter
        for name, parameter in backbone.named_parameters()
        if name.endswith(".epsilon") and parameter.requires_grad
    ]
    return OriginalStep(backbone, parameters, args, keep_initial)


def build_ours(model: nn.Module, args: argparse.Namespace, keep_initial: bool) -> TrainingStep:
    """Return sinder-peft's step: the adapter on the window's blocks only (see the module docstring)."""
    window = list(gradient_window(args.layer, args.limit_layers))
    peft_model = get_peft_model(model, SinderConfig(layers_to_transform=window))
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    return WindowedStep(peft_model, parameters, args, keep_initial)


def build_floor(model: nn.Module, args: argparse.Namespace, keep_initial: bool) -> TrainingStep:
    """Return the floor: plain model, only the full weights of the window's targeted projections train."""
    backbone = unwrap_backbone(model).requires_grad_(False)
    parameters = [
        block.get_submodule(path).weight.requires_grad_(True)
        for block in get_blocks(backbone)[gradient_window(args.layer, args.limit_layers).start : args.layer + 1]
        for path in _block_target_paths(backbone.config)
    ]
    return WindowedStep(backbone, parameters, args, keep_initial)


BUILDERS: dict[str, Callable[[nn.Module, argparse.Namespace, bool], TrainingStep]] = {
    "original": build_original,
    "ours": build_ours,
    "floor": build_floor,
}


def make_inputs(args: argparse.Namespace, resolution: int, hidden_size: int) -> StepInputs:
    """Return the step inputs: a seeded random image batch, a seeded random unit direction, the patch grid."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    pixel_values = torch.randn(args.batch_size, 3, resolution, resolution, generator=generator)
    direction = F.normalize(torch.randn(hidden_size, generator=generator), dim=0)
    device = torch.device(args.device)
    grid = (resolution // PATCH_SIZE, resolution // PATCH_SIZE)
    return StepInputs(pixel_values.to(device), direction.to(device), grid, device)


def build_variant(variant: str, args: argparse.Namespace, keep_initial: bool) -> TrainingStep:
    """Build a fresh seeded random model of `args.model_size` and return `variant`'s step on it."""
    log(f"building {variant}")
    model = random_dinov2(get_shape(args.model_size), seed=args.seed, num_layers=args.num_layers, device=args.device)
    return BUILDERS[variant](model, args, keep_initial)


def log(message: str) -> None:
    """Progress line on stderr (the tables go to stdout)."""
    print(f"[bench_train_step {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _memory_record(before_build: int, after_build: int, memory: PeakMemory, in_process: bool) -> dict[str, Any]:
    """Return one variant's memory: `static_bytes` (what building the model and adapter added), `step_bytes` (what
    the steps added at their peak) and `total_bytes`, their sum, plus the raw measurement.

    Alone in a process (`in_process=False`), the step's share is the peak minus the memory after building (on CPU
    it then includes heap memory freed but kept by the allocator since building); in a process shared with other
    variants (exact on CUDA, where allocated memory is counted per tensor; RSS growth on CPU), it is the peak minus
    the memory on entry.
    """
    step_baseline = memory.baseline_bytes if in_process else after_build
    static, step = after_build - before_build, memory.peak_bytes - step_baseline
    return {
        **memory.as_dict(),
        "measured": "in-process" if in_process else "subprocess",
        "before_build_bytes": before_build,
        "after_build_bytes": after_build,
        "static_bytes": static,
        "step_bytes": step,
        "total_bytes": static + step,
    }


def run_side_by_side(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, TrainingStep]]:
    """Time all variants in this process, interleaving their steps round by round, and record every step's loss.

    Returns, per resolution and variant: the `Timing` of the timed steps, the loss of every step (warm-up steps
    first) and the number of trained entries. Each resolution starts from the built state (`reset`). With
    `--memory in-process` (CUDA), each variant's memory is measured first, over `--memory-steps` steps of its own.
    Also returns the built steps, for reuse (profiling).
    """
    in_process = args.memory == "in-process"
    steps: dict[str, TrainingStep] = {}
    built: dict[str, tuple[int, int]] = {}
    for variant in args.variants:
        synchronize(args.device)
        before_build = _memory_now(args.device)
        steps[variant] = build_variant(variant, args, keep_initial=True)
        synchronize(args.device)
        built[variant] = (before_build, _memory_now(args.device))
    hidden_size = next(iter(steps.values())).backbone.config.hidden_size
    runs = []
    for resolution in args.resolution:
        inputs = make_inputs(args, resolution, hidden_size)
        run: dict[str, Any] = {"resolution": resolution}
        if in_process:
            log(f"memory of each variant at {resolution} px")
            run["memory"] = {}
            for variant, step in steps.items():
                step.reset()
                with PeakMemory(args.device) as memory:
                    for _ in range(args.memory_steps):
                        step.step(inputs)
                run["memory"][variant] = _memory_record(*built[variant], memory, in_process=True)
                log(f"{resolution} px {variant}: memory {run['memory'][variant]}")
        log(f"side by side at {resolution} px")
        losses: dict[str, list[float]] = {variant: [] for variant in steps}
        for step in steps.values():
            step.reset()

        def recorded(variant: str, inputs: StepInputs = inputs, losses: dict = losses) -> Callable[[], None]:
            return lambda: losses[variant].append(steps[variant].step(inputs))

        timings = time_interleaved(
            {variant: recorded(variant) for variant in steps},
            warmup=args.warmup,
            repeats=args.repeats,
            device=args.device,
        )
        run["side_by_side"] = {
            variant: {
                "timing": timings[variant],
                "losses": losses[variant],
                "trainable_entries": step.trainable_entries,
            }
            for variant, step in steps.items()
        }
        for variant, result in run["side_by_side"].items():
            log(f"{resolution} px {variant}: median {result['timing'].median_s:.4f} s, losses {result['losses']}")
        runs.append(run)
    return runs, steps


def run_alone(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build one variant (`args.only`) in this process and measure, per resolution, its memory, time and losses.

    Memory: the RSS (CPU) or allocated memory (CUDA) before and after building the model and its adapter, and the
    peak during `--memory-steps` steps (peak counter reset before each resolution). The resolutions run in the
    given order without reset (losses after the first resolution are not from the built state).
    """
    synchronize(args.device)
    before_build = _memory_now(args.device)
    step = build_variant(args.only, args, keep_initial=False)
    synchronize(args.device)
    after_build = _memory_now(args.device)
    runs = []
    for resolution in args.resolution:
        log(f"{args.only} alone at {resolution} px")
        inputs = make_inputs(args, resolution, step.backbone.config.hidden_size)
        losses: list[float] = []
        with PeakMemory(args.device) as memory:
            timing = time_callable(
                lambda inputs=inputs, losses=losses: losses.append(step.step(inputs)),
                warmup=1,
                repeats=max(1, args.memory_steps - 1),
                device=args.device,
            )
        runs.append(
            {
                "variant": args.only,
                "resolution": resolution,
                "memory": _memory_record(before_build, after_build, memory, in_process=False),
                "timing": timing,
                "losses": losses,
                "trainable_entries": step.trainable_entries,
            }
        )
    return runs


def _memory_now(device: str) -> int:
    """Allocated CUDA memory, or the process RSS on CPU, in bytes."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes() or 0


def profile_ours(
    args: argparse.Namespace, step: TrainingStep | None = None, row_limit: int = 25
) -> list[dict[str, Any]]:
    """Profile `ours`' step (`step`, or a fresh build) with `torch.profiler` at each resolution, after one warm-up
    step.

    Returns per resolution the printed table and the top operators by self time (CUDA time on a GPU): calls and
    milliseconds per step, and each operator's share of the total self time.
    """
    if step is None:
        step = build_variant("ours", args, keep_initial=False)
    on_cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    sort_key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    profiles = []
    for resolution in args.resolution:
        log(f"profiling ours at {resolution} px")
        inputs = make_inputs(args, resolution, step.backbone.config.hidden_size)
        step.step(inputs)
        with profile(activities=activities) as profiler:
            for _ in range(args.profile_steps):
                step.step(inputs)
        averages = profiler.key_averages()
        total = sum(getattr(event, sort_key) for event in averages)
        events = sorted(averages, key=lambda event: getattr(event, sort_key), reverse=True)[:row_limit]
        operators = [
            {
                "name": event.key,
                "calls_per_step": event.count / args.profile_steps,
                "self_ms_per_step": getattr(event, sort_key) / 1000 / args.profile_steps,
                "self_fraction": getattr(event, sort_key) / total if total else 0.0,
            }
            for event in events
        ]
        profiles.append(
            {
                "resolution": resolution,
                "steps": args.profile_steps,
                "sort_key": sort_key,
                "self_ms_per_step_total": total / 1000 / args.profile_steps,
                "table": averages.table(sort_by=sort_key, row_limit=row_limit),
                "operators": operators,
            }
        )
    return profiles


def _subprocess_alone(args: argparse.Namespace, variant: str) -> list[dict[str, Any]]:
    """Run this script with `--only variant` in a fresh interpreter and return its per-resolution results."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "alone.json")
        command = [sys.executable, os.path.abspath(__file__), "--only", variant, "--output", output, *args.forwarded]
        log(f"memory subprocess: {variant}")
        # The child imports sinder_peft from where this process found it, installed or not.
        package_root = str(Path(sinder_peft.__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONPATH": python_path}
        completed = subprocess.run(command, capture_output=True, text=True, env=environment)
        if completed.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{completed.stdout}\n{completed.stderr}")
        with open(output) as handle:
            return json.load(handle)["runs"]


def _loss_agreement(side_by_side: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Compare `ours`' and `original`'s losses step by step: the first (both at delta = 0) and the second (after one
    identical SGD step) must agree to `tolerance` relative."""
    if "ours" not in side_by_side or "original" not in side_by_side:
        return {}
    ours, original = side_by_side["ours"]["losses"], side_by_side["original"]["losses"]
    relative = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(ours, original, strict=False)]
    return {
        "relative_differences": relative,
        "tolerance": tolerance,
        "first_two_match": all(value <= tolerance for value in relative[:2]),
    }


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments that define the model and the training step (shared with `bench_scaling.py`)."""
    parser.add_argument("--model-size", default="b", help="s, b, l, g (or tiny); default ViT-B")
    parser.add_argument("--num-layers", type=int, default=None, help="truncate the model to this many blocks")
    parser.add_argument("--layer", type=int, default=None, help="defective layer (default: the last one)")
    parser.add_argument("--limit-layers", type=int, default=10, help="blocks with gradients, ending at --layer")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    parser.add_argument(
        "--matmul-precision",
        default=None,
        choices=["highest", "high", "medium"],
        help="torch.set_float32_matmul_precision; default 'high' on CUDA (TF32, as the original code), else 'highest'",
    )


def resolve_step_arguments(args: argparse.Namespace) -> None:
    """Fill in the device-dependent defaults of `add_step_arguments` (and `--memory`) and check `--layer`."""
    num_layers = get_shape(args.model_size).num_layers if args.num_layers is None else args.num_layers
    if args.layer is None:
        args.layer = num_layers - 1
    if not 0 <= args.layer < num_layers:
        raise ValueError(f"--layer {args.layer} out of range for {num_layers} blocks.")
    if args.memory is None:
        args.memory = "in-process" if args.device.startswith("cuda") else "subprocess"
    if args.matmul_precision is None:
        args.matmul_precision = "high" if args.device.startswith("cuda") else "highest"


def start_step_benchmark(args: argparse.Namespace, benchmark: str, internal: str) -> dict[str, Any]:
    """Apply `--threads` and `--matmul-precision` and return the start of a step benchmark's JSON payload (shared
    with `bench_scaling.py`): its name, the arguments (without the bookkeeping entry `internal`), the machine, the
    model and the gradient window."""
    apply_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    shape = get_shape(args.model_size)
    window = gradient_window(args.layer, args.limit_layers)
    return {
        "benchmark": benchmark,
        "args": {key: value for key, value in vars(args).items() if key != internal},
        "machine": machine_description(args.device),
        "model": shape.name if args.num_layers is None else f"{shape.name} ({args.num_layers} blocks)",
        "window": [window.start, window.stop - 1],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--resolution", type=int, nargs="+", default=[224, 448], help="square image side(s), px")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (interleaved)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each memory subprocess")
    parser.add_argument(
        "--memory",
        choices=["subprocess", "in-process", "none"],
        default=None,
        help=(
            "how to measure each variant's memory: alone in a subprocess (default on CPU, where RSS is shared by all "
            "tensors of a process), in this process (default on CUDA, where allocated memory is exact; on CPU only "
            "approximate: RSS growth), or not"
        ),
    )
    parser.add_argument("--profile", action="store_true", help="also profile ours' step with torch.profiler")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--only", choices=VARIANTS, default=None, help="run one variant alone (memory subprocess)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny model, two small resolutions, few steps")
    parser.add_argument("--output", default="train_step.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.model_size, args.num_layers = "tiny", None
        if args.resolution == parser.get_default("resolution"):
            args.resolution = [56, 70]
        args.limit_layers, args.warmup, args.repeats, args.memory_steps, args.profile_steps = 2, 1, 2, 2, 1
    resolve_step_arguments(args)
    # What a memory subprocess needs to rebuild the same model, input and step.
    args.forwarded = [
        "--model-size",
        args.model_size,
        "--layer",
        str(args.layer),
        "--limit-layers",
        str(args.limit_layers),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--momentum",
        str(args.momentum),
        "--device",
        args.device,
        "--matmul-precision",
        args.matmul_precision,
        "--seed",
        str(args.seed),
        "--resolution",
        *(str(resolution) for resolution in args.resolution),
        "--memory-steps",
        str(args.memory_steps),
        *(["--num-layers", str(args.num_layers)] if args.num_layers is not None else []),
        *(["--bf16"] if args.bf16 else []),
        *(["--threads", str(args.threads)] if args.threads is not None else []),
    ]
    return args


def _print_tables(payload: dict[str, Any]) -> None:
    """Print the side-by-side times with the memory of each variant alone, the loss check and the profiles."""
    args = payload["args"]
    print(
        f"## Training step, {payload['model']}, batch {args['batch_size']}, defective layer {args['layer']}, "
        f"window {payload['window']}, device {args['device']}{', bf16 autocast' if args['bf16'] else ''}, "
        f"matmul precision {args['matmul_precision']}\n"
    )
    memory_kind = "CUDA max allocated" if torch.device(args["device"]).type == "cuda" else "peak RSS"
    headers = [
        "px",
        "variant",
        "trained entries",
        "median s",
        "min s",
        "median x original",
        "loss step 1",
        "built MiB",
        "step peak MiB",
        "built + step MiB",
        f"process {memory_kind} MiB",
    ]
    rows = []
    for run in payload["runs"]:
        side = run["side_by_side"]
        original_time = side["original"]["timing"].median_s if "original" in side else None
        for variant, result in side.items():
            median = result["timing"].median_s
            memory = run.get("memory", {}).get(variant)
            rows.append(
                [
                    run["resolution"],
                    variant,
                    result["trainable_entries"],
                    median,
                    result["timing"].min_s,
                    "-" if original_time is None else median / original_time,
                    f"{result['losses'][0]:.7g}",
                    "-" if memory is None else f"{mebibytes(memory['static_bytes']):.0f}",
                    "-" if memory is None else f"{mebibytes(memory['step_bytes']):.0f}",
                    "-" if memory is None else f"{mebibytes(memory['total_bytes']):.0f}",
                    "-"
                    if memory is None or memory["measured"] == "in-process"
                    else f"{mebibytes(memory['peak_bytes']):.0f}",
                ]
            )
    print(format_table(headers, rows) + "\n")
    for run in payload["runs"]:
        agreement = run.get("loss_agreement")
        if agreement:
            values = ", ".join(f"{value:.1e}" for value in agreement["relative_differences"])
            print(
                f"{run['resolution']} px: |loss ours - loss original| / |loss original|, step by step: {values} "
                f"(steps 1-2 within {agreement['tolerance']:g}: {agreement['first_two_match']})"
            )
    for profiled in payload.get("profiles", []):
        print(f"\n### Profile of ours' step at {profiled['resolution']} px ({profiled['steps']} steps)\n")
        print(profiled["table"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or, with `--only`, one variant alone), print its tables, write the JSON, return it."""
    args = parse_args(argv)
    payload = start_step_benchmark(args, "train_step", internal="forwarded")
    if args.only is not None:
        payload["runs"] = run_alone(args)
        write_json(args.output, payload)
        return payload
    exact_fp32 = not args.bf16 and args.matmul_precision == "highest"
    payload["runs"], steps = run_side_by_side(args)
    for run in payload["runs"]:
        run["loss_agreement"] = _loss_agreement(run["side_by_side"], 1e-5 if exact_fp32 else 1e-2)
    if args.memory == "subprocess":
        alone = {variant: _subprocess_alone(args, variant) for variant in args.variants}
        for index, run in enumerate(payload["runs"]):
            run["memory"] = {variant: results[index]["memory"] for variant, results in alone.items()}
            run["alone_timing"] = {variant: results[index]["timing"] for variant, results in alone.items()}
            run["alone_losses"] = {variant: results[index]["losses"] for variant, results in alone.items()}
    if args.profile:
        payload["profiles"] = profile_ours(args, steps.get("ours"))
    _print_tables(payload)
    write_json(args.output, payload)
    print(f"\nWrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
