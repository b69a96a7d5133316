"""Pictures of singular defects: token-norm heat maps, PCA feature maps, per-layer norm ratios, before/after.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas and written straight to PNG files:
pyplot, its global state and any GUI backend are never touched, so this works in headless jobs and threads.

PCA maps and defect tokens: a defect token's norm is many times that of every other token, so a PCA fitted on all
tokens spends its first component on that one token and paints the rest of the image a flat colour. `pca_rgb`
therefore fits the components on the tokens whose norm is not a robust outlier (by default more than 6 scaled median
absolute deviations above the median norm), projects *every* token, and scales each component by the 1st–99th
percentiles of the fitted tokens; outliers are clipped to the ends of the scale and stay visible as saturated dots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from PIL import Image

NORM_COLORMAP = "inferno"
DEPTH_COLORMAP = "magma_r"
FIRST_DEFECTIVE_LAYER_COLOR = "#d62728"
_PANEL_INCHES = 4.0
_DPI = 100
_ROBUST_Z_TO_MAD = 1.4826
"""Scale from the median absolute deviation to a standard deviation for Gaussian data."""


def norm_outlier_mask(norms: torch.Tensor, z_threshold: float = 6.0) -> torch.Tensor:
    """Return a boolean mask of the entries of `norms` that are robust high outliers.

    An entry is an outlier when it exceeds the median by more than `z_threshold` scaled median absolute deviations
    (MAD × 1.4826, the standard deviation of Gaussian data). With no spread at all (MAD = 0) nothing is an outlier.
    """
    values = norms.reshape(-1).double()
    median = values.median()
    spread = (values - median).abs().median() * _ROBUST_Z_TO_MAD
    if spread <= 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    return ((values - median) / spread > z_threshold).reshape(norms.shape)


def pca_rgb(
    features: torch.Tensor,
    *,
    exclude_outliers: bool = True,
    outlier_z: float = 6.0,
    percentile: float = 1.0,
) -> np.ndarray:
    """Map a `[H, W, C]` feature grid to RGB colours through its first three principal components.

    Args:
        features: token features on the patch grid.
        exclude_outliers: fit the components without the tokens whose norm is a robust outlier (see
            `norm_outlier_mask`), so that one defect token does not take over the map. They are still projected
            and drawn.
        outlier_z: the outlier threshold, in scaled median absolute deviations above the median norm.
        percentile: each component is mapped linearly so that this percentile of the fitted tokens is 0 and
            100 − `percentile` is 1, then clipped to [0, 1].

    Returns:
        A float array `[H, W, 3]` in [0, 1]: red, green and blue are the 1st, 2nd and 3rd components. Each
        component's sign is chosen so its largest-magnitude loading is positive (deterministic colours). Channels
        beyond the rank of the data (e.g. fewer than 3 feature dimensions) are 0.
    """
    height, width, channels = features.shape
    tokens = features.detach().reshape(-1, channels).to(torch.float64).cpu()
    fitted = torch.ones(tokens.shape[0], dtype=torch.bool)
    if exclude_outliers:
        fitted = ~norm_outlier_mask(tokens.norm(dim=1), outlier_z)
    fit_tokens = tokens[fitted]
    center = fit_tokens.mean(dim=0)
    _, singular_values, right = torch.linalg.svd(fit_tokens - center, full_matrices=False)
    rank_tolerance = 1e-10 * float(singular_values.max()) if singular_values.numel() else 0.0
    num_components = min(3, int((singular_values > rank_tolerance).sum()))
    rgb = torch.zeros(tokens.shape[0], 3, dtype=torch.float64)
    if num_components == 0:
        return rgb.reshape(height, width, 3).numpy()
    components = right[:num_components]
    largest = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, largest[:, None])).clamp_min(0) * 2 - 1
    components = components * signs
    projected = (tokens - center) @ components.T
    low = torch.quantile(projected[fitted], percentile / 100.0, dim=0)
    high = torch.quantile(projected[fitted], 1.0 - percentile / 100.0, dim=0)
    rgb[:, :num_components] = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)
    return rgb.reshape(height, width, 3).numpy()


def max_to_median_norm(token_norms: torch.Tensor) -> float:
    """Return the largest token norm divided by the median token norm (about 1–3 for healthy features)."""
    values = token_norms.detach().reshape(-1).double()
    return float(values.max() / values.median().clamp_min(1e-12))


def _new_figure(mosaic: list[list[str]], aspect: float) -> tuple[Figure, dict[str, Axes]]:
    """Create a figure laid out as `mosaic`, with panels `aspect` (height / width) as tall as they are wide."""
    rows, columns = len(mosaic), len(mosaic[0])
    figure = Figure(
        figsize=(_PANEL_INCHES * columns + 1.0, _PANEL_INCHES * aspect * rows + 1.0), dpi=_DPI, layout="constrained"
    )
    axes = figure.subplot_mosaic(mosaic)
    for axis in axes.values():
        axis.set_xticks([])
        axis.set_yticks([])
    return figure, axes


def _draw_image(axis: Axes, image: Image.Image, grid_size: tuple[int, int], title: str) -> None:
    """Draw `image` resized to exactly cover the patch grid (so it lines up with the token maps next to it)."""
    height, width = grid_size
    axis.imshow(np.asarray(image.convert("RGB")), extent=(0, width, height, 0), interpolation="bilinear")
    axis.set_title(title)


def _draw_norms(axis: Axes, token_norms: torch.Tensor, scale: Normalize, title: str) -> AxesImage:
    """Draw a token-norm heat map on `axis` with colour scale `scale`; return the image artist (for a colorbar)."""
    norms = token_norms.detach().double().cpu().numpy()
    artist = axis.imshow(norms, cmap=NORM_COLORMAP, norm=scale, interpolation="nearest")
    axis.set_title(f"{title}\nmax/median = {max_to_median_norm(token_norms):.1f}")
    return artist


def _draw_pca(axis: Axes, features: torch.Tensor, title: str) -> None:
    """Draw the PCA colour map of `features` on `axis`, with a cross on each token left out of the fit."""
    axis.imshow(pca_rgb(features), interpolation="nearest")
    outliers = norm_outlier_mask(features.detach().double().norm(dim=-1)).cpu()
    if outliers.any():
        rows, columns = torch.nonzero(outliers, as_tuple=True)
        axis.scatter(columns.numpy(), rows.numpy(), marker="x", s=30, c="white", linewidths=1.5)
        axis.scatter(columns.numpy(), rows.numpy(), marker="x", s=30, c="black", linewidths=0.6)
        title = f"{title}\n× = norm outliers, > 6 MAD (not fitted)"
    axis.set_title(title)


def _check_grid(token_norms: torch.Tensor, features: torch.Tensor) -> tuple[int, int]:
    """Return the grid size shared by `token_norms` `[H, W]` and `features` `[H, W, C]`.

    Raises:
        ValueError: if their shapes do not agree.
    """
    if token_norms.dim() != 2 or features.dim() != 3 or tuple(features.shape[:2]) != tuple(token_norms.shape):
        raise ValueError(
            f"Expected token norms [H, W] and features [H, W, C] on the same grid, got {tuple(token_norms.shape)} "
            f"and {tuple(features.shape)}."
        )
    return int(token_norms.shape[0]), int(token_norms.shape[1])


def _save(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG file at `path` (creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)
    return path


def diagnosis_figure(
    image: Image.Image, token_norms: torch.Tensor, features: torch.Tensor, title: str | None = None
) -> Figure:
    """Return the figure `save_diagnosis_figure` writes: panels named "image", "norms" and "pca" (see there)."""
    grid_size = _check_grid(token_norms, features)
    figure, axes = _new_figure([["image", "norms", "pca"]], grid_size[0] / grid_size[1])
    _draw_image(axes["image"], image, grid_size, "image")
    scale = Normalize(0.0, float(token_norms.detach().max()))
    artist = _draw_norms(axes["norms"], token_norms, scale, "token norm")
    figure.colorbar(artist, ax=axes["norms"], fraction=0.046, pad=0.04)
    _draw_pca(axes["pca"], features, "PCA of features")
    if title:
        figure.suptitle(title)
    return figure


def save_diagnosis_figure(
    image: Image.Image,
    token_norms: torch.Tensor,
    features: torch.Tensor,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Save a three-panel PNG: the image, the token-norm heat map (with colorbar), the PCA map of the features.

    Args:
        image: the image the tokens come from, ideally as the model saw it (`images.preprocessing.resize_and_crop`);
            it is stretched over the patch grid.
        token_norms: `[H, W]` norms of the patch tokens (defect tokens are the bright dots).
        features: `[H, W, C]` patch features for the PCA map.
        path: where to write the PNG.
        title: optional figure title.

    Returns:
        `path`, as a `Path`.
    """
    return _save(diagnosis_figure(image, token_norms, features, title), path)


