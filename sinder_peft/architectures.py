"""How to read a transformer block of each supported ViT family.

Everything in sinder-peft that needs to know the *structure* of a model (which linear maps form the value/output
path of attention, where the layer scales live, what kind of MLP a block has, how many non-patch tokens precede the
patch grid) reads it from one `ArchitectureDescription`. Supporting another ViT family means adding one description
here, not changing the math in `defects.py` or the adapter defaults in `config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PretrainedConfig

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("dinov2", "dinov2_with_registers")


@dataclass(frozen=True)
class MlpDescription:
    """The MLP sub-block of a transformer block.

    Attributes:
        kind: `"gelu"` for `fc2(act(fc1(x)))`, `"swiglu"` for `down(silu(gate(x)) * up(x))`.
        activation: name of the activation in `transformers.activations.ACT2FN` (`"silu"` for SwiGLU).
        input_projections: module names, relative to the block, of the projections that read the MLP input, in the
            order the formula above uses them (`fc1`, or `gate_proj` then `up_proj`).
        output_projection: module name, relative to the block, of the projection that writes the residual stream.
    """

    kind: Literal["gelu", "swiglu"]
    activation: str
    input_projections: tuple[str, ...]
    output_projection: str

    @property
    def projections(self) -> tuple[str, ...]:
        """All linear projections of the MLP, input side first."""
        return (*self.input_projections, self.output_projection)


@dataclass(frozen=True)
class BlockDescription:
    """Where the pieces of one pre-norm residual block live, as module/parameter names relative to the block.

    The block computes `x <- x + ls1 * Attn(norm1(x))`, then `x <- x + ls2 * MLP(norm2(x))`.
    """

    norm1: str
    norm2: str
    query: str
    key: str
    value: str
    output: str
    layer_scale1: str
    layer_scale2: str
    mlp_prefix: str
    mlp: MlpDescription

    @property
    def attention_targets(self) -> tuple[str, ...]:
        """Attention projections SINDER trains: the value and output projections (never query and key)."""
        return (self.value, self.output)

    @property
    def mlp_targets(self) -> tuple[str, ...]:
        """MLP projections SINDER trains: all of them, prefixed with the MLP's module name."""
        return tuple(f"{self.mlp_prefix}.{name}" for name in self.mlp.projections)


@dataclass(frozen=True)
class ArchitectureDescription:
    """A whole ViT: its blocks, its final norm and the layout of its token sequence.

    Attributes:
        model_type: the `config.model_type` this description was built for.
        layers: dotted path, from the bare backbone (`Dinov2Model`), of the `nn.ModuleList` of blocks.
        final_norm: name of the final LayerNorm of the bare backbone (token norms are measured before it).
        num_prefix_tokens: tokens before the patch grid in the sequence (CLS, then registers if any).
        patch_size: side of a square patch in pixels.
        num_layers: number of blocks.
        hidden_size: width of the residual stream.
        block: the description shared by every block.
    """

    model_type: str
    layers: str
    final_norm: str
    num_prefix_tokens: int
    patch_size: int
    num_layers: int
    hidden_size: int
    block: BlockDescription

    @property
    def target_module_names(self) -> list[str]:
        """Default SINDER targets as leaf module names: value/output projections and every MLP projection."""
        leaves = [name.rsplit(".", 1)[-1] for name in (*self.block.attention_targets, *self.block.mlp_targets)]
        return leaves


def describe_config(config: PretrainedConfig) -> ArchitectureDescription:
    """Return the description of the architecture `config` belongs to.

    Raises:
        ValueError: if the model type is not one of `SUPPORTED_MODEL_TYPES`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"sinder-peft supports the model types {list(SUPPORTED_MODEL_TYPES)}, but this model's config has "
            f"model_type={model_type!r} ({type(config).__name__}). Load a DINOv2 checkpoint, e.g. "
            "`AutoModel.from_pretrained('facebook/dinov2-base')`."
        )
    if config.use_swiglu_ffn:
        mlp = MlpDescription(
            kind="swiglu", activation="silu", input_projections=("gate_proj", "up_proj"), output_projection="down_proj"
        )
    else:
        mlp = MlpDescription(
            kind="gelu", activation=config.hidden_act, input_projections=("fc1",), output_projection="fc2"
        )
    block = BlockDescription(
        norm1="norm1",
        norm2="norm2",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        output="attention.o_proj",
        layer_scale1="layer_scale1.lambda1",
        layer_scale2="layer_scale2.lambda1",
        mlp_prefix="mlp",
        mlp=mlp,
    )
    patch_size = config.patch_size if isinstance(config.patch_size, int) else int(config.patch_size[0])
    return ArchitectureDescription(
        model_type=model_type,
        layers="encoder.layer",
        final_norm="layernorm",
        num_prefix_tokens=1 + int(getattr(config, "num_register_tokens", 0)),
        patch_size=patch_size,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        block=block,
    )


def unwrap_backbone(model: nn.Module) -> nn.Module:
    """Return the bare DINOv2 backbone (the module holding `embeddings`, `encoder` and `layernorm`).

    Accepts a `Dinov2Model` / `Dinov2WithRegistersModel`, a task model wrapping one (`…ForImageClassification`), or a
    PEFT model (`PeftModel`, or the tuner it holds) wrapping any of these.

    Raises:
        ValueError: if no supported DINOv2 backbone is found.
    """
    candidate = model
    # PeftModel -> tuner (BaseTuner) -> the transformers model
    for _ in range(3):
        inner = getattr(candidate, "base_model", None)
        if isinstance(inner, nn.Module) and inner is not candidate and hasattr(inner, "model"):
            candidate = inner.model
        elif hasattr(candidate, "peft_config") and isinstance(getattr(candidate, "model", None), nn.Module):
            candidate = candidate.model
        else:
            break
    for attribute in ("dinov2", "dinov2_with_registers"):
        inner = getattr(candidate, attribute, None)
        if isinstance(inner, nn.Module):
            candidate = inner
    config = getattr(candidate, "config", None)
    if config is not None:
        describe_config(config)
    if config is None or not all(hasattr(candidate, name) for name in ("embeddings", "encoder", "layernorm")):
        raise ValueError(
            f"Expected a DINOv2 model (Dinov2Model or Dinov2WithRegistersModel, possibly inside a PeftModel), got "
            f"{type(model).__name__}."
        )
    return candidate


def describe_model(model: nn.Module) -> ArchitectureDescription:
    """Return the description of `model` (any form `unwrap_backbone` accepts)."""
    return describe_config(unwrap_backbone(model).config)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the `nn.ModuleList` of transformer blocks of `model` (any form `unwrap_backbone` accepts)."""
    backbone = unwrap_backbone(model)
    description = describe_config(backbone.config)
    return backbone.get_submodule(description.layers)
