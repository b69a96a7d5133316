"""Size of a SINDER adapter for each DINOv2 size, computed from the model shapes, and checked against a saved one.

A SINDER adapter stores, per targeted linear layer (`v_proj`, `o_proj` and every MLP projection: `fc1`, `fc2`, or
`gate_proj`, `up_proj`, `down_proj` for ViT-g), one shift per singular value (`min(in, out)` float32 values) and a
spectrum fingerprint (`FINGERPRINT_SIZE` = 6 float32 values). A fused gated MLP (`SinderConfig(fuse_gated_mlp=True)`,
what both recipes use) is one target: the stacked `[W_gate; W_up]`, `min(2h, C)` shifts and one fingerprint, instead
of `gate_proj` and `up_proj` with theirs; the "fused" columns give that case (the same as split for GELU models).
The shapes come from the Hub configs of
facebook/dinov2-{small,base,large,giant} (the with-registers checkpoints have the same linear layers; their
parameter count adds 4 register tokens); the models are built on the meta device, so nothing is downloaded or
allocated.

Two cases: every layer adapted (`SinderConfig()`), and the layers a repair run adapts: the gradient windows of the
defective layers it meets, i.e. the `--limit-layers` blocks ending at each, from `max(0, l - limit + 1)` to `l`
when every image's defect is at layer `l` (the defects are input-agnostic). `l` is not known before a run; it is
assumed to be `--earliest-defective-fraction` of the depth (rounded down), and the per-layer size is printed so that
any other assumption (or a run whose defects move deeper, adapting more windows) is one multiplication.

Finally adapters are saved for a randomly initialised ViT-S-shaped model (every layer, then the last half of the
layers, then every layer of its SwiGLU variant with fused gated MLPs) and each `adapter_model.safetensors` is
compared with the formula: the tensor bytes must match exactly; the rest is the safetensors header.

Usage:
    python benchmarks/bench_adapter_size.py --output results/adapter_size.json
    python benchmarks/bench_adapter_size.py --quick --output /tmp/size.json
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    VIT_SHAPES,
    add_threads_argument,
    apply_threads,
    dinov2_config,
    format_table,
    get_shape,
    machine_description,
    mebibytes,
    random_dinov2,
    write_json,
)
from peft import get_peft_model
from safetensors import safe_open
from transformers import Dinov2Model, Dinov2WithRegistersModel

from sinder_peft import SinderConfig
from sinder_peft.training.window_loss import gradient_window
from sinder_peft.tuner.architectures import describe_config
from sinder_peft.tuner.layer import FINGERPRINT_SIZE

FLOAT32_BYTES = 4


def adapter_layout(config: Any, fuse_gated_mlp: bool = False) -> dict[str, Any]:
    """Return the adapter's per-layer layout for `config`: targeted module paths with their shapes (a fused gated
    MLP's gate and up projections as one target `<gate>+<up>` of the stacked shape), the shift entries and
    fingerprint entries of one block, and the model's parameter count (built on the meta device)."""
    model_class = Dinov2WithRegistersModel if getattr(config, "num_register_tokens", 0) else Dinov2Model
    with torch.device("meta"):
        model = model_class(config)
    block_description = describe_config(config).block
    targets = (*block_description.attention_targets, *block_description.mlp_targets)
    block = model.encoder.layer[0]
    shapes = {path: tuple(block.get_submodule(path).weight.shape) for path in targets}
    if fuse_gated_mlp and block_description.mlp.kind == "gated":
        gate, up = (f"{block_description.mlp_prefix}.{name}" for name in block_description.mlp.input_projections)
        (gate_rows, columns), (up_rows, _) = shapes.pop(gate), shapes.pop(up)
        shapes = {f"{gate}+{up.rsplit('.', 1)[-1]}": (gate_rows + up_rows, columns), **shapes}
    return {
        "targets": shapes,
        "delta_entries_per_block": sum(min(shape) for shape in shapes.values()),
        "fingerprint_entries_per_block": FINGERPRINT_SIZE * len(shapes),
        "num_layers": config.num_hidden_layers,
        "model_parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def adapter_bytes(layout: dict[str, Any], adapted_layers: int) -> dict[str, int]:
    """Return the entries and float32 bytes of the shifts and fingerprints when `adapted_layers` blocks are adapted."""
    delta_entries = layout["delta_entries_per_block"] * adapted_layers
    fingerprint_entries = layout["fingerprint_entries_per_block"] * adapted_layers
    return {
        "adapted_layers": adapted_layers,
        "delta_entries": delta_entries,
        "delta_bytes": delta_entries * FLOAT32_BYTES,
        "fingerprint_entries": fingerprint_entries,
        "fingerprint_bytes": fingerprint_entries * FLOAT32_BYTES,
        "tensor_bytes": (delta_entries + fingerprint_entries) * FLOAT32_BYTES,
    }


def assumed_window(num_layers: int, earliest_fraction: float, limit_layers: int) -> tuple[int, int]:
    """First and last block of the gradient window of a defective layer at `floor(earliest_fraction * num_layers)`."""
    window = gradient_window(min(num_layers - 1, int(earliest_fraction * num_layers)), limit_layers)
    return window.start, window.stop - 1


def computed_sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Return, per model size and registers variant, the layout and the adapter size (all layers, window case)."""
    results = []
    for size in args.sizes:
        shape = get_shape(size)
        for registers in (False, True):
            config = dinov2_config(shape, registers=registers)
            layout, fused = adapter_layout(config), adapter_layout(config, fuse_gated_mlp=True)
            start, end = assumed_window(layout["num_layers"], args.earliest_defective_fraction, args.limit_layers)
            results.append(
                {
                    "model": shape.registers_hub_id if registers else shape.hub_id,
                    "shape": shape.name,
                    "registers": registers,
                    "layout": layout,
                    "model_float32_bytes": layout["model_parameters"] * FLOAT32_BYTES,
                    "per_layer": adapter_bytes(layout, 1),
                    "all_layers": adapter_bytes(layout, layout["num_layers"]),
                    "window_start": start,
                    "window_end": end,
                    "window": adapter_bytes(layout, end - start + 1),
                    "fused": {
                        "layout": fused,
                        "per_layer": adapter_bytes(fused, 1),
                        "all_layers": adapter_bytes(fused, fused["num_layers"]),
                        "window": adapter_bytes(fused, end - start + 1),
                    },
                }
            )
    return results


def saved_adapter_check(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Save adapters of a random `args.saved_size` model (every layer, then the last half of the layers through
    `layers_to_transform`, then every layer of its SwiGLU variant with fused gated MLPs) and compare the files with
    `adapter_bytes`.

    Returns per case: the file sizes, the bytes of the stored tensors (read back with safetensors), the formula's
    bytes, the trainable entries of the PEFT model, and whether tensor bytes and formula agree exactly.
    """
    shape = get_shape(args.saved_size)
    checks = []
    for case in ("all_layers", "last_half", "all_layers_swiglu_fused"):
        fused = case == "all_layers_swiglu_fused"
        model = random_dinov2(dataclasses.replace(shape, use_swiglu_ffn=True) if fused else shape, seed=args.seed)
        layout = adapter_layout(model.config, fuse_gated_mlp=fused)
        num_layers = layout["num_layers"]
        layers = None if case != "last_half" else list(range(num_layers // 2, num_layers))
        peft_model = get_peft_model(model, SinderConfig(layers_to_transform=layers, fuse_gated_mlp=fused))
        trainable = sum(parameter.numel() for parameter in peft_model.parameters() if parameter.requires_grad)
        expected = adapter_bytes(layout, num_layers if layers is None else len(layers))
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            weights = Path(folder) / "adapter_model.safetensors"
            with safe_open(weights, framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            tensor_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
            files = {path.name: path.stat().st_size for path in Path(folder).iterdir() if path.is_file()}
        checks.append(
            {
                "model": f"random {shape.name}",
                "case": case,
                "adapted_layers": expected["adapted_layers"],
                "files_bytes": files,
                "safetensors_file_bytes": files["adapter_model.safetensors"],
                "stored_tensors": len(tensors),
                "stored_tensor_bytes": tensor_bytes,
                "formula_tensor_bytes": expected["tensor_bytes"],
                "trainable_entries": trainable,
                "formula_delta_entries": expected["delta_entries"],
                "formula_matches": tensor_bytes == expected["tensor_bytes"] and trainable == expected["delta_entries"],
                "header_bytes": files["adapter_model.safetensors"] - tensor_bytes,
            }
        )
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(VIT_SHAPES), help="model sizes: s b l g")
    parser.add_argument("--limit-layers", type=int, default=10, help="blocks with gradients, ending at the defect")
    parser.add_argument(
        "--earliest-defective-fraction",
        type=float,
        default=0.5,
        help="assumed earliest defective layer, as a fraction of the depth (window case)",
    )
    parser.add_argument("--saved-size", default="s", help="shape of the random model whose adapter is saved")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="only ViT-S and ViT-g, tiny saved model (for tests)")
    parser.add_argument("--output", default="adapter_size.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.saved_size, args.limit_layers = ["s", "g"], "tiny", 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compute the sizes, save and measure real adapters, print the tables, write the JSON and return it."""
    args = parse_args(argv)
    apply_threads(args.threads)
    computed = computed_sizes(args)
    saved = saved_adapter_check(args)
    payload = {
        "benchmark": "adapter_size",
        "args": vars(args),
        "machine": machine_description("cpu"),
        "assumptions": {
            "dtype": "float32 shifts and fingerprints (as saved)",
            "fingerprint_entries_per_layer": FINGERPRINT_SIZE,
            "window": (
                f"layers max(0, l - {args.limit_layers - 1}) .. l, the gradient window of a defective layer "
                f"l = floor({args.earliest_defective_fraction} * depth)"
            ),
        },
        "computed": computed,
        "saved": saved,
    }
    print("## SINDER adapter size per DINOv2 model (float32)\n")
    rows = []
    for result in computed:
        model_bytes = result["model_float32_bytes"]
        window = result["window"]
        rows.append(
            [
                result["model"],
                f"{result['layout']['model_parameters']:,}",
                f"{mebibytes(model_bytes):,.1f}",
                f"{result['per_layer']['delta_entries']:,}",
                f"{result['all_layers']['delta_entries']:,}",
                f"{result['all_layers']['tensor_bytes']:,}",
                f"{result['all_layers']['tensor_bytes'] / model_bytes:.2e}",
                f"{result['window_start']}-{result['window_end']}",
                f"{window['tensor_bytes']:,}",
                f"{result['fused']['all_layers']['tensor_bytes']:,}",
                f"{result['fused']['window']['tensor_bytes']:,}",
            ]
        )
    headers = [
        "model",
        "parameters",
        "model MiB",
        "delta per layer",
        "delta, all layers",
        "adapter bytes, all layers",
        "adapter / model",
        "window layers",
        "adapter bytes, window",
        "fused: all layers",
        "fused: window",
    ]
    print(format_table(headers, rows) + "\n")
    print(
        f"Adapter bytes = 4 x (delta entries + {FINGERPRINT_SIZE} fingerprint values per targeted layer); the "
        f"safetensors file adds a JSON header. Window case: {payload['assumptions']['window']}.\n"
    )
    print("## Saved adapters of a random model: file against formula\n")
    rows = [
        [
            check["model"],
            check["case"],
            check["adapted_layers"],
            f"{check['safetensors_file_bytes']:,}",
            f"{check['stored_tensor_bytes']:,}",
            f"{check['formula_tensor_bytes']:,}",
            f"{check['header_bytes']:,}",
            check["formula_matches"],
        ]
        for check in saved
    ]
    headers = ["model", "case", "layers", "file bytes", "tensor bytes", "formula bytes", "header bytes", "match"]
    print(format_table(headers, rows) + "\n")
    write_json(args.output, payload)
    print(f"Wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
