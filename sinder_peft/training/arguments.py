"""The training hyperparameters of a repair: one dataclass, `TrainingArguments`, from which `HfArgumentParser`
builds the command line, and the recipes' defaults (docs/method.md §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..analysis.detection import (
    DIRECTION_SOURCE_HELP,
    DIRECTION_SOURCES,
    HIGH_NORM_FACTOR,
    RECIPE_NORM_GAPS,
    RECIPES,
    DefectTest,
    DirectionSource,
    Recipe,
)
from .window_loss import WindowSettings

DEFAULT_STOP_WINDOW = 1000
PAPER_LR = 0.005
"""The paper's learning rate (SGD, momentum 0.9)."""
PRESERVE_LR = 0.001
"""The `preserve` recipe's learning rate: at the paper's 0.005 one step of log-scale shifts overshot on a trained
ViT-S/14 whose defect comes from a planted sparse unit (clean-token cosine 0.92 to the model without the unit, 0.997 at
0.001), and at 0.001 every planted model of docs/method.md §7 and §9 is still repaired, in 1-25 steps."""
PAPER_STOP_SKIP_RATIO = 0.75
"""The paper's stop rule: stop once 75 % of the last `stop_window` images had no defect, the window seeded with
images that had one (as the official code's history is), so never before 0.75 · `stop_window` images."""
PRESERVE_STOP_SKIP_RATIO = 1.0
"""The `preserve` recipe's stop rule: stop once none of the last `stop_window` images (at most one pass over a
finite dataset) had a defect: a run ends when the data it checks no longer shows any (docs/method.md §4)."""


