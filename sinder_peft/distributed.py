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

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator

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
