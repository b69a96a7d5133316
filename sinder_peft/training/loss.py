"""The smooth neighbourhood loss of SINDER (docs/method.md §3), and a feature-preservation term.

A defect token is pulled towards a target T: the average of its K×K neighbourhood, in which every token is weighted
by a Gaussian kernel times an affinity ``exp(-c / temperature)``, c being the token's absolute cosine to the layer's
defect direction, so that tokens aligned with the defect barely count. The distance to T is divided by α, the mean
token norm of the image, which makes the loss comparable across layers and models. T and α carry no gradient.

All functions work on patch tokens laid out as a grid, ``tokens[b, row, col, :]``, and are vectorized over the batch
and the grid. Tokens closer than ``kernel_size // 2`` to the image border (the "border ring") have no full window;
they have no target and can never be flagged (see `analysis.detection.find_defect_tokens`).
"""

from typing import Literal

import torch

_KERNELS: dict[int, tuple[tuple[int, ...], int]] = {
    3: ((1, 2, 1, 2, 4, 2, 1, 2, 1), 16),
    5: ((1, 4, 7, 4, 1, 4, 16, 26, 16, 4, 7, 26, 41, 26, 7, 4, 16, 26, 16, 4, 1, 4, 7, 4, 1), 273),
}

Reduction = Literal["mean", "none"]


