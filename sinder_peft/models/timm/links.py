"""The pieces of a timm <-> transformers conversion: `Link` (which timm tensor, or which slice of a fused one, is
which transformers tensor), `Plan` (every link of a model and the transformers config it needs), and reading what a
timm `VisionTransformer` is made of (patch embedding, norms, activation, MLP, tokens), refusing what transformers
cannot reproduce. The per-family plans are `plans`.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

TIMM_TO_TRANSFORMERS: dict[str, str] = {
    "DINOv2: VisionTransformer with layer scale or SwiGLU (vit_*_patch14_dinov2, also deit3_*)": "Dinov2Model",
    "DINOv2 with registers: VisionTransformer with reg tokens (vit_*_patch14_reg4_dinov2)": "Dinov2WithRegistersModel",
    "DINOv3: Eva with DINOv3 RoPE (vit_*_patch16_dinov3*)": "DINOv3ViTModel",
    "CLIP image tower: VisionTransformer with norm_pre (vit_*_clip_*, vit_*_clip_quickgelu_*)": "CLIPVisionModel",
    "SigLIP image tower: VisionTransformer without class token (vit_*_siglip_*)": "SiglipVisionModel",
    "ViT, DeiT: plain VisionTransformer (vit_*_patch16_224, deit_*_patch16_224)": "ViTModel",
    "DeiT distilled: VisionTransformerDistilled (deit_*_distilled_patch16_224)": "DeiTModel",
}
"""The timm families `timm_to_transformers` converts, each with the transformers class it becomes."""

# timm parameters outside `forward_features` (left in the timm model, never converted unless a link names them).
HEAD_PREFIXES: tuple[str, ...] = ("head.", "head_dist.", "fc_norm.", "attn_pool.")

# transformers' activation names (ACT2FN) for timm's activation modules, by class name.
ACTIVATIONS: dict[str, str] = {
    "GELU": "gelu",
    "GELUTanh": "gelu_pytorch_tanh",
    "QuickGELU": "quick_gelu",
    "SiLU": "silu",
}

# The largest integer DINOv2 `mlp_ratio` tried when matching a SwiGLU width.
MAX_MLP_RATIO = 64

# How far from zero, relative to the largest value of its transformers tensor, a padding unit may have drifted when
# written back (an adapter merge leaves float rounding there; anything larger is refused).
PADDING_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Fill:
    """A tensor the timm model does not have, whose value in the transformers model is fixed: `value` everywhere.

    Attributes:
        shape: the tensor's shape in the timm layout (the part it takes in a concatenation).
        value: 0 for a missing bias or class position, 1 for a missing layer scale.
        checked: whether writing back requires the transformers tensor to still hold `value` (every fill that the
            forward pass reads); DINOv2's and DINOv3's mask tokens, used only by masked pre-training, are not.
    """

    shape: tuple[int, ...]
    value: float = 0.0
    checked: bool = True
    tolerance: float = 0.0


@dataclass(frozen=True)
class Rows:
    """Rows `start` to `start + length` of the timm tensor `key` (along its first dimension): one half of a packed
    SwiGLU `fc1`, where the transformers MLP is wider than timm's (`padding`) and the halves get zeros each."""

    key: str
    start: int
    length: int


@dataclass(frozen=True)
class Link:
    """One correspondence: the timm parts, concatenated along `timm_dim`, hold the numbers of the transformers
    tensors `hf`, concatenated along `hf_dim`, in the same order; a reshape sits in between (CLIP's class embedding
    is [D] where timm's class token is [1, 1, D]). E.g. `attn.qkv.weight` <-> (`q_proj`, `k_proj`, `v_proj`)."""

    hf: tuple[str, ...]
    timm: tuple[str | Rows | Fill, ...]
    hf_dim: int = 0
    timm_dim: int = 0


@dataclass(frozen=True)
class Plan:
    """How one timm model maps onto one transformers model.

    Attributes:
        family: the family's name, for messages.
        model_class: the transformers class the timm model becomes.
        config_kwargs: the arguments of its config (the architecture; checked again when writing back).
        links: every transformers tensor's source in the timm model.
        init_kwargs: extra constructor arguments (`add_pooling_layer=False`).
        interpolates_like_timm: whether transformers resizes the positions at other sizes as timm does.
    """

    family: str
    model_class: type[PreTrainedModel]
    config_kwargs: Mapping[str, Any]
    links: tuple[Link, ...]
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    interpolates_like_timm: bool = False

    def build(self, *, device: str | torch.device | None = None) -> PreTrainedModel:
        """Return a new model of this plan's class and config on `device`, its weights not initialized
        (`no_init_weights`: the conversion overwrites every one of them; initializing ViT-g takes 40 s on a CPU)."""
        config_class: type[PretrainedConfig] = self.model_class.config_class
        with torch.device(device or "cpu"), no_init_weights():
            return self.model_class(config_class(**self.config_kwargs), **self.init_kwargs)


