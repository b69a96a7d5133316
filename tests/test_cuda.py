"""The adapter and a training step on a GPU (skipped where no CUDA device is available, e.g. in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_dinov2
from peft import get_peft_model

from sinder_peft import SinderConfig, SinderLinear
from sinder_peft.images.batching import collate_images
from sinder_peft.images.datasets import build_dataset
from sinder_peft.synthetic.demo import build_demo_model
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.training.trainer import SinderTrainer, build_sinder_model, compute_directions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_on_cuda(dtype: torch.dtype) -> None:
    model = tiny_dinov2("swiglu").to("cuda", dtype)
    pixel_values = torch.randn(2, 3, 56, 70, device="cuda", dtype=dtype)
    with torch.no_grad():
        reference = model(pixel_values=pixel_values).last_hidden_state.float()
    peft_model = get_peft_model(model, SinderConfig())
    layer = next(module for module in peft_model.modules() if isinstance(module, SinderLinear))
    assert layer.sinder_u.device.type == "cuda" and layer.sinder_delta["default"].device.type == "cuda"
    with torch.no_grad():
        output = peft_model(pixel_values=pixel_values).last_hidden_state.float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1 * float(reference.abs().max())
    assert (output - reference).abs().max() < tolerance
    output = peft_model(pixel_values=pixel_values).last_hidden_state
    output.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert (merged(pixel_values=pixel_values).last_hidden_state.float() - reference).abs().max() < tolerance


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_training_step_on_cuda(tmp_path: Path, mixed_precision: str, fresh_accelerate_state: None) -> None:
    base = build_demo_model().to("cuda")
    directions = compute_directions(base)
    model = build_sinder_model(base, list(range(6)))
    accelerator = Accelerator(mixed_precision=mixed_precision)
    assert accelerator.device.type == "cuda"
    trainer = SinderTrainer(model, directions, TrainingArguments(save_every=0), accelerator, tmp_path)
    dataset = build_dataset(None, 224, 14)
    pixel_values = collate_images([dataset[0]]).pixel_values
    before = [p.detach().clone() for p in trainer.parameters]
    result = trainer.training_step(pixel_values)
    assert result["defective"] == 1 and result["nonfinite"] == 0.0
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.parameters, strict=True))
