"""The settings of `sinder evaluate`: one dataclass, `EvaluationArguments`, from which `HfArgumentParser` builds the
command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..analysis.detection import DIRECTION_SOURCE_HELP, RECIPE_HELP, DefectTest, DirectionSource, Recipe
from ..models.other_libraries import ModelKwargsArguments
from .depth_data import DepthCrop
from .depth_probe import DINOV2_DEPTH_BINS, BinSpacing, DepthHead
from .probes import DINOV2_KNN_KS, DINOV2_KNN_TEMPERATURE

UnsupervisedProtocol = Literal["kmeans", "cause"]
"""`kmeans`: spherical k-means on the patch tokens (no training); `cause`: CAUSE, the SINDER paper's protocol."""

DIRECTION_SAMPLE_IMAGES = 16
"""The defect images on which each model's directions are chosen (`--directions`), the first ones of the data."""


@dataclass
class EvaluationArguments(ModelKwargsArguments):
    """The settings of an evaluation; each field is also a command-line flag (`--knn-data`, …; `--model-kwargs`
    from `ModelKwargsArguments`, applied to the timm models among those evaluated)."""

    output_dir: str = field(metadata={"help": "where to write evaluation.json, evaluation.md, the figures and cache/"})
    knn_data: str | None = field(
        default=None,
        metadata={
            "help": "kNN data: a folder train/<class>/… and val/<class>/…, or a 🤗 dataset with image and label "
            "columns (e.g. imagenet-1k)"
        },
    )
    seg_data: str | None = field(
        default=None,
        metadata={
            "help": "segmentation data: a folder train|val/images and train|val/masks (PNG class indices, 255 "
            "ignored, same stems), or a 🤗 dataset in the scene_parse_150 (ADE20k) layout"
        },
    )
    depth_data: str | None = field(
        default=None,
        metadata={
            "help": "depth data: a folder train|val/images and train|val/depth (<stem>.png, 16-bit, millimetres, or "
            "<stem>.npy, metres), or a 🤗 dataset with image and depth columns (e.g. NYU Depth v2)"
        },
    )
    unsupervised_data: str | None = field(
        default=None,
        metadata={
            "help": "unsupervised segmentation data (its validation split, in the --seg-data layouts; a folder needs "
            "only val/images and val/masks); default: the validation split of --seg-data"
        },
    )
    defect_data: str | None = field(
        default=None,
        metadata={
            "help": "images for the defect figures (a folder or a 🤗 dataset); default: the validation images of "
            "--seg-data, else of --knn-data"
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where features are cached (safetensors); default: OUTPUT_DIR/cache"}
    )
    batch_size: int = field(default=32, metadata={"help": "images per forward pass and process"})
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes per process (0: none)"})
    device: str | None = field(
        default=None, metadata={"help": "device of a single-process run (default: cuda if available, else cpu)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the subsampling and of the linear probe"})
    train_split: str = field(default="train", metadata={"help": "training split of 🤗 datasets"})
    val_split: str = field(default="validation", metadata={"help": "validation split of 🤗 datasets"})
    image_column: str = field(default="image", metadata={"help": "image column of 🤗 datasets"})
    label_column: str = field(default="label", metadata={"help": "class column of a 🤗 kNN dataset"})
    annotation_column: str = field(default="annotation", metadata={"help": "mask column of a 🤗 segmentation dataset"})
    knn_resolution: int = field(
        default=224, metadata={"help": "kNN images: short side resized to this, then the centre square (pixels)"}
    )
    knn_k: list[int] = field(
        default_factory=lambda: list(DINOV2_KNN_KS), metadata={"help": "numbers of neighbours to report"}
    )
    knn_headline_k: int = field(default=20, metadata={"help": "the k of the headline top-1 (one of --knn-k)"})
    knn_temperature: float = field(
        default=DINOV2_KNN_TEMPERATURE, metadata={"help": "T of the neighbour weight exp(similarity / T)"}
    )
    knn_max_train: int | None = field(
        default=None, metadata={"help": "use at most this many training images (random, seeded)"}
    )
    knn_max_val: int | None = field(
        default=None, metadata={"help": "use at most this many validation images (random, seeded)"}
    )
    seg_resolution: int = field(
        default=224,
        metadata={
            "help": "segmentation images: short side resized to this, then the centre square (448 or 518 for finer "
            "masks, at 4-5x the cost)"
        },
    )
    seg_epochs: int = field(default=10, metadata={"help": "linear probe: passes over the training images"})
    seg_lr: float = field(default=1e-3, metadata={"help": "linear probe: AdamW learning rate (cosine to 0)"})
    seg_weight_decay: float = field(default=1e-4, metadata={"help": "linear probe: AdamW weight decay"})
    seg_batch_size: int = field(default=16, metadata={"help": "linear probe: images per optimizer step"})
    seg_num_classes: int | None = field(
        default=None, metadata={"help": "number of classes (default: the largest label in the masks + 1)"}
    )
    seg_reduce_zero_label: bool | None = field(
        default=None,
        metadata={
            "help": "ignore label 0 and shift the others down by one (true/false; default: true for a 🤗 "
            "dataset, the ADE20k layout, false for a folder)"
        },
    )
    seg_max_train: int | None = field(
        default=None, metadata={"help": "use at most this many training images (random, seeded)"}
    )
    seg_max_val: int | None = field(
        default=None, metadata={"help": "use at most this many validation images (random, seeded)"}
    )
    depth_column: str = field(default="depth_map", metadata={"help": "depth column of a 🤗 depth dataset"})
    depth_resolution: int = field(
        default=480,
        metadata={
            "help": "depth images: short side resized to this, then the centre square (480: NYUd maps are scored "
            "at their own resolution, unresampled)"
        },
    )
    depth_min: float = field(default=1e-3, metadata={"help": "depth probe: smallest depth (m), bins and valid pixels"})
    depth_max: float = field(
        default=10.0, metadata={"help": "depth probe: largest depth (m; 10 for NYUd, 80 for KITTI)"}
    )
    depth_head: DepthHead = field(
        default="linear",
        metadata={
            "help": "depth probe: linear (depth an affine function of the features), log (log depth one) or bins "
            "(DINOv2's classification over --depth-bins bins)"
        },
    )
    depth_bins: int = field(default=DINOV2_DEPTH_BINS, metadata={"help": "depth probe, bins head: number of bins"})
    depth_bin_spacing: BinSpacing = field(
        default="uniform", metadata={"help": "depth probe, bins head: uniform in depth (DINOv2) or in log depth"}
    )
    depth_crop: DepthCrop = field(
        default="auto",
        metadata={"help": "score only the Eigen crop of NYUd maps (auto: for 640x480 maps; eigen; none)"},
    )
    depth_epochs: int = field(default=10, metadata={"help": "depth probe: passes over the training images"})
    depth_lr: float = field(default=1e-2, metadata={"help": "depth probe: AdamW learning rate (cosine to 0)"})
    depth_weight_decay: float = field(default=1e-4, metadata={"help": "depth probe: AdamW weight decay"})
    depth_batch_size: int = field(default=16, metadata={"help": "depth probe: images per optimizer step"})
    depth_max_train: int | None = field(
        default=None, metadata={"help": "use at most this many depth training images (random, seeded)"}
    )
    depth_max_val: int | None = field(
        default=None, metadata={"help": "use at most this many depth validation images (random, seeded)"}
    )
    depth_figure_images: int = field(default=4, metadata={"help": "rows of depth_maps.png (0: no figure)"})
    unsupervised: bool = field(
        default=True,
        metadata={
            "help": "run the unsupervised segmentation on the validation split of --seg-data (when no "
            "--unsupervised-data is given)"
        },
    )
    unsupervised_protocol: UnsupervisedProtocol = field(
        default="kmeans",
        metadata={
            "help": "unsupervised segmentation: kmeans (spherical k-means on the validation patch tokens, no "
            "training) or cause (the SINDER paper's protocol: CAUSE's clusterbook, head and cluster probe fitted on "
            "the training images, masks unread; slower)"
        },
    )
    unsupervised_resolution: int | None = field(
        default=None,
        metadata={
            "help": "unsupervised segmentation: short side resized to this, then the centre square (default: "
            "--seg-resolution, so the segmentation probe's validation features are reused)"
        },
    )
    unsupervised_clusters: int | None = field(
        default=None,
        metadata={"help": "k-means clusters or CAUSE centroids (default: the number of classes in the masks)"},
    )
    unsupervised_max_tokens: int = field(
        default=100_000, metadata={"help": "k-means is fitted on at most this many patch tokens (random, seeded)"}
    )
    unsupervised_restarts: int = field(default=3, metadata={"help": "k-means runs; the best is kept"})
    unsupervised_reduce_zero_label: bool | None = field(
        default=None,
        metadata={"help": "as --seg-reduce-zero-label, for --unsupervised-data"},
    )
    unsupervised_max_val: int | None = field(
        default=None, metadata={"help": "use at most this many images of --unsupervised-data (random, seeded)"}
    )
    unsupervised_max_train: int | None = field(
        default=None,
        metadata={"help": "cause: fit on at most this many training images (random, seeded)"},
    )
    cause_concepts: int = field(default=2048, metadata={"help": "cause: concepts of the clusterbook"})
    cause_clusterbook_epochs: int = field(default=1, metadata={"help": "cause: passes of the clusterbook's fit"})
    cause_head_epochs: int = field(default=2, metadata={"help": "cause: passes of the head's contrastive training"})
    cause_probe_epochs: int = field(default=5, metadata={"help": "cause: passes of the cluster probe's fit"})
    cause_batch_size: int = field(default=16, metadata={"help": "cause: images per step (in-batch contrast)"})
    cause_lr: float = field(default=1e-3, metadata={"help": "cause: Adam learning rate of every fit"})
    cause_weight_decay: float = field(
        default=1e-4, metadata={"help": "cause: Adam weight decay of the head (CAUSE: 0 for Cityscapes)"}
    )
    cause_max_grad_norm: float = field(
        default=2.0, metadata={"help": "cause: gradient-norm clip of the head (CAUSE: 1 for Cityscapes)"}
    )
    cause_crf: bool = field(
        default=True,
        metadata={"help": "cause: refine the cluster maps with CAUSE's dense CRF (needs pip install pydensecrf2)"},
    )
    cause_crf_processes: int | None = field(
        default=None,
        metadata={"help": "cause: processes that run the dense CRF (default: one per CPU core; 0: this process)"},
    )
    cause_mirror: bool = field(
        default=True,
        metadata={"help": "cause: average the head's features of each validation image and its mirror image"},
    )
    defect_resolution: int = field(
        default=518, metadata={"help": "defect figures: short side resized to this, then the centre square"}
    )
    defect_max_images: int = field(
        default=16, metadata={"help": "defect figures: at most this many images, spread over the data (0: none)"}
    )
    defect_split: str = field(default="validation", metadata={"help": "split of a 🤗 --defect-data"})
    mask_thr: float = field(default=4.0, metadata={"help": "defect-token outlier threshold k (standard deviations)"})
    min_tokens: int = field(default=3, metadata={"help": "flagged tokens from which a layer counts as defective"})
    directions: DirectionSource = field(
        default="auto",
        metadata={
            "help": DIRECTION_SOURCE_HELP + f" Chosen per model on its first {DIRECTION_SAMPLE_IMAGES} defect images."
        },
    )
    recipe: Recipe = field(default="preserve", metadata={"help": RECIPE_HELP})
    norm_map_images: int = field(default=4, metadata={"help": "rows of norm_maps.png"})

    @property
    def defect_test(self) -> DefectTest:
        """The defect test of the defect section: the recipe's, with `mask_thr` and `min_tokens`."""
        return DefectTest.for_recipe(self.recipe, mask_thr=self.mask_thr, min_tokens=self.min_tokens)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knn_headline_k not in self.knn_k:
            raise ValueError(f"--knn-headline-k {self.knn_headline_k} must be one of --knn-k {self.knn_k}.")
        positive = (
            "batch_size",
            "knn_resolution",
            "seg_resolution",
            "defect_resolution",
            "seg_epochs",
            "depth_resolution",
            "depth_bins",
            "depth_epochs",
            "depth_batch_size",
            "unsupervised_max_tokens",
            "unsupervised_restarts",
            "cause_clusterbook_epochs",
            "cause_head_epochs",
            "cause_probe_epochs",
            "cause_batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.cause_concepts < 2:
            raise ValueError(f"--cause-concepts must be at least 2, got {self.cause_concepts}.")
        if self.cause_lr <= 0 or self.cause_weight_decay < 0 or self.cause_max_grad_norm <= 0:
            raise ValueError(
                f"Need --cause-lr > 0, --cause-weight-decay ≥ 0 and --cause-max-grad-norm > 0, got {self.cause_lr}, "
                f"{self.cause_weight_decay} and {self.cause_max_grad_norm}."
            )
        if self.cause_crf_processes is not None and self.cause_crf_processes < 0:
            raise ValueError(f"--cause-crf-processes must be 0 or more, got {self.cause_crf_processes}.")
        for name in ("unsupervised_resolution", "unsupervised_clusters", "unsupervised_max_train"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}.")
        if not 0 < self.depth_min < self.depth_max:
            raise ValueError(f"Need 0 < --depth-min < --depth-max, got {self.depth_min} and {self.depth_max}.")
