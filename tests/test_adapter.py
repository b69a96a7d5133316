"""The SINDER PEFT adapter: registration, parametrization, merge/unload, save/reload, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_python, tiny_dinov2
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from torch import nn
from torch.nn import functional as F
from transformers import ConvNextConfig, ConvNextModel

import sinder_peft
from sinder_peft import SinderConfig, SinderLinear
from sinder_peft.tuner.layer import effective_linear_weight

KINDS = ["gelu", "swiglu", "registers"]
EXPECTED_TARGETS = {
    "gelu": {"v_proj", "o_proj", "fc1", "fc2"},
    "registers": {"v_proj", "o_proj", "fc1", "fc2"},
    "swiglu": {"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


def features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).last_hidden_state


def randomize_deltas(peft_model: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Set every shift to random values proportional to its singular values (a visible but sane change)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, SinderLinear):
                for delta in module.sinder_delta.values():
                    noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
                    delta.copy_(scale * noise * module.sinder_s)


def test_peft_type_is_registered() -> None:
    assert PeftType("SINDER") is sinder_peft.SINDER_PEFT_TYPE
    assert "SINDER" in list(PeftType)
    assert SinderConfig().peft_type == PeftType.SINDER


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_unchanged_at_zero_shift(kind: str, pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2(kind)
    reference = features(model, pixel_values)
    peft_model = get_peft_model(model, SinderConfig())
    assert (features(peft_model, pixel_values) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_and_trainable_parameters(kind: str) -> None:
    model = tiny_dinov2(kind)
    expected_count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in EXPECTED_TARGETS[kind]:
            expected_count += min(module.in_features, module.out_features)
    peft_model = get_peft_model(model, SinderConfig())

    wrapped = {
        name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if isinstance(module, SinderLinear)
    }
    assert wrapped == EXPECTED_TARGETS[kind]
    trainable = {name: parameter for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert all(".sinder_delta.default" in name for name in trainable)
    assert not any("q_proj" in name or "k_proj" in name for name in trainable)
    assert sum(parameter.numel() for parameter in trainable.values()) == expected_count
    assert all(not parameter.any() for parameter in trainable.values())


def test_parametrization_matches_independent_svd(pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2("swiglu")
    original = {
        name: module.weight.detach().clone() for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    peft_model = get_peft_model(model, SinderConfig())
    randomize_deltas(peft_model)

    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, SinderLinear):
            continue
        weight = original[name].to(torch.float64)
        left, singular_values, right_transposed = torch.linalg.svd(weight, full_matrices=False)
        delta = module.sinder_delta["default"].detach().to(torch.float64)
        expected = weight + left @ torch.diag(delta) @ right_transposed
        # the forward pass applies exactly that weight
        x = torch.randn(5, module.in_features, dtype=torch.float64)
        expected_output = F.linear(x, expected, module.base_layer.bias.to(torch.float64))
        assert torch.allclose(module(x.float()).to(torch.float64), expected_output, atol=1e-4)
        assert torch.allclose(effective_linear_weight(module).to(torch.float64), expected, atol=1e-5)
        checked += 1
    assert checked == 3 * 5

    merged = peft_model.merge_and_unload()
    for name, module in merged.named_modules():
        if (
            name in original
            and isinstance(module, nn.Linear)
            and name.rsplit(".", 1)[-1] in EXPECTED_TARGETS["swiglu"]
        ):
            weight = original[name].to(torch.float64)
            left, _, right_transposed = torch.linalg.svd(weight, full_matrices=False)
            # recompute delta from the merged weight: U^T (W_merged - W0) V must be diag(delta)
            difference = left.T @ (module.weight.to(torch.float64) - weight) @ right_transposed.T
            off_diagonal = difference - torch.diag(torch.diagonal(difference))
            assert off_diagonal.abs().max() < 1e-4


def test_merge_unmerge_disable_unload(pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2("gelu")
    reference = features(model, pixel_values)
    peft_model = get_peft_model(model, SinderConfig())
    randomize_deltas(peft_model)
    adapted = features(peft_model, pixel_values)
    assert (adapted - reference).abs().max() > 1e-2

    with peft_model.disable_adapter():
        assert (features(peft_model, pixel_values) - reference).abs().max() < 1e-5

    peft_model.merge_adapter()
    assert all(module.merged for module in peft_model.modules() if isinstance(module, SinderLinear))
    assert (features(peft_model, pixel_values) - adapted).abs().max() < 1e-4
    peft_model.unmerge_adapter()
    assert (features(peft_model, pixel_values) - adapted).abs().max() < 1e-4
    with peft_model.disable_adapter():
        assert (features(peft_model, pixel_values) - reference).abs().max() < 1e-4

    unloaded = peft_model.unload()
    assert not any(isinstance(module, SinderLinear) for module in unloaded.modules())
    assert (features(unloaded, pixel_values) - reference).abs().max() < 1e-4


def test_only_deltas_get_gradients_and_a_step_changes_outputs(pixel_values: torch.Tensor) -> None:
    peft_model = get_peft_model(tiny_dinov2("registers"), SinderConfig())
    before = features(peft_model, pixel_values)
    output = peft_model(pixel_values=pixel_values).last_hidden_state
    output.pow(2).mean().backward()
    for name, parameter in peft_model.named_parameters():
        if ".sinder_delta." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    optimizer.step()
    assert (features(peft_model, pixel_values) - before).abs().max() > 1e-4


def test_layers_to_transform_restricts_layers() -> None:
    peft_model = get_peft_model(tiny_dinov2("gelu"), SinderConfig(layers_to_transform=[1, 2]))
    layers = {
        name.split("encoder.layer.")[1].split(".")[0]
        for name, m in peft_model.named_modules()
        if isinstance(m, SinderLinear)
    }
    assert layers == {"1", "2"}


def test_add_layers_extends_an_adapter_and_keeps_its_shifts(tmp_path: Path, pixel_values: torch.Tensor) -> None:
    peft_model = get_peft_model(tiny_dinov2("swiglu"), SinderConfig(layers_to_transform=[1]))
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.uniform_(-0.05, 0.05)
    trained = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    before = peft_model(pixel_values=pixel_values).last_hidden_state.detach()

    assert peft_model.base_model.add_layers([0, 1]) == [0]
    assert peft_model.base_model.add_layers([1]) == []
    assert peft_model.peft_config["default"].layers_to_transform == [0, 1]
    shifts = {name: p for name, p in peft_model.named_parameters() if ".sinder_delta." in name}
    assert all(parameter.requires_grad for parameter in shifts.values())
    assert len(shifts) == 2 * 5  # v, o, gate, up, down in blocks 0 and 1
    for name, parameter in shifts.items():
        expected = trained.get(name, torch.zeros_like(parameter))
        assert torch.equal(parameter.detach(), expected), name
    after = peft_model(pixel_values=pixel_values).last_hidden_state.detach()
    assert (after - before).abs().max() < 1e-5  # a new block at zero shift changes nothing

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_dinov2("swiglu"), tmp_path / "adapter")
    assert reloaded.peft_config["default"].layers_to_transform == [0, 1]
    output = reloaded(pixel_values=pixel_values).last_hidden_state.detach()
    assert (output - after).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"Cannot adapt blocks \[7\]: the model has 3 layers"):
        peft_model.base_model.add_layers([7])


def test_bad_targets_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\['value'\] were not found.*Linear modules found: .*'v_proj'"):
        get_peft_model(tiny_dinov2("gelu"), SinderConfig(target_modules=["v_proj", "value"]))
    with pytest.raises(TypeError, match="Linear` layers only.*norm1.*LayerNorm"):
        get_peft_model(tiny_dinov2("gelu"), SinderConfig(target_modules=["norm1"]))
    with pytest.raises(ValueError, match="out of range: the model has 3 layers"):
        get_peft_model(tiny_dinov2("gelu"), SinderConfig(layers_to_transform=[5]))
    convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))  # not a ViT
    with pytest.raises(ValueError, match="model_type='convnext'"):
        get_peft_model(convnext, SinderConfig())


def test_bfloat16_base(pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2("swiglu").to(torch.bfloat16)
    reference = features(model, pixel_values.bfloat16()).float()
    peft_model = get_peft_model(model, SinderConfig())
    layer = next(m for m in peft_model.modules() if isinstance(m, SinderLinear))
    assert layer.sinder_u.dtype == torch.float32 and layer.sinder_delta["default"].dtype == torch.float32
    output = features(peft_model, pixel_values.bfloat16())
    assert output.dtype == torch.bfloat16
    assert (output.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_torch_compile_traces_forward_and_backward(pixel_values: torch.Tensor) -> None:
    peft_model = get_peft_model(tiny_dinov2("gelu"), SinderConfig())
    randomize_deltas(peft_model)
    eager = peft_model(pixel_values=pixel_values).last_hidden_state
    compiled = torch.compile(peft_model, backend="aot_eager", fullgraph=False)
    output = compiled(pixel_values=pixel_values).last_hidden_state
    assert torch.allclose(output, eager, atol=1e-5)
    output.sum().backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_save_stores_only_shifts_and_reload_in_fresh_process(tmp_path: Path, pixel_values: torch.Tensor) -> None:
    model = tiny_dinov2("swiglu")
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SinderConfig())
    randomize_deltas(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save({"pixel_values": pixel_values, "features": features(peft_model, pixel_values)}, tmp_path / "io.pt")

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[-1] for key in saved} == {"sinder_delta", "sinder_fingerprint"}
    assert sum(t.numel() for k, t in saved.items() if k.endswith("sinder_delta")) == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad
    )
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "SINDER"

    run_python(
        f"""