def timm_keys(link: Link) -> list[str]:
    """Return the timm state-dict keys `link` reads or writes."""
    return [part.key if isinstance(part, Rows) else part for part in link.timm if not isinstance(part, Fill)]


def split_tensor(
    tensor: torch.Tensor, shapes: Sequence[torch.Size | tuple[int, ...]], dim: int
) -> tuple[torch.Tensor, ...]:
    """Return `tensor` reshaped to the concatenation along `dim` of tensors of `shapes`, and cut into them: the other
    side of a link, from its concatenation (views, no copy)."""
    total = list(shapes[0])
    total[dim] = sum(int(shape[dim]) for shape in shapes)
    return tensor.reshape(total).split([int(shape[dim]) for shape in shapes], dim=dim)


def linear_links(hf: Sequence[str], timm_name: str, linear: nn.Linear, hf_has_bias: bool) -> list[Link]:
    """Return the links of the timm Linear `timm_name`, whose output rows are the transformers Linears `hf` stacked
    in order (query, key, value; gate, value). A missing timm bias is a zero fill where transformers has one."""
    links = [Link(tuple(f"{name}.weight" for name in hf), (f"{timm_name}.weight",))]
    if linear.bias is not None:
        links.append(Link(tuple(f"{name}.bias" for name in hf), (f"{timm_name}.bias",)))
    elif hf_has_bias:
        links.append(Link(tuple(f"{name}.bias" for name in hf), (Fill((linear.out_features,)),)))
    return links


def norm_links(hf: str, timm_name: str) -> list[Link]:
    """Return the links of a LayerNorm (weight and bias)."""
    return [Link((f"{hf}.weight",), (f"{timm_name}.weight",)), Link((f"{hf}.bias",), (f"{timm_name}.bias",))]


def layer_scale_link(hf: str, timm_name: str | None, hidden_size: int) -> Link:
    """Return the link of a layer scale: the timm `gamma` (`timm_name`), or ones where timm has none."""
    return Link((hf,), (timm_name if timm_name is not None else Fill((hidden_size,), 1.0),))


def position_link(hf: str, num_hf_prefix: int, num_timm_prefix: int, hidden_size: int) -> Link:
    """Return the link of the position table: timm's `pos_embed` [1, prefix + N, D], with zeros in front where timm
    keeps no position for the class (and distillation) token (`no_embed_class`) and transformers has one."""
    if num_timm_prefix == num_hf_prefix:
        return Link((hf,), ("pos_embed",), timm_dim=1)
    return Link((hf,), (Fill((1, num_hf_prefix, hidden_size)), "pos_embed"), timm_dim=1)


def refusal(model: nn.Module, what: str, why: str) -> ValueError:
    """Build the error for a timm option the conversion does not reproduce."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return ValueError(f"Cannot convert the timm model {name} to transformers: {what}. {why}")


def unsupported_architecture(model: nn.Module) -> ValueError:
    """Build the error for a model of no supported family, listing the supported ones."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or "?"
    families = "; ".join(f"{family} -> {target}" for family, target in TIMM_TO_TRANSFORMERS.items())
    return ValueError(
        f"{type(model).__name__} ({name}) has no transformers equivalent that sinder-peft converts to. The supported "
        f"timm families are: {families}."
    )


@dataclass(frozen=True)
class PatchEmbedding:
    """The patch embedding's geometry: square patches of `patch_size` over a square `image_size` image."""

    patch_size: int
    image_size: int
    num_channels: int
    has_bias: bool


