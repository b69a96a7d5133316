"""Scaling of sinder-peft's training step with image resolution and batch size: time, peak memory, and where the
time goes.

The step is `bench_train_step.py`'s `ours` variant, imported from there: `get_peft_model(model,
SinderConfig(layers_to_transform=window))` on a seeded random DINOv2 (ViT-B shape by default), no autograd below the
10-block gradient window, autograd in it, SINDER's smooth neighbourhood loss at the defective layer (default: the
last one), SGD. One model and adapter serve every configuration; each configuration starts again from the built
state.

Configurations: the resolution sweep (`--resolution`, batch 1) and the batch sweep (`--batch-size`, at
`--batch-resolution`), the configuration they share run once. For each one:

* time: `--warmup` untimed steps, then up to `--repeats` timed steps; fewer when a warm-up step shows that
  `--repeats` steps would take longer than `--step-budget-s` (at least one), so that large images stay affordable.
* peak memory of the steps (warm-up and timed): on CPU the peak RSS minus the RSS before the first step, measured
  alone in a fresh interpreter per configuration (`--memory subprocess`, the default on CPU: the RSS of a process
  also holds what earlier configurations freed), with the freed heap returned to the system after building
  (glibc `malloc_trim`) so that the baseline counts live memory only; on CUDA `torch.cuda.max_memory_allocated`
  minus the allocated memory before the first step, in this process (`--memory in-process`, exact per tensor).
* a `torch.profiler` breakdown of `--profile-steps` more steps: every operator's self time (CUDA kernel time on a
  GPU) sorted into `matmul` (matrix products, and the patch embedding's convolution), `attention` (scaled
  dot-product attention and everything it calls, forward and backward), `elementwise` (pointwise arithmetic,
  activations, copies and layer norms: one pass over the activations each) and `other` (the rest: views,
  reductions, the loss's own ops, the optimizer, autograd bookkeeping), with the largest operators of each.

Usage:
    python benchmarks/bench_scaling.py --threads 1 --output results/scaling_vitb_cpu.json
    python benchmarks/bench_scaling.py --device cuda --model-size g --output results/scaling_vitg_gpu.json
    python benchmarks/bench_scaling.py --quick --memory in-process --output /tmp/scaling.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from bench_train_step import (
    TrainingStep,
    add_step_arguments,
    build_variant,
    make_inputs,
    resolve_step_arguments,
    start_step_benchmark,
)
from common import (
    PATCH_SIZE,
    PeakMemory,
    add_threads_argument,
    current_rss_bytes,
    format_table,
    mebibytes,
    summarize_times,
    synchronize,
    time_once,
    write_json,
)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import sinder_peft
from sinder_peft.tuner.architectures import describe_config

CATEGORIES: tuple[str, ...] = ("matmul", "attention", "elementwise", "other")

# Matrix products, and the convolutions (the patch embedding: a matrix product over patches).
MATMUL_OPERATORS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "matmul",
        "linear",
        "mv",
        "addmv",
        "dot",
        "_addmm_activation",
        "conv2d",
        "convolution",
        "_convolution",
        "mkldnn_convolution",
        "cudnn_convolution",
        "convolution_backward",
    }
)

# Names without the `aten::` prefix, in place or not (a trailing `_` is stripped before the look-up).
ELEMENTWISE_OPERATORS = frozenset(
    {
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "neg",
        "abs",
        "pow",
        "sqrt",
        "rsqrt",
        "exp",
        "log",
        "reciprocal",
        "clamp",
        "clamp_min",
        "clamp_max",
        "where",
        "lerp",
        "addcmul",
        "addcdiv",
        "gelu",
        "gelu_backward",
        "silu",
        "silu_backward",
        "sigmoid",
        "sigmoid_backward",
        "tanh",
        "tanh_backward",
        "threshold_backward",
        "copy",
        "clone",
        "contiguous",
        "to",
        "_to_copy",
        "fill",
        "zero",
        "zeros_like",
        "ones_like",
        "layer_norm",
        "native_layer_norm",
        "native_layer_norm_backward",
    }
)

# Looked for in lower-cased names without underscores: the SDPA entry point, its CPU/CUDA kernels and the autograd
# nodes of their backward passes (e.g. `ScaledDotProductFlashAttentionForCpuBackward0`).
ATTENTION_MARKERS: tuple[str, ...] = ("scaleddotproduct", "flashattention", "efficientattention", "cudnnattention")


def log(message: str) -> None:
    """Progress line on stderr (the tables go to stdout)."""
    print(f"[bench_scaling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def is_attention(name: str) -> bool:
    """Whether operator `name` is scaled dot-product attention (an entry point, a kernel or a backward node)."""
    normalized = name.lower().replace("_", "")
    return any(marker in normalized for marker in ATTENTION_MARKERS)


def operator_category(name: str, ancestors: Iterable[str] = ()) -> str:
    """Return the category ("matmul", "attention", "elementwise" or "other") of an operator.

    `ancestors` are the names of the operators it runs inside (innermost first): anything inside attention counts
    as attention, so that the matrix multiplies of a math-path attention are not counted as projections.
    """
    if is_attention(name) or any(is_attention(ancestor) for ancestor in ancestors):
        return "attention"
    base = name.removeprefix("aten::").rstrip("_")
    if base in MATMUL_OPERATORS:
        return "matmul"
    if base in ELEMENTWISE_OPERATORS:
        return "elementwise"
    return "other"


def _ancestor_names(event: Any) -> list[str]:
    """Names of the operators enclosing a profiler event, innermost first."""
    names = []
    parent = event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def breakdown(events: Iterable[Any], on_cuda: bool, steps: int, top: int = 5) -> dict[str, Any]:
    """Return the time of profiled operator `events` per category, per step.

    Each CPU-side operator event contributes its self time: CPU time on the CPU, or on CUDA the time of the kernels
    it launched itself (`self_device_time_total`; kernel events are skipped, their time being their launcher's), so
    nothing is counted twice. Returns the total milliseconds per step and, per category, milliseconds per step, the
    fraction of the total and its `top` operators by time.
    """
    per_operator: dict[tuple[str, str], float] = {}
    for event in events:
        if event.device_type != DeviceType.CPU:
            continue
        microseconds = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if microseconds <= 0:
            continue
        key = (operator_category(event.name, _ancestor_names(event)), event.name)
        per_operator[key] = per_operator.get(key, 0.0) + microseconds
    total = sum(per_operator.values())
    categories = {}
    for category in CATEGORIES:
        operators = sorted(
            ((name, value) for (owner, name), value in per_operator.items() if owner == category),
            key=lambda item: item[1],
            reverse=True,
        )
        time_us = sum(value for _, value in operators)
        categories[category] = {
            "ms_per_step": time_us / 1000 / steps,
            "fraction": time_us / total if total else 0.0,
            "top_operators": [
                {"name": name, "ms_per_step": value / 1000 / steps, "fraction": value / total}
                for name, value in operators[:top]
            ],
        }
    return {
        "time_kind": "self CUDA kernel time" if on_cuda else "self CPU time",
        "steps": steps,
        "ms_per_step_total": total / 1000 / steps,
        "categories": categories,
    }


def profile_step(step: TrainingStep, inputs: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Profile `args.profile_steps` steps on `inputs` and return their `breakdown`."""
    on_cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities) as profiler:
        for _ in range(args.profile_steps):
            step.step(inputs)
    synchronize(args.device)
    return breakdown(profiler.events(), on_cuda, args.profile_steps)


