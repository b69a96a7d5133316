"""The two repair recipes, `paper` and `preserve`: what one step costs, and what whole repairs give.

* `--part step`: one `SinderTrainer.training_step` on the same ViT-B-shaped planted DINOv2 (random weights at
  initializer range 0.02, the defect in the middle block) and the same trigger picture, timed interleaved round by
  round, at each `--resolution` (issue goal: preserve <= 1.1x paper at 224 and 518 px). Every timed step starts from
  zero shifts. Three variants: `paper` and `preserve` as they are, and `paper+gap`, the paper's step with the
  preserve recipe's norm gap. The cost of a step depends mostly on the layer the defect test stops at (it runs the
  blocks up to it, the last ten with autograd): on a random model the paper's test often stops at a shallow layer
  where chance cosine outliers pass for a defect, the norm gap at the planted one. `preserve / paper+gap` compares
  the two recipes' steps at the same defective layer: the cost of the log-scale shift and of the norm test.
* `--part ablation`: whole repairs (`repair()`, 224 px, `--max-steps`) of the harder planted models of
  `synthetic.random_planting.build_random_planted_dinov2` (seeds x 6/8 blocks x GELU/SwiGLU) with each recipe,
  judged on held-out pictures: last-layer max/median token norm before and after, mean cosine to the original of the
  clean tokens (norm below 4x the median before) and of the CLS token, steps and seconds.
* `--part gated`: the `preserve` recipe with a gated MLP's gate and up projections split (two SVDs, two shifts) and
  fused (one SVD of `[W_gate; W_up]`, one shift, `--gated-mlp`), on the SwiGLU models of the ablation
  (`--seeds` x `--blocks`) and on SwiGLU sparse-unit models (`build_sparse_unit_dinov2`, `--sparse-seeds`, 8 blocks),
  judged the same way; for a sparse-unit model the clean tokens are compared with the model without the unit.

Usage:
    python benchmarks/bench_recipes.py --threads 1 --part step --output results/recipes_step.json
    python benchmarks/bench_recipes.py --threads 1 --part ablation --output results/recipes_ablation.json
    python benchmarks/bench_recipes.py --threads 1 --part gated --seeds 41 42 45 --output results/recipes_gated.json
    python benchmarks/bench_recipes.py --quick --output /tmp/recipes.json
"""

from __future__ import annotations

import argparse
import tempfile
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

from sinder_peft.analysis.detection import RECIPE_NORM_GAPS, find_defect_tokens
from sinder_peft.analysis.preservation import clean_token_cosine, clean_token_mask, output_features, pooled_cosine
from sinder_peft.images.preprocessing import normalize_image
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.synthetic.demo import generate_demo_image
from sinder_peft.synthetic.random_planting import build_random_planted_dinov2, build_sparse_unit_dinov2
from sinder_peft.training.arguments import TrainingArguments

RECIPES = ("paper", "preserve")
GATED_MLP_FORMS = ("split", "fused")
TRAIN_SEEDS = range(300, 324)
HELD_OUT_SEEDS = range(2000, 2008)


def pictures(seeds: range, size: int = 224) -> torch.Tensor:
    """Normalized demo-like pictures of `seeds` at `size` pixels, [N, 3, size, size]."""
    return torch.stack([normalize_image(generate_demo_image(seed).resize((size, size))) for seed in seeds])


def step_function(
    recipe: str, norm_gap: float | None, args: argparse.Namespace, pixel_values: torch.Tensor, scratch: Path
) -> Any:
    """Return a function running one training step of `recipe` (with `norm_gap`, None for the recipe's) from zero
    shifts on a fresh planted model."""
    planted = build_random_planted_dinov2(seed=0, num_layers=args.num_layers, hidden_size=args.hidden_size)
    training = TrainingArguments(recipe=recipe, norm_gap=norm_gap, save_every=0)
    checkpoints = scratch / f"{recipe}-{norm_gap}"
    return step_from_zero_shifts(planted.model, planted.defect_layer, training, pixel_values, checkpoints, recipe)


STEP_VARIANTS: dict[str, tuple[str, float | None]] = {
    "paper": ("paper", None),
    "paper+gap": ("paper", RECIPE_NORM_GAPS["preserve"]),
    "preserve": ("preserve", None),
}


