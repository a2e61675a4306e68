"""A Gaussian log-likelihood reward: with the AnalyticGaussian policy, the tilted target is closed-form."""

from __future__ import annotations

import torch
from torch import Tensor

from ctrl.errors import SettingError
from ctrl.rewards.base import Reward


class GaussianLogLikelihood(Reward):
    """``r(x) = -||A x - y||^2 / (2 sigma^2)`` for ``x`` ``[B, d]``; ignores the label.

    Args:
        y: the target, ``[k]``.
        A: the ``[k, d]`` matrix (rows of numbers); the identity when omitted (then k = d).
        sigma: > 0.
    """

    differentiable = True

    def __init__(self, y: list[float], A: list[list[float]] | None = None, sigma: float = 1.0):
        super().__init__()
        if sigma <= 0:
            raise SettingError(self, "sigma", f"must be > 0, got {sigma}.")
        target = torch.as_tensor(y, dtype=torch.float32).flatten()
        matrix = torch.eye(len(target)) if A is None else torch.as_tensor(A, dtype=torch.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(target):
            raise SettingError(
                self,
                "A",
                f"has shape {tuple(matrix.shape)} but y has {len(target)} entries; A needs one row per entry of y.",
            )
        self.register_buffer("A", matrix)
        self.register_buffer("y", target)
        self.sigma = float(sigma)

    def forward(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
        if x0.shape[-1] != self.A.shape[1]:
            raise SettingError(
                self,
                "A",
                f"has {self.A.shape[1]} columns but samples have dimension {x0.shape[-1]}; give A one column per "
                "dimension.",
            )
        return -(x0 @ self.A.T - self.y).square().sum(-1) / (2 * self.sigma**2)
