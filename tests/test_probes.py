"""The probe math against independent computations: kNN votes, patch histograms, the patch loss, IoU, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sinder_peft.evaluation.probes import (
    IGNORE_INDEX,
    LinearSegmentationProbe,
    confusion_matrix,
    evaluate_segmentation_probe,
    intersection_over_union,
    knn_class_scores,
    knn_top1_accuracy,
    mean_iou,
    patch_cross_entropy,
    patch_label_counts,
    train_linear_segmentation_probe,
)


def looped_knn_prediction(bank: list[list[float]], labels: list[int], query: list[float], k: int, t: float) -> int:
    """One query, plain Python: cosine to every training feature, the k most similar vote exp(cos / t)."""

    def unit(vector: list[float]) -> list[float]:
        norm = math.sqrt(sum(value * value for value in vector))
        return [value / norm for value in vector]

    query = unit(query)
    similarities = [sum(a * b for a, b in zip(query, unit(row), strict=True)) for row in bank]
    order = sorted(range(len(bank)), key=lambda index: -similarities[index])[:k]
    votes: dict[int, float] = {}
    for index in order:
        votes[labels[index]] = votes.get(labels[index], 0.0) + math.exp(similarities[index] / t)
    return max(sorted(votes), key=lambda label: votes[label])


def test_knn_matches_a_loop_over_neighbours() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator)
    train_labels = torch.randint(0, 3, (60,), generator=generator)
    train = centres[train_labels] + 1.5 * torch.randn(60, 8, generator=generator)
    query_labels = torch.randint(0, 3, (25,), generator=generator)
    queries = centres[query_labels] + 1.5 * torch.randn(25, 8, generator=generator)
    ks = (1, 5, 20, 60)
    scores = knn_class_scores(train, train_labels, queries, num_classes=3, ks=ks, temperature=0.07)
    accuracy = knn_top1_accuracy(train, train_labels, queries, query_labels, ks=ks, temperature=0.07)
    for k in ks:
        expected = [
            looped_knn_prediction(train.tolist(), train_labels.tolist(), query, k, 0.07) for query in queries.tolist()
        ]
        assert scores[k].argmax(dim=1).tolist() == expected
        correct = sum(int(p == t) for p, t in zip(expected, query_labels.tolist(), strict=True))
        assert accuracy[k] == pytest.approx(100 * correct / 25)
    # the vote weights themselves: k = 1 gives exp(s / T) of the nearest neighbour to its class alone
    nearest = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(train, dim=1).T
    top = nearest.max(dim=1)
    torch.testing.assert_close(scores[1].max(dim=1).values, torch.exp(top.values / 0.07), rtol=1e-5, atol=0)


def test_knn_k_beyond_the_training_set_uses_all_of_it() -> None:
    train = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1])
    scores = knn_class_scores(train, labels, torch.ones(1, 4), num_classes=2, ks=(4, 200), temperature=0.07)
    torch.testing.assert_close(scores[200], scores[4])
    with pytest.raises(ValueError, match="k must be positive"):
        knn_class_scores(train, labels, torch.ones(1, 4), num_classes=2, ks=(0,), temperature=0.07)


def test_patch_label_counts_matches_a_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 4, (3, 6, 9), generator=generator).to(torch.uint8)
    masks[0, 0, :] = IGNORE_INDEX
    counts = patch_label_counts(masks, 3, 4)
    assert counts.shape == (3, 2, 3, 4) and counts.dtype == torch.int16
    for image in range(3):
        for row in range(2):
            for column in range(3):
                patch = masks[image, 3 * row : 3 * row + 3, 3 * column : 3 * column + 3].flatten().tolist()
                expected = [sum(1 for value in patch if value == label) for label in range(4)]
                assert counts[image, row, column].tolist() == expected
    assert int(counts[0, 0].sum()) == 3 * 3 * 3 - 9  # the ignored pixel row is not counted
    wide = masks.long()
    assert torch.equal(patch_label_counts(wide, 3, 4), counts) and torch.equal(wide, masks.long())  # input untouched
    with pytest.raises(ValueError, match="Mask labels must be in"):
        patch_label_counts(torch.full((1, 3, 3), 7, dtype=torch.uint8), 3, 4)
    with pytest.raises(ValueError, match="do not tile"):
        patch_label_counts(torch.zeros(1, 4, 3, dtype=torch.uint8), 3, 4)


def test_patch_loss_is_the_pixel_loss_with_nearest_upsampling() -> None:
    generator = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 3, (2, 8, 12), generator=generator)
    masks[1, 2:5, 3:9] = IGNORE_INDEX
    logits = torch.randn(2, 3, 2, 3, generator=generator)  # [B, K, h, w], patches of 4 pixels
    pixel_logits = nn.functional.interpolate(logits, size=(8, 12), mode="nearest")
    expected = nn.functional.cross_entropy(pixel_logits, masks, ignore_index=IGNORE_INDEX)
    counts = patch_label_counts(masks.to(torch.uint8), 4, 3)
    assert float(patch_cross_entropy(logits.permute(0, 2, 3, 1), counts)) == pytest.approx(float(expected), rel=1e-6)


def test_iou_from_a_confusion_matrix() -> None:
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    targets = torch.tensor([0, 1, 1, 1, IGNORE_INDEX, 0])
    confusion = confusion_matrix(predictions, targets, 4)
    assert confusion.tolist() == [[2, 0, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    iou = intersection_over_union(confusion)
    assert iou[0].item() == pytest.approx(100 * 2 / 3) and iou[1].item() == pytest.approx(100 * 2 / 3)
    assert iou[2:].isnan().all()  # neither present nor predicted: no IoU, left out of the mean
    assert mean_iou(iou) == pytest.approx(100 * 2 / 3)


def test_probe_scores_upsample_bilinearly_to_the_mask() -> None:
    generator = torch.Generator().manual_seed(3)
    probe = LinearSegmentationProbe(
        weight=torch.randn(3, 5, generator=generator),
        bias=torch.randn(3, generator=generator),
        mean=torch.randn(5, generator=generator),
        std=torch.rand(5, generator=generator) + 0.5,
        losses=(0.0,),
    )
    features = torch.randn(2, 3, 4, 5, generator=generator)
    masks = torch.randint(0, 3, (2, 12, 16), generator=generator)
    standardised = (features - probe.mean) / probe.std
    logits = torch.einsum("bhwc,kc->bkhw", standardised, probe.weight) + probe.bias[:, None, None]
    expected = nn.functional.interpolate(logits, size=(12, 16), mode="bilinear", align_corners=False).argmax(dim=1)
    confusion = evaluate_segmentation_probe(probe, features, masks)
    assert torch.equal(confusion, confusion_matrix(expected, masks, 3))


def test_trained_probe_separates_informative_features_only() -> None:
    """Patch features carrying their class (one-hot plus noise) give a near-perfect probe; features of pure noise
    give chance."""
    generator = torch.Generator().manual_seed(4)
    # two classes per image, left and right of a vertical edge between patches (masks are spatially coherent)
    sides = torch.randint(0, 3, (40, 2), generator=generator)
    edge = torch.randint(1, 4, (40,), generator=generator)
    labels = torch.where(torch.arange(4)[None, None, :] < edge[:, None, None], sides[:, :1, None], sides[:, 1:, None])
    labels = labels.expand(40, 4, 4)
    masks = labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2).to(torch.uint8)  # patches of 4 pixels
    informative = nn.functional.one_hot(labels, 8).float() + 0.3 * torch.randn(40, 4, 4, 8, generator=generator)
    noise = torch.randn(40, 4, 4, 8, generator=generator)
    recipe = {"epochs": 10, "lr": 0.01, "weight_decay": 0.0, "batch_size": 8, "seed": 0, "show_progress": False}
    scores = {}
    for name, features in (("informative", informative), ("noise", noise)):
        probe = train_linear_segmentation_probe(features[:30], patch_label_counts(masks[:30], 4, 3), **recipe)
        assert probe.losses[-1] < probe.losses[0]
        scores[name] = mean_iou(intersection_over_union(evaluate_segmentation_probe(probe, features[30:], masks[30:])))
    assert scores["informative"] > 90
    assert scores["noise"] < 40  # three classes: chance is about 20-33
    # seeded: the same inputs and recipe give the same probe
    first = train_linear_segmentation_probe(informative, patch_label_counts(masks, 4, 3), **recipe)
    second = train_linear_segmentation_probe(informative, patch_label_counts(masks, 4, 3), **recipe)
    assert torch.equal(first.weight, second.weight)


def test_probe_training_matches_a_plain_standardise_then_classify_loop() -> None:
    """The trainer folds the standardisation into the classifier; a loop that standardises the tokens first and
    applies the same recipe (AdamW with decay on the weights only, cosine to 0, the same seeded shuffles, the pixel
    cross-entropy of nearest-upsampled logits) must reach the same probe."""
    generator = torch.Generator().manual_seed(5)
    features = (3.0 * torch.randn(12, 3, 4, 6, generator=generator) + 5.0).to(torch.float16)
    masks = torch.randint(0, 4, (12, 9, 12), generator=generator).to(torch.uint8)
    masks[0, :3] = IGNORE_INDEX
    counts = patch_label_counts(masks, 3, 4)
    epochs, lr, weight_decay, batch_size, seed = 3, 0.05, 0.01, 5, 7
    probe = train_linear_segmentation_probe(
        features,
        counts,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        show_progress=False,
    )

    tokens = features.double().reshape(-1, 6)
    mean, std = tokens.mean(dim=0), tokens.std(dim=0, unbiased=False)
    torch.testing.assert_close(probe.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probe.std.double(), std, rtol=1e-6, atol=1e-6)
    standardised = ((features.double() - mean) / std).float()
    weight = torch.zeros(4, 6, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.AdamW(
        [{"params": [weight], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}], lr=lr
    )
    steps = epochs * math.ceil(12 / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    shuffles = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(12, generator=shuffles)
        for start in range(0, 12, batch_size):
            index = order[start : start + batch_size]
            logits = standardised[index] @ weight.T + bias  # [n, h, w, K]
            pixel_logits = nn.functional.interpolate(logits.permute(0, 3, 1, 2), size=(9, 12), mode="nearest")
            loss = nn.functional.cross_entropy(pixel_logits, masks[index].long(), ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    torch.testing.assert_close(probe.weight, weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probe.bias, bias.detach(), rtol=1e-4, atol=1e-5)
