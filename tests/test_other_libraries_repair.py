"""Whole repairs of timm and OpenCLIP models, as a user runs them: `--model timm:DIR` and `--model
open_clip:ARCH/FILE` in, the result out in the same library's format, reloaded by that library alone.

The sources are planted-defect models (`synthetic.planting`) written into a timm `VisionTransformer` and an OpenCLIP
`CLIP` of the same architecture by the conversions under test; each repair must take the last-layer max/median token
norm from >= 40 down to <= 5, and a fresh process that imports only timm (or OpenCLIP) and torch must get, from
`model/`, the features of the transformers version in `model-transformers/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_python
from transformers import AutoModel

from sinder_peft import RepairArguments, TrainingArguments, diagnose, evaluate, repair
from sinder_peft.cli import main as cli_main
from sinder_peft.models.open_clip.conversion import transformers_to_open_clip
from sinder_peft.models.open_clip.loading import save_open_clip_model
from sinder_peft.models.timm.conversion import transformers_to_timm
from sinder_peft.models.timm.loading import save_timm_model
from sinder_peft.synthetic.planting import PlantedModel, build_planted_model, generate_spot_image, spot_pixel_values

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

TINY_OPEN_CLIP = "sinder-tiny-vit-16"
"""A tiny OpenCLIP architecture registered for these tests (the config below), ViT with QuickGELU as OpenAI's."""
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 16, "mlp_ratio": 4, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1},
}


def _spot_images(directory: Path, patch_size: int) -> Path:
    directory.mkdir(parents=True)
    for seed in range(6):
        generate_spot_image(seed, 224, patch_size).save(directory / f"{seed}.png")
    return directory


def _register_tiny_open_clip(directory: Path) -> Path:
    """Write the tiny architecture's config as `directory/NAME.json` and register it with OpenCLIP."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return path


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("timm")
    planted = build_planted_model("dinov2", seed=21)
    native = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=224, embed_dim=64, depth=4, num_heads=4
    )
    transformers_to_timm(planted.model, native)
    save_timm_model(native, root / "source")
    images = _spot_images(root / "images", planted.patch_size)
    result = repair(
        RepairArguments(
            model=f"timm:{root / 'source'}", data=str(images), resolution=224, output_dir=str(root / "run")
        ),
        TrainingArguments(max_steps=200, stop_window=6),
    )
    return {"root": root, "report": result.report, "planted": planted}


@pytest.fixture(scope="module")
def open_clip_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("open_clip")
    config = _register_tiny_open_clip(root / "configs")
    planted = build_planted_model("clip_vision", seed=22)
    native = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    transformers_to_open_clip(planted.model, native)
    checkpoint = save_open_clip_model(native, root / "source.safetensors")
    images = _spot_images(root / "images", planted.patch_size)
    result = repair(
        RepairArguments(
            model=f"open_clip:{TINY_OPEN_CLIP}/{checkpoint}",
            data=str(images),
            resolution=224,
            output_dir=str(root / "run"),
        ),
        TrainingArguments(max_steps=200, stop_window=6),
    )
    return {"root": root, "report": result.report, "planted": planted, "config": config, "source": native}


@pytest.mark.parametrize("run", ["timm_run", "open_clip_run"])
def test_the_repair_removes_the_planted_defect(run: str, request: pytest.FixtureRequest) -> None:
    report = request.getfixturevalue(run)["report"]
    assert min(report["before"]["max_median_norm_ratio_last_layer"]) >= 40, report["before"]
    assert max(report["after"]["max_median_norm_ratio_last_layer"]) <= 5, report["after"]
    assert report["repaired"] and report["after"]["images_with_defects"] == 0


def _pixels(planted: PlantedModel, path: Path) -> Path:
    pixel_values = spot_pixel_values([0, 1], planted.normalization, size=224, patch=planted.patch_size)
    torch.save(pixel_values, path)
    return path


def test_the_timm_result_reloads_with_timm_alone(timm_run: dict) -> None:
    root = timm_run["root"]
    run = root / "run"
    assert (run / "model" / "config.json").is_file() and (run / "model-transformers" / "config.json").is_file()
    pixels = _pixels(timm_run["planted"], root / "pixels.pt")
    script = f"""
import sys, torch, timm
model = timm.create_model("local-dir:{run / "model"}", pretrained=True).eval()
with torch.no_grad():
    features = model.forward_features(torch.load({str(pixels)!r}))
