"""Shared fixtures: tiny DINOv2 models built in-process (no Hub access needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

REPO_ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread: on small CI machines, tests that start subprocesses (fresh-process reloads, two-process
# training) otherwise oversubscribe the cores, and OpenMP spin-waiting makes small matmuls and SVDs 30-100x slower.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_dinov2(kind: str = "gelu", seed: int = 0, num_layers: int = 3) -> torch.nn.Module:
    """Return a tiny random DINOv2 in eval mode: `kind` is "gelu", "swiglu" or "registers".

    Layer scales are random (not the 1.0 default) so that they matter in every computation that reads them.
    """
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        use_swiglu_ffn=kind == "swiglu",
    )
    if kind == "registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lambda1"):
                parameter.uniform_(0.2, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.05)
    return model.eval()


def run_python(code: str, *, cwd: Path, env_update: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python interpreter and return the finished process (raising on a non-zero exit)."""
    env = dict(os.environ)
    env.update(env_update or {})
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result


@pytest.fixture
def pixel_values() -> torch.Tensor:
    """Two random images of 56x70 pixels (a 4x5 patch grid: non-square on purpose)."""
    generator = torch.Generator().manual_seed(123)
    return torch.randn(2, 3, 56, 70, generator=generator)


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps one state per process, mixed precision included: start from none and leave none behind."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