def layer_norm_figure(
    max_median_ratio: Sequence[float] | Sequence[Sequence[float]],
    first_defective_layer: int | None,
    *,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Return the figure `save_layer_norm_plot` writes (see there)."""
    ratios = np.asarray(max_median_ratio, dtype=np.float64)
    if ratios.ndim == 1:
        ratios = ratios[None, :]
    if ratios.ndim != 2 or ratios.shape[1] == 0:
        raise ValueError(f"Expected one ratio per layer, or one sequence of them per image; got shape {ratios.shape}.")
    if labels is not None and len(labels) != ratios.shape[0]:
        raise ValueError(f"Got {len(labels)} labels for {ratios.shape[0]} images.")
    layers = np.arange(ratios.shape[1])
    figure = Figure(figsize=(7.0, 4.0), dpi=_DPI, layout="constrained")
    axis = figure.subplots()
    if ratios.shape[0] > 1:
        for index, row in enumerate(ratios):
            label = labels[index] if labels is not None else None
            axis.plot(layers, row, linewidth=0.8, alpha=0.5, marker=".", label=label)
        axis.plot(layers, ratios.mean(axis=0), color="black", linewidth=2.0, marker="o", label="mean")
    else:
        label = labels[0] if labels is not None else None
        axis.plot(layers, ratios[0], color="black", linewidth=2.0, marker="o", label=label)
    if first_defective_layer is not None and first_defective_layer >= 0:
        axis.axvline(
            first_defective_layer,
            color=FIRST_DEFECTIVE_LAYER_COLOR,
            linestyle="--",
            label=f"first defective layer ({first_defective_layer})",
        )
    axis.set_yscale("log")
    axis.set_xlabel("block index")
    axis.set_ylabel("max / median token norm")
    axis.set_xticks(layers if len(layers) <= 24 else layers[:: int(np.ceil(len(layers) / 24))])
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    return figure


def save_layer_norm_plot(
    max_median_ratio: Sequence[float] | Sequence[Sequence[float]],
    first_defective_layer: int | None,
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save a PNG plotting the max/median token-norm ratio of every layer, with the first defective layer marked.

    Args:
        max_median_ratio: one value per layer (block index 0, 1, …), or one such sequence per image. With several
            images each gets a thin line and their mean a thick one. The y axis is logarithmic.
        first_defective_layer: block index to mark with a dashed red vertical line (e.g. the earliest over the
            images), or `None` / a negative value when no layer is defective.
        path: where to write the PNG.
        labels: optional legend label per image.

    Returns:
        `path`, as a `Path`.
    """
    return _save(layer_norm_figure(max_median_ratio, first_defective_layer, labels=labels), path)


def before_after_figure(
    image: Image.Image,
    before_norms: torch.Tensor,
    before_features: torch.Tensor,
    after_norms: torch.Tensor,
    after_features: torch.Tensor,
    title: str | None = None,
) -> Figure:
    """Return the figure `save_before_after_figure` writes.

    Panels are named "image", "norms before", "pca before", "norms after" and "pca after" (see there).
    """
    grid_size = _check_grid(before_norms, before_features)
    if _check_grid(after_norms, after_features) != grid_size:
        raise ValueError(
            f"The before and after maps must share a grid, got {grid_size} and {tuple(after_norms.shape)}."
        )
    mosaic = [["image", "norms before", "pca before"], ["image", "norms after", "pca after"]]
    figure, axes = _new_figure(mosaic, grid_size[0] / grid_size[1])
    _draw_image(axes["image"], image, grid_size, "image")
    upper = max(float(before_norms.detach().max()), float(after_norms.detach().max()))
    scale = Normalize(0.0, upper)
    artist = _draw_norms(axes["norms before"], before_norms, scale, "token norm before")
    _draw_norms(axes["norms after"], after_norms, scale, "token norm after")
    _draw_pca(axes["pca before"], before_features, "PCA before")
    _draw_pca(axes["pca after"], after_features, "PCA after")
    figure.colorbar(artist, ax=[axes["norms before"], axes["norms after"]], fraction=0.046, pad=0.04)
    if title:
        figure.suptitle(title)
    return figure


def save_before_after_figure(
    image: Image.Image,
    before_norms: torch.Tensor,
    before_features: torch.Tensor,
    after_norms: torch.Tensor,
    after_features: torch.Tensor,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Save a PNG comparing a model before (top row) and after (bottom row) repair on one image.

    The image is drawn once, on the left; each row then shows the token-norm map `[H, W]` and the PCA map of the
    features `[H, W, C]`. Both norm maps share one colour scale (from 0 to the larger maximum) and one colorbar, so
    the drop of the defect tokens' norm reads directly as a change of colour; each PCA map is fitted on its own
    features.

    Returns:
        `path`, as a `Path`.
    """
    figure = before_after_figure(image, before_norms, before_features, after_norms, after_features, title)
    return _save(figure, path)


def evaluation_comparison_figure(
    models: Sequence[str],
    scores: dict[str, Sequence[float | None]],
    layer_ratios: Sequence[Sequence[float] | None] | None = None,
) -> Figure:
    """Return the figure `save_evaluation_comparison` writes (see there)."""
    panels = list(scores) + (["per-layer norm ratio"] if layer_ratios is not None else [])
    if not panels:
        raise ValueError("Nothing to compare: no score and no per-layer ratios.")
    for name, values in scores.items():
        if len(values) != len(models):
            raise ValueError(f"Score {name!r} has {len(values)} values for {len(models)} models.")
    figure = Figure(figsize=(4.0 * len(panels) + 0.5, 4.0), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    colors = [f"C{index % 10}" for index in range(len(models))]
    positions = np.arange(len(models))
    for axis, (name, values) in zip(axes, scores.items(), strict=False):
        heights = [np.nan if value is None else float(value) for value in values]
        bars = axis.bar(positions, np.nan_to_num(heights), color=colors)
        for bar, value in zip(bars, heights, strict=True):
            label = "n/a" if np.isnan(value) else f"{value:.3g}"
            axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        axis.set_xticks(positions, list(models), rotation=20, ha="right")
        axis.set_title(name)
        axis.margins(y=0.15)
    if layer_ratios is not None:
        axis = axes[-1]
        for model, ratios, color in zip(models, layer_ratios, colors, strict=True):
            if ratios is not None:
                axis.plot(np.arange(len(ratios)), ratios, marker="o", color=color, label=model)
        axis.set_yscale("log")
        axis.set_xlabel("block index")
        axis.set_ylabel("mean max / median token norm")
        axis.set_title("per-layer norm ratio")
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    return figure


def save_evaluation_comparison(
    models: Sequence[str],
    scores: dict[str, Sequence[float | None]],
    path: str | Path,
    layer_ratios: Sequence[Sequence[float] | None] | None = None,
) -> Path:
    """Save a PNG comparing models side by side: one bar panel per score, then their per-layer norm ratios.

    Args:
        models: the model names, in order (one colour each, the same in every panel).
        scores: panel title -> one value per model (None: not measured, drawn as "n/a"), e.g.
            `{"kNN top-1 (%)": [...], "mIoU (%)": [...], "max/median norm": [...]}`.
        path: where to write the PNG.
        layer_ratios: per model, the mean max/median token-norm ratio of every block (None for a model without),
            drawn as one line per model on a log scale; None leaves the panel out.

    Returns:
        `path`, as a `Path`.
    """
    return _save(evaluation_comparison_figure(models, scores, layer_ratios), path)


def norm_map_comparison_figure(
    images: Sequence[Image.Image], token_norms: Sequence[Sequence[torch.Tensor]], models: Sequence[str]
) -> Figure:
    """Return the figure `save_norm_map_comparison` writes (see there)."""
    if len(images) != len(token_norms) or not images:
        raise ValueError(f"Need one row of norm maps per image, got {len(images)} images and {len(token_norms)} rows.")
    if any(len(row) != len(models) for row in token_norms):
        raise ValueError(f"Every row needs one norm map per model ({len(models)}).")
    grid = tuple(token_norms[0][0].shape)
    mosaic = [[f"image {row}"] + [f"{row} {column}" for column in range(len(models))] for row in range(len(images))]
    figure, axes = _new_figure(mosaic, grid[0] / grid[1])
    for row, (image, norms) in enumerate(zip(images, token_norms, strict=True)):
        _draw_image(axes[f"image {row}"], image, (int(norms[0].shape[0]), int(norms[0].shape[1])), "image")
        scale = Normalize(0.0, max(float(norm.detach().max()) for norm in norms))
        artist = None
        for column, (model, norm) in enumerate(zip(models, norms, strict=True)):
            artist = _draw_norms(axes[f"{row} {column}"], norm, scale, model)
        figure.colorbar(artist, ax=[axes[f"{row} {column}"] for column in range(len(models))], fraction=0.046)
    return figure


def save_norm_map_comparison(
    images: Sequence[Image.Image],
    token_norms: Sequence[Sequence[torch.Tensor]],
    models: Sequence[str],
    path: str | Path,
) -> Path:
    """Save a PNG of last-layer token-norm maps, one row per image and one column per model, side by side.

    Args:
        images: the images as the models saw them (drawn first in each row, stretched over the patch grid).
        token_norms: per image, one `[H, W]` norm map per model, in the order of `models`. The maps of a row share
            one colour scale (0 to the row's largest norm) and one colorbar, so a repaired model's missing defect
            tokens read directly against the original's.
        models: the column titles.
        path: where to write the PNG.

    Returns:
        `path`, as a `Path`.
    """
    return _save(norm_map_comparison_figure(images, token_norms, models), path)


def depth_comparison_figure(
    images: Sequence[Image.Image],
    truth: Sequence[torch.Tensor],
    predictions: Sequence[Sequence[torch.Tensor]],
    models: Sequence[str],
) -> Figure:
    """Return the figure `save_depth_comparison` writes (see there)."""
    if not images or not len(images) == len(truth) == len(predictions):
        raise ValueError(
            f"Need one true map and one row of predictions per image, got {len(images)} images, {len(truth)} true "
            f"maps and {len(predictions)} rows."
        )
    if any(len(row) != len(models) for row in predictions):
        raise ValueError(f"Every row needs one predicted map per model ({len(models)}).")
    height, width = (int(size) for size in truth[0].shape)
    columns = ["image", "truth"] + [f"model {index}" for index in range(len(models))]
    mosaic = [[f"{row} {column}" for column in columns] for row in range(len(images))]
    figure, axes = _new_figure(mosaic, height / width)
    for row, (image, true_map, maps) in enumerate(zip(images, truth, predictions, strict=True)):
        _draw_image(axes[f"{row} image"], image, (height, width), "image")
        valid = true_map > 0
        largest = max([float(true_map.max())] + [float(depth.max()) for depth in maps])
        scale = Normalize(0.0, max(largest, 1e-6))
        shown = np.ma.masked_where(~valid.cpu().numpy(), true_map.double().cpu().numpy())
        artist = axes[f"{row} truth"].imshow(shown, cmap=DEPTH_COLORMAP, norm=scale, interpolation="nearest")
        axes[f"{row} truth"].set_title("true depth (m)")
        for index, (model, depth) in enumerate(zip(models, maps, strict=True)):
            axis = axes[f"{row} model {index}"]
            axis.imshow(depth.double().cpu().numpy(), cmap=DEPTH_COLORMAP, norm=scale, interpolation="nearest")
            error = depth.double()[valid] - true_map.double()[valid]
            rmse = float(error.pow(2).mean().sqrt()) if error.numel() else float("nan")
            axis.set_title(f"{model}\nRMSE {rmse:.3f} m")
        figure.colorbar(artist, ax=[axes[f"{row} {column}"] for column in columns[1:]], fraction=0.046)
    return figure


def save_depth_comparison(
    images: Sequence[Image.Image],
    truth: Sequence[torch.Tensor],
    predictions: Sequence[Sequence[torch.Tensor]],
    models: Sequence[str],
    path: str | Path,
) -> Path:
    """Save a PNG of predicted depth maps, one row per image: the image, its true depth, then one map per model.

    Args:
        images: the images as the models saw them.
        truth: per image, its `[H, W]` true depth in metres (0 = no measurement, drawn blank).
        predictions: per image, one `[H, W]` predicted depth map per model, in the order of `models`. A row shares
            one colour scale (0 to its largest depth) and one colorbar; each title gives that image's RMSE.
        models: the model names.
        path: where to write the PNG.

    Returns:
        `path`, as a `Path`.
    """
    return _save(depth_comparison_figure(images, truth, predictions, models), path)
