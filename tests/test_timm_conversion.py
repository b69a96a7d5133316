"""timm <-> transformers conversions (`models/timm/conversion.py`): every supported family against timm's own forward
pass, at the size the timm model was built for and at others; the round trip back into a fresh timm model; saving
and reloading with timm alone; the preprocessing read from `pretrained_cfg`; the errors.

The models are tiny and random, and every norm, bias, layer scale, token and position is drawn at random too (not
left at timm's ones and zeros), with weights of unit gain, so that a wrong mapping (a swapped q/k, the SwiGLU halves
in the wrong order, a missing norm) changes the features far beyond float32 rounding.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import REPO_ROOT, run_python
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from sinder_peft.models.timm.conversion import timm_to_transformers, transformers_to_timm
from sinder_peft.models.timm.links import TIMM_TO_TRANSFORMERS
from sinder_peft.models.timm.loading import (
    TimmPreprocessing,
    load_timm_model,
    require_timm,
    save_timm_model,
    timm_preprocessing,
)
from sinder_peft.tuner.architectures import ImageNormalization, describe_model

timm = pytest.importorskip("timm")

SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2}
GRID = 4
"""Every test model is built for a 4 x 4 patch grid (56 px at patch 14, 64 px at patch 16)."""

FAMILIES: dict[str, tuple[str, dict, str]] = {
    "dinov2": ("vit_small_patch14_dinov2", {}, "Dinov2Model"),
    "dinov2_swiglu": ("vit_giant_patch14_dinov2", {"mlp_ratio": 5.5}, "Dinov2Model"),
    "dinov2_swiglu_gate_last": (
        "vit_giant_patch14_dinov2",
        {"mlp_ratio": 5.5, "mlp_layer": partial(timm.layers.GluMlp, act_layer=nn.SiLU, gate_last=True)},
        "Dinov2Model",
    ),
    "dinov2_swiglu_split": (
        "vit_giant_patch14_dinov2",
        {"mlp_ratio": 2.75, "mlp_layer": timm.layers.SwiGLU},
        "Dinov2Model",
    ),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {}, "Dinov2WithRegistersModel"),
    "deit3": ("deit3_small_patch16_224", {}, "Dinov2Model"),
    "clip": ("vit_base_patch16_clip_224", {}, "CLIPVisionModel"),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}, "CLIPVisionModel"),
    "siglip": ("vit_base_patch16_siglip_224", {}, "SiglipVisionModel"),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", {}, "SiglipVisionModel"),
    "vit": ("vit_base_patch16_224", {}, "ViTModel"),
    "vit_no_biases": ("vit_base_patch16_224", {"qkv_bias": False, "proj_bias": False}, "ViTModel"),
    "deit": ("deit_tiny_patch16_224", {}, "ViTModel"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, "DeiTModel"),
    "dinov3": ("vit_small_patch16_dinov3", {}, "DINOv3ViTModel"),
    "dinov3_qkv_bias": ("vit_small_patch16_dinov3_qkvb", {}, "DINOv3ViTModel"),
    "dinov3_swiglu": ("vit_huge_plus_patch16_dinov3", {}, "DINOv3ViTModel"),
    "dinov3_no_registers": ("vit_small_patch16_dinov3", {"num_reg_tokens": 0}, "DINOv3ViTModel"),
    # the pathology models' model-card arguments (presets.PRESETS), widths shrunk where timm needs an even SwiGLU
    "uni": ("vit_large_patch16_224", {"init_values": 1e-5, "dynamic_img_size": True}, "Dinov2WithRegistersModel"),
    "uni2": (
        "vit_giant_patch14_224",
        {
            "embed_dim": 96,
            "mlp_ratio": 2.66667 * 2,
            "init_values": 1e-5,
            "no_embed_class": True,
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        "Dinov2WithRegistersModel",
    ),
    "virchow": (
        "vit_huge_patch14_224",
        {
            "embed_dim": 160,
            "num_heads": 4,
            "mlp_ratio": 5.3375,  # a SwiGLU 427 wide: transformers builds 432, 5 zero units of padding
            "init_values": 1e-5,
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": nn.SiLU,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        "Dinov2WithRegistersModel",
    ),
    "virchow2": (
        "vit_huge_patch14_224",
        {
            "embed_dim": 160,
            "num_heads": 4,
            "mlp_ratio": 5.3375,
            "init_values": 1e-5,
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 4,
            "no_embed_class": True,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        "Dinov2WithRegistersModel",
    ),
    "h_optimus": (
        "vit_giant_patch14_reg4_dinov2",
        {"embed_dim": 96, "init_values": 1e-5, "dynamic_img_size": False},
        "Dinov2WithRegistersModel",
    ),
    "gigapath": ("vit_giant_patch14_dinov2", {"embed_dim": 96, "patch_size": 16}, "Dinov2Model"),
    "gelu_padded": ("vit_base_patch16_224", {"init_values": 1e-5, "mlp_ratio": 4.25}, "Dinov2Model"),
}
INTERPOLATING_LIKE_TIMM = ("dinov2_registers", "dinov3", "dinov2", "deit3", "uni", "uni2", "virchow", "virchow2")
"""Families whose transformers model resizes positions exactly as timm does (antialiased bicubic, or RoPE) when timm
resizes them itself (`dynamic_img_size=True`): registers, DINOv3, and the DINOv2 ones converted to
`Dinov2WithRegistersModel` for that reason."""
PADDED = ("virchow", "virchow2", "gelu_padded")
"""Families whose timm MLP width no integer DINOv2 `mlp_ratio` builds: the transformers MLP has zero units more."""


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter of `model` at random and return it in eval mode: matrices (and convolutions) with unit
    gain, norm weights and layer scales in [0.5, 1.5], biases, tokens and positions from N(0, 0.5²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and parameter.shape[0] > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter[0].numel() ** -0.5)
            elif name.endswith("weight") or "gamma" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


def build(family: str, seed: int = 0, **overrides: object) -> nn.Module:
    """Return the tiny random timm model of `family` (see `FAMILIES`), built for a `GRID` x `GRID` patch grid."""
    name, kwargs, _ = FAMILIES[family]
    patch = int(kwargs.get("patch_size", 14 if "patch14" in name else 16))
    arguments = {**SMALL, "img_size": GRID * patch, **kwargs, **overrides}
    return randomize(timm.create_model(name, pretrained=False, **arguments), seed)


def patch_size(model: nn.Module) -> int:
    """Return the side of the timm model's (square) patches."""
    return int(model.patch_embed.patch_size[0])


