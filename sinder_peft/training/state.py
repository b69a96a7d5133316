"""What a repair run has done so far, and the rule that says when it is done.

`TrainerState` is everything that evolves during training and goes into a checkpoint besides the shifts and the
optimizer (`checkpoints.py`). Its `next_stop_reason` applies the recipe's stop rule: at `max_steps`, or once
`stop_skip_ratio` of the last `stop_window` images had no defective layer; with a *seeded* window (the paper's, as
the official code's history of 1,000 entries starts full of "had a defect"), the images not seen yet count as
defective, so the run checks at least `stop_skip_ratio · stop_window` images.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
        stop_reason: why training ended ("max_steps", "skip_ratio", "no_defect": a whole pass without a defective
            image, "data": a pass without a usable image, "interrupted"), or None; a repair that finds nothing to
            repair before training records "nothing_to_repair".
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

    def record_batch(self, images: int, skipped: int, stop_window: int) -> None:
        """Add one step's image counts (over all processes) to the totals and to the recent window of the stop rule,
        which keeps the latest batches holding at least `stop_window` images."""
        self.images_seen += images
        self.images_skipped += skipped
        self.batches_in_epoch += 1
        self.recent.append((images, skipped))
        while self.recent and sum(count for count, _ in self.recent[1:]) >= stop_window:
            self.recent.pop(0)

    def record_defective_layers(self, counts: list[float]) -> None:
        """Add how many images had each layer as their defective layer (`counts[layer]`, over all processes)."""
        for layer, count in enumerate(counts):
            if count > 0:
                key = str(layer)
                self.defective_layers[key] = self.defective_layers.get(key, 0) + int(count)

    def next_stop_reason(
        self, *, interrupted: bool, max_steps: int, stop_window: int, stop_skip_ratio: float, seeded: bool = False
    ) -> str | None:
        """Return why training must stop now ("interrupted", "max_steps", "skip_ratio"), or None to go on.

        The skip ratio is taken over the last `stop_window` images; before that many were seen, an unseeded window
        does not stop, and a `seeded` one counts the missing images as defective (the official code's rule)."""
        if interrupted:
            return "interrupted"
        if self.step >= max_steps:
            return "max_steps"
        ratio, images = self.recent_skip_ratio()
        if seeded:
            skipped = sum(skipped for _, skipped in self.recent)
            if skipped >= stop_skip_ratio * stop_window:
                return "skip_ratio"
        elif images >= stop_window and ratio >= stop_skip_ratio:
            return "skip_ratio"
        return None