def read_patch_embed(model: nn.Module, timm: types.ModuleType) -> PatchEmbedding:
    """Return the geometry of `model.patch_embed`, refusing what transformers' convolution does not compute."""
    embed = model.patch_embed
    if type(embed) is not timm.layers.PatchEmbed or not isinstance(embed.proj, nn.Conv2d):
        raise refusal(
            model, f"its patch embedding is a {type(embed).__name__}", "Only timm's PatchEmbed is supported."
        )
    proj = embed.proj
    kernel, stride = tuple(proj.kernel_size), tuple(proj.stride)
    if kernel[0] != kernel[1] or kernel != stride or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1):
        raise refusal(
            model, f"patch kernel {kernel} with stride {stride}", "transformers needs square, disjoint patches."
        )
    if not isinstance(embed.norm, nn.Identity):
        raise refusal(model, "its patch embedding has a norm (embed_norm_layer)", "transformers' has none.")
    if getattr(embed, "dynamic_img_pad", False):
        raise refusal(model, "dynamic_img_pad=True", "transformers does not pad images to a multiple of the patch.")
    image_size = tuple(embed.img_size) if embed.img_size is not None else None
    if image_size is None or image_size[0] != image_size[1]:
        raise refusal(model, f"image size {image_size}", "transformers' position tables are square grids.")
    return PatchEmbedding(int(kernel[0]), int(image_size[0]), int(proj.in_channels), proj.bias is not None)


def read_layer_norm_eps(model: nn.Module, norms: Mapping[str, nn.Module], hidden_size: int) -> float:
    """Return the one epsilon of the LayerNorms `norms` (name -> module), refusing any other norm."""
    epsilons = set()
    for name, norm in norms.items():
        if (
            not isinstance(norm, nn.LayerNorm)
            or not norm.elementwise_affine
            or norm.bias is None
            or tuple(norm.normalized_shape) != (hidden_size,)
        ):
            raise refusal(model, f"{name} is {norm}", "Only LayerNorms with weight and bias are supported.")
        epsilons.add(float(norm.eps))
    if len(epsilons) != 1:
        raise refusal(model, f"its LayerNorms use several epsilons {sorted(epsilons)}", "transformers has one.")
    return epsilons.pop()


