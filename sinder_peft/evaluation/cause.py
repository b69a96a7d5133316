"""CAUSE's unsupervised segmentation (Kim et al., arXiv 2310.07379) on cached, frozen patch features: the protocol
behind the SINDER paper's unsupervised segmentation numbers (VOC2012 and Cityscapes mIoU and pixel accuracy).

Three fits on the training images' patch features (their labels are never read), then the scoring:

1. `fit_concept_clusterbook`: `concepts` centroids (2048) of the backbone's tokens, fitted by maximising the soft
   modularity of every image's token graph (`modularity_loss`; Adam, one epoch);
2. `train_concept_head`: a `ConceptDecoderHead` and a `ProjectionHead` trained with the concept-wise contrastive
   loss against an exponential-moving-average teacher of themselves (`concept_contrastive_loss`, a `ConceptBank`;
   Adam, two epochs); the teacher head is the result;
3. `fit_cluster_probe`: one centroid per class of the head's features, fitted by modularity (Adam, five epochs,
   the learning rate halved every two);
4. `head_features`: the teacher head's features of the validation images, averaged with those of their mirror
   images (mirrored back);
5. `cause_cluster_maps`: every pixel's feature (bilinearly upsampled) scored by its cosine to each centroid, the
   log-softmax of 3 × these refined by the dense CRF (`dense_crf`, optional), then the best cluster;
   `cause_class_counts` counts them per class for the Hungarian matching (`clustering.matched_confusion`).

Every random draw (initialisations, dropout, shuffles, grid samples, bank draws) comes from `seed`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .cause_head import ConceptBank, ConceptDecoderHead, ProjectionHead
from .cause_losses import (
    concept_contrastive_loss,
    gather_positions,
    grid_sample_positions,
    modularity_loss,
    nearest_concepts,
)
from .clustering import class_lookup, map_class_counts
from .dense_crf import dense_crf_labels

logger = logging.getLogger(__name__)

CLUSTERBOOK_LR_DECAY = 0.2
"""Factor of the clusterbook's learning rate after each epoch."""

PROBE_LR_DECAY = 0.5
"""Factor of the cluster probe's learning rate every `PROBE_LR_DECAY_EPOCHS` epochs."""

PROBE_LR_DECAY_EPOCHS = 2

FEW_STEPS = 100
"""Below this many steps of any of its fits, `fit_cause` warns that CAUSE is barely trained."""

CRF_LOGIT_SCALE = 3.0
"""The cosines to the centroids are multiplied by this before the log-softmax that the dense CRF refines."""

TEACHER_MOMENTUM = 0.99
"""Exponential-moving-average momentum of the teacher head after each step."""


