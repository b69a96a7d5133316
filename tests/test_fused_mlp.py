"""The fused gated MLP target (`SinderConfig(fuse_gated_mlp=True)`): one SVD of `[W_gate; W_up]`, one shift vector,
merged back into both projections; saved, reloaded in a fresh process, fingerprinted and grown like the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_python, tiny_dinov2
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from sinder_peft import SinderConfig
from sinder_peft.synthetic.tiny_models import build_tiny_model
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.training.trainer import build_sinder_model
from sinder_peft.tuner.fused_layer import FusedGateLinear, FusedUpLinear
from sinder_peft.tuner.layer import Linear, SinderLayer, effective_linear_weight


def features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).last_hidden_state


def randomize_fused_shifts(peft_model: nn.Module, scale: float, seed: int = 0) -> None:
    """Set every shift to random values: `scale` times the singular values for additive shifts, `scale` for log."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, Linear):
                for name, delta in module.sinder_delta.items():
                    noise = scale * torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
                    delta.copy_(noise if module.sinder_shift[name] == "log" else noise * module.sinder_s)


def expected_fused_weights(
    gate: torch.Tensor, up: torch.Tensor, delta: torch.Tensor, shift: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up weights of a fused shift, computed independently: stack, SVD, shift, split back."""
    stacked = torch.cat([gate, up]).double()
    left, values, right_transposed = torch.linalg.svd(stacked, full_matrices=False)
    delta = delta.detach().double()
    shifted = values * torch.exp(delta) if shift == "log" else values + delta
    weight = left @ torch.diag(shifted) @ right_transposed
    return weight[: gate.shape[0]], weight[gate.shape[0] :]


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "gate_proj")]


@pytest.mark.parametrize("shift", ["additive", "log"])
@pytest.mark.parametrize("family", ["dinov2_swiglu", "dinov3_gated"])
def test_fused_shift_is_one_svd_of_the_stacked_weight_merged_into_both(
    family: str, shift: str, pixel_values: torch.Tensor
) -> None:
    model = tiny_dinov2("swiglu") if family == "dinov2_swiglu" else build_tiny_model(family, num_layers=2)
    pixel_values = pixel_values if family == "dinov2_swiglu" else torch.randn(2, 3, 64, 64)
    original = {
        name: (mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone())
        for name, mlp in gated_mlps(model)
    }
    peft_model = get_peft_model(model, SinderConfig(fuse_gated_mlp=True, shift=shift))
    randomize_fused_shifts(peft_model, 0.3 if shift == "additive" else 0.2)
    adapted = features(peft_model, pixel_values)

    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mlp in gated_mlps(peft_model.base_model.model):
        gate, up = mlp.gate_proj, mlp.up_proj
        assert isinstance(gate, FusedGateLinear) and isinstance(up, FusedUpLinear) and up.shift_owner is gate
        hidden, width = original[name][0].shape
        assert gate.sinder_delta["default"].numel() == min(2 * hidden, width) and len(up.sinder_delta) == 0
        expected[name] = expected_fused_weights(*original[name], gate.sinder_delta["default"], shift)
        x = torch.randn(5, width, dtype=torch.float64)
        for layer, weight in zip((gate, up), expected[name], strict=True):
            output = F.linear(x, weight, layer.base_layer.bias.double())
            torch.testing.assert_close(layer(x.float()).double(), output, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(effective_linear_weight(layer).double(), weight, atol=1e-5, rtol=1e-5)
    assert expected and len(expected) == len(original)
    # a shift changes what the up projection computes: it reads the gate's shift
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert not any("up_proj" in name for name in trainable) and any("gate_proj" in name for name in trainable)

    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model) and not any(isinstance(module, SinderLayer) for module in merged.modules())
    for name, mlp in gated_mlps(merged):
        assert type(mlp.gate_proj) is nn.Linear and type(mlp.up_proj) is nn.Linear
        torch.testing.assert_close(mlp.gate_proj.weight.double(), expected[name][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mlp.up_proj.weight.double(), expected[name][1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(features(merged, pixel_values), adapted, atol=1e-4, rtol=1e-4)


def test_merge_unmerge_and_disable_move_both_projections(pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2("swiglu")
    reference = features(model, pixel_values)
    peft_model = get_peft_model(model, SinderConfig(fuse_gated_mlp=True))
    randomize_fused_shifts(peft_model, 0.3)
    adapted = features(peft_model, pixel_values)
    assert (adapted - reference).abs().max() > 1e-2
    with peft_model.disable_adapter():
        torch.testing.assert_close(features(peft_model, pixel_values), reference, atol=1e-5, rtol=0)
    peft_model.merge_adapter()
    torch.testing.assert_close(features(peft_model, pixel_values), adapted, atol=1e-4, rtol=0)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(features(peft_model, pixel_values), adapted, atol=1e-4, rtol=0)
    with peft_model.disable_adapter():
        torch.testing.assert_close(features(peft_model, pixel_values), reference, atol=1e-5, rtol=0)


def test_fused_adapter_saves_one_shift_and_reloads_in_a_fresh_process(
    tmp_path: Path, pixel_values: torch.Tensor
) -> None:
    model = tiny_dinov2("swiglu")
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SinderConfig(fuse_gated_mlp=True, shift="log"))
    randomize_fused_shifts(peft_model, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_expected = {
        name: (mlp.gate_proj.effective_weight().detach(), mlp.up_proj.effective_weight().detach())
        for name, mlp in gated_mlps(peft_model.base_model.model)
    }
    torch.save(
        {"pixel_values": pixel_values, "features": features(peft_model, pixel_values), "weights": merged_expected},
        tmp_path / "io.pt",
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fuse_gated_mlp"] is True and config["shift"] == "log"
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("up_proj" in key for key in saved)
    gate_shifts = [tensor for key, tensor in saved.items() if "gate_proj" in key and key.endswith("sinder_delta")]
    assert len(gate_shifts) == 3 and all(tensor.numel() == 64 for tensor in gate_shifts)  # min(2 * 168, 64)

    run_python(
        f"""
import torch, sinder_peft
from peft import PeftModel
from transformers import AutoModel
from sinder_peft.tuner.fused_layer import FusedGateLinear, FusedUpLinear
base = AutoModel.from_pretrained({str(tmp_path / "base")!r}).eval()
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
assert model.peft_config["default"].fuse_gated_mlp is True
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    out = model(pixel_values=io["pixel_values"]).last_hidden_state
error = (out - io["features"]).abs().max().item()
assert error < 1e-4, error
for block in model.base_model.model.encoder.layer:
    assert isinstance(block.mlp.gate_proj, FusedGateLinear) and isinstance(block.mlp.up_proj, FusedUpLinear)
merged = model.merge_and_unload()
for index, block in enumerate(merged.encoder.layer):
    gate, up = io["weights"][f"encoder.layer.{{index}}.mlp"]
    assert torch.allclose(block.mlp.gate_proj.weight, gate, atol=1e-6), index
    assert torch.allclose(block.mlp.up_proj.weight, up, atol=1e-6), index
""",
        cwd=REPO_ROOT,
    )


def test_fused_adapter_is_refused_on_a_wrong_base_and_on_its_merged_model(tmp_path: Path) -> None:
    """Only the gated MLPs are adapted, so that the fused layers' own fingerprints are what refuses."""
    config = SinderConfig(fuse_gated_mlp=True, target_modules=["gate_proj", "up_proj"])
    peft_model = get_peft_model(tiny_dinov2("swiglu", seed=0), config)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, Linear):
                module.sinder_delta["default"].zero_()
        gate = peft_model.base_model.model.encoder.layer[1].mlp.gate_proj
        gate.sinder_delta["default"][0] = 0.05 * gate.sinder_s[0]
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not match the base weight of '.*layer.0.mlp.gate_proj'"):
        PeftModel.from_pretrained(tiny_dinov2("swiglu", seed=1), tmp_path / "adapter")
    # the shift of the stacked weight's largest singular value, merged into both projections, is seen
    merged = peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="layer.1.mlp.gate_proj.*already has the adapter merged into it"):
        PeftModel.from_pretrained(merged, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_dinov2("swiglu", seed=0), tmp_path / "adapter")
    assert isinstance(reloaded.base_model.model.encoder.layer[1].mlp.gate_proj, FusedGateLinear)


