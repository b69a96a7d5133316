"""Time of the timm <-> transformers conversion of a large DINOv2, against the repair it sits around.

Builds a randomly initialised timm `--architecture` (default `vit_giant_patch14_dinov2`, ViT-g/14, 1.1 B parameters)
at `--image-size`, then times, `--rounds` times each: `timm_to_transformers` (the way in of `--model timm:...`) and
`transformers_to_timm` into the timm model (the way out, before `save_timm_model`). Model creation and file I/O are
not included: a repair loads its model from disk either way. The goal (issue: timm and OpenCLIP models) is that
converting both ways takes at most 5 % of a 100-step repair at 518 px; `--step-seconds` is the measured seconds of
one repair step of the same model on the same machine (docs/performance.md: 38.66 s for ViT-g at 518 px on the CPU).

Needs timm (`pip install "sinder-peft[timm]"`).

Usage:
    python benchmarks/bench_conversion.py --threads 2 --output results/conversion.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import add_threads_argument, apply_threads, format_table, machine_description, write_json

from sinder_peft.models.timm.conversion import timm_to_transformers, transformers_to_timm
from sinder_peft.models.timm.loading import require_timm

GOAL_SHARE = 0.05
"""Converting both ways may take at most this share of a 100-step repair."""
REPAIR_STEPS = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="vit_giant_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=38.66, help="one repair step of this model, seconds")
    parser.add_argument("--output", default=None)
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    timm = require_timm()
    started = time.perf_counter()
    native = timm.create_model(args.architecture, pretrained=False, img_size=args.image_size).eval()
    build_seconds = time.perf_counter() - started
    parameters = sum(parameter.numel() for parameter in native.parameters())
    inward, outward = [], []
    converted: Any = None
    for _ in range(args.rounds):
        started = time.perf_counter()
        converted = timm_to_transformers(native)
        inward.append(time.perf_counter() - started)
        started = time.perf_counter()
        transformers_to_timm(converted, native)
        outward.append(time.perf_counter() - started)
    with torch.no_grad():  # the conversion is the real one: the two models agree
        pixels = torch.randn(1, 3, args.image_size, args.image_size)
        difference = (converted(pixel_values=pixels).last_hidden_state - native.forward_features(pixels)).abs().max()
    both = min(inward) + min(outward)
    repair_seconds = REPAIR_STEPS * args.step_seconds
    payload = {
        "architecture": args.architecture,
        "parameters": parameters,
        "image_size": args.image_size,
        "build_timm_model_seconds": build_seconds,
        "timm_to_transformers_seconds": inward,
        "transformers_to_timm_seconds": outward,
        "both_ways_best_seconds": both,
        "repair_seconds_100_steps": repair_seconds,
        "share_of_repair": both / repair_seconds,
        "goal_share": GOAL_SHARE,
        "max_abs_feature_difference": float(difference),
        "machine": machine_description(),
    }
    print(
        format_table(
            ["model", "parameters", "timm -> transformers (s)", "transformers -> timm (s)", "share of 100 steps"],
            [
                [
                    args.architecture,
                    f"{parameters:,}",
                    f"{min(inward):.2f}",
                    f"{min(outward):.2f}",
                    f"{100 * both / repair_seconds:.2f} %",
                ]
            ],
        )
    )
    if args.output:
        write_json(args.output, payload)


if __name__ == "__main__":
    main()
