"""Tests for `models.original_layout` and `models.conversion`: original DINOv2 layout <-> transformers DINOv2 models.

The reference is an independent re-implementation, written here, of the original repository's forward pass
(`DinoVisionTransformer.forward_features`: patch convolution, CLS token, position embeddings, registers inserted after
CLS, pre-norm blocks with a fused qkv attention, layer scales, a GELU MLP or a fused SwiGLU `w12`/`w3`, final norm),
run directly on original-layout tensors. At the native resolution no interpolation happens and the two must agree.
At a non-square size the position embeddings are interpolated the way transformers does it (bicubic to an explicit
size; antialiased for the with-registers model, as the original `dinov2_vit*14_reg` hub models also do). The original
`dinov2_vit*14` hub models instead use `interpolate_offset=0.1` without antialias, a deliberate, documented difference
(docs/models.md) that these tests therefore do not try to reproduce.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from sinder_peft.models.conversion import add_parser, convert_checkpoint
from sinder_peft.models.original_layout import (
    export_original_checkpoint,
    infer_original_config,
    load_original_checkpoint,
    read_original_state_dict,
)

HIDDEN = 128
PATCH = 4
GRID = 4
NATIVE = (GRID * PATCH, GRID * PATCH)
NON_SQUARE = (3 * PATCH, 7 * PATCH)  # 3 x 7 patches: shrinks one side, grows the other

VARIANTS = {
    "gelu": {"swiglu": False, "registers": 0},
    "swiglu": {"swiglu": True, "registers": 0},
    "registers": {"swiglu": False, "registers": 4},
    "registers_swiglu": {"swiglu": True, "registers": 2},
}


def original_swiglu_width(hidden: int, mlp_ratio: int) -> int:
    """Hidden width of the original `SwiGLUFFNFused` (two thirds of hidden * ratio, rounded up to a multiple of 8)."""
    return (int(int(hidden * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def make_original_state_dict(
    *,
    swiglu: bool = False,
    registers: int = 0,
    depth: int = 2,
    hidden: int = HIDDEN,
    mlp_ratio: int = 4,
    layerscale: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the original DINOv2 layout, scaled so that activations stay of order one."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state_dict = {
        "cls_token": randn(1, 1, hidden),
        "pos_embed": randn(1, 1 + GRID * GRID, hidden),
        "mask_token": randn(1, hidden),
        "patch_embed.proj.weight": randn(hidden, 3, PATCH, PATCH, scale=0.2),
        "patch_embed.proj.bias": randn(hidden, scale=0.1),
        "norm.weight": 1 + randn(hidden, scale=0.1),
        "norm.bias": randn(hidden, scale=0.1),
    }
    if registers:
        state_dict["register_tokens"] = randn(1, registers, hidden)
    for index in range(depth):
        block = f"blocks.{index}."
        state_dict.update(
            {
                block + "norm1.weight": 1 + randn(hidden, scale=0.1),
                block + "norm1.bias": randn(hidden, scale=0.1),
                block + "attn.qkv.weight": randn(3 * hidden, hidden, scale=hidden**-0.5),
                block + "attn.qkv.bias": randn(3 * hidden, scale=0.1),
                block + "attn.proj.weight": randn(hidden, hidden, scale=hidden**-0.5),
                block + "attn.proj.bias": randn(hidden, scale=0.1),
                block + "norm2.weight": 1 + randn(hidden, scale=0.1),
                block + "norm2.bias": randn(hidden, scale=0.1),
            }
        )
        if layerscale:
            state_dict[block + "ls1.gamma"] = 0.5 + torch.rand(hidden, generator=generator)
            state_dict[block + "ls2.gamma"] = 0.5 + torch.rand(hidden, generator=generator)
        if swiglu:
            width = original_swiglu_width(hidden, mlp_ratio)
            state_dict[block + "mlp.w12.weight"] = randn(2 * width, hidden, scale=hidden**-0.5)
            state_dict[block + "mlp.w12.bias"] = randn(2 * width, scale=0.1)
            state_dict[block + "mlp.w3.weight"] = randn(hidden, width, scale=width**-0.5)
            state_dict[block + "mlp.w3.bias"] = randn(hidden, scale=0.1)
        else:
            width = hidden * mlp_ratio
            state_dict[block + "mlp.fc1.weight"] = randn(width, hidden, scale=hidden**-0.5)
            state_dict[block + "mlp.fc1.bias"] = randn(width, scale=0.1)
            state_dict[block + "mlp.fc2.weight"] = randn(hidden, width, scale=width**-0.5)
            state_dict[block + "mlp.fc2.bias"] = randn(hidden, scale=0.1)
    return state_dict


def original_forward(
    state_dict: dict[str, torch.Tensor], pixel_values: torch.Tensor, *, num_heads: int, antialias: bool
) -> torch.Tensor:
    """The original DINOv2 `forward_features` (final-norm tokens: CLS, registers, patches), from raw tensors."""
    hidden = state_dict["cls_token"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(
        pixel_values, state_dict["patch_embed.proj.weight"], state_dict["patch_embed.proj.bias"], stride=patch
    )
    batch, _, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state_dict["cls_token"].expand(batch, -1, -1), x], dim=1)
    pos_embed = state_dict["pos_embed"]
    side = int((pos_embed.shape[1] - 1) ** 0.5)
    if (grid_h, grid_w) != (side, side):
        grid = pos_embed[:, 1:].reshape(1, side, side, hidden).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=antialias, align_corners=False)
        pos_embed = torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, hidden)], dim=1)
    x = x + pos_embed
    if "register_tokens" in state_dict:
        x = torch.cat([x[:, :1], state_dict["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    tokens = x.shape[1]
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    for index in range(depth):
        p = {
            key.removeprefix(f"blocks.{index}."): v
            for key, v in state_dict.items()
            if key.startswith(f"blocks.{index}.")
        }
        h = F.layer_norm(x, (hidden,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p.get("attn.qkv.bias"))
        qkv = qkv.reshape(batch, tokens, 3, num_heads, hidden // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (hidden // num_heads) ** -0.5, qkv[1], qkv[2]
        h = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        h = F.linear(h.transpose(1, 2).reshape(batch, tokens, hidden), p["attn.proj.weight"], p["attn.proj.bias"])
        x = x + h * p.get("ls1.gamma", torch.ones(hidden))
        h = F.layer_norm(x, (hidden,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        if "mlp.w12.weight" in p:
            gate, up = F.linear(h, p["mlp.w12.weight"], p["mlp.w12.bias"]).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, p["mlp.w3.weight"], p["mlp.w3.bias"])
        else:
            h = F.linear(
                F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
            )
        x = x + h * p.get("ls2.gamma", torch.ones(hidden))
    return F.layer_norm(x, (hidden,), state_dict["norm.weight"], state_dict["norm.bias"], eps=1e-6)


def transformers_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).last_hidden_state


def images(size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_same_state_dict(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("size", [NATIVE, NON_SQUARE], ids=["native", "non_square"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_reproduces_original_forward(variant: str, size: tuple[int, int]) -> None:
    spec = VARIANTS[variant]
    state_dict = make_original_state_dict(**spec)
    model = load_original_checkpoint(state_dict)

    expected_class = Dinov2WithRegistersModel if spec["registers"] else Dinov2Model
    assert type(model) is expected_class
    assert not model.training
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (HIDDEN, 2, HIDDEN // 64)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (PATCH, GRID * PATCH, 4)
    assert config.use_swiglu_ffn is spec["swiglu"]
    assert getattr(config, "num_register_tokens", 0) == spec["registers"]

    pixel_values = images(size)
    expected = original_forward(state_dict, pixel_values, num_heads=HIDDEN // 64, antialias=bool(spec["registers"]))
    actual = transformers_features(model, pixel_values)
    assert actual.shape == (2, 1 + spec["registers"] + (size[0] // PATCH) * (size[1] // PATCH), HIDDEN)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


# Released DINOv2 ViT/14 models: (embed_dim, depth, ffn) as built by the original `vit_small` … `vit_giant2`.
RELEASED_SIZES = {
    "small": (384, 12, "mlp"),
    "base": (768, 12, "mlp"),
    "large": (1024, 24, "mlp"),
    "giant": (1536, 40, "swiglu"),
}


def released_shapes(embed_dim: int, depth: int, ffn: str, registers: int) -> dict[str, torch.Tensor]:
    """Shape-only (meta) tensors laid out like a released `dinov2_vit*14[_reg4]_pretrain.pth` at 518 px."""
    width = original_swiglu_width(embed_dim, 4) if ffn == "swiglu" else 4 * embed_dim

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    shapes = {
        "cls_token": meta(1, 1, embed_dim),
        "pos_embed": meta(1, 1 + 37 * 37, embed_dim),
        "mask_token": meta(1, embed_dim),
        "patch_embed.proj.weight": meta(embed_dim, 3, 14, 14),
        "patch_embed.proj.bias": meta(embed_dim),
        "norm.weight": meta(embed_dim),
        "norm.bias": meta(embed_dim),
    }
    if registers:
        shapes["register_tokens"] = meta(1, registers, embed_dim)
    for index in range(depth):
        block = f"blocks.{index}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma"):
            shapes[block + name] = meta(embed_dim)
        shapes.update(
            {
                block + "attn.qkv.weight": meta(3 * embed_dim, embed_dim),
                block + "attn.qkv.bias": meta(3 * embed_dim),
                block + "attn.proj.weight": meta(embed_dim, embed_dim),
                block + "attn.proj.bias": meta(embed_dim),
            }
        )
        first, second = ("w12", "w3") if ffn == "swiglu" else ("fc1", "fc2")
        first_width = 2 * width if ffn == "swiglu" else width
        shapes[f"{block}mlp.{first}.weight"] = meta(first_width, embed_dim)
        shapes[f"{block}mlp.{first}.bias"] = meta(first_width)
        shapes[f"{block}mlp.{second}.weight"] = meta(embed_dim, width)
        shapes[f"{block}mlp.{second}.bias"] = meta(embed_dim)
    return shapes


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
@pytest.mark.parametrize("size", list(RELEASED_SIZES))
def test_released_sizes_infer_the_hub_configs(size: str, registers: int) -> None:
    embed_dim, depth, ffn = RELEASED_SIZES[size]
    model = load_original_checkpoint(released_shapes(embed_dim, depth, ffn, registers))
    config = model.config
    # the values of facebook/dinov2-{size} and facebook/dinov2-with-registers-{size}
    assert config.model_type == ("dinov2_with_registers" if registers else "dinov2")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        embed_dim,
        depth,
        embed_dim // 64,
    )
    assert (config.image_size, config.patch_size, config.mlp_ratio, config.qkv_bias) == (518, 14, 4, True)
    assert config.use_swiglu_ffn is (ffn == "swiglu")
    assert getattr(config, "num_register_tokens", 0) == registers


def test_dtype_is_kept(tmp_path: Path) -> None:
    state_dict = {key: tensor.half() for key, tensor in make_original_state_dict(swiglu=True).items()}
    model = load_original_checkpoint(state_dict)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float16}
    assert_same_state_dict(export_original_checkpoint(model, tmp_path / "half.pth"), state_dict)


def test_explicit_config_sets_the_number_of_heads() -> None:
    state_dict = make_original_state_dict()
    config = Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=8,
        mlp_ratio=4,
        image_size=GRID * PATCH,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
    )
    model = load_original_checkpoint(state_dict, config=config)
    assert model.config.num_attention_heads == 8
    pixel_values = images(NATIVE)
    with_8_heads = original_forward(state_dict, pixel_values, num_heads=8, antialias=False)
    torch.testing.assert_close(transformers_features(model, pixel_values), with_8_heads, atol=1e-4, rtol=0)
    with_2_heads = original_forward(state_dict, pixel_values, num_heads=2, antialias=False)
    assert (with_8_heads - with_2_heads).abs().max() > 1e-2  # the head count really matters for this check


def test_checkpoint_without_layer_scale_or_mask_token() -> None:
    state_dict = make_original_state_dict(layerscale=False)
    del state_dict["mask_token"]
    model = load_original_checkpoint(state_dict)
    assert torch.equal(model.encoder.layer[1].layer_scale2.lambda1, torch.ones(HIDDEN))
    assert torch.equal(model.embeddings.mask_token, torch.zeros(1, HIDDEN))
    pixel_values = images(NATIVE)
    expected = original_forward(state_dict, pixel_values, num_heads=2, antialias=False)
    torch.testing.assert_close(transformers_features(model, pixel_values), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip(variant: str, tmp_path: Path) -> None:
    state_dict = make_original_state_dict(**VARIANTS[variant])
    model = load_original_checkpoint(state_dict)

    exported = export_original_checkpoint(model, tmp_path / "original.pth")
    assert_same_state_dict(exported, state_dict)
    assert_same_state_dict(torch.load(tmp_path / "original.pth", weights_only=True), state_dict)

    export_original_checkpoint(model, tmp_path / "original.safetensors")
    reloaded = load_original_checkpoint(tmp_path / "original.safetensors")
    assert_same_state_dict(reloaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("registers", [0, 3])
def test_transformers_model_survives_export_and_reload(registers: int, tmp_path: Path) -> None:
    common = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1, "image_size": 12, "patch_size": 4}
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, use_swiglu_ffn=True, **common)
        model = Dinov2WithRegistersModel(config)
    else:
        model = Dinov2Model(Dinov2Config(qkv_bias=False, **common))
    export_original_checkpoint(model, tmp_path / "original.pt")
    reloaded = load_original_checkpoint(tmp_path / "original.pt")
    assert type(reloaded) is type(model)
    assert reloaded.config.qkv_bias is model.config.qkv_bias
    assert_same_state_dict(reloaded.state_dict(), model.state_dict())


def test_model_without_mask_token_exports_zeros(tmp_path: Path) -> None:
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=12, patch_size=4, use_mask_token=False
    )
    model = Dinov2Model(config)
    exported = export_original_checkpoint(model, tmp_path / "original.pth")
    assert torch.equal(exported["mask_token"], torch.zeros(1, 64))
    reloaded = load_original_checkpoint(tmp_path / "original.pth", config=config)
    assert reloaded.embeddings.mask_token is None
    assert_same_state_dict(reloaded.state_dict(), model.state_dict())


def test_peft_model_exports_the_weights_it_computes(tmp_path: Path) -> None:
    from peft import get_peft_model

    from sinder_peft import SinderConfig, SinderLinear

    state_dict = make_original_state_dict(swiglu=True)
    peft_model = get_peft_model(load_original_checkpoint(state_dict), SinderConfig())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, SinderLinear):
                for delta in module.sinder_delta.values():
                    delta.copy_(0.3 * torch.randn(delta.shape, generator=generator) * module.sinder_s)
    pixel_values = images(NATIVE)
    adapted = transformers_features(peft_model, pixel_values)

    exported = export_original_checkpoint(peft_model, tmp_path / "repaired.pth")
    assert not torch.allclose(exported["blocks.0.attn.proj.weight"], state_dict["blocks.0.attn.proj.weight"])
    assert torch.equal(exported["blocks.0.attn.qkv.weight"][:HIDDEN], state_dict["blocks.0.attn.qkv.weight"][:HIDDEN])
    expected = original_forward(exported, pixel_values, num_heads=2, antialias=False)
    torch.testing.assert_close(adapted, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(transformers_features(load_original_checkpoint(exported), pixel_values), adapted)


def rechunk(key: str, position: Callable[[int], str]) -> str:
    """Rename `blocks.{i}.rest` to `blocks.{position(i)}.rest` (original BlockChunk layout); other keys unchanged."""
    if not key.startswith("blocks."):
        return key
    _, index, rest = key.split(".", 2)
    return f"blocks.{position(int(index))}.{rest}"


def test_wrapped_prefixed_and_chunked_checkpoints() -> None:
    state_dict = make_original_state_dict(swiglu=True, depth=4)
    reference = load_original_checkpoint(state_dict).state_dict()
    head = {"dino_head.mlp.0.weight": torch.zeros(3, 3)}
    chunked = {rechunk(key, lambda index: f"{index // 2}.{index}"): v for key, v in state_dict.items()}
    restarting = {rechunk(key, lambda index: f"{index // 2}.{index % 2}"): v for key, v in state_dict.items()}
    variants = {
        "model+module": {"model": {f"module.{key}": v for key, v in state_dict.items()}, "iteration": 3},
        "state_dict+backbone": {"state_dict": {f"backbone.{key}": v for key, v in state_dict.items()}},
        "teacher+backbone+head": {"teacher": {**{f"backbone.{key}": v for key, v in state_dict.items()}, **head}},
        "teacher.backbone over student": {
            "model": {
                **{f"teacher.backbone.{key}": v for key, v in state_dict.items()},
                **{f"student.backbone.{key}": torch.zeros_like(v) for key, v in state_dict.items()},
            }
        },
        "chunked (original padding)": chunked,
        "chunked (restarting indices)": restarting,
    }
    assert "blocks.1.2.norm1.weight" in chunked and "blocks.1.0.norm1.weight" in restarting
    for name, checkpoint in variants.items():
        assert_same_state_dict(read_original_state_dict(checkpoint), state_dict)
        assert_same_state_dict(load_original_checkpoint(checkpoint).state_dict(), reference), name


def test_missing_block_key_is_named(tmp_path: Path) -> None:
    state_dict = make_original_state_dict(depth=3)
    del state_dict["blocks.1.mlp.fc2.weight"]
    torch.save(state_dict, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.weight\b") as error:
        load_original_checkpoint(tmp_path / "truncated.pth")
    assert "unexpected" not in str(error.value) and "mis-shaped" not in str(error.value)


def test_missing_middle_block_is_named() -> None:
    state_dict = {key: v for key, v in make_original_state_dict(depth=3).items() if not key.startswith("blocks.1.")}
    with pytest.raises(ValueError, match="missing keys") as error:
        load_original_checkpoint(state_dict)
    for key in ("blocks.1.norm1.weight", "blocks.1.attn.qkv.weight", "blocks.1.ls2.gamma"):
        assert key in str(error.value)
    assert "blocks.0." not in str(error.value) and "blocks.2." not in str(error.value)


def test_mis_shaped_and_unexpected_keys_are_named() -> None:
    state_dict = make_original_state_dict()
    state_dict["blocks.0.attn.proj.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    state_dict["blocks.1.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_original_checkpoint(state_dict)
    message = str(error.value)
    assert "unexpected keys: blocks.1.attn.extra" in message
    assert f"blocks.0.attn.proj.weight has shape ({HIDDEN}, {HIDDEN + 1})" in message
    assert f"expects ({HIDDEN}, {HIDDEN})" in message


def test_mlp_ratio_and_registers_mismatches_are_refused() -> None:
    swiglu = make_original_state_dict(swiglu=True)
    swiglu["blocks.0.mlp.w12.weight"] = torch.zeros(2 * 100, HIDDEN)  # 100 is not a multiple of 8
    with pytest.raises(ValueError, match=r"No integer mlp_ratio .*SwiGLU.*blocks\.0\.mlp\.w12\.weight"):
        load_original_checkpoint(swiglu)

    gelu = make_original_state_dict()
    gelu["blocks.0.mlp.fc1.weight"] = torch.zeros(HIDDEN * 3 + 1, HIDDEN)
    with pytest.raises(ValueError, match=r"No integer mlp_ratio .*GELU"):
        load_original_checkpoint(gelu)

    with_registers = make_original_state_dict(registers=2)
    plain_config = infer_original_config(make_original_state_dict())
    with pytest.raises(ValueError, match="unexpected keys: register_tokens"):
        load_original_checkpoint(with_registers, config=plain_config)

    with pytest.raises(ValueError, match="'patch_embed.proj.weight'"):
        load_original_checkpoint({"pos_embed": torch.zeros(1, 17, HIDDEN)})


def test_pickled_module_file_is_refused_with_advice(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole_model.pth")
    with pytest.raises(ValueError, match=r"state_dict\(\)"):
        load_original_checkpoint(tmp_path / "whole_model.pth")


LOAD_IN_FRESH_PROCESS = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1])
pixel_values = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(pixel_values=pixel_values).last_hidden_state, sys.argv[3])
print(type(model).__name__)
"""


