"""The registry of ViT families (`sinder_peft.tuner.architectures`) and the adapter targets it gives.

Block-by-block runs must equal each model's own forward at native and other sizes, backbones must be found inside
larger models, and the default SINDER adapter must touch the value/output/MLP projections of the backbone's blocks
and nothing else: no query or key, no head, neck, pooler or text tower, in every family.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO_ROOT, run_python
from peft import PeftModel, get_peft_model
from torch import nn

from sinder_peft import SinderConfig, SinderLinear
from sinder_peft.models.loading import load_backbone
from sinder_peft.synthetic.planting import build_planted_model, save_planted_model
from sinder_peft.synthetic.tiny_models import PLANTED_FAMILIES, build_tiny_model
from sinder_peft.tuner.architectures import (
    SUPPORTED_FAMILIES,
    block_list_path,
    describe_config,
    describe_model,
    find_backbone,
    get_blocks,
    patchify,
    unwrap_backbone,
)
from sinder_peft.tuner.descriptions import ArchitectureDescription
from sinder_peft.tuner.model import block_index, outside_blocks_pattern

FAMILIES = PLANTED_FAMILIES
NUM_LAYERS = 3
INTERPOLATING = ("clip_vision_model", "siglip_vision_model", "vit", "deit")


def tiny(family: str, seed: int = 0) -> nn.Module:
    """A 3-block tiny model of `family` whose norms, layer scales and biases are random (so that they matter)."""
    model = build_tiny_model(family, seed=seed, num_layers=NUM_LAYERS)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in unwrap_backbone(model).named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("lambda1"):
                parameter.copy_(0.5 + 0.5 * noise.abs().clamp(max=1))
            elif "norm" in name and name.endswith("weight"):
                parameter.add_(0.2 * noise)
            elif name.endswith("bias"):
                parameter.add_(0.05 * noise)
    return model


def own_forward(backbone: nn.Module, description: ArchitectureDescription, pixel_values: torch.Tensor):
    """The backbone's own forward with every hidden state, at any size it accepts."""
    kwargs = {"output_hidden_states": True}
    if description.model_type == "siglip2_vision_model":
        batch, grid = pixel_values.shape[0], [side // description.patch_size for side in pixel_values.shape[-2:]]
        return backbone(
            pixel_values=patchify(pixel_values, description.patch_size),
            pixel_attention_mask=torch.ones(batch, grid[0] * grid[1], dtype=torch.long),
            spatial_shapes=torch.tensor([grid] * batch),
            **kwargs,
        )
    if description.model_type in INTERPOLATING:
        kwargs["interpolate_pos_encoding"] = True
    return backbone(pixel_values, **kwargs)


def pixels(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Running blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_block_by_block_run_equals_the_models_own_forward(family: str) -> None:
    model = tiny(family)
    backbone, description = unwrap_backbone(model), describe_model(model)
    patch = description.patch_size
    for height, width in ((224, 224), (10 * patch, 10 * patch), (8 * patch, 12 * patch)):
        pixel_values = pixels(height, width)
        with torch.no_grad():
            reference = own_forward(backbone, description, pixel_values)
            embedded = description.embed(backbone, pixel_values)
            outputs = description.block_outputs(backbone, pixel_values)
            final = description.final_tokens(backbone, pixel_values)
        grid = (height // patch, width // patch)
        assert embedded.grid_size == grid
        assert embedded.hidden.shape[1] == description.num_prefix_tokens + grid[0] * grid[1]
        assert len(reference.hidden_states) == description.num_layers + 1 == len(outputs) + 1
        torch.testing.assert_close(embedded.hidden, reference.hidden_states[0], rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(outputs, reference.hidden_states[1:], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        last = getattr(reference, "last_hidden_state", None)
        if last is None:  # Dinov2Backbone: only feature maps
            continue
        if description.last_hidden_state_normed:
            torch.testing.assert_close(final, last, rtol=1e-5, atol=1e-5)
        else:  # CLIP: last_hidden_state is raw, final_tokens norms every token
            torch.testing.assert_close(last, outputs[-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(final, backbone.post_layernorm(last), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_kwargs_serve_any_subset_of_the_batch(family: str) -> None:
    model = tiny(family)
    backbone, description = unwrap_backbone(model), describe_model(model)
    pixel_values = pixels(8 * description.patch_size, 10 * description.patch_size, batch=3)
    subset = [0, 2]
    with torch.no_grad():
        embedded = description.embed(backbone, pixel_values)
        hidden = embedded.hidden
        for block in get_blocks(model):
            hidden = description.run_block(block, hidden, embedded.block_kwargs)
        partial = embedded.hidden[subset]
        for block in get_blocks(model):
            partial = description.run_block(block, partial, embedded.block_kwargs)
    torch.testing.assert_close(partial, hidden[subset], rtol=1e-5, atol=1e-5)


def test_pooled_features_per_family() -> None:
    pixel_values = pixels(224, 224)
    for family in ("dinov2_registers", "dinov3", "clip_vision", "siglip", "siglip2", "vit", "deit"):
        model = tiny(family)
        backbone, description = unwrap_backbone(model), describe_model(model)
        with torch.no_grad():
            pooled = description.pooled_features(backbone, pixel_values)
            reference = own_forward(backbone, description, pixel_values)
        if family in ("vit", "deit"):  # the normed CLS token, not the pre-training pooler
            expected = reference.last_hidden_state[:, 0]
            assert not torch.allclose(pooled, reference.pooler_output)
        else:
            expected = reference.pooler_output
        torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5, msg=family)
    siglip = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vision_use_head=False
        )
    ).eval()
    description = describe_model(siglip)
    assert description.pooling == "mean"
    with torch.no_grad():
        tokens = description.final_tokens(siglip, pixel_values)
        torch.testing.assert_close(description.pooled_features(siglip, pixel_values), tokens.mean(dim=1))


def test_embed_rejects_unusable_pixel_values() -> None:
    model = tiny("vit")
    description = describe_model(model)
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        description.embed(model, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        description.embed(model, torch.zeros(1, 3, 32, 40))


def test_dinov3_in_train_mode_is_refused_and_eval_mode_is_deterministic() -> None:
    model = tiny("dinov3")
    backbone, description = unwrap_backbone(model), describe_model(model)
    pixel_values = pixels(64, 64)
    model.train()
    with pytest.raises(ValueError, match=r"train mode.*pos_embed_rescale.*model\.eval\(\)"):
        description.embed(backbone, pixel_values)
    model.eval()
    first = description.block_outputs(backbone, pixel_values)[-1]
    assert torch.equal(first, description.block_outputs(backbone, pixel_values)[-1])
    first.sum().backward()  # eval mode still trains
    assert backbone.model.layer[0].mlp.up_proj.weight.grad is not None
    # Without RoPE augmentation, train mode is deterministic (dropouts are 0) and allowed.
    model.config.pos_embed_rescale = None
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(description.block_outputs(backbone, pixel_values)[-1], first.detach())


# ---------------------------------------------------------------------------------------------------------------
# Descriptions and backbones
# ---------------------------------------------------------------------------------------------------------------

# family: (layers, prefix tokens, CLS, layer scale, MLP kind, activation, final norm, normed, targets)
EXPECTED = {
    "dinov2": ("encoder.layer", 1, True, True, "plain", "gelu", "layernorm", True, "v_proj o_proj fc1 fc2"),
    "dinov2_registers": ("encoder.layer", 5, True, True, "plain", "gelu", "layernorm", True, "v_proj o_proj fc1 fc2"),
    "dinov2_swiglu": (
        "encoder.layer",
        1,
        True,
        True,
        "gated",
        "silu",
        "layernorm",
        True,
        "v_proj o_proj gate_proj up_proj down_proj",
    ),
    "dinov3": ("model.layer", 5, True, True, "plain", "gelu", "norm", True, "v_proj o_proj up_proj down_proj"),
    "dinov3_gated": (
        "model.layer",
        5,
        True,
        True,
        "gated",
        "silu",
        "norm",
        True,
        "v_proj o_proj gate_proj up_proj down_proj",
    ),
    "clip_vision": (
        "encoder.layers",
        1,
        True,
        False,
        "plain",
        "quick_gelu",
        "post_layernorm",
        False,
        "v_proj out_proj fc1 fc2",
    ),
    "siglip": (
        "encoder.layers",
        0,
        False,
        False,
        "plain",
        "gelu_pytorch_tanh",
        "post_layernorm",
        True,
        "v_proj out_proj fc1 fc2",
    ),
    "vit": ("layers", 1, True, False, "plain", "gelu", "layernorm", True, "v_proj o_proj fc1 fc2"),
    "deit": ("layers", 2, True, False, "plain", "gelu", "layernorm", True, "v_proj o_proj fc1 fc2"),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_descriptions(family: str) -> None:
    model = build_tiny_model(family, num_layers=2)
    description = describe_model(model)
    layers, prefix, cls, layer_scale, kind, activation, final_norm, normed, targets = EXPECTED[family]
    assert description.layers == layers and description.num_prefix_tokens == prefix
    assert description.has_cls_token is cls
    assert (description.block.layer_scale1 is not None) is layer_scale is (description.block.layer_scale2 is not None)
    assert description.block.mlp.kind == kind and description.block.mlp.activation == activation
    assert description.final_norm == final_norm and description.last_hidden_state_normed is normed
    assert description.target_module_names == targets.split()
    assert (description.num_layers, description.hidden_size) == (2, 64)
    backbone = unwrap_backbone(model)
    block = get_blocks(model)[0]
    for name in (*description.block.attention_targets, *description.block.mlp_targets):
        assert isinstance(block.get_submodule(name), nn.Linear), name
    for name in (description.block.query, description.block.key):
        assert isinstance(block.get_submodule(name), nn.Linear), name
    for name in (description.block.norm1, description.block.norm2, description.final_norm):
        norm = (block if name != description.final_norm else backbone).get_submodule(name)
        assert isinstance(norm, nn.LayerNorm), name


def _task_models() -> dict[str, tuple[nn.Module, str]]:
    """Models holding a backbone, with the backbone's path."""
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    text = {**common, "vocab_size": 99}
    with torch.random.fork_rng(devices=[]):
        return {
            "Dinov2ForImageClassification": (
                transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**common, num_labels=3)),
                "dinov2",
            ),
            "DepthAnythingForDepthEstimation": (build_tiny_model("depth_anything", num_layers=2), "backbone"),
            "Dinov2Backbone": (build_tiny_model("dinov2_backbone", num_layers=2), ""),
            "DINOv3ViTBackbone": (
                transformers.DINOv3ViTBackbone(transformers.DINOv3ViTConfig(**common, out_indices=[1, 2])),
                "",
            ),
            "CLIPModel": (build_tiny_model("clip", num_layers=2), "vision_model"),
            "CLIPVisionModelWithProjection": (
                transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**common, projection_dim=8)),
                "vision_model",
            ),
            "SiglipModel": (
                transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=common)),
                "vision_model",
            ),
            "SiglipForImageClassification": (
                transformers.SiglipForImageClassification(
                    transformers.SiglipConfig(text_config=text, vision_config=common, num_labels=3)
                ),
                "vision_model",
            ),
            "ViTForImageClassification": (
                transformers.ViTForImageClassification(transformers.ViTConfig(**common, num_labels=3)),
                "vit",
            ),
            "DeiTForImageClassificationWithTeacher": (
                transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**common, num_labels=3)),
                "deit",
            ),
        }


