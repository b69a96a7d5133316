"""Unsupervised segmentation of `sinder evaluate`, as pure functions on cached features: k-means on patch tokens and
a Hungarian matching of the clusters to the classes (CAUSE's clusters, `cause.py`, are scored by the same matching).

The k-means protocol (`--unsupervised-protocol kmeans`, the common training-free baseline of unsupervised semantic
segmentation, e.g. in PiCIE's and STEGO's evaluations):

1. every last-layer patch token of the validation images is L2-normalised;
2. spherical k-means (cosine similarity) with as many clusters as the masks hold classes, fitted on at most
   `max_tokens` tokens drawn at random over all images, k-means++ initialisation, `restarts` runs, the one with the
   largest total similarity kept;
3. every pixel takes the cluster of largest cosine similarity, the similarities of the patch grid being upsampled
   bilinearly to the mask (as the segmentation probe's logits);
4. clusters are matched one-to-one to classes so that the matched pixels are as many as possible (Hungarian
   algorithm on the cluster × class pixel counts, over the whole set); an unmatched cluster (more clusters than
   classes) counts as a wrong class;
5. IoU per class from the matched confusion matrix, mIoU over the classes present or predicted.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

_ASSIGN_CHUNK = 65536
_SCORE_ELEMENTS = 2**23


def _normalised(features: torch.Tensor) -> torch.Tensor:
    """Return float32 rows of unit length."""
    return nn.functional.normalize(features.float(), dim=-1)


def _assign(tokens: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the nearest centroid (largest cosine) of every unit-norm token and that similarity, in chunks."""
    labels, similarities = [], []
    for start in range(0, tokens.shape[0], _ASSIGN_CHUNK):
        best = (tokens[start : start + _ASSIGN_CHUNK] @ centroids.T).max(dim=1)
        labels.append(best.indices)
        similarities.append(best.values)
    return torch.cat(labels), torch.cat(similarities)


