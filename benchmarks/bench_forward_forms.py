"""Training-step cost of the exact forms of a SINDER-adapted linear layer, alone and in a ViT block stack.

A linear layer of weight `W = U diag(S) V^T` adapted by SINDER applies `U diag(S + delta) V^T`. Forms compared:

* `factored`: `((x V) * (S + delta)) U^T + b` -- what `sinder_peft.tuner.layer.Linear` does (the module itself is
  used);
* `additive`: `base(x) + ((x V) * delta) U^T`;
* `rebuild`: `W' = U diag(S + delta) V^T` rebuilt in every call with two dense matmuls, as the original SINDER code
  (`SVDLinearAddition`) does, then `x W'^T + b`;
* `merged`: `W' = W + (U * delta) V^T` built in every call, then `x W'^T + b`;
* `plain`: the frozen `nn.Linear` (no adapter): the cost of back-propagating through the layer, a floor.

The step is forward plus backward with respect to `delta` (and to the layer input, as for every layer of a gradient
window but its first). For one layer the input requires grad; for the block stack (every block of a ViT-B, with
`v_proj`, `o_proj`, `fc1`, `fc2` adapted) the input does not, except for `plain`, which has nothing else to
differentiate (its backward pass computes the input gradient through every block). All forms share the same
factors and the same random `delta`; their outputs are compared with a float64 reference (`rebuild` in float64)
and reported as max abs diffs.

Usage:
    python benchmarks/bench_forward_forms.py --output results/forward_forms.json
    python benchmarks/bench_forward_forms.py --quick --output /tmp/forms.json
"""

from __future__ import annotations

import argparse
import copy
import functools
from typing import Any

import torch
from common import (
    add_threads_argument,
    apply_threads,
    dinov2_config,
    format_table,
    get_shape,
    machine_description,
    mlp_hidden_size,
    random_dinov2,
    time_interleaved,
    write_json,
)
from torch import nn
from torch.nn import functional as F

from sinder_peft import SinderConfig
from sinder_peft.tuner.layer import Linear as SinderLinear

FORMS: tuple[str, ...] = ("factored", "additive", "rebuild", "merged", "plain")
TARGETS: tuple[str, ...] = ("attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")


class FormLinear(nn.Module):
    """A linear layer computing `U diag(S + delta) V^T` (plus bias) in one of the non-factored forms.

    `U`, `S`, `V^T`, the base weight and the bias are frozen buffers; `delta` is the only parameter.
    """

    def __init__(
        self, form: str, base: nn.Linear, left: torch.Tensor, singular: torch.Tensor, right_t: torch.Tensor
    ) -> None:
        super().__init__()
        if form not in ("additive", "rebuild", "merged"):
            raise ValueError(f"FormLinear computes the additive, rebuild and merged forms, not {form!r}.")
        self.form = form
        self.register_buffer("weight", base.weight.detach().clone())
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.register_buffer("left", left.detach().clone())
        self.register_buffer("singular", singular.detach().clone())
        self.register_buffer("right_t", right_t.detach().clone())
        self.delta = nn.Parameter(torch.zeros_like(singular))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "additive":
            return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.right_t) * self.delta, self.left)
        if self.form == "rebuild":
            weight = self.left @ torch.diag(self.singular + self.delta) @ self.right_t
        else:
            weight = self.weight + (self.left * self.delta) @ self.right_t
        return F.linear(x, weight, self.bias)


def make_forms(base: nn.Linear, delta: torch.Tensor) -> dict[str, nn.Module]:
    """Return copies of `base` in every form of `FORMS`, adapted with shift `delta` (`base` is left untouched).

    The forms take their factors from one `sinder_peft.tuner.layer.Linear` (float64 SVD rounded to float32), so they
    differ only in how they compute.
    """
    factored = SinderLinear(copy.deepcopy(base).requires_grad_(False), "default", SinderConfig())
    with torch.no_grad():
        factored.sinder_delta["default"].copy_(delta)
    modules: dict[str, nn.Module] = {"factored": factored}
    for form in ("additive", "rebuild", "merged"):
        module = FormLinear(form, base, factored.sinder_u, factored.sinder_s, factored.sinder_vh)
        with torch.no_grad():
            module.delta.copy_(delta)
        modules[form] = module
    modules["plain"] = copy.deepcopy(base).requires_grad_(False)
    return modules