def test_backbones_are_found_inside_larger_models() -> None:
    for name, (model, path) in _task_models().items():
        found_path, backbone = find_backbone(model)
        assert found_path == path, name
        assert backbone is (model.get_submodule(path) if path else model), name
        assert block_list_path(model) == ".".join(filter(None, (path, describe_model(model).layers))), name
        assert describe_config(model.config).model_type == backbone.config.model_type, name
    # DINOv3's base_model is its encoder, itself a `dinov3_vit` model: the backbone is the model, not the encoder.
    dinov3 = build_tiny_model("dinov3", num_layers=2)
    assert dinov3.base_model is dinov3.model and find_backbone(dinov3) == ("", dinov3)
    peft_model = get_peft_model(build_tiny_model("clip", num_layers=2), SinderConfig())
    path, backbone = find_backbone(peft_model)
    assert path == "base_model.model.vision_model" and backbone is peft_model.base_model.model.vision_model


@pytest.mark.parametrize("family", ["dinov2_backbone", "depth_anything", "clip", "siglip2", "dinov3"])
def test_load_backbone_returns_the_whole_model_as_its_own_class(family: str, tmp_path: Path) -> None:
    planted = build_planted_model(family, num_layers=2)
    save_planted_model(planted, tmp_path / "model")
    loaded, normalization = load_backbone(str(tmp_path / "model"))
    assert type(loaded) is type(planted.model) and not loaded.training
    assert normalization == planted.normalization  # from the saved processor: OpenAI's for CLIP, 0.5 for SigLIP 2
    for name, value in planted.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_describe_config_reads_the_backbone_config_of_composite_configs() -> None:
    assert describe_config(transformers.CLIPConfig()).model_type == "clip_vision_model"
    assert describe_config(transformers.SiglipConfig()).model_type == "siglip_vision_model"
    depth = transformers.DepthAnythingConfig(backbone_config=transformers.Dinov2Config(out_indices=[1]))
    assert describe_config(depth).model_type == "dinov2"