torch.save(features, {str(root / "timm_features.pt")!r})
assert not any(name.startswith("sinder_peft") for name in sys.modules)
"""
    run_python(script, cwd=REPO_ROOT)
    reloaded = torch.load(root / "timm_features.pt")
    transformers_model = AutoModel.from_pretrained(run / "model-transformers").eval()
    with torch.no_grad():
        expected = transformers_model(pixel_values=torch.load(pixels)).last_hidden_state
    assert torch.allclose(reloaded, expected, atol=1e-4 * float(expected.abs().max()))
    norms = reloaded[:, 1:].norm(dim=-1)  # the reloaded model is the repaired one: no high-norm token left
    assert float((norms.max(dim=1).values / norms.median(dim=1).values).max()) <= 5


def test_the_open_clip_result_reloads_with_open_clip_alone(open_clip_run: dict) -> None:
    root = open_clip_run["root"]
    run = root / "run"
    checkpoint = run / "model" / "open_clip_model.safetensors"
    assert checkpoint.is_file() and (run / "model-transformers" / "config.json").is_file()
    pixels = _pixels(open_clip_run["planted"], root / "pixels.pt")
    script = f"""
import sys, torch, open_clip
open_clip.add_model_config({str(open_clip_run["config"])!r})
model, _, _ = open_clip.create_model_and_transforms({TINY_OPEN_CLIP!r}, pretrained={str(checkpoint)!r})
model.eval()
model.visual.output_tokens = True
with torch.no_grad():
    pooled, tokens = model.visual(torch.load({str(pixels)!r}))
torch.save({{"tokens": tokens, "text": model.state_dict()["token_embedding.weight"]}}, {str(root / "oc.pt")!r})
assert not any(name.startswith("sinder_peft") for name in sys.modules)
"""
    run_python(script, cwd=REPO_ROOT)
    reloaded = torch.load(root / "oc.pt")
    transformers_model = AutoModel.from_pretrained(run / "model-transformers").eval()
    with torch.no_grad():
        hidden = transformers_model(pixel_values=torch.load(pixels)).last_hidden_state
        expected = transformers_model.post_layernorm(hidden)[:, 1:]
    assert torch.allclose(reloaded["tokens"], expected, atol=1e-4 * float(expected.abs().max()))
    # the text tower is the source's, untouched
    assert torch.equal(reloaded["text"], open_clip_run["source"].state_dict()["token_embedding.weight"])


def test_sinder_convert_between_timm_and_transformers(timm_run: dict) -> None:
    """`sinder convert --from timm` gives the transformers model with timm's features; `--to timm --template` writes
    it back into the source's architecture with every tensor as it was."""
    root = timm_run["root"]
    source = root / "source"
    assert cli_main(["convert", str(source), str(root / "as-transformers"), "--from", "timm"]) == 0
    pixels = spot_pixel_values([0], timm_run["planted"].normalization, size=224, patch=14)
    native = timm.create_model(f"local-dir:{source}", pretrained=True).eval()
    converted = AutoModel.from_pretrained(root / "as-transformers").eval()
    with torch.no_grad():
        assert torch.allclose(converted(pixel_values=pixels).last_hidden_state, native.forward_features(pixels))
    processor = json.loads((root / "as-transformers" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(native.pretrained_cfg["mean"]) and processor["resample"] == 3
    back = root / "back"
    arguments = ["convert", str(root / "as-transformers"), str(back), "--from", "transformers", "--to", "timm"]
    assert cli_main([*arguments, "--template", str(source)]) == 0
    reloaded = timm.create_model(f"local-dir:{back}", pretrained=True).state_dict()
    assert all(torch.equal(reloaded[key], value) for key, value in native.state_dict().items())
    assert cli_main(
        ["convert", str(root / "as-transformers"), str(root / "x"), "--from", "transformers", "--to", "timm"]
    )
    assert cli_main(["convert", str(source), str(root / "y"), "--from", "timm", "--to", "open_clip"]) == 1


def test_sinder_convert_from_open_clip(open_clip_run: dict) -> None:
    root = open_clip_run["root"]
    spec = f"{TINY_OPEN_CLIP}/{root / 'source.safetensors'}"
    assert cli_main(["convert", spec, str(root / "as-transformers"), "--from", "open_clip"]) == 0
    converted = AutoModel.from_pretrained(root / "as-transformers").eval()
    source = open_clip_run["source"].eval()
    pixels = spot_pixel_values([0], open_clip_run["planted"].normalization, size=224, patch=16)
    with torch.no_grad():
        expected = source.encode_image(pixels)
        pooled = converted(pixel_values=pixels).pooler_output @ source.visual.proj
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_diagnose_and_evaluate_take_timm_and_open_clip_names(
    timm_run: dict, open_clip_run: dict, tmp_path: Path
) -> None:
    timm_name = f"timm:{timm_run['root'] / 'source'}"
    open_clip_name = f"open_clip:{TINY_OPEN_CLIP}/{open_clip_run['root'] / 'source.safetensors'}"
    image = timm_run["root"] / "images" / "0.png"
    for index, name in enumerate((timm_name, open_clip_name)):
        report = diagnose(name, [image], output_dir=tmp_path / f"diagnose-{index}", resolution=224)
        assert report["images"][0]["first_defective_layer"] >= 0
    images = str(open_clip_run["root"] / "images")
    results = evaluate([open_clip_name], output_dir=str(tmp_path / "evaluate"), defect_data=images)
    assert results["models"][0]["defects"]["norm_ratio"] >= 40
