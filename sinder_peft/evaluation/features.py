"""Frozen features for `sinder evaluate`: extraction (one or several processes) and their safetensors cache.

What a backbone's output means is read in one place, `final_tokens`: the image-level feature (the CLS token after
the final norm for DINOv2) and the patch tokens after the final norm. Extraction runs a dataset through the model in
batches; with several processes (`accelerate launch`) each process takes a contiguous share of the images and every
batch is gathered, so the main process ends with the whole result in dataset order. Results are stored under a key
made of the model's fingerprint (`model_fingerprint`: its config and a sample of every weight, so the same weights
share a cache under any name, and a repaired model never reuses its original's), the data's identity and the
preprocessing; a second run with other probe settings reads them back instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..analysis.detection import DefectDirections, DefectTest, find_defect_tokens
from ..tuner.architectures import describe_model, unwrap_backbone

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_FINGERPRINT_SAMPLES = 4096
"""Entries of every weight tensor hashed into the model fingerprint (evenly spaced), next to its float64 sum."""

ProcessState = Accelerator | PartialState
BatchFunction = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def final_tokens(backbone: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the image-level and the patch features a backbone gives for `pixel_values` [B, 3, H, W], from one pass.

    This is the one place that decides which outputs of a model family the probes read, through the family's
    `ArchitectureDescription`: every token after the final norm (`final_tokens`: for DINOv2 the model's
    `last_hidden_state`; CLIP's raw last block output gets its final norm), the patch tokens being those after the
    prefix tokens, and the image-level feature of `ArchitectureDescription.pool` (DINOv2, DINOv3, CLIP, ViT: the CLS
    token after the final norm; SigLIP: its attention-pooling head), from the same tokens rather than a second pass.

    Returns:
        `(pooled, patches)`: [B, C'] and [B, H / p, W / p, C], in the model's dtype and on its device.
    """
    backbone = unwrap_backbone(backbone)
    description = describe_model(backbone)
    tokens = description.final_tokens(backbone, pixel_values)
    patches = tokens[:, description.num_prefix_tokens :]
    pooled = description.pool(backbone, tokens)
    rows = pixel_values.shape[-2] // description.patch_size
    columns = pixel_values.shape[-1] // description.patch_size
    return pooled, patches.reshape(pixel_values.shape[0], rows, columns, -1)


def model_fingerprint(model: nn.Module) -> str:
    """Return a hex digest that changes whenever the model's config or any of its weights changes.

    Hashes the config (without its name or path, version, architectures and dtype, which saving adds; the dtype of
    every tensor is hashed with it), then for every parameter and buffer its name, shape, dtype, its float64 sum and
    up to 4,096 evenly spaced entries. Reads every
    weight once (a second or so for a ViT-g on a CPU) and needs no file, so in-memory models (a freshly merged
    repair) are keyed the same way as saved ones.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        ignored = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
        settings = {key: value for key, value in config.to_dict().items() if key not in ignored}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
            sample = flat[::step][:_FINGERPRINT_SAMPLES].double().cpu()
            digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0{float(flat.double().sum())!r}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureCache:
    """Tensors stored as safetensors files in one folder, one file per key; `directory=None` stores nothing.

    Files are written under a temporary name and renamed, so a file is whole or absent. The key description is kept
    in the file's metadata (`key`), which makes a cache folder inspectable.
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def path(self, kind: str, key: dict[str, Any]) -> Path | None:
        """Return the file of the entry `kind` with the description `key`, or None when caching is off."""
        if self.directory is None:
            return None
        payload = json.dumps({"version": CACHE_FORMAT_VERSION, **key}, sort_keys=True, default=str)
        return self.directory / f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}.safetensors"

    def load(self, path: Path | None) -> dict[str, torch.Tensor] | None:
        """Return the tensors stored at `path`, or None when there is no such entry (or caching is off)."""
        if path is None or not path.is_file():
            return None
        logger.info("Reading cached %s.", path.name)
        return load_file(path)

    def save(self, path: Path | None, tensors: dict[str, torch.Tensor], key: dict[str, Any]) -> None:
        """Store `tensors` at `path` (a no-op when caching is off)."""
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, temporary, metadata={"key": json.dumps(key, sort_keys=True, default=str)})
        temporary.replace(path)


def shard_positions(count: int, num_processes: int, process_index: int) -> tuple[list[int], int]:
    """Return the dataset positions process `process_index` handles, and how many of them are real.

    The positions are split into `num_processes` contiguous shares of ceil(count / num_processes); a shorter last
    share is padded by repeating its last position (or position 0 when it is empty), so every process runs the same
    number of equally sized batches, as collective gathers need.
    """
    share = math.ceil(count / num_processes)
    start = min(process_index * share, count)
    positions = list(range(start, min(start + share, count)))
    real = len(positions)
    filler = positions[-1] if positions else 0
    return positions + [filler] * (share - real), real