def pixels(model: nn.Module, grid: int = GRID, seed: int = 0) -> torch.Tensor:
    """Return two random images of `grid` x `grid` patches of the timm model."""
    size = grid * patch_size(model)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def transformers_features(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Return what timm's `forward_features` computes: `last_hidden_state`, after `post_layernorm` for CLIP (whose
    `last_hidden_state` is before it), with the positions interpolated where the model needs to be told."""
    kwargs = (
        {"interpolate_pos_encoding": True}
        if model.config.model_type in ("vit", "deit", "clip_vision_model", "siglip_vision_model")
        else {}
    )
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values, **kwargs).last_hidden_state
        return model.post_layernorm(hidden) if model.config.model_type == "clip_vision_model" else hidden


def timm_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Return timm's `forward_features` (the tokens after the final norm)."""
    with torch.no_grad():
        return model.forward_features(pixel_values)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| relative to the features' scale (max |expected|)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max())


# ----------------------------------------------------------------------------------------------------------------
# timm -> transformers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_timm_at_the_native_size(family: str) -> None:
    model = build(family)
    converted = timm_to_transformers(model)
    assert type(converted).__name__ == FAMILIES[family][2]
    assert not converted.training and all(p.dtype == torch.float32 for p in converted.parameters())
    describe_model(converted)  # the converted model is one the repair supports
    x = pixels(model)
    expected = timm_features(model, x)
    assert relative_difference(transformers_features(converted, x), expected) < 1e-5


