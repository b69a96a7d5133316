"""Random-weight stand-ins of the pathology foundation models that `sinder_peft.models.timm.presets` knows, written
into an offline Hugging Face cache under their real Hub ids, as `hf download ORG/NAME` leaves them: the cache layout
(`models--ORG--NAME/refs/main`, `snapshots/REVISION/`) holding timm's `config.json` (`architecture`, `model_args`,
`pretrained_cfg` with the card's mean and std) and `model.safetensors`.

Each stand-in is the architecture the repository names, built with its model card's keyword arguments (the preset)
and its `config.json`'s, depth and width shrunk. As on the Hub, `config.json` records only the JSON arguments: the
layers (`mlp_layer`, `act_layer`) come from the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from sinder_peft.models.timm.arguments import resolve_model_kwargs
from sinder_peft.models.timm.conversion import timm_to_transformers, transformers_to_timm
from sinder_peft.models.timm.presets import PRESETS
from sinder_peft.synthetic.planting import plant_defect
from sinder_peft.tuner.architectures import IMAGENET_MEAN, IMAGENET_STD, ImageNormalization

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
"""H-optimus-0 and H-optimus-1's own normalization (their model cards)."""

REVISION = "1" * 40


@dataclass(frozen=True)
class StandIn:
    """A repository's architecture and the JSON arguments its `config.json` records (`model_args`), shrunk."""

    architecture: str
    model_args: dict[str, Any]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dynamic: bool = field(default=False)

    @property
    def patch_size(self) -> int:
        return int(self.model_args.get("patch_size", 14 if "patch14" in self.architecture else 16))


_SMALL = {"depth": 4, "num_heads": 4, "img_size": 224, "num_classes": 0}
STAND_INS: dict[str, StandIn] = {
    "MahmoodLab/UNI": StandIn(
        "vit_large_patch16_224",
        {**_SMALL, "embed_dim": 64, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dynamic=True,
    ),
    "MahmoodLab/UNI2-h": StandIn(
        "vit_giant_patch14_224",
        {
            **_SMALL,
            "embed_dim": 96,
            "patch_size": 14,
            "mlp_ratio": 2.66667 * 2,
            "init_values": 1e-5,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        dynamic=True,
    ),
    # hidden 160 and Virchow's mlp_ratio give a SwiGLU 427 wide, which transformers builds with 5 zero units more
    "paige-ai/Virchow": StandIn(
        "vit_huge_patch14_224",
        {
            **_SMALL,
            "embed_dim": 160,
            "mlp_ratio": 5.3375,
            "init_values": 1e-5,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        dynamic=True,
    ),
    "paige-ai/Virchow2": StandIn(
        "vit_huge_patch14_224",
        {
            **_SMALL,
            "embed_dim": 160,
            "mlp_ratio": 5.3375,
            "init_values": 1e-5,
            "global_pool": "",
            "reg_tokens": 4,
            "no_embed_class": True,
            "dynamic_img_size": True,
        },
        dynamic=True,
    ),
    "bioptimus/H-optimus-0": StandIn(
        "vit_giant_patch14_reg4_dinov2",
        {**_SMALL, "embed_dim": 96, "init_values": 1e-5, "dynamic_img_size": False},
        H_OPTIMUS_MEAN,
        H_OPTIMUS_STD,
    ),
    "bioptimus/H-optimus-1": StandIn(
        "vit_giant_patch14_reg4_dinov2",
        {**_SMALL, "embed_dim": 96, "init_values": 1e-5, "dynamic_img_size": False},
        H_OPTIMUS_MEAN,
        H_OPTIMUS_STD,
    ),
    "prov-gigapath/prov-gigapath": StandIn(
        "vit_giant_patch14_dinov2",
        {**_SMALL, "embed_dim": 96, "patch_size": 16, "mlp_ratio": 5.33334},
    ),
}


def card_kwargs(repo_id: str) -> dict[str, Any]:
    """Return the keyword arguments the model card passes, with the stand-in's sizes: what a user of the stand-in
    calls `timm.create_model("hf-hub:ORG/NAME", pretrained=True, **kwargs)` with (objects, not names)."""
    stand_in = STAND_INS[repo_id]
    preset = {key: value for key, value in PRESETS[repo_id].kwargs.items() if key not in stand_in.model_args}
    return resolve_model_kwargs(preset, timm)


def build_stand_in(repo_id: str, seed: int = 0, *, randomize: bool = True) -> nn.Module:
    """Return the stand-in of `repo_id` (eval mode): timm's initialization, then, with `randomize`, every parameter
    drawn at random (norms, biases, layer scales and positions too, so that a wrong mapping shows)."""
    stand_in = STAND_INS[repo_id]
    model = timm.create_model(stand_in.architecture, pretrained=False, **stand_in.model_args, **card_kwargs(repo_id))
    if not randomize:
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2 and parameter.shape[0] > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter[0].numel() ** -0.5)
            else:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model.eval()


def plant_into(repo_id: str, model: nn.Module, seed: int = 0) -> nn.Module:
    """Plant the tests' defect (`synthetic.planting`) into the stand-in `model`, in place, through its transformers
    version: zero padding units (`timm.links.mlp_links`) and class position (where timm keeps none) stay zero."""
    stand_in = STAND_INS[repo_id]
    converted = timm_to_transformers(model)
    plant_defect(converted, ImageNormalization(mean=stand_in.mean, std=stand_in.std), defect_layer=1, seed=seed)
    width = model.blocks[0].mlp.fc2.in_features
    with torch.no_grad():
        if model.no_embed_class:
            converted.embeddings.position_embeddings[:, 0] = 0.0
        for layer in converted.encoder.layer:
            mlp = layer.mlp
            for linear in (mlp.gate_proj, mlp.up_proj) if hasattr(mlp, "gate_proj") else (mlp.fc1,):
                linear.weight[width:] = 0.0
                linear.bias[width:] = 0.0
            output = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.fc2
            output.weight[:, width:] = 0.0
    return transformers_to_timm(converted, model)


def write_to_hub_cache(repo_id: str, model: nn.Module, cache: Path) -> Path:
    """Write `model` into the Hugging Face cache `cache` as the repository `repo_id` and return the snapshot."""
    stand_in = STAND_INS[repo_id]
    organization, name = repo_id.split("/")
    root = cache / f"models--{organization}--{name}"
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, snapshot / "model.safetensors")
    config = {
        "architecture": stand_in.architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": stand_in.model_args.get("global_pool", "token"),
        "model_args": stand_in.model_args,
        "pretrained_cfg": {
            "tag": "stand_in",
            "custom_load": False,
            "input_size": [3, 224, 224],
            "fixed_input_size": not stand_in.dynamic,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(stand_in.mean),
            "std": list(stand_in.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (snapshot / "config.json").write_text(json.dumps(config, indent=2))
    return snapshot
