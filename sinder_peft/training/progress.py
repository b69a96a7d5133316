"""What a repair shows while it trains: the progress bar (main process) and the per-step numbers sent to the
Accelerate trackers (`--report-to`)."""

from __future__ import annotations

import math
from types import TracebackType

from accelerate import Accelerator
from tqdm.auto import tqdm

from .state import TrainerState


class TrainingProgress:
    """The progress bar of `SinderTrainer.train` and its tracker logging; use it as a context manager.

    The bar counts steps without a total: the run ends by its stop rule once the images it checks show no defect,
    usually long before `--max-steps`, so a total (and an ETA) taken from `--max-steps` would be false. The
    description names that cap; the postfix shows the last loss, the most frequent defective layer, how many images
    the stop rule has checked of its window (`checked`) and the share of them without defect (`clean`), so that a
    long stretch without a defective image, where no step is taken, still moves.

    Args:
        accelerator: the run's `Accelerator` (the bar shows on the main process only; `log` goes to its trackers).
        max_steps: the cap on steps, named in the bar's description.
        initial_step: the step the run starts from (a resumed run's).
    """

    def __init__(self, accelerator: Accelerator, max_steps: int, initial_step: int) -> None:
        self.accelerator = accelerator
        self.bar = tqdm(
            total=None,
            initial=initial_step,
            desc=f"SINDER repair (until no defect, at most {max_steps} steps)",
            unit="step",
            disable=not accelerator.is_main_process,
        )

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.bar.close()

    def report(self, state: TrainerState, result: dict[str, float], stop_window: int) -> None:
        """Show one step's numbers (`SinderTrainer.training_step`'s result) and log them to the trackers."""
        ratio, window_images = state.recent_skip_ratio()
        if result["defective"] > 0:
            self.bar.update(state.step - self.bar.n)
        layers = state.defective_layers
        latest_layer = max(layers, key=lambda key: layers[key]) if layers else "-"
        self.bar.set_postfix(
            loss=f"{state.last_loss:.4f}" if state.last_loss is not None else "-",
            layer=latest_layer,
            checked=f"{min(window_images, stop_window)}/{stop_window}",
            clean=f"{ratio:.2f}",
            images=state.images_seen,
        )
        if result["defective"] > 0 and not math.isnan(result["loss"]):
            self.accelerator.log(
                {"loss": result["loss"], "skip_ratio": ratio, "images_seen": state.images_seen}, step=state.step
            )
