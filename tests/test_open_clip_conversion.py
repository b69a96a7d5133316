"""OpenCLIP image towers <-> transformers' CLIPVisionModel (`sinder_peft.models.open_clip.conversion`).

Every model here is a tiny random OpenCLIP model built by OpenCLIP itself, from a model config registered with
`open_clip.add_model_config` (as a user registers a custom architecture) or from its `CLIP` / `CLIPVisionCfg` classes,
with every norm and bias randomized so that a wrong mapping cannot pass. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from huggingface_hub import constants as hub_constants  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from sinder_peft.models.open_clip.conversion import open_clip_to_transformers, transformers_to_open_clip  # noqa: E402
from sinder_peft.models.open_clip.loading import (  # noqa: E402
    OpenClipPreprocessing,
    OpenClipSpec,
    load_open_clip_model,
    open_clip_preprocessing,
    parse_open_clip_spec,
    require_open_clip,
    save_open_clip_model,
)
from sinder_peft.tuner.architectures import ImageNormalization  # noqa: E402

QUICK_GELU_NAME = "sinder-test-tiny-vit-quickgelu"
GELU_NAME = "sinder-test-tiny-vit"
NATIVE_SIZE = 32
PATCH_SIZE = 8
VISION_CFG = {
    "image_size": NATIVE_SIZE,
    "layers": 2,
    "width": 48,
    "head_width": 16,
    "patch_size": PATCH_SIZE,
    "mlp_ratio": 2.5,
}
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
EMBED_DIM = 16
ARCHITECTURES = {QUICK_GELU_NAME: True, GELU_NAME: False}  # name -> quick_gelu
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def model_config(quick_gelu: bool) -> dict[str, object]:
    """The OpenCLIP model config (the JSON a user registers) of a tiny ViT CLIP."""
    return {"embed_dim": EMBED_DIM, "quick_gelu": quick_gelu, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny model configs, registered with OpenCLIP as a user registers a custom architecture."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, quick_gelu in ARCHITECTURES.items():
        (folder / f"{name}.json").write_text(json.dumps(model_config(quick_gelu)))
    open_clip.add_model_config(folder)
    return folder


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter of `model` random values: norm weights around 1, biases, embeddings and matrices random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if parameter.ndim == 1 and name.endswith("weight"):
                parameter.copy_(1.0 + 0.3 * noise)
            elif parameter.ndim <= 1:
                parameter.copy_(0.3 * noise)
            else:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
    return model.eval()


def tiny_model(name: str, seed: int = 0, **create_kwargs: object) -> nn.Module:
    """A registered tiny OpenCLIP model (`open_clip.create_model`) with random weights, in eval mode."""
    return randomize(open_clip.create_model(name, **create_kwargs), seed)


def custom_clip(seed: int = 0, quick_gelu: bool = True, **vision_options: object) -> nn.Module:
    """A tiny OpenCLIP `CLIP` built from its classes, with image-tower options, random weights, in eval mode."""
    model = open_clip.model.CLIP(
        EMBED_DIM,
        vision_cfg=open_clip.model.CLIPVisionCfg(**{**VISION_CFG, **vision_options}),
        text_cfg=open_clip.model.CLIPTextCfg(**TEXT_CFG),
        quick_gelu=quick_gelu,
    )
    return randomize(model, seed)


def pixels(size: tuple[int, int] = (NATIVE_SIZE, NATIVE_SIZE), seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def open_clip_outputs(tower: nn.Module, images: torch.Tensor) -> dict[str, object]:
    """OpenCLIP's own outputs of an image tower: the pooled feature before `proj`, the tokens it outputs
    (`output_tokens=True`), the projected features, and every block's class and patch tokens."""
    unprojected = copy.deepcopy(tower)
    unprojected.proj = None
    unprojected.output_tokens = True
    with torch.no_grad():
        pooled, tokens = unprojected(images)
        intermediates = tower.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
    return {
        "pooled": pooled,
        "tokens": tokens,
        "features": intermediates["image_features"],
        "patches": intermediates["image_intermediates"],
        "prefix": intermediates["image_intermediates_prefix"],
    }


