"""The repair trainer: end to end on the planted-defect model, gradient window, batches, NaN, resume, processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import REPO_ROOT, run_python
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

from sinder_peft import SinderLinear
from sinder_peft.images.batching import collate_images
from sinder_peft.images.datasets import build_dataset
from sinder_peft.jobs.repair import repair
from sinder_peft.jobs.repair_arguments import RepairArguments
from sinder_peft.jobs.repair_report import OUTCOME_EXIT_CODES
from sinder_peft.synthetic.demo import build_demo_model, build_planted_defect_model, demo_image_paths
from sinder_peft.training.arguments import TrainingArguments
from sinder_peft.training.loss import smooth_neighbourhood_loss
from sinder_peft.training.trainer import SinderTrainer, build_sinder_model, compute_directions
from sinder_peft.training.window_loss import DefectSearch, select_layers_to_transform


def demo_batch(count: int = 3) -> torch.Tensor:
    dataset = build_dataset(None, 224, 14)
    return collate_images([dataset[index] for index in range(count)]).pixel_values


def make_trainer(
    tmp_path: Path, layers: list[int], accelerator: Accelerator | None = None, **overrides: object
) -> SinderTrainer:
    base = build_demo_model()
    directions = compute_directions(base)
    model = build_sinder_model(base, layers)
    arguments = TrainingArguments(save_every=0, **overrides)
    accelerator = accelerator or Accelerator(cpu=True)
    return SinderTrainer(model, directions, arguments, accelerator, tmp_path / "checkpoints")


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if k.endswith("sinder_delta")}


def trained_deltas(run: Path) -> dict[str, torch.Tensor]:
    """Return the shifts of a run's last checkpoint: what it trained, whether or not its outcome wrote adapter/ (a
    few steps at a tiny learning rate remove no defect, and write no adapter/)."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return deltas(run / "checkpoints" / latest / "adapter")


def test_select_layers_to_transform() -> None:
    assert select_layers_to_transform([12, 15, -1], 24, 10) == list(range(3, 16))
    assert select_layers_to_transform([2], 6, 10) == [0, 1, 2]
    assert select_layers_to_transform([3, 20, 20], 24, 2) == [2, 3, 19, 20]
    assert select_layers_to_transform([-1, -1], 4, 10) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("initial", "limit_layers", "window"),
    [([4, 5], 2, [1, 2]), ([2, 4, 5], 3, [0, 1, 2])],
    ids=["window-from-block-1", "window-from-block-0-partly-adapted"],
)
def test_blocks_are_adapted_when_a_gradient_window_reaches_them(
    tmp_path: Path, initial: list[int], limit_layers: int, window: list[int]
) -> None:
    """The demo's defect is at layer 2: a trainer that starts with blocks `initial` adapted must adapt the rest of
    the gradient window before the autograd pass, and then train exactly what a trainer with every block adapted
    trains. In the second case the search already recorded a graph through block 2's shifts; that graph lacks the
    shifts of blocks 0-1 adapted after it, so the window must be run again, not reused."""
    pixel_values = demo_batch(2)
    grown = make_trainer(tmp_path / "grown", layers=initial, limit_layers=limit_layers)
    full = make_trainer(tmp_path / "full", layers=list(range(6)), limit_layers=limit_layers)

    def shifts(trainer: SinderTrainer) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach().clone()
            for name, parameter in trainer.model.named_parameters()
            if ".sinder_delta." in name
        }

    for step in range(2):
        grown_result, full_result = grown.training_step(pixel_values), full.training_step(pixel_values)
        assert grown_result["defective"] == full_result["defective"] == 2
        assert grown_result["loss"] == pytest.approx(full_result["loss"], rel=1e-6)
        if step == 0:
            checkpoint = grown.save_checkpoint()
    assert grown.model.peft_config["default"].layers_to_transform == sorted({*initial, *window})
    grown_shifts, full_shifts = shifts(grown), shifts(full)
    assert set(grown_shifts) < set(full_shifts)
    trained_blocks = set()
    for name, value in grown_shifts.items():
        torch.testing.assert_close(value, full_shifts[name], rtol=0, atol=1e-7)
        if bool(value.abs().sum() > 0):
            trained_blocks.add(int(name.split(".layer.")[1].split(".")[0]))
    assert trained_blocks == set(window)

    # the checkpoint taken after the growth resumes into the same second step (adapter layers and momentum)
    model = PeftModel.from_pretrained(build_demo_model(), checkpoint / "adapter", is_trainable=True)
    assert model.peft_config["default"].layers_to_transform == sorted({*initial, *window})
    resumed = SinderTrainer(
        model,
        compute_directions(build_demo_model()),
        TrainingArguments(save_every=0, limit_layers=limit_layers),
        Accelerator(cpu=True),
        tmp_path / "resumed",
    )
    resumed.load_checkpoint(checkpoint)
    resumed.training_step(pixel_values)
    for name, value in shifts(resumed).items():
        torch.testing.assert_close(value, grown_shifts[name], rtol=0, atol=1e-7)


