"""The SINDER repair loop, driven by Accelerate: it orchestrates, the jobs live in their own modules.

Per step (docs/method.md §2-4):

1. the batch's loss over each image's gradient window (`window_loss.WindowLoss`: the defect search, the window pass);
2. before the autograd pass, the blocks of every process's gradient windows are agreed on and any not yet adapted
   get the adapter, with zero shifts (`SinderTrainer.adapt_window_blocks`, `SinderModel.add_layers`);
3. the gradients and the step's counters of all processes are summed in one collective made on every process, every
   step, whether or not it had a defective image (`distributed.sum_over_processes`), divided by the number of
   defective images of the step; a NaN or inf loss or gradient skips the step everywhere; SGD with momentum.

Around the steps: each process's share of the data (`images.batching.epoch_batches`), the stop rule (`state`),
checkpoints (`checkpoints`), Ctrl-C/SIGTERM (`interruption`), and failures on one process ending all of them
(`distributed`). Only the shifts `delta` of the SINDER adapter train. Defect directions are computed once, from the
base weights.

Mixed precision: with an `Accelerator(mixed_precision="bf16")` (`accelerate launch --mixed_precision bf16`, or
`--mixed-precision bf16` of the repair command) the embeddings and blocks run under bfloat16 autocast in both passes,
while the residual stream, the shifts, the defect test and the loss stay in float32. float16 is refused: its
gradients would need loss scaling, and bfloat16 covers the same GPUs' fast paths.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ..analysis.detection import DefectDirections
from ..analysis.directions import singular_defect_directions
from ..images.batching import UnreadableImageLog, epoch_batches
from ..images.datasets import UnreadableImage
from ..tuner.architectures import describe_model
from ..tuner.config import SinderConfig
from .arguments import TrainingArguments
from .checkpoints import read_checkpoint, write_checkpoint
from .distributed import (
    blocks_needed_on_any_process,
    next_batch_on_every_process,
    raise_if_failed,
    run_on_main_process,
    sum_over_processes,
)
from .interruption import InterruptionHandler
from .progress import TrainingProgress
from .state import TrainerState
from .window_loss import BatchLoss, WindowLoss, gradient_window

logger = logging.getLogger(__name__)


class SinderTrainer:
    """Trains the shifts of a SINDER-adapted ViT (`PeftModel`) to remove its singular defects.

    Args:
        model: the `PeftModel` to train (SINDER adapter on a model of a supported family).
        directions: one defect direction per layer, from the *base* model: a `DefectDirections` (saved with every
            checkpoint, so that a resume uses the same ones) or plain tensors.
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
        directions: DefectDirections | Sequence[torch.Tensor],
        args: TrainingArguments,
        accelerator: Accelerator,
        checkpoint_dir: Path,
        callbacks: Sequence[Callable[[TrainerState], None]] = (),
        unreadable: Sequence[str] = (),
    ) -> None:
        if accelerator.mixed_precision == "fp16":
            raise ValueError(
                "SINDER training supports mixed_precision 'no' and 'bf16', not 'fp16' (float16 gradients of the "
                "shifts would need loss scaling). Use bf16, e.g. `accelerate launch --mixed_precision bf16`."
            )
        self.model = model
        self.args = args
        self.accelerator = accelerator
        self.checkpoint_dir = Path(checkpoint_dir)
        self.callbacks = list(callbacks)
        self.num_layers = describe_model(model).num_layers
        self.defect_directions = directions if isinstance(directions, DefectDirections) else None
        matrix = directions.directions if isinstance(directions, DefectDirections) else torch.stack(list(directions))
        stacked = matrix.float().to(accelerator.device)
        self.window_loss = WindowLoss(model, stacked, args.window_settings, autocast=accelerator.autocast)
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not self.parameters:
            raise ValueError("The model has no trainable SINDER shift; wrap it with get_peft_model(SinderConfig()).")
        self.optimizer = torch.optim.SGD(self.parameters, lr=args.resolved_lr, momentum=args.momentum)
        self.state = TrainerState(unreadable=sorted(set(unreadable)))
        self.interruption = InterruptionHandler()
        self._unreadable_log = UnreadableImageLog(unreadable)

    def compute_loss(self, pixel_values: torch.Tensor) -> BatchLoss:
        """Return the summed loss of a batch's defective images on this process (`window_loss.WindowLoss`).

        Only adapted blocks receive gradients: `training_step` first adapts the blocks of every gradient window (on
        all processes alike); called alone, this uses the blocks adapted so far.
        """
        return self.window_loss(pixel_values)

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
        windows = [gradient_window(layer, self.args.limit_layers) for layer in defective_layers if layer >= 0]
        blocks = blocks_needed_on_any_process(self.accelerator, windows, self.num_layers, error)
        added = self.model.base_model.add_layers(blocks, adapter_name=self.model.active_adapter)
        if added:
            momentum = {parameter: self.optimizer.state[parameter] for parameter in self.optimizer.state}
            self.parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
            self.optimizer = torch.optim.SGD(self.parameters, lr=self.args.resolved_lr, momentum=self.args.momentum)
            self.optimizer.state.update(momentum)
            logger.info(
                "Defects reached blocks %s: adapting them (adapted blocks now %s).",
                added,
                self.model.peft_config[self.model.active_adapter].layers_to_transform,
            )
        return added

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
        no_loss = BatchLoss(loss_sum=None, num_defective=0, defective_layers=[])
        output, search, error = no_loss, None, None
        if pixel_values is not None:
            try:
                pixel_values = pixel_values.to(device=device, dtype=next(self.model.parameters()).dtype)
                search = self.window_loss.find_defective_layers(pixel_values)
            except Exception as caught:
                error = caught
        self.adapt_window_blocks(search.layers if search is not None else [], error)
        loss_value = 0.0
        try:
            if search is not None:
                output = self.window_loss.window_loss(pixel_values, search)
            if output.loss_sum is not None:
                loss_value = float(output.loss_sum.detach())
                if math.isfinite(loss_value):
                    output.backward()
        except Exception as caught:
            error, output, loss_value = caught, no_loss, 0.0
        finite_loss = math.isfinite(loss_value)
        layer_counts = torch.zeros(self.num_layers)
        for layer in output.defective_layers:
            if layer >= 0:
                layer_counts[layer] += 1
        new_unreadable = self._unreadable_log.add(unreadable)
        counters = {
            "images": torch.tensor([len(output.defective_layers)]),
            "defective": torch.tensor([output.num_defective]),
            "loss_sum": torch.tensor([loss_value if finite_loss else 0.0]),
            "nonfinite": torch.tensor([float(not finite_loss)]),
            "interrupted": torch.tensor([float(self.interruption.requested)]),
            "failures": torch.tensor([float(error is not None)]),
            "new_unreadable": torch.tensor([len(new_unreadable)]),
            "layer_counts": layer_counts,
        }
        gradients = [parameter.grad for parameter in self.parameters]
        shapes = [parameter.shape for parameter in self.parameters]
        gradients, totals = sum_over_processes(self.accelerator, gradients, shapes, counters)
        raise_if_failed(error, int(totals["failures"].item()))
        if totals["new_unreadable"].item() > 0:
            if self.accelerator.num_processes > 1:
                for names in gather_object([new_unreadable]):
                    self._unreadable_log.merge(names)
            self.state.unreadable = sorted(self._unreadable_log.names)
        self.interruption.requested = self.interruption.requested or totals["interrupted"].item() > 0
        self.state.record_defective_layers(totals["layer_counts"].tolist())
        images, defective = totals["images"].item(), totals["defective"].item()

        skipped_step = False
        if defective > 0:
            self.state.step += 1
            finite_gradients = all(gradient is None or torch.isfinite(gradient).all() for gradient in gradients)
            if totals["nonfinite"].item() > 0 or not finite_gradients:
                skipped_step = True
                self.state.nan_steps += 1
                logger.warning("Step %d: non-finite loss or gradient; the step is skipped.", self.state.step)
            else:
                for parameter, gradient in zip(self.parameters, gradients, strict=True):
                    parameter.grad = None if gradient is None else (gradient / defective).to(parameter.dtype)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        mean_loss = totals["loss_sum"].item() / defective if defective > 0 and not skipped_step else float("nan")
        if not math.isnan(mean_loss):
            self.state.last_loss = mean_loss
        return {
            "images": images,
            "skipped": images - defective,
            "defective": defective,
            "loss": mean_loss,
            "nonfinite": float(skipped_step),
        }

    def train(self, dataset: Dataset | IterableDataset) -> TrainerState:
        """Train until `max_steps`, the skip-ratio stop rule, or an interruption, and return the final state.

        A checkpoint is written every `save_every` steps, on SIGINT/SIGTERM, and at the end. Training resumes from
        `self.state` (see `load_checkpoint`), including the position in the current epoch.
        """
        args = self.args
        stop_window = capped_stop_window(args.resolved_stop_window, dataset, seeded=args.stop_window_seeded)
        progress = TrainingProgress(self.accelerator, args.max_steps, self.state.step)
        started = time.perf_counter() - self.state.seconds
        last_saved = self.state.step
        with self.interruption, progress:
            while self.state.stop_reason is None:
                images_before, skipped_before = self.state.images_seen, self.state.images_skipped
                batches = epoch_batches(
                    dataset,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    seed=args.seed,
                    epoch=self.state.epoch,
                    process_index=self.accelerator.process_index,
                    num_processes=self.accelerator.num_processes,
                    skip_batches=self.state.batches_in_epoch,
                )
                while self.state.stop_reason is None:
                    batch = next_batch_on_every_process(self.accelerator, batches)
                    if batch is None:
                        break
                    result = self.training_step(batch.pixel_values, batch.unreadable)
                    self.state.record_batch(int(result["images"]), int(result["skipped"]), stop_window)
                    self.state.seconds = time.perf_counter() - started
                    progress.report(self.state, result, stop_window)
                    for callback in self.callbacks:
                        callback(self.state)
                    self.state.stop_reason = self.state.next_stop_reason(
                        interrupted=self.interruption.requested,
                        max_steps=args.max_steps,
                        stop_window=stop_window,
                        stop_skip_ratio=args.resolved_stop_skip_ratio,
                        seeded=args.stop_window_seeded,
                    )
                    if args.save_every and self.state.step - last_saved >= args.save_every:
                        self.save_checkpoint()
                        last_saved = self.state.step
                if self.state.stop_reason is None:
                    if self.state.images_seen == images_before:
                        self.state.stop_reason = "data"
                        logger.warning("A whole pass over the data gave no usable image; stopping.")
                    elif self.state.images_skipped - skipped_before == self.state.images_seen - images_before:
                        self.state.stop_reason = "no_defect"
                        logger.info("A whole pass over the data found no defective image; stopping.")
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
        self.save_checkpoint()
        return self.state

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step on the main process (`checkpoints.write_checkpoint`) while the
        others wait, and return its directory (on every process)."""
        target = self.checkpoint_dir / f"step-{self.state.step:07d}"
        model = self.accelerator.unwrap_model(self.model)
        run_on_main_process(
            self.accelerator,
            lambda: write_checkpoint(
                self.checkpoint_dir, model, self.optimizer, self.state, directions=self.defect_directions
            ),
        )
        return target

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore the optimizer and trainer state from a checkpoint directory (the shifts are loaded with the
        adapter, see `checkpoints.resolve_checkpoint` and `PeftModel.from_pretrained(..., is_trainable=True)`)."""
        self.state, optimizer_state = read_checkpoint(checkpoint, self.accelerator.device)
        self._unreadable_log.merge(self.state.unreadable)
        self.optimizer.load_state_dict(optimizer_state)