@dataclass
class TrainingArguments:
    """Hyperparameters of the repair loop; defaults are the `preserve` recipe's, `recipe="paper"` gives the paper's
    (docs/method.md §4, §7). Each field is also a
    command-line flag of `sinder repair` (`transformers.HfArgumentParser` builds them from the fields)."""

    recipe: Recipe = field(
        default="preserve",
        metadata={
            "help": "preserve (the default): log-scale shifts S * exp(delta), a defect test that needs a high-norm "
            f"defect token (>= {HIGH_NORM_FACTOR:g}x the median norm, added by the blocks), lr {PRESERVE_LR}, "
            "and a stop once the data checked shows no defect: it removes the defect without moving clean tokens "
            "where the paper's recipe moves them (docs/method.md §7, §9); paper: the paper's exact recipe, "
            f"additive singular-value shifts at lr {PAPER_LR}, the cosine test alone, the official stop rule."
        },
    )
    directions: DirectionSource = field(
        default="auto",
        metadata={"help": DIRECTION_SOURCE_HELP + " Chosen once, on the selection images of the base model."},
    )
    gated_mlp: Literal["fused", "split"] = field(
        default="fused",
        metadata={
            "help": "How the adapter treats a gated MLP's gate and up projections (DINOv2 with SwiGLU, DINOv3's gated "
            "MLP): fused, one SVD of [W_gate; W_up] and one shift vector, as the official code adapts DINOv2's w12; "
            "split, two SVDs and two shift vectors (docs/method.md §10)."
        },
    )
    lr: float | None = field(
        default=None,
        metadata={
            "help": f"SGD learning rate (default: the recipe's, {PRESERVE_LR} for preserve, {PAPER_LR} for paper)."
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    max_steps: int = field(
        default=30_000, metadata={"help": "Stop after this many optimizer steps (batches with a defective image)."}
    )
    mask_thr: float = field(
        default=4.0, metadata={"help": "Outlier threshold k of the defect-token test (mean + k std of |cos|)."}
    )
    kernel: int = field(
        default=3,
        metadata={"help": "Neighbourhood window of the loss; the border ring of width kernel // 2 is never flagged."},
    )
    limit_layers: int = field(
        default=10, metadata={"help": "Blocks, ending at an image's defective layer, that receive its gradient."}
    )
    skip_less_than: int = field(
        default=3, metadata={"help": "A layer is defective for an image from this many flagged tokens on."}
    )
    norm_gap: float | None = field(
        default=None,
        metadata={
            "help": "A layer is defective only if a flagged token is also a high-norm defect token at this many times "
            "the median token norm, that much added by the blocks since the embedding (default: none for the paper "
            "recipe, "
            f"{RECIPE_NORM_GAPS['preserve']:g} for preserve)."
        },
    )
    stop_skip_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Stop once this share of the last --stop-window images had no defect (default: "
            f"{PRESERVE_STOP_SKIP_RATIO:g} for preserve, {PAPER_STOP_SKIP_RATIO:g} for paper)."
        },
    )
    stop_window: int | None = field(
        default=None,
        metadata={
            "help": f"Recent images the stop rule looks at (default: {DEFAULT_STOP_WINDOW}, at most one pass over a "
            "folder for preserve; 6 for the demo)."
        },
    )
    temperature: float = field(default=0.1, metadata={"help": "Affinity temperature of the neighbourhood weights."})
    preserve_weight: float = field(
        default=0.0, metadata={"help": "Weight of the clean-token preservation term (0: the paper's loss alone)."}
    )
    batch_size: int = field(default=1, metadata={"help": "Images per process and step."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order."})
    save_every: int = field(
        default=500, metadata={"help": "Checkpoint every this many steps (0: only at the end and on interruption)."}
    )
    num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes per training process."})

    def __post_init__(self) -> None:
        checks = {
            "recipe": self.recipe in RECIPES,
            "directions": self.directions in DIRECTION_SOURCES,
            "gated_mlp": self.gated_mlp in ("fused", "split"),
            "lr": self.lr is None or self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "max_steps": self.max_steps >= 1,
            "mask_thr": self.mask_thr > 0,
            "kernel": self.kernel in (3, 5),
            "limit_layers": self.limit_layers >= 1,
            "skip_less_than": self.skip_less_than >= 1,
            "norm_gap": self.norm_gap is None or self.norm_gap > 0,
            "stop_skip_ratio": self.stop_skip_ratio is None or 0 < self.stop_skip_ratio <= 1,
            "stop_window": self.stop_window is None or self.stop_window >= 1,
            "temperature": self.temperature > 0,
            "preserve_weight": self.preserve_weight >= 0,
            "batch_size": self.batch_size >= 1,
            "save_every": self.save_every >= 0,
            "num_workers": self.num_workers >= 0,
        }
        invalid = [f"{name}={getattr(self, name)!r}" for name, valid in checks.items() if not valid]
        if invalid:
            raise ValueError(f"Invalid training arguments: {', '.join(invalid)}.")

    @property
    def shift(self) -> Literal["additive", "log"]:
        """The adapter's shift (`SinderConfig.shift`) for the recipe."""
        return "log" if self.recipe == "preserve" else "additive"

    @property
    def fuse_gated_mlp(self) -> bool:
        """Whether the adapter adapts a gated MLP's gate and up projections as one target
        (`SinderConfig.fuse_gated_mlp`), as `gated_mlp` says: both recipes fuse them by default. `paper` must, as the
        official code adapts the original DINOv2's fused `w12` layer with one SVD and one shift vector; for `preserve`
        split and fused repaired nine SwiGLU planted models alike (same steps, ratio and clean cosine within 1e-3),
        and fused holds half the gated MLP's shifts (docs/method.md §10)."""
        return self.gated_mlp == "fused"

    @property
    def defect_test(self) -> DefectTest:
        """The recipe's defect test (`DefectTest.for_recipe`), with `mask_thr`, `skip_less_than`, `kernel` and
        `norm_gap`: the one test of the selection sample, the training step, the stop rule and the report."""
        return DefectTest.for_recipe(
            self.recipe,
            mask_thr=self.mask_thr,
            min_tokens=self.skip_less_than,
            kernel=self.kernel,
            norm_gap=self.norm_gap,
        )

    @property
    def window_settings(self) -> WindowSettings:
        """The settings of the defect test and the loss."""
        return WindowSettings(
            test=self.defect_test,
            kernel=self.kernel,
            limit_layers=self.limit_layers,
            temperature=self.temperature,
            preserve_weight=self.preserve_weight,
        )

    @property
    def resolved_stop_skip_ratio(self) -> float:
        """`stop_skip_ratio`, or the recipe's: `PRESERVE_STOP_SKIP_RATIO` or `PAPER_STOP_SKIP_RATIO`."""
        if self.stop_skip_ratio is not None:
            return self.stop_skip_ratio
        return PRESERVE_STOP_SKIP_RATIO if self.recipe == "preserve" else PAPER_STOP_SKIP_RATIO

    @property
    def stop_window_seeded(self) -> bool:
        """Whether the stop rule's window starts full of images that had a defect, as the official code's history
        does (`paper`): the run then checks at least 0.75 · `stop_window` images, across passes over a small folder.
        `preserve` starts it empty and caps it at one pass over a finite dataset (`capped_stop_window`)."""
        return self.recipe == "paper"

    @property
    def resolved_lr(self) -> float:
        """`lr`, or the recipe's: `PAPER_LR` for `paper`, `PRESERVE_LR` for `preserve`."""
        if self.lr is not None:
            return self.lr
        return PRESERVE_LR if self.recipe == "preserve" else PAPER_LR

    @property
    def resolved_stop_window(self) -> int:
        """`stop_window`, or the paper's 1000 when it is None."""
        return self.stop_window if self.stop_window is not None else DEFAULT_STOP_WINDOW