def test_the_pooled_outputs_equal_timm() -> None:
    """SigLIP's attention-pool head is converted (`pooler_output` is timm's pooled features); CLIP's pooler is
    `post_layernorm` of the class token, timm's normed class token."""
    siglip = build("siglip")
    converted = timm_to_transformers(siglip)
    assert converted.config.vision_use_head
    x = pixels(siglip)
    with torch.no_grad():
        expected = siglip.forward_head(siglip.forward_features(x), pre_logits=True)
        assert relative_difference(converted(pixel_values=x).pooler_output, expected) < 1e-5
    assert not timm_to_transformers(build("siglip_gap")).config.vision_use_head
    clip = build("clip")
    with torch.no_grad():
        pooled = timm_to_transformers(clip)(pixel_values=x).pooler_output
    assert relative_difference(pooled, timm_features(clip, x)[:, 0]) < 1e-5


@pytest.mark.parametrize("grid", [3, 6])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_timm_model_resized_first_converts_exactly_at_its_new_size(family: str, grid: int) -> None:
    """timm's own way to another size (`set_input_size`: its position table resampled), converted afterwards."""
    model = build(family)
    size = grid * patch_size(model)
    model.set_input_size(img_size=(size, size))
    converted = timm_to_transformers(model)
    x = pixels(model, grid)
    assert relative_difference(transformers_features(converted, x), timm_features(model, x)) < 1e-5


@pytest.mark.parametrize("grid", [3, 6])
@pytest.mark.parametrize("family", INTERPOLATING_LIKE_TIMM)
def test_transformers_resizes_positions_as_timm_for_dynamic_sizes(family: str, grid: int) -> None:
    """`Dinov2WithRegistersModel` interpolates the position table as timm's `dynamic_img_size` does (bicubic with
    antialiasing), so a DINOv2-like model with `dynamic_img_size=True` converts to it, with or without registers;
    DINOv3 computes RoPE for any grid. All equal timm at other sizes, up and down."""
    model = build(family, dynamic_img_size=True)
    converted = timm_to_transformers(model)
    assert type(converted).__name__ == ("DINOv3ViTModel" if "dinov3" in family else "Dinov2WithRegistersModel")
    x = pixels(model, grid)
    assert relative_difference(transformers_features(converted, x), timm_features(model, x)) < 1e-5


@pytest.mark.parametrize("family", ["vit", "clip", "siglip", "deit_distilled"])
def test_the_other_families_interpolate_positions_unlike_timm(family: str, caplog: pytest.LogCaptureFixture) -> None:
    """Documents the one inexact case: at other sizes timm antialiases the resized position table, transformers does
    not, so the features differ (by a few percent with these random tables), and converting warns about it."""
    model = build(family, dynamic_img_size=True)
    with caplog.at_level("WARNING"):
        converted = timm_to_transformers(model)
    assert "antialiasing" in caplog.text
    x = pixels(model, 6)
    assert relative_difference(transformers_features(converted, x), timm_features(model, x)) < 0.2
    assert relative_difference(transformers_features(converted, x), timm_features(model, x)) > 1e-3


