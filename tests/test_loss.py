"""Tests of the smooth neighbourhood loss against an explicit, loop-based float64 version of docs/method.md §3."""

import math

import pytest
import torch

from sinder_peft.training.loss import (
    feature_preservation_loss,
    gaussian_kernel,
    neighbourhood_targets,
    smooth_neighbourhood_loss,
)

KERNEL_3 = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
KERNEL_5 = [[1, 4, 7, 4, 1], [4, 16, 26, 16, 4], [7, 26, 41, 26, 7], [4, 16, 26, 16, 4], [1, 4, 7, 4, 1]]
KERNELS = {3: (KERNEL_3, 16), 5: (KERNEL_5, 273)}


def loop_target(
    tokens: torch.Tensor, cosines: torch.Tensor, row: int, col: int, kernel_size: int, temperature: float
) -> torch.Tensor:
    """T of one interior position of one image [H, W, C], by an explicit loop over the window's offsets."""
    kernel, total = KERNELS[kernel_size]
    pad = kernel_size // 2
    weights, neighbours = [], []
    for di in range(-pad, pad + 1):
        for dj in range(-pad, pad + 1):
            affinity = math.exp(-abs(cosines[row + di, col + dj].item()) / temperature)
            weights.append(affinity * kernel[di + pad][dj + pad] / total)
            neighbours.append(tokens[row + di, col + dj])
    weight_sum = sum(weights)
    return sum(w / weight_sum * x for w, x in zip(weights, neighbours, strict=True))


def loop_alpha(tokens: torch.Tensor, kernel_size: int) -> float:
    """Mean token norm of one image [H, W, C] over positions outside the border ring."""
    pad = kernel_size // 2
    height, width = tokens.shape[:2]
    norms = [tokens[r, c].norm().item() for r in range(pad, height - pad) for c in range(pad, width - pad)]
    return sum(norms) / len(norms)


def loop_losses(
    tokens: torch.Tensor, cosines: torch.Tensor, mask: torch.Tensor, kernel_size: int, temperature: float
) -> list[tuple[int, int, int, torch.Tensor, float]]:
    """Per flagged token ``(image, row, col, T, ‖x − T‖ / α)`` for a batch, all by explicit loops."""
    results = []
    for b in range(tokens.shape[0]):
        alpha = loop_alpha(tokens[b], kernel_size)
        for row in range(tokens.shape[1]):
            for col in range(tokens.shape[2]):
                if mask[b, row, col]:
                    target = loop_target(tokens[b], cosines[b], row, col, kernel_size, temperature)
                    results.append((b, row, col, target, (tokens[b, row, col] - target).norm().item() / alpha))
    return results


