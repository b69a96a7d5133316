"""The `timm.create_model` keyword arguments of well-known Hub repositories, as their model cards give them, so that
`--model timm:hf-hub:ORG/NAME` loads them without `--model-kwargs` (which overrides a preset key by key).

Each preset is written as `--model-kwargs` JSON is (`arguments`: dotted names for layers). The sizes a card
restates (`img_size`, `patch_size`, `depth`, `num_heads`, `embed_dim`, `mlp_ratio`) are those of the weights, which
the repository's own `config.json` also records in `model_args`: where it does, the recorded size is used
(`merge_model_kwargs`), so the preset's sizes only fill what the repository does not say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SIZE_ARGUMENTS: frozenset[str] = frozenset({"img_size", "patch_size", "depth", "num_heads", "embed_dim", "mlp_ratio"})
"""Arguments that only restate the architecture's sizes: a repository's `config.json` takes precedence for them."""

_SWIGLU_SILU: dict[str, Any] = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


@dataclass(frozen=True)
class Preset:
    """The arguments a model card passes to `timm.create_model`.

    Attributes:
        repo_id: the Hub repository (`ORG/NAME`).
        kwargs: the card's keyword arguments, in `--model-kwargs` form.
        card: the model card the arguments come from.
    """

    repo_id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    card: str = ""


PRESETS: dict[str, Preset] = {
    preset.repo_id: preset
    for preset in (
        Preset(
            "MahmoodLab/UNI",
            {"init_values": 1e-5, "dynamic_img_size": True},
            "https://huggingface.co/MahmoodLab/UNI",
        ),
        Preset(
            "MahmoodLab/UNI2-h",
            {
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                **_SWIGLU_SILU,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            "https://huggingface.co/MahmoodLab/UNI2-h",
        ),
        Preset("paige-ai/Virchow", dict(_SWIGLU_SILU), "https://huggingface.co/paige-ai/Virchow"),
        Preset("paige-ai/Virchow2", dict(_SWIGLU_SILU), "https://huggingface.co/paige-ai/Virchow2"),
        Preset(
            "bioptimus/H-optimus-0",
            {"init_values": 1e-5, "dynamic_img_size": False},
            "https://huggingface.co/bioptimus/H-optimus-0",
        ),
        Preset(
            "bioptimus/H-optimus-1",
            {"init_values": 1e-5, "dynamic_img_size": False},
            "https://huggingface.co/bioptimus/H-optimus-1",
        ),
        Preset("prov-gigapath/prov-gigapath", {}, "https://huggingface.co/prov-gigapath/prov-gigapath"),
    )
}
"""The presets by Hub repository id (matched without regard to case, as the Hub does)."""


def find_preset(repo_id: str) -> Preset | None:
    """Return the preset of the Hub repository `repo_id` (case-insensitive), or None."""
    lowered = repo_id.lower()
    return next((preset for key, preset in PRESETS.items() if key.lower() == lowered), None)


def merge_model_kwargs(
    preset: Mapping[str, Any], recorded: Mapping[str, Any], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Return the arguments to create the model with: the preset's, without the sizes the repository's `config.json`
    records (`recorded`, its `model_args`), overridden key by key by the ones given (`--model-kwargs`)."""
    kept = {key: value for key, value in preset.items() if not (key in SIZE_ARGUMENTS and key in recorded)}
    return {**kept, **given}