@pytest.mark.parametrize("family", ["dinov2_swiglu", "dinov2_swiglu_gate_last", "dinov3_swiglu"])
def test_a_wrong_gate_order_would_not_pass(family: str) -> None:
    """Swapping the converted SwiGLU's gate and value projections changes the features: the tests above see the
    chunk order of timm's packed fc1 (gate first unless gate_last)."""
    model = build(family)
    converted = timm_to_transformers(model)
    x = pixels(model)
    expected = timm_features(model, x)
    blocks = converted.encoder.layer if hasattr(converted, "encoder") else converted.model.layer
    with torch.no_grad():
        for block in blocks:
            gate, up = block.mlp.gate_proj, block.mlp.up_proj
            gate.weight, up.weight = up.weight, gate.weight
            gate.bias, up.bias = up.bias, gate.bias
    assert relative_difference(transformers_features(converted, x), expected) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# transformers -> timm
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_round_trip_into_a_fresh_timm_model_is_exact(family: str) -> None:
    model = build(family, num_classes=0)
    fresh = build(family, seed=1, num_classes=0)
    assert transformers_to_timm(timm_to_transformers(model), fresh) is fresh
    original, written = model.state_dict(), fresh.state_dict()
    assert original.keys() == written.keys()
    assert [key for key in original if not torch.equal(original[key], written[key])] == []


def test_writing_back_leaves_the_classifier_as_it_is() -> None:
    model = build("vit", num_classes=10)
    fresh = build("vit", seed=1, num_classes=10)
    head = {key: tensor.clone() for key, tensor in fresh.state_dict().items() if key.startswith("head.")}
    transformers_to_timm(timm_to_transformers(model), fresh)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, head[key] if key.startswith("head.") else model.state_dict()[key]), key


def test_writing_back_ignores_a_vit_pooler() -> None:
    """A `ViTModel` loaded with `AutoModel` has a pooler, which timm has no place for."""
    model = build("vit", num_classes=0)
    source = timm_to_transformers(model)
    with_pooler = type(source)(source.config, add_pooling_layer=True)
    with_pooler.load_state_dict(source.state_dict(), strict=False)
    fresh = transformers_to_timm(with_pooler, build("vit", seed=1, num_classes=0))
    assert all(torch.equal(fresh.state_dict()[key], tensor) for key, tensor in model.state_dict().items())


def test_writing_back_refuses_another_architecture() -> None:
    converted = timm_to_transformers(build("dinov2"))
    with pytest.raises(ValueError, match="num_hidden_layers=2 .*3"):
        transformers_to_timm(converted, build("dinov2", depth=3))
    with pytest.raises(ValueError, match="converts to a CLIPVisionModel, but the transformers model is a Dinov2Model"):
        transformers_to_timm(converted, build("clip"))


def test_writing_back_refuses_values_timm_cannot_hold() -> None:
    """Where timm has no bias, the transformers model computes with zeros; a non-zero one cannot go back, and
    nothing is written then."""
    converted = timm_to_transformers(build("vit_no_biases"))
    fresh = build("vit_no_biases", seed=1)
    before = {key: tensor.clone() for key, tensor in fresh.state_dict().items()}
    with torch.no_grad():
        converted.layers[1].attention.o_proj.bias.fill_(0.1)
    with pytest.raises(ValueError, match="o_proj.bias .*no tensor"):
        transformers_to_timm(converted, fresh)
    assert all(torch.equal(fresh.state_dict()[key], tensor) for key, tensor in before.items())


# ----------------------------------------------------------------------------------------------------------------
# Files and preprocessing
# ----------------------------------------------------------------------------------------------------------------

OVERLAY = {
    "mean": (0.1, 0.2, 0.3),
    "std": (0.4, 0.5, 0.6),
    "interpolation": "bilinear",
    "crop_pct": 0.8,
    "crop_mode": "squash",
}


