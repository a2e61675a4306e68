"""The reward interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn


class Reward(nn.Module, ABC):
    """r(x0, y), one value per sample.

    Attributes:
        differentiable: whether gradients of the reward with respect to x0 are meaningful
            (direct backprop needs them; a JPEG size, say, has none).
        num_labels: the size of the label set the reward scores, or None if it takes no label.
    """

    differentiable: ClassVar[bool] = True
    num_labels: int | None = None

    @abstractmethod
    def forward(self, x0: Tensor, labels: Tensor) -> Tensor:
        """``x0`` ``[B, C, H, W]``, ``labels`` ``[B]`` -> rewards ``[B]``."""
