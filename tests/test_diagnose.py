"""`sinder diagnose`: the report against a direct computation, the figures, the errors and the argparse glue."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from transformers import ConvNextConfig, ConvNextModel

from sinder_peft.analysis.detection import DefectTest, find_defect_tokens
from sinder_peft.analysis.directions import singular_defect_directions
from sinder_peft.images.preprocessing import prepare_image
from sinder_peft.jobs.diagnose import add_parser, diagnose, run
from sinder_peft.synthetic.demo import build_demo_model, demo_image_paths
from sinder_peft.tuner.architectures import ImageNormalization

RESOLUTION = 224


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list[Path]]:
    """Diagnose the demo model on the demo images plus a wide crop of one of them (a non-square grid)."""
    root = tmp_path_factory.mktemp("diagnose")
    wide = root / "inputs" / "wide.png"
    wide.parent.mkdir()
    with Image.open(demo_image_paths()[1]) as image:
        image.convert("RGB").crop((0, 0, 224, 140)).save(wide)
    images = [*demo_image_paths(), wide]
    report = diagnose("demo", images, output_dir=root / "out", resolution=RESOLUTION)
    return report, root / "out", images


def test_report_matches_a_direct_computation(demo_run: tuple[dict, Path, list[Path]]) -> None:
    report, output_dir, images = demo_run
    assert json.loads((output_dir / "report.json").read_text()) == report

    model = build_demo_model().eval()
    directions = singular_defect_directions(model)
    unit = torch.stack([direction.double() / direction.double().norm() for direction in directions])
    expected_cosines = [abs(float(unit[index] @ unit[index + 1])) for index in range(len(directions) - 1)]
    assert report["direction_consecutive_abs_cos"] == pytest.approx(expected_cosines, abs=1e-9)
    assert report["model"] == "demo" and report["resolution"] == RESOLUTION
    assert report["num_layers"] == len(directions) == model.config.num_hidden_layers

    assert [entry["path"] for entry in report["images"]] == [str(path) for path in images]
    defective = 0
    for path, entry in zip(images, report["images"], strict=True):
        with Image.open(path) as image:
            pixel_values = prepare_image(image, RESOLUTION, 14, ImageNormalization())[None]
        analysis = find_defect_tokens(model, pixel_values, directions, test=DefectTest(mask_thr=4.0, min_tokens=3))
        assert entry["grid_size"] == [pixel_values.shape[-2] // 14, pixel_values.shape[-1] // 14]
        assert entry["first_defective_layer"] == int(analysis.first_defective_layer[0])
        assert entry["max_median_norm_ratio"] == pytest.approx(analysis.max_median_norm_ratio[0].tolist(), rel=1e-6)
        assert entry["high_norm_share"] == pytest.approx(analysis.high_norm_share[0].tolist(), abs=1e-7)
        assert entry["num_defect_tokens"] == analysis.masks[0].flatten(1).sum(dim=1).tolist()
        defective += entry["first_defective_layer"] >= 0
    assert report["num_defective_images"] == defective == len(images)
    assert report["images"][-1]["grid_size"] == [16, 25]  # 140 -> 224 short side, 224 -> 358 -> 350 = 25 patches


def test_the_planted_defect_is_found_where_the_demo_images_are_bright(demo_run: tuple[dict, Path, list[Path]]) -> None:
    """Independent check of the demo: the flagged tokens of the last layer are the white patches of the image."""
    report, _, images = demo_run
    entry = report["images"][0]
    with Image.open(images[0]) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    patch_means = pixels.reshape(16, 14, 16, 14, 3).mean(axis=(1, 3, 4))
    white = {(row, column) for row, column in zip(*np.nonzero(patch_means > 0.99), strict=True)}
    interior_white = {(row, column) for row, column in white if 0 < row < 15 and 0 < column < 15}
    assert entry["num_defect_tokens"][-1] == len(interior_white) > 0
    assert max(entry["max_median_norm_ratio"]) > 20


def test_figures_are_written(demo_run: tuple[dict, Path, list[Path]]) -> None:
    report, output_dir, images = demo_run
    names = sorted(path.name for path in output_dir.glob("*.png"))
    assert names == sorted(["layer_norms.png", *(f"{path.stem}_diagnosis.png" for path in images)])
    for entry in report["images"]:
        width, height = png_size(output_dir / entry["figure"])
        assert width == 1300 and height > 300
    assert png_size(output_dir / report["layer_plot"]) == (700, 400)


def test_same_file_names_get_distinct_figures(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        with Image.open(demo_image_paths()[0]) as image:
            image.save(tmp_path / folder / "photo.png")
    report = diagnose("demo", [tmp_path / "a", tmp_path / "b"], output_dir=tmp_path / "out", resolution=56)
    assert [entry["figure"] for entry in report["images"]] == ["photo_diagnosis.png", "photo_2_diagnosis.png"]
    assert (tmp_path / "out" / "photo_2_diagnosis.png").is_file()


def test_clear_errors(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 20)
    with pytest.raises(ValueError, match="corrupt.png"):
        diagnose("demo", [corrupt], output_dir=output_dir)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"Cannot read the image .*notes.txt"):
        diagnose("demo", [text], output_dir=output_dir)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        diagnose("demo", [tmp_path / "missing.jpg"], output_dir=output_dir)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 12), color=(10, 20, 30)).save(tiny)
    with pytest.raises(ValueError, match=r"tiny.png.*8x12 pixels.*smaller than one 14x14 patch"):
        diagnose("demo", [tiny], output_dir=output_dir)
    with pytest.raises(ValueError, match=r"No image given"):
        diagnose(str(tmp_path), [], output_dir=output_dir)
    convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))  # not a ViT
    convnext.save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match=r"model_type='convnext'"):
        diagnose(str(tmp_path / "convnext"), demo_image_paths()[:1], output_dir=output_dir)
    assert not (output_dir / "report.json").exists()


def build_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinder")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_cli()
    args = parser.parse_args(["diagnose", "--model", "demo", "--output-dir", str(tmp_path), "--resolution", "56"])
    assert args.handler is run and args.images == [] and args.mask_thr == 4.0 and args.min_tokens == 3
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["resolution"] == 56 and len(report["images"]) == len(demo_image_paths())
    assert f"{report['num_defective_images']} of {len(demo_image_paths())} images" in printed

    bad = parser.parse_args(["diagnose", "--model", "demo", "--output-dir", str(tmp_path), str(tmp_path / "no.png")])
    assert run(bad) == 1
    captured = capsys.readouterr()
    assert "error" in captured.err and "no.png" in captured.err and "Traceback" not in captured.err
    with pytest.raises(SystemExit):
        parser.parse_args(["diagnose", "--output-dir", str(tmp_path)])


def test_example_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    image = demo_image_paths()[2]
    monkeypatch.setattr(sys, "argv", ["diagnose.py", str(image), "--output-dir", str(tmp_path), "--resolution", "112"])
    runpy.run_path(str(REPO_ROOT / "examples" / "diagnose.py"), run_name="__main__")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"][0]["path"] == str(image) and report["images"][0]["grid_size"] == [8, 8]
    assert "first defective layer" in capsys.readouterr().out


def test_diagnose_with_registers_skips_register_tokens(tmp_path: Path) -> None:
    """A Dinov2WithRegistersModel: the patch grid leaves out CLS and the 4 registers, and the planted defect tokens
    (the bright patches) are found at the planted layer."""
    from sinder_peft.synthetic.demo import build_planted_defect_model

    planted = build_planted_defect_model(num_register_tokens=4)
    planted.model.save_pretrained(tmp_path / "registers")
    image = demo_image_paths()[0]
    report = diagnose(str(tmp_path / "registers"), [image], output_dir=tmp_path / "out", resolution=224)
    entry = report["images"][0]
    assert entry["grid_size"] == [16, 16]
    assert entry["first_defective_layer"] == planted.defect_layer
    pixel_values = prepare_image(Image.open(image), 224, 14)[None]
    expected = planted.planted_positions(pixel_values)[0].nonzero().tolist()
    assert sorted(entry["defect_tokens"]) == sorted(expected)
