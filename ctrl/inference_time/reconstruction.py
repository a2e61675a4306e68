"""Reconstruction guidance (classifier guidance through Tweedie's estimate; Chung et al. 2023's DPS form)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ctrl.errors import non_negative
from ctrl.inference_time.base import GuidedSampler
from ctrl.sampling import DDIMGrid


class ReconstructionGuidance(GuidedSampler):
    """Each step follows the pretrained model plus ``scale`` times the gradient, with respect to x_t, of the
    reward at the denoised estimate: ``eps' = eps - scale * sqrt(1 - a_t) * grad_x r(x0_hat(x_t), y)``
    (the score of p(y | x_t) approximated by that of p(y | x0_hat)). With r = log p(y|x) and scale 1
    this is classifier guidance toward p(x | y). Costs per step: one denoiser call with its gradient,
    one reward gradient.

    Args:
        scale: guidance strength (0: the pretrained sampler exactly): the exponent of p(y|x)^scale, so the
            target of fine-tuning with KL weight alpha = 1 / scale.
    """

    tilt_setting, tilt_is_scale = "scale", True

    def __init__(self, scale: float = 1.0):
        self.scale = non_negative(self, "scale", scale)

    def guided_step(self, policy, reward, x: Tensor, grid: DDIMGrid, k: int, labels: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps = self.eps(policy, x_in, grid, k, labels)
            x0 = self.x0_hat(policy, x_in, eps, grid, k)
            (grad,) = torch.autograd.grad(self.score(policy, reward, x0, labels).sum(), x_in)
        eps = eps.detach() - self.scale * math.sqrt(1 - float(grid.alpha_prod[k])) * grad
        return self.x0_hat(policy, x, eps, grid, k), eps
