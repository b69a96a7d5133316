"""Ctrl-C and SIGTERM during a repair: finish the step, save a checkpoint, stop."""

from __future__ import annotations

import logging
import signal
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

HANDLED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class InterruptionHandler:
    """A context manager that turns the first SIGINT or SIGTERM into a request to stop (`requested`), so that the
    trainer finishes its step, saves a checkpoint and returns; a second SIGINT raises `KeyboardInterrupt` at once.
    The previous handlers are put back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> InterruptionHandler:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED_SIGNALS}
        return self

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("Received %s: saving a checkpoint after this step.", signal.Signals(signum).name)
        self.requested = True