def gaussian_kernel(
    kernel_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return the K×K Gaussian kernel of the original SINDER code, which sums to 1.

    K = 3: [1 2 1; 2 4 2; 1 2 1] / 16; K = 5: the standard integer 5×5 kernel divided by 273. Other sizes raise a
    `ValueError`.
    """
    if kernel_size not in _KERNELS:
        raise ValueError(f"kernel_size must be one of {sorted(_KERNELS)}, got {kernel_size}.")
    values, total = _KERNELS[kernel_size]
    return torch.tensor(values, dtype=dtype, device=device).reshape(kernel_size, kernel_size) / total


def _check_grid(tokens: torch.Tensor, cosines: torch.Tensor, kernel_size: int) -> None:
    """Raise a `ValueError` unless tokens is [B, H, W, C], cosines is [B, H, W] and the grid holds one window."""
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be [batch, height, width, channels], got shape {tuple(tokens.shape)}.")
    if cosines.shape != tokens.shape[:3]:
        raise ValueError(f"cosines must have shape {tuple(tokens.shape[:3])}, got {tuple(cosines.shape)}.")
    if min(tokens.shape[1:3]) < kernel_size:
        raise ValueError(f"A {tuple(tokens.shape[1:3])} grid is smaller than the {kernel_size}×{kernel_size} window.")


@torch.no_grad()
def neighbourhood_targets(
    tokens: torch.Tensor, cosines: torch.Tensor, kernel_size: int = 3, temperature: float = 0.1
) -> torch.Tensor:
    """Return the smoothed target T of every token, shape [B, H, W, C], without gradient.

    Args:
        tokens: patch tokens, [B, H, W, C].
        cosines: cosine of each token to the defect direction, [B, H, W]; its absolute value is used, since the
            direction's sign is arbitrary.
        kernel_size: K, 3 or 5.
        temperature: affinity temperature; the lower, the less tokens aligned with the defect direction count.

    For an interior position, the window is the K×K block centred on it, centre included; token k of the window gets
    the weight ``exp(-c_k / temperature) * G_k``, normalized to sum to 1 (computed as a softmax of
    ``-c / temperature + log G``, which is the same number and cannot underflow to 0/0). T is the weighted average of
    the window's tokens. Positions in the border ring (width ``K // 2``) have no window: their target is 0.
    The sum runs over the K² window offsets, each a shifted view of the grid, so memory stays O(B·H·W·C).
    """
    _check_grid(tokens, cosines, kernel_size)
    pad = kernel_size // 2
    height, width = tokens.shape[1] - 2 * pad, tokens.shape[2] - 2 * pad
    compute_dtype = torch.promote_types(cosines.dtype, torch.float32)
    log_kernel = gaussian_kernel(kernel_size, dtype=compute_dtype, device=tokens.device).log()
    logits = -cosines.to(compute_dtype).abs() / temperature
    windows = logits.unfold(1, kernel_size, 1).unfold(2, kernel_size, 1) + log_kernel  # [B, h, w, K, K]
    weights = windows.flatten(-2).softmax(dim=-1).to(tokens.dtype)  # [B, h, w, K*K], offset (i, j) at i * K + j
    interior = sum(
        weights[..., i * kernel_size + j, None] * tokens[:, i : i + height, j : j + width]
        for i in range(kernel_size)
        for j in range(kernel_size)
    )
    targets = torch.zeros_like(tokens)
    targets[:, pad : pad + height, pad : pad + width] = interior
    return targets


def _reduce_per_image(
    values: torch.Tensor, image_index: torch.Tensor, batch_size: int, reduction: Reduction
) -> torch.Tensor:
    """Average per-token ``values`` per image ("none", [B], 0 where an image has none) or over all tokens ("mean").

    Both are NaN-free when there is no token at all, and stay connected to the graph so `backward` still works.
    """
    if reduction == "mean":
        return values.sum() / max(values.numel(), 1)
    if reduction == "none":
        sums = values.new_zeros(batch_size).index_add(0, image_index, values)
        counts = torch.bincount(image_index, minlength=batch_size).clamp(min=1)
        return sums / counts
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")


def smooth_neighbourhood_loss(
    tokens: torch.Tensor,
    cosines: torch.Tensor,
    defect_mask: torch.Tensor,
    kernel_size: int = 3,
    temperature: float = 0.1,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Return SINDER's smooth neighbourhood loss: the mean over flagged tokens of ``‖x − T‖ / α``.

    Args:
        tokens: patch tokens of the defective layer's output, [B, H, W, C]; each image may come from its own layer.
        cosines: cosine of each token to that layer's defect direction, [B, H, W] (absolute value is used).
        defect_mask: boolean [B, H, W], the tokens to repair (each image has its own).
        kernel_size: K, 3 or 5.
        temperature: affinity temperature of `neighbourhood_targets`.
        reduction: "mean" averages over all flagged tokens of the batch (for batch 1 this is the paper's loss;
            an image weighs as much as it has flagged tokens). "none" returns one loss per image, [B]: the mean over
            that image's flagged tokens, 0 for an image without any (average the others yourself to weigh images
            equally).

    T (`neighbourhood_targets`) and α (the image's mean token norm over the interior, i.e. outside the border ring)
    are computed without gradient, so the gradient flows only into ``tokens`` at flagged positions:
    ``(x − T) / (‖x − T‖ · α · n)`` with n the number of tokens averaged. With no flagged token the loss is 0 (still
    differentiable, with zero gradient). A flagged token on the border ring has no target and raises a `ValueError`:
    it means the mask was computed for another kernel size.
    """
    _check_grid(tokens, cosines, kernel_size)
    if defect_mask.shape != tokens.shape[:3] or defect_mask.dtype != torch.bool:
        raise ValueError(f"defect_mask must be a bool tensor of shape {tuple(tokens.shape[:3])}.")
    pad = kernel_size // 2
    interior = torch.zeros_like(defect_mask)
    interior[:, pad : tokens.shape[1] - pad, pad : tokens.shape[2] - pad] = True
    if (defect_mask & ~interior).any():
        raise ValueError(f"defect_mask flags tokens on the border ring of width {pad}, where no target exists.")

    targets = neighbourhood_targets(tokens, cosines, kernel_size, temperature)
    with torch.no_grad():
        norms = tokens.norm(dim=-1)
        alpha = (norms * interior).sum(dim=(1, 2)) / interior.sum(dim=(1, 2))  # [B]
    image_index = defect_mask.nonzero()[:, 0]
    distances = (tokens[defect_mask] - targets[defect_mask]).norm(dim=-1) / alpha[image_index]
    return _reduce_per_image(distances, image_index, tokens.shape[0], reduction)


def feature_preservation_loss(
    tokens: torch.Tensor,
    reference_tokens: torch.Tensor,
    keep_mask: torch.Tensor,
    metric: Literal["cosine", "distance"] = "cosine",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Return how far kept tokens moved from reference tokens: the mean over kept tokens of a per-token distance.

    Meant to hold the clean tokens in place while defect tokens are repaired: ``reference_tokens`` are the same
    layer's tokens from the frozen model (adapter disabled, no gradient; they are detached here), ``keep_mask`` the
    tokens to keep (e.g. ``~defect_mask``).

    Args:
        tokens: [B, ..., C] (e.g. [B, H, W, C] or [B, N, C]).
        reference_tokens: same shape as ``tokens``.
        keep_mask: boolean, ``tokens.shape[:-1]``.
        metric: "cosine" gives ``1 − cos(x, r)``, scale-free, the quantity checked after repair (mean cosine of clean
            tokens to the original); "distance" gives ``‖x − r‖ / α_ref``, α_ref the image's mean reference norm over
            kept tokens, in the same units as `smooth_neighbourhood_loss`.
        reduction: "mean" over all kept tokens of the batch, or "none" for one value per image (0 if none kept).
    """
    if reference_tokens.shape != tokens.shape:
        raise ValueError(
            f"reference_tokens must have shape {tuple(tokens.shape)}, got {tuple(reference_tokens.shape)}."
        )
    if keep_mask.shape != tokens.shape[:-1] or keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be a bool tensor of shape {tuple(tokens.shape[:-1])}.")
    reference_tokens = reference_tokens.detach()
    image_index = keep_mask.nonzero()[:, 0]
    kept, reference = tokens[keep_mask], reference_tokens[keep_mask]
    if metric == "cosine":
        values = 1 - torch.nn.functional.cosine_similarity(kept, reference, dim=-1)
    elif metric == "distance":
        reference_norms = reference_tokens.norm(dim=-1).flatten(1)
        kept_per_image = keep_mask.flatten(1)
        alpha = (reference_norms * kept_per_image).sum(dim=1) / kept_per_image.sum(dim=1).clamp(min=1)
        values = (kept - reference).norm(dim=-1) / alpha[image_index]
    else:
        raise ValueError(f"metric must be 'cosine' or 'distance', got {metric!r}.")
    return _reduce_per_image(values, image_index, tokens.shape[0], reduction)
