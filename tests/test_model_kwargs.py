"""`--model-kwargs` (`sinder_peft.models.timm.arguments`, `other_libraries.ModelKwargsArguments`): the JSON is
read and its dotted names checked before anything is imported, loaded or written; names resolve inside timm and torch
only; objects go back to names for `config.json`. These run without timm (the timm-only parts skip)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from sinder_peft import RepairArguments
from sinder_peft.cli import main as cli_main
from sinder_peft.evaluation.arguments import EvaluationArguments
from sinder_peft.models.other_libraries import parse_model_name
from sinder_peft.models.timm.arguments import loading_line, parse_model_kwargs, resolve_dotted_name
from sinder_peft.models.timm.presets import PRESETS, find_preset, merge_model_kwargs

HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_json_is_parsed_and_kept_as_names() -> None:
    text = '{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "silu", "init_values": 1e-5, "reg_tokens": 8}'
    assert parse_model_kwargs(text) == {
        "mlp_layer": "timm.layers.SwiGLUPacked",
        "act_layer": "silu",
        "init_values": 1e-5,
        "reg_tokens": 8,
    }
    assert parse_model_kwargs(None) == {} and parse_model_kwargs(" ") == {}
    assert parse_model_kwargs({"global_pool": ""}) == {"global_pool": ""}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"act_layer": "os.system"}', "outside timm and torch"),
        ('{"mlp_layer": "builtins.eval"}', "outside timm and torch"),
        ('{"pretrained_cfg_overlay": {"x": ["subprocess.run"]}}', "outside timm and torch"),
        ('{"act_layer": "torch._C._nn"}', "private"),
        ('{"act_layer": "torch.nn.SiLU",}', "not valid JSON"),
        ("mlp_layer=SwiGLUPacked", "not valid JSON"),
        ('["torch.nn.SiLU"]', "JSON object"),
        ('{"not an identifier": 1}', "not a keyword argument name"),
    ],
)
def test_malformed_json_and_foreign_names_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_kwargs(text)
    with pytest.raises(ValueError, match=message):  # when the arguments are made: before anything is loaded
        RepairArguments(model="timm:hf-hub:paige-ai/Virchow2", model_kwargs=text)
    with pytest.raises(ValueError, match=message):
        EvaluationArguments(output_dir="x", model_kwargs=text)


def test_resolution_stays_inside_timm_and_torch() -> None:
    assert resolve_dotted_name("torch.nn.SiLU") is torch.nn.SiLU
    assert resolve_dotted_name("torch.nn.functional.silu") is torch.nn.functional.silu
    for name, message in (
        ("torch.os.system", "leads outside timm and torch"),  # `os` imported by torch: not torch's
        ("torch.nn.NoSuchLayer", "does not exist"),
        ("os.path.join", "outside timm and torch"),
    ):
        with pytest.raises(ValueError, match=message):
            resolve_dotted_name(name)


def test_model_kwargs_are_for_timm_models_only() -> None:
    assert parse_model_name("timm:hf-hub:MahmoodLab/UNI", '{"dynamic_img_size": false}').kwargs == {
        "dynamic_img_size": False
    }
    for model in ("facebook/dinov2-base", "open_clip:ViT-B-16/openai", "demo"):
        with pytest.raises(ValueError, match="applies to timm models"):
            parse_model_name(model, '{"init_values": 1e-5}')


def test_presets_are_overridden_key_by_key_and_yield_recorded_sizes() -> None:
    uni2 = find_preset("mahmoodlab/uni2-h")
    assert uni2 is PRESETS["MahmoodLab/UNI2-h"] and uni2.kwargs["reg_tokens"] == 8
    merged = merge_model_kwargs(uni2.kwargs, {"depth": 2, "embed_dim": 96}, {"dynamic_img_size": False})
    assert merged["dynamic_img_size"] is False and merged["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert "depth" not in merged and "embed_dim" not in merged and merged["num_heads"] == 24
    assert find_preset("someone/else") is None
    for preset in PRESETS.values():
        assert preset.card == f"https://huggingface.co/{preset.repo_id}"
        parse_model_kwargs(preset.kwargs)


def test_the_loading_line_names_the_layers() -> None:
    line = loading_line("/runs/x/model", {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "silu"})
    assert line == (
        'model = timm.create_model("local-dir:/runs/x/model", pretrained=True, '
        'mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu")'
    )


def test_a_refused_name_stops_every_command_before_it_writes(tmp_path: Path) -> None:
    foreign = '{"act_layer": "os.system"}'
    output = tmp_path / "out"
    model = "timm:hf-hub:paige-ai/Virchow2"
    assert cli_main(["repair", "--model", model, "--model-kwargs", foreign, "--output-dir", str(output)]) == 1
    assert cli_main(["diagnose", "--model", model, "--model-kwargs", foreign, "--output-dir", str(output)]) == 1
    assert cli_main(["evaluate", model, "--model-kwargs", foreign, "--output-dir", str(output)]) == 1
    assert cli_main(["convert", "x", str(output), "--from", "timm", "--model-kwargs", foreign]) == 1
    assert not output.exists()
    command = [sys.executable, "examples/repair.py", "--model", model, "--model-kwargs", foreign]
    result = subprocess.run(
        [*command, "--output-dir", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "outside timm and torch" in result.stderr
    assert not output.exists()


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_names_resolve_and_go_back() -> None:
    import timm

    from sinder_peft.models.timm.arguments import json_model_args, resolve_model_kwargs

    resolved = resolve_model_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "silu"}, timm)
    assert resolved == {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    assert resolve_model_kwargs({"act_layer": "torch.nn.SiLU"}, timm) == {"act_layer": torch.nn.SiLU}
    assert resolve_model_kwargs({"mlp_layer": "SwiGLUPacked"}, timm) == {"mlp_layer": timm.layers.SwiGLUPacked}
    assert resolve_model_kwargs({"global_pool": "token"}, timm) == {"global_pool": "token"}  # not a layer: as is
    with pytest.raises(ValueError, match="activation names"):
        resolve_model_kwargs({"act_layer": "no_such_activation"}, timm)
    written = json_model_args({**resolved, "norm_layer": torch.nn.LayerNorm, "depth": 2}, timm)
    assert written == {
        "mlp_layer": "timm.layers.SwiGLUPacked",
        "act_layer": "silu",
        "norm_layer": "timm.layers.LayerNorm" if timm.layers.LayerNorm is torch.nn.LayerNorm else "torch.nn.LayerNorm",
    }
    with pytest.raises(ValueError, match="no dotted name"):
        json_model_args({"mlp_layer": lambda *args: None}, timm)