def assert_reproduces(vision_model: nn.Module, tower: nn.Module, images: torch.Tensor, **forward: object) -> None:
    """Assert that the CLIPVisionModel computes what the OpenCLIP tower computes on `images`, block by block."""
    expected = open_clip_outputs(tower, images)
    with torch.no_grad():
        output = vision_model(pixel_values=images, output_hidden_states=True, **forward)
        normed = vision_model.post_layernorm(output.last_hidden_state)
    for index, (patches, prefix) in enumerate(zip(expected["patches"], expected["prefix"], strict=True)):
        torch.testing.assert_close(output.hidden_states[index + 1][:, 1:], patches, **TOLERANCE)
        torch.testing.assert_close(output.hidden_states[index + 1][:, :1], prefix, **TOLERANCE)
    # OpenCLIP's tokens come after ln_post (before it with final_ln_after_pool); last_hidden_state is before it.
    tokens = output.last_hidden_state if tower.final_ln_after_pool else normed
    torch.testing.assert_close(tokens[:, 1:], expected["tokens"], **TOLERANCE)
    torch.testing.assert_close(output.pooler_output, expected["pooled"], **TOLERANCE)
    torch.testing.assert_close(output.pooler_output @ tower.proj, expected["features"], **TOLERANCE)


# ------------------------------------------------------------------------------------------------------------------
# OpenCLIP -> transformers
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hidden_act"), [(QUICK_GELU_NAME, "quick_gelu"), (GELU_NAME, "gelu")])
def test_clip_vision_model_reproduces_the_open_clip_tower(config_dir: Path, name: str, hidden_act: str) -> None:
    model = tiny_model(name)
    vision_model = open_clip_to_transformers(model)
    config = vision_model.config
    assert (config.hidden_act, config.hidden_size, config.intermediate_size) == (hidden_act, 48, 120)
    assert (config.num_hidden_layers, config.num_attention_heads) == (2, 3)
    assert (config.image_size, config.patch_size, config.layer_norm_eps) == (NATIVE_SIZE, PATCH_SIZE, 1e-5)
    assert not vision_model.training
    assert_reproduces(vision_model, model.visual, pixels())
    assert_reproduces(vision_model, model.visual, pixels(), interpolate_pos_encoding=True)  # exact at native size


