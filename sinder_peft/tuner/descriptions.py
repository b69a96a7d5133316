"""The description of a ViT backbone: what `architectures` builds per family and everything else reads.

An `ArchitectureDescription` says which linear maps form the value/output path of attention and the MLP, where the
layer scales live (if anywhere), how many non-patch tokens precede the patch grid, how pixels become the input of the
first block (`embed`) and how one block is called (`run_block`).

Train mode. Run the backbone in eval mode (gradients still flow). DINOv3 randomly rescales its RoPE patch coordinates
on every call in train mode (`pos_embed_rescale`, on by default), so its `embed` refuses a backbone in train mode with
RoPE augmentation configured; every other family's train mode only switches on dropouts, which the released configs
set to 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class EmbeddedTokens:
    """The input of the first block, and what every block call needs besides it.

    Attributes:
        hidden: [B, T, C] the token sequence: the prefix tokens (`ArchitectureDescription.num_prefix_tokens`: CLS,
            registers, distillation token) first, then the patch tokens in row-major order.
        block_kwargs: keyword arguments of every block call (`ArchitectureDescription.run_block`), e.g.
            `attention_mask=None` or DINOv3's RoPE `position_embeddings`. **They never depend on the batch
            dimension**: the same dict is valid for any subset of the images, `hidden[indices]`, so a caller may run
            part of a batch further than the rest with the kwargs of the whole batch.
        grid_size: (H, W) the patch grid.
    """

    hidden: torch.Tensor
    block_kwargs: dict[str, Any]
    grid_size: tuple[int, int]


EmbedFunction = Callable[[nn.Module, torch.Tensor, tuple[int, int]], EmbeddedTokens]


@dataclass(frozen=True)
class MlpDescription:
    """The MLP sub-block of a transformer block.

    Attributes:
        kind: `"plain"` for `out(act(in(x)))`, `"gated"` for `out(act(gate(x)) * up(x))`.
        activation: name of the activation in `transformers.activations.ACT2FN` (of the gate for a gated MLP).
        input_projections: module names, relative to the MLP, of the projections that read the MLP input, in the
            order the formula above uses them (`fc1`, or `gate_proj` then `up_proj`).
        output_projection: module name, relative to the MLP, of the projection that writes the residual stream.
    """

    kind: Literal["plain", "gated"]
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

    The block computes `x <- x + ls1 * Attn(norm1(x))`, then `x <- x + ls2 * MLP(norm2(x))`; the layer scales
    `ls1`, `ls2` are per-channel parameters, or absent (`None`, i.e. 1) in families without them. Every norm of every
    registered family is an `nn.LayerNorm`.
    """

    norm1: str
    norm2: str
    query: str
    key: str
    value: str
    output: str
    layer_scale1: str | None
    layer_scale2: str | None
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
    """A whole ViT backbone: its blocks, its final norm, the layout of its token sequence and how to run it.

    Attributes:
        model_type: the backbone config's `model_type` this description was built for.
        family: the family's name, for messages ("DINOv2", "CLIP", ...).
        layers: dotted path, from the bare backbone, of the `nn.ModuleList` of blocks.
        final_norm: name of the backbone's final LayerNorm (token norms are measured before it).
        last_hidden_state_normed: whether the backbone's `last_hidden_state` is the final norm of the last block's
            output (CLIP's is the raw output: only its pooled CLS token is normed).
        num_prefix_tokens: tokens before the patch grid in the sequence (CLS, registers, distillation token).
        has_cls_token: whether the first token is a CLS token (SigLIP has none).
        patch_size: side of a square patch in pixels.
        num_layers: number of blocks.
        hidden_size: width of the residual stream.
        block: the description shared by every block.
        pooling: what `pooled_features` returns: `"cls"` the CLS token after the final norm, `"head"` the output of
            the backbone's attention-pooling head (SigLIP), `"mean"` the mean of the normed patch tokens.
        image_mean: the per-channel mean the family's checkpoints normalize pixels with, when a checkpoint has no
            image processor to say so.
        image_std: the per-channel std that goes with `image_mean`.
        embed_tokens: the family's embedding function (see `embed`).
    """

    model_type: str
    family: str
    layers: str
    final_norm: str
    last_hidden_state_normed: bool
    num_prefix_tokens: int
    has_cls_token: bool
    patch_size: int
    num_layers: int
    hidden_size: int
    block: BlockDescription
    pooling: Literal["cls", "head", "mean"]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    embed_tokens: EmbedFunction = field(repr=False)

    @property
    def target_module_names(self) -> list[str]:
        """Default SINDER targets as leaf module names: value/output projections and every MLP projection."""
        return [name.rsplit(".", 1)[-1] for name in (*self.block.attention_targets, *self.block.mlp_targets)]

    @property
    def block_list_name(self) -> str:
        """The attribute name of the block list itself (`layer`, `layers`): PEFT's `layers_pattern`."""
        return self.layers.rsplit(".", 1)[-1]

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor) -> EmbeddedTokens:
        """Return the input of the first block for `pixel_values` [B, 3, H, W], exactly as the model's forward does.

        `backbone` is the bare backbone (`unwrap_backbone(model)`), in eval mode (see the module docstring).

        Runs everything the model does before its first block (CLIP's `pre_layrnorm`, DINOv3's RoPE, SigLIP 2's
        patchifying and position resizing), with the position embeddings interpolated to any H×W that is a multiple
        of the patch size. `pixel_values` are moved to the backbone's device and dtype. The returned `block_kwargs`
        do not depend on the batch dimension (see `EmbeddedTokens`).

        Raises:
            ValueError: if `pixel_values` is not 4-D or its sides are not multiples of the patch size, or for a
                DINOv3 backbone in train mode with RoPE augmentation configured (call `model.eval()` first).
        """
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image height and width must be multiples of the patch size {self.patch_size}, got {height}×{width}."
            )
        reference = next(backbone.get_submodule("embeddings").parameters())
        pixel_values = pixel_values.to(device=reference.device, dtype=reference.dtype)
        return self.embed_tokens(backbone, pixel_values, (height // self.patch_size, width // self.patch_size))

    def run_block(self, block: nn.Module, hidden: torch.Tensor, block_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Return the output of one block (`get_blocks(model)[i]`) for its input `hidden` [B, T, C].

        `block_kwargs` are those of `embed` (valid for any subset of its batch). The output is the raw residual
        stream, before the final norm. Every registered family's block returns a tensor in transformers 5; a block
        returning a tuple (as older releases did) gives its first element.
        """
        output = block(hidden, **block_kwargs)
        return output[0] if isinstance(output, tuple) else output

    def block_outputs(self, backbone: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Return the raw output of every block for `pixel_values` [B, 3, H, W]: `num_layers` tensors [B, T, C].

        These equal the model's own `hidden_states[1:]` (`output_hidden_states=True`) wherever the model accepts the
        input size, and are computed the same way at any other multiple of the patch size.
        """
        return list(self._iterate_blocks(backbone, pixel_values))

    def _iterate_blocks(self, backbone: nn.Module, pixel_values: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the raw output of every block in turn, keeping none of them (see `block_outputs`)."""
        embedded = self.embed(backbone, pixel_values)
        hidden = embedded.hidden
        for block in backbone.get_submodule(self.layers):
            hidden = self.run_block(block, hidden, embedded.block_kwargs)
            yield hidden

    def final_tokens(self, backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return every output token after the final norm, [B, T, C] (prefix tokens first, then patches).

        This is the model's `last_hidden_state`, except for CLIP, whose `last_hidden_state` is the raw last block
        output and which norms only its pooled CLS token: here its final norm (`post_layernorm`) is applied to every
        token, so the patch tokens of all families are comparable.
        """
        for hidden in self._iterate_blocks(backbone, pixel_values):
            last = hidden
        return backbone.get_submodule(self.final_norm)(last)

    def pooled_features(self, backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return one feature vector per image, [B, C'], the image-level feature used for kNN classification.

        Per family (`pooling`): DINOv2, DINOv3 and CLIP give the CLS token after the final norm, which is their
        `pooler_output`. ViT and DeiT give the normed CLS token too, what their classification heads read; their
        `pooler_output` (tanh of a dense layer of the CLS token) is a pre-training head that task checkpoints do not
        carry. SigLIP and SigLIP 2 have no CLS token: they give their attention-pooling head's output (their
        `pooler_output`), or the mean of the normed patch tokens when the checkpoint has no head.
        """
        return self.pool(backbone, self.final_tokens(backbone, pixel_values))

    def pool(self, backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Return the image-level feature [B, C'] of `final_tokens` output `tokens` [B, T, C] (see
        `pooled_features`), for callers that already have the tokens."""
        if self.pooling == "cls":
            return tokens[:, 0]
        if self.pooling == "head":
            return backbone.get_submodule("head")(tokens)
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)
