"""The model card of a repaired model, and its upload to the Hugging Face Hub.

At the end of a repair run the merged model is saved to `model/`; `write_model_card` writes its `README.md` (YAML
front matter the Hub reads, then what the model is, how it was made, the defect statistics before and after, and how
to load it), and `push_folder_to_hub` uploads the folder. Every way the upload can fail on the network or on
authentication ends in one `HubUploadError` whose message says what to do.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from .loading import DEMO_MODEL_NAME, looks_like_hub_id
from .processor import IMAGE_PROCESSOR_CONFIG

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
CARD_TAGS: list[str] = ["dinov2", "sinder", "singular-defects", "vision", "feature-extraction"]
PIPELINE_TAG = "image-feature-extraction"
DEFAULT_COMMIT_MESSAGE = "Upload a ViT repaired with sinder-peft"

# Defect statistics the card knows how to label, in the order its table lists them. Keys of `RepairCard.before` /
# `RepairCard.after` not listed here are still shown, after these, under their own name.
METRIC_LABELS: dict[str, str] = {
    "max_median_norm_ratio": "Max/median token-norm ratio, last layer",
    "defect_token_share": "Share of defect tokens",
    "first_defective_layer": "First defective layer",
}
_PERCENT_METRICS = frozenset({"defect_token_share"})

SINDER_CITATION = """@inproceedings{wang2024sinder,
  title     = {SINDER: Repairing the Singular Defects of DINOv2},
  author    = {Wang, Haoqi and Zhang, Tong and Salzmann, Mathieu},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}"""

_AUTH_HINT = (
    "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`), set the HF_TOKEN environment "
    "variable, or pass a token with write access with `--hub-token`"
)


@dataclass
class RepairCard:
    """Everything the model card of a repaired model reports.

    Attributes:
        base_model: Hub id or local path of the model that was repaired (`"demo"` for the planted-defect demo).
        data: the training images, as the user named them (image folder or 🤗 datasets name and split).
        steps: optimisation steps taken.
        images_seen: images the repair looked at, skipped ones included.
        images_skipped: images with no defective layer, which gave no loss.
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        resolution: short side of the training images, in pixels.
        layers: indices (from 0) of the blocks that were adapted.
        seconds: wall-clock time of the repair.
        before: defect statistics of the base model, averaged over the report images; keys as in `METRIC_LABELS`
            (others are shown under their own name), NaN for a statistic without a value (e.g. the first defective
            layer when no image has one).
        after: the same statistics for the repaired model.
        clean_token_cosine: mean cosine similarity of the clean (non-defect) tokens of the repaired model to those
            of the base model, `None` if it was not measured.
        sinder_peft_version: version of sinder-peft that made the model.
        extra_notes: free text added to the card under "Notes", if any.
        license: license of the model for the card's metadata; `None` uses the base model's known license (see
            `known_license`) and omits it when there is none.
        repo_id: Hub repository the model is meant for, used in the loading example; `None` shows a placeholder.
        num_report_images: how many images the before/after statistics average over, if known.
    """

    base_model: str
    data: str
    steps: int
    images_seen: int
    images_skipped: int
    learning_rate: float
    momentum: float
    resolution: int
    layers: list[int]
    seconds: float
    before: dict[str, float]
    after: dict[str, float]
    clean_token_cosine: float | None
    sinder_peft_version: str
    extra_notes: str | None = None
    license: str | None = None
    repo_id: str | None = None
    num_report_images: int | None = None


def format_number(value: float) -> str:
    """Return `value` rounded to 3 significant digits, without trailing zeros, for a card meant to be read as text.

    Values from 1,000 to 1,000,000 are written out in full ("1230", not "1.23e+03"); smaller and larger ones follow
    Python's `g` format. NaN is written "n/a" (a statistic without a value).
    """
    if math.isnan(value):
        return "n/a"
    text = f"{value:.3g}"
    if "e" in text and 1e3 <= abs(float(text)) < 1e6:
        text = f"{float(text):.0f}"
    return text


def format_duration(seconds: float) -> str:
    """Return a duration in a readable unit: seconds below 2 minutes, minutes below 2 hours, else hours."""
    if seconds < 120:
        return f"{format_number(seconds)} s"
    if seconds < 7200:
        return f"{format_number(seconds / 60)} min"
    return f"{format_number(seconds / 3600)} h"


def format_layers(layers: list[int]) -> str:
    """Return block indices as sorted runs, e.g. `[0, 1, 2, 3, 7, 9, 10]` -> "0-3, 7, 9-10" ("none" when empty)."""
    indices = sorted(set(layers))
    if not indices:
        return "none"
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return ", ".join(str(start) if start == end else f"{start}-{end}" for start, end in runs)


def known_license(base_model: str) -> str | None:
    """Return the license of `base_model` when it is one of Meta's DINOv2 checkpoints on the Hub ("apache-2.0").

    A repaired model is a derivative of its base model and keeps its license; for any other base model the license
    is unknown here and `None` is returned, so that the card does not claim one.
    """
    if base_model.startswith(("facebook/dinov2-", "facebook/dinov2_")):
        return "apache-2.0"
    return None


def _is_hub_base_model(base_model: str) -> bool:
    """Whether `base_model` names a Hub repository (and not the demo model or a local directory).

    Only then may it go into the `base_model` metadata field, which the Hub checks against its repositories.
    """
    return (
        base_model != DEMO_MODEL_NAME and not Path(base_model).expanduser().exists() and looks_like_hub_id(base_model)
    )


def _format_metric(key: str, value: float | None) -> str:
    """Return one cell of the before/after table: "n/a" when missing, a percentage for shares, else 3 digits."""
    if value is None:
        return "n/a"
    if key in _PERCENT_METRICS and not math.isnan(value):
        return f"{format_number(100 * value)} %"
    return format_number(value)


def _metric_rows(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Return the rows of the before/after table, known statistics first, each row "| label | before | after |"."""
    keys = [key for key in METRIC_LABELS if key in before or key in after]
    keys += [key for key in {**before, **after} if key not in METRIC_LABELS]
    return [
        f"| {METRIC_LABELS.get(key, key)} | {_format_metric(key, before.get(key))} | "
        f"{_format_metric(key, after.get(key))} |"
        for key in keys
    ]


