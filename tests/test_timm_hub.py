"""`--model timm:hf-hub:ORG/NAME`: the pathology foundation models' stand-ins (`timm_stand_ins`: each preset's
architecture and model-card arguments, depth and width shrunk, random weights) in an offline Hugging Face cache
under their real Hub ids.

Each loads as `timm.create_model("hf-hub:ORG/NAME", pretrained=True, **card)` does, with the card's preprocessing,
and converts exactly: the transformers features equal timm's at 224 px and, for the `dynamic_img_size` models, at
448 px. A planted-defect repair through `examples/repair.py` ends with a model that timm alone reloads (the line of
its README, in a fresh process without sinder-peft), free of the defect on held-out images and equal to the
transformers version at 224 and 448 px. A missing cache entry names the download command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import REPO_ROOT, run_python
from transformers import AutoModel

from sinder_peft import load_backbone
from sinder_peft.cli import main as cli_main
from sinder_peft.models.loading import load_backbone_and_processor_config
from sinder_peft.models.timm.loading import load_timm_model, timm_preprocessing
from sinder_peft.synthetic.planting import generate_spot_image, spot_pixel_values
from sinder_peft.tuner.architectures import ImageNormalization

timm = pytest.importorskip("timm")
assert hasattr(timm, "create_model")  # the library itself, not `sinder_peft.models.timm`
from timm_stand_ins import STAND_INS, build_stand_in, card_kwargs, plant_into, write_to_hub_cache  # noqa: E402


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline cache holding every stand-in (random weights, seed 0)."""
    cache = tmp_path_factory.mktemp("hub")
    for repo_id in STAND_INS:
        write_to_hub_cache(repo_id, build_stand_in(repo_id), cache)
    return cache