def activation_name(model: nn.Module, module: nn.Module) -> str:
    """Return transformers' name (ACT2FN) of the activation module `module`."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_pytorch_tanh"
    if type(module).__name__ in ACTIVATIONS and type(module).__module__.startswith(("timm.", "torch.")):
        return ACTIVATIONS[type(module).__name__]
    raise refusal(model, f"its MLP activation is {module}", f"Supported: nn.GELU, {', '.join(ACTIVATIONS)}.")


@dataclass(frozen=True)
class MlpFacts:
    """One block MLP: plain (`fc1`, activation, `fc2`) or gated (SwiGLU: `act(gate) * value`, then `fc2`).

    Attributes:
        gated: whether it is a SwiGLU.
        width: the hidden width (of each branch for a SwiGLU).
        activation: transformers' name of the activation (of the gate for a SwiGLU).
        packed_gate_first: for timm's packed `GluMlp`, whether `fc1`'s first half is the gate; None otherwise.
    """

    gated: bool
    width: int
    activation: str
    packed_gate_first: bool | None


def read_mlp(model: nn.Module, mlp: nn.Module, timm: types.ModuleType) -> MlpFacts:
    """Return what the block MLP `mlp` computes, refusing MLPs transformers does not have."""
    layers = timm.layers
    if not isinstance(getattr(mlp, "norm", None), nn.Identity):
        raise refusal(model, "its MLP has a norm (scale_mlp_norm / scale_mlp)", "transformers' MLPs have none.")
    if type(mlp) is layers.Mlp and isinstance(mlp.fc1, nn.Linear):
        return MlpFacts(False, mlp.fc1.out_features, activation_name(model, mlp.act), None)
    if type(mlp) is layers.GluMlp and isinstance(mlp.fc1, nn.Linear) and mlp.chunk_dim == -1:
        return MlpFacts(True, mlp.fc1.out_features // 2, activation_name(model, mlp.act), not mlp.gate_last)
    if type(mlp) is layers.SwiGLU:
        return MlpFacts(True, mlp.fc1_g.out_features, activation_name(model, mlp.act), None)
    raise refusal(model, f"its MLP is a {type(mlp).__name__}", "Supported: Mlp, GluMlp (SwiGLUPacked), SwiGLU.")


def padded_links(
    hf: str, weight: str | Rows, bias: str | Rows | None, shape: tuple[int, int], padding: int, hf_has_bias: bool
) -> list[Link]:
    """Return the links of the transformers Linear `hf` whose output rows are the timm rows `weight` (`bias`) of
    `shape` followed by `padding` rows of zeros: a unit with zero input weights and bias outputs act(0) = 0 through
    every supported activation (and 0 * anything in a SwiGLU), so the wider model computes the same."""
    rows, columns = shape
    zeros = Fill((padding, columns), tolerance=PADDING_TOLERANCE)
    links = [Link((f"{hf}.weight",), (weight, zeros))]
    if bias is not None:
        links.append(Link((f"{hf}.bias",), (bias, Fill((padding,), tolerance=PADDING_TOLERANCE))))
    elif hf_has_bias:
        links.append(Link((f"{hf}.bias",), (Fill((rows + padding,)),)))
    return links


def mlp_links(
    prefix: str,
    hf_prefix: str,
    mlp: nn.Module,
    info: MlpFacts,
    names: Mapping[str, str],
    bias: bool,
    padding: int = 0,
) -> list[Link]:
    """Return the links of the block MLP `mlp` (timm names under `prefix`, transformers ones under `hf_prefix`).

    With `padding`, the transformers MLP has that many more hidden units than timm's (transformers' DINOv2 builds
    its width from an integer `mlp_ratio`): they get zero input weights and biases and zero output weights, so they
    add exactly nothing, and writing back checks that they still hold (nearly) zero."""
    if padding:
        return _padded_mlp_links(prefix, hf_prefix, mlp, info, names, bias, padding)
    if not info.gated:
        return [
            *linear_links([f"{hf_prefix}.{names['fc1']}"], f"{prefix}.fc1", mlp.fc1, bias),
            *linear_links([f"{hf_prefix}.{names['fc2']}"], f"{prefix}.fc2", mlp.fc2, bias),
        ]
    gate, value, down = (f"{hf_prefix}.{names[key]}" for key in ("gate", "up", "down"))
    if info.packed_gate_first is None:
        links = [
            *linear_links([gate], f"{prefix}.fc1_g", mlp.fc1_g, bias),
            *linear_links([value], f"{prefix}.fc1_x", mlp.fc1_x, bias),
        ]
    else:
        order = [gate, value] if info.packed_gate_first else [value, gate]
        links = linear_links(order, f"{prefix}.fc1", mlp.fc1, bias)
    return [*links, *linear_links([down], f"{prefix}.fc2", mlp.fc2, bias)]


def _padded_mlp_links(
    prefix: str, hf_prefix: str, mlp: nn.Module, info: MlpFacts, names: Mapping[str, str], bias: bool, padding: int
) -> list[Link]:
    """Return `mlp_links` for a transformers MLP `padding` units wider than timm's."""
    width, down = info.width, mlp.fc2
    inputs: list[tuple[str, str | Rows, str | Rows | None, int]] = []
    if not info.gated:
        fc1 = mlp.fc1
        timm_bias = f"{prefix}.fc1.bias" if fc1.bias is not None else None
        inputs.append((names["fc1"], f"{prefix}.fc1.weight", timm_bias, fc1.in_features))
    elif info.packed_gate_first is None:
        for key, timm_name in (("gate", "fc1_g"), ("up", "fc1_x")):
            linear = getattr(mlp, timm_name)
            timm_bias = f"{prefix}.{timm_name}.bias" if linear.bias is not None else None
            inputs.append((names[key], f"{prefix}.{timm_name}.weight", timm_bias, linear.in_features))
    else:
        fc1 = mlp.fc1
        starts = {"gate": 0, "up": width} if info.packed_gate_first else {"gate": width, "up": 0}
        for key, start in starts.items():
            timm_bias = Rows(f"{prefix}.fc1.bias", start, width) if fc1.bias is not None else None
            inputs.append((names[key], Rows(f"{prefix}.fc1.weight", start, width), timm_bias, fc1.in_features))
    links: list[Link] = []
    for hf_name, weight, timm_bias, columns in inputs:
        links += padded_links(f"{hf_prefix}.{hf_name}", weight, timm_bias, (width, columns), padding, bias)
    output_name = names["fc2"] if not info.gated else names["down"]
    zeros = Fill((down.out_features, padding), tolerance=PADDING_TOLERANCE)
    links.append(Link((f"{hf_prefix}.{output_name}.weight",), (f"{prefix}.fc2.weight", zeros), timm_dim=1))
    return [*links, *linear_links([f"{hf_prefix}.{output_name}"], f"{prefix}.fc2", down, bias)[1:]]