def float64_reference(base: nn.Linear, delta: torch.Tensor) -> FormLinear:
    """Return the float64 `rebuild` form of `base` with shift `delta`, from a float64 SVD: the reference output."""
    base = copy.deepcopy(base).double()
    left, singular, right_t = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    module = FormLinear("rebuild", base, left, singular, right_t)
    with torch.no_grad():
        module.delta.copy_(delta.double())
    return module


def adapt_blocks(blocks: nn.ModuleList, deltas: dict[str, torch.Tensor]) -> dict[str, nn.Sequential]:
    """Return, per form, a frozen copy of `blocks` whose targeted projections are adapted in that form (keys of
    `deltas`: dotted paths like "3.mlp.fc1"), plus the float64 reference stack under "reference"."""
    stacks = {form: copy.deepcopy(blocks).requires_grad_(False) for form in FORMS}
    stacks["reference"] = copy.deepcopy(blocks).requires_grad_(False).double()
    for path, delta in deltas.items():
        parent_path, name = path.rsplit(".", 1)
        base = blocks.get_submodule(path)
        forms = {**make_forms(base, delta), "reference": float64_reference(base, delta)}
        for form, module in forms.items():
            setattr(stacks[form].get_submodule(parent_path), name, module)
    return {form: nn.Sequential(*stack) for form, stack in stacks.items()}


def _train_step(module: nn.Module, leaf: torch.Tensor, grad_output: torch.Tensor) -> None:
    """One training step's worth of compute: drop old gradients, forward, backward of `<output, grad_output>`."""
    for parameter in module.parameters():
        parameter.grad = None
    leaf.grad = None
    module(leaf).backward(grad_output)


def _max_abs_diff(module: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Return the max abs difference between `module(x)` and a float64 `reference`."""
    with torch.no_grad():
        return float((module(x).double() - reference).abs().max())


def bench_single_layers(
    hidden: int, mlp_hidden: int, token_counts: list[int], warmup: int, repeats: int, seed: int
) -> list[dict[str, Any]]:
    """Time every form on the three layer shapes of a ViT block (square, expand, contract) at each token count.

    Returns one record per (layer shape, token count, form): its `Timing` and its max abs difference to float64.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "attn (h->h)": (hidden, hidden),
        "fc1 (h->4h)": (hidden, mlp_hidden),
        "fc2 (4h->h)": (mlp_hidden, hidden),
    }
    results = []
    for layer_name, (in_features, out_features) in shapes.items():
        torch.manual_seed(seed)
        base = nn.Linear(in_features, out_features)
        delta = 0.05 * torch.randn(min(in_features, out_features), generator=generator)
        modules = make_forms(base, delta)
        reference_module = float64_reference(base, delta)
        for tokens in token_counts:
            x = torch.randn(1, tokens, in_features, generator=generator)
            grad_output = torch.randn(1, tokens, out_features, generator=generator)
            with torch.no_grad():
                reference = reference_module(x.double())
            steps = {
                form: functools.partial(_train_step, module, x.clone().requires_grad_(True), grad_output)
                for form, module in modules.items()
            }
            timings = time_interleaved(steps, warmup=warmup, repeats=repeats)
            for form, module in modules.items():
                results.append(
                    {
                        "layer": layer_name,
                        "in_features": in_features,
                        "out_features": out_features,
                        "tokens": tokens,
                        "form": form,
                        "timing": timings[form],
                        "max_abs_diff_vs_float64": None if form == "plain" else _max_abs_diff(module, x, reference),
                        "output_max_abs": float(reference.abs().max()),
                    }
                )
    return results