def test_timm_preprocessing_reads_the_pretrained_cfg() -> None:
    model = build("dinov2_registers", pretrained_cfg_overlay=OVERLAY)
    assert timm_preprocessing(model) == TimmPreprocessing(
        normalization=ImageNormalization(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        input_size=(3, 56, 56),
        interpolation="bilinear",
        crop_pct=0.8,
        crop_mode="squash",
    )
    clip = build("clip")  # its own pretrained_cfg: OpenAI's mean and std; input size the model's, as it has one
    cfg = clip.pretrained_cfg
    assert timm_preprocessing(clip) == TimmPreprocessing(
        ImageNormalization(mean=tuple(cfg["mean"]), std=tuple(cfg["std"])),
        (3, 64, 64),
        cfg["interpolation"],
        cfg["crop_pct"],
        cfg["crop_mode"],
    )
    assert cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    defaults = timm_preprocessing(nn.Linear(2, 2))  # no pretrained_cfg: timm's defaults
    assert defaults.normalization == ImageNormalization() and defaults.crop_pct == 0.875


@pytest.mark.parametrize("family", ["dinov2_registers", "clip", "dinov3"])
def test_a_saved_model_reloads_with_timm_alone(family: str, tmp_path: Path) -> None:
    model = build(family, pretrained_cfg_overlay=OVERLAY)
    directory = save_timm_model(model, tmp_path / "saved")
    assert sorted(path.name for path in directory.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert f'timm.create_model("local-dir:{directory}", pretrained=True)' in (directory / "README.md").read_text()
    x = pixels(model)
    torch.save(x, tmp_path / "pixels.pt")
    script = f"""
import json, sys, torch, timm
model = timm.create_model("local-dir:{directory}", pretrained=True).eval()
with torch.no_grad():
    torch.save(model.forward_features(torch.load({str(tmp_path / "pixels.pt")!r})), {str(tmp_path / "features.pt")!r})
cfg = model.pretrained_cfg
print(json.dumps({{key: cfg[key] for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode")}}))
assert not any(name.startswith("sinder_peft") for name in sys.modules)
"""
    result = run_python(script, cwd=REPO_ROOT)
    assert torch.equal(torch.load(tmp_path / "features.pt"), timm_features(model, x))
    kept = json.loads(result.stdout.strip().splitlines()[-1])
    assert kept == {key: list(value) if isinstance(value, tuple) else value for key, value in OVERLAY.items()}
    reloaded = load_timm_model(str(directory))
    assert not reloaded.training
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in model.state_dict().items())
    assert timm_preprocessing(reloaded) == timm_preprocessing(model)


@pytest.mark.parametrize("family", ["virchow2", "uni2"])
def test_a_model_with_layer_arguments_saves_and_reloads_with_the_readme_line(family: str, tmp_path: Path) -> None:
    """timm's `save_for_hf` refuses arguments that are Python objects; `save_timm_model` gives their names instead
    (config.json stays JSON), and the README's line, run as it is in a fresh process with timm alone, loads the
    same model: the same features at the native size and at twice it (`dynamic_img_size`)."""
    model = build(family, num_classes=0)
    directory = save_timm_model(model, tmp_path / "saved", load_path=tmp_path / "final")
    config = json.loads((directory / "config.json").read_text())
    assert config["model_args"]["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert config["model_args"]["act_layer"] == "silu"  # timm's own name: timm reads it back by itself
    readme = (directory / "README.md").read_text()
    line = f'timm.create_model("local-dir:{tmp_path / "final"}", pretrained=True, mlp_layer=timm.layers.SwiGLUPacked)'
    assert line in readme
    directory.rename(tmp_path / "final")
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    small, large = pixels(model, GRID), pixels(model, 2 * GRID, seed=1)
    torch.save({"small": small, "large": large}, tmp_path / "pixels.pt")
    script = f"""{code}
import sys, torch
model.eval()
x = torch.load({str(tmp_path / "pixels.pt")!r})
with torch.no_grad():
    torch.save({{key: model.forward_features(value) for key, value in x.items()}}, {str(tmp_path / "out.pt")!r})
assert not any(name.startswith("sinder_peft") for name in sys.modules)
"""
    run_python(script, cwd=REPO_ROOT)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["small"], timm_features(model, small))
    assert torch.equal(out["large"], timm_features(model, large))
    # `--model timm:DIR` resolves the recorded names itself: no --model-kwargs needed to read the export back
    reloaded = load_timm_model(str(tmp_path / "final"))
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in model.state_dict().items())


