"""Time to "nothing to repair" for a clean model: how long `repair` takes to answer on a model without defect.

Writes a randomly initialised DINOv2 of `--size` (no high-norm token: every patch norm stays near its image's median)
with `save_pretrained`, and folders of `--images` smooth pictures (no bright spots), then times the whole
`sinder_peft.jobs.repair.repair` call on each folder at `--resolution`: loading, listing, the selection sample's pass,
the directions, and the report. The answer should not depend on the folder's size (only the selection images are
read) and the run must end with `stop_reason` "nothing_to_repair", no step and no `model/`.

Usage:
    python benchmarks/bench_clean.py --threads 2 --output results/clean.json
    python benchmarks/bench_clean.py --quick --output /tmp/clean.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    add_threads_argument,
    apply_threads,
    format_table,
    get_shape,
    machine_description,
    random_dinov2,
    write_json,
)
from PIL import Image

from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.training.arguments import TrainingArguments


def smooth_picture(seed: int, size: int) -> Image.Image:
    """Return a smooth RGB picture: two random colours blended by low-frequency waves, no bright spot."""
    rng = np.random.default_rng(seed)
    coordinates = np.linspace(0.0, 1.0, size)
    rows, cols = np.meshgrid(coordinates, coordinates, indexing="ij")
    field = sum(
        np.sin(2 * np.pi * (rng.uniform(0.5, 2.5) * rows + rng.uniform(0.5, 2.5) * cols) + rng.uniform(0, 6.3))
        for _ in range(3)
    )
    blend = (field - field.min()) / (field.max() - field.min() + 1e-12)
    first, second = rng.uniform(0.1, 0.7, size=(2, 3))
    picture = first * (1 - blend[..., None]) + second * blend[..., None]
    return Image.fromarray(np.round(picture * 255).astype(np.uint8), mode="RGB")


def write_folder(folder: Path, count: int, size: int) -> Path:
    """Write `count` smooth JPEG pictures of `size`×`size` pixels into `folder`; return it."""
    folder.mkdir(parents=True)
    for index in range(count):
        smooth_picture(index, size).save(folder / f"{index:05d}.jpg", quality=90)
    return folder


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (see the module docstring) with the command-line `argv`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="b", help="model size: s, b, l, g or tiny")
    parser.add_argument("--images", type=int, nargs="+", default=[18, 1000], help="folder sizes to time")
    parser.add_argument("--resolution", type=int, default=518)
    parser.add_argument("--quick", action="store_true", help="tiny model, 224 px, 4 and 20 images")
    parser.add_argument("--output", required=True)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.size, args.images, args.resolution = "tiny", [4, 20], 224
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = root / "model"
        random_dinov2(get_shape(args.size)).save_pretrained(model_dir)
        for count in args.images:
            folder = write_folder(root / f"images-{count}", count, args.resolution)
            started = time.perf_counter()
            result = repair(
                RepairArguments(
                    model=str(model_dir),
                    data=str(folder),
                    resolution=args.resolution,
                    output_dir=str(root / f"run-{count}"),
                ),
                TrainingArguments(),
            )
            seconds = time.perf_counter() - started
            report = result.report
            entry = {
                "images": count,
                "seconds": seconds,
                "stop_reason": report["stop_reason"],
                "steps": report["steps"],
                "images_seen": report["images_seen"],
                "model_written": (root / f"run-{count}" / "model").exists(),
            }
            results.append(entry)
            rows.append([count, f"{seconds:.1f}", entry["stop_reason"], entry["images_seen"], entry["model_written"]])
    print(format_table(["images", "seconds", "stop reason", "images trained on", "model/ written"], rows))
    write_json(
        args.output,
        {
            "machine": machine_description(),
            "size": args.size,
            "resolution": args.resolution,
            "threads": args.threads,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
