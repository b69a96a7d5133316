"""The trained parts of CAUSE's unsupervised segmentation (the "TR" head of Kim et al., arXiv 2310.07379), on frozen
patch features:

- `ConceptDecoderHead`: one transformer decoder layer whose queries are the tokens' clusterbook concepts (plus a
  learned position embedding) and whose memory is the tokens themselves, then two 1×1 maps to a small feature
  (linear, and a ReLU MLP, added);
- `ProjectionHead`: the linear map to the space of the contrastive loss;
- `ConceptBank`: the teacher projections of earlier batches, at most `BANK_SIZE` per concept.
"""

from __future__ import annotations

import torch
from torch import nn

from .cause_losses import nearest_concepts

HEAD_DIM = 90
"""Width of the head's output features (CAUSE's `reduced_dim`)."""

PROJECTION_DIM = 2048
"""Width of the contrastive projection (CAUSE's `projection_dim`)."""

DECODER_HIDDEN = 2048
"""Hidden width of the decoder layer's MLP."""

DROPOUT = 0.1
"""Dropout of the decoder layer and of the features entering the output maps, in training."""

BANK_SIZE = 100
"""Teacher projections kept per concept in the `ConceptBank` (the newest)."""

BANK_SHARE = 0.5
"""Share of each concept's tokens of a batch that enter the bank (drawn at random)."""


class ConceptDecoderHead(nn.Module):
    """Maps patch features [B, P, C] to head features [B, P, `HEAD_DIM`].

    The queries are the tokens' nearest clusterbook entries (cosine) plus a learned embedding of their position;
    self-attention among the queries, cross-attention to the features, an MLP, each with a residual and a
    LayerNorm (post-norm, one head); the result is added to the features, and the sum goes through a linear map and
    a two-layer ReLU MLP to `HEAD_DIM`, added. In training, dropout acts inside the layer and
    on the sum entering each of the two maps.
    """

    def __init__(self, codebook: torch.Tensor, num_positions: int) -> None:
        super().__init__()
        channels = codebook.shape[1]
        self.register_buffer("codebook", codebook.detach().clone().float())
        self.position = nn.Parameter(torch.randn(num_positions, channels))
        self.self_attention = nn.MultiheadAttention(channels, 1, dropout=DROPOUT, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(channels, 1, dropout=DROPOUT, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(channels, DECODER_HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT), nn.Linear(DECODER_HIDDEN, channels)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(3))
        self.dropout = nn.Dropout(DROPOUT)
        self.linear_out = nn.Linear(channels, HEAD_DIM)
        self.mlp_out = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, HEAD_DIM))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the head features [B, P, `HEAD_DIM`] of patch features [B, P, C] (P = `num_positions`)."""
        if features.shape[1] != self.position.shape[0]:
            raise ValueError(
                f"The head was built for {self.position.shape[0]} patches per image, got {features.shape[1]}."
            )
        queries = self.codebook[nearest_concepts(features, self.codebook)]
        position = self.position[None]
        attended = self.self_attention(queries + position, queries + position, queries, need_weights=False)[0]
        hidden = self.norms[0](queries + self.dropout(attended))
        attended = self.cross_attention(hidden + position, features, features, need_weights=False)[0]
        hidden = self.norms[1](hidden + self.dropout(attended))
        hidden = self.norms[2](hidden + self.dropout(self.mlp(hidden)))
        merged = features + hidden
        return self.linear_out(self.dropout(merged)) + self.mlp_out(self.dropout(merged))


class ProjectionHead(nn.Module):
    """The linear map of head features [..., `HEAD_DIM`] to the contrastive space [..., `PROJECTION_DIM`]."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(HEAD_DIM, PROJECTION_DIM)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the projections of `features`."""
        return self.linear(features)


class ConceptBank:
    """Teacher projections of earlier batches, grouped by concept (the newest `BANK_SIZE` of each)."""

    def __init__(self, codebook: torch.Tensor) -> None:
        self.codebook = codebook
        self.entries: dict[int, torch.Tensor] = {}

    def add(self, concepts: torch.Tensor, projections: torch.Tensor, generator: torch.Generator) -> None:
        """Add `BANK_SHARE` of the projections [M, E] of each concept index in `concepts` [M] (drawn at random)."""
        projections = projections.detach()
        for concept in torch.unique(concepts).tolist():
            members = projections[concepts == concept]
            keep = torch.randperm(members.shape[0], generator=generator)[: int(members.shape[0] * BANK_SHARE)]
            stored = torch.cat([self.entries.get(concept, members[:0]), members[keep.to(members.device)]])
            self.entries[concept] = stored[-BANK_SIZE:]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the stored projections [N, E] and their concept vectors [N, C], or None when the bank is empty."""
        filled = [(concept, stored) for concept, stored in sorted(self.entries.items()) if stored.shape[0] > 0]
        if not filled:
            return None
        projections = torch.cat([stored for _, stored in filled])
        index = torch.cat([torch.full((stored.shape[0],), concept, dtype=torch.long) for concept, stored in filled])
        return projections, self.codebook[index.to(self.codebook.device)]
