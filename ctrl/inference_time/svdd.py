"""SVDD (soft value-based decoding; Li et al. 2024): M candidate steps, keep one by its value."""

from __future__ import annotations

import torch
from torch import Tensor

from ctrl.errors import SettingError
from ctrl.inference_time.base import GuidedSampler, randn
from ctrl.sampling import DDIMGrid, step_mean


class SVDD(GuidedSampler):
    """Each step draws ``num_candidates`` next states from the pretrained step and keeps one by its value
    v = r(x0_hat(x_{t-1}), y) (the posterior-mean value, SVDD-PM): the best with ``temperature`` 0, else one
    drawn with probability ∝ exp(v / temperature). No gradients. Costs per step: M denoiser calls (the
    kept candidate's prediction is reused by the next step) and M reward calls per image.

    Args:
        num_candidates: M >= 1 (1: the pretrained sampler exactly).
        temperature: 0 (argmax) or > 0: the KL weight alpha of the target p_pre(x) exp(r / alpha) that the
            soft choice aims at, as the fine-tuning plugins' ``alpha``.
    """

    tilt_setting = "temperature"

    def __init__(self, num_candidates: int = 8, temperature: float = 0.0):
        if num_candidates < 1:
            raise SettingError(self, "num_candidates", f"must be >= 1, got {num_candidates}.")
        if temperature < 0:
            raise SettingError(self, "temperature", f"must be >= 0 (0: the best candidate), got {temperature}.")
        self.num_candidates, self.temperature = num_candidates, temperature

    @torch.no_grad()
    def run(self, policy, reward, labels: Tensor, grid: DDIMGrid, noise: Tensor, generator) -> Tensor:
        b, m, n = len(labels), self.num_candidates, len(grid.timesteps)
        shape = noise.shape[2:]
        labels_m = labels.repeat_interleave(m)
        x = noise[:, 0]
        eps = self.eps(policy, x, grid, 0, labels)
        for k in range(n):
            s = float(grid.sigma[k])
            mean = step_mean(x, eps, float(grid.alpha_prod[k]), float(grid.alpha_prod_prev[k]), s, policy.clip_range)
            z = torch.cat(
                [noise[:, k + 1, None], randn((b, m - 1, *shape), generator, x)], 1
            )  # candidate 0: the chain's own draw
            candidates = (mean[:, None] + s * z).flatten(0, 1)  # [B*M, ...]
            if k + 1 < n:
                eps_next = self.eps(policy, candidates, grid, k + 1, labels_m)
                values = self.score(policy, reward, self.x0_hat(policy, candidates, eps_next, grid, k + 1), labels_m)
            else:
                values = self.score(policy, reward, candidates, labels_m)
            values = values.view(b, m)
            if self.temperature == 0 or s == 0:
                pick = values.argmax(1)
            else:
                pick = torch.multinomial(torch.softmax(values.cpu() / self.temperature, 1), 1, generator=generator)
                pick = pick.squeeze(1).to(values.device)
            rows = torch.arange(b, device=x.device) * m + pick
            x = candidates[rows]
            if k + 1 < n:
                eps = eps_next[rows]
        return x