def test_end_to_end_demo_repair(tmp_path: Path) -> None:
    result = repair(RepairArguments(output_dir=str(tmp_path / "run")))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["before"]["mean_max_median_norm_ratio_last_layer"] >= 40
    assert min(report["before"]["max_median_norm_ratio_last_layer"]) >= 40
    assert max(report["after"]["max_median_norm_ratio_last_layer"]) <= 5
    assert report["after"]["images_with_defects"] == 0
    assert report["clean_token_cosine"] >= 0.95
    assert report["stop_reason"] == "skip_ratio"
    run = tmp_path / "run"
    assert (run / "model" / "README.md").read_text().count("SINDER") >= 1
    assert len(list((run / "figures").glob("before_after_*.png"))) == 4
    assert not list(run.glob(".tmp-*"))

    # the merged model loads without sinder_peft and is repaired: an independent check of the report's numbers
    pixel_values = demo_batch(4)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    output = run_python(
        f"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(run / "model")!r}).eval()
assert "sinder_peft" not in sys.modules
hidden = model.embeddings(torch.load({str(tmp_path / "pixels.pt")!r}))
with torch.no_grad():
    for block in model.encoder.layer:
        hidden = block(hidden)
norms = hidden[:, 1:].norm(dim=-1)
print((norms.max(dim=1).values / norms.median(dim=1).values).tolist())
""",
        cwd=REPO_ROOT,
    )
    ratios = json.loads(output.stdout.strip().splitlines()[-1])
    assert ratios == pytest.approx(report["after"]["max_median_norm_ratio_last_layer"], rel=1e-4)


def test_loss_matches_independent_computation_and_gradient_window(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, layers=[0, 1, 2, 3, 4, 5], limit_layers=2)
    pixel_values = demo_batch(2)
    output = trainer.compute_loss(pixel_values)
    assert output.defective_layers == [2, 2]

    # independent: run the bare blocks, flag tokens, take the loss from loss.py per image
    backbone = trainer.window_loss.backbone
    with torch.no_grad():
        hidden = backbone.embeddings(pixel_values)
        for block in backbone.encoder.layer[:3]:
            hidden = block(hidden)
    tokens = hidden[:, 1:].reshape(2, 16, 16, -1)
    direction = trainer.window_loss.directions[2]
    cosines = (torch.nn.functional.normalize(tokens, dim=-1) @ direction).abs()
    flat = cosines.flatten(1)
    mask = cosines > (flat.mean(1) + 4 * flat.std(1))[:, None, None]
    mask[:, 0, :] = mask[:, -1, :] = mask[:, :, 0] = mask[:, :, -1] = False
    expected = sum(smooth_neighbourhood_loss(tokens[i : i + 1], cosines[i : i + 1], mask[i : i + 1]) for i in range(2))
    assert float(output.loss_sum.detach()) == pytest.approx(float(expected), rel=1e-5)

    output.backward()
    for name, parameter in trainer.model.named_parameters():
        if ".sinder_delta." not in name:
            continue
        layer = int(name.split(".layer.")[1].split(".")[0])
        if layer in (1, 2):
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize(("limit_layers", "window"), [(10, [0, 1, 2]), (2, [1, 2])])
def test_window_loss_reuses_the_search_pass(tmp_path: Path, limit_layers: int, window: list[int]) -> None:
    """The search's own forward pass, recorded with autograd, gives the loss: each block up to the defect (layer 2)
    runs once per step, and the loss and gradients equal those of the window run again from a search made without
    autograd; with windows of 2 blocks, block 0 gets no gradient either way."""
    trainer = make_trainer(tmp_path, layers=list(range(6)), limit_layers=limit_layers)
    window_loss = trainer.window_loss
    pixel_values = demo_batch(2)
    calls = [0] * len(window_loss.blocks)
    handles = [
        block.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
        for index, block in enumerate(window_loss.blocks)
    ]

    def loss_and_gradients(search: DefectSearch) -> tuple[float, list[torch.Tensor | None]]:
        trainer.optimizer.zero_grad(set_to_none=True)
        output = window_loss.window_loss(pixel_values, search)
        output.backward()
        return float(output.loss_sum.detach()), [
            None if p.grad is None else p.grad.clone() for p in trainer.parameters
        ]

    reused_search = window_loss.find_defective_layers(pixel_values)
    assert reused_search.layers == [2, 2] and sorted(reused_search.window_tokens) == [0, 1]
    reused_loss, reused_gradients = loss_and_gradients(reused_search)
    assert calls == [1, 1, 1, 0, 0, 0]

    calls[:] = [0] * len(calls)
    with torch.no_grad():
        rerun_search = window_loss.find_defective_layers(pixel_values)
    assert rerun_search.layers == [2, 2] and rerun_search.window_tokens == {}
    rerun_loss, rerun_gradients = loss_and_gradients(rerun_search)
    assert calls == [1 + (index in window) for index in range(3)] + [0, 0, 0]
    for handle in handles:
        handle.remove()

    assert reused_loss == pytest.approx(rerun_loss, rel=1e-6)
    names = [name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad]
    trained_blocks = set()
    for name, reused, rerun in zip(names, reused_gradients, rerun_gradients, strict=True):
        layer = int(name.split(".layer.")[1].split(".")[0])
        if layer in window:
            assert reused is not None and rerun is not None, name
            torch.testing.assert_close(reused, rerun, rtol=1e-5, atol=1e-8)
            if bool(reused.any()):
                trained_blocks.add(layer)
        else:
            assert reused is None and rerun is None, name
    assert trained_blocks == set(window)


def test_batch_equals_sum_of_single_images(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, layers=[0, 1, 2, 3, 4, 5])
    pixel_values = demo_batch(3)
    batch_output = trainer.compute_loss(pixel_values)
    batch_output.backward()
    batch_gradients = [None if p.grad is None else p.grad.clone() for p in trainer.parameters]
    assert sum(gradient is not None for gradient in batch_gradients) == 4 * 3  # layers 0-2, 4 projections each
    trainer.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index in range(3):
        single = trainer.compute_loss(pixel_values[index : index + 1])
        single.backward()
        total += float(single.loss_sum.detach())
    assert float(batch_output.loss_sum.detach()) == pytest.approx(total, rel=1e-5)
    for batch_gradient, parameter in zip(batch_gradients, trainer.parameters, strict=True):
        if batch_gradient is None:
            assert parameter.grad is None
        else:
            assert torch.allclose(batch_gradient, parameter.grad, rtol=1e-4, atol=1e-6)


def test_batch_size_three_repairs(tmp_path: Path) -> None:
    result = repair(RepairArguments(output_dir=str(tmp_path / "run")), TrainingArguments(batch_size=3, stop_window=6))
    assert result.report["after"]["images_with_defects"] == 0
    assert max(result.report["after"]["max_median_norm_ratio_last_layer"]) <= 5


@pytest.mark.parametrize("poisoned", ["loss", "gradient"])
def test_non_finite_loss_skips_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poisoned: str) -> None:
    import sinder_peft.training.window_loss as window_module

    trainer = make_trainer(tmp_path, layers=[0, 1, 2, 3, 4, 5])
    before = [p.detach().clone() for p in trainer.parameters]
    calls = {"count": 0}
    real_loss = window_module.smooth_neighbourhood_loss

    def nan_loss(*args: object, **kwargs: object) -> torch.Tensor:
        calls["count"] += 1
        return real_loss(*args, **kwargs) * float("nan")

    def nan_gradient(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            calls["count"] += 1
            output.register_hook(lambda gradient: gradient * float("nan"))

    if poisoned == "loss":
        monkeypatch.setattr(window_module, "smooth_neighbourhood_loss", nan_loss)
        result = trainer.training_step(demo_batch(1))
        monkeypatch.undo()
    else:
        handle = trainer.window_loss.blocks[1].register_forward_hook(nan_gradient)
        result = trainer.training_step(demo_batch(1))
        handle.remove()
    assert calls["count"] == 1 and result["nonfinite"] == 1.0
    assert trainer.state.nan_steps == 1 and trainer.state.step == 1
    for old, parameter in zip(before, trainer.parameters, strict=True):
        assert torch.equal(old, parameter) and torch.isfinite(parameter).all()
    result = trainer.training_step(demo_batch(1))
    assert result["nonfinite"] == 0.0 and any(
        not torch.equal(old, p) for old, p in zip(before, trainer.parameters, strict=True)
    )


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path: Path) -> None:
    training = TrainingArguments(lr=0.0005, max_steps=8, stop_window=1000, save_every=3)
    repair(RepairArguments(output_dir=str(tmp_path / "straight")), training)

    def interrupt(state: object) -> None:
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = repair(RepairArguments(output_dir=str(tmp_path / "split")), training, callbacks=(interrupt,))
    assert interrupted.state.stop_reason == "interrupted" and interrupted.state.step == 5
    assert not (tmp_path / "split" / "model").exists()
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "step-0000005"
    resumed = repair(RepairArguments(output_dir=str(tmp_path / "split"), resume=str(tmp_path / "split")), training)
    assert resumed.state.step == 8 and resumed.state.images_seen == 8
    straight, split = trained_deltas(tmp_path / "straight"), trained_deltas(tmp_path / "split")
    assert straight.keys() == split.keys()
    assert any(value.abs().max() > 0 for value in straight.values())
    for key in straight:
        assert torch.equal(straight[key], split[key]), key


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "holds no image"),
        ("corrupt image", "The data holds no usable image: all 1 images read were unreadable"),
        ("wrong model", "'convnext'"),
        ("too small", "smaller than 3×3 patches"),
        ("missing model", "does not exist"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path: Path, case: str, message: str) -> None:
    data = tmp_path / "images"
    data.mkdir()
    model = "demo"
    resolution = "224"
    if case == "corrupt image":
        (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif case != "empty folder":
        shutil.copy(demo_image_paths()[0], data / "a.png")
    if case == "wrong model":
        from transformers import ConvNextConfig, ConvNextModel

        ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])).save_pretrained(
            tmp_path / "convnext"
        )
        model = str(tmp_path / "convnext")
    if case == "too small":
        resolution = "28"
    if case == "missing model":
        model = str(tmp_path / "no-such-model")
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "examples/repair.py",
            "--model",
            model,
            "--data",
            str(data),
            "--resolution",
            resolution,
            "--output-dir",
            str(output_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not output_dir.exists()


def launch_two_processes(command: list[str], returncodes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run `command` (a script and its arguments) in two processes on the CPU, as `accelerate launch --multi_gpu`
    does on two GPUs: `torch.distributed.run` starts them, `ACCELERATE_USE_CPU` makes Accelerate use gloo. The run
    must exit with one of `returncodes` (a repair's outcome decides its status)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*launcher, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=environment
    )
    assert result.returncode in returncodes, result.stderr[-3000:]
    return result


def test_two_processes_with_an_image_free_of_defects(tmp_path: Path) -> None:
    """Two processes (gloo on CPU); one image has no defect, so some steps have one process without a defective
    image: the run must neither hang nor diverge between processes."""
    data = tmp_path / "images"
    data.mkdir()
    shutil.copy(demo_image_paths()[0], data / "spots.png")
    Image.new("RGB", (224, 224), (60, 90, 120)).save(data / "plain.png")
    output_dir = tmp_path / "run"
    arguments = ["--data", str(data), "--output-dir", str(output_dir), "--lr", "0.0005", "--max-steps", "4"]
    # four steps at a small learning rate remove little or nothing: the outcome's status is non-zero then, and the
    # launcher (torch.distributed.run, as accelerate launch) turns a non-zero status of its processes into 1
    launched = launch_two_processes(["examples/repair.py", *arguments, "--stop-window", "1000"], (0, 1))
    report = json.loads((output_dir / "report.json").read_text())
    assert (launched.returncode == 0) == (OUTCOME_EXIT_CODES[report["outcome"]] == 0)
    assert report["processes"] == 2
    assert report["steps"] == 4
    # 2 images per step (one per process), one of them without defect: half the images are skipped
    assert report["images_seen"] == 8 and report["images_skipped"] == 4

    # the synchronized step is the step of one process on the same two images as one batch
    single = repair(
        RepairArguments(data=str(data), output_dir=str(tmp_path / "single")),
        TrainingArguments(lr=0.0005, max_steps=4, stop_window=1000, batch_size=2),
    )
    assert single.state.images_seen == 8 and single.state.images_skipped == 4
    two_processes, one_process = trained_deltas(output_dir), trained_deltas(tmp_path / "single")
    assert two_processes.keys() == one_process.keys()
    assert any(value.abs().max() > 0 for value in one_process.values())
    for key, value in one_process.items():
        assert torch.allclose(two_processes[key], value, rtol=1e-4, atol=1e-7), key


def test_two_processes_adapt_the_same_blocks(tmp_path: Path) -> None:
    """Blocks are adapted on demand in step with every process: process 0 has a defective image whose gradient
    window (blocks 1-2) is not adapted yet, process 1 has an image free of defects. Both must adapt blocks 1-2 before
    the autograd pass and end with the shifts of one process training on the defective image alone."""
    (tmp_path / "plain").mkdir()
    script = tmp_path / "grow.py"
    script.write_text(
        f"""
import sys, torch
from accelerate import Accelerator
from PIL import Image
sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
from test_trainer import demo_batch
from sinder_peft.images.datasets import build_dataset
from sinder_peft.images.batching import collate_images
from sinder_peft.synthetic.demo import build_demo_model
from sinder_peft.training.trainer import SinderTrainer, build_sinder_model, compute_directions
from sinder_peft.training.arguments import TrainingArguments

accelerator = Accelerator()
assert accelerator.num_processes == 2
base = build_demo_model()
model = build_sinder_model(base, [4, 5])
arguments = TrainingArguments(save_every=0, limit_layers=2)
trainer = SinderTrainer(model, compute_directions(base), arguments, accelerator, {str(tmp_path)!r})
if accelerator.process_index == 0:
    batch = demo_batch(1)
else:
    Image.new("RGB", (224, 224), (60, 90, 120)).save({str(tmp_path / "plain" / "plain.png")!r})
    batch = collate_images([build_dataset({str(tmp_path / "plain")!r}, 224, 14)[0]]).pixel_values
for _ in range(2):
    result = trainer.training_step(batch)
    assert result["images"] == 2 and result["defective"] == 1, result
shifts = {{n: p.detach() for n, p in model.named_parameters() if ".sinder_delta." in n}}
layers = model.peft_config["default"].layers_to_transform
torch.save((layers, shifts), {str(tmp_path)!r} + f"/rank{{accelerator.process_index}}.pt")
"""
    )
    launch_two_processes([str(script)])

    single = make_trainer(tmp_path, layers=list(range(6)), limit_layers=2)
    for _ in range(2):
        single.training_step(demo_batch(1))
    expected = {name: p.detach() for name, p in single.model.named_parameters() if ".sinder_delta." in name}
    for rank in (0, 1):
        layers, shifts = torch.load(tmp_path / f"rank{rank}.pt")
        assert layers == [1, 2, 4, 5]
        assert any(value.abs().max() > 0 for value in shifts.values())
        for name, value in shifts.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-8)


def test_resume_of_missing_checkpoint_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No SINDER checkpoint"):
        repair(RepairArguments(output_dir=str(tmp_path / "run"), resume=str(tmp_path / "nothing")))


@pytest.mark.parametrize("kind", ["swiglu", "registers"])
def test_swiglu_and_registers_planted_models_repair(tmp_path: Path, kind: str) -> None:
    planted = build_planted_defect_model(swiglu=kind == "swiglu", num_register_tokens=4 if kind == "registers" else 0)
    planted.model.save_pretrained(tmp_path / kind)
    result = repair(RepairArguments(model=str(tmp_path / kind), output_dir=str(tmp_path / "run"), resolution=224))
    assert min(result.report["before"]["max_median_norm_ratio_last_layer"]) >= 40
    assert result.report["after"]["images_with_defects"] == 0
    assert max(result.report["after"]["max_median_norm_ratio_last_layer"]) <= 5
    assert result.report["clean_token_cosine"] >= 0.95
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["model_type"] == ("dinov2_with_registers" if kind == "registers" else "dinov2")


def test_push_to_hub_uploads_model_card_and_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from fake_hub import FakeHub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    token, repo_id = "hf_test_token_for_repair", "someone/dinov2-demo-repaired"
    with FakeHub(token=token, max_requests=64) as hub:
        result = repair(
            RepairArguments(
                output_dir=str(tmp_path / "run"),
                push_to_hub=repo_id,
                push_adapter=True,
                hub_token=token,
                hub_endpoint=hub.endpoint,
            )
        )
        received = hub.state.files[repo_id]
    run = tmp_path / "run"
    expected = {path.name: path.read_bytes() for path in (run / "model").iterdir()}
    expected.update({f"adapter/{path.name}": path.read_bytes() for path in (run / "adapter").iterdir()})
    assert received == expected
    assert "README.md" in received and "adapter/adapter_model.safetensors" in received
    assert "preprocessor_config.json" in received  # AutoImageProcessor works on the pushed repository
    assert result.report["pushed_to"].startswith(hub.endpoint)
    assert repo_id in (run / "model" / "README.md").read_text()


def test_repair_on_a_streamed_datasets_directory(tmp_path: Path) -> None:
    """--data as a 🤗 dataset saved with save_to_disk, streamed (the IterableDataset path of the trainer)."""
    import datasets

    images = [Image.open(path).convert("RGB") for path in demo_image_paths()]
    datasets.Dataset.from_dict({"picture": images}).save_to_disk(str(tmp_path / "dataset"))
    result = repair(
        RepairArguments(
            data=str(tmp_path / "dataset"),
            image_column="picture",
            streaming=True,
            resolution=224,
            output_dir=str(tmp_path / "run"),
        ),
        TrainingArguments(stop_window=6),
    )
    assert result.state.stop_reason == "skip_ratio"
    assert result.report["after"]["images_with_defects"] == 0
    assert len(list((tmp_path / "run" / "figures").glob("before_after_*.png"))) == 4


def test_images_with_different_defective_layers_in_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image 0 is defective at the planted layer 2, image 1 (forced) only from layer 12 on, with windows of 3
    blocks: the batch loss and gradients equal the sum over single images, and each image's gradient reaches only
    its own window (blocks 0-2 and 10-12), not the blocks between (3-9) or after (13). Image 0 leaves the search
    after layer 2, so blocks 3-12 run on image 1 alone; running the windows again (a search without autograd) gives
    the same loss and gradients."""
    import sinder_peft.analysis.detection as detection_module

    planted = build_planted_defect_model(num_layers=14, defect_layer=2)
    directions = compute_directions(planted.model)
    model = build_sinder_model(planted.model, list(range(14)))
    arguments = TrainingArguments(limit_layers=3, save_every=0)
    trainer = SinderTrainer(model, directions, arguments, Accelerator(cpu=True), tmp_path / "checkpoints")

    real_mask = detection_module.defect_token_mask
    calls = {"layer": 0, "late": [False, True]}

    def mask_with_late_images(cosines: torch.Tensor, mask_thr: float, border: int) -> torch.Tensor:
        mask = real_mask(cosines, mask_thr, border)
        if calls["layer"] < 12:
            late = torch.tensor(calls["late"])
            # the early images leave the search at their defective layer: the rows left are all late images
            mask[late if mask.shape[0] == late.numel() else slice(None)] = False
        calls["layer"] += 1
        return mask

    monkeypatch.setattr(detection_module, "defect_token_mask", mask_with_late_images)
    rows = []
    handles = [
        block.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
        for block in trainer.window_loss.blocks
    ]

    def loss_and_gradients(
        pixel_values: torch.Tensor, late: list[bool], rerun: bool = False
    ) -> tuple[float, list[torch.Tensor | None]]:
        calls.update(layer=0, late=late)
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad() if rerun else contextlib.nullcontext():
            search = trainer.window_loss.find_defective_layers(pixel_values)
        output = trainer.window_loss.window_loss(pixel_values, search)
        output.backward()
        expected = [12 if is_late else 2 for is_late in late]
        assert output.defective_layers == expected
        return float(output.loss_sum.detach()), [
            None if p.grad is None else p.grad.clone() for p in trainer.parameters
        ]

    pixel_values = demo_batch(2)
    batch_loss, batch_gradients = loss_and_gradients(pixel_values, [False, True])
    assert rows == [2, 2, 2] + [1] * 10
    rerun_loss, rerun_gradients = loss_and_gradients(pixel_values, [False, True], rerun=True)
    for handle in handles:
        handle.remove()
    assert rerun_loss == pytest.approx(batch_loss, rel=1e-6)
    for batch, rerun in zip(batch_gradients, rerun_gradients, strict=True):
        assert (batch is None and rerun is None) or torch.allclose(batch, rerun, rtol=1e-5, atol=1e-8)
    loss_a, gradients_a = loss_and_gradients(pixel_values[:1], [False])
    loss_b, gradients_b = loss_and_gradients(pixel_values[1:], [True])
    assert batch_loss == pytest.approx(loss_a + loss_b, rel=1e-5)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    for name, batch, single_a, single_b in zip(names, batch_gradients, gradients_a, gradients_b, strict=True):
        layer = int(name.split(".layer.")[1].split(".")[0])
        if layer in (0, 1, 2):
            assert single_b is None and torch.allclose(batch, single_a, rtol=1e-4, atol=1e-7), name
        elif layer in (10, 11, 12):
            assert single_a is None and torch.allclose(batch, single_b, rtol=1e-4, atol=1e-7), name
        else:
            assert batch is None and single_a is None and single_b is None, name


def test_report_to_tensorboard_logs_the_loss(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = repair(RepairArguments(output_dir=str(tmp_path / "run"), report_to="tensorboard"))
    event_files = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    losses = events.Scalars("loss")
    assert len(losses) == result.state.step
    assert losses[-1].step == result.state.step and losses[0].value > losses[-1].value


def test_bf16_mixed_precision_runs_the_blocks_under_autocast(tmp_path: Path, fresh_accelerate_state: None) -> None:
    pixel_values = demo_batch(2)
    expected = make_trainer(tmp_path, layers=list(range(6))).compute_loss(pixel_values)
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = make_trainer(tmp_path, layers=list(range(6)), accelerator=Accelerator(mixed_precision="bf16", cpu=True))
    autocast_seen: list[bool] = []
    layer = next(module for module in trainer.model.modules() if isinstance(module, SinderLinear))
    layer.register_forward_pre_hook(lambda module, args: autocast_seen.append(torch.is_autocast_enabled("cpu")))

    output = trainer.compute_loss(pixel_values)
    assert autocast_seen and all(autocast_seen)
    assert not torch.is_autocast_enabled("cpu")
    assert output.defective_layers == expected.defective_layers
    assert output.loss_sum.dtype == torch.float32
    loss, reference = float(output.loss_sum.detach()), float(expected.loss_sum.detach())
    assert loss != reference and loss == pytest.approx(reference, rel=0.05)

    before = [parameter.detach().clone() for parameter in trainer.parameters]
    result = trainer.training_step(pixel_values)
    assert result["defective"] == 2 and result["nonfinite"] == 0.0
    assert all(parameter.dtype == torch.float32 for parameter in trainer.parameters)
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.parameters, strict=True))


