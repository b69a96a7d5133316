"""One batch's SINDER loss: find each image's defective layer, then take the loss over its gradient window.

1. *Find the defective layer* of every image (`WindowLoss.find_defective_layers`): run the blocks in order, and at
   each layer apply the recipe's defect test (`analysis.detection.detect_layer_defects`, `DefectTest`: at least
   `skip_less_than` tokens whose |cos| with that layer's defect direction is an outlier and, with a `norm_gap`, one of
   them a high-norm defect token, born in a block); the first layer that passes is the image's defective layer. An
   image leaves the pass at its defective layer, and the pass stops as soon as every image has one (early exit: the
   rest of the network is never run). Images without a defective layer are skipped.
   When the caller has autograd on, this pass records it: only the adapter's shifts require a gradient, so the graph
   starts at the first adapted block.
2. *Take the loss with a gradient window* (`WindowLoss.window_loss`): each image gives the loss at its defective layer,
   and its gradient reaches only the `limit_layers` blocks ending there. The loss is taken on the tokens the search
   computed, so no block runs twice; a hook on the image's input to its window's first block zeroes the image's
   gradient there, so blocks before its window get none from it. When blocks were adapted between the two steps
   (`SinderTrainer.adapt_window_blocks`), the search's graph lacks their new shifts; the windows are then run again
   with autograd, each image entering at its own window start from its block input cached in step 1 and leaving at
   its defective layer. At its defective layer each image gives the smooth neighbourhood loss (`loss.py`), plus,
   optionally, a term that keeps its clean tokens where the frozen base model puts them (`preserve_weight`).

Blocks are run through the model's `ArchitectureDescription` (`embed`, `run_block`), so this works for every family
the registry knows, and under the caller's autocast context (bfloat16 mixed precision) when one is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ..analysis.detection import DefectTest, detect_layer_defects, patch_grid
from ..tuner.architectures import describe_model, get_blocks, unwrap_backbone
from .loss import feature_preservation_loss, smooth_neighbourhood_loss


def gradient_window(defective_layer: int, limit_layers: int) -> range:
    """Return the blocks that receive an image's gradient: the `limit_layers` blocks ending at its defective layer
    (fewer when the layer is shallower than that)."""
    return range(max(0, defective_layer - limit_layers + 1), defective_layer + 1)


def select_layers_to_transform(first_defective_layers: Sequence[int], num_layers: int, limit_layers: int) -> list[int]:
    """Return the blocks to adapt before training: those of the gradient windows of the defective layers found.

    A block outside every window receives no gradient, so it is left unadapted (no SVD, no memory, no time). When
    training meets a defective layer whose window reaches other blocks (an image unlike the sample, or a defect
    surfacing deeper once earlier ones are repaired), `SinderTrainer.adapt_window_blocks` adapts them then. With
    no defective layer found, every block is adapted.
    """
    found = [layer for layer in first_defective_layers if layer >= 0]
    if not found:
        return list(range(num_layers))
    blocks = {block for layer in found for block in gradient_window(layer, limit_layers)}
    return sorted(blocks)


@dataclass
class DefectSearch:
    """What the no-grad pass (step 1) found in one batch.

    Attributes:
        layers: each image's defective layer (−1 for none), in batch order.
        masks: per defective image, its defect-token mask [H, W] at that layer.
        cosines: per defective image, its |cos| map [H, W] at that layer.
        block_inputs: per block reached, its input where a gradient window may start (attached to the graph
            recorded so far, if any), else None. Its rows are the images of `block_rows` at that block.
        block_rows: per block reached, the images (batch indices) still searched there, in row order: an image
            leaves the search once its defective layer is found.
        block_kwargs: the extra arguments every block call of this batch takes (`EmbeddedTokens.block_kwargs`).
        grid: the patch grid (H, W).
        window_tokens: per defective image, its patch tokens [H, W, C] at its defective layer, attached to the
            autograd graph the search recorded (empty under `torch.no_grad` or before any adapted block).
        adapted_blocks: the adapter's `layers_to_transform` when the search ran (None: every block), to tell
            whether `window_tokens` still covers every trainable shift.
    """

    layers: list[int]
    masks: dict[int, torch.Tensor]
    cosines: dict[int, torch.Tensor]
    block_inputs: list[torch.Tensor | None]
    block_rows: list[list[int]]
    block_kwargs: dict[str, Any]
    grid: tuple[int, int]
    window_tokens: dict[int, torch.Tensor]
    adapted_blocks: tuple[int, ...] | None


@dataclass
class BatchLoss:
    """The loss of one batch on this process.

    Attributes:
        loss_sum: sum over the batch's defective images of their loss (a graph-connected tensor), or None.
        num_defective: images of the batch with a defective layer.
        defective_layers: the defective layer of each image (−1 for none), in batch order.
        window_parameters: the trainable shifts of the blocks of the batch's gradient windows, in model order.
    """

    loss_sum: torch.Tensor | None
    num_defective: int
    defective_layers: list[int]
    window_parameters: list[nn.Parameter] = field(default_factory=list)

    def backward(self) -> None:
        """Accumulate the gradient of `loss_sum` into the shifts of the gradient windows, and only those.

        The search's graph may reach adapted blocks before a window (it starts at the first adapted block); limiting
        the backward pass to `window_parameters` leaves their gradients untouched (None, so SGD's momentum does not
        move them either) and skips the backward pass through them.
        """
        if self.loss_sum is None:
            return
        torch.autograd.backward(self.loss_sum, inputs=self.window_parameters)


@dataclass(frozen=True)
class WindowSettings:
    """The settings of the defect test and of the loss (`TrainingArguments.window_settings`): the recipe's
    `DefectTest`, and the fields of `TrainingArguments` with the same names."""

    test: DefectTest
    kernel: int
    limit_layers: int
    temperature: float
    preserve_weight: float


class WindowLoss:
    """Computes SINDER's loss on a batch for a SINDER-adapted model (steps 1 and 2 of the module docstring).

    Args:
        model: the `PeftModel` being trained.
        directions: [L, C] one defect direction per layer, from the base weights, on the model's device.
        settings: the defect test's and the loss's settings.
        autocast: returns the context every embedding and block call runs in (the accelerator's autocast); None runs
            them as they are.
    """

    def __init__(
        self,
        model: PeftModel,
        directions: torch.Tensor,
        settings: WindowSettings,
        autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.model = model
        self.backbone = unwrap_backbone(model)
        self.description = describe_model(model)
        self.blocks = get_blocks(self.backbone)
        self.directions = directions
        self.settings = settings
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, pixel_values: torch.Tensor) -> BatchLoss:
        """Return the loss of a batch: `window_loss(pixel_values, find_defective_layers(pixel_values))`."""
        return self.window_loss(pixel_values, self.find_defective_layers(pixel_values))

    def _run_block(self, index: int, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
        """Return block `index`'s output for `hidden`, under the autocast context."""
        with self.autocast():
            return self.description.run_block(self.blocks[index], hidden, block_kwargs)

    def _embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return the input of the first block and the extra block arguments, under the autocast context."""
        with self.autocast():
            embedded = self.description.embed(self.backbone, pixel_values)
        return embedded.hidden, embedded.block_kwargs

    def find_defective_layers(self, pixel_values: torch.Tensor) -> DefectSearch:
        """Step 1 of the module docstring: the pass that finds each image's defective layer, stopping as soon as
        every image has one, recorded by autograd when it is on. It keeps the block inputs the gradient windows
        start from, and each defective image's tokens at its defective layer."""
        settings = self.settings
        batch = pixel_values.shape[0]
        patch = self.description.patch_size
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

        layers = [-1] * batch
        masks: dict[int, torch.Tensor] = {}
        cosines: dict[int, torch.Tensor] = {}
        window_tokens: dict[int, torch.Tensor] = {}
        block_inputs: list[torch.Tensor | None] = []
        block_rows: list[list[int]] = []
        searched = list(range(batch))  # the images of the rows of `hidden`
        with torch.no_grad():
            hidden, block_kwargs = self._embed(pixel_values)
            input_patches = patch_grid(hidden, self.description, height, width)
        for index in range(len(self.blocks)):
            block_inputs.append(hidden)
            block_rows.append(searched)
            # Keep only the inputs a gradient window can still start from: those of the windows of images
            # already assigned, and of windows ending at this layer or later.
            starts = [gradient_window(layer, settings.limit_layers).start for layer in layers if layer >= 0]
            needed_from = min([*starts, gradient_window(index, settings.limit_layers).start])
            for stale in range(needed_from):
                block_inputs[stale] = None
            hidden = self._run_block(index, hidden, block_kwargs)
            tokens = patch_grid(hidden, self.description, height, width)  # attached to the graph, if any
            found = detect_layer_defects(
                tokens.detach(), self.directions[index], input_patches[searched], settings.test
            )
            for row, image in enumerate(searched):
                if found.defective[row]:
                    layers[image], masks[image], cosines[image] = index, found.masks[row], found.cosines[row]
                    if tokens.requires_grad:
                        window_tokens[image] = tokens[row]
            remaining = [row for row, image in enumerate(searched) if layers[image] < 0]
            if not remaining:
                break
            if len(remaining) < len(searched):
                hidden, searched = hidden[remaining], [searched[row] for row in remaining]
        return DefectSearch(
            layers=layers,
            masks=masks,
            cosines=cosines,
            block_inputs=block_inputs,
            block_rows=block_rows,
            block_kwargs=block_kwargs,
            grid=(height, width),
            window_tokens=window_tokens,
            adapted_blocks=self._adapted_blocks(),
        )

    def _adapted_blocks(self) -> tuple[int, ...] | None:
        """Return the blocks the active adapter covers now (None: every block)."""
        layers = self.model.peft_config[self.model.active_adapter].layers_to_transform
        if layers is None:
            return None
        return (layers,) if isinstance(layers, int) else tuple(layers)

    def window_loss(self, pixel_values: torch.Tensor, search: DefectSearch) -> BatchLoss:
        """Step 2 of the module docstring: the loss of every defective image over its gradient window, summed (None
        when the batch has none). Images take their loss on the search's tokens, with their gradient stopped at
        their window's start, unless blocks were adapted since the search; the others run their window again."""
        layers = search.layers
        defective = [image for image in range(len(layers)) if layers[image] >= 0]
        if not defective:
            return BatchLoss(loss_sum=None, num_defective=0, defective_layers=layers)

        height, width = search.grid
        references = self._reference_tokens(pixel_values, defective, layers, height, width)
        reused = search.window_tokens if search.adapted_blocks == self._adapted_blocks() else {}
        losses: list[torch.Tensor] = []
        if reused:
            images = sorted(reused)
            self._stop_gradients_at_window_starts(search, images)
            tokens = torch.stack([reused[image] for image in images])
            losses.append(self._image_losses(tokens, images, search.masks, search.cosines, references).sum())
        rerun = [image for image in defective if image not in reused]
        if rerun:
            losses.append(self._rerun_windows(rerun, search, references))
        blocks = sorted(
            {block for image in defective for block in gradient_window(layers[image], self.settings.limit_layers)}
        )
        return BatchLoss(
            loss_sum=torch.stack(losses).sum(),
            num_defective=len(defective),
            defective_layers=layers,
            window_parameters=[
                parameter
                for block in blocks
                for parameter in self.blocks[block].parameters()
                if parameter.requires_grad
            ],
        )

    def _stop_gradients_at_window_starts(self, search: DefectSearch, images: list[int]) -> None:
        """Hook the block inputs of the search's graph so that each of `images` gets no gradient before its window:
        its rows of the gradient at its window's first block input are zeroed. An input without a graph (before the
        first adapted block) needs no hook."""
        starts: dict[int, list[int]] = {}
        for image in images:
            start = gradient_window(search.layers[image], self.settings.limit_layers).start
            starts.setdefault(start, []).append(image)
        for start, starting in starts.items():
            block_input = search.block_inputs[start]
            if block_input is None or not block_input.requires_grad:
                continue
            rows = search.block_rows[start]
            keep = torch.ones(block_input.shape[0], device=block_input.device, dtype=block_input.dtype)
            keep[[rows.index(image) for image in starting]] = 0
            keep = keep.view(-1, *([1] * (block_input.ndim - 1)))
            block_input.register_hook(lambda gradient, keep=keep: gradient * keep)

    def _rerun_windows(
        self, images: list[int], search: DefectSearch, references: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """Return the summed loss of `images`, each run with autograd over its gradient window only: it enters at its
        own window start, from the input cached by the search, and leaves at its defective layer; blocks outside
        every window are not run again at all."""
        layers = search.layers
        height, width = search.grid
        starts = {image: gradient_window(layers[image], self.settings.limit_layers).start for image in images}
        first, last = min(starts.values()), max(layers[image] for image in images)
        losses: list[torch.Tensor] = []
        active: list[int] = []
        hidden = None
        for index in range(first, last + 1):
            entering = [image for image in images if starts[image] == index]
            if entering:
                rows = search.block_rows[index]
                entered = search.block_inputs[index][[rows.index(image) for image in entering]].detach()
                hidden = entered if hidden is None else torch.cat([hidden, entered])
                active += entering
            if not active:
                continue
            hidden = self._run_block(index, hidden, search.block_kwargs)
            finished = [position for position, image in enumerate(active) if layers[image] == index]
            if finished:
                tokens = patch_grid(hidden[finished], self.description, height, width)
                done = [active[position] for position in finished]
                losses.append(self._image_losses(tokens, done, search.masks, search.cosines, references).sum())
                keep = [position for position, image in enumerate(active) if layers[image] != index]
                active = [active[position] for position in keep]
                hidden = hidden[keep] if keep else None
        return torch.stack(losses).sum()

    def _image_losses(
        self,
        tokens: torch.Tensor,
        images: list[int],
        masks: dict[int, torch.Tensor],
        cosines: dict[int, torch.Tensor],
        references: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """Return the loss of each image in `images` (tokens [n, H, W, C] at their defective layer), shape [n]."""
        settings = self.settings
        mask = torch.stack([masks[image] for image in images])
        cosine = torch.stack([cosines[image] for image in images])
        losses = smooth_neighbourhood_loss(
            tokens, cosine, mask, settings.kernel, settings.temperature, reduction="none"
        )
        if settings.preserve_weight > 0:
            reference = torch.stack([references[image] for image in images])
            keep = ~_dilate(mask, settings.kernel)
            preservation = feature_preservation_loss(tokens, reference, keep, reduction="none")
            losses = losses + settings.preserve_weight * preservation
        return losses

    def _reference_tokens(
        self, pixel_values: torch.Tensor, defective: list[int], layers: list[int], height: int, width: int
    ) -> dict[int, torch.Tensor]:
        """Return, when the preservation term is on, each defective image's tokens at its defective layer as the
        frozen base model computes them (adapter disabled, no gradient); an empty dict otherwise."""
        if self.settings.preserve_weight <= 0:
            return {}
        references: dict[int, torch.Tensor] = {}
        last = max(layers[image] for image in defective)
        with torch.no_grad(), self.model.disable_adapter():
            hidden, block_kwargs = self._embed(pixel_values[defective])
            for index in range(last + 1):
                hidden = self._run_block(index, hidden, block_kwargs)
                for position, image in enumerate(defective):
                    if layers[image] == index:
                        references[image] = patch_grid(
                            hidden[position : position + 1], self.description, height, width
                        )[0]
        return references


def _dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Return `mask` [B, H, W] grown by a `kernel`×`kernel` box: the defect tokens and their loss neighbourhoods."""
    grown = nn.functional.max_pool2d(mask[:, None].float(), kernel, stride=1, padding=kernel // 2)
    return grown[:, 0] > 0