def test_unsupported_models_name_the_supported_families() -> None:
    convnext = transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    )
    families = ", ".join(SUPPORTED_FAMILIES)
    with pytest.raises(ValueError, match=rf"{families}.*model_type='convnext'"):
        describe_model(convnext)
    with pytest.raises(ValueError, match=r"model_type='convnext'"):
        describe_config(convnext.config)
    with pytest.raises(ValueError, match=r"model_type='convnext'"):
        get_peft_model(convnext, SinderConfig())


# ---------------------------------------------------------------------------------------------------------------
# Adapter targets
# ---------------------------------------------------------------------------------------------------------------


def expected_targets(model: nn.Module, layers: list[int] | None = None) -> set[str]:
    """Full paths of the value/output/MLP projections of the chosen blocks of `model`'s backbone."""
    description = describe_model(model)
    prefix = block_list_path(model)
    indices = range(description.num_layers) if layers is None else layers
    relative = (*description.block.attention_targets, *description.block.mlp_targets)
    return {f"{prefix}.{index}.{name}" for index in indices for name in relative}


def adapted_names(peft_model: nn.Module) -> set[str]:
    return {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, SinderLinear)
    }


def randomize_deltas(peft_model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, SinderLinear):
                delta = module.sinder_delta["default"]
                delta.copy_(0.3 * torch.randn(delta.shape, generator=generator) * module.sinder_s)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_adapter_touches_only_the_backbone_blocks_and_is_exact_at_init(family: str) -> None:
    model = tiny(family)
    description = describe_model(model)
    pixel_values = pixels(224, 224, batch=1)
    with torch.no_grad():
        reference = description.block_outputs(unwrap_backbone(model), pixel_values)[-1]
    expected = expected_targets(model)
    peft_model = get_peft_model(model, SinderConfig())
    adapted = adapted_names(peft_model)
    assert adapted == expected
    assert not any(name.endswith((description.block.query, description.block.key)) for name in adapted)
    outside = ("text_model.", "text_projection", "visual_projection", "head.", "neck.", "pooler.", "classifier")
    assert not any(part in name for name in adapted for part in outside)
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all(name.endswith(".sinder_delta.default") for name in trainable)
    with torch.no_grad():
        output = description.block_outputs(unwrap_backbone(peft_model), pixel_values)[-1]
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["vit", "clip", "depth_anything"])
def test_layers_to_transform_and_add_layers_with_any_block_list(family: str, tmp_path: Path) -> None:
    """ViT keeps its blocks at the model root (`layers.0.…`), where PEFT 0.18 finds no block index."""
    model = tiny(family)
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SinderConfig(layers_to_transform=[1]))
    config = peft_model.peft_config["default"]
    assert config.layers_pattern == describe_model(model).block_list_name
    assert adapted_names(peft_model) == expected_targets(model, [1])
    assert peft_model.base_model.add_layers([0, 1]) == [0]
    assert adapted_names(peft_model) == expected_targets(model, [0, 1])
    randomize_deltas(peft_model)
    pixel_values = pixels(224, 224, batch=1)
    description = describe_model(model)
    with torch.no_grad():
        expected = description.block_outputs(unwrap_backbone(peft_model), pixel_values)[-1]
    peft_model.save_pretrained(tmp_path / "adapter")
    base = type(model).from_pretrained(tmp_path / "base").eval()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert adapted_names(reloaded) == expected_targets(model, [0, 1])
    with torch.no_grad():
        output = description.block_outputs(unwrap_backbone(reloaded), pixel_values)[-1]
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_block_selection_helpers() -> None:
    pattern = outside_blocks_pattern("vision_model.encoder.layers")
    assert re.fullmatch(pattern, "text_model.encoder.layers.0.self_attn.v_proj")
    assert re.fullmatch(pattern, "vision_model.head.mlp.fc1")
    assert re.fullmatch(pattern, "vision_model.encoder.layers.0")
    assert not re.fullmatch(pattern, "vision_model.encoder.layers.11.mlp.fc1")
    assert block_index("layers.3.mlp.fc1", "layers") == 3
    assert block_index("encoder.layer.12.attention.v_proj", ["layers", "layer"]) == 12
    assert block_index("neck.layers_x.3.conv", "layers") is None


