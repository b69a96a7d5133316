"""The repair job: `accelerate launch examples/repair.py` / `sinder repair`.

Loads a ViT (any supported family) and images, measures its defects, adapts the blocks that can train, runs
`SinderTrainer`, and writes the output directory:

    model/        the merged, repaired model (plain transformers weights) with its README.md model card
    adapter/      the PEFT adapter (singular-value shifts only)
    report.json   defect statistics before/after, training numbers
    figures/      before/after norm and PCA maps, per-layer norm plots
    checkpoints/  the last training checkpoint (for --resume)

report.json's `"outcome"` says what the run did: `repaired` (no high-norm defect left on the report images),
`partial` (fewer, some left), `not_repaired` (none removed) or `nothing_to_repair` (no block of the model makes a
high-norm token on the selection sample). Only `repaired` and `partial` write `model/` and `adapter/`; the exit
status tells the outcomes apart (`repair_report.OUTCOME_EXIT_CODES`).

Every input is checked before anything is written: a bad model, an empty or unreadable data folder or too-small
images fail with a clear message and leave no output directory behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import HfArgumentParser

from ..models.hub import HubUploadError
from ..models.loading import DEMO_MODEL_NAME, ModelNotAvailableError
from ..training.arguments import TrainingArguments
from ..training.distributed import FailedOnAnotherProcess, run_on_every_process, run_on_main_process
from ..training.state import TrainerState
from ..training.trainer import SinderTrainer
from .repair_arguments import DEFAULT_RESOLUTION, DEMO_RESOLUTION, DEMO_STOP_WINDOW, RepairArguments
from .repair_export import export_repair
from .repair_report import OUTCOME_EXIT_CODES, summary_text
from .repair_setup import prepare_repair

logger = logging.getLogger(__name__)


@dataclass
class RepairResult:
    """What a repair run produced.

    Attributes:
        output_dir: the run's output directory.
        report: the content of report.json.
        state: the trainer's final state.
    """

    output_dir: Path
    report: dict[str, Any]
    state: TrainerState


def _check_output_dir(args: RepairArguments) -> Path:
    """Return the output directory, refusing a non-empty one unless resuming into it or `overwrite` is set."""
    output_dir = Path(args.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {str(output_dir)!r} is a file.")
    busy = output_dir.is_dir() and any(output_dir.iterdir())
    resuming_here = args.resume is not None and Path(args.resume).expanduser().resolve().is_relative_to(
        output_dir.resolve()
    )
    if busy and not (args.overwrite or resuming_here):
        raise FileExistsError(
            f"--output-dir {str(output_dir)!r} is not empty; pass --overwrite, choose another directory, or "
            f"--resume {str(output_dir)!r} to continue that run."
        )
    return output_dir


def repair(
    args: RepairArguments,
    training: TrainingArguments | None = None,
    *,
    callbacks: Sequence[Callable[[TrainerState], None]] = (),
) -> RepairResult:
    """Run a whole repair (see the module docstring) and return what it produced.

    With several processes, a failure on any one of them (bad input, an image batch that cannot be read, a full
    disk while exporting, a refused upload) ends every process within seconds: the process that failed raises its
    error, the others raise `FailedOnAnotherProcess` (see `distributed.py`).

    Args:
        args: the run's inputs and outputs.
        training: the hyperparameters; None takes the paper's. A `stop_window` of None becomes 1000, or 6 on the
            bundled demo images.
        callbacks: passed to `SinderTrainer` (called with the state after every step).

    Raises:
        FileExistsError, FileNotFoundError, ValueError, ModelNotAvailableError: bad inputs, before anything is
            written.
        HubUploadError: the upload to the Hub failed (the outputs are written).
        FailedOnAnotherProcess: another process failed.
    """
    training = training or TrainingArguments()
    if training.stop_window is None and args.data is None:
        training = replace(training, stop_window=DEMO_STOP_WINDOW)
    output_dir = _check_output_dir(args)
    requested_resolution = args.resolution or (
        DEMO_RESOLUTION if args.model == DEMO_MODEL_NAME else DEFAULT_RESOLUTION
    )
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_dir=str(output_dir) if args.report_to else None,
    )
    try:
        setup = run_on_every_process(
            accelerator, lambda: prepare_repair(args, training, accelerator, requested_resolution)
        )
        model = setup.model
        if model is None:
            state = TrainerState(stop_reason="nothing_to_repair")
        else:
            if args.report_to:
                accelerator.init_trackers(
                    "sinder-repair",
                    config={
                        **asdict(training),
                        "model": args.model,
                        "layers": str(model.peft_config["default"].layers_to_transform),
                    },
                )
            trainer = SinderTrainer(
                model,
                setup.directions,
                training,
                accelerator,
                output_dir / "checkpoints",
                callbacks=callbacks,
                unreadable=[image.name for image in setup.selection.unreadable],
            )
            if setup.checkpoint is not None:
                trainer.load_checkpoint(setup.checkpoint)
                logger.info("Resuming from %s at step %d.", setup.checkpoint, trainer.state.step)
            state = trainer.train(setup.dataset)
        report: dict[str, Any] = {}
        if state.stop_reason != "interrupted":
            exported = run_on_main_process(
                accelerator,
                lambda: export_repair(
                    args,
                    training,
                    output_dir,
                    setup,
                    state=state,
                    processes=accelerator.num_processes,
                    requested_resolution=requested_resolution,
                ),
            )
            report = exported or {}
    finally:
        accelerator.end_training()  # closes the trackers and, with several processes, the process group
    return RepairResult(output_dir=output_dir, report=report, state=state)


def build_argument_parser(**kwargs: Any) -> HfArgumentParser:
    """Return the parser of the repair flags: one per field of `RepairArguments` and `TrainingArguments`."""
    return HfArgumentParser((RepairArguments, TrainingArguments), **kwargs)


def arguments_from_namespace(namespace: argparse.Namespace) -> tuple[RepairArguments, TrainingArguments]:
    """Return the `RepairArguments` and `TrainingArguments` of parsed flags (the namespace may hold other entries,
    such as the subcommand's)."""
    return tuple(
        kind(**{item.name: getattr(namespace, item.name) for item in fields(kind) if item.init})
        for kind in (RepairArguments, TrainingArguments)
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `repair` subcommand on `subparsers` and return its parser (handler: `run`)."""
    parser = subparsers.add_parser(
        "repair",
        parents=[build_argument_parser(add_help=False)],
        help="repair the singular defects of a ViT",
        description="Repair the singular defects of a ViT (SINDER) and write a standard, merged model.",
    )
    parser.set_defaults(handler=run)
    return parser


def run(namespace: argparse.Namespace) -> int:
    """Run a repair from parsed flags and print where the outputs are and the before/after numbers.

    Returns the exit code: the outcome's (`repair_report.OUTCOME_EXIT_CODES`: 0 repaired or nothing to repair, 3
    partly repaired, 4 not repaired), 1 (with a one-line message and no traceback) for inputs the user can fix and a
    failed upload, 1 without a message on the processes that stop because another one failed (that one shows the
    error), 130 when interrupted (a checkpoint was saved).
    """
    try:
        result = repair(*arguments_from_namespace(namespace))
    except FailedOnAnotherProcess:
        return 1
    except (
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
        ModelNotAvailableError,
        ImportError,
        HubUploadError,
    ) as error:
        print(f"sinder repair: error: {error}", file=sys.stderr)
        return 1
    state = result.state
    if state.stop_reason == "interrupted":
        print(
            f"Interrupted at step {state.step}; checkpoint saved. Continue with: --resume {result.output_dir}",
            file=sys.stderr,
        )
        return 130
    if not result.report:
        return 0
    print(summary_text(result.report, result.output_dir))
    return OUTCOME_EXIT_CODES[result.report["outcome"]]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `examples/repair.py` (run it with `accelerate launch` or plain `python`)."""
    parser = build_argument_parser(prog="repair.py", description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