def test_cli_writes_a_directory_automodel_loads(tmp_path: Path) -> None:
    state_dict = make_original_state_dict(swiglu=True, registers=4)
    checkpoint = tmp_path / "dinov2_vitx14_reg4_pretrain.pth"
    torch.save({"model": state_dict}, checkpoint)
    parser = argparse.ArgumentParser(prog="sinder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", str(checkpoint), str(tmp_path / "converted")])
    assert args.push_to_hub is None
    assert args.handler(args) == 0

    output = tmp_path / "converted"
    assert json.loads((output / "config.json").read_text())["model_type"] == "dinov2_with_registers"
    assert (output / "model.safetensors").is_file()
    card = (output / "README.md").read_text()
    assert checkpoint.name in card
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in card
    assert "sinder-peft" in card and "AutoModel.from_pretrained" in card

    named = convert_checkpoint(checkpoint, tmp_path / "named", repo_id="someone/dinov2-converted")
    assert named == tmp_path / "named"
    assert 'AutoModel.from_pretrained("someone/dinov2-converted")' in (named / "README.md").read_text()

    pixel_values = images(NON_SQUARE)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_FRESH_PROCESS,
            str(output),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "Dinov2WithRegistersModel"
    expected = original_forward(state_dict, pixel_values, num_heads=2, antialias=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=1e-4, rtol=0)


