"""How far sinder-peft's deliberate differences from the official SINDER code move things (docs/method.md §10).

* `--part directions`: |cos|, per layer, between the closed-form defect directions (`method="exact"`, ours) and the
  official code's least-squares fit of the MLP on 100,000 Gaussian samples (`method="sampling"`), on the planted
  models of the parity test (`tests/test_official_parity.py`: GELU and SwiGLU, hidden 96, 6 blocks) and on random
  DINOv2 of the ViT-S and ViT-B shapes (12 blocks).
* `--part rebuild`: the official code replaces every linear layer of every block by its float32 SVD and, at the
  end, writes `U diag(S + eps) V^T` back as the weight, also where `eps` stayed 0 (query, key, blocks outside every
  gradient window). sinder-peft leaves those weights as they are. Measured: the relative change of each rebuilt
  weight (Frobenius and largest entry, over the weight's largest entry) and, with every weight rebuilt, of the
  output patch tokens on demo pictures (relative error and 1 - cosine), for the planted models and ViT-S/ViT-B
  shapes; and the weights of one ViT-g-shaped block (its `[W_gate; W_up]` is 8192 x 1536).
* `--part batch`: `--recipe paper` on the demo at batch 1 (the official code's) and larger batches: steps, images
  seen, the held-out last-layer max/median token norm and the clean-token cosine.

Usage:
    python benchmarks/bench_fidelity.py --threads 1 --output results/fidelity.json
    python benchmarks/bench_fidelity.py --quick --output /tmp/fidelity.json
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    add_threads_argument,
    apply_threads,
    format_table,
    get_shape,
    machine_description,
    random_dinov2,
    write_json,
)
from torch import nn

from sinder_peft.analysis.detection import find_defect_tokens
from sinder_peft.analysis.directions import singular_defect_directions
from sinder_peft.analysis.preservation import clean_token_cosine, clean_token_mask, output_features
from sinder_peft.images.preprocessing import normalize_image
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.synthetic.demo import build_demo_model, generate_demo_image
from sinder_peft.synthetic.random_planting import build_random_planted_dinov2
from sinder_peft.training.arguments import TrainingArguments

PICTURE_SEEDS = range(2000, 2004)
PLANTED = {"planted GELU": (False, 2), "planted SwiGLU": (True, 1)}  # (SwiGLU, seed), as in the parity test


def pictures(seeds: range) -> torch.Tensor:
    """Normalized demo-like pictures of `seeds`, [N, 3, 224, 224]."""
    return torch.stack([normalize_image(generate_demo_image(seed)) for seed in seeds])


def models(sizes: list[str]) -> dict[str, nn.Module]:
    """The planted models of the parity test and random DINOv2 of the `sizes` shapes."""
    built: dict[str, nn.Module] = {
        name: build_random_planted_dinov2(hidden_size=96, num_layers=6, defect_layer=3, swiglu=swiglu, seed=seed).model
        for name, (swiglu, seed) in PLANTED.items()
    }
    for size in sizes:
        built[f"random {get_shape(size).name}"] = random_dinov2(get_shape(size))
    return built


def compare_directions(named_models: dict[str, nn.Module], num_samples: int) -> list[dict[str, Any]]:
    """|cos| per layer between the closed-form directions and the sampled least-squares ones."""
    rows = []
    for name, model in named_models.items():
        exact = singular_defect_directions(model)
        sampled = singular_defect_directions(model, method="sampling", num_samples=num_samples)
        cosines = [abs(float(a.double() @ b.double())) for a, b in zip(exact, sampled, strict=True)]
        rows.append({"model": name, "cosines": cosines, "min_past_first": min(cosines[1:]), "first": cosines[0]})
    return rows


def official_groups(block: nn.Module) -> list[tuple[str, ...]]:
    """The weights of one DINOv2 block as the official code decomposes them: q, k, v (each its own SVD inside the
    fused qkv), the attention output, and the MLP's fc1 and fc2, or its fused [gate; up] and down."""
    attention = [(f"attention.{name}.weight",) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if hasattr(block.mlp, "gate_proj"):
        return [*attention, ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("mlp.down_proj.weight",)]
    return [*attention, ("mlp.fc1.weight",), ("mlp.fc2.weight",)]


def rebuilt_from_float32_svd(weight: torch.Tensor) -> torch.Tensor:
    """`U diag(S) V^T` of a float32 SVD, multiplied in float32: what the official code writes back where eps is 0."""
    left, values, right = torch.linalg.svd(weight.float(), full_matrices=False)
    return left @ torch.diag(values) @ right


def rebuild_every_weight(model: nn.Module) -> tuple[nn.Module, list[dict[str, float]]]:
    """Return a copy of `model` with every block weight rebuilt as the official code does, and per weight group its
    relative change (Frobenius, and largest entry change over the largest entry)."""
    rebuilt = copy.deepcopy(model)
    changes = []
    for block in rebuilt.encoder.layer:
        for names in official_groups(block):
            parameters = [block.get_parameter(name) for name in names]
            stacked = torch.cat([parameter.detach() for parameter in parameters])
            new = rebuilt_from_float32_svd(stacked)
            difference = (new.double() - stacked.double()).abs()
            changes.append(
                {
                    "weight": "+".join(name.rsplit(".", 2)[-2] for name in names),
                    "frobenius": float(difference.norm() / stacked.double().norm()),
                    "largest_entry": float(difference.max() / stacked.double().abs().max()),
                }
            )
            with torch.no_grad():
                for parameter, part in zip(parameters, new.split([p.shape[0] for p in parameters]), strict=True):
                    parameter.copy_(part)
    return rebuilt, changes


def measure_rebuild(named_models: dict[str, nn.Module], giant_blocks: int) -> list[dict[str, Any]]:
    """The official rebuild's change of every weight and of the output patch tokens."""
    pixel_values = pictures(PICTURE_SEEDS)
    rows = []
    for name, model in named_models.items():
        rebuilt, changes = rebuild_every_weight(model)
        before = output_features(model, pixel_values).patch_tokens.double()
        after = output_features(rebuilt, pixel_values).patch_tokens.double()
        relative = (after - before).norm(dim=-1) / before.norm(dim=-1)
        cosine = nn.functional.cosine_similarity(after, before, dim=-1)
        rows.append(
            {
                "model": name,
                "weights": changes,
                "max_frobenius": max(change["frobenius"] for change in changes),
                "max_largest_entry": max(change["largest_entry"] for change in changes),
                "tokens_relative_mean": float(relative.mean()),
                "tokens_relative_max": float(relative.max()),
                "tokens_one_minus_cosine_max": float((1 - cosine).max()),
            }
        )
    if giant_blocks:
        giant = random_dinov2(get_shape("g"), num_layers=giant_blocks)
        _, changes = rebuild_every_weight(giant)
        rows.append(
            {
                "model": f"random ViT-g/14, {giant_blocks} block(s)",
                "weights": changes,
                "max_frobenius": max(change["frobenius"] for change in changes),
                "max_largest_entry": max(change["largest_entry"] for change in changes),
            }
        )
    return rows


def measure_batches(batch_sizes: list[int], scratch: Path) -> list[dict[str, Any]]:
    """`--recipe paper` on the demo at each batch size, judged on held-out pictures."""
    held_out = pictures(PICTURE_SEEDS)
    original = build_demo_model()
    before = find_defect_tokens(original, held_out)
    before_features = output_features(original, held_out)
    clean = clean_token_mask(before.token_norms[:, -1])
    rows = []
    for batch_size in batch_sizes:
        output_dir = scratch / f"batch-{batch_size}"
        result = repair(
            RepairArguments(model="demo", output_dir=str(output_dir), overwrite=True),
            TrainingArguments(recipe="paper", directions="weights", batch_size=batch_size),
        )
        repaired = type(original).from_pretrained(output_dir / "model").eval()
        after = find_defect_tokens(repaired, held_out)
        rows.append(
            {
                "batch_size": batch_size,
                "steps": result.state.step,
                "images_seen": result.state.images_seen,
                "ratio_before": float(before.max_median_norm_ratio[:, -1].mean()),
                "ratio_after": float(after.max_median_norm_ratio[:, -1].mean()),
                "clean_cosine": clean_token_cosine(before_features, output_features(repaired, held_out), clean),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("directions", "rebuild", "batch", "all"), default="all")
    parser.add_argument("--sizes", nargs="+", default=["s", "b"], help="random DINOv2 shapes besides the planted")
    parser.add_argument("--num-samples", type=int, default=100_000, help="samples of the least-squares fit")
    parser.add_argument("--giant-blocks", type=int, default=1, help="ViT-g-shaped blocks whose weights are rebuilt")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="the planted models only, fewer samples, batch 1 and 2")
    parser.add_argument("--output", default=None)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.num_samples, args.giant_blocks, args.batch_sizes = [], 20_000, 0, [1, 2]
    apply_threads(args.threads)
    payload: dict[str, Any] = {"benchmark": "fidelity", "machine": machine_description(), "arguments": vars(args)}
    named_models = models(args.sizes) if args.part in ("directions", "rebuild", "all") else {}
    if args.part in ("directions", "all"):
        payload["directions"] = compare_directions(named_models, args.num_samples)
        rows = [
            [entry["model"], f"{entry['first']:.4f}", f"{entry['min_past_first']:.4f}"]
            for entry in payload["directions"]
        ]
        print(format_table(["model", "|cos| layer 0", "min |cos| past layer 0"], rows) + "\n")
    if args.part in ("rebuild", "all"):
        payload["rebuild"] = measure_rebuild(named_models, args.giant_blocks)
        rows = [
            [
                entry["model"],
                f"{entry['max_frobenius']:.1e}",
                f"{entry['max_largest_entry']:.1e}",
                f"{entry['tokens_relative_mean']:.1e}" if "tokens_relative_mean" in entry else "-",
                f"{entry['tokens_relative_max']:.1e}" if "tokens_relative_max" in entry else "-",
                f"{entry['tokens_one_minus_cosine_max']:.1e}" if "tokens_one_minus_cosine_max" in entry else "-",
            ]
            for entry in payload["rebuild"]
        ]
        headers = ["model", "weight, Frobenius", "weight, entry", "tokens, mean", "tokens, max", "1 - cos, max"]
        print(format_table(headers, rows) + "\n")
    if args.part in ("batch", "all"):
        with tempfile.TemporaryDirectory(prefix="sinder-bench-fidelity-") as scratch:
            payload["batch"] = measure_batches(args.batch_sizes, Path(scratch))
        rows = [
            [
                entry["batch_size"],
                entry["steps"],
                entry["images_seen"],
                f"{entry['ratio_before']:.1f}",
                f"{entry['ratio_after']:.2f}",
                f"{entry['clean_cosine']:.4f}",
            ]
            for entry in payload["batch"]
        ]
        headers = ["batch", "steps", "images seen", "ratio before", "ratio after", "clean cos"]
        print(format_table(headers, rows) + "\n")
    if args.output:
        write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
