"""The losses of CAUSE (Kim et al., "Causal Unsupervised Semantic Segmentation", arXiv 2310.07379), the unsupervised
segmentation protocol of the SINDER paper's table, as pure functions on patch features.

- `modularity_loss`: the negated soft modularity of the cosine-affinity graph of an image's patch tokens under an
  assignment of the tokens to centroids. It fits the concept clusterbook (step 1, 2048 centroids on the backbone's
  tokens) and the cluster probe (step 3, one centroid per class on the head's features).
- `concept_contrastive_loss`: the concept-wise contrastive loss of the segmentation head (step 2): a student
  token's positives are the teacher tokens whose concepts (their nearest clusterbook entries) are similar, its
  negatives those whose concepts are dissimilar, in the batch and in a bank of earlier teacher tokens.
- `grid_sample_positions`: one random token per cell of a square grid, CAUSE's way of keeping the P×P matrices of
  these losses small.
"""

from __future__ import annotations

import torch
from torch import nn

MODULARITY_TEMPERATURE = 0.1
"""Temperature of the soft same-cluster indicator tanh(max_k c_ik c_jk / τ) in `modularity_loss`."""

CONTRASTIVE_TEMPERATURE = 0.07
"""Temperature of the student–teacher cosine similarities in `concept_contrastive_loss`."""

POSITIVE_CONCEPT_SIMILARITY = 0.3
"""Two tokens are a positive pair when the cosine of their concepts is above this."""

NEGATIVE_CONCEPT_SIMILARITY = 0.1
"""Two tokens are a negative pair when the cosine of their concepts is below this (between the two: neither)."""

GRID_CELL = 4
"""Side of the grid cells of `grid_sample_positions` (one token kept per 4×4 patches)."""


def grid_sample_positions(
    batch: int, height: int, width: int, generator: torch.Generator, cell: int = GRID_CELL
) -> torch.Tensor:
    """Return [batch, (height // cell) · (width // cell)] flat positions (row · width + column) in a height × width
    patch grid: one position drawn at random in each cell × cell square of each image; a partial last row or column
    of cells is left out. A grid smaller than one cell keeps every position.
    """
    if height < cell or width < cell:
        return torch.arange(height * width).expand(batch, -1).clone()
    rows, columns = height // cell, width // cell
    offset = torch.randint(cell * cell, (batch, rows, columns), generator=generator)
    row = torch.arange(rows)[:, None] * cell + offset // cell
    column = torch.arange(columns)[None, :] * cell + offset % cell
    return (row * width + column).reshape(batch, -1)


def gather_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Return the tokens [B, M, C] of `features` [B, P, C] at `positions` [B, M]."""
    return torch.gather(features, 1, positions.to(features.device)[..., None].expand(-1, -1, features.shape[-1]))


def nearest_concepts(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Return the index of the codebook row of largest cosine similarity for every token ([..., C] → [...])."""
    similarity = nn.functional.normalize(tokens, dim=-1) @ nn.functional.normalize(codebook, dim=-1).T
    return similarity.argmax(dim=-1)


def modularity_loss(
    tokens: torch.Tensor, centroids: torch.Tensor, temperature: float = MODULARITY_TEMPERATURE
) -> torch.Tensor:
    """Return minus the mean over images of the soft modularity of each image's token graph.

    For the tokens x_1..x_P of one image: affinities A_ij = max(0, cos(x_i, x_j)) with A_ii = 0, degrees
    d_i = Σ_j A_ij, total e = Σ_i d_i; assignments c_ik = max(0, cos(x_i, m_k)) to the centroids m_k; the soft
    same-cluster indicator δ_ij = tanh(max_k c_ik c_jk / τ); modularity Q = Σ_ij (A_ij − d_i d_j / e) δ_ij / e.
    With hard assignments (δ_ij = 1 when i and j share a cluster, else 0) this is Newman's modularity of that
    partition. The tokens are constants (no gradient reaches them); the gradient moves the centroids.

    Args:
        tokens: [B, P, C] token features.
        centroids: [K, C] centroids (any length).
        temperature: τ.

    Returns:
        A scalar: −mean_b Q_b.
    """
    unit = nn.functional.normalize(tokens.detach().float(), dim=-1)
    affinity = (unit @ unit.transpose(1, 2)).clamp_min(0)
    affinity = affinity * (1 - torch.eye(affinity.shape[-1], device=affinity.device))
    degree = affinity.sum(dim=-1)
    total = degree.sum(dim=-1).clamp_min(torch.finfo(affinity.dtype).tiny)
    modularity_matrix = affinity - degree[:, :, None] * degree[:, None, :] / total[:, None, None]
    assignment = (unit @ nn.functional.normalize(centroids.float(), dim=-1).T).clamp_min(0)
    shared = (assignment[:, :, None, :] * assignment[:, None, :, :]).amax(dim=-1)
    same_cluster = torch.tanh(shared / temperature)
    modularity = (modularity_matrix * same_cluster).sum(dim=(1, 2)) / total
    return -modularity.mean()


