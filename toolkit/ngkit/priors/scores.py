"""Generation scores that need no Inception weights: class consistency and distinct samples.

Class consistency: a classifier trained on the real training images (scikit-learn logistic
regression on raw pixels) labels each generated image; the score is the fraction labelled with
the class it was generated for. Its accuracy on the real held-out images is the ceiling, reported
next to it. Distinct fraction: distinct code sequences / samples (1.0: no two samples alike).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CLASSIFIER = "sklearn LogisticRegression(max_iter=2000) on raw [0,1] pixels of the training images"


class PixelClassifier:
    """Logistic regression on flattened pixels of labelled real images."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(max_iter=2000)
        self.model.fit(images.flatten(1).float().numpy(), labels.numpy())

    def predict(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self.model.predict(images.flatten(1).float().cpu().numpy()))

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((self.predict(images) == labels.cpu()).float().mean())


def distinct_fraction(codes: Tensor) -> float:
    """Distinct rows of ``codes [N, L]`` over N."""
    return float(len(torch.unique(codes, dim=0))) / max(1, len(codes))


def generation_scores(
    classifier: PixelClassifier | None, images: Tensor, codes: Tensor, labels: Tensor,
    real_test: tuple[Tensor, Tensor] | None,
) -> dict[str, Any]:
    """The scores of one set of samples, with how they were made."""
    out: dict[str, Any] = {"samples": len(codes), "distinct_fraction": distinct_fraction(codes)}
    if classifier is not None:
        out["class_consistency"] = classifier.accuracy(images, labels)
        per_class = {}
        predicted = classifier.predict(images)
        for c in sorted(set(labels.tolist())):
            mask = labels.cpu() == c
            per_class[str(c)] = float((predicted[mask] == c).float().mean())
        out["class_consistency_per_class"] = per_class
        out["classifier"] = CLASSIFIER
        if real_test is not None:
            out["classifier_test_accuracy"] = classifier.accuracy(*real_test)
    return out


def class_balanced_labels(classes: int, per_class: int) -> Tensor:
    """``per_class`` of each label 0..classes-1 in turn (0, 1, ..., 0, 1, ...); with no classes,
    ``per_class`` null labels (the null label is ``classes`` = 0: unconditional samples)."""
    if classes == 0:
        return torch.zeros(per_class, dtype=torch.long)
    return torch.arange(classes).repeat(per_class)