def _architecture(model_dir: Path) -> str:
    """Return the model class named in `model_dir/config.json` ("Dinov2Model" when it cannot be read)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return str(config["architectures"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "Dinov2Model"


def _usage_snippet(repo_or_dir: str, with_processor: bool) -> str:
    """Return the Python code of the card's "How to use" section (a fenced block), with or without the processor."""
    if with_processor:
        lines = [
            "import torch",
            "from PIL import Image",
            "from transformers import AutoImageProcessor, AutoModel",
            "",
            f'processor = AutoImageProcessor.from_pretrained("{repo_or_dir}")',
            f'model = AutoModel.from_pretrained("{repo_or_dir}")',
            "",
            'inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")',
            "with torch.no_grad():",
            "    features = model(**inputs).last_hidden_state  # [1, 1 + registers + patches, hidden_size]",
        ]
    else:
        lines = [
            "import torch",
            "from transformers import AutoModel",
            "",
            f'model = AutoModel.from_pretrained("{repo_or_dir}")',
            "",
            "# pixel_values: [batch, 3, height, width], RGB in [0, 1] normalized with the ImageNet mean and std,",
            "# height and width multiples of the patch size",
            "pixel_values = torch.rand(1, 3, 224, 224)",
            "with torch.no_grad():",
            "    features = model(pixel_values=pixel_values).last_hidden_state",
        ]
    return "```python\n" + "\n".join(lines) + "\n```"