def _uniform_centroids(count: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """Return [count, channels] centroids drawn uniformly in [−1/count, 1/count] (CAUSE's initialisation)."""
    return (torch.rand(count, channels, generator=generator) * 2 - 1) / count


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Return the image indices of one shuffled epoch, in batches of `batch_size`."""
    return list(torch.randperm(count, generator=generator).split(batch_size))


def _flat(features: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Return the patch features [B, h · w, C] of images `index` of [N, h, w, C], as float32 on `device`."""
    batch = features[index].to(device=device, dtype=torch.float32)
    return batch.reshape(batch.shape[0], -1, batch.shape[-1])


def _check_features(features: torch.Tensor, batch_size: int, epochs: int, lr: float) -> None:
    """Raise ValueError unless `features` is a non-empty [N, h, w, C] grid and the settings are positive."""
    if features.dim() != 4 or features.shape[0] == 0:
        raise ValueError(f"Need patch features [N, h, w, C] of at least one image, got {tuple(features.shape)}.")
    if batch_size < 1 or epochs < 1 or lr <= 0:
        raise ValueError(f"Need batch_size ≥ 1, epochs ≥ 1 and lr > 0, got {batch_size}, {epochs}, {lr}.")


def _fit_modularity_centroids(
    features: torch.Tensor,
    count: int,
    channels: int,
    tokens_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    decay_every: int,
    decay: float,
    generator: torch.Generator,
    device: torch.device,
    description: str,
    show_progress: bool,
) -> torch.Tensor:
    """Return `count` centroids [count, channels] (on `device`, not normalised) of the tokens `tokens_of` makes of
    each batch of patch features [B, h · w, C], maximising the soft modularity of each image's tokens at one random
    position per 4×4 cell (`modularity_loss`): uniform start, Adam at `lr`, times `decay` every `decay_every`
    epochs."""
    height, width = features.shape[1:3]
    centroids = _uniform_centroids(count, channels, generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([centroids], lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=decay)
    steps = epochs * math.ceil(features.shape[0] / batch_size)
    with tqdm(total=steps, desc=description, unit="step", disable=not show_progress) as progress:
        for _ in range(epochs):
            for index in _batches(features.shape[0], batch_size, generator):
                tokens = tokens_of(_flat(features, index, device))
                positions = grid_sample_positions(index.numel(), height, width, generator)
                loss = modularity_loss(gather_positions(tokens, positions), centroids)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update()
            scheduler.step()
    logger.info("%s: %d centroids, last modularity %.4f.", description, count, -float(loss.detach()))
    return centroids.detach()


def fit_concept_clusterbook(
    features: torch.Tensor,
    concepts: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    device: torch.device,
    show_progress: bool = True,
) -> torch.Tensor:
    """Return the [concepts, C] clusterbook of the patch features [N, h, w, C]: centroids maximising the soft
    modularity of each image's grid-sampled tokens (Adam at `lr`, times 0.2 after each epoch)."""
    _check_features(features, batch_size, epochs, lr)
    if concepts < 2:
        raise ValueError(f"A clusterbook needs at least two concepts, got {concepts}.")
    return _fit_modularity_centroids(
        features,
        concepts,
        features.shape[-1],
        nn.Identity(),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        decay_every=1,
        decay=CLUSTERBOOK_LR_DECAY,
        generator=generator,
        device=device,
        description="CAUSE clusterbook",
        show_progress=show_progress,
    )


def _momentum_update(teacher: nn.Module, student: nn.Module) -> None:
    """Move every teacher parameter towards the student's: t ← m t + (1 − m) s."""
    with torch.no_grad():
        for teacher_parameter, student_parameter in zip(teacher.parameters(), student.parameters(), strict=True):
            teacher_parameter.mul_(TEACHER_MOMENTUM).add_(student_parameter, alpha=1 - TEACHER_MOMENTUM)


def train_concept_head(
    features: torch.Tensor,
    codebook: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    generator: torch.Generator,
    device: torch.device,
    show_progress: bool = True,
) -> ConceptDecoderHead:
    """Train CAUSE's segmentation head on the patch features [N, h, w, C] and return the teacher head (eval mode).

    Each step: the teacher (head and projection, with dropout, no gradient) and the student project the batch; on
    one random token per 4×4 cell, the student's projections are pulled towards the teacher's of tokens with a
    similar concept and pushed from those with a dissimilar one, in the batch and in the bank
    (`concept_contrastive_loss`); Adam (`lr`, `weight_decay`) after clipping the gradient norm to `max_grad_norm`;
    then the teacher moves towards the student (momentum 0.99) and half the teacher tokens of each concept enter the
    bank.
    """
    _check_features(features, batch_size, epochs, lr)
    height, width = features.shape[1:3]
    codebook = codebook.to(device)
    head = ConceptDecoderHead(codebook, height * width).to(device)
    projection = ProjectionHead().to(device)
    teacher_head, teacher_projection = copy.deepcopy(head), copy.deepcopy(projection)
    for module in (teacher_head, teacher_projection):
        module.requires_grad_(False)
    parameters = [*head.parameters(), *projection.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    bank = ConceptBank(codebook)
    steps = epochs * math.ceil(features.shape[0] / batch_size)
    losses = []
    with tqdm(total=steps, desc="CAUSE head", unit="step", disable=not show_progress) as progress:
        for _ in range(epochs):
            for index in _batches(features.shape[0], batch_size, generator):
                tokens = _flat(features, index, device)
                with torch.no_grad():
                    teacher = teacher_projection(teacher_head(tokens))
                student = projection(head(tokens))
                positions = grid_sample_positions(index.numel(), height, width, generator)
                sampled_tokens = gather_positions(tokens, positions)
                sampled_teacher = gather_positions(teacher, positions)
                concept_index = nearest_concepts(sampled_tokens, codebook)
                stored = bank.contents()
                loss = concept_contrastive_loss(
                    gather_positions(student, positions),
                    sampled_teacher,
                    codebook[concept_index],
                    *(stored if stored is not None else (None, None)),
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                _momentum_update(teacher_head, head)
                _momentum_update(teacher_projection, projection)
                bank.add(concept_index.reshape(-1), sampled_teacher.reshape(-1, sampled_teacher.shape[-1]), generator)
                losses.append(float(loss.detach()))
                progress.update()
    logger.info("CAUSE head: contrastive loss %.4f at the first step, %.4f at the last.", losses[0], losses[-1])
    return teacher_head.eval()


def fit_cluster_probe(
    features: torch.Tensor,
    head: ConceptDecoderHead,
    clusters: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    device: torch.device,
    show_progress: bool = True,
) -> torch.Tensor:
    """Return [clusters, `HEAD_DIM`] unit-norm centroids of the head's features of the patch features [N, h, w, C]:
    the head in training mode (with dropout, as CAUSE), one random token per 4×4 cell, centroids maximising the
    soft modularity (Adam at `lr`, halved every two epochs)."""
    _check_features(features, batch_size, epochs, lr)
    if clusters < 2:
        raise ValueError(f"Need at least two clusters, got {clusters}.")

    def head_tokens(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(tokens)

    head.train()
    centroids = _fit_modularity_centroids(
        features,
        clusters,
        head.linear_out.out_features,
        head_tokens,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        decay_every=PROBE_LR_DECAY_EPOCHS,
        decay=PROBE_LR_DECAY,
        generator=generator,
        device=device,
        description="CAUSE cluster probe",
        show_progress=show_progress,
    )
    head.eval()
    return nn.functional.normalize(centroids, dim=-1).cpu()


def head_features(
    head: ConceptDecoderHead,
    features: torch.Tensor,
    mirrored: torch.Tensor | None,
    *,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Return the head's features [N, h, w, `HEAD_DIM`] (float32, CPU) of patch features [N, h, w, C], averaged with
    those of the mirror images' features `mirrored` (flipped back left–right) when given."""
    if mirrored is not None and mirrored.shape != features.shape:
        raise ValueError(f"Mirrored features {tuple(mirrored.shape)} differ from {tuple(features.shape)}.")
    height, width = features.shape[1:3]
    head.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            index = torch.arange(start, min(start + batch_size, features.shape[0]))
            result = head(_flat(features, index, device)).reshape(index.numel(), height, width, -1)
            if mirrored is not None:
                flipped = head(_flat(mirrored, index, device)).reshape(index.numel(), height, width, -1)
                result = (result + flipped.flip(dims=[2])) / 2
            outputs.append(result.cpu())
    return torch.cat(outputs)


def cause_cluster_maps(
    features: torch.Tensor,
    centroids: torch.Tensor,
    map_size: tuple[int, int],
    pictures: list[np.ndarray] | None = None,
    device: torch.device | str = "cpu",
    executor: Executor | None = None,
) -> torch.Tensor:
    """Return the cluster of every pixel [B, H, W] of head features [B, h, w, E]: the features upsampled bilinearly
    to `map_size`, each pixel's cosine to the unit-norm `centroids` [K, E]; with `pictures` (one [H, W, 3] uint8
    RGB image per map, as the model saw it) the log-softmax of `CRF_LOGIT_SCALE` × the cosines is refined by the
    dense CRF (in `executor`'s processes when given); then the cluster of largest score."""
    grid = features.to(device).float().permute(0, 3, 1, 2)
    upsampled = nn.functional.interpolate(grid, size=map_size, mode="bilinear", align_corners=False)
    cosine = torch.einsum("bchw,kc->bkhw", nn.functional.normalize(upsampled, dim=1), centroids.to(device).float())
    if pictures is None:
        return cosine.argmax(dim=1)
    if len(pictures) != features.shape[0]:
        raise ValueError(f"Need one picture per map, got {len(pictures)} for {features.shape[0]}.")
    log_probabilities = list(torch.log_softmax(cosine * CRF_LOGIT_SCALE, dim=1).cpu().numpy())
    labels = (executor.map if executor is not None else map)(dense_crf_labels, pictures, log_probabilities)
    return torch.from_numpy(np.stack(list(labels))).to(device)


def cause_class_counts(
    features: torch.Tensor,
    centroids: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor,
    ignore_index: int,
    *,
    picture: Callable[[int], np.ndarray] | None,
    batch_size: int,
    crf_processes: int = 0,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> torch.Tensor:
    """Return [clusters, len(classes)] int64 pixel counts of `cause_cluster_maps` of head features [N, h, w, E]
    against [N, H, W] `masks` (non-ignored pixels), `picture(i)` giving image i's pixels for the dense CRF (None:
    no CRF), which runs in `crf_processes` new processes (0: in this one).

    Raises:
        ValueError: a mask holds a label that is neither in `classes` nor `ignore_index`.
    """
    clusters = centroids.shape[0]
    lookup = class_lookup(masks, classes, ignore_index)
    map_size = (masks.shape[1], masks.shape[2])
    counts = torch.zeros(clusters, classes.numel(), dtype=torch.int64)
    description = "CAUSE scoring" + (" (dense CRF)" if picture is not None else "")
    progress = tqdm(total=features.shape[0], desc=description, unit="img", disable=not show_progress)
    use_pool = picture is not None and crf_processes > 0
    # "spawn": the CRF processes start clean, not as forks of a process that runs threads
    pool = ProcessPoolExecutor(crf_processes, mp_context=multiprocessing.get_context("spawn")) if use_pool else None
    with torch.no_grad(), progress as bar, pool if pool is not None else contextlib.nullcontext():
        for start in range(0, features.shape[0], batch_size):
            stop = min(start + batch_size, features.shape[0])
            pictures = [picture(index) for index in range(start, stop)] if picture is not None else None
            assigned = cause_cluster_maps(features[start:stop], centroids, map_size, pictures, device, pool)
            counts += map_class_counts(assigned, masks[start:stop], lookup, clusters, ignore_index)
            bar.update(stop - start)
    return counts


def fit_cause(
    train_features: torch.Tensor,
    clusters: int,
    *,
    concepts: int,
    clusterbook_epochs: int,
    head_epochs: int,
    probe_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> tuple[ConceptDecoderHead, torch.Tensor]:
    """Run CAUSE's three fits on the training patch features [N, h, w, C] and return the trained head (eval mode)
    and its [clusters, `HEAD_DIM`] unit-norm cluster centroids. Every random draw comes from `seed`; the global
    random state is left as it was.

    Raises:
        ValueError: the features are empty or a setting is out of range.
    """
    device = torch.device(device)
    steps_per_epoch = math.ceil(train_features.shape[0] / max(batch_size, 1))
    steps = {
        "clusterbook": clusterbook_epochs * steps_per_epoch,
        "head": head_epochs * steps_per_epoch,
        "cluster probe": probe_epochs * steps_per_epoch,
    }
    if min(steps.values()) < FEW_STEPS:
        logger.warning(
            "CAUSE's fits make %s steps (%d images in batches of %d): its published runs make thousands of each; "
            "with fewer, the clusterbook, the head and the centroids stay near their random start.",
            ", ".join(f"{count} {fit}" for fit, count in steps.items()),
            train_features.shape[0],
            batch_size,
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        codebook = fit_concept_clusterbook(
            train_features,
            concepts,
            epochs=clusterbook_epochs,
            batch_size=batch_size,
            lr=lr,
            generator=generator,
            device=device,
            show_progress=show_progress,
        )
        head = train_concept_head(
            train_features,
            codebook,
            epochs=head_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            generator=generator,
            device=device,
            show_progress=show_progress,
        )
        centroids = fit_cluster_probe(
            train_features,
            head,
            clusters,
            epochs=probe_epochs,
            batch_size=batch_size,
            lr=lr,
            generator=generator,
            device=device,
            show_progress=show_progress,
        )
    return head, centroids
