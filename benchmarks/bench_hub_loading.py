"""Time of loading and converting a ViT-g-sized model card through the Hugging Face cache
(`--model timm:hf-hub:ORG/NAME`) against the same files in a local directory (`--model timm:DIR`).

Writes a random-weight stand-in of `--repo-id` (default `bioptimus/H-optimus-0`: timm's
`vit_giant_patch14_reg4_dinov2` at 224 px with its card's arguments, 1.1 B parameters) once, as
`hf download` leaves it: `blobs/` holding the weights and `snapshots/REVISION/` symbolic links to them, `refs/main`;
the local directory holds hard links to the same files, so both read the same bytes from the same page cache. Then
times `load_backbone` (load with timm, convert to transformers), alternating the two sources, `--rounds` times each.
The goal (issue: domain foundation models through timm) is that the cache costs no more than the directory.

Needs timm (`pip install "sinder-peft[timm]"`). Writing the stand-in needs about 2 × 4.5 GB of memory and 4.5 GB of
disk under `--workdir` (default: a temporary directory, removed afterwards).

Usage:
    python benchmarks/bench_hub_loading.py --threads 2 --output results/hub_loading.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import huggingface_hub
from common import add_threads_argument, apply_threads, format_table, machine_description, write_json
from safetensors.torch import save_file

from sinder_peft.models.loading import load_backbone
from sinder_peft.models.timm.arguments import resolve_model_kwargs
from sinder_peft.models.timm.loading import cached_snapshot, require_timm, timm_model_kwargs
from sinder_peft.models.timm.presets import find_preset

STAND_INS: dict[str, tuple[str, dict[str, Any]]] = {
    "bioptimus/H-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "num_classes": 0}),
    "prov-gigapath/prov-gigapath": (
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "patch_size": 16, "mlp_ratio": 5.33334, "num_classes": 0},
    ),
}
"""The ViT-g-sized cards this benchmark can stand in for: the architecture and the JSON `model_args`."""
QUICK_ARGS = {"depth": 2, "embed_dim": 96, "num_heads": 4}
"""`--quick`: the same card with two blocks 96 wide, to check the script itself."""
REVISION = "0" * 40


def write_stand_in(repo_id: str, model_args: dict[str, Any], cache: Path, directory: Path) -> int:
    """Write the random stand-in into the Hub cache `cache` (blob and snapshot link) and `directory` (hard links);
    return its number of parameters."""
    timm = require_timm()
    architecture, _ = STAND_INS[repo_id]
    preset = find_preset(repo_id)
    card = {key: value for key, value in (preset.kwargs if preset else {}).items() if key not in model_args}
    model = timm.create_model(architecture, pretrained=False, **model_args, **resolve_model_kwargs(card, timm))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    organization, name = repo_id.split("/")
    root = cache / f"models--{organization}--{name}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    directory.mkdir(parents=True)
    staging = root / "blobs" / "staging"
    staging.mkdir()
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, staging / "model.safetensors")
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 1.0, "interpolation": "bicubic"},
    }
    (staging / "config.json").write_text(json.dumps(config))
    del model
    for file in ("model.safetensors", "config.json"):
        blob = root / "blobs" / _sha256(staging / file)
        (staging / file).rename(blob)
        (snapshot / file).symlink_to(os.path.relpath(blob, snapshot))
        os.link(blob, directory / file)
    staging.rmdir()
    return parameters


def _sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file (the Hub cache names blobs after their hash)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def time_load(model: str) -> float:
    """Return the seconds `load_backbone(model)` takes (load with timm, convert), freeing the model afterwards."""
    started = time.perf_counter()
    converted, _ = load_backbone(model)
    seconds = time.perf_counter() - started
    del converted
    return seconds


def time_hub_lookup(repo_id: str, rounds: int = 20) -> float:
    """Return the best seconds of what only the Hub path does: finding the snapshot in the cache and reading the
    arguments (preset and `config.json`); everything after it is the local directory's path on the same files."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        cached_snapshot(repo_id)
        timm_model_kwargs(f"hf-hub:{repo_id}")
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-id", default="bioptimus/H-optimus-0", choices=sorted(STAND_INS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to write the stand-in (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a two-block stand-in, to check the script")
    parser.add_argument("--output", default=None)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    _, model_args = STAND_INS[args.repo_id]
    model_args = {**model_args, **(QUICK_ARGS if args.quick else {})}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-hub-"))
    cache, directory = workdir / "hub", workdir / "local"
    original_cache = huggingface_hub.constants.HF_HUB_CACHE
    try:
        parameters = write_stand_in(args.repo_id, model_args, cache, directory)
        huggingface_hub.constants.HF_HUB_CACHE = str(cache)
        sources = {"hub_cache": f"timm:hf-hub:{args.repo_id}", "local_directory": f"timm:{directory}"}
        times: dict[str, list[float]] = {key: [] for key in sources}
        for _ in range(args.rounds):
            for key, model in sources.items():
                times[key].append(time_load(model))
        lookup = time_hub_lookup(args.repo_id)
    finally:
        huggingface_hub.constants.HF_HUB_CACHE = original_cache
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    best = {key: min(values) for key, values in times.items()}
    payload = {
        "benchmark": "hub_loading",
        "repo_id": args.repo_id,
        "model_args": model_args,
        "parameters": parameters,
        "seconds": times,
        "best_seconds": best,
        "hub_over_local": best["hub_cache"] / best["local_directory"],
        "hub_lookup_seconds": lookup,
        "machine": machine_description(),
        "args": vars(args),
    }
    print(
        format_table(
            ["source", "parameters", "load + convert, best (s)", "all rounds (s)"],
            [
                [sources[key], f"{parameters:,}", f"{best[key]:.2f}", ", ".join(f"{value:.2f}" for value in values)]
                for key, values in times.items()
            ],
        )
    )
    print(f"Hub cache lookup (snapshot and arguments), best of 20: {1000 * lookup:.2f} ms")
    if args.output:
        write_json(args.output, payload)


if __name__ == "__main__":
    main()
