"""Benchmark: closed-form ("exact") vs least-squares ("sampling") linearization of one ViT-g-shaped SwiGLU block.

The reference implementation fits the MLP Jacobian J by least squares on 100,000 Gaussian samples per block;
sinder-peft computes its limit in closed form (Stein's lemma + one-dimensional quadrature). This script times both
on one randomly initialized block with DINOv2 ViT-g's shapes (hidden size 1536, SwiGLU hidden size 4096), and
reports how far apart the two Jacobians and the two one-block defect directions are.

    python benchmarks/bench_directions.py --output bench_directions.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Dinov2Config, Dinov2Model

from sinder_peft.analysis.directions import (
    expected_mlp_jacobian,
    leading_left_singular_vector,
    linearized_attention,
    linearized_mlp,
    sampled_mlp_jacobian,
)
from sinder_peft.tuner.architectures import describe_model, get_blocks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=1536, help="residual width (ViT-g: 1536)")
    parser.add_argument("--num-heads", type=int, default=24, help="attention heads (ViT-g: 24)")
    parser.add_argument("--mlp-ratio", type=int, default=4, help="MLP ratio; SwiGLU keeps 2/3 (ViT-g: 4 -> 4096)")
    parser.add_argument(
        "--init-std", type=float, default=0.05, help="std of the random weights (0.05: MLP rows of norm ≈ 2)"
    )
    parser.add_argument("--bias-std", type=float, default=0.5, help="std of the random biases")
    parser.add_argument("--num-samples", type=int, default=100_000, help="samples of the least-squares fit")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the exact method (best is reported)")
    parser.add_argument("--sampling-repeats", type=int, default=1, help="timed runs of the sampling method")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: unchanged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON to this file")
    return parser.parse_args()


def build_block(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """One DINOv2 SwiGLU block with N(0, init_std²) weights and N(0, bias_std²) biases, and its description.

    With init_std = 0.05 the MLP input rows have norm ≈ 0.05·√1536 ≈ 2, so the SwiGLU units work in their
    nonlinear range, as in a trained model (DINOv2's own initialization, std 0.02 and zero biases, leaves them
    almost linear).
    """
    torch.manual_seed(args.seed)
    config = Dinov2Config(
        hidden_size=args.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio,
        use_swiglu_ffn=True,
        image_size=14,
        patch_size=14,
        initializer_range=args.init_std,
    )
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                parameter.normal_(0.0, args.bias_std)
    model = model.to(args.device)
    return get_blocks(model)[0], describe_model(model)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(function: Callable[[], torch.Tensor], repeats: int, device: str) -> tuple[float, torch.Tensor]:
    """Run `function` `repeats` times; return the fastest wall time in seconds and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    block, description = build_block(args)
    with torch.no_grad():
        attention_time, attention = best_time(lambda: linearized_attention(block, description), 1, args.device)

        def direction(jacobian: torch.Tensor) -> torch.Tensor:
            return leading_left_singular_vector(linearized_mlp(block, description, jacobian) @ attention)

        exact_jacobian_time, exact_jacobian = best_time(
            lambda: expected_mlp_jacobian(block, description), args.repeats, args.device
        )
        exact_total_time, exact_direction = best_time(
            lambda: direction(expected_mlp_jacobian(block, description)), args.repeats, args.device
        )

        def sampled() -> torch.Tensor:
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
            return sampled_mlp_jacobian(block, description, num_samples=args.num_samples, generator=generator)

        sampling_jacobian_time, sampled_jacobian = best_time(sampled, args.sampling_repeats, args.device)
        rest_time, sampled_direction = best_time(lambda: direction(sampled_jacobian), 1, args.device)

    relative_error = float((sampled_jacobian - exact_jacobian).norm() / exact_jacobian.norm())
    cosine = abs(float(exact_direction @ sampled_direction))
    sampling_total_time = sampling_jacobian_time + rest_time
    results = {
        "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "hidden_size": args.hidden_size,
        "mlp_hidden_size": int(exact_jacobian.shape[0]),
        "num_samples": args.num_samples,
        "attention_linearization_s": attention_time,
        "exact_jacobian_s": exact_jacobian_time,
        "sampling_jacobian_s": sampling_jacobian_time,
        "exact_block_direction_s": exact_total_time + attention_time,
        "sampling_block_direction_s": sampling_total_time + attention_time,
        "jacobian_time_ratio": exact_jacobian_time / sampling_jacobian_time,
        "block_direction_time_ratio": (exact_total_time + attention_time) / (sampling_total_time + attention_time),
        "jacobian_relative_frobenius_difference": relative_error,
        "direction_abs_cos": cosine,
    }
    rows = [
        ("J (MLP Jacobian) only", exact_jacobian_time, sampling_jacobian_time),
        (
            "one-block direction (J + B + SVD)",
            results["exact_block_direction_s"],
            results["sampling_block_direction_s"],
        ),
    ]
    print(
        f"One ViT-g-shaped SwiGLU block: hidden {args.hidden_size}, SwiGLU hidden {exact_jacobian.shape[0]}, "
        f"{args.num_samples:,} samples, device {results['device']}"
    )
    print(f"{'':36} {'exact [s]':>10} {'sampling [s]':>13} {'exact/sampling':>15}")
    for name, exact_seconds, sampling_seconds in rows:
        print(f"{name:36} {exact_seconds:10.3f} {sampling_seconds:13.3f} {exact_seconds / sampling_seconds:15.4f}")
    print(f"relative Frobenius difference of J (sampling vs exact): {relative_error:.3e}")
    print(f"|cos| between the one-block directions: {cosine:.6f}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