import torch, sinder_peft
from peft import PeftConfig, PeftModel
from transformers import AutoModel
config = PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})
assert type(config) is sinder_peft.SinderConfig, type(config)
base = AutoModel.from_pretrained({str(tmp_path / "base")!r}).eval()
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    out = model(pixel_values=io["pixel_values"]).last_hidden_state
error = (out - io["features"]).abs().max().item()
assert error < 1e-4, error
""",
        cwd=REPO_ROOT,
    )


def test_merged_model_loads_without_sinder_peft(tmp_path: Path, pixel_values: torch.Tensor) -> None:
    peft_model = get_peft_model(tiny_dinov2("registers"), SinderConfig())
    randomize_deltas(peft_model)
    expected = features(peft_model, pixel_values)
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "Dinov2WithRegistersModel"
    assert not any(isinstance(module, SinderLinear) for module in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    torch.save({"pixel_values": pixel_values, "features": expected}, tmp_path / "io.pt")
    run_python(
        f"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "merged")!r}).eval()
assert "sinder_peft" not in sys.modules
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    out = model(pixel_values=io["pixel_values"]).last_hidden_state
error = (out - io["features"]).abs().max().item()
assert error < 1e-4, error
""",
        cwd=REPO_ROOT,
    )


def test_adapter_refused_on_wrong_base(tmp_path: Path) -> None:
    peft_model = get_peft_model(tiny_dinov2("gelu", seed=0), SinderConfig())
    randomize_deltas(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), SinderConfig)
    with pytest.raises(ValueError, match="does not match the base weight"):
        PeftModel.from_pretrained(tiny_dinov2("gelu", seed=1), tmp_path / "adapter")
    # an already merged model is a wrong base too
    merged = peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="already has the adapter merged into it"):
        PeftModel.from_pretrained(merged, tmp_path / "adapter")


