"""Manifold-preserving guided diffusion (MPGD; He et al. 2024): a guidance step on x0_hat, then re-noise."""

from __future__ import annotations

import torch
from torch import Tensor

from ctrl.errors import non_negative
from ctrl.inference_time.base import GuidedSampler
from ctrl.sampling import DDIMGrid


class MPGD(GuidedSampler):
    """Each step moves the denoised estimate up the reward, ``x0' = x0_hat + step_size * grad_x0 r(x0_hat, y)``,
    with the gradient taken at x0_hat only (no backprop through the denoiser: the cheap part of MPGD),
    then takes the DDIM step from x0' with the model's noise, re-noising to the next level. Costs per
    step: one denoiser call, one reward gradient.

    Args:
        step_size: the gradient step on x0_hat (0: the pretrained sampler exactly).
    """

    def __init__(self, step_size: float = 0.1):
        self.step_size = non_negative(self, "step_size", step_size)

    def guided_step(self, policy, reward, x: Tensor, grid: DDIMGrid, k: int, labels: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            eps = self.eps(policy, x, grid, k, labels)
            x0 = self.x0_hat(policy, x, eps, grid, k)
        with torch.enable_grad():
            x0_in = x0.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.score(policy, reward, x0_in, labels).sum(), x0_in)
        return x0.detach() + self.step_size * grad, eps