def bench_block_stack(
    size: str, num_layers: int | None, token_counts: list[int], warmup: int, repeats: int, seed: int
) -> list[dict[str, Any]]:
    """Time every form on a stack of ViT blocks whose `v_proj`, `o_proj`, `fc1`, `fc2` are adapted.

    Returns one record per (token count, form): its `Timing` and its max abs difference to float64.
    """
    model = random_dinov2(get_shape(size), seed=seed, num_layers=num_layers)
    blocks = model.encoder.layer.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    deltas = {
        f"{index}.{target}": 0.05
        * torch.randn(min(blocks[index].get_submodule(target).weight.shape), generator=generator)
        for index in range(len(blocks))
        for target in TARGETS
    }
    hidden = model.config.hidden_size
    inputs = [torch.randn(1, tokens, hidden, generator=generator) for tokens in token_counts]
    grad_outputs = [torch.randn(1, tokens, hidden, generator=generator) for tokens in token_counts]
    stacks = adapt_blocks(blocks, deltas)
    reference_stack = stacks.pop("reference")
    with torch.no_grad():
        references = [reference_stack(x.double()) for x in inputs]
    del reference_stack
    results = []
    for x, grad_output, reference in zip(inputs, grad_outputs, references, strict=True):
        # Nothing of the plain stack trains: its input requires grad so that the backward pass still runs.
        steps = {
            form: functools.partial(_train_step, stack, x.clone().requires_grad_(form == "plain"), grad_output)
            for form, stack in stacks.items()
        }
        timings = time_interleaved(steps, warmup=warmup, repeats=repeats)
        for form, stack in stacks.items():
            results.append(
                {
                    "blocks": len(blocks),
                    "tokens": x.shape[1],
                    "form": form,
                    "timing": timings[form],
                    "max_abs_diff_vs_float64": None if form == "plain" else _max_abs_diff(stack, x, reference),
                    "output_max_abs": float(reference.abs().max()),
                }
            )
    return results


def _relative_rows(results: list[dict[str, Any]], group_keys: tuple[str, ...]) -> list[list[Any]]:
    """Table rows: group, form, median ms, time relative to `factored` of the same group, max abs diff."""
    factored = {
        tuple(result[key] for key in group_keys): result["timing"].median_s
        for result in results
        if result["form"] == "factored"
    }
    rows = []
    for result in results:
        group = tuple(result[key] for key in group_keys)
        diff = result["max_abs_diff_vs_float64"]
        rows.append(
            [
                *group,
                result["form"],
                1000 * result["timing"].median_s,
                result["timing"].median_s / factored[group],
                "-" if diff is None else f"{diff:.2e}",
            ]
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="b", help="model shape: s, b, l, g (or tiny); default ViT-B")
    parser.add_argument("--tokens", type=int, nargs="+", default=[257, 1025], help="tokens per image (257: 224 px)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per single-layer case")
    parser.add_argument("--stack-repeats", type=int, default=3, help="timed steps per block-stack case")
    parser.add_argument("--num-layers", type=int, default=None, help="blocks in the stack (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two timed steps (for tests)")
    parser.add_argument("--output", default="forward_forms.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.tokens, args.num_layers = "tiny", [17, 37], 2
        args.warmup, args.repeats, args.stack_repeats = 1, 2, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables, write the JSON and return the payload."""
    args = parse_args(argv)
    apply_threads(args.threads)
    shape = get_shape(args.size)
    mlp_hidden = mlp_hidden_size(dinov2_config(shape))
    if shape.use_swiglu_ffn:
        raise ValueError("The form benchmark uses GELU blocks (fc1/fc2); pick size s, b or l.")
    single = bench_single_layers(shape.hidden_size, mlp_hidden, args.tokens, args.warmup, args.repeats, args.seed)
    stack = bench_block_stack(args.size, args.num_layers, args.tokens, args.warmup, args.stack_repeats, args.seed)
    payload = {
        "benchmark": "forward_forms",
        "args": vars(args),
        "machine": machine_description("cpu"),
        "model_shape": shape,
        "single_layer": single,
        "block_stack": stack,
    }
    print(f"## One adapted linear layer, {shape.name} shapes, forward + backward (input requires grad)\n")
    headers = ["tokens", "form", "median ms", "x factored", "max |diff| vs fp64"]
    for layer in dict.fromkeys(result["layer"] for result in single):
        print(f"### {layer}\n")
        rows = _relative_rows([result for result in single if result["layer"] == layer], ("tokens",))
        print(format_table(headers, rows) + "\n")
    print(
        f"## {stack[0]['blocks']} {shape.name} blocks, v/o/fc1/fc2 adapted, forward + backward w.r.t. delta "
        "(plain: w.r.t. the input)\n"
    )
    print(format_table(headers, _relative_rows(stack, ("tokens",))) + "\n")
    write_json(args.output, payload)
    print(f"Wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