def shift_one_singular_value(peft_model: nn.Module, fraction: float) -> str:
    """Set every shift to zero but one: the largest singular value of the adapted layer where it is largest moves by
    `fraction` of itself. Returns that layer's name."""
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, SinderLinear)]
    name, layer = max(layers, key=lambda pair: float(pair[1].sinder_s[0]))
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, SinderLinear):
                module.sinder_delta["default"].zero_()
        layer.sinder_delta["default"][0] = fraction * layer.sinder_s[0]
    return name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["random", "demo"])
def test_a_two_percent_shift_is_refused_on_the_merged_model(tmp_path: Path, dtype: torch.dtype, source: str) -> None:
    """The double repair of the issue: an adapter that moves one layer's largest singular value by 2 % is loaded onto
    the model it was already merged into (saved and reloaded, as a `sinder repair` model/ would be)."""
    from sinder_peft.synthetic.demo import build_demo_model

    base = (tiny_dinov2("gelu", seed=3) if source == "random" else build_demo_model()).to(dtype)
    peft_model = get_peft_model(base, SinderConfig(layers_to_transform=[0]))
    layer_name = shift_one_singular_value(peft_model, 0.02)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = type(base).from_pretrained(tmp_path / "merged")
    assert next(merged.parameters()).dtype == dtype
    with pytest.raises(ValueError, match="already has the adapter merged into it") as raised:
        PeftModel.from_pretrained(merged, tmp_path / "adapter")
    assert layer_name.split("base_model.model.", 1)[1] in str(raised.value)
    assert "singular value 1" in str(raised.value) and "use it as it is" in str(raised.value)


