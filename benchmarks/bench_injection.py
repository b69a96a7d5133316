"""Cost of building the adapter: the SVD of each targeted projection of one DINOv2 block.

For every projection the adapter targets (`v_proj`, `o_proj` and the MLP projections), with a random weight of the
model's shape, three ways of factoring it are timed:

* `adapter`: creating `sinder_peft.tuner.layer.Linear` on it, i.e. what injection does: a float64 SVD, through the
  transpose for a wide weight (fewer rows than columns);
* `float64, as stored`: `torch.linalg.svd` of the float64 weight in its stored orientation (the same SVD without the
  transpose);
* `float32`: `torch.linalg.svd` of the float32 weight, as the original SINDER code does (it also factors query and
  key, which the adapter leaves alone; they have `v_proj`'s shape).

The adapter's factors are checked: `U diag(S) V^T` must rebuild the weight to float32 precision (the factors are
stored in float32). Per block and for a gradient window of `--window-blocks` blocks, the totals are printed.

Usage:
    python benchmarks/bench_injection.py --threads 1 --model-size g --output results/injection_vitg.json
    python benchmarks/bench_injection.py --quick --output /tmp/injection.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from common import (
    add_threads_argument,
    apply_threads,
    dinov2_config,
    format_table,
    get_shape,
    machine_description,
    synchronize,
    time_callable,
    write_json,
)
from torch import nn
from transformers import Dinov2Model

from sinder_peft import SinderConfig
from sinder_peft.tuner.architectures import describe_config
from sinder_peft.tuner.layer import Linear


def projection_shapes(size: str) -> dict[str, tuple[int, int]]:
    """Return the weight shape `(out, in)` of every projection the adapter targets in one block of `size`."""
    config = dinov2_config(get_shape(size), num_layers=1)
    with torch.device("meta"):
        block = Dinov2Model(config).encoder.layer[0]
    block_description = describe_config(config).block
    targets = (*block_description.attention_targets, *block_description.mlp_targets)
    return {path: tuple(block.get_submodule(path).weight.shape) for path in targets}


def measure_projection(shape: tuple[int, int], args: argparse.Namespace) -> dict[str, Any]:
    """Time the three factorizations of a random weight of `shape` and check the adapter's reconstruction."""
    generator = torch.Generator().manual_seed(args.seed)
    linear = nn.Linear(shape[1], shape[0]).to(args.device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(shape, generator=generator) * 0.02)
    weight = linear.weight.detach()
    config = SinderConfig()
    holder: dict[str, Linear] = {}

    def build_adapter() -> None:
        holder["layer"] = Linear(linear, "default", config)

    timings = {
        "adapter": time_callable(build_adapter, warmup=0, repeats=args.repeats, device=args.device),
        "float64_as_stored": time_callable(
            lambda: torch.linalg.svd(weight.double(), full_matrices=False),
            warmup=0,
            repeats=args.repeats,
            device=args.device,
        ),
        "float32": time_callable(
            lambda: torch.linalg.svd(weight, full_matrices=False), warmup=0, repeats=args.repeats, device=args.device
        ),
    }
    layer = holder["layer"]
    rebuilt = (layer.sinder_u.double() * layer.sinder_s.double()) @ layer.sinder_vh.double()
    relative_error = float((rebuilt - weight.double()).abs().max() / weight.double().abs().max())
    return {"shape": shape, "timings": timings, "reconstruction_relative_error": relative_error}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="g", help="s, b, l, g (or tiny); default ViT-g")
    parser.add_argument("--window-blocks", type=int, default=10, help="blocks adapted in a repair run (the window)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per factorization")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat (for tests)")
    parser.add_argument("--output", default="injection.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.model_size, args.repeats = "tiny", 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the factorizations of one block's projections, print the table, write the JSON and return it."""
    args = parse_args(argv)
    apply_threads(args.threads)
    synchronize(args.device)
    projections = {path: measure_projection(shape, args) for path, shape in projection_shapes(args.model_size).items()}
    methods = ("adapter", "float64_as_stored", "float32")
    per_block = {method: sum(p["timings"][method].median_s for p in projections.values()) for method in methods}
    payload = {
        "benchmark": "injection",
        "args": vars(args),
        "machine": machine_description(args.device),
        "model": get_shape(args.model_size).name,
        "projections": projections,
        "per_block_s": per_block,
        "window_s": {method: seconds * args.window_blocks for method, seconds in per_block.items()},
    }
    print(f"## Building the adapter: SVD of each targeted projection, {payload['model']}, {args.device}\n")
    rows = [
        [
            path,
            f"{result['shape'][0]} x {result['shape'][1]}",
            *(f"{result['timings'][method].median_s:.3f}" for method in methods),
            f"{result['reconstruction_relative_error']:.1e}",
        ]
        for path, result in projections.items()
    ]
    rows.append(["one block", "", *(f"{per_block[method]:.2f}" for method in methods), ""])
    rows.append(
        [f"{args.window_blocks} blocks", "", *(f"{payload['window_s'][method]:.1f}" for method in methods), ""]
    )
    headers = [
        "projection",
        "weight (out x in)",
        "adapter (s)",
        "float64, as stored (s)",
        "float32 (s)",
        "rebuild error",
    ]
    print(format_table(headers, rows) + "\n")
    write_json(args.output, payload)
    print(f"Wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
