"""Speed of `sinder evaluate`: feature extraction against a plain forward loop, and the probes on cached features.

Extraction (issue goal: at least 0.9× the throughput of a plain loop). `--images` synthetic photos (`--image-size`,
JPEG) are written to a temporary folder. Timed, interleaved round by round on the same seeded random DINOv2:

* `plain`: `model(pixel_values=batch)` under `torch.inference_mode()` over the images already decoded, resized,
  cropped and normalized (`images.preprocessing.prepare_image`) and stacked into batches in memory: the model alone;
* `extract (CLS)`: `features.extract_features` on the image files, what kNN runs: decoding and preprocessing in
  DataLoader workers (`--num-workers`), the forward, the CLS and the collection of the results;
* `extract (CLS + patches)`: the same with the patch tokens kept (float16), what the segmentation probe runs.

Probes (issue goal: seconds, not minutes, for 1,000 images), on synthetic cached features of the model's width:
kNN over `--probe-images` training and as many query features (k = 10, 20, 100, 200), and the linear segmentation
probe with the default recipe of `EvaluationArguments`, trained on `--probe-images` images' patch features
(`--probe-resolution` px, `--probe-classes` classes) and scored on as many. On the same features, the linear depth
probe (default recipe and head, and the `bins` head), trained and scored on depth maps of the same size (goal: no
more per pixel than the segmentation probe), and the unsupervised segmentation (k-means and scoring, on the scored
images). With `--parts cause`, CAUSE's three fits (default recipe of `EvaluationArguments`) on the patch features of
`--cause-images` synthetic images, and the head's features of as many scored images with their mirror images:
seconds per step of each fit, per scored image.

Usage:
    python benchmarks/bench_evaluate.py --threads 1 --model-size b --output results/evaluate_vitb_cpu.json
    python benchmarks/bench_evaluate.py --quick --output /tmp/evaluate.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    add_threads_argument,
    apply_threads,
    format_table,
    get_shape,
    machine_description,
    random_dinov2,
    synchronize,
    time_interleaved,
    timed_call,
    write_json,
)
from PIL import Image

from sinder_peft.evaluation.arguments import EvaluationArguments
from sinder_peft.evaluation.cause import (
    fit_cluster_probe,
    fit_concept_clusterbook,
    head_features,
    train_concept_head,
)
from sinder_peft.evaluation.clustering import cluster_class_counts, matched_confusion, spherical_kmeans
from sinder_peft.evaluation.depth_probe import (
    DepthHead,
    depth_bin_centres,
    depth_metrics,
    evaluate_depth_probe,
    patch_log_depth_targets,
    train_linear_depth_probe,
)
from sinder_peft.evaluation.features import extract_features
from sinder_peft.evaluation.image_sources import ImageFiles, PreparedImages
from sinder_peft.evaluation.probes import (
    DINOV2_KNN_KS,
    DINOV2_KNN_TEMPERATURE,
    evaluate_segmentation_probe,
    knn_top1_accuracy,
    patch_label_counts,
    train_linear_segmentation_probe,
)
from sinder_peft.images.preprocessing import load_image, prepare_image
from sinder_peft.tuner.architectures import ImageNormalization

PATCH_SIZE = 14


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="b", help="s, b, l, g or tiny (random weights of that shape)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="images of the extraction benchmark")
    parser.add_argument("--image-size", type=int, nargs=2, default=(500, 375), help="width height of each photo")
    parser.add_argument("--resolution", type=int, default=224, help="short side after resizing (kNN default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the extraction")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe-images", type=int, default=1000)
    parser.add_argument("--probe-resolution", type=int, default=224)
    parser.add_argument("--probe-classes", type=int, default=150)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("extraction", "probes", "cause"),
        default=["extraction", "probes"],
        help="what to time",
    )
    parser.add_argument("--cause-images", type=int, default=200, help="training and scored images of --parts cause")
    parser.add_argument("--quick", action="store_true", help="tiny model, few images (for tests)")
    parser.add_argument("--output", default="evaluate.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.model_size, args.images, args.image_size, args.resolution = "tiny", 6, (80, 60), 56
        args.batch_size, args.num_workers, args.warmup, args.repeats = 4, 0, 0, 1
        args.probe_images, args.probe_resolution, args.probe_classes = 24, 56, 5
        args.cause_images = 8
    return args


def cause_fits(args: argparse.Namespace, hidden_size: int) -> dict[str, Any]:
    """Time CAUSE's three fits and the head's scoring features on synthetic patch features (`--cause-images`
    training and as many scored images of `--probe-resolution` px, float16 as cached, 21 clusters as VOC)."""
    recipe = EvaluationArguments(output_dir="unused")
    side = args.probe_resolution // PATCH_SIZE
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(21, hidden_size, generator=generator)
    labels = torch.randint(21, (2 * args.cause_images, side, side), generator=generator)
    noise = torch.randn(2 * args.cause_images, side, side, hidden_size, generator=generator)
    features = (prototypes[labels] + noise).half()
    train, scored = features[: args.cause_images], features[args.cause_images :]
    device = torch.device(args.device)
    timed: dict[str, Any] = {"images": args.cause_images, "patches": side * side}
    steps_per_epoch = -(-args.cause_images // recipe.cause_batch_size)
    codebook, seconds = timed_call(
        lambda: fit_concept_clusterbook(
            train,
            recipe.cause_concepts,
            epochs=recipe.cause_clusterbook_epochs,
            batch_size=recipe.cause_batch_size,
            lr=recipe.cause_lr,
            generator=generator,
            device=device,
            show_progress=False,
        ),
        device,
    )
    timed["clusterbook_s_per_step"] = seconds / (recipe.cause_clusterbook_epochs * steps_per_epoch)
    head, seconds = timed_call(
        lambda: train_concept_head(
            train,
            codebook,
            epochs=recipe.cause_head_epochs,
            batch_size=recipe.cause_batch_size,
            lr=recipe.cause_lr,
            weight_decay=recipe.cause_weight_decay,
            max_grad_norm=recipe.cause_max_grad_norm,
            generator=generator,
            device=device,
            show_progress=False,
        ),
        device,
    )
    timed["head_s_per_step"] = seconds / (recipe.cause_head_epochs * steps_per_epoch)
    _, seconds = timed_call(
        lambda: fit_cluster_probe(
            train,
            head,
            21,
            epochs=recipe.cause_probe_epochs,
            batch_size=recipe.cause_batch_size,
            lr=recipe.cause_lr,
            generator=generator,
            device=device,
            show_progress=False,
        ),
        device,
    )
    timed["probe_s_per_step"] = seconds / (recipe.cause_probe_epochs * steps_per_epoch)
    _, seconds = timed_call(
        lambda: head_features(head, scored, scored.flip(dims=[2]), batch_size=recipe.cause_batch_size, device=device),
        device,
    )
    timed["scoring_features_s_per_image"] = seconds / args.cause_images
    return timed


def write_photos(directory: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Write `count` JPEG photos of smooth random colour fields plus noise (JPEG decodes like a real photo)."""
    rng = np.random.default_rng(0)
    width, height = size
    rows, columns = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    paths = []
    for index in range(count):
        waves = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * rows + rng.uniform(0.5, 3) * columns)) for _ in range(3)]
        pixels = 127 + 80 * np.stack(waves, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
        path = directory / f"photo_{index:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def extraction(args: argparse.Namespace, model: torch.nn.Module, paths: list[Path]) -> dict[str, Any]:
    """Time the plain loop and both extractions over the same images; return timings and throughputs."""
    normalization = ImageNormalization()
    prepared = torch.stack(
        [prepare_image(load_image(path), args.resolution, PATCH_SIZE, normalization, square=True) for path in paths]
    ).to(args.device)
    batches = prepared.split(args.batch_size)
    dataset = PreparedImages(ImageFiles(paths), args.resolution, PATCH_SIZE, normalization)
    shape = tuple(prepared.shape[1:])

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(pixel_values=batch)

    def extract(with_patches: bool) -> None:
        extract_features(
            model,
            dataset,
            image_shape=shape,
            batch_size=args.batch_size,
            with_patches=with_patches,
            num_workers=args.num_workers,
        )

    timings = time_interleaved(
        {
            "plain": plain,
            "extract (CLS)": lambda: extract(False),
            "extract (CLS + patches)": lambda: extract(True),
        },
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
    )
    plain_rate = len(paths) / timings["plain"].median_s
    return {
        name: {
            "timing": timing,
            "images_per_s": len(paths) / timing.median_s,
            "throughput_vs_plain": len(paths) / timing.median_s / plain_rate,
        }
        for name, timing in timings.items()
    }


def probes(args: argparse.Namespace, hidden_size: int) -> dict[str, Any]:
    """Time kNN and the linear segmentation probe (default recipe) on synthetic cached features."""
    generator = torch.Generator().manual_seed(0)
    count, classes = args.probe_images, args.probe_classes
    prototypes = torch.randn(classes, hidden_size, generator=generator)
    labels = torch.randint(0, classes, (2 * count,), generator=generator)
    cls = prototypes[labels] + 2.0 * torch.randn(2 * count, hidden_size, generator=generator)
    device = args.device
    accuracy, knn_s = timed_call(
        lambda: knn_top1_accuracy(
            cls[:count],
            labels[:count],
            cls[count:],
            labels[count:],
            ks=DINOV2_KNN_KS,
            temperature=DINOV2_KNN_TEMPERATURE,
            device=device,
        ),
        device,
    )

    grid = args.probe_resolution // PATCH_SIZE
    blocks = torch.randint(0, classes, (2 * count, grid // 2 + 1, grid // 2 + 1), generator=generator)
    patch_labels = blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :grid, :grid]
    masks = patch_labels.repeat_interleave(PATCH_SIZE, dim=1).repeat_interleave(PATCH_SIZE, dim=2).to(torch.uint8)
    patches = torch.empty(2 * count, grid, grid, hidden_size, dtype=torch.float16)
    for start in range(0, 2 * count, 100):  # in chunks: float32 features of 2,000 images at 448 px would take 6 GB
        chunk = patch_labels[start : start + 100]
        noise = 2.0 * torch.randn(*chunk.shape, hidden_size, generator=generator)
        patches[start : start + 100] = (prototypes[chunk] + noise).to(torch.float16)
    recipe = EvaluationArguments(output_dir="-")

    def train_segmentation_probe() -> Any:
        return train_linear_segmentation_probe(
            patches[:count],
            patch_label_counts(masks[:count], PATCH_SIZE, classes),
            epochs=recipe.seg_epochs,
            lr=recipe.seg_lr,
            weight_decay=recipe.seg_weight_decay,
            batch_size=recipe.seg_batch_size,
            seed=recipe.seed,
            device=device,
            show_progress=False,
        )

    probe, train_s = timed_call(train_segmentation_probe, device)
    confusion, score_s = timed_call(
        lambda: evaluate_segmentation_probe(probe, patches[count:], masks[count:], device=device), device
    )
    depth = dense_probes(args, patches, cls, patch_labels, masks, recipe)
    pixels = count * masks.shape[1] * masks.shape[2]
    return {
        **depth,
        "segmentation_train_us_per_pixel": train_s / pixels * 1e6,
        "segmentation_score_us_per_pixel": score_s / pixels * 1e6,
        "images": count,
        "classes": classes,
        "hidden_size": hidden_size,
        "grid": grid,
        "knn_s": knn_s,
        "knn_top1_by_k": accuracy,
        "segmentation_train_s": train_s,
        "segmentation_score_s": score_s,
        "segmentation_pixel_accuracy": float(confusion.diagonal().sum() / confusion.sum() * 100),
        "recipe": {
            "epochs": recipe.seg_epochs,
            "lr": recipe.seg_lr,
            "weight_decay": recipe.seg_weight_decay,
            "batch_size": recipe.seg_batch_size,
        },
    }


def dense_probes(
    args: argparse.Namespace,
    patches: torch.Tensor,
    cls: torch.Tensor,
    patch_labels: torch.Tensor,
    masks: torch.Tensor,
    recipe: EvaluationArguments,
) -> dict[str, Any]:
    """Time the depth probe (default head, then `bins`) and the unsupervised segmentation on the probes' features.

    Depth maps: 1 m + 8 m × the class of every pixel / the number of classes, plus a horizontal ramp of up to 1 m
    (1–10 m, NYUd's range), so the features carry most of the depth.
    """
    count, device = args.probe_images, args.device
    side = masks.shape[-1]
    ramp = torch.linspace(0.0, 1.0, side)[None, None, :]
    depth = 1.0 + 8.0 * masks.float() / args.probe_classes + ramp
    pixels = count * side * side
    measured: dict[str, Any] = {}
    for head in (recipe.depth_head, "bins"):
        centres = depth_bin_centres(recipe.depth_min, recipe.depth_max, recipe.depth_bins) if head == "bins" else None

        def train_depth_probe(head: DepthHead = head, centres: torch.Tensor | None = centres) -> Any:
            log_depth, counts = patch_log_depth_targets(depth[:count], PATCH_SIZE)
            return train_linear_depth_probe(
                patches[:count],
                cls[:count],
                log_depth,
                counts,
                head=head,
                depth_range=(recipe.depth_min, recipe.depth_max),
                centres=centres,
                epochs=recipe.depth_epochs,
                lr=recipe.depth_lr,
                weight_decay=recipe.depth_weight_decay,
                batch_size=recipe.depth_batch_size,
                seed=recipe.seed,
                device=device,
                show_progress=False,
            )

        probe, train_s = timed_call(train_depth_probe, device)
        (sums, _), score_s = timed_call(
            lambda probe=probe: evaluate_depth_probe(
                probe, patches[count:], cls[count:], depth[count:], device=device
            ),
            device,
        )
        measured[f"depth_{head}"] = {
            "train_s": train_s,
            "score_s": score_s,
            "train_us_per_pixel": train_s / pixels * 1e6,
            "score_us_per_pixel": score_s / pixels * 1e6,
            "rmse": depth_metrics(sums)["rmse"],
        }
    classes = torch.unique(masks[count:])

    def fit_kmeans() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = patches[count:].reshape(-1, patches.shape[-1])
        generator = torch.Generator().manual_seed(0)
        sample = tokens[torch.randperm(tokens.shape[0], generator=generator)[: recipe.unsupervised_max_tokens]]
        return sample, spherical_kmeans(
            sample, classes.numel(), restarts=recipe.unsupervised_restarts, seed=recipe.seed, device=device
        )

    (sample, centroids), fit_s = timed_call(fit_kmeans, device)
    confusion, score_s = timed_call(
        lambda: matched_confusion(
            cluster_class_counts(patches[count:], centroids, masks[count:], classes, 255, device)
        ),
        device,
    )
    measured["unsupervised"] = {
        "kmeans_s": fit_s,
        "score_s": score_s,
        "tokens_fitted": sample.shape[0],
        "pixel_accuracy": float(confusion.diagonal().sum() / confusion.sum() * 100),
    }
    return measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both measurements, print the tables, write the JSON and return it."""
    args = parse_args(argv)
    apply_threads(args.threads)
    shape = get_shape(args.model_size)
    measured: dict[str, Any] = {}
    if "extraction" in args.parts:
        model = random_dinov2(shape, device=args.device)
        synchronize(args.device)
        with tempfile.TemporaryDirectory() as directory:
            paths = write_photos(Path(directory), args.images, tuple(args.image_size))
            measured = extraction(args, model, paths)
    probe_times = probes(args, shape.hidden_size) if "probes" in args.parts else {}
    cause_times = cause_fits(args, shape.hidden_size) if "cause" in args.parts else {}
    payload = {
        "benchmark": "evaluate",
        "args": vars(args),
        "machine": machine_description(args.device),
        "model": shape.name,
        "extraction": measured,
        "probes": probe_times,
        "cause": cause_times,
    }
    if measured:
        print(f"## Feature extraction, {shape.name}, {args.images} images at {args.resolution} px, {args.device}\n")
        rows = [
            [name, entry["timing"].median_s, entry["images_per_s"], entry["throughput_vs_plain"]]
            for name, entry in measured.items()
        ]
        print(format_table(["variant", "median (s)", "images/s", "throughput vs plain"], rows) + "\n")
    if probe_times:
        print(f"## Probes on cached features, {probe_times['images']} images, {probe_times['classes']} classes\n")
        rows = [
            ["kNN (k = 10, 20, 100, 200)", probe_times["knn_s"]],
            ["linear segmentation probe: train", probe_times["segmentation_train_s"]],
            ["linear segmentation probe: score", probe_times["segmentation_score_s"]],
        ]
        print(format_table(["probe", "seconds"], rows) + "\n")
        per_pixel = (probe_times["segmentation_train_us_per_pixel"], probe_times["segmentation_score_us_per_pixel"])
        rows = [["segmentation", *per_pixel]]
        for name, entry in probe_times.items():
            if name.startswith("depth_"):
                rows.append([name.replace("_", " "), entry["train_us_per_pixel"], entry["score_us_per_pixel"]])
        print(format_table(["probe", "train (µs/pixel)", "score (µs/pixel)"], rows) + "\n")
        unsupervised = probe_times["unsupervised"]
        print(f"unsupervised: k-means {unsupervised['kmeans_s']:.2f} s, scoring {unsupervised['score_s']:.2f} s\n")
    if cause_times:
        print(f"## CAUSE, {cause_times['images']} images of {cause_times['patches']} patches, {args.device}\n")
        rows = [
            ["clusterbook, per step", cause_times["clusterbook_s_per_step"]],
            ["head, per step", cause_times["head_s_per_step"]],
            ["cluster probe, per step", cause_times["probe_s_per_step"]],
            ["scoring features, per image (with its mirror)", cause_times["scoring_features_s_per_image"]],
        ]
        print(format_table(["CAUSE", "seconds"], rows) + "\n")
    write_json(args.output, payload)
    print(f"Wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