def test_add_layers_wraps_gate_and_up_together(tmp_path: Path, pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2("swiglu")
    peft_model = get_peft_model(model, SinderConfig(fuse_gated_mlp=True, layers_to_transform=[0]))
    randomize_fused_shifts(peft_model, 0.3)
    shifts = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    assert peft_model.base_model.add_layers([2, 0]) == [2]
    blocks = peft_model.base_model.model.encoder.layer
    assert isinstance(blocks[2].mlp.gate_proj, FusedGateLinear) and isinstance(blocks[2].mlp.up_proj, FusedUpLinear)
    assert type(blocks[1].mlp.gate_proj) is nn.Linear and type(blocks[1].mlp.up_proj) is nn.Linear
    assert blocks[2].mlp.gate_proj.sinder_delta["default"].requires_grad
    assert {"encoder.layer.2.mlp.gate_proj", "encoder.layer.2.mlp.up_proj"} <= set(
        peft_model.base_model.targeted_module_names
    )
    for name, parameter in peft_model.named_parameters():
        if name in shifts:
            assert torch.equal(parameter, shifts[name]), name
    expected = features(peft_model, pixel_values)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_dinov2("swiglu"), tmp_path / "adapter")
    assert reloaded.peft_config["default"].layers_to_transform == [0, 2]
    torch.testing.assert_close(features(reloaded, pixel_values), expected, atol=1e-5, rtol=0)