def random_batch(
    kernel_size: int, seed: int = 0, height: int = 7, width: int = 8, channels: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 tokens, cosines in [-1, 1] and two different interior masks (3 and 1 flagged tokens)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, height, width, channels, generator=generator, dtype=torch.float64) * 3
    cosines = torch.rand(2, height, width, generator=generator, dtype=torch.float64) * 2 - 1
    pad = kernel_size // 2
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[0, pad, pad] = mask[0, height - pad - 1, width - pad - 1] = mask[0, pad + 1, pad] = True
    mask[1, height // 2, width // 2] = True
    return tokens, cosines, mask


def test_gaussian_kernel_values() -> None:
    assert torch.equal(gaussian_kernel(3, dtype=torch.float64), torch.tensor(KERNEL_3, dtype=torch.float64) / 16)
    assert torch.equal(gaussian_kernel(5, dtype=torch.float64), torch.tensor(KERNEL_5, dtype=torch.float64) / 273)
    assert gaussian_kernel(5).sum().item() == pytest.approx(1.0)
    for size in (1, 4, 7):
        with pytest.raises(ValueError):
            gaussian_kernel(size)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_targets_match_loop(kernel_size: int) -> None:
    tokens, cosines, _ = random_batch(kernel_size)
    targets = neighbourhood_targets(tokens, cosines, kernel_size, temperature=0.1)
    pad = kernel_size // 2
    for b in range(2):
        for row in range(pad, tokens.shape[1] - pad):
            for col in range(pad, tokens.shape[2] - pad):
                expected = loop_target(tokens[b], cosines[b], row, col, kernel_size, 0.1)
                torch.testing.assert_close(targets[b, row, col], expected)
    interior = torch.zeros(tokens.shape[:3], dtype=torch.bool)
    interior[:, pad:-pad, pad:-pad] = True
    assert torch.all(targets[~interior] == 0)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_loss_matches_loop(kernel_size: int) -> None:
    tokens, cosines, mask = random_batch(kernel_size, seed=1)
    reference = loop_losses(tokens, cosines, mask, kernel_size, 0.1)
    loss = smooth_neighbourhood_loss(tokens, cosines, mask, kernel_size)
    assert loss.item() == pytest.approx(sum(r[-1] for r in reference) / len(reference), rel=1e-10)
    per_image = smooth_neighbourhood_loss(tokens, cosines, mask, kernel_size, reduction="none")
    for b in range(2):
        values = [r[-1] for r in reference if r[0] == b]
        assert per_image[b].item() == pytest.approx(sum(values) / len(values), rel=1e-10)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gradient_only_at_flagged_tokens_and_analytic(kernel_size: int) -> None:
    tokens, cosines, mask = random_batch(kernel_size, seed=2)
    tokens.requires_grad_(True)
    cosines.requires_grad_(True)
    smooth_neighbourhood_loss(tokens, cosines, mask, kernel_size).backward()
    assert cosines.grad is None
    grad_norms = tokens.grad.norm(dim=-1)
    assert torch.all(grad_norms[~mask] == 0)
    assert torch.all(grad_norms[mask] > 0)
    reference = loop_losses(tokens.detach(), cosines.detach(), mask, kernel_size, 0.1)
    for b, row, col, target, _ in reference:
        difference = tokens[b, row, col].detach() - target
        alpha = loop_alpha(tokens[b].detach(), kernel_size)
        torch.testing.assert_close(tokens.grad[b, row, col], difference / (difference.norm() * alpha * len(reference)))


def test_temperature_down_weights_aligned_neighbour() -> None:
    # One-hot tokens on a 3×3 grid: the centre's target is the weight vector of its window.
    tokens = torch.eye(9, dtype=torch.float64).reshape(1, 3, 3, 9)
    gaussian = torch.tensor(KERNEL_3, dtype=torch.float64).flatten() / 16
    cosines = torch.zeros(1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(neighbourhood_targets(tokens, cosines)[0, 1, 1], gaussian)
    cosines[0, 0, 1] = -1.0  # the neighbour above is aligned with the direction (the sign does not matter)
    weights = {t: neighbourhood_targets(tokens, cosines, temperature=t)[0, 1, 1] for t in (1.0, 0.1)}
    for temperature, weight in weights.items():
        expected = gaussian.clone()
        expected[1] *= math.exp(-1 / temperature)
        torch.testing.assert_close(weight, expected / expected.sum())
    assert weights[0.1][1] < weights[1.0][1] < gaussian[1]
    assert torch.all(weights[0.1][[0, 2, 3, 4, 5, 6, 7, 8]] > gaussian[[0, 2, 3, 4, 5, 6, 7, 8]])


def test_tiny_temperature_stays_finite() -> None:
    # exp(-1 / 1e-4) underflows to 0 for every token of the window; the weights must then fall back to G.
    tokens, _, _ = random_batch(3, seed=3)
    cosines = torch.ones(tokens.shape[:3], dtype=torch.float64)
    targets = neighbourhood_targets(tokens, cosines, temperature=1e-4)
    gaussian = gaussian_kernel(3, dtype=torch.float64)
    expected = sum(gaussian[i, j] * tokens[:, i : i + 5, j : j + 6] for i in range(3) for j in range(3))
    torch.testing.assert_close(targets[:, 1:-1, 1:-1], expected)


def test_empty_mask() -> None:
    tokens, cosines, mask = random_batch(3, seed=4)
    tokens.requires_grad_(True)
    empty = torch.zeros_like(mask)
    loss = smooth_neighbourhood_loss(tokens, cosines, empty)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(tokens.grad == 0)

    mask[1] = False  # image 1 has no flagged token: it gets 0, image 0 keeps its own loss
    per_image = smooth_neighbourhood_loss(tokens, cosines, mask, reduction="none")
    only_first = smooth_neighbourhood_loss(tokens[:1], cosines[:1], mask[:1])
    assert per_image[1].item() == 0.0
    assert per_image[0].item() == pytest.approx(only_first.item())
    assert smooth_neighbourhood_loss(tokens, cosines, mask).item() == pytest.approx(only_first.item())


def test_border_flags_and_bad_inputs_raise() -> None:
    tokens, cosines, _ = random_batch(5, seed=5)
    mask = torch.zeros(tokens.shape[:3], dtype=torch.bool)
    mask[0, 1, 3] = True  # interior for K = 3, border ring for K = 5
    assert torch.isfinite(smooth_neighbourhood_loss(tokens, cosines, mask, kernel_size=3))
    with pytest.raises(ValueError, match="border"):
        smooth_neighbourhood_loss(tokens, cosines, mask, kernel_size=5)
    with pytest.raises(ValueError):
        smooth_neighbourhood_loss(tokens, cosines, mask.float())
    with pytest.raises(ValueError):
        smooth_neighbourhood_loss(tokens, cosines[:, :-1], mask)
    with pytest.raises(ValueError):
        smooth_neighbourhood_loss(tokens, cosines, mask, reduction="sum")
    with pytest.raises(ValueError):
        neighbourhood_targets(tokens[:, :4], cosines[:, :4], kernel_size=5)


def test_feature_preservation_loss() -> None:
    tokens, _, mask = random_batch(3, seed=6)
    reference = tokens + 0.5 * torch.randn_like(tokens)
    keep = ~mask
    tokens.requires_grad_(True)
    loss = feature_preservation_loss(tokens, reference, keep)
    cosines = [
        (tokens[b, r, c] @ reference[b, r, c] / (tokens[b, r, c].norm() * reference[b, r, c].norm())).item()
        for b, r, c in keep.nonzero().tolist()
    ]
    assert loss.item() == pytest.approx(sum(1 - c for c in cosines) / len(cosines))
    loss.backward()
    assert torch.all(tokens.grad[mask] == 0)
    assert torch.all(tokens.grad[keep].norm(dim=-1) > 0)

    per_image = feature_preservation_loss(tokens, reference, keep, metric="distance", reduction="none")
    for b in range(2):
        kept = keep[b].nonzero().tolist()
        alpha = sum(reference[b, r, c].norm().item() for r, c in kept) / len(kept)
        distances = [(tokens[b, r, c] - reference[b, r, c]).norm().item() / alpha for r, c in kept]
        assert per_image[b].item() == pytest.approx(sum(distances) / len(distances))

    flat = feature_preservation_loss(tokens.flatten(1, 2), reference.flatten(1, 2), keep.flatten(1))
    assert flat.item() == pytest.approx(loss.item())
    assert feature_preservation_loss(reference, reference, keep).item() == pytest.approx(0.0, abs=1e-12)
    assert feature_preservation_loss(tokens, reference, torch.zeros_like(keep)).item() == 0.0
    with pytest.raises(ValueError):
        feature_preservation_loss(tokens, reference, keep, metric="l1")
