"""Sequential Monte Carlo guidance: particles from the pretrained chain, twisted by the reward at x0_hat."""

from __future__ import annotations

import torch
from torch import Tensor

from ctrl.errors import SettingError, renamed_setting
from ctrl.inference_time.base import GuidedSampler, randn
from ctrl.sampling import DDIMGrid, effective_sample_size, step_mean


class SMC(GuidedSampler):
    """K particles per image follow the pretrained chain from x_T drawn from the prior, weighted first by
    ``exp(r(x0_hat(x_T)) / alpha)`` and after each step reweighted by
    ``exp((r(x0_hat(x_{t-1})) - r(x0_hat(x_t))) / alpha)`` (a twisting function r(x0_hat), as twisted SMC
    samplers use; at the last step r of the sample itself), so the weights telescope to exp(r(x0) / alpha);
    the set is resampled (systematic) when its effective sample size falls below ``ess_threshold * K``.
    The returned image is one particle drawn by the final weights, so as K grows the samples follow
    ``p_pre(x0) exp(r(x0) / alpha) / Z`` exactly: the KL-regularised target of fine-tuning with the same KL
    weight alpha (with r = log p(y|x) and alpha = 1 it is p(x | y)). Costs per step: K denoiser and K reward
    calls per image.

    Args:
        num_particles: K >= 1.
        alpha: the KL weight of the target (> 0), as the fine-tuning plugins' ``alpha``.
        ess_threshold: resample when ESS < this * K (1: every step; 0: never).
        lam: the old setting, 1 / alpha (works, with a notice).
    """

    tilt_setting = "alpha"

    def __init__(
        self, num_particles: int = 16, alpha: float = 1.0, ess_threshold: float = 0.5, lam: float | None = None
    ):
        if lam is not None and lam <= 0:
            raise SettingError(self, "lam", f"must be > 0, got {lam} (it is 1 / alpha; write alpha instead).")
        old = None if lam is None else 1.0 / lam
        alpha = renamed_setting(type(self), "lam", old, "alpha (= 1 / lam)", alpha, 1.0)
        if num_particles < 1:
            raise SettingError(self, "num_particles", f"must be >= 1, got {num_particles}.")
        if alpha <= 0:
            raise SettingError(self, "alpha", f"the KL weight must be > 0, got {alpha}.")
        if not 0 <= ess_threshold <= 1:
            raise SettingError(self, "ess_threshold", f"must lie in [0, 1], got {ess_threshold}.")
        self.num_particles, self.alpha, self.ess_threshold = num_particles, alpha, ess_threshold

    @staticmethod
    def _systematic(log_w: Tensor, generator: torch.Generator) -> Tensor:
        """Indices ``[B, K]`` (within each row) drawn by systematic resampling from row-wise log-weights."""
        b, k = log_w.shape
        cdf = torch.softmax(log_w.double().cpu(), 1).cumsum(1)
        u = (torch.rand(b, 1, generator=generator, dtype=torch.float64) + torch.arange(k)) / k
        return torch.searchsorted(cdf, u.clamp(max=float(1 - 1e-12))).clamp(max=k - 1).to(log_w.device)

    @torch.no_grad()
    def run(self, policy, reward, labels: Tensor, grid: DDIMGrid, noise: Tensor, generator) -> Tensor:
        b, k, n = len(labels), self.num_particles, len(grid.timesteps)
        shape = noise.shape[2:]
        labels_k = labels.repeat_interleave(k)
        x = torch.cat([noise[:, 0, None], randn((b, k - 1, *shape), generator, noise)], 1).flatten(0, 1)  # [B*K, ...]
        eps = self.eps(policy, x, grid, 0, labels_k)
        twist = self.score(policy, reward, self.x0_hat(policy, x, eps, grid, 0), labels_k) / self.alpha
        # x_T is drawn from the prior, so the first target p(x_T) exp(twist(x_T)) weighs it by exp(twist); the
        # increments then telescope to r(x0) / alpha (from 0 they would leave a factor exp(-twist(x_T)) in).
        log_w = twist.double().view(b, k)
        for step in range(n):
            s = float(grid.sigma[step])
            mean = step_mean(
                x, eps, float(grid.alpha_prod[step]), float(grid.alpha_prod_prev[step]), s, policy.clip_range
            )
            x = mean + s * randn(tuple(x.shape), generator, x)
            if step + 1 < n:
                eps = self.eps(policy, x, grid, step + 1, labels_k)
                x0 = self.x0_hat(policy, x, eps, grid, step + 1)
                new_twist = self.score(policy, reward, x0, labels_k) / self.alpha
            else:
                new_twist = self.score(policy, reward, x, labels_k) / self.alpha
            log_w = log_w + (new_twist - twist).double().view(b, k)
            twist = new_twist
            ess = effective_sample_size(torch.softmax(log_w, 1), 1)  # [B]
            if step + 1 < n and (ess < self.ess_threshold * k).any():
                resample = ess < self.ess_threshold * k
                idx = torch.where(
                    resample[:, None],
                    self._systematic(log_w, generator),
                    torch.arange(k, device=x.device).expand(b, k),
                )
                rows = (torch.arange(b, device=x.device)[:, None] * k + idx).flatten()
                x, eps, twist = x[rows], eps[rows], twist[rows]
                log_w = torch.where(resample[:, None], torch.zeros_like(log_w), log_w)
        pick = torch.multinomial(torch.softmax(log_w.cpu(), 1), 1, generator=generator).squeeze(1).to(x.device)
        return x[torch.arange(b, device=x.device) * k + pick]
