"""How `--model` names a model of another library (`timm:`, `open_clip:`), and the errors for bad names and missing
extras; these run without timm or OpenCLIP installed (the conversions themselves: test_timm_conversion.py,
test_open_clip_conversion.py; whole repairs: test_other_libraries_repair.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sinder_peft.cli import main as cli_main
from sinder_peft.models.loading import load_backbone
from sinder_peft.models.other_libraries import ModelName, parse_model_name
from sinder_peft.synthetic.demo import demo_image_paths


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("timm:vit_small_patch14_dinov2.lvd142m", ModelName("timm", "vit_small_patch14_dinov2.lvd142m")),
        ("timm:/models/my-timm-dir", ModelName("timm", "/models/my-timm-dir")),
        ("open_clip:ViT-B-16", ModelName("open_clip", "ViT-B-16")),
        ("open_clip:ViT-B-16/openai", ModelName("open_clip", "ViT-B-16/openai")),
        ("open_clip:ViT-L-14//ckpt/model.safetensors", ModelName("open_clip", "ViT-L-14//ckpt/model.safetensors")),
        ("facebook/dinov2-base", ModelName("transformers", "facebook/dinov2-base")),
        ("demo", ModelName("transformers", "demo")),
        ("runs/base", ModelName("transformers", "runs/base")),
    ],
)
def test_model_names(model: str, expected: ModelName) -> None:
    assert parse_model_name(model) == expected
    assert parse_model_name(model).is_foreign == (expected.library != "transformers")


def test_an_existing_path_with_a_colon_is_a_transformers_directory(tmp_path: Path) -> None:
    directory = tmp_path / "weird:name"
    directory.mkdir()
    assert parse_model_name(str(directory)) == ModelName("transformers", str(directory))


@pytest.mark.parametrize("model", ["tim:vit_small_patch14_dinov2", "openclip:ViT-B-16", "hf:facebook/dinov2-base"])
def test_an_unknown_prefix_is_refused_naming_the_known_ones(model: str) -> None:
    with pytest.raises(ValueError, match=r"unknown prefix .*timm:.*open_clip:"):
        parse_model_name(model)


@pytest.mark.parametrize("model", ["timm:", "open_clip:"])
def test_a_prefix_without_a_name_is_refused(model: str) -> None:
    with pytest.raises(ValueError, match="names no model"):
        parse_model_name(model)


@pytest.mark.parametrize(("library", "extra"), [("timm", "timm"), ("open_clip", "open_clip")])
def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, library: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, library, None)  # `import timm` then raises ImportError, installed or not
    with pytest.raises(ImportError, match=rf"pip install .sinder-peft\[{extra}\]"):
        load_backbone(f"{library}:anything")


def test_the_cli_reports_a_missing_extra_and_a_bad_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    code = cli_main(["repair", "--model", "timm:vit_small_patch14_dinov2", "--output-dir", str(tmp_path / "run")])
    assert code == 1 and "sinder-peft[timm]" in capsys.readouterr().err
    image = str(demo_image_paths()[0])
    code = cli_main(
        ["diagnose", image, "--model", "tmm:vit_small_patch14_dinov2", "--output-dir", str(tmp_path / "d")]
    )
    assert code == 1 and "unknown prefix 'tmm:'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