@pytest.fixture
def offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("repo_id", list(STAND_INS))
def test_each_preset_loads_from_the_cache_as_timm_does_and_converts_exactly(repo_id: str, offline: Path) -> None:
    stand_in = STAND_INS[repo_id]
    snapshot = next((offline / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
    # what the card's user gets: timm's own hf-hub loader (here on the cached snapshot) with the card's arguments
    reference = timm.create_model(f"local-dir:{snapshot}", pretrained=True, **card_kwargs(repo_id)).eval()
    prefix = "hf_hub:" if repo_id.startswith("prov-gigapath") else "hf-hub:"  # timm's two spellings
    loaded = load_timm_model(prefix + repo_id)
    assert type(loaded) is type(reference) and not loaded.training
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in reference.state_dict().items())
    preprocessing = timm_preprocessing(loaded)
    assert preprocessing.normalization == ImageNormalization(mean=stand_in.mean, std=stand_in.std)
    assert preprocessing.input_size == (3, 224, 224)

    converted, normalization, processor = load_backbone_and_processor_config(f"timm:{prefix}{repo_id}")
    assert normalization == preprocessing.normalization and tuple(processor["image_mean"]) == stand_in.mean
    sizes = (224, 448) if stand_in.dynamic else (224,)
    for size in sizes:
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = reference.forward_features(pixels)
        assert _relative(_features(converted, pixels), expected) < 1e-5, size
    assert type(converted).__name__ == (
        "Dinov2WithRegistersModel" if stand_in.dynamic or "reg" in stand_in.architecture else "Dinov2Model"
    )


def test_model_kwargs_override_a_preset_key_by_key(offline: Path) -> None:
    """UNI's card sets dynamic_img_size=True and init_values=1e-5; overriding the first keeps the second."""
    model = load_timm_model("hf-hub:MahmoodLab/UNI", '{"dynamic_img_size": false}')
    assert not model.dynamic_img_size and hasattr(model.blocks[0].ls1, "gamma")
    converted, _ = load_backbone("timm:hf-hub:MahmoodLab/UNI", model_kwargs={"dynamic_img_size": False})
    assert type(converted).__name__ == "Dinov2Model"  # without dynamic sizes, the plain class is exact


def test_refusals_name_the_cause(offline: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache.*`hf download paige-ai/Nope`"):
        load_timm_model("hf-hub:paige-ai/Nope")
    with pytest.raises(ValueError, match="keyword arguments given .*not_an_argument"):
        load_timm_model("hf-hub:MahmoodLab/UNI", '{"not_an_argument": 1}')
    with pytest.raises(ValueError, match="outside timm and torch"):
        load_timm_model("hf-hub:paige-ai/Virchow", '{"mlp_layer": "os.system"}')
    # Virchow without the card's layers (GELU in the SwiGLU) is a model the conversion refuses, saying why
    with pytest.raises(ValueError, match="SwiGLU gate is gelu"):
        load_backbone("timm:hf-hub:paige-ai/Virchow", model_kwargs={"act_layer": "gelu"})


def test_diagnose_and_convert_take_hub_names_and_model_kwargs(offline: Path, tmp_path: Path) -> None:
    image = tmp_path / "spot.png"
    generate_spot_image(0, 224, 16).save(image)
    uni = ["--model", "timm:hf-hub:MahmoodLab/UNI", "--model-kwargs", '{"dynamic_img_size": false}']
    assert cli_main(["diagnose", *uni, str(image), "--output-dir", str(tmp_path / "diag"), "--resolution", "224"]) == 0
    assert json.loads((tmp_path / "diag" / "report.json").read_text())["num_layers"] == 4
    out = tmp_path / "as-transformers"
    assert cli_main(["convert", "hf-hub:paige-ai/Virchow2", str(out), "--from", "timm"]) == 0
    converted = AutoModel.from_pretrained(out).eval()
    reference = load_timm_model("hf-hub:paige-ai/Virchow2")
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative(_features(converted, pixels), reference.forward_features(pixels)) < 1e-5
    back = tmp_path / "back"
    arguments = ["convert", str(out), str(back), "--from", "transformers", "--to", "timm"]
    assert cli_main([*arguments, "--template", "hf-hub:paige-ai/Virchow2"]) == 0
    assert "mlp_layer=timm.layers.SwiGLUPacked" in (back / "README.md").read_text()
    reloaded = load_timm_model(str(back))
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in reference.state_dict().items())


def _spot_images(directory: Path, patch_size: int, seeds: range) -> Path:
    directory.mkdir(parents=True)
    for seed in seeds:
        generate_spot_image(seed, 224, patch_size).save(directory / f"{seed}.png")
    return directory


@pytest.mark.parametrize(
    "repo_id", ["paige-ai/Virchow2", "bioptimus/H-optimus-0", "MahmoodLab/UNI", "MahmoodLab/UNI2-h"]
)
def test_a_planted_defect_repair_through_the_hub_cache_reloads_with_timm_alone(repo_id: str, tmp_path: Path) -> None:
    """End to end, as `examples/repair.py` runs them, without --model-kwargs: Virchow2 (SwiGLU with zero padding
    units, registers, no class position, dynamic sizes), H-optimus-0 (its own mean and std), UNI (ViT-L/16 with a
    class position and dynamic sizes: `Dinov2WithRegistersModel` without registers) and UNI2-h (8 registers)."""
    stand_in = STAND_INS[repo_id]
    cache = tmp_path / "hub"
    write_to_hub_cache(repo_id, plant_into(repo_id, build_stand_in(repo_id, randomize=False)), cache)
    images = _spot_images(tmp_path / "images", stand_in.patch_size, range(6))
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "examples/repair.py", "--model", f"timm:hf-hub:{repo_id}", "--data", str(images)]
    command += ["--resolution", "224", "--max-steps", "200", "--stop-window", "6", "--output-dir", str(run)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert min(report["before"]["max_median_norm_ratio_last_layer"]) >= 40, report["before"]
    assert report["repaired"] and max(report["after"]["max_median_norm_ratio_last_layer"]) <= 5, report["after"]
    assert report["model_kwargs"]["mlp_layer" if "Virchow" in repo_id else "init_values"]

    # timm alone, in a fresh process, with the line model/README.md states
    readme = (run / "model" / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'"local-dir:{(run / "model").resolve()}", pretrained=True' in code
    normalization = ImageNormalization(mean=stand_in.mean, std=stand_in.std)
    held_out = spot_pixel_values(list(range(100, 104)), normalization, size=224, patch=stand_in.patch_size)
    large = torch.nn.functional.interpolate(held_out[:2], size=(448, 448), mode="bilinear")
    torch.save({"held_out": held_out, "large": large}, tmp_path / "pixels.pt")
    script = f"""{code}
import sys, torch
model.eval()
x = torch.load({str(tmp_path / "pixels.pt")!r})
sizes = ("held_out", "large") if model.dynamic_img_size else ("held_out",)
with torch.no_grad():
    torch.save({{key: model.forward_features(x[key]) for key in sizes}}, {str(tmp_path / "timm.pt")!r})
assert not any(name.startswith("sinder_peft") for name in sys.modules)
"""
    run_python(script, cwd=REPO_ROOT)
    reloaded = torch.load(tmp_path / "timm.pt")
    prefix = 1 + int(stand_in.model_args.get("reg_tokens", 4 if "reg4" in stand_in.architecture else 0))
    norms = reloaded["held_out"][:, prefix:].norm(dim=-1)
    assert float((norms.max(dim=1).values / norms.median(dim=1).values).max()) <= 5
    transformers_model = AutoModel.from_pretrained(run / "model-transformers").eval()
    for key, pixels in (("held_out", held_out), ("large", large)):
        if key in reloaded:
            expected = _features(transformers_model, pixels)
            assert torch.allclose(reloaded[key], expected, atol=1e-4 * float(expected.abs().max())), key
    assert ("large" in reloaded) == stand_in.dynamic