@pytest.mark.parametrize("size", [48, 24])
def test_other_resolution_through_open_clips_resize_converts_exactly(
    config_dir: Path, tmp_path: Path, size: int
) -> None:
    """OpenCLIP's own way to run at another size: build the architecture at that size (`force_image_size`) and load
    the checkpoint, whose position table `load_checkpoint` resizes (`resize_pos_embed`: bicubic, antialiased). The
    converted model of that resized model reproduces it exactly."""
    native = tiny_model(QUICK_GELU_NAME)
    checkpoint = save_open_clip_model(native, tmp_path / "native.safetensors")
    resized = open_clip.create_model(QUICK_GELU_NAME, pretrained=str(checkpoint), force_image_size=size).eval()
    assert resized.visual.positional_embedding.shape[0] == (size // PATCH_SIZE) ** 2 + 1
    vision_model = open_clip_to_transformers(resized)
    assert vision_model.config.image_size == size
    assert_reproduces(vision_model, resized.visual, pixels((size, size)))


@pytest.mark.parametrize("size", [(48, 48), (24, 24), (40, 56)])
def test_interpolate_pos_encoding_is_open_clips_resize_without_antialias(
    config_dir: Path, size: tuple[int, int]
) -> None:
    """transformers' `interpolate_pos_encoding=True` resizes the native table with bicubic interpolation without
    antialiasing. It reproduces exactly an OpenCLIP model resized by `resize_pos_embed(antialias=False)`, up or down
    and to non-square grids; OpenCLIP's default resize (antialiased) gives another table, so the exact path to
    OpenCLIP's own behaviour at another size is converting the resized model (the test above)."""
    native = tiny_model(QUICK_GELU_NAME)
    vision_model = open_clip_to_transformers(native)
    tables = {}
    for antialias in (False, True):
        resized = open_clip.create_model(QUICK_GELU_NAME, force_image_size=size).eval()
        state_dict = native.state_dict()
        open_clip.model.resize_pos_embed(state_dict, resized, interpolation="bicubic", antialias=antialias)
        resized.load_state_dict(state_dict)
        tables[antialias] = resized.visual.positional_embedding.detach()
        if not antialias:
            assert_reproduces(vision_model, resized.visual, pixels(size), interpolate_pos_encoding=True)
    grid = (size[0] // PATCH_SIZE) * (size[1] // PATCH_SIZE)
    with torch.no_grad():
        interpolated = vision_model.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + grid, 48), *size)[0]
    assert torch.equal(interpolated, tables[False])
    assert (interpolated - tables[True]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"final_ln_after_pool": True},
        {"patch_dropout": 0.5},
        {"block_type": "custom"},
        {"ls_init_value": 1.0},
        {"pos_embed_type": "sin_cos_2d"},
        {"norm_kwargs": {"eps": 1e-6}},
    ],
    ids=lambda options: next(iter(options)),
)
def test_options_clip_vision_model_reproduces_convert_exactly(options: dict[str, object]) -> None:
    """Tower options that compute what CLIPVisionModel computes: `final_ln_after_pool` (ln_post on the pooled class
    token only, as `post_layernorm`), patch dropout (train mode only), custom blocks with none of their options, layer
    scales of exactly one (left untouched), a sin-cos position table, another LayerNorm eps. The bare
    VisionTransformer is converted, as its CLIP would be."""
    model = custom_clip(**options)
    if "ls_init_value" in options:
        for block in model.visual.transformer.resblocks:
            block.ls_1.gamma.data.fill_(1.0)
            block.ls_2.gamma.data.fill_(1.0)
    vision_model = open_clip_to_transformers(model.visual)
    assert vision_model.config.layer_norm_eps == model.visual.ln_pre.eps
    assert_reproduces(vision_model, model.visual, pixels())
    fresh = custom_clip(seed=5, **options)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, parameter in fresh.visual.named_parameters():
            if name != "proj" and not name.endswith("gamma"):
                parameter.add_(1.0)
    transformers_to_open_clip(vision_model, fresh)
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in fresh.state_dict().items())


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ls_init_value": 0.1}, "layer scale ls_1/ls_2 that is not the identity"),
        ({"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, "an attentional pooler"),
        ({"pool_type": "avg"}, "pool_type='avg'"),
        ({"no_ln_pre": True}, "no_ln_pre=True"),
        ({"qk_norm": True}, "qk_norm=True"),
        ({"scaled_cosine_attn": True}, "scaled_cosine_attn=True"),
        ({"scale_fc": True}, "scale_fc=True"),
        ({"image_size": (32, 48)}, "non-square image size"),
        ({"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}, None),
    ],
    ids=[
        "layer_scale",
        "attentional_pool",
        "avg_pool",
        "no_ln_pre",
        "qk_norm",
        "cosine",
        "scale_fc",
        "non_square",
        "ok",
    ],
)
def test_towers_clip_vision_model_cannot_reproduce_are_refused(options: dict[str, object], named: str | None) -> None:
    """Each refusal names the option, in both directions. The last case (tanh GELU and another eps) is reproducible:
    it converts, with `gelu_pytorch_tanh`."""
    model = custom_clip(quick_gelu=False, **options)
    if named is None:
        vision_model = open_clip_to_transformers(model)
        assert vision_model.config.hidden_act == "gelu_pytorch_tanh"
        assert_reproduces(vision_model, model.visual, pixels())
        return
    with pytest.raises(ValueError, match="cannot be converted to a CLIPVisionModel") as error:
        open_clip_to_transformers(model)
    assert named in str(error.value)
    with pytest.raises(ValueError, match="cannot be converted to a CLIPVisionModel") as error:
        transformers_to_open_clip(open_clip_to_transformers(custom_clip()), model)
    assert named in str(error.value)


def test_non_vit_towers_are_refused() -> None:
    resnet_model = nn.Module()
    resnet_model.visual = open_clip.modified_resnet.ModifiedResNet(
        layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64, width=8
    )
    with pytest.raises(ValueError, match="ModifiedResNet"):
        open_clip_to_transformers(resnet_model)
    with pytest.raises(ValueError, match="no image tower|neither an OpenCLIP model"):
        open_clip_to_transformers(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------------------------
# transformers -> OpenCLIP, and checkpoints
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [QUICK_GELU_NAME, GELU_NAME])
def test_round_trip_restores_every_tensor_and_leaves_the_rest_untouched(config_dir: Path, name: str) -> None:
    original = tiny_model(name, seed=0)
    vision_model = open_clip_to_transformers(original)
    reference = original.state_dict()

    # A fresh model of the same architecture holding the original text tower, `proj` and logit scale, but another
    # image tower: the write-back restores every tensor of the whole state dict exactly.
    fresh = tiny_model(name, seed=1)
    fresh.load_state_dict(reference)
    randomize(fresh.visual, seed=2)
    fresh.visual.proj.data.copy_(reference["visual.proj"])
    assert transformers_to_open_clip(vision_model, fresh) is fresh
    restored = fresh.state_dict()
    assert restored.keys() == reference.keys()
    assert all(torch.equal(restored[key], reference[key]) for key in reference)

    # Into an entirely different model: the tower (but `proj`) is written, everything else is left as it was.
    other = tiny_model(name, seed=3)
    before = {key: tensor.clone() for key, tensor in other.state_dict().items()}
    transformers_to_open_clip(vision_model, other)
    after = other.state_dict()
    written = {key for key in reference if key.startswith("visual.") and key != "visual.proj"}
    assert all(torch.equal(after[key], reference[key]) for key in written)
    assert all(torch.equal(after[key], before[key]) for key in before.keys() - written)
    assert not torch.equal(before["visual.ln_pre.bias"], reference["visual.ln_pre.bias"])


def test_write_back_refuses_another_architecture_or_an_unmerged_adapter(config_dir: Path) -> None:
    gelu_vision_model = open_clip_to_transformers(tiny_model(GELU_NAME))
    with pytest.raises(ValueError, match="hidden_act: 'gelu'"):
        transformers_to_open_clip(gelu_vision_model, tiny_model(QUICK_GELU_NAME))
    bigger = open_clip.create_model(QUICK_GELU_NAME, force_image_size=48)
    with pytest.raises(ValueError, match="image_size: 32"):
        transformers_to_open_clip(open_clip_to_transformers(tiny_model(QUICK_GELU_NAME)), bigger)
    adapted = get_peft_model(
        open_clip_to_transformers(tiny_model(QUICK_GELU_NAME)), LoraConfig(target_modules=["fc1"])
    )
    with pytest.raises(ValueError, match="merge_and_unload"):
        transformers_to_open_clip(adapted, tiny_model(QUICK_GELU_NAME))


RELOAD_SCRIPT = r"""
import json, sys
import open_clip, torch

config_dir, name, images_file, output_file, *checkpoints = sys.argv[1:]
open_clip.add_model_config(config_dir)  # a custom architecture: register its JSON config first
images = torch.load(images_file)
results = {}
for checkpoint in checkpoints:
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
    model.eval()
    with torch.no_grad():
        results[checkpoint] = {"features": model.encode_image(images), "state_dict": model.state_dict()}
torch.save(results, output_file)
print(json.dumps({"sinder_peft_imported": any(module.split(".")[0] == "sinder_peft" for module in sys.modules)}))
"""


def test_repaired_weights_survive_save_and_reload_by_open_clip_alone(config_dir: Path, tmp_path: Path) -> None:
    """A changed ("repaired") CLIPVisionModel written back and saved is loaded by a fresh interpreter that imports
    only open_clip and torch, with `create_model_and_transforms(ARCH, pretrained=FILE)`: the same tensors, the same
    image features, in both checkpoint formats."""
    model = tiny_model(QUICK_GELU_NAME)
    vision_model = open_clip_to_transformers(model)
    with torch.no_grad():
        vision_model.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
        vision_model.encoder.layers[1].self_attn.k_proj.bias.add_(0.25)
    repaired = transformers_to_open_clip(vision_model, copy.deepcopy(model))
    assert_reproduces(vision_model, repaired.visual, pixels())
    images = pixels()
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        features = repaired.encode_image(images)
    checkpoints = [
        save_open_clip_model(repaired, tmp_path / "out" / "open_clip_model.safetensors"),
        save_open_clip_model(repaired, str(tmp_path / "out" / "open_clip_pytorch_model.bin")),
    ]
    assert all(isinstance(path, Path) and path.is_file() for path in checkpoints)

    completed = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(config_dir), QUICK_GELU_NAME, "images.pt", "out.pt"]
        + [str(path) for path in checkpoints],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {"sinder_peft_imported": False}
    results = torch.load(tmp_path / "out.pt")
    reference = repaired.state_dict()
    for checkpoint in checkpoints:
        reloaded = results[str(checkpoint)]
        assert reloaded["state_dict"].keys() == reference.keys()
        assert all(torch.equal(reloaded["state_dict"][key], reference[key]) for key in reference)
        torch.testing.assert_close(reloaded["features"], features, atol=1e-6, rtol=1e-6)


def test_save_refuses_a_bare_tower_and_unknown_formats(config_dir: Path, tmp_path: Path) -> None:
    model = tiny_model(QUICK_GELU_NAME)
    with pytest.raises(ValueError, match="whole OpenCLIP models"):
        save_open_clip_model(model.visual, tmp_path / "tower.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors or \.pt, \.pth, \.bin"):
        save_open_clip_model(model, tmp_path / "model.npz")


# ------------------------------------------------------------------------------------------------------------------
# Specs, loading, preprocessing, errors
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ViT-B-16", OpenClipSpec("ViT-B-16", None)),
        ("ViT-B-16/openai", OpenClipSpec("ViT-B-16", "openai")),
        ("ViT-B-16-quickgelu/laion400m_e32", OpenClipSpec("ViT-B-16-quickgelu", "laion400m_e32")),
        ("ViT-B-16/path/to/ckpt.safetensors", OpenClipSpec("ViT-B-16", "path/to/ckpt.safetensors")),
        ("ViT-B-16//abs/path/ckpt.pt", OpenClipSpec("ViT-B-16", "/abs/path/ckpt.pt")),
        ("ViT-B-16/~/ckpt.bin", OpenClipSpec("ViT-B-16", "~/ckpt.bin")),
    ],
)
def test_parse_open_clip_spec(spec: str, expected: OpenClipSpec) -> None:
    assert parse_open_clip_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "names no architecture"),
        ("/abs/path/ckpt.pt", "An absolute path needs the architecture first"),
        ("ViT-B-16/", "ends with '/'"),
        ("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "schema"),
        ("local-dir:/models/clip", "schema"),
    ],
)
def test_parse_open_clip_spec_refuses(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_open_clip_spec(spec)


def test_load_open_clip_model_reads_a_file_by_relative_and_absolute_path(
    config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(GELU_NAME)
    checkpoint = save_open_clip_model(model, tmp_path / "weights" / "ckpt.safetensors")
    monkeypatch.chdir(tmp_path)
    for spec in (f"{GELU_NAME}/weights/ckpt.safetensors", f"{GELU_NAME}/{checkpoint.resolve()}"):
        loaded, preprocessing = load_open_clip_model(spec)
        assert not loaded.training
        assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in loaded.state_dict().items())
        assert preprocessing.image_size == (NATIVE_SIZE, NATIVE_SIZE)
    random_model, _ = load_open_clip_model(OpenClipSpec(GELU_NAME, None))
    assert not torch.equal(random_model.visual.conv1.weight, model.visual.conv1.weight)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face cache and OpenCLIP's URL cache (`~/.cache/clip`) at empty folders under `tmp_path`."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("source", ["hf_hub", "url"])
def test_load_open_clip_model_reads_a_cached_tag_offline(
    config_dir: Path, empty_caches: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """A pretrained tag is read from where OpenCLIP caches it, never downloaded, with the tag's preprocessing."""
    model = tiny_model(QUICK_GELU_NAME)
    tag_cfg = {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear",
        "resize_mode": "squash",
        "quick_gelu": True,
    }
    if source == "hf_hub":
        tag_cfg.update(hf_hub="sinder-test/tiny-open-clip/", url="")
        repo = empty_caches / "hub" / "models--sinder-test--tiny-open-clip"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abcd")
        save_open_clip_model(model, repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors")
    else:
        tag_cfg.update(hf_hub="", url="https://example.invalid/weights/tiny-open-clip.pt")
        save_open_clip_model(model, empty_caches / "home" / ".cache" / "clip" / "tiny-open-clip.pt")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, QUICK_GELU_NAME, {"tiny_tag": tag_cfg})

    loaded, preprocessing = load_open_clip_model(f"{QUICK_GELU_NAME}/tiny_tag")
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in loaded.state_dict().items())
    assert preprocessing == OpenClipPreprocessing(
        normalization=ImageNormalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        image_size=(NATIVE_SIZE, NATIVE_SIZE),
        interpolation="bilinear",
        resize_mode="squash",
    )


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("ViT-B-61", ValueError, r"Unknown OpenCLIP architecture 'ViT-B-61'\. Closest: .*ViT-B-16"),
        ("ViT-B-16/no_such_tag", ValueError, "neither a pretrained tag of OpenCLIP's ViT-B-16 .*openai"),
        ("ViT-B-16/missing/ckpt.safetensors", FileNotFoundError, "No OpenCLIP checkpoint file at missing/ckpt"),
        ("ViT-B-16/missing.pt", FileNotFoundError, "No OpenCLIP checkpoint file"),
        ("ViT-B-16/openai", FileNotFoundError, "not in the local cache .*nothing is downloaded"),
    ],
)
def test_load_open_clip_model_errors_are_clear(
    empty_caches: Path, monkeypatch: pytest.MonkeyPatch, spec: str, error: type[Exception], message: str
) -> None:
    monkeypatch.chdir(empty_caches)
    with pytest.raises(error, match=message):
        load_open_clip_model(spec)