def test_fused_and_split_are_not_mixed_and_fusion_needs_both_projections() -> None:
    with pytest.raises(ValueError, match="is not among the targets"):
        get_peft_model(tiny_dinov2("swiglu"), SinderConfig(fuse_gated_mlp=True, target_modules=["gate_proj"]))
    peft_model = get_peft_model(tiny_dinov2("swiglu"), SinderConfig(fuse_gated_mlp=True))
    with pytest.raises(ValueError, match="all fuse gated MLPs or all split them"):
        peft_model.add_adapter("split", SinderConfig(fuse_gated_mlp=False))
    split = get_peft_model(tiny_dinov2("swiglu"), SinderConfig())
    with pytest.raises(ValueError, match="all fuse gated MLPs or all split them"):
        split.add_adapter("fused", SinderConfig(fuse_gated_mlp=True))


def test_a_second_fused_adapter_has_its_own_shift(pixel_values: torch.Tensor) -> None:
    peft_model = get_peft_model(tiny_dinov2("swiglu"), SinderConfig(fuse_gated_mlp=True))
    peft_model.add_adapter("other", SinderConfig(fuse_gated_mlp=True))
    gate = peft_model.base_model.model.encoder.layer[0].mlp.gate_proj
    assert set(gate.sinder_delta) == {"default", "other"}
    with torch.no_grad():
        gate.sinder_delta["other"].copy_(0.3 * gate.sinder_s)
    default = features(peft_model, pixel_values)
    peft_model.set_adapter("other")
    assert (features(peft_model, pixel_values) - default).abs().max() > 1e-3


def test_plain_mlps_are_the_same_fused_or_not() -> None:
    fused = get_peft_model(tiny_dinov2("gelu"), SinderConfig(fuse_gated_mlp=True))
    assert not any(isinstance(module, (FusedGateLinear, FusedUpLinear)) for module in fused.modules())
    assert {type(module) for module in fused.modules() if isinstance(module, SinderLayer)} == {Linear}


def test_both_recipes_fuse_gated_mlps_unless_told_to_split() -> None:
    assert TrainingArguments(recipe="paper").fuse_gated_mlp and TrainingArguments(recipe="preserve").fuse_gated_mlp
    assert not TrainingArguments(recipe="paper", gated_mlp="split").fuse_gated_mlp
    assert not TrainingArguments(recipe="preserve", gated_mlp="split").fuse_gated_mlp
    arguments = TrainingArguments(recipe="paper")
    model = build_sinder_model(tiny_dinov2("swiglu"), [1], shift=arguments.shift, fuse_gated_mlp=True)
    assert model.peft_config["default"].fuse_gated_mlp
    assert isinstance(model.base_model.model.encoder.layer[1].mlp.up_proj, FusedUpLinear)