def capped_stop_window(stop_window: int, dataset: Dataset | IterableDataset, *, seeded: bool = False) -> int:
    """Return the stop rule's window for `dataset`: `stop_window`, capped by the number of images of a finite
    (map-style) dataset, so that the data checked is at most one pass; a `seeded` window (the paper's) is not capped:
    it spans passes over a small folder, as the official code's does."""
    if seeded or isinstance(dataset, IterableDataset):
        return stop_window
    return max(1, min(stop_window, len(dataset)))


def build_sinder_model(
    base_model: nn.Module,
    layers_to_transform: Sequence[int],
    shift: Literal["additive", "log"] = "additive",
    fuse_gated_mlp: bool = False,
) -> PeftModel:
    """Wrap `base_model` in a trainable SINDER adapter with the given `shift` on the given blocks (default targets
    of its architecture), its gated MLPs fused or not (`SinderConfig.fuse_gated_mlp`; `TrainingArguments.shift` and
    `TrainingArguments.fuse_gated_mlp` give a recipe's)."""
    config = SinderConfig(layers_to_transform=list(layers_to_transform), shift=shift, fuse_gated_mlp=fuse_gated_mlp)
    return get_peft_model(base_model, config)


def compute_directions(model: nn.Module) -> list[torch.Tensor]:
    """Return the defect directions of `model`'s base weights (adapter disabled when it has one)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            return singular_defect_directions(model)
    return singular_defect_directions(model)