def test_cli_reports_a_refused_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state_dict = make_original_state_dict()
    del state_dict["norm.bias"]
    save_file(state_dict, tmp_path / "broken.safetensors")
    parser = argparse.ArgumentParser(prog="sinder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", str(tmp_path / "broken.safetensors"), str(tmp_path / "out")])
    with caplog.at_level(logging.ERROR, logger="sinder_peft.models.conversion"):
        assert args.handler(args) == 1
    assert "missing keys: norm.bias" in caplog.text
    assert not (tmp_path / "out").exists()


def to_legacy_transformers_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers 5 DINOv2 state dict to the names older transformers releases saved."""
    renames = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.down_proj": "mlp.weights_out",
    }
    legacy = {}
    for key, tensor in state_dict.items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            up = state_dict[key.replace(".gate_proj.", ".up_proj.")]
            legacy[key.replace(".gate_proj.", ".weights_in.")] = torch.cat([tensor, up])
            continue
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = tensor.contiguous()
    return legacy


@pytest.mark.parametrize("variant", ["gelu", "swiglu", "registers_swiglu"])
def test_legacy_transformers_names_load_with_automodel(variant: str, tmp_path: Path) -> None:
    model = load_original_checkpoint(make_original_state_dict(**VARIANTS[variant]))
    legacy = to_legacy_transformers_names(model.state_dict())
    assert any("attention.attention.query" in key for key in legacy)
    assert not any("q_proj" in key or "gate_proj" in key for key in legacy)
    assert any("weights_in" in key for key in legacy) == VARIANTS[variant]["swiglu"]
    model.config.save_pretrained(tmp_path)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert_same_state_dict(loaded.state_dict(), model.state_dict())