def test_fp16_mixed_precision_is_refused(tmp_path: Path, fresh_accelerate_state: None) -> None:
    with pytest.raises(ValueError, match="not 'fp16'.*bf16"):
        make_trainer(tmp_path, layers=[0, 1], accelerator=Accelerator(mixed_precision="fp16", cpu=True))


def test_repair_command_passes_mixed_precision_to_accelerate(tmp_path: Path, fresh_accelerate_state: None) -> None:
    from sinder_peft.jobs.repair import arguments_from_namespace, build_argument_parser

    parser = build_argument_parser()
    arguments, training = arguments_from_namespace(
        parser.parse_args(["--mixed-precision", "bf16", "--max-steps", "2", "--output-dir", str(tmp_path / "run")])
    )
    assert arguments.mixed_precision == "bf16" and training.max_steps == 2
    result = repair(arguments, training)
    assert AcceleratorState().mixed_precision == "bf16"
    assert result.state.step == 2 and result.state.nan_steps == 0
    written = (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert written == result.report["repaired"] and written == (result.report["outcome"] in ("repaired", "partial"))
    assert all(torch.isfinite(value).all() for value in trained_deltas(tmp_path / "run").values())


def test_progress_shows_how_much_of_the_stop_window_was_checked() -> None:
    """The bar moves with the steps, and its postfix says how many images of the stop window were checked and how
    many of them had no defect, also on batches without a step."""
    from sinder_peft.training.progress import TrainingProgress
    from sinder_peft.training.state import TrainerState

    state = TrainerState(step=3, last_loss=0.25)
    state.record_defective_layers([0.0, 2.0, 5.0])
    with TrainingProgress(Accelerator(cpu=True), max_steps=10, initial_step=0) as progress:
        state.record_batch(images=4, skipped=1, stop_window=6)
        progress.report(state, {"defective": 3, "loss": 0.25}, stop_window=6)
        assert progress.bar.n == 3
        state.record_batch(images=4, skipped=4, stop_window=6)
        progress.report(state, {"defective": 0, "loss": float("nan")}, stop_window=6)
        assert progress.bar.n == 3
        postfix = progress.bar.postfix
        # no total and no ETA from --max-steps: the stop rule usually ends the run long before
        assert progress.bar.total is None and "at most 10 steps" in progress.bar.desc
    assert "checked=6/6" in postfix and "clean=0.62" in postfix and "layer=2" in postfix and "loss=0.2500" in postfix
