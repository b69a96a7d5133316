"""Ending every process of a run when one of them fails.

Processes of a run meet in collective calls (the gradient all-reduce, barriers). A process that raises between two
of them never reaches the next one, and the others wait there until the process-group timeout (30 minutes by
default). So every stretch of work that may fail on one process only (the main process's export or upload, a batch
that cannot be read, a step that runs out of memory) ends in `agree_on_failure`: a collective every process calls,
with or without an error, after which the failing process raises its error and every other process raises
`FailedOnAnotherProcess`. The error is thus shown once, by the process that had it, and every process exits within
seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..images.batching import ImageBatch

_Result = TypeVar("_Result")


class FailedOnAnotherProcess(RuntimeError):
    """Another process of the run failed; that process shows the error."""


def agree_on_failure(accelerator: Accelerator, error: BaseException | None) -> None:
    """Tell every process whether some process failed; a collective call every process must make.

    Returns when no process failed. Otherwise raises `error` on each process that had one and
    `FailedOnAnotherProcess` on the others.
    """
    failures = torch.tensor([float(error is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        failures = accelerator.reduce(failures, reduction="sum")
    raise_if_failed(error, int(failures.item()))


def raise_if_failed(error: BaseException | None, failures: int) -> None:
    """Raise `error` if this process had one, else `FailedOnAnotherProcess` if `failures` (the number of failed
    processes, summed in a collective that carried each process's failure flag) is positive; else return.

    For collectives that carry a failure flag along with their own data, so that no extra call is needed.
    """
    if error is not None:
        raise error
    if failures > 0:
        raise FailedOnAnotherProcess(f"{failures} other process(es) of this run failed; their error is shown above.")


def main_process_value(accelerator: Accelerator, value: _Result) -> _Result:
    """Return the main process's `value` on every process (`accelerate.utils.broadcast_object_list`); a collective
    every process must make. Used for what must be identical everywhere although each process computed it, such as
    the defect directions of a repair."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def run_on_main_process(accelerator: Accelerator, function: Callable[[], _Result]) -> _Result | None:
    """Run `function` on the main process while the others wait, then `agree_on_failure`.

    Returns what `function` returned on the main process, None on the others.
    """
    result: _Result | None = None
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            result = function()
        except Exception as caught:
            error = caught
    agree_on_failure(accelerator, error)
    return result


def run_on_every_process(accelerator: Accelerator, function: Callable[[], _Result]) -> _Result:
    """Run `function` on every process, then `agree_on_failure`, and return its result."""
    result: _Result | None = None
    error: Exception | None = None
    try:
        result = function()
    except Exception as caught:
        error = caught
    agree_on_failure(accelerator, error)
    return result  # type: ignore[return-value]


def sum_over_processes(
    accelerator: Accelerator,
    gradients: Sequence[torch.Tensor | None],
    shapes: Sequence[torch.Size],
    counters: dict[str, torch.Tensor],
) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """Sum gradients and named counters over all processes, in one `accelerator.reduce` of one flat float32 vector.

    Every process must call this with the same `shapes` (the trainable parameters) and the same counter names and
    sizes, whether or not it computed a gradient, so that the collective calls match and no process waits for one
    that has nothing to contribute.

    Args:
        gradients: per trainable parameter, this process's gradient, or None when it computed none.
        shapes: the shape of each parameter.
        counters: named 1-D float tensors (e.g. images, loss, per-layer counts).

    Returns:
        Per parameter, the summed gradient, or None when no process computed one (a block outside every gradient
        window: its momentum is then not applied, as in the original single-process code); and the summed counters
        under their names.
    """
    device = accelerator.device
    pieces, received = [], []
    for gradient, shape in zip(gradients, shapes, strict=True):
        received.append(float(gradient is not None))
        size = shape.numel()
        pieces.append(
            gradient.detach().flatten().float() if gradient is not None else torch.zeros(size, device=device)
        )
    names = list(counters)
    values = [counters[name].to(device=device, dtype=torch.float32).flatten() for name in names]
    payload = torch.cat([*pieces, torch.tensor(received, device=device), *values])
    payload = accelerator.reduce(payload, reduction="sum")
    sizes = [shape.numel() for shape in shapes]
    parts = torch.split(payload, [*sizes, len(sizes), *(value.numel() for value in values)])
    summed_gradients, got, summed_values = parts[: len(sizes)], parts[len(sizes)], parts[len(sizes) + 1 :]
    gradients_out = [
        gradient.view(shape) if flag > 0 else None
        for gradient, shape, flag in zip(summed_gradients, shapes, got.tolist(), strict=True)
    ]
    return gradients_out, dict(zip(names, summed_values, strict=True))


def blocks_needed_on_any_process(
    accelerator: Accelerator, windows: Sequence[range], num_layers: int, error: BaseException | None
) -> list[int]:
    """Return the blocks that some process's gradient `windows` cover, in one collective every process must make.

    The collective also carries this process's failure flag: when any process passes an `error`, that process raises
    it and the others raise `FailedOnAnotherProcess`.
    """
    needed = torch.zeros(num_layers + 1, device=accelerator.device)
    for window in windows:
        needed[window.start : window.stop] = 1
    needed[-1] = float(error is not None)
    needed = accelerator.reduce(needed, reduction="sum")
    raise_if_failed(error, int(needed[-1].item()))
    return [index for index, count in enumerate(needed[:-1].tolist()) if count > 0]


def next_batch_on_every_process(accelerator: Accelerator, batches: Iterator[ImageBatch]) -> ImageBatch | None:
    """Return this process's next batch of the epoch, or None when the epoch is over.

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
    flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum")
    raise_if_failed(error, int(flags[1].item()))
    return None if flags[0] > 0 else batch