def render_model_card(card: RepairCard, *, architecture: str = "Dinov2Model", with_processor: bool = False) -> str:
    """Return the text of the model card (README.md) of a repaired model.

    Args:
        card: what to report.
        architecture: the model class, as named in the model's `config.json`.
        with_processor: whether the model folder holds an image processor config, so that the loading example uses
            `AutoImageProcessor`.

    Returns:
        Markdown with YAML front matter: `library_name`, `base_model` (only when it is a Hub id, which the Hub
        requires), `license` (when known), `pipeline_tag` and `tags`.
    """
    base_is_hub_id = _is_hub_base_model(card.base_model)
    license_ = card.license if card.license is not None else known_license(card.base_model)
    metadata = ModelCardData(
        library_name="transformers",
        base_model=card.base_model if base_is_hub_id else None,
        license=license_,
        pipeline_tag=PIPELINE_TAG,
        tags=list(CARD_TAGS),
    )
    is_demo = card.base_model == DEMO_MODEL_NAME
    if is_demo:
        base_name = "the planted-defect demo model of sinder-peft"
    elif base_is_hub_id:
        base_name = f"[`{card.base_model}`](https://huggingface.co/{card.base_model})"
    else:
        base_name = f"`{card.base_model}`"
    title = "The sinder-peft demo model" if is_demo else card.base_model
    images = (
        f"the {card.num_report_images} report images" if card.num_report_images is not None else "the report images"
    )
    repo_or_dir = card.repo_id or "path/to/this/model"

    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {title}, repaired with SINDER",
        f"This is {base_name} with its singular defects repaired by SINDER (Haoqi Wang, Tong Zhang and "
        'Mathieu Salzmann, "SINDER: Repairing the Singular Defects of DINOv2", ECCV 2024), using '
        f"[sinder-peft](https://pypi.org/project/sinder-peft/) {card.sinder_peft_version}.",
        "Vision Transformers such as DINOv2 put a few patch tokens far above the others in norm; these tokens carry "
        "little about their image patch and show up as artefacts in feature maps. SINDER traces them to the leading "
        "singular direction of each block and fine-tunes only the singular values of the blocks' value, output and "
        "MLP projections, with a loss that pulls each defect token towards its smooth neighbourhood. The repair was "
        f"trained as a PEFT adapter and merged into the weights: this is a plain `{architecture}` checkpoint with "
        "the architecture and size of the base model, and loading it needs only transformers.",
        "## How it was made",
        "\n".join(
            [
                "| Setting | Value |",
                "|---|---|",
                f"| Base model | `{card.base_model}` |",
                f"| Training data | {card.data} |",
                f"| Images seen | {card.images_seen:,} |",
                f"| Images skipped (no defective layer) | {card.images_skipped:,} |",
                f"| Optimisation steps | {card.steps:,} |",
                f"| Optimizer | SGD, learning rate {format_number(card.learning_rate)}, "
                f"momentum {format_number(card.momentum)} |",
                f"| Resolution (short side) | {card.resolution} px |",
                f"| Blocks adapted (from 0) | {format_layers(card.layers)} |",
                f"| Time | {format_duration(card.seconds)} |",
                f"| sinder-peft version | {card.sinder_peft_version} |",
            ]
        ),
        "## Before and after",
        f"Defect statistics of the base model and of this model, averaged over {images}:",
        "\n".join(["| Statistic | Before | After |", "|---|---|---|", *_metric_rows(card.before, card.after)]),
    ]
    if card.clean_token_cosine is not None:
        sections.append(
            "Mean cosine similarity of the clean (non-defect) tokens of this model to those of the base model: "
            f"{format_number(card.clean_token_cosine)}."
        )
    usage = (
        "The image processor saved with the model resizes and normalizes images."
        if with_processor
        else "No image processor is saved with this model: resize images so that both sides are multiples of the "
        "patch size, and normalize them with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)."
    )
    sections += [
        "## How to use",
        "Load it with transformers alone (sinder-peft is not needed):",
        _usage_snippet(repo_or_dir, with_processor),
        usage,
    ]
    if card.extra_notes:
        sections += ["## Notes", card.extra_notes.strip()]
    sections += ["## Citation", f"```bibtex\n{SINDER_CITATION}\n```"]
    return "\n\n".join(sections) + "\n"


