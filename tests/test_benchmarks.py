"""The benchmark scripts run in `--quick` mode, write valid JSON with the expected content, and their built-in
exactness checks hold: the forward forms agree with float64, our training step's losses equal the original-style
step's on the same input, and the saved adapter's bytes equal the size formula."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import `benchmarks/<name>.py` as a module, with `benchmarks/` on `sys.path` as when run as a script."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    if name in sys.modules:
        return sys.modules[name]
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The quick runs use `--threads 1` (steady on a busy machine); give the other tests their threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_json(path: Path) -> dict:
    """Reload a written result (checks it is valid JSON)."""
    return json.loads(path.read_text())


def test_forward_forms_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_forward_forms", monkeypatch)
    output = tmp_path / "forms.json"
    module.main(["--quick", "--threads", "1", "--output", str(output)])
    result = read_json(output)
    assert result["benchmark"] == "forward_forms"
    assert {"machine", "args", "single_layer", "block_stack"} <= set(result)
    assert result["machine"]["torch"]
    forms = {"factored", "additive", "rebuild", "merged", "plain"}
    layers = {"attn (h->h)", "fc1 (h->4h)", "fc2 (4h->h)"}
    tokens = set(result["args"]["tokens"])
    assert {(r["layer"], r["tokens"], r["form"]) for r in result["single_layer"]} == {
        (layer, count, form) for layer in layers for count in tokens for form in forms
    }
    assert {(r["tokens"], r["form"]) for r in result["block_stack"]} == {(c, f) for c in tokens for f in forms}
    for record in result["single_layer"] + result["block_stack"]:
        assert record["timing"]["median_s"] > 0
        assert len(record["timing"]["times_s"]) == record["timing"]["repeats"]
        if record["form"] == "plain":
            assert record["max_abs_diff_vs_float64"] is None
        else:
            # every exact form reproduces U diag(S + delta) V^T computed in float64, to float32 rounding
            assert record["max_abs_diff_vs_float64"] < 1e-5 * max(1.0, record["output_max_abs"])


def test_train_step_quick_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_train_step", monkeypatch)
    output = tmp_path / "step.json"
    module.main(["--quick", "--threads", "1", "--memory", "in-process", "--profile", "--output", str(output)])
    result = read_json(output)
    assert result["benchmark"] == "train_step"
    assert result["window"] == [2, 3]
    assert [run["resolution"] for run in result["runs"]] == [56, 70]
    # tiny model: hidden 64, MLP 256, 4 blocks; every targeted layer has min(in, out) = 64 singular values
    per_block = 4 * 64
    expected_trained = {"original": 4 * per_block, "ours": 2 * per_block, "floor": 2 * (2 * 64 * 64 + 2 * 64 * 256)}
    for run in result["runs"]:
        side = run["side_by_side"]
        assert set(side) == {"original", "ours", "floor"}
        for variant, entries in expected_trained.items():
            assert side[variant]["trainable_entries"] == entries
            assert len(side[variant]["losses"]) == result["args"]["warmup"] + result["args"]["repeats"]
            assert side[variant]["timing"]["median_s"] > 0
        # same weights, same input: the losses agree at delta = 0 and after one identical SGD step
        ours, original = side["ours"]["losses"], side["original"]["losses"]
        assert ours[0] == pytest.approx(original[0], rel=1e-5)
        assert ours[1] == pytest.approx(original[1], rel=1e-5)
        assert ours[1] != ours[0]  # the SGD step changed something
        assert side["floor"]["losses"][0] == pytest.approx(original[0], rel=1e-5)
        assert run["loss_agreement"]["first_two_match"] is True
        for variant in expected_trained:
            memory = run["memory"][variant]
            assert memory["measured"] == "in-process"
            assert memory["step_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"]
            assert memory["total_bytes"] == memory["static_bytes"] + memory["step_bytes"]
    assert [profiled["resolution"] for profiled in result["profiles"]] == [56, 70]
    for profiled in result["profiles"]:
        names = {operator["name"] for operator in profiled["operators"]}
        assert names & {"aten::mm", "aten::addmm", "aten::linear"}
        assert sum(operator["self_fraction"] for operator in profiled["operators"]) <= 1 + 1e-9


def test_train_step_quick_one_variant_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_train_step", monkeypatch)
    output = tmp_path / "alone.json"
    module.main(["--quick", "--threads", "1", "--only", "ours", "--output", str(output)])
    result = read_json(output)
    assert [run["resolution"] for run in result["runs"]] == [56, 70]
    for run in result["runs"]:
        assert run["variant"] == "ours"
        assert len(run["losses"]) == result["args"]["memory_steps"]
        memory = run["memory"]
        assert memory["kind"] == "cpu_peak_rss"
        assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
        assert memory["static_bytes"] == memory["after_build_bytes"] - memory["before_build_bytes"]
        assert memory["step_bytes"] == memory["peak_bytes"] - memory["after_build_bytes"]
        assert memory["total_bytes"] == memory["static_bytes"] + memory["step_bytes"]


def test_train_step_quick_memory_subprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_train_step", monkeypatch)
    output = tmp_path / "driver.json"
    module.main(["--quick", "--threads", "1", "--variants", "ours", "--resolution", "56", "--output", str(output)])
    (run,) = read_json(output)["runs"]
    memory = run["memory"]["ours"]
    assert memory["measured"] == "subprocess"
    assert memory["peak_bytes"] > 0
    assert run["alone_timing"]["ours"]["median_s"] > 0
    # the subprocess rebuilt the same seeded model, input and step: its first loss is the side-by-side one
    assert run["loss_agreement"] == {}
    assert run["alone_losses"]["ours"][0] == pytest.approx(run["side_by_side"]["ours"]["losses"][0], rel=1e-6)


def test_adapter_size_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_adapter_size", monkeypatch)
    output = tmp_path / "size.json"
    module.main(["--quick", "--threads", "1", "--output", str(output)])
    result = read_json(output)
    computed = {entry["model"]: entry for entry in result["computed"]}
    assert set(computed) == {
        "facebook/dinov2-small",
        "facebook/dinov2-with-registers-small",
        "facebook/dinov2-giant",
        "facebook/dinov2-with-registers-giant",
    }
    # ViT-S: 12 blocks of v, o (384x384), fc1, fc2 (384x1536): 4 x 384 shifts per block
    small = computed["facebook/dinov2-small"]
    assert small["all_layers"]["delta_entries"] == 12 * 4 * 384
    assert small["all_layers"]["tensor_bytes"] == 4 * (12 * 4 * 384 + 12 * 4 * 6)
    # ViT-g: 40 SwiGLU blocks, hidden 1536, MLP 4096: v, o, gate, up, down each have 1536 singular values
    giant = computed["facebook/dinov2-giant"]
    assert giant["layout"]["targets"]["mlp.gate_proj"] == [4096, 1536]
    assert giant["all_layers"]["delta_entries"] == 40 * 5 * 1536
    assert giant["layout"]["model_parameters"] > 1.1e9
    assert computed["facebook/dinov2-with-registers-giant"]["all_layers"] == giant["all_layers"]
    registers_extra = computed["facebook/dinov2-with-registers-giant"]["layout"]["model_parameters"]
    assert registers_extra - giant["layout"]["model_parameters"] == 4 * 1536
    # window case (--quick: 2 blocks with gradients): the gradient window of a defective layer at half the depth
    assert (giant["window_start"], giant["window_end"]) == (19, 20)
    assert giant["window"]["adapted_layers"] == 2
    # fused gated MLPs: the stacked [gate; up] (8192 x 1536) has 1536 shifts and one fingerprint, not two of each
    assert giant["fused"]["layout"]["targets"]["mlp.gate_proj+up_proj"] == [8192, 1536]
    assert giant["fused"]["all_layers"]["delta_entries"] == 40 * 4 * 1536
    assert giant["fused"]["all_layers"]["tensor_bytes"] == 4 * (40 * 4 * 1536 + 40 * 4 * 6)
    assert small["fused"]["all_layers"] == small["all_layers"]
    # the saved files hold exactly the bytes of the formula, plus a header
    assert [check["case"] for check in result["saved"]] == ["all_layers", "last_half", "all_layers_swiglu_fused"]
    for check in result["saved"]:
        assert check["formula_matches"] is True
        assert check["stored_tensor_bytes"] == check["formula_tensor_bytes"]
        assert check["safetensors_file_bytes"] == check["stored_tensor_bytes"] + check["header_bytes"]
    assert 2 * result["saved"][1]["adapted_layers"] == result["saved"][0]["adapted_layers"]


def test_fidelity_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The official code's least-squares directions agree with ours past the first layer, and rebuilding every
    weight from its float32 SVD (what the official code writes back) moves weights and tokens by float noise only."""
    module = load_benchmark("bench_fidelity", monkeypatch)
    for part in ("directions", "rebuild"):
        module.main(["--quick", "--threads", "1", "--part", part, "--output", str(tmp_path / f"{part}.json")])
    directions = read_json(tmp_path / "directions.json")["directions"]
    assert [entry["model"] for entry in directions] == ["planted GELU", "planted SwiGLU"]
    assert all(entry["min_past_first"] > 0.99 and len(entry["cosines"]) == 6 for entry in directions)
    rebuild = read_json(tmp_path / "rebuild.json")["rebuild"]
    for entry in rebuild:
        assert len(entry["weights"]) == 6 * 6  # q, k, v, o and the two MLP weights (SwiGLU: [gate; up], down)
        assert 0 < entry["max_frobenius"] < 1e-5 and 0 < entry["tokens_relative_max"] < 1e-4
    assert "gate_proj+up_proj" in {change["weight"] for change in rebuild[1]["weights"]}


