"""The SINDER repair loop, driven by Accelerate.

Per batch (docs/method.md §2-4):

1. *Find the defective layer* of every image without autograd: run the blocks in order, and at each layer flag the
   patch tokens whose |cos| with that layer's defect direction is an outlier; the first layer with at least
   `skip_less_than` flags is the image's defective layer. The pass stops as soon as every image has one (early
   exit: the rest of the network is never run). Images without a defective layer are skipped and counted.
2. *Take the loss with a gradient window*: run the blocks again with autograd, but each image only over the
   `limit_layers` blocks ending at its defective layer: it enters at its own window start, from its block input
   cached (without gradient) in step 1, and leaves at its defective layer. Blocks before an image's window get no
   gradient from it, and blocks outside every window are not run again. At its defective layer each image gives the
   smooth neighbourhood loss (`loss.py`), plus, optionally, a term that keeps its clean tokens where the frozen base
   model puts them (`preserve_weight`).
3. *Step*: the gradients of all processes are summed explicitly (one all-reduce of a flat vector on every process,
   every step, whether or not it had a defective image, so no process can hang), divided by the number of
   defective images of the step; a NaN or inf loss or gradient skips the step everywhere. SGD with momentum.

The adapter covers only the blocks of the gradient windows met so far: between steps 1 and 2, the blocks of every
process's windows are agreed on (a second, tiny collective per step) and any not yet adapted get the adapter, with
zero shifts (see `SinderTrainer.adapt_window_blocks`).

Only the shifts `delta` of the SINDER adapter train. Defect directions are computed once, from the base weights.

Mixed precision: with an `Accelerator(mixed_precision="bf16")` (`accelerate launch --mixed_precision bf16`, or
`--mixed-precision bf16` of the repair command) the embeddings and blocks run under bfloat16 autocast in both passes,
while the residual stream, the shifts, the defect test and the loss stay in float32. float16 is refused: its
gradients would need loss scaling, and bfloat16 covers the same GPUs' fast paths.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from .architectures import ArchitectureDescription, describe_model, get_blocks, unwrap_backbone
from .config import SinderConfig
from .data import ImageBatch, UnreadableImage, UnreadableImageLog, epoch_batches
from .defects import defect_token_mask, direction_cosines, patch_grid, singular_defect_directions
from .distributed import raise_if_failed, run_on_main_process
from .loss import feature_preservation_loss, smooth_neighbourhood_loss

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_FILE = "trainer_state.json"
CHECKPOINT_OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_ADAPTER_DIR = "adapter"
LATEST_CHECKPOINT_FILE = "latest"


@dataclass
class TrainingArguments:
    """Hyperparameters of the repair loop; defaults are the paper's (docs/method.md §4).

    Attributes:
        lr: SGD learning rate.
        momentum: SGD momentum.
        max_steps: stop after this many optimizer steps (batches with at least one defective image).
        mask_thr: outlier threshold k of the defect-token test (mean + k std of |cos|).
        kernel: neighbourhood window of the loss, 3 or 5; tokens in the border ring of width kernel // 2 are never
            flagged.
        limit_layers: number of blocks, ending at an image's defective layer, that receive its gradient.
        skip_less_than: a layer is defective for an image when at least this many tokens are flagged.
        stop_skip_ratio: stop once this share of the last `stop_window` images had no defective layer.
        stop_window: number of recent images the stop rule looks at (the paper: 1000).
        temperature: affinity temperature of the neighbourhood weights.
        preserve_weight: weight of the clean-token preservation term (0 = the paper's loss alone).
        batch_size: images per process and step.
        seed: seed of the data order.
        save_every: write a checkpoint every this many steps (0: only at the end and on interruption).
        num_workers: data-loading worker processes.
    """

    lr: float = 0.005
    momentum: float = 0.9
    max_steps: int = 30_000
    mask_thr: float = 4.0
    kernel: int = 3
    limit_layers: int = 10
    skip_less_than: int = 3
    stop_skip_ratio: float = 0.75
    stop_window: int = 1000
    temperature: float = 0.1
    preserve_weight: float = 0.0
    batch_size: int = 1
    seed: int = 0
    save_every: int = 500
    num_workers: int = 0

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "max_steps": self.max_steps >= 1,
            "mask_thr": self.mask_thr > 0,
            "kernel": self.kernel in (3, 5),
            "limit_layers": self.limit_layers >= 1,
            "skip_less_than": self.skip_less_than >= 1,
            "stop_skip_ratio": 0 < self.stop_skip_ratio <= 1,
            "stop_window": self.stop_window >= 1,
            "temperature": self.temperature > 0,
            "preserve_weight": self.preserve_weight >= 0,
            "batch_size": self.batch_size >= 1,
            "save_every": self.save_every >= 0,
            "num_workers": self.num_workers >= 0,
        }
        invalid = [f"{name}={getattr(self, name)!r}" for name, valid in checks.items() if not valid]
        if invalid:
            raise ValueError(f"Invalid training arguments: {', '.join(invalid)}.")


@dataclass
class TrainerState:
    """Everything that evolves during training and is saved with a checkpoint (besides the shifts and optimizer).

    Attributes:
        step: optimizer steps taken (NaN-skipped steps included).
        epoch: passes over the data started.
        batches_in_epoch: batches of the current epoch already consumed (on every process).
        images_seen: images processed, over all processes.
        images_skipped: of those, images without a defective layer.
        nan_steps: steps skipped because the loss or a gradient was NaN or inf.
        recent: (images, skipped) per batch over the last `stop_window` images, for the stop rule.
        defective_layers: how often each layer was an image's defective layer.
        last_loss: the mean loss of the last step with a defective image.
        seconds: training time so far.
        stop_reason: why training ended ("max_steps", "skip_ratio", "data", "interrupted"), or None.
        unreadable: names of the images found unusable so far (not images, truncated, too small), over all
            processes, each once.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    images_seen: int = 0
    images_skipped: int = 0
    nan_steps: int = 0
    recent: list[tuple[int, int]] = field(default_factory=list)
    defective_layers: dict[str, int] = field(default_factory=dict)
    last_loss: float | None = None
    seconds: float = 0.0
    stop_reason: str | None = None
    unreadable: list[str] = field(default_factory=list)

    def recent_skip_ratio(self) -> tuple[float, int]:
        """Return the share of skipped images over the recent window and the number of images in it."""
        images = sum(count for count, _ in self.recent)
        skipped = sum(skipped for _, skipped in self.recent)
        return (skipped / images if images else 0.0), images


@dataclass
class StepOutput:
    """What one training step did on this process.

    Attributes:
        loss_sum: sum over this process's defective images of their loss (a graph-connected tensor), or None.
        num_defective: images of the batch with a defective layer.
        defective_layers: the defective layer of each image (−1 for none), in batch order.
    """

    loss_sum: torch.Tensor | None
    num_defective: int
    defective_layers: list[int]


@dataclass
class DefectSearch:
    """What the no-grad pass (step 1) found in one batch.

    Attributes:
        layers: each image's defective layer (−1 for none), in batch order.
        masks: per defective image, its defect-token mask [H, W] at that layer.
        cosines: per defective image, its |cos| map [H, W] at that layer.
        block_inputs: per block reached, the batch's input to it where a gradient window may start, else None.
        grid: the patch grid (H, W).
    """

    layers: list[int]
    masks: dict[int, torch.Tensor]
    cosines: dict[int, torch.Tensor]
    block_inputs: list[torch.Tensor | None]
    grid: tuple[int, int]


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


class SinderTrainer:
    """Trains the shifts of a SINDER-adapted DINOv2 (`PeftModel`) to remove its singular defects.

    Args:
        model: the `PeftModel` to train (SINDER adapter, DINOv2 base).
        directions: one defect direction per layer, from the *base* weights.
        args: the hyperparameters.
        accelerator: the `Accelerator` of this process (device, process count, trackers).
        checkpoint_dir: where checkpoints go (`<output_dir>/checkpoints`).
        callbacks: functions called with the `TrainerState` after every step (on every process).
        unreadable: names of images already found unusable (e.g. while choosing the blocks to adapt): they are
            counted in `state.unreadable` and not warned about again.
    """

    def __init__(
        self,
        model: PeftModel,
        directions: Sequence[torch.Tensor],
        args: TrainingArguments,
        accelerator: Accelerator,
        checkpoint_dir: Path,
        callbacks: Sequence[Callable[[TrainerState], None]] = (),
        unreadable: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.args = args
        self.accelerator = accelerator
        self.checkpoint_dir = Path(checkpoint_dir)
        self.callbacks = list(callbacks)
        if accelerator.mixed_precision == "fp16":
            raise ValueError(
                "SINDER training supports mixed_precision 'no' and 'bf16', not 'fp16' (float16 gradients of the "
                "shifts would need loss scaling). Use bf16, e.g. `accelerate launch --mixed_precision bf16`."
            )
        self.backbone = unwrap_backbone(model)
        self.description: ArchitectureDescription = describe_model(model)
        self.blocks = get_blocks(self.backbone)
        self.directions = torch.stack([direction.float() for direction in directions]).to(accelerator.device)
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not self.parameters:
            raise ValueError("The model has no trainable SINDER shift; wrap it with get_peft_model(SinderConfig()).")
        self.optimizer = torch.optim.SGD(self.parameters, lr=args.lr, momentum=args.momentum)
        self.state = TrainerState(unreadable=sorted(set(unreadable)))
        self._unreadable_log = UnreadableImageLog(unreadable)
        self._interrupted = False

    # ------------------------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, pixel_values: torch.Tensor) -> StepOutput:
        """Run steps 1 and 2 of the module docstring on one batch and return the summed loss of its images.

        Only adapted blocks receive gradients: `training_step` first adapts the blocks of every gradient window (on
        all processes alike); called alone, this uses the blocks adapted so far.
        """
        return self.window_loss(pixel_values, self.find_defective_layers(pixel_values))

    def find_defective_layers(self, pixel_values: torch.Tensor) -> DefectSearch:
        """Step 1 of the module docstring: the no-grad pass that finds each image's defective layer, stopping as
        soon as every image has one, and keeps the block inputs the gradient windows start from."""
        args = self.args
        batch = pixel_values.shape[0]
        patch = self.description.patch_size
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        border = args.kernel // 2

        layers = [-1] * batch
        masks: dict[int, torch.Tensor] = {}
        cosines: dict[int, torch.Tensor] = {}
        block_inputs: list[torch.Tensor | None] = []
        with torch.no_grad():
            hidden = self._run(self.backbone.embeddings, pixel_values)
            for index, block in enumerate(self.blocks):
                block_inputs.append(hidden)
                # Keep only the inputs a gradient window can still start from: those of the windows of images
                # already assigned, and of windows ending at this layer or later.
                starts = [gradient_window(layer, args.limit_layers).start for layer in layers if layer >= 0]
                needed_from = min([*starts, gradient_window(index, args.limit_layers).start])
                for stale in range(needed_from):
                    block_inputs[stale] = None
                hidden = self._run(block, hidden)
                layer_cosines = direction_cosines(
                    patch_grid(hidden, self.description, height, width), self.directions[index]
                )
                layer_masks = defect_token_mask(layer_cosines, args.mask_thr, border)
                counts = layer_masks.flatten(1).sum(dim=1).tolist()
                for image, count in enumerate(counts):
                    if layers[image] < 0 and count >= args.skip_less_than:
                        layers[image], masks[image], cosines[image] = index, layer_masks[image], layer_cosines[image]
                if all(layer >= 0 for layer in layers):
                    break
        return DefectSearch(layers, masks, cosines, block_inputs, (height, width))

    def window_loss(self, pixel_values: torch.Tensor, search: DefectSearch) -> StepOutput:
        """Step 2 of the module docstring: the autograd pass over each defective image's gradient window, and the
        summed loss of those images (None when the batch has none)."""
        layers = search.layers
        defective = [image for image in range(len(layers)) if layers[image] >= 0]
        if not defective:
            return StepOutput(loss_sum=None, num_defective=0, defective_layers=layers)

        # Each image enters the autograd pass at its own window start, from the input cached above, and leaves at
        # its defective layer; blocks outside every window are not run again at all.
        height, width = search.grid
        starts = {image: gradient_window(layers[image], self.args.limit_layers).start for image in defective}
        first, last = min(starts.values()), max(layers[image] for image in defective)
        references = self._reference_tokens(pixel_values, defective, layers, height, width)
        losses: list[torch.Tensor] = []
        active: list[int] = []
        hidden = None
        for index in range(first, last + 1):
            entering = [image for image in defective if starts[image] == index]
            if entering:
                entered = search.block_inputs[index][entering]
                hidden = entered if hidden is None else torch.cat([hidden, entered])
                active += entering
            if not active:
                continue
            hidden = self._run(self.blocks[index], hidden)
            finished = [position for position, image in enumerate(active) if layers[image] == index]
            if finished:
                tokens = patch_grid(hidden[finished], self.description, height, width)
                images = [active[position] for position in finished]
                losses.append(self._image_losses(tokens, images, search.masks, search.cosines, references).sum())
                keep = [position for position, image in enumerate(active) if layers[image] != index]
                active = [active[position] for position in keep]
                hidden = hidden[keep] if keep else None
        return StepOutput(loss_sum=torch.stack(losses).sum(), num_defective=len(defective), defective_layers=layers)

    def adapt_window_blocks(self, defective_layers: Sequence[int], error: BaseException | None = None) -> list[int]:
        """Make sure every block of the gradient windows of `defective_layers` carries the adapter, on all processes.

        The blocks this process needs are summed over all processes (a small collective made on every step, by
        every process), so all processes adapt the same blocks and keep the same trainable parameters. Newly
        adapted blocks start from zero shifts, which is what an adapted block that never received a gradient holds,
        so adapting on demand trains exactly what adapting every block up front would, without holding singular
        factors for blocks no defect reaches. The optimizer is rebuilt over the parameters in model order, with the
        momentum of the existing ones kept.

        `error`, when this process failed before this collective, is raised after it, and every other process
        raises `FailedOnAnotherProcess` (see `distributed.py`).

        Returns the blocks newly adapted (empty almost always).
        """
        needed = torch.zeros(self.description.num_layers + 1, device=self.accelerator.device)
        for layer in defective_layers:
            if layer >= 0:
                window = gradient_window(layer, self.args.limit_layers)
                needed[window.start : window.stop] = 1
        needed[-1] = float(error is not None)
        needed = self.accelerator.reduce(needed, reduction="sum")
        raise_if_failed(error, int(needed[-1].item()))
        blocks = [index for index, count in enumerate(needed[:-1].tolist()) if count > 0]
        added = self.model.base_model.add_layers(blocks, adapter_name=self.model.active_adapter)
        if added:
            momentum = {parameter: self.optimizer.state[parameter] for parameter in self.optimizer.state}
            self.parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
            self.optimizer = torch.optim.SGD(self.parameters, lr=self.args.lr, momentum=self.args.momentum)
            self.optimizer.state.update(momentum)
            logger.info(
                "Defects reached blocks %s: adapting them (adapted blocks now %s).",
                added,
                self.model.peft_config[self.model.active_adapter].layers_to_transform,
            )
        return added

    def _run(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Return `module(inputs)` (the embeddings or one block) computed under the accelerator's autocast.

        With `mixed_precision="bf16"` the matrix multiplies run in bfloat16; the block output is still in the model's
        dtype (the residual sum promotes it), so the defect test and the loss, computed outside, stay in float32.
        Without mixed precision this is a plain call.
        """
        with self.accelerator.autocast():
            return module(inputs)

    def _image_losses(
        self,
        tokens: torch.Tensor,
        images: list[int],
        masks: dict[int, torch.Tensor],
        cosines: dict[int, torch.Tensor],
        references: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """Return the loss of each image in `images` (tokens [n, H, W, C] at their defective layer), shape [n]."""
        mask = torch.stack([masks[image] for image in images])
        cosine = torch.stack([cosines[image] for image in images])
        losses = smooth_neighbourhood_loss(
            tokens, cosine, mask, self.args.kernel, self.args.temperature, reduction="none"
        )
        if self.args.preserve_weight > 0:
            reference = torch.stack([references[image] for image in images])
            keep = ~_dilate(mask, self.args.kernel)
            preservation = feature_preservation_loss(tokens, reference, keep, reduction="none")
            losses = losses + self.args.preserve_weight * preservation
        return losses

    def _reference_tokens(
        self, pixel_values: torch.Tensor, defective: list[int], layers: list[int], height: int, width: int
    ) -> dict[int, torch.Tensor]:
        """Return, when the preservation term is on, each defective image's tokens at its defective layer as the
        frozen base model computes them (adapter disabled, no gradient); an empty dict otherwise."""
        if self.args.preserve_weight <= 0:
            return {}
        references: dict[int, torch.Tensor] = {}
        last = max(layers[image] for image in defective)
        with torch.no_grad(), self.model.disable_adapter():
            hidden = self._run(self.backbone.embeddings, pixel_values[defective])
            for index in range(last + 1):
                hidden = self._run(self.blocks[index], hidden)
                for position, image in enumerate(defective):
                    if layers[image] == index:
                        references[image] = patch_grid(
                            hidden[position : position + 1], self.description, height, width
                        )[0]
        return references

    def _all_reduce(self, counters: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Sum the gradients and `counters` over all processes, in one collective call made on every step.

        Every process calls this on every step, with or without a defective image, so collective calls always
        match and no process waits for one that has nothing to contribute.

        Returns:
            Per trainable parameter, its summed gradient, or None when no process computed one (a block outside
            every gradient window: like the original single-process code, its momentum is then not applied); and
            the summed counters.
        """
        device = counters.device
        pieces, received = [], []
        for parameter in self.parameters:
            gradient = parameter.grad
            received.append(float(gradient is not None))
            pieces.append(
                gradient.detach().flatten().float()
                if gradient is not None
                else torch.zeros(parameter.numel(), device=device)
            )
        payload = torch.cat([*pieces, torch.tensor(received, device=device), counters.float()])
        payload = self.accelerator.reduce(payload, reduction="sum")
        sizes = [parameter.numel() for parameter in self.parameters]
        *gradients, got, summed_counters = torch.split(payload, [*sizes, len(sizes), counters.numel()])
        return [
            gradient.view_as(parameter) if flag > 0 else None
            for gradient, parameter, flag in zip(gradients, self.parameters, got.tolist(), strict=True)
        ], summed_counters

    def training_step(
        self, pixel_values: torch.Tensor | None, unreadable: Sequence[UnreadableImage] = ()
    ) -> dict[str, float]:
        """Run one synchronized step on this process's batch (`None`: this process has no image this step).

        `unreadable` are the images of the batch that could not be used: each is warned about once, by the process
        that met it, and the names are shared with every process (only on the rare steps that meet one) so that
        `state.unreadable` counts each image once over the whole run.

        An exception on this process (out of memory, a broken image tensor...) is raised at the end of the step's
        next collective, and every other process then raises `FailedOnAnotherProcess`, so that no process waits.

        Returns the step's numbers over all processes: images, skipped images, defective images, the mean loss
        (NaN when there was no defective image or the step was skipped) and whether the step was skipped for a
        non-finite loss or gradient.
        """
        self.optimizer.zero_grad(set_to_none=True)
        device = self.accelerator.device
        output = StepOutput(loss_sum=None, num_defective=0, defective_layers=[])
        search, error = None, None
        if pixel_values is not None:
            try:
                pixel_values = pixel_values.to(device=device, dtype=next(self.backbone.parameters()).dtype)
                search = self.find_defective_layers(pixel_values)
            except Exception as caught:
                error = caught
        self.adapt_window_blocks(search.layers if search is not None else [], error)
        loss_value = 0.0
        try:
            if search is not None:
                output = self.window_loss(pixel_values, search)
            if output.loss_sum is not None:
                loss_value = float(output.loss_sum.detach())
                if math.isfinite(loss_value):
                    output.loss_sum.backward()
        except Exception as caught:
            error, output, loss_value = caught, StepOutput(loss_sum=None, num_defective=0, defective_layers=[]), 0.0
        finite_loss = math.isfinite(loss_value)
        layer_counts = torch.zeros(self.description.num_layers)
        for layer in output.defective_layers:
            if layer >= 0:
                layer_counts[layer] += 1
        new_unreadable = self._unreadable_log.add(unreadable)
        counters = torch.cat(
            [
                torch.tensor(
                    [
                        len(output.defective_layers),
                        output.num_defective,
                        loss_value if finite_loss else 0.0,
                        float(not finite_loss),
                        float(self._interrupted),
                        float(error is not None),
                        len(new_unreadable),
                    ]
                ),
                layer_counts,
            ]
        ).to(device)
        gradients, summed = self._all_reduce(counters)
        images, defective, loss_sum, nonfinite, interrupted, failures, unreadable_count = summed[:7].tolist()
        raise_if_failed(error, int(failures))
        if unreadable_count > 0 and self.accelerator.num_processes > 1:
            for names in gather_object([new_unreadable]):
                self._unreadable_log.merge(names)
        self.state.unreadable = sorted(self._unreadable_log.names)
        self._interrupted = self._interrupted or interrupted > 0
        for layer, count in enumerate(summed[7:].tolist()):
            if count > 0:
                key = str(layer)
                self.state.defective_layers[key] = self.state.defective_layers.get(key, 0) + int(count)

        skipped_step = False
        if defective > 0:
            self.state.step += 1
            finite_gradients = all(gradient is None or torch.isfinite(gradient).all() for gradient in gradients)
            if nonfinite > 0 or not finite_gradients:
                skipped_step = True
                self.state.nan_steps += 1
                logger.warning("Step %d: non-finite loss or gradient; the step is skipped.", self.state.step)
            else:
                for parameter, gradient in zip(self.parameters, gradients, strict=True):
                    parameter.grad = None if gradient is None else (gradient / defective).to(parameter.dtype)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        mean_loss = loss_sum / defective if defective > 0 and not skipped_step else float("nan")
        if not math.isnan(mean_loss):
            self.state.last_loss = mean_loss
        return {
            "images": images,
            "skipped": images - defective,
            "defective": defective,
            "loss": mean_loss,
            "nonfinite": float(skipped_step),
        }

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------------

    def _epoch_batches(self, dataset: Dataset | IterableDataset) -> Iterator[ImageBatch]:
        """Return this process's batches of the current epoch, from where the epoch stands (`data.epoch_batches`)."""
        return epoch_batches(
            dataset,
            batch_size=self.args.batch_size,
            num_workers=self.args.num_workers,
            seed=self.args.seed,
            epoch=self.state.epoch,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            skip_batches=self.state.batches_in_epoch,
        )

    def _next_batch(self, batches: Iterator[ImageBatch]) -> ImageBatch | None:
        """Return this process's next batch of the epoch, or None when it has none left.

        The answer is agreed on by every process in one collective: when any process has run out, all end the epoch
        together (so they keep taking the same steps), and when reading the batch failed on any process (a worker
        crash, images of different sizes), the process that failed raises its error and the others raise
        `FailedOnAnotherProcess`.
        """
        batch, error = None, None
        try:
            batch = next(batches, None)
        except Exception as caught:
            error = caught
        flags = torch.tensor([float(batch is None and error is None), float(error is not None)])
        flags = self.accelerator.reduce(flags.to(self.accelerator.device), reduction="sum")
        raise_if_failed(error, int(flags[1].item()))
        return None if flags[0] > 0 else batch

    def _record(self, result: dict[str, float]) -> None:
        """Add a step's image counts to the totals and to the recent window of the stop rule."""
        images, skipped = int(result["images"]), int(result["skipped"])
        self.state.images_seen += images
        self.state.images_skipped += skipped
        self.state.batches_in_epoch += 1
        self.state.recent.append((images, skipped))
        while self.state.recent and sum(count for count, _ in self.state.recent[1:]) >= self.args.stop_window:
            self.state.recent.pop(0)

    def _stop_reason(self) -> str | None:
        """Return why training must stop now, or None to go on."""
        if self._interrupted:
            return "interrupted"
        if self.state.step >= self.args.max_steps:
            return "max_steps"
        ratio, images = self.state.recent_skip_ratio()
        if images >= self.args.stop_window and ratio >= self.args.stop_skip_ratio:
            return "skip_ratio"
        return None

    def _handle_signal(self, signum: int, frame: Any) -> None:
        """First SIGINT/SIGTERM: finish the current step, save a checkpoint and stop. A second SIGINT aborts."""
        if self._interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("Received %s: saving a checkpoint after this step.", signal.Signals(signum).name)
        self._interrupted = True

    def train(self, dataset: Dataset | IterableDataset) -> TrainerState:
        """Train until `max_steps`, the skip-ratio stop rule, or an interruption, and return the final state.

        A checkpoint is written every `save_every` steps, on SIGINT/SIGTERM, and at the end. Training resumes from
        `self.state` (see `load_checkpoint`), including the position in the current epoch.
        """
        previous_handlers = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        progress = tqdm(
            total=self.args.max_steps,
            initial=self.state.step,
            desc="SINDER repair",
            unit="step",
            disable=not self.accelerator.is_main_process,
        )
        started = time.perf_counter() - self.state.seconds
        last_saved = self.state.step
        try:
            while self.state.stop_reason is None:
                images_before = self.state.images_seen
                batches = self._epoch_batches(dataset)
                while self.state.stop_reason is None:
                    batch = self._next_batch(batches)
                    if batch is None:
                        break
                    result = self.training_step(batch.pixel_values, batch.unreadable)
                    self._record(result)
                    self.state.seconds = time.perf_counter() - started
                    self._report(progress, result)
                    for callback in self.callbacks:
                        callback(self.state)
                    self.state.stop_reason = self._stop_reason()
                    if self.args.save_every and self.state.step - last_saved >= self.args.save_every:
                        self.save_checkpoint()
                        last_saved = self.state.step
                if self.state.stop_reason is None:
                    if self.state.images_seen == images_before:
                        self.state.stop_reason = "data"
                        logger.warning("A whole pass over the data gave no usable image; stopping.")
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
        finally:
            progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        self.save_checkpoint()
        return self.state

    def _report(self, progress: tqdm, result: dict[str, float]) -> None:
        """Update the progress bar (main process) and the Accelerate trackers with one step's numbers."""
        ratio, _ = self.state.recent_skip_ratio()
        if result["defective"] > 0:
            progress.update(self.state.step - progress.n)
        layers = self.state.defective_layers
        latest_layer = max(layers, key=lambda key: layers[key]) if layers else "-"
        progress.set_postfix(
            loss=f"{self.state.last_loss:.4f}" if self.state.last_loss is not None else "-",
            layer=latest_layer,
            skip=f"{ratio:.2f}",
            images=self.state.images_seen,
        )
        if result["defective"] > 0 and not math.isnan(result["loss"]):
            self.accelerator.log(
                {"loss": result["loss"], "skip_ratio": ratio, "images_seen": self.state.images_seen},
                step=self.state.step,
            )

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-NNNNNNN/` (adapter, optimizer, trainer state) and point `checkpoints/latest` at it.

        The directory is written under a temporary name and renamed, then `latest` is replaced atomically, so an
        interruption while saving never leaves a half-written checkpoint behind. Older checkpoints are removed.
        Returns the checkpoint directory (on every process).
        """
        target = self.checkpoint_dir / f"step-{self.state.step:07d}"

        def write() -> None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            temporary = self.checkpoint_dir / f".tmp-{target.name}"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            self.accelerator.unwrap_model(self.model).save_pretrained(temporary / CHECKPOINT_ADAPTER_DIR)
            torch.save(self.optimizer.state_dict(), temporary / CHECKPOINT_OPTIMIZER_FILE)
            (temporary / CHECKPOINT_STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(temporary, target)
            pointer = self.checkpoint_dir / f".{LATEST_CHECKPOINT_FILE}.tmp"
            pointer.write_text(target.name)
            os.replace(pointer, self.checkpoint_dir / LATEST_CHECKPOINT_FILE)
            for old in self.checkpoint_dir.glob("step-*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
            logger.info("Saved checkpoint %s.", target)

        run_on_main_process(self.accelerator, write)
        return target

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore the optimizer and trainer state from a checkpoint directory (the shifts are loaded with the
        adapter, see `resolve_checkpoint` and `PeftModel.from_pretrained(..., is_trainable=True)`)."""
        data = json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text())
        data["recent"] = [tuple(entry) for entry in data["recent"]]
        self.state = TrainerState(**data)
        self.state.stop_reason = None
        self._unreadable_log.merge(self.state.unreadable)
        optimizer_state = torch.load(checkpoint / CHECKPOINT_OPTIMIZER_FILE, map_location=self.accelerator.device)
        self.optimizer.load_state_dict(optimizer_state)


def resolve_checkpoint(path: str | Path) -> Path:
    """Return the checkpoint directory `--resume` points at: a checkpoint itself, a `checkpoints/` folder or a run's
    output directory (both resolved through their `latest` file).

    Raises:
        FileNotFoundError: when no checkpoint is found there.
    """
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / CHECKPOINT_STATE_FILE).is_file():
            return candidate
        pointer = candidate / LATEST_CHECKPOINT_FILE
        if pointer.is_file():
            checkpoint = candidate / pointer.read_text().strip()
            if (checkpoint / CHECKPOINT_STATE_FILE).is_file():
                return checkpoint
    raise FileNotFoundError(f"No SINDER checkpoint found at {str(path)!r} (looked for {CHECKPOINT_STATE_FILE}).")


def _dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Return `mask` [B, H, W] grown by a `kernel`×`kernel` box: the defect tokens and their loss neighbourhoods."""
    grown = nn.functional.max_pool2d(mask[:, None].float(), kernel, stride=1, padding=kernel // 2)
    return grown[:, 0] > 0


def build_sinder_model(base_model: nn.Module, layers_to_transform: Sequence[int]) -> PeftModel:
    """Wrap `base_model` in a trainable SINDER adapter on the given blocks (default targets of its architecture)."""
    return get_peft_model(base_model, SinderConfig(layers_to_transform=list(layers_to_transform)))


def compute_directions(model: nn.Module) -> list[torch.Tensor]:
    """Return the defect directions of `model`'s base weights (adapter disabled when it has one)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            return singular_defect_directions(model)
    return singular_defect_directions(model)