def _kmeans_plus_plus(tokens: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Return `clusters` initial centroids chosen by k-means++ with the cosine distance 1 − cos."""
    first = int(torch.randint(tokens.shape[0], (1,), generator=generator))
    centroids = [tokens[first]]
    distance = (1 - tokens @ tokens[first]).clamp_min(0)
    for _ in range(1, clusters):
        total = float(distance.sum())
        if total <= 0:
            index = int(torch.randint(tokens.shape[0], (1,), generator=generator))
        else:
            index = int(torch.multinomial(distance.cpu().double() / total, 1, generator=generator))
        centroids.append(tokens[index])
        distance = torch.minimum(distance, (1 - tokens @ tokens[index]).clamp_min(0))
    return torch.stack(centroids)


def spherical_kmeans(
    features: torch.Tensor,
    clusters: int,
    *,
    iterations: int = 50,
    restarts: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return [clusters, C] unit-norm centroids of k-means with cosine similarity on `features` [M, C].

    Lloyd iterations (assign every token to the centroid of largest cosine, move each centroid to the normalised
    mean of its tokens; an empty cluster keeps its centroid) until no assignment changes or `iterations` passes; of
    `restarts` runs from k-means++ starts (seeded by `seed`), the one with the largest total similarity is kept.

    Raises:
        ValueError: if there are fewer tokens than clusters, or a setting is out of range.
    """
    if clusters < 1 or iterations < 1 or restarts < 1:
        raise ValueError(f"Need clusters, iterations and restarts ≥ 1, got {clusters}, {iterations}, {restarts}.")
    if features.shape[0] < clusters:
        raise ValueError(f"Cannot make {clusters} clusters of {features.shape[0]} tokens.")
    tokens = _normalised(features.to(device))
    generator = torch.Generator().manual_seed(seed)
    best, best_score = None, -math.inf
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(tokens, clusters, generator)
        labels = None
        for _ in range(iterations):
            new_labels, similarity = _assign(tokens, centroids)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            sums = torch.zeros_like(centroids).index_add_(0, labels, tokens)
            filled = torch.bincount(labels, minlength=clusters) > 0
            centroids = torch.where(filled[:, None], _normalised(sums), centroids)
        score = float(_assign(tokens, centroids)[1].sum())
        if score > best_score:
            best, best_score = centroids, score
    assert best is not None
    return best.cpu()


def cluster_maps(
    patches: torch.Tensor, centroids: torch.Tensor, map_size: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Return the cluster of every pixel [B, H, W] for patch features [B, h, w, C] and unit-norm centroids: cosine
    similarities to the centroids, upsampled bilinearly to `map_size`, then argmax."""
    tokens = _normalised(patches.to(device))
    similarity = (tokens @ centroids.to(device).float().T).permute(0, 3, 1, 2)
    upsampled = nn.functional.interpolate(similarity, size=map_size, mode="bilinear", align_corners=False)
    return upsampled.max(dim=1).indices


def class_lookup(masks: torch.Tensor, classes: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Return a table from every label of `masks` to its position in `classes` (−1 for a label outside them)."""
    lookup = torch.full((max(int(masks.max()), int(classes.max()), ignore_index) + 1,), -1, dtype=torch.long)
    lookup[classes.long()] = torch.arange(classes.numel())
    return lookup


def map_class_counts(
    assigned: torch.Tensor, masks: torch.Tensor, lookup: torch.Tensor, clusters: int, ignore_index: int
) -> torch.Tensor:
    """Return [clusters, K] int64 counts of the pixels of each class (position in `class_lookup`'s classes) in each
    cluster, over the non-ignored pixels of cluster maps `assigned` and `masks` [B, H, W].

    Raises:
        ValueError: a mask holds a label that is neither one of the classes nor `ignore_index`.
    """
    classes = int((lookup >= 0).sum())
    labels = masks.long()
    valid = labels != ignore_index
    index = lookup[labels[valid]].to(assigned.device)
    if bool((index < 0).any()):
        raise ValueError("A mask holds a label outside the classes being matched.")
    counts = torch.bincount(assigned[valid.to(assigned.device)] * classes + index, minlength=clusters * classes)
    return counts.view(clusters, classes).cpu()


def cluster_class_counts(
    patches: torch.Tensor,
    centroids: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor,
    ignore_index: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return [clusters, len(classes)] int64 pixel counts: how many pixels of each class (label `classes[j]`) fall
    in each cluster (`cluster_maps`), over every non-ignored pixel of [N, H, W] `masks`.

    Raises:
        ValueError: a mask holds a label that is neither in `classes` nor `ignore_index`.
    """
    clusters = centroids.shape[0]
    lookup = class_lookup(masks, classes, ignore_index)
    map_size = (masks.shape[1], masks.shape[2])
    per_chunk = max(1, _SCORE_ELEMENTS // (clusters * map_size[0] * map_size[1]))
    counts = torch.zeros(clusters, classes.numel(), dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, patches.shape[0], per_chunk):
            assigned = cluster_maps(patches[start : start + per_chunk], centroids, map_size, device)
            counts += map_class_counts(assigned, masks[start : start + per_chunk], lookup, clusters, ignore_index)
    return counts


def maximum_matching(weights: torch.Tensor) -> list[tuple[int, int]]:
    """Return the one-to-one pairs (row, column) of a [R, C] weight matrix with the largest total weight.

    min(R, C) pairs: the Hungarian algorithm (shortest augmenting paths with potentials, O(n³)) on the negated
    weights, padded to a square with zeros.
    """
    rows, columns = weights.shape
    size = max(rows, columns)
    cost = torch.zeros(size, size, dtype=torch.float64)
    cost[:rows, :columns] = -weights.double()
    values = cost.tolist()
    infinity = math.inf
    # 1-based arrays: u, v potentials; match[j] the row matched to column j; way[j] the previous column on the path
    u = [0.0] * (size + 1)
    v = [0.0] * (size + 1)
    match = [0] * (size + 1)
    way = [0] * (size + 1)
    for row in range(1, size + 1):
        match[0] = row
        column = 0
        smallest = [infinity] * (size + 1)
        used = [False] * (size + 1)
        while True:
            used[column] = True
            current_row, delta, next_column = match[column], infinity, 0
            for j in range(1, size + 1):
                if used[j]:
                    continue
                reduced = values[current_row - 1][j - 1] - u[current_row] - v[j]
                if reduced < smallest[j]:
                    smallest[j], way[j] = reduced, column
                if smallest[j] < delta:
                    delta, next_column = smallest[j], j
            for j in range(size + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    smallest[j] -= delta
            column = next_column
            if match[column] == 0:
                break
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    pairs = [(match[j] - 1, j - 1) for j in range(1, size + 1)]
    return sorted((row, column) for row, column in pairs if row < rows and column < columns)


def matched_confusion(counts: torch.Tensor) -> torch.Tensor:
    """Return the [K + 1, K + 1] confusion matrix (rows: true class, columns: predicted) of clusters matched to the
    K classes by `maximum_matching` of the [clusters, K] pixel counts; column K collects the pixels of unmatched
    clusters (a class nobody has), row K is empty."""
    clusters, classes = counts.shape
    confusion = torch.zeros(classes + 1, classes + 1, dtype=torch.int64)
    assigned = dict(maximum_matching(counts))
    for cluster in range(clusters):
        confusion[:classes, assigned.get(cluster, classes)] += counts[cluster]
    return confusion