def test_scaling_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_scaling", monkeypatch)
    output = tmp_path / "scaling.json"
    module.main(["--quick", "--threads", "1", "--memory", "in-process", "--output", str(output)])
    result = read_json(output)
    assert result["benchmark"] == "scaling"
    assert {"machine", "args", "model", "window", "categories", "configurations"} <= set(result)
    assert result["window"] == [2, 3]
    assert result["categories"] == ["matmul", "attention", "elementwise", "other"]
    # the resolution sweep at batch 1, then the batch sweep at 56 px without repeating (56, 1)
    configurations = result["configurations"]
    assert [(c["resolution"], c["batch_size"]) for c in configurations] == [(56, 1), (70, 1), (56, 2)]
    for configuration in configurations:
        assert configuration["tokens_per_image"] == 1 + (configuration["resolution"] // 14) ** 2
        timing = configuration["timing"]
        assert timing["median_s"] > 0 and min(timing["times_s"]) > 0
        assert len(timing["times_s"]) == timing["repeats"] == 2
        assert len(configuration["losses"]) == 1 + 2 and all(loss > 0 for loss in configuration["losses"])
        memory = configuration["memory"]
        assert memory["kind"] == "cpu_peak_rss" and memory["measured"] == "in-process"
        assert memory["delta_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"] >= 0
        profile = configuration["profile"]
        categories = profile["categories"]
        assert set(categories) == set(result["categories"])
        assert sum(category["fraction"] for category in categories.values()) == pytest.approx(1.0)
        assert sum(category["ms_per_step"] for category in categories.values()) == pytest.approx(
            profile["ms_per_step_total"]
        )
        assert {op["name"] for op in categories["matmul"]["top_operators"]} & {"aten::mm", "aten::addmm"}
        assert any("scaled_dot_product" in op["name"] for op in categories["attention"]["top_operators"])
    # each configuration starts again from the built state: the second one's first loss is a fresh build's
    fresh = module.main(
        ["--quick", "--threads", "1", "--only-config", "70", "1", "--output", str(tmp_path / "70.json")]
    )
    # (without the reset it differs by about 4e-6 relative: three SGD steps at 56 px moved the shifts)
    assert fresh["configurations"][0]["losses"][0] == pytest.approx(configurations[1]["losses"][0], rel=1e-7)
    assert configurations[1]["losses"][1] != configurations[1]["losses"][0]  # the SGD steps changed the shifts
    # the classification: attention includes whatever runs inside it, a math-path matmul included
    assert module.operator_category("aten::mm") == "matmul"
    assert module.operator_category("aten::bmm", ["aten::scaled_dot_product_attention"]) == "attention"
    assert (
        module.operator_category("autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0")
        == "attention"
    )
    assert module.operator_category("aten::add_") == "elementwise"
    assert module.operator_category("aten::native_layer_norm") == "elementwise"
    assert module.operator_category("aten::view") == "other"


def test_injection_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_injection", monkeypatch)
    output = tmp_path / "injection.json"
    module.main(["--quick", "--threads", "1", "--output", str(output)])
    result = read_json(output)
    # the tiny GELU block: v, o (64 x 64), fc1 (256 x 64, tall), fc2 (64 x 256, wide: factored through its transpose)
    shapes = {path: tuple(entry["shape"]) for path, entry in result["projections"].items()}
    assert shapes == {
        "attention.v_proj": (64, 64),
        "attention.o_proj": (64, 64),
        "mlp.fc1": (256, 64),
        "mlp.fc2": (64, 256),
    }
    for entry in result["projections"].values():
        assert entry["reconstruction_relative_error"] < 1e-6
    assert result["window_s"]["adapter"] == pytest.approx(10 * result["per_block_s"]["adapter"])


def test_listing_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_listing", monkeypatch)
    output = tmp_path / "listing.json"
    module.main(["--quick", "--root", str(tmp_path / "tree"), "--output", str(output)])
    result = read_json(output)
    assert [entry["variant"] for entry in result["results"]] == [
        "list_image_files",
        "ImageFolderDataset",
        "rglob (0.1.0)",
    ]
    assert all(entry["files"] == 2000 and entry["median_s"] > 0 for entry in result["results"])
    assert not (tmp_path / "tree" / "train").exists()


def test_clean_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean random model gets "nothing to repair" on every folder, with no image trained on and no model/."""
    module = load_benchmark("bench_clean", monkeypatch)
    output = tmp_path / "clean.json"
    module.main(["--quick", "--output", str(output)])
    result = read_json(output)
    assert [entry["images"] for entry in result["results"]] == [4, 20]
    for entry in result["results"]:
        assert entry["stop_reason"] == "nothing_to_repair" and entry["images_seen"] == 0 and entry["steps"] == 0
        assert not entry["model_written"] and entry["seconds"] > 0


def test_families_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_families", monkeypatch)
    output = tmp_path / "families.json"
    module.main(["--quick", "--threads", "1", "--scratch", str(tmp_path / "scratch"), "--output", str(output)])
    result = read_json(output)
    assert [entry["family"] for entry in result["results"]] == ["dinov2", "clip_vision"]
    for entry in result["results"]:
        assert set(entry["median_s"]) == {"paper", "preserve", "plain"}
        assert entry["paper_over_plain"] == pytest.approx(entry["median_s"]["paper"] / entry["median_s"]["plain"])


def test_recipes_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("bench_recipes", monkeypatch)
    output = tmp_path / "recipes.json"
    module.main(["--quick", "--threads", "1", "--output", str(output)])
    result = read_json(output)
    (step,) = result["step"]
    assert step["preserve_over_paper"] == pytest.approx(step["median_s"]["preserve"] / step["median_s"]["paper"])
    assert set(step["median_s"]) == {"paper", "paper+gap", "preserve"}
    assert [(entry["model"], entry["recipe"]) for entry in result["ablation"]] == [
        ("gelu6-s41", "paper"),
        ("gelu6-s41", "preserve"),
        ("swiglu6-s41", "paper"),
        ("swiglu6-s41", "preserve"),
    ]
    preserve = [entry for entry in result["ablation"] if entry["recipe"] == "preserve"]
    assert all(entry["ratio_after_max"] <= 5 and entry["clean_cosine"] >= 0.95 for entry in preserve)


def test_hub_loading_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    module = load_benchmark("bench_hub_loading", monkeypatch)
    output = tmp_path / "hub.json"
    workdir = tmp_path / "work"
    module.main(["--quick", "--threads", "1", "--rounds", "1", "--workdir", str(workdir), "--output", str(output)])
    result = read_json(output)
    assert result["repo_id"] == "bioptimus/H-optimus-0" and result["parameters"] > 0
    assert set(result["best_seconds"]) == {"hub_cache", "local_directory"} and result["hub_lookup_seconds"] > 0
    snapshot = next((workdir / "hub" / "models--bioptimus--H-optimus-0" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").is_symlink()  # the cache layout `hf download` leaves
    assert (snapshot / "model.safetensors").samefile(workdir / "local" / "model.safetensors")
