"""The conversion plan of each supported timm family (`conversion_plan`): DINOv2 (registers, SwiGLU, layer scale),
ViT and DeiT, CLIP, SigLIP (with its attention-pool head) and DINOv3 (timm's `Eva` with RoPE), built from the
pieces of `links`.
"""

from __future__ import annotations

import logging
import types

from torch import nn
from transformers import (
    CLIPVisionModel,
    DeiTModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    SiglipVisionModel,
    ViTModel,
)

from .links import (
    CLIP_NAMES,
    VIT_NAMES,
    Fill,
    Link,
    Plan,
    VitFacts,
    activation_name,
    common_config,
    dinov2_mlp_ratio,
    embedding_bias_links,
    layer_scale_link,
    linear_links,
    mlp_links,
    norm_links,
    position_link,
    read_layer_norm_eps,
    read_mlp,
    read_patch_embed,
    read_vision_transformer,
    refusal,
    require_plain,
    unsupported_architecture,
    vit_block_links,
)

logger = logging.getLogger(__name__)

_DINOV2_NAMES = {
    "layers": "encoder.layer",
    "norm1": "norm1",
    "norm2": "norm2",
    "attention": "attention",
    "output": "attention.o_proj",
    "layer_scale1": "layer_scale1.lambda1",
    "layer_scale2": "layer_scale2.lambda1",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_DINOV3_NAMES = {**_DINOV2_NAMES, "layers": "model.layer", "fc1": "mlp.up_proj", "fc2": "mlp.down_proj"}


def _plan_dinov2(model: nn.Module, facts: VitFacts) -> Plan:
    """DINOv2 (with or without registers): layer scale, GELU or SwiGLU MLP, [CLS, registers..., patches]."""
    if facts.pre_norm:
        raise refusal(model, "it is a DINOv2-like ViT with norm_pre", "transformers' DINOv2 has no pre-norm.")
    if facts.mlp.gated and facts.mlp.activation != "silu":
        raise refusal(model, f"its SwiGLU gate is {facts.mlp.activation}", "transformers' DINOv2 SwiGLU uses silu.")
    registers = facts.num_register_tokens
    if registers and not facts.no_embed_class:
        raise refusal(model, "its register tokens have positions (no_embed_class=False)", "transformers' have none.")
    hidden = facts.hidden_size
    mlp_ratio, mlp_padding = dinov2_mlp_ratio(model, facts)
    config = {
        **common_config(facts),
        # the SwiGLU's gate is always silu in transformers; hidden_act then keeps its default
        "hidden_act": "gelu" if facts.mlp.gated else facts.mlp.activation,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": facts.qkv_bias,
        "use_swiglu_ffn": facts.mlp.gated,
    }
    links = [
        Link(("embeddings.cls_token",), ("cls_token",)),
        Link(("embeddings.mask_token",), (Fill((1, hidden), checked=False),)),
        position_link("embeddings.position_embeddings", 1, 0 if facts.no_embed_class else 1, hidden),
        Link(("embeddings.patch_embeddings.projection.weight",), ("patch_embed.proj.weight",)),
        *embedding_bias_links(facts, "embeddings.patch_embeddings.projection.bias"),
        *vit_block_links(model, facts, _DINOV2_NAMES, facts.qkv_bias, mlp_padding),
        *norm_links("layernorm", "norm"),
    ]
    if registers or facts.dynamic_img_size:
        # Dinov2WithRegistersModel resizes its position table as timm does (bicubic with antialiasing), also
        # without registers: a model used at other sizes (dynamic_img_size) stays exact there
        tokens = ("reg_token",) if registers else (Fill((1, 0, hidden)),)
        links.append(Link(("embeddings.register_tokens",), tokens))
        config["num_register_tokens"] = registers
        family = "DINOv2 with registers" if registers else "DINOv2 (dynamic image size)"
        return Plan(family, Dinov2WithRegistersModel, config, tuple(links), interpolates_like_timm=True)
    return Plan("DINOv2", Dinov2Model, config, tuple(links))


def _plan_vit(model: nn.Module, facts: VitFacts) -> Plan:
    """ViT and DeiT: [CLS, patches], DeiT distilled [CLS, distillation, patches]; no pooler."""
    family = "DeiT" if facts.distilled else "ViT"
    require_plain(model, facts, family)
    num_prefix = 2 if facts.distilled else 1
    config = {**common_config(facts), "intermediate_size": facts.mlp.width, "qkv_bias": facts.qkv_bias}
    links = [
        Link(("embeddings.cls_token",), ("cls_token",)),
        position_link(
            "embeddings.position_embeddings", num_prefix, 0 if facts.no_embed_class else num_prefix, facts.hidden_size
        ),
        Link(("embeddings.patch_embeddings.projection.weight",), ("patch_embed.proj.weight",)),
        *embedding_bias_links(facts, "embeddings.patch_embeddings.projection.bias"),
        *vit_block_links(model, facts, VIT_NAMES, facts.qkv_bias),
        *norm_links("layernorm", "norm"),
    ]
    if facts.distilled:
        links.append(Link(("embeddings.distillation_token",), ("dist_token",)))
    model_class = DeiTModel if facts.distilled else ViTModel
    return Plan(family, model_class, config, tuple(links), init_kwargs={"add_pooling_layer": False})


def _plan_clip(model: nn.Module, facts: VitFacts) -> Plan:
    """CLIP's image tower: norm_pre (`pre_layrnorm`), no patch bias, [CLS, patches], `post_layernorm`."""
    require_plain(model, facts, "CLIP", pre_norm=True)
    if facts.embedding.has_bias:
        raise refusal(model, "its patch embedding has a bias", "transformers' CLIP patch embedding has none.")
    tag = str(getattr(model, "pretrained_cfg", {}).get("tag") or "")
    if "openai" in tag and facts.mlp.activation == "gelu":
        logger.warning(
            "timm runs OpenAI's CLIP weights (%s) with GELU in this model; the conversion reproduces timm's model "
            "(hidden_act='gelu'). OpenAI's own model uses QuickGELU: timm's vit_*_clip_quickgelu_* models.",
            tag,
        )
    hidden = facts.hidden_size
    config = {**common_config(facts), "intermediate_size": facts.mlp.width}
    links = [
        Link(("embeddings.class_embedding",), ("cls_token",)),
        position_link("embeddings.position_embedding.weight", 1, 0 if facts.no_embed_class else 1, hidden),
        Link(("embeddings.patch_embedding.weight",), ("patch_embed.proj.weight",)),
        *norm_links("pre_layrnorm", "norm_pre"),
        *vit_block_links(model, facts, CLIP_NAMES, True),
        *norm_links("post_layernorm", "norm"),
    ]
    return Plan("CLIP", CLIPVisionModel, config, tuple(links))


def _siglip_head_links(model: nn.Module, facts: VitFacts, timm: types.ModuleType) -> list[Link] | None:
    """Return the links of SigLIP's attention-pool head, or None when timm's head computes something else than
    transformers' `SiglipMultiheadAttentionPoolingHead` (which is then not built)."""
    pool = getattr(model, "attn_pool", None)
    if type(pool) is not timm.layers.AttentionPoolLatent:
        return None
    mlp = pool.mlp
    compatible = (
        pool.latent_len == 1
        and pool.latent_dim == facts.hidden_size
        and pool.num_heads == facts.num_heads
        and pool.pos_embed is None
        and pool.pool == "token"
        and isinstance(pool.q, nn.Linear)
        and pool.q.bias is not None
        and pool.kv.bias is not None
        and isinstance(pool.q_norm, nn.Identity)
        and isinstance(pool.k_norm, nn.Identity)
        and type(mlp) is timm.layers.Mlp
        and isinstance(mlp.norm, nn.Identity)
        and mlp.fc1.out_features == facts.mlp.width
        and activation_name(model, mlp.act) == facts.mlp.activation
        and isinstance(pool.norm, nn.LayerNorm)
        and float(pool.norm.eps) == facts.layer_norm_eps
    )
    if not compatible:
        logger.warning(
            "The timm model's attention-pool head is not transformers' SigLIP head; the SiglipVisionModel is built "
            "without a head (vision_use_head=False) and the timm head stays in the timm model only."
        )
        return None
    return [
        Link(("head.probe",), ("attn_pool.latent",)),
        Link(("head.attention.in_proj_weight",), ("attn_pool.q.weight", "attn_pool.kv.weight")),
        Link(("head.attention.in_proj_bias",), ("attn_pool.q.bias", "attn_pool.kv.bias")),
        *linear_links(["head.attention.out_proj"], "attn_pool.proj", pool.proj, True),
        *norm_links("head.layernorm", "attn_pool.norm"),
        *linear_links(["head.mlp.fc1"], "attn_pool.mlp.fc1", mlp.fc1, True),
        *linear_links(["head.mlp.fc2"], "attn_pool.mlp.fc2", mlp.fc2, True),
    ]


def _plan_siglip(model: nn.Module, facts: VitFacts, timm: types.ModuleType) -> Plan:
    """SigLIP's image tower: patches only, `post_layernorm`, and the attention-pool head when timm's is the same."""
    require_plain(model, facts, "SigLIP")
    head = _siglip_head_links(model, facts, timm)
    config = {**common_config(facts), "intermediate_size": facts.mlp.width, "vision_use_head": head is not None}
    links = [
        position_link("embeddings.position_embedding.weight", 0, 0, facts.hidden_size),
        Link(("embeddings.patch_embedding.weight",), ("patch_embed.proj.weight",)),
        *embedding_bias_links(facts, "embeddings.patch_embedding.bias"),
        *vit_block_links(model, facts, CLIP_NAMES, True),
        *norm_links("post_layernorm", "norm"),
        *(head or []),
    ]
    return Plan("SigLIP", SiglipVisionModel, config, tuple(links))


def _plan_vision_transformer(model: nn.Module, timm: types.ModuleType) -> Plan:
    """Return the plan of a timm `VisionTransformer`: its family follows from its modules (module docstring)."""
    facts = read_vision_transformer(model, timm)
    if facts.distilled:
        return _plan_vit(model, facts)
    if not facts.class_token:
        return _plan_siglip(model, facts, timm)
    if facts.pre_norm:
        return _plan_clip(model, facts)
    if facts.layer_scale or facts.num_register_tokens or facts.mlp.gated:
        return _plan_dinov2(model, facts)
    return _plan_vit(model, facts)


def _plan_dinov3(model: nn.Module, timm: types.ModuleType) -> Plan:
    """DINOv3 (timm's `Eva` with DINOv3's RoPE): [CLS, registers..., patches], RoPE on the patches only, layer
    scale, plain or SwiGLU MLP, no absolute positions."""
    eva = timm.models.eva
    embedding = read_patch_embed(model, timm)
    hidden = int(model.embed_dim)
    rope = model.rope
    if model.pos_embed is not None or model.cls_token is None or not isinstance(model.norm_pre, nn.Identity):
        raise refusal(
            model, "absolute positions, no class token or a pre-norm", "transformers' DINOv3 has none of them."
        )
    if isinstance(model.norm, nn.Identity):
        raise refusal(
            model, "forward_features ends without a norm (use_fc_norm)", "transformers' DINOv3 ends with one."
        )
    blocks = list(model.blocks)
    first = blocks[0].attn
    if (
        rope.temperature is None
        or rope.min_period is not None
        or rope.max_period is not None
        or rope.normalize_coords != "separate"
        or rope.grid_offset != 0
        or rope.grid_indexing != "ij"
        or not rope.rotate_half
        or rope.dim != first.head_dim
    ):
        raise refusal(model, "its RoPE options differ from DINOv3's", "transformers computes DINOv3's RoPE only.")
    norms: dict[str, nn.Module] = {"norm": model.norm}
    mlps = []
    for index, block in enumerate(blocks):
        attn = block.attn
        if type(block) is not eva.EvaBlock or type(attn) is not eva.EvaAttention:
            raise refusal(model, f"its blocks are {type(block).__name__}", "Only pre-norm EvaBlocks are supported.")
        if not all(isinstance(module, nn.Identity) for module in (attn.q_norm, attn.k_norm, attn.norm)):
            raise refusal(model, "qk_norm or scale_attn_inner", "transformers' DINOv3 normalizes neither.")
        if attn.gate is not None or not attn.rotate_half or attn.num_prefix_tokens != model.num_prefix_tokens:
            raise refusal(model, "gated attention or another RoPE layout", "transformers' DINOv3 has neither.")
        if attn.head_dim * attn.num_heads != hidden:
            raise refusal(model, f"attention width {attn.head_dim} x {attn.num_heads}", "It must be the hidden size.")
        norms[f"blocks.{index}.norm1"], norms[f"blocks.{index}.norm2"] = block.norm1, block.norm2
        mlps.append(read_mlp(model, block.mlp, timm))
    attentions = {(block.attn.num_heads, block.attn.qkv is None, block.attn.q_bias is None) for block in blocks}
    if len(set(mlps)) != 1 or len(attentions) != 1:
        raise refusal(model, "its blocks differ in attention or MLP", "transformers' blocks are all alike.")
    mlp = mlps[0]
    registers = int(model.reg_token.shape[1]) if model.reg_token is not None else 0
    fused = first.qkv is not None
    query_bias = (first.q_bias if fused else first.q_proj.bias) is not None
    mlp_bias = any(linear.bias is not None for linear in blocks[0].mlp.modules() if isinstance(linear, nn.Linear))
    config = {
        "hidden_size": hidden,
        "intermediate_size": mlp.width,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.num_heads,
        "hidden_act": mlp.activation,
        "layer_norm_eps": read_layer_norm_eps(model, norms, hidden),
        "rope_theta": float(rope.temperature),
        "image_size": embedding.image_size,
        "patch_size": embedding.patch_size,
        "num_channels": embedding.num_channels,
        "query_bias": query_bias,
        "key_bias": False,
        "value_bias": query_bias,
        "proj_bias": True,
        "mlp_bias": mlp_bias,
        "use_gated_mlp": mlp.gated,
        "num_register_tokens": registers,
        "pos_embed_shift": rope.shift_coords,
        "pos_embed_jitter": rope.jitter_coords,
        "pos_embed_rescale": rope.rescale_coords,
    }
    links = [
        Link(("embeddings.cls_token",), ("cls_token",)),
        Link(("embeddings.mask_token",), (Fill((1, 1, hidden), checked=False),)),
        Link(("embeddings.register_tokens",), ("reg_token",) if registers else (Fill((1, 0, hidden)),)),
        Link(("embeddings.patch_embeddings.weight",), ("patch_embed.proj.weight",)),
        Link(
            ("embeddings.patch_embeddings.bias",),
            ("patch_embed.proj.bias",) if embedding.has_bias else (Fill((hidden,)),),
        ),
        *norm_links("norm", "norm"),
    ]
    for index, block in enumerate(blocks):
        prefix, hf = f"blocks.{index}", f"model.layer.{index}"
        attn = block.attn
        links += norm_links(f"{hf}.norm1", f"{prefix}.norm1")
        if fused:
            links.append(Link(tuple(f"{hf}.attention.{p}_proj.weight" for p in "qkv"), (f"{prefix}.attn.qkv.weight",)))
            if query_bias:
                links.append(Link((f"{hf}.attention.q_proj.bias",), (f"{prefix}.attn.q_bias",)))
                links.append(Link((f"{hf}.attention.v_proj.bias",), (f"{prefix}.attn.v_bias",)))
        else:
            for p in "qkv":
                projection = getattr(attn, f"{p}_proj")
                links += linear_links(
                    [f"{hf}.attention.{p}_proj"], f"{prefix}.attn.{p}_proj", projection, p != "k" and query_bias
                )
        links += linear_links([f"{hf}.attention.o_proj"], f"{prefix}.attn.proj", attn.proj, True)
        links += norm_links(f"{hf}.norm2", f"{prefix}.norm2")
        links += mlp_links(f"{prefix}.mlp", hf, block.mlp, mlp, _DINOV3_NAMES, mlp_bias)
        for key, gamma in (("1", block.gamma_1), ("2", block.gamma_2)):
            links.append(
                layer_scale_link(
                    f"{hf}.layer_scale{key}.lambda1", f"{prefix}.gamma_{key}" if gamma is not None else None, hidden
                )
            )
    return Plan("DINOv3", DINOv3ViTModel, config, tuple(links), interpolates_like_timm=True)


def conversion_plan(model: nn.Module, timm: types.ModuleType) -> Plan:
    """Return the conversion plan of the timm model `model`.

    Raises:
        ValueError: for a model of no supported family (naming the supported ones), or an option the conversion
            does not reproduce.
    """
    vision_transformers = (
        timm.models.vision_transformer.VisionTransformer,
        timm.models.deit.VisionTransformerDistilled,
    )
    if type(model) in vision_transformers:
        return _plan_vision_transformer(model, timm)
    if type(model) is timm.models.eva.Eva and type(getattr(model, "rope", None)) is timm.layers.RotaryEmbeddingDinoV3:
        return _plan_dinov3(model, timm)
    raise unsupported_architecture(model)
