"""PCA colour maps and the diagnosis, layer-norm and before/after figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import AxesImage
from PIL import Image

from sinder_peft.visualization.figures import (
    FIRST_DEFECTIVE_LAYER_COLOR,
    before_after_figure,
    diagnosis_figure,
    layer_norm_figure,
    norm_outlier_mask,
    pca_rgb,
    save_before_after_figure,
    save_diagnosis_figure,
    save_layer_norm_plot,
)

HEIGHT, WIDTH, CHANNELS = 12, 18, 24


def patterns() -> list[np.ndarray]:
    """Three uncorrelated spatial patterns on a HEIGHT × WIDTH grid: a horizontal ramp, a vertical ramp, a wave."""
    rows, columns = np.meshgrid(np.linspace(-1, 1, HEIGHT), np.linspace(-1, 1, WIDTH), indexing="ij")
    return [columns, rows, np.sin(3 * columns) * np.cos(3 * rows)]


def structured_features(seed: int = 0, outliers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features = 10·a·q₁ + 5·b·q₂ + 2·c·q₃ + small noise in a random orthonormal basis q, plus optional defects.

    Returns the features [H, W, C] and the boolean mask of the two planted high-norm tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(CHANNELS, CHANNELS, generator=generator, dtype=torch.float64))
    features = sum(
        scale * torch.from_numpy(pattern)[..., None] * basis[:, index]
        for index, (scale, pattern) in enumerate(zip((10.0, 5.0, 2.0), patterns(), strict=True))
    )
    features = features + 0.05 * torch.randn(HEIGHT, WIDTH, CHANNELS, generator=generator, dtype=torch.float64)
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    if outliers:
        for row, column, size in ((3, 4, 400.0), (8, 13, 380.0)):
            features[row, column] += size * basis[:, 7]
            mask[row, column] = True
    return features.float(), mask


def abs_correlation(first: np.ndarray, second: np.ndarray) -> float:
    return abs(float(np.corrcoef(first.ravel(), second.ravel())[0, 1]))


def test_pca_rgb_recovers_the_three_components_in_order() -> None:
    features, _ = structured_features()
    rgb = pca_rgb(features)
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    for channel, pattern in enumerate(patterns()):
        assert abs_correlation(rgb[..., channel], pattern) > 0.99
    # each component's sign follows the data, not the SVD routine: negated features give exactly inverted colours
    np.testing.assert_allclose(pca_rgb(-features), 1.0 - rgb, atol=1e-6)


def test_pca_rgb_fit_ignores_defect_tokens() -> None:
    features, defects = structured_features(seed=1, outliers=True)
    torch.testing.assert_close(norm_outlier_mask(features.norm(dim=-1)), defects)
    robust = pca_rgb(features)
    for channel, pattern in enumerate(patterns()):
        assert abs_correlation(robust[..., channel][~defects.numpy()], pattern[~defects.numpy()]) > 0.99
    # fitted on every token, the first component is spent on the two defect tokens (pinned to one end of the scale)
    # and the image structure is lost from the red channel
    naive = pca_rgb(features, exclude_outliers=False)
    assert set(naive[..., 0][defects.numpy()].tolist()) <= {0.0, 1.0}
    assert abs_correlation(naive[..., 0], patterns()[0]) < 0.5


def test_pca_rgb_with_fewer_dimensions_than_colours() -> None:
    ramp = torch.from_numpy(patterns()[0]).float()
    features = torch.stack([ramp, torch.zeros_like(ramp)], dim=-1)
    rgb = pca_rgb(features)
    assert abs_correlation(rgb[..., 0], patterns()[0]) > 0.999
    assert np.all(rgb[..., 1:] == 0.0)


def test_norm_outlier_mask_without_spread_flags_nothing() -> None:
    assert not norm_outlier_mask(torch.full((4, 5), 3.0)).any()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_save_diagnosis_figure_writes_a_png(tmp_path: Path) -> None:
    features, defects = structured_features(seed=2, outliers=True)
    image = Image.fromarray(np.full((HEIGHT * 14, WIDTH * 14, 3), 128, dtype=np.uint8))
    path = save_diagnosis_figure(image, features.norm(dim=-1), features, tmp_path / "sub" / "x.png", title="t")
    pixels = read_png(path)
    # 3 panels of 4 inches + 1 inch, 100 dpi; panel height 4 inches × H / W + 1 inch
    assert pixels.shape == (int((4.0 * HEIGHT / WIDTH + 1.0) * 100), 1300, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100

    figure = diagnosis_figure(image, features.norm(dim=-1), features)
    norm_image = next(artist for artist in figure.axes[1].get_children() if isinstance(artist, AxesImage))
    np.testing.assert_allclose(norm_image.get_array(), features.norm(dim=-1).double().numpy(), rtol=1e-6)
    assert norm_image.get_clim() == pytest.approx((0.0, float(features.norm(dim=-1).max())))
    with pytest.raises(ValueError, match="same grid"):
        save_diagnosis_figure(image, features.norm(dim=-1)[:-1], features, tmp_path / "bad.png")


def test_save_layer_norm_plot_marks_the_first_defective_layer(tmp_path: Path) -> None:
    ratios = [[1.1, 1.3, 2.0, 40.0, 60.0], [1.0, 1.2, 1.5, 30.0, 70.0]]
    marked = read_png(save_layer_norm_plot(ratios, 3, tmp_path / "marked.png", labels=["a", "b"]))
    unmarked = read_png(save_layer_norm_plot(ratios, None, tmp_path / "unmarked.png"))
    single = read_png(save_layer_norm_plot(ratios[0], -1, tmp_path / "single.png"))
    assert marked.shape == unmarked.shape == single.shape == (400, 700, 3)
    red = np.array([round(255 * value) for value in to_rgb(FIRST_DEFECTIVE_LAYER_COLOR)])
    is_red = np.all(np.abs(marked.astype(int) - red) <= 2, axis=-1)
    assert is_red.sum() > 100
    assert np.all(np.abs(unmarked.astype(int) - red) <= 2, axis=-1).sum() == 0

    figure = layer_norm_figure(ratios, 3)
    axis = figure.axes[0]
    vertical = [line for line in axis.get_lines() if line.get_label().startswith("first defective layer")]
    assert len(vertical) == 1 and list(vertical[0].get_xdata()) == [3, 3]
    mean_line = next(line for line in axis.get_lines() if line.get_label() == "mean")
    np.testing.assert_allclose(mean_line.get_ydata(), np.mean(ratios, axis=0))
    with pytest.raises(ValueError, match="labels"):
        layer_norm_figure(ratios, 3, labels=["only one"])


def test_before_after_norm_maps_share_one_colour_scale(tmp_path: Path) -> None:
    before, _ = structured_features(seed=3, outliers=True)
    after, _ = structured_features(seed=3)
    image = Image.fromarray(np.full((HEIGHT * 14, WIDTH * 14, 3), 200, dtype=np.uint8))
    figure = before_after_figure(image, before.norm(dim=-1), before, after.norm(dim=-1), after)
    norm_axes = [axis for axis in figure.axes if axis.get_title().startswith("token norm")]
    assert len(norm_axes) == 2
    limits = [
        next(artist for artist in axis.get_children() if isinstance(artist, AxesImage)).get_clim()
        for axis in norm_axes
    ]
    expected = (0.0, float(before.norm(dim=-1).max()))
    assert limits[0] == pytest.approx(expected) and limits[1] == pytest.approx(expected)

    path = save_before_after_figure(
        image, before.norm(dim=-1), before, after.norm(dim=-1), after, tmp_path / "ba.png", title="repair"
    )
    assert read_png(path).shape == (int((2 * 4.0 * HEIGHT / WIDTH + 1.0) * 100), 1300, 3)
    with pytest.raises(ValueError, match="share a grid"):
        before_after_figure(image, before.norm(dim=-1), before, after.norm(dim=-1)[1:], after[1:])