def test_multihead_attention_out_proj_is_refused() -> None:
    """nn.MultiheadAttention ignores an adapter on its out_proj in the forward pass, and merging would apply it."""
    model = tiny("siglip")
    with pytest.raises(ValueError, match=r"head\.attention\.out_proj.*MultiheadAttention"):
        get_peft_model(model, SinderConfig(target_modules=["out_proj"], exclude_modules=[]))


def _model_inputs(family: str, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """What to compare after reloading: the name of an output and the inputs of the whole model's forward."""
    pixel_values = pixels(224, 224, batch=1, seed=5)
    if family == "clip":
        return "logits_per_image", {
            "pixel_values": pixel_values,
            "input_ids": torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]]),
        }
    if family == "depth_anything":
        return "predicted_depth", {"pixel_values": pixel_values}
    if family == "siglip2":
        patch = describe_model(model).patch_size
        grid = 224 // patch
        return "last_hidden_state", {
            "pixel_values": patchify(pixel_values, patch),
            "pixel_attention_mask": torch.ones(1, grid * grid, dtype=torch.long),
            "spatial_shapes": torch.tensor([[grid, grid]]),
        }
    if family == "dinov2_backbone":
        return "feature_maps", {"pixel_values": pixel_values}
    return "last_hidden_state", {"pixel_values": pixel_values}