def _contrastive_term(
    anchors: torch.Tensor, targets: torch.Tensor, concept_similarity: torch.Tensor, excluded: torch.Tensor | None
) -> torch.Tensor | None:
    """Return the mean over positive pairs of −log(exp(s_ij) / Σ_{l ∈ pos ∪ neg} exp(s_il)), s = cos / τ, or None
    when there is no positive pair. `excluded` [A, T] marks pairs that are never positive (a token with itself)."""
    positive = concept_similarity > POSITIVE_CONCEPT_SIMILARITY
    if excluded is not None:
        positive = positive & ~excluded
    if not bool(positive.any()):
        return None
    counted = positive | (concept_similarity < NEGATIVE_CONCEPT_SIMILARITY)
    logits = anchors @ targets.T / CONTRASTIVE_TEMPERATURE
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_normaliser = torch.log((logits.exp() * counted).sum(dim=1, keepdim=True))
    return (log_normaliser - logits)[positive].mean()


def concept_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    concepts: torch.Tensor,
    bank_teacher: torch.Tensor | None = None,
    bank_concepts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return CAUSE's concept-wise contrastive loss of student projections against teacher projections.

    The anchors of image b are its student tokens; the targets are every teacher token of the batch, then every
    token of the bank. A pair is positive when the cosine of the two tokens' concept vectors (their clusterbook
    entries) is above 0.3 (a token is not its own positive), negative when it is below 0.1, ignored otherwise; each
    anchor's loss is the InfoNCE of each positive against the positives and negatives, with the cosine of the
    projections over τ = 0.07 as logits. The loss is the mean over the (image, batch) and (image, bank) terms that
    have a positive pair.

    Args:
        student, teacher: [B, M, E] projections of the same tokens by the student and the teacher.
        concepts: [B, M, C] the concept vector of each token.
        bank_teacher, bank_concepts: [N, E] and [N, C] earlier teacher projections and their concepts (or None).

    Returns:
        A scalar; 0 (with a gradient path) when no term has a positive pair.
    """
    batch, tokens = student.shape[:2]
    anchors = nn.functional.normalize(student.float(), dim=-1)
    targets = nn.functional.normalize(teacher.float(), dim=-1).reshape(batch * tokens, -1)
    unit_concepts = nn.functional.normalize(concepts.float(), dim=-1)
    flat_concepts = unit_concepts.reshape(batch * tokens, -1)
    use_bank = bank_teacher is not None and bank_concepts is not None and bank_teacher.shape[0] > 0
    if use_bank:
        bank_targets = nn.functional.normalize(bank_teacher.float(), dim=-1)
        bank_unit_concepts = nn.functional.normalize(bank_concepts.float(), dim=-1)
    identity = torch.eye(tokens, dtype=torch.bool, device=student.device)
    terms = []
    for image in range(batch):
        excluded = torch.zeros(tokens, batch * tokens, dtype=torch.bool, device=student.device)
        excluded[:, image * tokens : (image + 1) * tokens] = identity
        term = _contrastive_term(anchors[image], targets, unit_concepts[image] @ flat_concepts.T, excluded)
        if term is not None:
            terms.append(term)
        if use_bank:
            term = _contrastive_term(anchors[image], bank_targets, unit_concepts[image] @ bank_unit_concepts.T, None)
            if term is not None:
                terms.append(term)
    if not terms:
        return student.sum() * 0.0
    return torch.stack(terms).mean()