def test_open_clip_preprocessing_reads_open_clips_config(config_dir: Path) -> None:
    defaults = open_clip_preprocessing(open_clip.create_model(QUICK_GELU_NAME))
    assert defaults == OpenClipPreprocessing(
        normalization=ImageNormalization(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD),
        image_size=(NATIVE_SIZE, NATIVE_SIZE),
        interpolation="bicubic",
        resize_mode="shortest",
    )
    overridden, _, _ = open_clip.create_model_and_transforms(
        QUICK_GELU_NAME,
        force_image_size=(48, 40),
        image_mean=(0.1, 0.2, 0.3),
        image_std=(0.4, 0.5, 0.6),
        image_interpolation="bilinear",
        image_resize_mode="longest",
    )
    assert open_clip_preprocessing(overridden) == OpenClipPreprocessing(
        normalization=ImageNormalization(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        image_size=(48, 40),
        interpolation="bilinear",
        resize_mode="longest",
    )
    assert open_clip_preprocessing(overridden.visual) == open_clip_preprocessing(overridden)
    built_directly = custom_clip(image_size=56)  # no preprocess_cfg: OpenCLIP's defaults with the tower's size
    assert open_clip_preprocessing(built_directly) == OpenClipPreprocessing(
        normalization=ImageNormalization(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD),
        image_size=(56, 56),
        interpolation="bicubic",
        resize_mode="shortest",
    )


def test_missing_open_clip_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = custom_clip()
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now fails as if it were not installed
    hint = r"pip install 'sinder-peft\[open_clip\]'"
    with pytest.raises(ImportError, match=hint):
        require_open_clip()
    with pytest.raises(ImportError, match=hint):
        load_open_clip_model("ViT-B-16/openai")
    with pytest.raises(ImportError, match=hint):
        open_clip_to_transformers(model)