def test_merged_models_keep_their_class_and_everything_outside_the_blocks(tmp_path: Path) -> None:
    """Every family: merge_and_unload returns the input's class, changes only the adapted projections (the CLIP text
    tower, the SigLIP head, the Depth Anything neck and head stay bit-identical), and the saved result reloads in a
    fresh process without sinder-peft, through AutoModel (Depth Anything: AutoModelForDepthEstimation;
    Dinov2Backbone: its own class, as AutoModel would build a Dinov2Model), with the same outputs."""
    cases = {}
    for family in FAMILIES:
        model = tiny(family, seed=3)
        before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        targets = expected_targets(model)
        peft_model = get_peft_model(model, SinderConfig())
        randomize_deltas(peft_model)
        merged = peft_model.merge_and_unload()
        assert type(merged) is type(model), family
        assert not any(isinstance(module, SinderLinear) for module in merged.modules())
        changed = {name for name, parameter in merged.named_parameters() if not torch.equal(parameter, before[name])}
        assert changed == {f"{target}.weight" for target in targets}, family
        output_name, inputs = _model_inputs(family, merged)
        with torch.no_grad():
            output = merged(**inputs)[output_name]
        output = output[-1] if isinstance(output, tuple) else output
        merged.save_pretrained(tmp_path / family)
        cases[family] = {"class": type(merged).__name__, "output": output_name, "inputs": inputs, "expected": output}
    torch.save(cases, tmp_path / "cases.pt")
    run_python(
        f"""
import sys, torch, transformers
cases = torch.load({str(tmp_path / "cases.pt")!r})
for family, case in cases.items():
    if family == "depth_anything":
        loader = transformers.AutoModelForDepthEstimation
    elif family == "dinov2_backbone":
        loader = transformers.Dinov2Backbone
    else:
        loader = transformers.AutoModel
    model = loader.from_pretrained({str(tmp_path)!r} + "/" + family).eval()
    assert type(model).__name__ == case["class"], (family, type(model).__name__)
    with torch.no_grad():
        output = model(**case["inputs"])[case["output"]]
    output = output[-1] if isinstance(output, tuple) else output
    error = (output - case["expected"]).abs().max().item()
    assert error < 1e-5, (family, error)
assert "sinder_peft" not in sys.modules
""",
        cwd=REPO_ROOT,
    )