def _collate(items: Sequence[dict[str, torch.Tensor] | None], shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Stack items into `{"pixel_values", "valid"}`; an unreadable item (None) becomes zeros with valid False."""
    pixel_values = [item["pixel_values"] if item is not None else torch.zeros(shape) for item in items]
    return {
        "pixel_values": torch.stack(pixel_values),
        "valid": torch.tensor([item is not None for item in items], dtype=torch.bool),
    }


def map_batches(
    dataset: Dataset,
    function: BatchFunction,
    *,
    image_shape: tuple[int, int, int],
    batch_size: int,
    num_workers: int = 0,
    state: ProcessState | None = None,
    description: str = "images",
) -> dict[str, torch.Tensor] | None:
    """Run `function` on batches of `dataset` and return its per-image outputs for the whole dataset, in order.

    Args:
        dataset: a map-style dataset of `{"pixel_values": Tensor[image_shape]}` items, or None for unreadable
            images (those rows get zeros and `valid` False).
        function: maps a [B, *image_shape] CPU batch to a dict of tensors with B rows each (moved to the CPU here).
        image_shape: (3, H, W) of every item.
        batch_size: images per batch and process.
        num_workers: DataLoader worker processes per process (decoding and resizing overlap the model).
        state: the Accelerate state of a multi-process run; None or one process runs everything here.
        description: what the progress bar counts.

    Returns:
        `{name: [N, ...]}` with every output of `function` and `valid` [N] bool, on the CPU, on the main process;
        None on the other processes (which only compute and send their share).
    """
    num_processes = state.num_processes if state is not None else 1
    process_index = state.process_index if state is not None else 0
    is_main = state is None or state.is_main_process
    positions, real = shard_positions(len(dataset), num_processes, process_index)
    loader = DataLoader(
        Subset(dataset, positions),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(_collate, shape=image_shape),
    )
    shares: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(num_processes)]
    progress = tqdm(total=len(dataset), desc=description, unit="img", disable=not is_main)
    for batch in loader:
        outputs = {name: value.detach() for name, value in function(batch["pixel_values"]).items()}
        outputs["valid"] = batch["valid"]
        rows = batch["valid"].shape[0]
        if num_processes > 1:
            device = state.device
            outputs = {name: value.to(device) for name, value in outputs.items()}
            outputs = gather(outputs)
        if is_main:
            for name, value in outputs.items():
                for share, piece in zip(shares, value.cpu().split(rows), strict=True):
                    share.setdefault(name, []).append(piece)
        progress.update(min(rows * num_processes, progress.total - progress.n))
    progress.close()
    if not is_main:
        return None
    per_process_real = [shard_positions(len(dataset), num_processes, index)[1] for index in range(num_processes)]
    names = list(shares[0])
    return {
        name: torch.cat(
            [torch.cat(share[name])[:count] for share, count in zip(shares, per_process_real, strict=True)]
        )
        for name in names
    }


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    image_shape: tuple[int, int, int],
    batch_size: int,
    with_patches: bool,
    num_workers: int = 0,
    state: ProcessState | None = None,
    description: str = "features",
) -> dict[str, torch.Tensor] | None:
    """Return the final-norm features (`final_tokens`) of every image of `dataset` (see `map_batches`).

    Returns:
        On the main process: `cls` [N, C'] float32 (the image-level feature of `final_tokens`), `valid` [N] bool
        and, with `with_patches`, `patches`
        [N, h, w, C] float16 (half the disk and memory; a probe's input needs no more precision). None on the other
        processes.
    """
    parameter = next(model.parameters())

    def features(pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            cls, patches = final_tokens(model, pixel_values.to(device=parameter.device, dtype=parameter.dtype))
        outputs = {"cls": cls.float()}
        if with_patches:
            outputs["patches"] = patches.to(torch.float16)
        return outputs

    return map_batches(
        dataset,
        features,
        image_shape=image_shape,
        batch_size=batch_size,
        num_workers=num_workers,
        state=state,
        description=description,
    )


def extract_defect_statistics(
    model: nn.Module,
    dataset: Dataset,
    directions: DefectDirections | Sequence[torch.Tensor],
    *,
    image_shape: tuple[int, int, int],
    batch_size: int,
    test: DefectTest,
    num_workers: int = 0,
    state: ProcessState | None = None,
) -> dict[str, torch.Tensor] | None:
    """Return the per-image defect statistics of `find_defect_tokens` for every image of `dataset`.

    Returns:
        On the main process: `max_median_norm_ratio` [N, L], `high_norm_share` [N, L], `first_defective_layer`
        [N] (−1: none), `defect_tokens` [N] (tokens flagged at the image's first defective layer, 0 when none),
        `last_layer_norms` [N, h, w] (token norms of the last block, for norm maps), `high_norm_tokens` [N, L] (the
        high-norm defect tokens per layer), `high_norm_weights_cosine_sum` [N, L] (the sum of their |cos| with the
        weights' direction) and `valid` [N]. None on the other processes. `directions` are used as they are.
    """
    parameter = next(model.parameters())

    def statistics(pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        analysis = find_defect_tokens(
            model,
            pixel_values.to(device=parameter.device, dtype=parameter.dtype),
            directions if isinstance(directions, DefectDirections) else list(directions),
            test=test,
        )
        layer = analysis.first_defective_layer
        flagged = analysis.masks[torch.arange(layer.shape[0]), layer.clamp_min(0)].flatten(1).sum(dim=1)
        return {
            "max_median_norm_ratio": analysis.max_median_norm_ratio,
            "high_norm_share": analysis.high_norm_share,
            "first_defective_layer": layer,
            "defect_tokens": torch.where(layer >= 0, flagged, torch.zeros_like(flagged)),
            "last_layer_norms": analysis.token_norms[:, -1],
            "high_norm_tokens": analysis.high_norm_defect_counts,
            "high_norm_weights_cosine_sum": (analysis.weights_cosines * analysis.high_norm_defect_masks)
            .flatten(2)
            .sum(dim=-1),
        }

    return map_batches(
        dataset,
        statistics,
        image_shape=image_shape,
        batch_size=batch_size,
        num_workers=num_workers,
        state=state,
        description="defects",
    )
