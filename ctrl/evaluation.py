"""Evaluation of generated samples by judges that are NOT the reward.

A reward that rises while an independent judge stays flat is reward hacking (STUDY-digits.md), so
label accuracy is measured by another model family trained on another split, and sample quality
by a Frechet distance to held-out real images in that judge's feature space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from torchmetrics.image.fid import FrechetInceptionDistance


class Evaluator(ABC):
    """Scores samples ``[N, C, H, W]`` generated for labels ``[N]``; returns named scalar tensors."""

    num_labels: int

    @abstractmethod
    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]:
        ...


class LinearFeatures(nn.Module):
    """A fixed linear map of flattened pixels to ``num_features`` features (PCA), ``[N, C, H, W] -> [N, F]``.

    The custom feature extractor of torchmetrics' Frechet distance.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("components", torch.tensor(components, dtype=torch.float32))
        self.num_features = components.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1).float() - self.mean) @ self.components.T


@lru_cache(maxsize=2)
def _digits_judge(image_size: int, num_features: int):
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    from ctrl.datamodules.digits import digits_split

    images, labels = digits_split("pretrain", image_size)
    pixels = images.flatten(1).numpy()
    svc = SVC(kernel="rbf", gamma="scale").fit(pixels, labels.numpy())
    pca = PCA(num_features, random_state=0).fit(pixels)
    return svc, LinearFeatures(pca.mean_, pca.components_)


class DigitsEvaluator(Evaluator):
    """The digits judge: an RBF support-vector classifier on pixels, trained on the pretraining split.

    It shares neither model family nor data with the reward classifier (trained on the classifier
    split). The Frechet distance compares samples with the held-out split in the space of the
    first ``num_features`` principal components of the pretraining split's pixels.

    Metrics: ``accuracy``, ``macro_f1``, ``frechet``, ``min_class_accuracy`` and the confusion
    matrix (``confusion``, rows = requested label, columns = judged label).
    """

    def __init__(self, num_labels: int = 10, image_size: int = 16, num_features: int = 20):
        from ctrl.datamodules.digits import digits_split

        self.num_labels = num_labels
        self.svc, self.features = _digits_judge(image_size, num_features)
        self.real, _ = digits_split("heldout", image_size)

    def judge(self, samples: Tensor) -> Tensor:
        """The judge's label for each sample, ``[N]``."""
        pixels = samples.detach().clamp(-1, 1).flatten(1).cpu().numpy()
        return torch.as_tensor(self.svc.predict(pixels), dtype=torch.long)

    def frechet(self, samples: Tensor) -> Tensor:
        fid = FrechetInceptionDistance(feature=self.features, normalize=False, reset_real_features=True)
        fid.update(self.real, real=True)
        fid.update(samples.detach().cpu().clamp(-1, 1), real=False)
        return fid.compute().float()

    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]:
        judged, labels = self.judge(samples), labels.cpu()
        k = self.num_labels
        confusion = MulticlassConfusionMatrix(k)(judged, labels)
        per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
        present = confusion.sum(1) > 0
        return {
            "accuracy": MulticlassAccuracy(k, average="micro")(judged, labels),
            "macro_f1": MulticlassF1Score(k, average="macro")(judged, labels),
            "min_class_accuracy": per_class[present].min(),
            "frechet": self.frechet(samples),
            "confusion": confusion,
        }