def test_writing_back_refuses_padding_units_that_are_no_longer_zero() -> None:
    """Virchow's SwiGLU is 5 units narrower than any transformers DINOv2 MLP: those units are zero and add nothing
    (checked against timm above); a transformers model that put real values there cannot go back."""
    converted = timm_to_transformers(build("virchow"))
    mlp = converted.encoder.layer[0].mlp
    assert mlp.gate_proj.out_features == 432 and build("virchow").blocks[0].mlp.fc2.in_features == 427
    assert torch.equal(mlp.up_proj.weight[427:], torch.zeros(5, 160))
    with torch.no_grad():
        mlp.down_proj.weight[:, 430] += 1e-9  # float rounding of a merge: within the tolerance
    transformers_to_timm(converted, build("virchow", seed=1))
    with torch.no_grad():
        mlp.down_proj.weight[:, 430] = 0.1
    with pytest.raises(ValueError, match="down_proj.weight .*no tensor"):
        transformers_to_timm(converted, build("virchow", seed=1))


def test_a_named_model_loads_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timm name (here timm's 0.4M-parameter `test_vit`) whose weights are in the local cache loads offline."""
    weights = randomize(timm.create_model("test_vit", pretrained=False), 3).state_dict()
    snapshot = tmp_path / "cache" / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(weights, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = load_timm_model("test_vit.r160_in1k")
    assert not model.training
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*hf download timm/test_vit"):
        load_timm_model("test_vit.r160_in1k")


def test_load_timm_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory holding a timm model"):
        load_timm_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_timm_model(str(tmp_path / "empty"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_timm_model(str(tmp_path / "no_weights"))
    with pytest.raises(ValueError, match="neither a directory nor a timm model name"):
        load_timm_model("not_a_timm_model")


def test_save_timm_model_needs_a_timm_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timm.create_model"):
        save_timm_model(nn.Linear(2, 2), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_an_architecture_without_equivalent_is_refused_naming_the_supported_ones() -> None:
    for name in ("convnext_atto", "eva02_tiny_patch14_224"):
        with pytest.raises(ValueError, match="no transformers equivalent") as raised:
            timm_to_transformers(timm.create_model(name, pretrained=False))
        assert all(target in str(raised.value) for target in TIMM_TO_TRANSFORMERS.values())


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        ("vit", {"qk_norm": True}, "qk_norm"),
        ("vit", {"global_pool": "avg"}, "fc_norm"),
        ("vit", {"final_norm": False}, "final_norm=False"),
        ("vit", {"norm_layer": "rmsnorm"}, "RmsNorm"),
        ("vit", {"act_layer": "relu"}, "activation is ReLU"),
        ("vit", {"scale_mlp_norm": True}, "MLP has a norm"),
        ("vit", {"pos_embed": "none"}, "no position embedding"),
        ("vit", {"dynamic_img_size": True, "dynamic_img_pad": True}, "dynamic_img_pad"),
        ("vit", {"reg_tokens": 2}, "register tokens have positions"),
        ("vit", {"block_fn": timm.models.vision_transformer.ResPostBlock}, "ResPostBlock"),
        ("vit", {"img_size": (64, 96)}, "image size"),
        ("siglip", {"pre_norm": True}, "norm_pre"),
        ("clip", {"init_values": 1e-5}, "layer scale"),
        ("dinov2", {"mlp_ratio": 70}, "integer mlp_ratio up to 64"),
        ("dinov3", {"qk_norm": True}, "qk_norm"),
        ("dinov3", {"use_abs_pos_emb": True}, "absolute positions"),
    ],
)
def test_an_option_the_conversion_does_not_reproduce_is_refused(family: str, options: dict, message: str) -> None:
    model = build(family, **options)
    with pytest.raises(ValueError, match=message):
        timm_to_transformers(model)


def test_require_timm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_timm() is timm
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'sinder-peft\[timm\]'"):
        require_timm()
    with pytest.raises(ImportError, match=r"sinder-peft\[timm\]"):
        timm_to_transformers(nn.Linear(2, 2))