@dataclass(frozen=True)
class VitFacts:
    """What a timm `VisionTransformer` computes, read from its modules (the options every family shares checked)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    embedding: PatchEmbedding
    layer_norm_eps: float
    mlp: MlpFacts
    qkv_bias: bool
    layer_scale: bool
    pre_norm: bool
    class_token: bool
    num_register_tokens: int
    distilled: bool
    no_embed_class: bool
    dynamic_img_size: bool


def read_vision_transformer(model: nn.Module, timm: types.ModuleType) -> VitFacts:
    """Return the facts of a timm `VisionTransformer` (or `VisionTransformerDistilled`), refusing the options that
    no transformers ViT reproduces (see the module docstring)."""
    block_class = timm.models.vision_transformer.Block
    embedding = read_patch_embed(model, timm)
    hidden_size = int(model.embed_dim)
    if model.pos_embed is None:
        raise refusal(model, "it has no position embedding (pos_embed='none')", "transformers' ViTs always add one.")
    blocks = list(model.blocks)
    if not blocks:
        raise refusal(model, "it has no blocks", "Nothing to convert.")
    norms: dict[str, nn.Module] = {"norm": model.norm}
    if isinstance(model.norm, nn.Identity):
        reason = (
            "fc_norm (global_pool='avg' without fc_norm=False)"
            if not isinstance(model.fc_norm, nn.Identity)
            else "final_norm=False"
        )
        raise refusal(model, f"forward_features ends without a norm ({reason})", "transformers' ViTs end with one.")
    if not isinstance(model.norm_pre, nn.Identity):
        norms["norm_pre"] = model.norm_pre
    mlps, num_heads = [], set()
    for index, block in enumerate(blocks):
        if type(block) is not block_class:
            raise refusal(model, f"its blocks are {type(block).__name__}", "Only timm's pre-norm Block is supported.")
        attn = block.attn
        if type(attn) is not timm.layers.Attention:
            raise refusal(model, f"its attention is {type(attn).__name__}", "Only timm's Attention is supported.")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise refusal(model, "qk_norm=True", "transformers' ViTs do not normalize queries and keys.")
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise refusal(model, "scale_attn_norm or gated attention", "transformers' ViTs have neither.")
        if attn.head_dim * attn.num_heads != hidden_size or attn.proj.out_features != hidden_size:
            raise refusal(model, f"attention width {attn.head_dim} x {attn.num_heads}", "It must be the hidden size.")
        for scale in (block.ls1, block.ls2):
            if not isinstance(scale, nn.Identity | timm.layers.LayerScale):
                raise refusal(model, f"its layer scale is a {type(scale).__name__}", "Only LayerScale is supported.")
        norms[f"blocks.{index}.norm1"], norms[f"blocks.{index}.norm2"] = block.norm1, block.norm2
        num_heads.add(attn.num_heads)
        mlps.append(read_mlp(model, block.mlp, timm))
    if len(num_heads) != 1 or len(set(mlps)) != 1:
        raise refusal(model, "its blocks differ in heads or MLP", "transformers' blocks are all alike.")
    qkv_biases = {block.attn.qkv.bias is not None for block in blocks}
    if len(qkv_biases) != 1:
        raise refusal(model, "some blocks have a qkv bias and others not", "transformers' blocks are all alike.")
    return VitFacts(
        hidden_size=hidden_size,
        num_layers=len(blocks),
        num_heads=num_heads.pop(),
        embedding=embedding,
        layer_norm_eps=read_layer_norm_eps(model, norms, hidden_size),
        mlp=mlps[0],
        qkv_bias=qkv_biases.pop(),
        layer_scale=any(
            isinstance(scale, timm.layers.LayerScale) for block in blocks for scale in (block.ls1, block.ls2)
        ),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        class_token=model.cls_token is not None,
        num_register_tokens=int(model.num_reg_tokens),
        distilled=getattr(model, "dist_token", None) is not None,
        no_embed_class=bool(model.no_embed_class),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
    )


VIT_NAMES = {
    "layers": "layers",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attention": "attention",
    "output": "attention.o_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
CLIP_NAMES = {
    "layers": "encoder.layers",
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attention": "self_attn",
    "output": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def vit_block_links(
    model: nn.Module, facts: VitFacts, names: Mapping[str, str], qkv_bias: bool, mlp_padding: int = 0
) -> list[Link]:
    """Return the links of every block of a timm `VisionTransformer` under transformers' `names`. transformers'
    output projection and MLP always have biases, its query/key/value projections when `qkv_bias` (zeros where timm
    has none); the layer scales are linked only for families that have them (`layer_scale1` in `names`); the
    transformers MLP is `mlp_padding` zero units wider than timm's (`mlp_links`)."""
    links: list[Link] = []
    for index, block in enumerate(model.blocks):
        prefix, hf = f"blocks.{index}", f"{names['layers']}.{index}"
        attention = f"{hf}.{names['attention']}"
        links += norm_links(f"{hf}.{names['norm1']}", f"{prefix}.norm1")
        links += linear_links([f"{attention}.{p}_proj" for p in "qkv"], f"{prefix}.attn.qkv", block.attn.qkv, qkv_bias)
        links += linear_links([f"{hf}.{names['output']}"], f"{prefix}.attn.proj", block.attn.proj, True)
        links += norm_links(f"{hf}.{names['norm2']}", f"{prefix}.norm2")
        links += mlp_links(f"{prefix}.mlp", hf, block.mlp, facts.mlp, names, True, mlp_padding)
        if "layer_scale1" in names:
            for scale, key in ((block.ls1, "1"), (block.ls2, "2")):
                timm_name = f"{prefix}.ls{key}.gamma" if not isinstance(scale, nn.Identity) else None
                links.append(layer_scale_link(f"{hf}.{names['layer_scale' + key]}", timm_name, facts.hidden_size))
    return links


