"""Helpers shared by the benchmark scripts: DINOv2 shapes, random models, timing, memory, machine, JSON and tables.

The scripts in this folder import this module as `common` (Python puts a script's own folder first on `sys.path`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.training.trainer import SinderTrainer, build_sinder_model, compute_directions
from sinder_peft.training.window_loss import gradient_window

PATCH_SIZE = 14
NUM_REGISTER_TOKENS = 4


@dataclass(frozen=True)
class VitShape:
    """The shape of one released DINOv2 backbone (all use 14-px patches and 518-px native images).

    Attributes:
        name: short name, e.g. "ViT-B/14".
        hub_id: the plain checkpoint on the Hub; the with-registers one is `registers_hub_id`.
        hidden_size, num_layers, num_heads: width, depth and attention heads.
        mlp_ratio: `Dinov2Config.mlp_ratio`; 4 for every size (for ViT-g transformers' SwiGLU keeps two thirds of
            `4 * 1536`, rounded up to a multiple of 8: 4096 hidden units, as the original `SwiGLUFFNFused`).
        use_swiglu_ffn: SwiGLU MLP (ViT-g) instead of GELU.
    """

    name: str
    hub_id: str
    registers_hub_id: str
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_ratio: int
    use_swiglu_ffn: bool


VIT_SHAPES: dict[str, VitShape] = {
    "s": VitShape("ViT-S/14", "facebook/dinov2-small", "facebook/dinov2-with-registers-small", 384, 12, 6, 4, False),
    "b": VitShape("ViT-B/14", "facebook/dinov2-base", "facebook/dinov2-with-registers-base", 768, 12, 12, 4, False),
    "l": VitShape("ViT-L/14", "facebook/dinov2-large", "facebook/dinov2-with-registers-large", 1024, 24, 16, 4, False),
    "g": VitShape("ViT-g/14", "facebook/dinov2-giant", "facebook/dinov2-with-registers-giant", 1536, 40, 24, 4, True),
}

# A shape small enough for `--quick` runs and tests: a few seconds per benchmark on two CPU cores.
TINY_SHAPE = VitShape("tiny", "-", "-", 64, 4, 2, 4, False)


def get_shape(size: str) -> VitShape:
    """Return the shape named `size`: "s", "b", "l", "g" or "tiny"."""
    if size == "tiny":
        return TINY_SHAPE
    if size not in VIT_SHAPES:
        raise ValueError(f"Unknown model size {size!r}; expected one of {[*VIT_SHAPES, 'tiny']}.")
    return VIT_SHAPES[size]


def dinov2_config(
    shape: VitShape, *, registers: bool = False, num_layers: int | None = None, image_size: int = 518
) -> Dinov2Config | Dinov2WithRegistersConfig:
    """Return the transformers config of `shape` as the Hub checkpoints define it (optionally with 4 registers, or
    truncated to `num_layers` blocks). Attention is SDPA, the transformers default."""
    common = dict(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers if num_layers is None else num_layers,
        num_attention_heads=shape.num_heads,
        mlp_ratio=shape.mlp_ratio,
        use_swiglu_ffn=shape.use_swiglu_ffn,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=NUM_REGISTER_TOKENS, **common)
    return Dinov2Config(**common)


def mlp_hidden_size(config: Dinov2Config) -> int:
    """Return the MLP hidden width transformers builds for `config` (SwiGLU: two thirds, rounded up to 8)."""
    hidden = int(config.hidden_size * config.mlp_ratio)
    if config.use_swiglu_ffn:
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden


def random_dinov2(
    shape: VitShape,
    *,
    seed: int = 0,
    registers: bool = False,
    num_layers: int | None = None,
    device: torch.device | str = "cpu",
) -> Dinov2Model | Dinov2WithRegistersModel:
    """Return a randomly initialised float32 DINOv2 of `shape` on `device`, in eval mode, with random layer scales.

    Layer scales are drawn in [0.2, 1.5] (not the constant 1.0 of a fresh model) so that the network is not a plain
    stack of identical-scale residuals; timing does not depend on the values.
    """
    torch.manual_seed(seed)
    config = dinov2_config(shape, registers=registers, num_layers=num_layers)
    model_class = Dinov2WithRegistersModel if registers else Dinov2Model
    model = model_class(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lambda1"):
                parameter.uniform_(0.2, 1.5)
    return model.to(device).eval()


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--threads`: torch's intra-op CPU threads (default: torch's own choice, one per core)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; 1 gives steadier numbers on a machine shared with other jobs",
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads when `threads` is given."""
    if threads is not None:
        torch.set_num_threads(threads)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that wall-clock times cover the computation."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock times of repeated calls, in seconds. `median_s` is the number to quote."""

    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    warmup: int
    repeats: int
    times_s: list[float]


def summarize_times(times: Sequence[float], warmup: int = 0) -> Timing:
    """Return the `Timing` of wall-clock `times` (seconds), recording how many untimed warm-up calls preceded them."""
    if not times:
        raise ValueError("No times to summarize.")
    return Timing(
        median_s=statistics.median(times),
        mean_s=statistics.fmean(times),
        min_s=min(times),
        max_s=max(times),
        warmup=warmup,
        repeats=len(times),
        times_s=list(times),
    )