def release_freed_heap() -> bool:
    """Collect garbage and hand the heap's free pages back to the system (glibc `malloc_trim(0)`), so that the RSS
    counts live memory only. Returns whether `malloc_trim` was available (not on macOS or musl)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def memory_now(device: str) -> int:
    """Allocated CUDA memory, or the process RSS on CPU, in bytes."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes() or 0


def tokens_per_image(step: TrainingStep, resolution: int) -> int:
    """Sequence length of one image at `resolution`: prefix tokens plus the patch grid."""
    return describe_config(step.backbone.config).num_prefix_tokens + (resolution // PATCH_SIZE) ** 2


def configurations(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (resolution, batch size) pairs to measure: the resolution sweep at batch 1, then the batch sweep at
    `--batch-resolution`, each pair once, in that order."""
    pairs = [(resolution, 1) for resolution in args.resolution]
    pairs += [(args.batch_resolution, batch) for batch in args.batch_size]
    return list(dict.fromkeys(pairs))


def measure(step: TrainingStep, args: argparse.Namespace, resolution: int, batch_size: int) -> dict[str, Any]:
    """Measure one configuration on a built `step`: peak memory and time of the steps, then a profiled step.

    Returns the configuration, tokens, the `Timing` of the timed steps (and the warm-up times), every step's loss,
    the memory measurement (bytes the steps added at their peak: `delta_bytes`) and the profile `breakdown`.
    """
    step.reset()
    configured = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
    inputs = make_inputs(configured, resolution, step.backbone.config.hidden_size)
    losses: list[float] = []

    def run_step() -> None:
        losses.append(step.step(inputs))

    on_cuda = torch.device(args.device).type == "cuda"
    trimmed = False if on_cuda else release_freed_heap()
    log(f"{resolution} px, batch {batch_size}: timing")
    with PeakMemory(args.device) as memory:
        warmup_times = [time_once(run_step, args.device) for _ in range(args.warmup)]
        repeats = args.repeats
        if warmup_times:
            repeats = max(1, min(args.repeats, int(args.step_budget_s / max(warmup_times[-1], 1e-9))))
        timing = summarize_times([time_once(run_step, args.device) for _ in range(repeats)], args.warmup)
    log(f"{resolution} px, batch {batch_size}: median {timing.median_s:.4f} s over {repeats}; profiling")
    profiled = profile_step(step, inputs, args)
    return {
        "resolution": resolution,
        "batch_size": batch_size,
        "tokens_per_image": tokens_per_image(step, resolution),
        "timing": timing,
        "warmup_times_s": warmup_times,
        "losses": losses,
        "memory": {
            **memory.as_dict(),
            "measured": "in-process" if args.memory == "in-process" else "subprocess",
            "freed_heap_released": trimmed,
        },
        "profile": profiled,
    }


def build(args: argparse.Namespace) -> tuple[TrainingStep, int]:
    """Build `ours`' step (see `bench_train_step.build_ours`) and return it with the bytes building added: allocated
    CUDA memory, or on CPU the RSS with freed heap handed back before and after."""
    on_cpu = torch.device(args.device).type == "cpu"
    synchronize(args.device)
    if on_cpu:
        release_freed_heap()
    before = memory_now(args.device)
    step = build_variant("ours", args, keep_initial=True)
    synchronize(args.device)
    if on_cpu:
        release_freed_heap()
    return step, memory_now(args.device) - before


def measure_in_process(args: argparse.Namespace, pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Build once and measure every configuration in this process."""
    step, built_bytes = build(args)
    results = []
    for resolution, batch_size in pairs:
        result = measure(step, args, resolution, batch_size)
        result["memory"]["built_bytes"] = built_bytes
        results.append(result)
    return results


def measure_in_subprocess(args: argparse.Namespace, resolution: int, batch_size: int) -> dict[str, Any]:
    """Run this script for one configuration (`--only-config`) in a fresh interpreter and return its result."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "configuration.json")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            *args.argv,
            "--only-config",
            str(resolution),
            str(batch_size),
            "--output",
            output,
        ]
        log(f"subprocess: {resolution} px, batch {batch_size}")
        # The child imports sinder_peft from where this process found it, installed or not.
        package_root = str(Path(sinder_peft.__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        # The child's progress and errors go to this process's stderr as they come; its tables are not needed.
        completed = subprocess.run(
            command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": python_path}
        )
        if completed.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed (its stderr is above):\n{completed.stdout}")
        with open(output) as handle:
            (result,) = json.load(handle)["configurations"]
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument(
        "--resolution", type=int, nargs="+", default=[224, 518, 896], help="image sides of the sweep (batch 1)"
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 2, 4], help="batch sizes of the sweep")
    parser.add_argument("--batch-resolution", type=int, default=224, help="image side of the batch sweep")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="most timed steps per configuration")
    parser.add_argument(
        "--step-budget-s",
        type=float,
        default=100.0,
        help="fewer timed steps (at least one) where --repeats steps would take longer than this, judged by the "
        "last warm-up step",
    )
    parser.add_argument("--profile-steps", type=int, default=1, help="profiled steps per configuration")
    parser.add_argument(
        "--memory",
        choices=["subprocess", "in-process"],
        default=None,
        help="each configuration in a fresh interpreter (default on CPU) or all in this process (default on CUDA, "
        "where allocated memory is exact; on CPU only approximate)",
    )
    parser.add_argument(
        "--only-config",
        type=int,
        nargs=2,
        metavar=("RESOLUTION", "BATCH"),
        default=None,
        help="measure this one configuration in this process (what each memory subprocess runs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny model, small images, few steps")
    parser.add_argument("--output", default="scaling.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.model_size, args.num_layers, args.limit_layers = "tiny", None, 2
        if args.resolution == parser.get_default("resolution"):
            args.resolution = [56, 70]
        if args.batch_size == parser.get_default("batch_size"):
            args.batch_size = [1, 2]
        if args.batch_resolution == parser.get_default("batch_resolution"):
            args.batch_resolution = 56
        args.warmup, args.repeats, args.profile_steps = 1, 2, 1
    resolve_step_arguments(args)
    return args


def _shares(result: dict[str, Any]) -> list[str]:
    """The profile's category fractions as percentages, in `CATEGORIES` order."""
    return [f"{100 * result['profile']['categories'][name]['fraction']:.0f}%" for name in CATEGORIES]


def _print_tables(payload: dict[str, Any]) -> None:
    """Print the resolution sweep, the batch sweep and the largest operators outside matmul and attention."""
    args = payload["args"]
    by_pair = {(result["resolution"], result["batch_size"]): result for result in payload["configurations"]}
    memory_kind = "CUDA max allocated" if torch.device(args["device"]).type == "cuda" else "peak RSS"
    print(
        f"## Training step scaling, {payload['model']}, defective layer {args['layer']}, window {payload['window']}, "
        f"device {args['device']}{', bf16 autocast' if args['bf16'] else ''}, matmul precision "
        f"{args['matmul_precision']}\n"
    )
    shares = [f"{name} share" for name in CATEGORIES]
    first = by_pair[(args["resolution"][0], 1)]
    rows = []
    for resolution in args["resolution"]:
        result = by_pair[(resolution, 1)]
        median = result["timing"].median_s
        rows.append(
            [
                resolution,
                result["tokens_per_image"],
                median,
                result["timing"].repeats,
                median / first["timing"].median_s,
                f"{mebibytes(result['memory']['delta_bytes']):.0f}",
                *_shares(result),
            ]
        )
    headers = ["px", "tokens", "median step s", "timed steps", "x first", f"step {memory_kind} MiB", *shares]
    print(f"### Resolution, batch 1\n\n{format_table(headers, rows)}\n")
    single = by_pair[(args["batch_resolution"], 1)]
    rows = []
    for batch_size in args["batch_size"]:
        result = by_pair[(args["batch_resolution"], batch_size)]
        median = result["timing"].median_s
        rows.append(
            [
                batch_size,
                median,
                median / batch_size,
                median / batch_size / single["timing"].median_s,
                result["timing"].repeats,
                f"{mebibytes(result['memory']['delta_bytes']):.0f}",
                *_shares(result),
            ]
        )
    headers = [
        "batch",
        "median step s",
        "s per image",
        "per image x batch 1",
        "timed steps",
        f"step {memory_kind} MiB",
        *shares,
    ]
    print(f"### Batch size, {args['batch_resolution']} px\n\n{format_table(headers, rows)}\n")
    for result in payload["configurations"]:
        categories = result["profile"]["categories"]
        largest = ", ".join(
            f"{category}: "
            + ", ".join(
                f"{op['name']} {100 * op['fraction']:.1f}%" for op in categories[category]["top_operators"][:3]
            )
            for category in CATEGORIES
        )
        print(f"{result['resolution']} px, batch {result['batch_size']}: {largest}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or, with `--only-config`, one configuration), print its tables, write the JSON, return
    it."""
    args = parse_args(argv)
    payload = start_step_benchmark(args, "scaling", internal="argv")
    payload["categories"] = list(CATEGORIES)
    if args.only_config is not None:
        payload["configurations"] = measure_in_process(args, [tuple(args.only_config)])
        write_json(args.output, payload)
        return payload
    pairs = configurations(args)
    if args.memory == "in-process":
        payload["configurations"] = measure_in_process(args, pairs)
    else:
        payload["configurations"] = [measure_in_subprocess(args, *pair) for pair in pairs]
        for result in payload["configurations"]:
            result["timing"] = summarize_times(result["timing"]["times_s"], result["timing"]["warmup"])
    _print_tables(payload)
    write_json(args.output, payload)
    print(f"\nWrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
