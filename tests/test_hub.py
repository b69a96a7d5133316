"""Tests for `sinder_peft.models.hub`: the model card of a repaired model, its upload, and loading it back from a Hub
cache.

Uploads go to `fake_hub.FakeHub`, a small HTTP server on 127.0.0.1 that imitates the Hub endpoints `create_repo` and
`upload_folder` use and decodes the files the client sends; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import run_python, tiny_dinov2
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from transformers import AutoImageProcessor, BitImageProcessorPil, Dinov2Model

from sinder_peft.models.hub import (
    RepairCard,
    format_duration,
    format_layers,
    format_number,
    push_folder_to_hub,
    render_model_card,
    write_model_card,
)

TOKEN = "hf_fake_write_token"
REPO_ID = "someone/repaired"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_card(**changes: object) -> RepairCard:
    """A card with numbers chosen so that each formatting rule shows in the rendered text."""
    values: dict[str, object] = dict(
        base_model="facebook/dinov2-small",
        data="imagenet-1k (train, streaming)",
        steps=1234,
        images_seen=20000,
        images_skipped=5321,
        learning_rate=0.005,
        momentum=0.9,
        resolution=518,
        layers=[11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        seconds=3723.4,
        before={"max_median_norm_ratio": 123.456, "defect_token_share": 0.012345, "first_defective_layer": 6.4},
        after={"max_median_norm_ratio": 2.3456, "defect_token_share": 0.0, "first_defective_layer": float("nan")},
        clean_token_cosine=0.98765,
        sinder_peft_version="0.1.0",
        repo_id=REPO_ID,
        num_report_images=8,
    )
    values.update(changes)
    return RepairCard(**values)  # type: ignore[arg-type]


def save_tiny_model(directory: Path) -> Dinov2Model:
    """Save a tiny random DINOv2 to `directory` (config.json, model.safetensors) and return it."""
    model = tiny_dinov2()
    model.save_pretrained(directory)
    return model


def folder_contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by POSIX path relative to it."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def closed_loopback_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let huggingface_hub make requests even when the test run has HF_HUB_OFFLINE=1 (they only go to loopback)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.005, "0.005"),
        (0.9, "0.9"),
        (123.456, "123"),
        (2.3456, "2.35"),
        (-2.345, "-2.35"),
        (1234.5, "1230"),
        (999.6, "1000"),
        (0.0, "0"),
        (1.5e-5, "1.5e-05"),
        (12345678.0, "1.23e+07"),
        (float("nan"), "n/a"),
    ],
)
def test_format_number_keeps_three_significant_digits(value: float, expected: str) -> None:
    assert format_number(value) == expected


def test_format_duration_and_layers() -> None:
    assert format_duration(42.123) == "42.1 s"
    assert format_duration(600) == "10 min"
    assert format_duration(3 * 3600 + 360) == "3.1 h"
    assert format_layers([9, 0, 1, 2, 3, 7, 10, 3]) == "0-3, 7, 9-10"
    assert format_layers([5]) == "5"
    assert format_layers([]) == "none"


def test_model_card_metadata_tables_and_usage(tmp_path: Path) -> None:
    save_tiny_model(tmp_path)
    path = write_model_card(tmp_path, make_card(extra_notes="Trained on two CPU cores."))
    assert path == tmp_path / "README.md"

    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "facebook/dinov2-small"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.tags == ["dinov2", "sinder", "singular-defects", "vision", "feature-extraction"]

    text = path.read_text(encoding="utf-8")
    for row in [
        "| Images seen | 20,000 |",
        "| Images skipped (no defective layer) | 5,321 |",
        "| Optimisation steps | 1,234 |",
        "| Optimizer | SGD, learning rate 0.005, momentum 0.9 |",
        "| Resolution (short side) | 518 px |",
        "| Blocks adapted (from 0) | 0-9, 11 |",
        "| Time | 62.1 min |",
        "| Training data | imagenet-1k (train, streaming) |",
        "| Max/median token-norm ratio, last layer | 123 | 2.35 |",
        "| Share of defect tokens | 1.23 % | 0 % |",
        "| First defective layer | 6.4 | n/a |",
    ]:
        assert row in text.splitlines(), row
    assert "averaged over the 8 report images" in text
    assert "to those of the base model: 0.988." in text
    assert "SINDER" in text and "ECCV 2024" in text and "Salzmann" in text
    assert "plain `Dinov2Model` checkpoint" in text
    assert "## Notes\n\nTrained on two CPU cores." in text
    assert 'AutoModel.from_pretrained("someone/repaired")' in text
    assert "AutoImageProcessor" not in text  # no preprocessor_config.json in the folder
    assert "ImageNet mean" in text
    assert not re.search(r"\bnan\b|\d\.\d{4,}", text), "numbers must be rounded and NaN written n/a"

    BitImageProcessorPil(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(tmp_path)
    text = write_model_card(tmp_path, make_card()).read_text(encoding="utf-8")
    assert 'AutoImageProcessor.from_pretrained("someone/repaired")' in text
    assert "## Notes" not in text


def test_model_card_for_local_and_demo_base_models(tmp_path: Path) -> None:
    local_base = tmp_path / "my-dinov2"
    local_base.mkdir()
    text = render_model_card(make_card(base_model=str(local_base), clean_token_cosine=None, repo_id=None))
    card = ModelCard(text)
    assert card.data.base_model is None, "the Hub only accepts Hub ids as base_model"
    assert card.data.license is None, "no license is claimed for an unknown base model"
    assert f"`{local_base}`" in text
    assert "cosine" not in text
    assert 'AutoModel.from_pretrained("path/to/this/model")' in text

    text = render_model_card(make_card(base_model="demo", license="mit"))
    card = ModelCard(text)
    assert card.data.base_model is None
    assert card.data.license == "mit"
    assert "planted-defect demo model" in text


def test_push_uploads_every_file_byte_identical(tmp_path: Path, hub_online: None) -> None:
    folder = tmp_path / "model"
    model = save_tiny_model(folder)
    write_model_card(folder, make_card())
    expected = folder_contents(folder)
    assert set(expected) == {"config.json", "model.safetensors", "README.md"}

    with FakeHub(token=TOKEN) as hub:
        url = push_folder_to_hub(
            folder, REPO_ID, token=TOKEN, endpoint=hub.endpoint, private=True, commit_message="Repaired"
        )
        assert hub.state.files[REPO_ID] == expected
        assert len(hub.state.commits) == 1
        commit = hub.state.commits[0]
        assert commit["summary"] == "Repaired"
        assert url == f"{hub.endpoint}/{REPO_ID}/commit/{commit['oid']}"
        create_payload = hub.state.created[REPO_ID]
        assert (create_payload["organization"], create_payload["name"]) == ("someone", "repaired")
        assert create_payload.get("visibility") == "private" or create_payload.get("private") is True
        first_push_requests = len(hub.state.requests)

        # A second push to the existing repository (the Hub answers 409 to create) uploads the new card.
        (folder / "README.md").write_text(render_model_card(make_card(extra_notes="Second run.")), encoding="utf-8")
        second_url = push_folder_to_hub(folder, REPO_ID, token=TOKEN, endpoint=hub.endpoint)
        assert hub.state.files[REPO_ID] == folder_contents(folder)
        assert b"Second run." in hub.state.files[REPO_ID]["README.md"]
        assert second_url.endswith(hub.state.commits[1]["oid"]) and second_url != url

    requests = hub.state.requests
    assert first_push_requests <= 8 and len(requests) <= 16
    assert all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in requests)
    assert all(request.path.startswith("/api/") for request in requests)

    # What the server received is the model: it loads and computes the same features.
    received = tmp_path / "received"
    received.mkdir()
    for name, content in hub.state.files[REPO_ID].items():
        (received / name).write_bytes(content)
    pixel_values = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    reloaded = Dinov2Model.from_pretrained(received).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=pixel_values).last_hidden_state,
            model(pixel_values=pixel_values).last_hidden_state,
            rtol=0,
            atol=1e-6,
        )


def test_push_to_unreachable_endpoint_says_so(tmp_path: Path, hub_online: None) -> None:
    save_tiny_model(tmp_path)
    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    with pytest.raises(RuntimeError, match="Cannot reach the Hugging Face Hub") as raised:
        push_folder_to_hub(tmp_path, REPO_ID, token=TOKEN, endpoint=endpoint)
    message = str(raised.value)
    assert endpoint in message and "HF_ENDPOINT" in message and "--hub-token" in message
    assert raised.value.__cause__ is not None


def test_push_in_offline_mode_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    save_tiny_model(tmp_path)
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
            push_folder_to_hub(tmp_path, REPO_ID, token=TOKEN, endpoint=hub.endpoint)
        assert hub.state.requests == []


def test_push_with_rejected_token_gives_login_hint(tmp_path: Path, hub_online: None) -> None:
    save_tiny_model(tmp_path)
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(RuntimeError, match="HTTP 401") as raised:
            push_folder_to_hub(tmp_path, REPO_ID, token="hf_wrong_token", endpoint=hub.endpoint)
        assert hub.state.created == {} and hub.state.files == {}
        assert 1 <= len(hub.state.requests) <= 4
    message = str(raised.value)
    for hint in ("hf auth login", "huggingface-cli login", "HF_TOKEN", "--hub-token"):
        assert hint in message
    cause = raised.value.__cause__
    assert isinstance(cause, HfHubHTTPError) and cause.response.status_code == 401


def test_push_of_missing_folder_fails_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_folder_to_hub(tmp_path / "missing", REPO_ID, token=TOKEN, endpoint="http://127.0.0.1:9")


def test_repaired_model_loads_offline_from_hub_cache(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model = save_tiny_model(model_dir)
    BitImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 42},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(model_dir)
    card_text = write_model_card(model_dir, make_card()).read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", card_text, re.DOTALL)
    assert snippet is not None and 'AutoModel.from_pretrained("someone/repaired")' in snippet[1]

    # The layout `hf download` leaves (with plain files in place of the links into blobs/).
    cache = tmp_path / "hub-cache"
    commit = hashlib.sha1(b"repaired").hexdigest()
    snapshot = cache / "models--someone--repaired" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in folder_contents(model_dir).items():
        (snapshot / name).write_bytes(content)
    (cache / "models--someone--repaired" / "refs").mkdir()
    (cache / "models--someone--repaired" / "refs" / "main").write_text(commit)

    work = tmp_path / "work"
    work.mkdir()
    generator = torch.Generator().manual_seed(1)
    Image.fromarray(torch.randint(0, 256, (70, 90, 3), generator=generator, dtype=torch.uint8).numpy()).save(
        work / "image.jpg"
    )
    pixel_values = torch.randn(2, 3, 56, 70, generator=generator)
    torch.save(pixel_values, work / "pixel_values.pt")

    # The card's own example, then the same model on fixed inputs; sinder_peft must not be needed.
    code = (
        snippet[1]
        + "\nimport sys\n"
        + "assert 'sinder_peft' not in sys.modules\n"
        + "with torch.no_grad():\n"
        + "    fixed = model(pixel_values=torch.load('pixel_values.pt')).last_hidden_state\n"
        + "torch.save({'card_features': features, 'fixed_features': fixed}, 'features.pt')\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    run_python(code, cwd=work, env_update=env)
    loaded = torch.load(work / "features.pt")

    inputs = AutoImageProcessor.from_pretrained(model_dir)(images=Image.open(work / "image.jpg"), return_tensors="pt")
    with torch.no_grad():
        expected_card = model(**inputs).last_hidden_state
        expected_fixed = model(pixel_values=pixel_values).last_hidden_state
    assert expected_card.shape == (1, 1 + 4 * 3, 64)
    torch.testing.assert_close(loaded["card_features"], expected_card, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["fixed_features"], expected_fixed, rtol=0, atol=1e-5)