def measure_steps(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """Time the step variants at every resolution."""
    results = []
    for resolution in args.resolution:
        pixel_values = pictures(range(0, 1), resolution)
        functions = {
            name: step_function(recipe, gap, args, pixel_values, scratch)
            for name, (recipe, gap) in STEP_VARIANTS.items()
        }
        timings = time_interleaved(functions, warmup=args.warmup, repeats=args.repeats)
        medians = {name: timings[name].median_s for name in STEP_VARIANTS}
        results.append(
            {
                "resolution": resolution,
                "median_s": medians,
                "preserve_over_paper": medians["preserve"] / medians["paper"],
                "preserve_over_paper_gap": medians["preserve"] / medians["paper+gap"],
            }
        )
    return results


def training_folder(scratch: Path) -> Path:
    """Write the training pictures (`TRAIN_SEEDS`) into a folder of `scratch` and return it."""
    images = scratch / "train"
    images.mkdir(parents=True, exist_ok=True)
    for seed in TRAIN_SEEDS:
        generate_demo_image(seed).save(images / f"{seed}.png")
    return images


def judged_repair(
    planted_model: torch.nn.Module,
    reference_model: torch.nn.Module,
    training: TrainingArguments,
    images: Path,
    held_out: torch.Tensor,
    run_dir: Path,
) -> dict[str, Any]:
    """Repair `planted_model` (saved into `run_dir`) on `images` with `training` and judge it on `held_out`: the
    last-layer max/median token norm before and after, and the cosine of the clean tokens (below 4x the median norm
    in the planted model) and of the CLS token to `reference_model` (the planted model itself, or the model
    without its sparse unit)."""
    source = run_dir / "source"
    if not source.exists():
        planted_model.save_pretrained(source)
    before = find_defect_tokens(planted_model, held_out)
    reference_features = output_features(reference_model, held_out)
    clean = clean_token_mask(before.token_norms[:, -1])
    output_dir = run_dir / f"{training.recipe}-{training.gated_mlp}"
    result = repair(
        RepairArguments(
            model=str(source), data=str(images), resolution=224, output_dir=str(output_dir), overwrite=True
        ),
        training,
    )
    repaired = type(planted_model).from_pretrained(output_dir / "model").eval() if result.report["repaired"] else None
    after = find_defect_tokens(repaired, held_out) if repaired is not None else before
    after_features = (
        output_features(repaired, held_out) if repaired is not None else output_features(planted_model, held_out)
    )
    return {
        "ratio_before": float(before.max_median_norm_ratio[:, -1].mean()),
        "ratio_after": float(after.max_median_norm_ratio[:, -1].mean()),
        "ratio_after_max": float(after.max_median_norm_ratio[:, -1].max()),
        "clean_cosine": clean_token_cosine(reference_features, after_features, clean),
        "cls_cosine": pooled_cosine(reference_features, after_features),
        "steps": result.state.step,
        "seconds": result.state.seconds,
    }


def run_gated(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """Repair SwiGLU planted models with `preserve`, gate and up projections split and fused, and judge them."""
    images = training_folder(scratch)
    held_out = pictures(HELD_OUT_SEEDS)
    models = [
        (f"swiglu{blocks}-s{seed}", build_random_planted_dinov2(seed=seed, num_layers=blocks, swiglu=True), None)
        for seed in args.seeds
        for blocks in args.blocks
    ]
    models += [
        (
            f"sparse-swiglu8-s{seed}",
            build_sparse_unit_dinov2(seed=seed, swiglu=True),
            build_sparse_unit_dinov2(seed=seed, swiglu=True, with_unit=False).model,
        )
        for seed in args.sparse_seeds
    ]
    rows = []
    for name, planted, reference in models:
        for form in GATED_MLP_FORMS:
            training = TrainingArguments(
                recipe="preserve", gated_mlp=form, max_steps=args.max_steps, stop_window=len(TRAIN_SEEDS)
            )
            numbers = judged_repair(
                planted.model,
                reference if reference is not None else planted.model,
                training,
                images,
                held_out,
                scratch / name,
            )
            rows.append({"model": name, "recipe": "preserve", "gated_mlp": form, **numbers})
    return rows


def run_ablation(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """Repair every planted model with each recipe and judge it on held-out pictures."""
    images = training_folder(scratch)
    held_out = pictures(HELD_OUT_SEEDS)
    rows = []
    for seed in args.seeds:
        for blocks in args.blocks:
            for swiglu in (False, True):
                planted = build_random_planted_dinov2(seed=seed, num_layers=blocks, swiglu=swiglu)
                name = f"{'swiglu' if swiglu else 'gelu'}{blocks}-s{seed}"
                source = scratch / name / "source"
                planted.model.save_pretrained(source)
                before = find_defect_tokens(planted.model, held_out)
                before_features = output_features(planted.model, held_out)
                clean = clean_token_mask(before.token_norms[:, -1])
                for recipe in RECIPES:
                    result = repair(
                        RepairArguments(
                            model=str(source),
                            data=str(images),
                            resolution=224,
                            output_dir=str(scratch / name / recipe),
                            overwrite=True,
                        ),
                        TrainingArguments(recipe=recipe, max_steps=args.max_steps, stop_window=len(TRAIN_SEEDS)),
                    )
                    # a run whose outcome is not_repaired writes no model/: the input is the result
                    written = scratch / name / recipe / "model"
                    repaired = (
                        type(planted.model).from_pretrained(written).eval() if written.is_dir() else planted.model
                    )
                    after = find_defect_tokens(repaired, held_out)
                    after_features = output_features(repaired, held_out)
                    rows.append(
                        {
                            "model": name,
                            "recipe": recipe,
                            "outcome": result.report["outcome"],
                            "ratio_before": float(before.max_median_norm_ratio[:, -1].mean()),
                            "ratio_after": float(after.max_median_norm_ratio[:, -1].mean()),
                            "ratio_after_max": float(after.max_median_norm_ratio[:, -1].max()),
                            "clean_cosine": clean_token_cosine(before_features, after_features, clean),
                            "cls_cosine": pooled_cosine(before_features, after_features),
                            "steps": result.state.step,
                            "seconds": result.state.seconds,
                        }
                    )
    return rows


def repair_row(entry: dict[str, Any], variant: str, *, clean_digits: int) -> list[Any]:
    """Return the printed table row of one repair of `run_ablation` or `run_gated`: the model, its `variant` key's
    value (the recipe, or the gated MLP's form), the ratios, the cosines, the steps and the seconds."""
    return [
        entry["model"],
        entry[variant],
        f"{entry['ratio_before']:.0f}",
        f"{entry['ratio_after']:.2f} (max {entry['ratio_after_max']:.2f})",
        f"{entry['clean_cosine']:.{clean_digits}f}",
        f"{entry['cls_cosine']:.3f}",
        entry["steps"],
        f"{entry['seconds']:.0f}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("step", "ablation", "gated", "both"), default="both")
    parser.add_argument("--resolution", type=int, nargs="+", default=[224, 518])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[41, 42])
    parser.add_argument("--blocks", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--sparse-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one model, two repeats")
    parser.add_argument("--output", default=None)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.hidden_size, args.num_layers, args.repeats, args.warmup = [224], 64, 4, 2, 0
        args.seeds, args.blocks, args.max_steps = [41], [6], 20
    apply_threads(args.threads)
    payload: dict[str, Any] = {"machine": machine_description(), "arguments": vars(args)}
    with tempfile.TemporaryDirectory(prefix="sinder-bench-recipes-") as scratch:
        if args.part in ("step", "both"):
            payload["step"] = measure_steps(args, Path(scratch))
            rows = [
                [entry["resolution"], *(f"{entry['median_s'][name]:.3f}" for name in STEP_VARIANTS)]
                + [f"{entry['preserve_over_paper']:.3f}", f"{entry['preserve_over_paper_gap']:.3f}"]
                for entry in payload["step"]
            ]
            headers = ["px", "paper (s)", "paper+gap (s)", "preserve (s)", "preserve / paper", "preserve / paper+gap"]
            print(format_table(headers, rows) + "\n")
        if args.part in ("ablation", "both"):
            payload["ablation"] = run_ablation(args, Path(scratch))
            rows = [repair_row(entry, "recipe", clean_digits=3) for entry in payload["ablation"]]
            headers = ["model", "recipe", "ratio before", "ratio after", "clean cos", "CLS cos", "steps", "s"]
            print(format_table(headers, rows))
        if args.part == "gated":
            payload["gated"] = run_gated(args, Path(scratch))
            rows = [repair_row(entry, "gated_mlp", clean_digits=4) for entry in payload["gated"]]
            headers = ["model", "gate/up", "ratio before", "ratio after", "clean cos", "CLS cos", "steps", "s"]
            print(format_table(headers, rows))
    if args.output:
        write_json(args.output, payload)


if __name__ == "__main__":
    main()