@pytest.mark.parametrize("kind", KINDS)
def test_rounding_between_float32_and_bfloat16_is_accepted(tmp_path: Path, kind: str) -> None:
    """An adapter made on a float32 model loads onto the same model in bfloat16, and one made in bfloat16 onto the
    float32 original: rounding is not a different base model."""
    peft_model = get_peft_model(tiny_dinov2(kind, seed=4), SinderConfig())
    randomize_deltas(peft_model)
    peft_model.save_pretrained(tmp_path / "float32")
    PeftModel.from_pretrained(tiny_dinov2(kind, seed=4).to(torch.bfloat16), tmp_path / "float32")
    bfloat16_model = get_peft_model(tiny_dinov2(kind, seed=4).to(torch.bfloat16), SinderConfig())
    randomize_deltas(bfloat16_model)
    bfloat16_model.save_pretrained(tmp_path / "bfloat16")
    PeftModel.from_pretrained(tiny_dinov2(kind, seed=4), tmp_path / "bfloat16")


def test_fingerprint_tolerance_is_per_value_and_per_dtype() -> None:
    """Independent check of the tolerance against the rounding error it stands for: the largest change of a singular
    value caused by rounding a weight to bfloat16 stays below the tolerance, and 2 % of the top values stays above."""
    from sinder_peft.tuner.layer import fingerprint_tolerances, rounding_unit

    generator = torch.Generator().manual_seed(0)
    for rows, columns in ((64, 64), (64, 256), (256, 64)):
        weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 0.02
        values = torch.linalg.svdvals(weight)
        rounded = torch.linalg.svdvals(weight.to(torch.bfloat16).to(torch.float64))
        tolerance = fingerprint_tolerances(values, (rows, columns), rounding_unit(torch.bfloat16))
        assert (rounded[:4] - values[:4]).abs().max() < tolerance[:4].min() / 1.5
        assert (rounded.sum() - values.sum()).abs() < tolerance[4]
        assert (0.02 * values[:4] > tolerance[:4]).all()
        float32 = fingerprint_tolerances(values, (rows, columns), rounding_unit(torch.float32))
        assert (float32 < tolerance / 1000).all()


def test_adapter_saved_by_release_0_1_0_loads_and_gives_the_same_model(pixel_values: torch.Tensor) -> None:
    """`tests/data/adapter-0.1.0` was saved by sinder-peft 0.1.0 (fingerprints without the rounding unit,
    `fingerprint_rtol` in its config) on `tiny_dinov2("gelu", seed=0)`, shifts on blocks 0 and 2. It must load and
    apply W + U diag(delta) V^T, computed here from the saved shifts with an independent SVD."""
    from safetensors.torch import load_file

    directory = REPO_ROOT / "tests" / "data" / "adapter-0.1.0"
    assert json.loads((directory / "adapter_config.json").read_text())["fingerprint_rtol"] == 0.01
    saved = load_file(directory / "adapter_model.safetensors")
    assert all(value.numel() == 5 for key, value in saved.items() if "sinder_fingerprint" in key)
    loaded = PeftModel.from_pretrained(tiny_dinov2("gelu", seed=0), directory)

    expected = tiny_dinov2("gelu", seed=0)
    with torch.no_grad():
        for key, delta in saved.items():
            if "sinder_delta" not in key:
                continue
            module_name = key.split("base_model.model.", 1)[1].rsplit(".sinder_delta", 1)[0]
            linear = expected.get_submodule(module_name)
            left, values, right = torch.linalg.svd(linear.weight.double(), full_matrices=False)
            linear.weight.copy_(((left * (values + delta.double())) @ right).float())
    torch.testing.assert_close(features(loaded, pixel_values), features(expected, pixel_values), rtol=1e-4, atol=1e-5)


def test_bfloat16_merge_rounds_once(pixel_values: torch.Tensor) -> None:
    """Merging into a bfloat16 weight adds the shift in high precision and rounds once: every merged entry is the
    bfloat16 number nearest to W + U diag(delta) V^T (two roundings could land one bfloat16 step away)."""
    model = tiny_dinov2("gelu", seed=5).to(torch.bfloat16)
    peft_model = get_peft_model(model, SinderConfig())
    randomize_deltas(peft_model, scale=0.01)
    layers = [m for m in peft_model.modules() if isinstance(m, SinderLinear)]
    targets = []
    for layer in layers:
        base = layer.get_base_layer().weight.detach().double()
        left = layer.sinder_u.double()
        delta = layer.sinder_delta["default"].detach().double()
        targets.append(base + (left * delta) @ layer.sinder_vh.double())
    peft_model.merge_and_unload()
    for layer, target in zip(layers, targets, strict=True):
        merged = layer.get_base_layer().weight.detach()
        assert merged.dtype == torch.bfloat16
        nearest = target.to(torch.bfloat16)
        assert torch.equal(merged, nearest), (merged.double() - nearest.double()).abs().max()