def write_model_card(model_dir: Path, card: RepairCard) -> Path:
    """Write the model card of the repaired model saved in `model_dir` to `model_dir/README.md`.

    The architecture is read from `model_dir/config.json`, and the loading example uses `AutoImageProcessor` when
    `model_dir` holds an image processor config. An existing README.md is replaced.

    Returns:
        The path of the card.
    """
    model_dir = Path(model_dir)
    text = render_model_card(
        card,
        architecture=_architecture(model_dir),
        with_processor=(model_dir / IMAGE_PROCESSOR_CONFIG).is_file(),
    )
    path = model_dir / CARD_NAME
    path.write_text(text, encoding="utf-8")
    logger.info("Wrote the model card %s.", path)
    return path


class HubUploadError(RuntimeError):
    """Uploading to the Hub failed: it could not be reached, refused the token, or refused the upload."""


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Return the exception types meaning that the Hub could not be reached.

    `ConnectionError` covers huggingface_hub's `OfflineModeIsEnabled` (HF_HUB_OFFLINE=1) and `TimeoutError` socket
    timeouts; the transport errors of the HTTP client huggingface_hub uses (httpx2 since huggingface_hub 2, httpx in
    1.x) cover refused connections, DNS failures, timeouts and proxy errors.
    """
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            types.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _http_error(error: HfHubHTTPError, repo_id: str, endpoint: str) -> HubUploadError:
    """Build the error raised when the Hub answers with an HTTP error: an authentication hint for 401 and 403."""
    status = error.response.status_code if error.response is not None else None
    if status in (401, 403):
        return HubUploadError(
            f"The Hub at {endpoint} refused the upload to {repo_id!r} (HTTP {status}): the token is missing, invalid, "
            f"or has no write access to that namespace. To authenticate, {_AUTH_HINT}."
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return HubUploadError(f"The Hub at {endpoint} refused the upload to {repo_id!r} (HTTP {status}): {first_line}")


def push_folder_to_hub(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    path_in_repo: str | None = None,
) -> str:
    """Upload every file of `folder` to the model repository `repo_id`, creating the repository if needed.

    Args:
        folder: the folder to upload (e.g. the merged `model/` with its card); its files keep their relative paths.
        repo_id: the repository, `namespace/name`.
        token: a Hub token with write access; `None` uses the saved login or HF_TOKEN.
        endpoint: the Hub URL; `None` uses HF_ENDPOINT or https://huggingface.co.
        private: whether a newly created repository is private (an existing one keeps its visibility).
        commit_message: the message of the upload commit.
        path_in_repo: folder of the repository to upload into (e.g. "adapter"); `None` uploads to its root.

    Returns:
        The URL of the upload commit (the repository URL if the Hub reported none).

    Raises:
        FileNotFoundError: `folder` is not a directory.
        HubUploadError: the Hub cannot be reached, rejects the token (with a hint on how to log in), or refuses the
            upload; the cause is chained.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot upload {str(folder)!r} to the Hub: it is not a directory.")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, path_in_repo=path_in_repo
        )
    except HfHubHTTPError as error:
        raise _http_error(error, repo_id, api.endpoint) from error
    except _network_error_types() as error:
        raise HubUploadError(
            f"Cannot reach the Hugging Face Hub at {api.endpoint} to upload {str(folder)!r} to {repo_id!r}: "
            f"{type(error).__name__}: {error}. Check the network connection, the endpoint (HF_ENDPOINT), and that "
            f"HF_HUB_OFFLINE is not set (the files are still in {str(folder)!r}). The upload also needs a token: "
            f"{_AUTH_HINT}."
        ) from error
    url = commit.commit_url or str(repo_url)
    logger.info("Uploaded %s to %s: %s", folder, repo_id, url)
    return url