def timed_call(function: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float]:
    """Return what one call of `function` returns and its wall-clock seconds (bracketed by device synchronizations
    on CUDA)."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def time_once(function: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Return the wall-clock seconds of one call of `function` (bracketed by device synchronizations on CUDA)."""
    return timed_call(function, device)[1]


def time_callable(
    function: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device | str = "cpu"
) -> Timing:
    """Call `function` `warmup` times untimed, then `repeats` times timed with `time.perf_counter`.

    Returns the `Timing` of the timed calls; on CUDA each call is bracketed by device synchronizations.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        function()
    return summarize_times([time_once(function, device) for _ in range(repeats)], warmup)


def time_interleaved(
    functions: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, device: torch.device | str = "cpu"
) -> dict[str, Timing]:
    """Time several functions round by round (each called once per round, in turn), after `warmup` untimed calls of
    each, and return the `Timing` of each.

    Interleaving spreads slow drifts of the machine (other processes, clock changes) evenly over the functions, so
    their ratios stay fair on a shared machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(time_once(function, device))
    return {name: summarize_times(values, warmup) for name, values in times.items()}


def _proc_status_bytes(field: str) -> int | None:
    """Return a `kB` field of /proc/self/status (e.g. "VmRSS", "VmHWM") in bytes, or None where it is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    """Return the process's resident set size now, in bytes (Linux), or None where it cannot be read."""
    return _proc_status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: write 5 to /proc/self/clear_refs).

    Returns whether it worked; where it did not, `peak_rss_bytes` is the peak since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Return the peak resident set size in bytes: VmHWM (resettable) where readable, else `ru_maxrss`."""
    high_water_mark = _proc_status_bytes("VmHWM")
    if high_water_mark is not None:
        return high_water_mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring the peak memory of the code it wraps.

    On CUDA: `torch.cuda.max_memory_allocated` after resetting the peak counter, with `baseline_bytes` the memory
    allocated on entry. On CPU: the peak RSS (`VmHWM`, reset on entry where the kernel allows it) with
    `baseline_bytes` the RSS on entry. `delta_bytes = peak_bytes - baseline_bytes` is what the wrapped code added.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.peak_reset = True

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_reset = reset_peak_rss()
            self.baseline_bytes = current_rss_bytes() or 0
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = peak_rss_bytes()

    @property
    def delta_bytes(self) -> int:
        """Peak minus the baseline on entry, in bytes."""
        return self.peak_bytes - self.baseline_bytes

    def as_dict(self) -> dict[str, Any]:
        """Return the measurement as a JSON-ready dict (bytes, and what kind of memory was measured)."""
        kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        return {
            "kind": kind,
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "delta_bytes": self.delta_bytes,
            "peak_counter_reset": self.peak_reset,
        }


def _cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, falling back to `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Return what a benchmark result depends on: CPU, cores, torch threads, library versions, GPU, date (UTC)."""
    import peft
    import transformers

    description: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        description["gpu_name"] = properties.name
        description["gpu_memory_bytes"] = properties.total_memory
        description["cuda"] = torch.version.cuda
    return description


def to_jsonable(value: Any) -> Any:
    """Return `value` with dataclasses, tuples, paths and torch dtypes/devices turned into JSON types."""
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON to `path` (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a Markdown table; floats are written with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(cell(value) for value in row) + " |" for row in rows)
    return "\n".join(lines)


def mebibytes(num_bytes: float) -> float:
    """Return `num_bytes` in MiB."""
    return num_bytes / 2**20


def step_from_zero_shifts(
    model: torch.nn.Module,
    defect_layer: int,
    training: TrainingArguments,
    pixel_values: torch.Tensor,
    checkpoint_dir: Path,
    label: str,
    device: torch.device | str = "cpu",
) -> Callable[[], None]:
    """Return a function running one `SinderTrainer.training_step` on `pixel_values`, for timing.

    `model` (a planted-defect model) gets the adapter of `training`'s recipe on the gradient window of its defect
    layer, as a repair run has it, and is moved to `device` (the trainer's accelerator runs there). Every call starts
    from zero shifts and an empty optimizer state, so that each timed step finds the planted defect and does the same
    work; a call that finds no defect raises.
    """
    directions = compute_directions(model)
    window = list(gradient_window(defect_layer, training.limit_layers))
    peft_model = build_sinder_model(model, window, shift=training.shift, fuse_gated_mlp=training.fuse_gated_mlp).to(
        device
    )
    accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
    trainer = SinderTrainer(peft_model, directions, training, accelerator, checkpoint_dir)

    def run() -> None:
        with torch.no_grad():
            for parameter in trainer.parameters:
                parameter.zero_()
        trainer.optimizer.state.clear()
        result = trainer.training_step(pixel_values)
        if result["defective"] != 1:
            raise AssertionError(f"{label}: the planted defect was not found ({result})")

    return run
