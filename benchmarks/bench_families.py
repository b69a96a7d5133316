"""The SINDER training step of every ViT family, relative to that family's plain forward and backward pass.

For each family a planted-defect model of one shape (`--hidden-size`, `--num-layers`, 4 heads' worth of width per
head as `planting` builds them; the defect in the last block, so the gradient window spans `--limit-layers`
blocks) is timed two ways on the same trigger image, interleaved round by round:

* `step`: `SinderTrainer.training_step` with both recipes' adapter (`paper`: additive shifts; `preserve`: log-scale),
  the adapter on the gradient window only, as a repair run has it;
* `plain`: the backbone's forward pass on the image and a backward pass of the sum of its output tokens, every
  weight requiring a gradient (what fine-tuning the model costs).

The issue goal: the step / plain ratio of every family is no more than DINOv2's.

Usage:
    python benchmarks/bench_families.py --threads 1 --output results/families.json
    python benchmarks/bench_families.py --quick --output /tmp/families.json
    python benchmarks/bench_families.py --device cuda --output families_cuda.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from common import (
    add_threads_argument,
    apply_threads,
    format_table,
    machine_description,
    step_from_zero_shifts,
    time_interleaved,
    write_json,
)

from sinder_peft.synthetic.planting import build_planted_model, spot_pixel_values
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.tuner.architectures import describe_model, unwrap_backbone

FAMILIES = ("dinov2", "dinov2_swiglu", "dinov3", "dinov3_gated", "clip_vision", "siglip", "siglip2", "vit", "deit")


def plain_step(model: torch.nn.Module, pixel_values: torch.Tensor) -> Any:
    """Return a function running the backbone's forward pass (`final_tokens`: what its own forward computes, run the
    same way for every family, SigLIP 2's patchifying included) and a backward pass of the sum of its output tokens,
    with every weight requiring a gradient (`model` and `pixel_values` on the same device)."""
    model.requires_grad_(True)
    backbone = unwrap_backbone(model)
    description = describe_model(model)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        description.final_tokens(backbone, pixel_values).float().sum().backward()

    return run


def measure(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time the steps of one family and return their medians and the ratios to the plain pass."""
    layers = args.num_layers
    build = {"hidden_size": args.hidden_size, "num_layers": layers, "defect_layer": layers - 1, "seed": 0}
    pixel_values = None
    functions = {}
    for recipe in ("paper", "preserve"):
        planted = build_planted_model(family, **build)
        if pixel_values is None:
            pixel_values = spot_pixel_values(
                [0], planted.normalization, size=args.resolution, patch=planted.patch_size
            )
        training = TrainingArguments(recipe=recipe, limit_layers=args.limit_layers, save_every=0)
        functions[recipe] = step_from_zero_shifts(
            planted.model,
            planted.defect_layer,
            training,
            pixel_values.to(args.device),
            Path(args.scratch) / recipe,
            family,
            device=args.device,
        )
    plain_model = build_planted_model(family, **build).model.to(args.device)
    functions["plain"] = plain_step(plain_model, pixel_values.to(args.device))
    timings = time_interleaved(functions, warmup=args.warmup, repeats=args.repeats, device=args.device)
    plain = timings["plain"].median_s
    return {
        "family": family,
        "median_s": {name: timing.median_s for name, timing in timings.items()},
        "paper_over_plain": timings["paper"].median_s / plain,
        "preserve_over_plain": timings["preserve"].median_s / plain,
        "preserve_over_paper": timings["preserve"].median_s / timings["paper"].median_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--limit-layers", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scratch", default="/tmp/sinder-bench-families", help="where trainers may checkpoint")
    parser.add_argument("--quick", action="store_true", help="two families, a tiny shape, two repeats")
    parser.add_argument("--output", default=None)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.families, args.hidden_size, args.num_layers, args.limit_layers = ["dinov2", "clip_vision"], 64, 3, 2
        args.warmup, args.repeats = 0, 2
    apply_threads(args.threads)
    results = [measure(family, args) for family in args.families]
    rows = [
        [
            entry["family"],
            f"{entry['median_s']['plain']:.3f}",
            f"{entry['median_s']['paper']:.3f}",
            f"{entry['median_s']['preserve']:.3f}",
            f"{entry['paper_over_plain']:.2f}",
            f"{entry['preserve_over_plain']:.2f}",
            f"{entry['preserve_over_paper']:.2f}",
        ]
        for entry in results
    ]
    headers = ["family", "plain (s)", "paper (s)", "preserve (s)", "paper/plain", "preserve/plain", "preserve/paper"]
    print(format_table(headers, rows))
    if args.output:
        write_json(
            args.output, {"machine": machine_description(args.device), "arguments": vars(args), "results": results}
        )


if __name__ == "__main__":
    main()