def common_config(facts: VitFacts) -> dict[str, Any]:
    """Return the config arguments every transformers ViT family takes alike."""
    return {
        "hidden_size": facts.hidden_size,
        "num_hidden_layers": facts.num_layers,
        "num_attention_heads": facts.num_heads,
        "hidden_act": facts.mlp.activation,
        "layer_norm_eps": facts.layer_norm_eps,
        "image_size": facts.embedding.image_size,
        "patch_size": facts.embedding.patch_size,
        "num_channels": facts.embedding.num_channels,
    }


def require_plain(model: nn.Module, facts: VitFacts, family: str, pre_norm: bool = False) -> None:
    """Refuse, for a family without them, layer scale, register tokens, a SwiGLU MLP and (unless `pre_norm`)
    norm_pre."""
    for present, what in (
        (facts.layer_scale, "layer scale (init_values)"),
        (facts.num_register_tokens > 0, "register tokens"),
        (facts.mlp.gated, "a SwiGLU MLP"),
        (facts.pre_norm and not pre_norm, "norm_pre (pre_norm=True)"),
    ):
        if present:
            raise refusal(model, f"it is a {family} ViT with {what}", f"transformers' {family} model has none.")


def dinov2_mlp_ratio(model: nn.Module, facts: VitFacts) -> tuple[int, int]:
    """Return the smallest integer `mlp_ratio` for which transformers' DINOv2 MLP is at least as wide as the timm one,
    and by how many units it is wider (the zero padding of `mlp_links`; 0 for timm's own DINOv2 models, which
    transformers builds exactly). Virchow's ViT-H (hidden 1280, `mlp_ratio=5.3375`: a SwiGLU 3416 wide) needs 4
    units of padding: transformers builds 3420 from `mlp_ratio=4`."""
    hidden, width = facts.hidden_size, facts.mlp.width
    for ratio in range(1, MAX_MLP_RATIO + 1):
        built = int(hidden * ratio)
        if facts.mlp.gated:
            built = (int(built * 2 / 3) + 7) // 8 * 8
        if built >= width:
            return ratio, built - width
    raise refusal(
        model,
        f"its {'SwiGLU' if facts.mlp.gated else 'GELU'} MLP is {width} wide at hidden size {hidden}",
        f"transformers' DINOv2 builds its MLP from an integer mlp_ratio up to {MAX_MLP_RATIO} here, none that wide.",
    )


def embedding_bias_links(facts: VitFacts, hf: str) -> list[Link]:
    """Return the link of the patch embedding's bias: timm's, or zeros (timm builds none with norm_pre)."""
    if facts.embedding.has_bias:
        return [Link((hf,), ("patch_embed.proj.bias",))]
    return [Link((hf,), (Fill((facts.hidden_size,)),))]
