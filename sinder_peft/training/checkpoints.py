"""Training checkpoints: `<output_dir>/checkpoints/step-NNNNNNN/` and the `latest` pointer.

A checkpoint holds the adapter as PEFT writes it (`adapter/`, loadable by `PeftModel.from_pretrained` on its own),
the optimizer state (`optimizer.pt`), the `TrainerState` (`trainer_state.json`) and the run's defect directions
(`directions.safetensors`: chosen once, from the base model, and reused as they are on resume). Accelerate's
`save_state` is not used: it saves prepared models whole and cannot write the adapter in PEFT's format, and the
adapter grows during a run (new blocks get shifts), which its optimizer bookkeeping does not expect; the files above
are all a resume needs, and a run resumes exactly (tested).

Writing is atomic: the directory is written under a temporary name and renamed, then `latest` is replaced, so an
interruption while saving never leaves half a checkpoint behind. Older checkpoints are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..analysis.detection import DefectDirections
from ..analysis.direction_files import save_directions
from .state import TrainerState

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_FILE = "trainer_state.json"
CHECKPOINT_OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_ADAPTER_DIR = "adapter"
LATEST_CHECKPOINT_FILE = "latest"


def write_checkpoint(
    checkpoint_dir: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    *,
    directions: DefectDirections | None = None,
) -> Path:
    """Write `checkpoint_dir/step-NNNNNNN/` (NNNNNNN = `state.step`), with the defect `directions` of the run when
    given (`analysis.direction_files.save_directions`), point `latest` at it, remove older ones, and return it.
    Call it on one process only."""
    checkpoint_dir = Path(checkpoint_dir)
    target = checkpoint_dir / f"step-{state.step:07d}"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    temporary = checkpoint_dir / f".tmp-{target.name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    model.save_pretrained(temporary / CHECKPOINT_ADAPTER_DIR)
    torch.save(optimizer.state_dict(), temporary / CHECKPOINT_OPTIMIZER_FILE)
    (temporary / CHECKPOINT_STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    if directions is not None:
        save_directions(directions, temporary)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)
    pointer = checkpoint_dir / f".{LATEST_CHECKPOINT_FILE}.tmp"
    pointer.write_text(target.name)
    os.replace(pointer, checkpoint_dir / LATEST_CHECKPOINT_FILE)
    for old in checkpoint_dir.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("Saved checkpoint %s.", target)
    return target


def read_checkpoint(checkpoint: Path, device: torch.device | str) -> tuple[TrainerState, dict[str, Any]]:
    """Return the trainer state (with no stop reason, so that training goes on) and the optimizer state dict (on
    `device`) of a checkpoint directory. The shifts are loaded with the adapter (`CHECKPOINT_ADAPTER_DIR`)."""
    data = json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text())
    data["recent"] = [tuple(entry) for entry in data["recent"]]
    state = TrainerState(**data)
    state.stop_reason = None
    optimizer_state = torch.load(checkpoint / CHECKPOINT_OPTIMIZER_FILE, map_location=device)
    return state, optimizer_state


def resolve_checkpoint(path: str | Path) -> Path:
    """Return the checkpoint directory `--resume` points at: a checkpoint itself, a `checkpoints/` folder or a run's
    output directory (both resolved through their `latest` file).

    Raises:
        FileNotFoundError: when no checkpoint is found there.
    """
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / CHECKPOINT_STATE_FILE).is_file():
            return candidate
        pointer = candidate / LATEST_CHECKPOINT_FILE
        if pointer.is_file():
            checkpoint = candidate / pointer.read_text().strip()
            if (checkpoint / CHECKPOINT_STATE_FILE).is_file():
                return checkpoint
    raise FileNotFoundError(f"No SINDER checkpoint found at {str(path)!r} (looked for {CHECKPOINT_STATE_FILE}).")
