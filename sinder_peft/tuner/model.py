"""The SINDER tuner: injects `sinder_peft.tuner.layer.Linear` into the targeted linear layers of a model."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import _get_submodules
from torch import nn

from .architectures import block_list_path, describe_model, find_backbone
from .config import SinderConfig
from .descriptions import MlpDescription
from .fused_layer import FusedGateLinear, FusedUpLinear, fused_gate_up_layers
from .layer import Linear, SinderLayer
from .registration import SINDER_PREFIX


class SinderModel(BaseTuner):
    """Creates a SINDER model from a pretrained ViT (Wang, Zhang & Salzmann, "SINDER: Repairing the Singular Defects
    of DINOv2", ECCV 2024): a model of any family of `sinder_peft.tuner.architectures`, or a larger model holding one
    (a task model, `CLIPModel`, `DepthAnythingForDepthEstimation`...), of which only the backbone's blocks are adapted.

    Every targeted linear layer keeps its singular vectors frozen and learns a shift of its singular values. Use it
    through PEFT after `import sinder_peft`:

    ```py
    >>> import sinder_peft
    >>> from peft import get_peft_model
    >>> from transformers import Dinov2Model

    >>> model = Dinov2Model.from_pretrained("facebook/dinov2-base")
    >>> peft_model = get_peft_model(model, sinder_peft.SinderConfig())
    >>> peft_model.print_trainable_parameters()
    ```

    Args:
        model (`torch.nn.Module`): The model to adapt.
        config ([`SinderConfig`]): The configuration of the adapter.
        adapter_name (`str`): The name of the adapter, `"default"` by default.
        low_cpu_mem_usage (`bool`): Not supported: SINDER needs the base weights to compute their SVD.
    """

    prefix: str = SINDER_PREFIX
    tuner_layer_cls = SinderLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: SinderConfig, model_config: dict) -> SinderConfig:
        """Fill in the architecture's defaults and check the requested targets against the model.

        Defaults, for a model with a backbone of a supported family:

        * `target_modules`: the leaf names of the family's value, output and MLP projections (never query or key);
        * `exclude_modules`: a regex matching every module outside the backbone's blocks (`<path to the block
          list>.<i>.…`), so that no head, neck, pooler or text tower is ever adapted, whatever its leaves are named
          (SigLIP's `head.mlp.fc1`, `CLIPModel.text_model.…`); pass `exclude_modules=[]` to target outside;
        * `layers_pattern`: the block list's own name (`layer`, `layers`) when `layers_to_transform` is set.

        Returns the same config object, as PEFT tuners do, with those fields set.

        Raises:
            ValueError: for a model of no supported family without explicit `target_modules`, for target names that
                match no module (naming the linear modules that exist), and for `layers_to_transform` out of range.
        """
        if peft_config.target_modules is None:
            peft_config.target_modules = set(describe_model(self.model).target_module_names)
        if self._has_backbone():
            if peft_config.exclude_modules is None:
                peft_config.exclude_modules = outside_blocks_pattern(block_list_path(self.model))
            if peft_config.layers_to_transform is not None and peft_config.layers_pattern is None:
                peft_config.layers_pattern = describe_model(self.model).block_list_name
        self._check_target_names_exist(peft_config)
        self._check_layers_to_transform(peft_config)
        return peft_config

    def _has_backbone(self) -> bool:
        """Whether the model holds a backbone of a supported family."""
        try:
            find_backbone(self.model)
        except ValueError:
            return False
        return True

    @staticmethod
    def _check_target_module_exists(peft_config: SinderConfig, key: str) -> bool | re.Match[str] | None:
        """PEFT's match of module `key` against the config, with the block index of `layers_to_transform` read here.

        PEFT 0.18 looks for the block index only after a dot before the `layers_pattern` name, which misses block
        lists at the model root (ViT, DeiT: `layers.0.…`, where no block would ever be adapted); here the index
        follows the name at the start of the key or after a dot (`block_index`), in every PEFT version. The
        restriction applies to full-path targets too (PEFT lets an exact path through whatever its block).

        Returns PEFT's result: truthy for a target, falsy otherwise (PEFT's excluded-module marker for excluded keys).
        """
        layers = peft_config.layers_to_transform
        if layers is None or not peft_config.layers_pattern:
            return check_target_module_exists(peft_config, key)
        unrestricted = copy.copy(peft_config)
        unrestricted.layers_to_transform = None
        result = check_target_module_exists(unrestricted, key)
        if not result:
            return result
        index = block_index(key, peft_config.layers_pattern)
        chosen = [layers] if isinstance(layers, int) else layers
        return result if index in chosen else False

    def _check_target_names_exist(self, peft_config: SinderConfig) -> None:
        """Raise if a target name (not a regex) matches no module of the model, naming the linear modules found."""
        if isinstance(peft_config.target_modules, str):
            if not any(re.fullmatch(peft_config.target_modules, name) for name, _ in self.model.named_modules()):
                raise ValueError(
                    f"The regex target_modules={peft_config.target_modules!r} matches no module of the model. "
                    f"Linear modules found: {self._linear_leaf_names()}."
                )
            return
        module_names = [name for name, _ in self.model.named_modules()]
        missing = sorted(
            target
            for target in peft_config.target_modules
            if not any(name == target or name.endswith(f".{target}") for name in module_names)
        )
        if missing:
            raise ValueError(
                f"Target modules {missing} were not found in the model. Linear modules found: "
                f"{self._linear_leaf_names()}."
            )

    def _check_layers_to_transform(self, peft_config: SinderConfig) -> None:
        """Raise if `layers_to_transform` names a block the model's backbone does not have."""
        if peft_config.layers_to_transform is None:
            return
        try:
            num_layers = describe_model(self.model).num_layers
        except ValueError:
            return
        out_of_range = [index for index in peft_config.layers_to_transform if not 0 <= index < num_layers]
        if out_of_range:
            raise ValueError(f"layers_to_transform {out_of_range} out of range: the model has {num_layers} layers.")

    def _linear_leaf_names(self) -> list[str]:
        """Sorted distinct last components of the names of the model's `nn.Linear` modules."""
        return sorted(
            {name.rsplit(".", 1)[-1] for name, module in self.model.named_modules() if isinstance(module, nn.Linear)}
        )

    def _create_and_replace(
        self,
        peft_config: SinderConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        """Wrap `target` in a SINDER layer, or add the adapter to it if it is one already.

        With `fuse_gated_mlp`, the gate or up projection of a block's gated MLP is wrapped together with its sibling
        (`_create_fused_pair`); the sibling's own turn then finds it wrapped.

        Raises:
            ValueError: for a target inside `torch.nn.MultiheadAttention`, and for an adapter whose `fuse_gated_mlp`
                differs from that of the adapters the layer already has.
            TypeError: for a target that is no `nn.Linear`.
        """
        fused_mlp = self._fused_mlp(peft_config, current_key, target_name)
        if isinstance(target, SinderLayer):
            fused_layer = isinstance(target, (FusedGateLinear, FusedUpLinear))
            if fused_layer != (fused_mlp is not None):
                raise ValueError(
                    f"Cannot add adapter '{adapter_name}' to '{current_key}': its fuse_gated_mlp="
                    f"{peft_config.fuse_gated_mlp} differs from that of the adapters already there. Adapters of one "
                    "model must all fuse gated MLPs or all split them."
                )
            if not (fused_layer and target.has_shift(adapter_name)):
                target.update_layer(adapter_name, peft_config)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"SINDER cannot adapt '{current_key}': `torch.nn.MultiheadAttention` reads its `out_proj` weight "
                "directly, so the adapted forward pass would ignore the shift while merging would apply it (e.g. the "
                "attention-pooling head of SigLIP). Leave it out of `target_modules`."
            )
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"SINDER adapts `torch.nn.Linear` layers only, but target '{current_key}' is a "
                f"{type(base_layer).__name__}. Linear modules found: {self._linear_leaf_names()}."
            )
        if fused_mlp is not None:
            self._create_fused_pair(peft_config, adapter_name, parent, current_key.rsplit(".", 1)[0], fused_mlp)
            return
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _fused_mlp(self, peft_config: SinderConfig, key: str, target_name: str) -> MlpDescription | None:
        """Return the description of the gated MLP whose gate or up projection module `key` is, when the config fuses
        gated MLPs (`fuse_gated_mlp`) and `key` lies in a block of the model's backbone; None otherwise."""
        if not peft_config.fuse_gated_mlp or not self._has_backbone():
            return None
        description = describe_model(self.model)
        mlp = description.block.mlp
        if mlp.kind != "gated" or target_name not in mlp.input_projections:
            return None
        mlp_path = rf"{re.escape(block_list_path(self.model))}\.\d+\.{re.escape(description.block.mlp_prefix)}"
        return mlp if re.fullmatch(rf"{mlp_path}\.{re.escape(target_name)}", key) else None

    def _create_fused_pair(
        self, peft_config: SinderConfig, adapter_name: str, mlp: nn.Module, mlp_key: str, description: MlpDescription
    ) -> None:
        """Wrap the gate and up projections of the gated MLP `mlp` (at path `mlp_key`) as one fused target
        (`fused_layer.fused_gate_up_layers`).

        Raises:
            ValueError: when only one of the two projections is a target of the config, or one is already adapted
                without fusion.
        """
        names = description.input_projections
        missing = [name for name in names if not self._check_target_module_exists(peft_config, f"{mlp_key}.{name}")]
        if missing:
            raise ValueError(
                f"fuse_gated_mlp adapts {names[0]} and {names[1]} of '{mlp_key}' as one target, but {missing} is not "
                "among the targets. Target both projections, or set fuse_gated_mlp=False."
            )
        modules = [getattr(mlp, name) for name in names]
        if any(isinstance(module, BaseTunerLayer) for module in modules):
            raise ValueError(
                f"Cannot fuse {names[0]} and {names[1]} of '{mlp_key}': one of them already carries an adapter of its "
                "own. Adapters of one model must all fuse gated MLPs or all split them."
            )
        gate, up = fused_gate_up_layers(*modules, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            gate.requires_grad_(False)
        for name, module, new_module in zip(names, modules, (gate, up), strict=True):
            self._replace_module(mlp, name, new_module, module)

    def add_layers(self, layers: Sequence[int], adapter_name: str = "default") -> list[int]:
        """Extend adapter `adapter_name` to more blocks, keeping the shifts it already has.

        The targeted linear layers of the blocks in `layers` that the adapter does not cover yet are wrapped with a
        zero shift (trainable when the adapter is active), and the config's `layers_to_transform` becomes the union,
        so that `save_pretrained` and a reload see every adapted block. With `fuse_gated_mlp` a gated MLP's gate and
        up projections are wrapped together, as one fused target. An adapter that covers every block
        (`layers_to_transform=None`) is left as it is.

        Returns the blocks newly adapted, sorted (empty when there was nothing to add).

        Raises:
            ValueError: for a block index the model does not have.
        """
        config: SinderConfig = self.peft_config[adapter_name]
        if config.layers_to_transform is None:
            return []
        current = config.layers_to_transform
        current = [current] if isinstance(current, int) else list(current)
        new_layers = sorted(set(layers) - set(current))
        if not new_layers:
            return []
        num_layers = describe_model(self.model).num_layers
        out_of_range = [index for index in new_layers if not 0 <= index < num_layers]
        if out_of_range:
            raise ValueError(f"Cannot adapt blocks {out_of_range}: the model has {num_layers} layers.")
        config.layers_to_transform = sorted({*current, *new_layers})
        keys = [name for name, module in self.model.named_modules() if not isinstance(module, SinderLayer)]
        for key in keys:
            if not self._check_target_module_exists(config, key):
                continue
            parent, target, target_name = _get_submodules(self.model, key)
            if isinstance(parent, SinderLayer):
                continue
            if not isinstance(target, SinderLayer):  # else: wrapped in this loop, with its fused sibling
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            self.targeted_module_names.append(key)
        return new_layers


def outside_blocks_pattern(block_list: str) -> str:
    """Return a regex that fullmatches every module path *outside* the blocks of the block list at path `block_list`.

    `block_list` is the dotted path of the `nn.ModuleList` of blocks from the adapted model's root (e.g.
    `vision_model.encoder.layers`). The regex matches every path that does not start with `<block_list>.<i>.`: the
    embeddings, the final norm, heads, necks, poolers, other towers, and the block list and blocks themselves (which
    are no linear layers). Used as PEFT's `exclude_modules`, which is checked before the targets.
    """
    return rf"(?!{re.escape(block_list)}\.\d+\.).*"


def block_index(key: str, layers_pattern: str | Sequence[str]) -> int | None:
    """Return the index of the block that module path `key` lies in, or None when it lies in no block.

    The index is the number after the first occurrence of a `layers_pattern` name (the block list's own name, e.g.
    `layer` or `layers`) at the start of `key` or after a dot, as in `encoder.layer.3.mlp.fc1` or `layers.3.mlp.fc1`.
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)\.", key)
        if match is not None:
            return int(match.group(1))
    return None
