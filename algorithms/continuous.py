"""Score as action: continuous-time policy gradient with a structured value network (Zhao et al., ICML 2025).

EXPERIMENTAL: on the closed-form Gaussian check this plugin does not yet reach the target (the
chain KL runs away while the final marginal is off by 5-15%, or far more once NN_phi learns);
PPO and DirectBackprop do. See benchmarks/RESULTS.md.

The policy's eps (equivalently its score) is the action of a control problem. Each step's
advantage is a temporal difference of a value function that knows the diffusion's structure:

    V(t, x) = cos(pi t / 2T) * r(x0_hat(t, x)) + sin(pi t / 2T) * NN_phi(t, x, y)

with x0_hat the denoised mean (Tweedie) under the current policy, so that V(0, x) = r(x) and the
network only learns what the one-step prediction misses. The advantage of step k (x_k -> x_{k+1}
in sampling order) is the temporal difference ``V(x_{k+1}) - V(x_k)`` of the terminal reward plus
the running KL reward; the policy follows PPO's clipped surrogate on it plus the direct gradient
of ``alpha * KL_k``, and NN_phi regresses the final reward r(x0) with its own learning rate.

One departure from the paper's code, measured on the closed-form check: the running KL reward is
known exactly at every step of a rollout, so it enters the advantage as its exact sum over the
later steps, ``-alpha * sum_{j>k} KL_j``, and V estimates the terminal reward only. Asking NN_phi
to learn the KL-to-go as well (the paper's form) let the policy exploit the critic's early
errors: the chain KL grew to 25-340 nats against a target of 0.57 and the samples missed the
target by 65-400% (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ctrl.algorithms.base import finite_rewards
from ctrl.algorithms.ppo import PPO
from ctrl.registry import register_algorithm
from ctrl.sampling import StepGrid, gaussian_kl, gaussian_log_prob, step_means


class ValueNetwork(nn.Module):
    """NN_phi(t, x, y) -> ``[B]``: an MLP for vectors ``[B, d]``, a small CNN for images ``[B, C, H, W]``.

    The timestep enters as t / T (and as an extra image channel for the CNN); the label by an embedding.
    """

    def __init__(self, sample_shape: tuple[int, ...], num_labels: int, width: int = 64):
        super().__init__()
        self.label_embedding = nn.Embedding(num_labels + 1, width)
        if len(sample_shape) == 1:
            self.body = nn.Sequential(nn.Linear(sample_shape[0] + 1, width), nn.SiLU(), nn.Linear(width, width))
        else:
            c = sample_shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c + 1, width // 2, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        # Zero output at the start: V begins as the structural prior cos(pi t / 2T) r(x0_hat) alone.
        # A randomly initialised residual is a wrong critic that the policy would exploit.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor) -> Tensor:
        tt = t.float().expand(x.shape[0])
        if x.ndim == 2:
            features = self.body(torch.cat([x, tt[:, None]], 1))
        else:
            plane = tt.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
            features = self.body(torch.cat([x, plane], 1))
        return self.head(features + self.label_embedding(labels)).squeeze(-1)


@dataclass
class ValueMinibatch:
    """Stored chains for one update of policy and value network.

    Attributes:
        latents: ``[M, N+1, ...]``; old_log_probs, advantages, returns, value_anchor: ``[M, N]``
        (value_anchor is cos(pi t / 2T) r(x0_hat), the fixed part of V; returns are what V regresses);
        labels, rewards: ``[M]``.
    """

    latents: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    returns: Tensor
    value_anchor: Tensor
    labels: Tensor
    rewards: Tensor
    steps: list[int]
    grid: StepGrid


@register_algorithm
class ContinuousTimePG(PPO):
    """Args (beside PPO's alpha, clip_range, inner_epochs, minibatch_size, timestep_fraction,
    advantages, per_condition, advantage_clip):
        value_lr: learning rate of NN_phi (> 0).
        value_width: width of NN_phi.
        value_coef: weight of the value regression in the loss.
        sample_shape, num_labels: NN_phi's input; set from the policy at setup when left out.
    """

    def __init__(self, alpha: float = 0.1, clip_range: float = 0.2, inner_epochs: int = 1,
                 minibatch_size: int | None = None, timestep_fraction: float = 1.0,
                 advantages: Literal["center", "standardize"] = "center",
                 per_condition: bool = False, advantage_clip: float | None = 5.0, value_lr: float = 1e-3,
                 value_width: int = 64, value_coef: float = 1.0):
        super().__init__(alpha, clip_range, inner_epochs, minibatch_size, timestep_fraction, advantages,
                         per_condition, advantage_clip)
        if value_lr <= 0:
            raise ValueError(f"ContinuousTimePG value_lr must be > 0, got {value_lr}.")
        self.value_lr, self.value_width, self.value_coef = value_lr, value_width, value_coef
        self.value: ValueNetwork | None = None

    def setup(self, policy, reward) -> None:
        warnings.warn("ContinuousTimePG does not yet reach the closed-form target of configs/gaussian/continuous.yaml "
                      "(the chain KL runs away; benchmarks/RESULTS.md): treat its results as experimental.",
                      UserWarning, stacklevel=2)
        self.value = ValueNetwork(tuple(policy.sample_shape), policy.num_labels, self.value_width)
        self.num_train_timesteps = policy.scheduler.config.num_train_timesteps

    def param_groups(self) -> list[dict]:
        return [dict(name="value", params=list(self.value.parameters()), lr=self.value_lr)]

    def _angle(self, t: Tensor) -> Tensor:
        return math.pi * t.float() / (2 * self.num_train_timesteps)

    @torch.no_grad()
    def _anchor(self, policy, reward, grid: StepGrid, k: int, x: Tensor, labels: Tensor) -> Tensor:
        """cos(pi t / 2T) r(x0_hat(t, x)), ``[B]``, with x0_hat by Tweedie under the current policy."""
        t = grid.timesteps[k].to(x.device)
        a = float(grid.alpha_prod[k])
        eps, _ = policy.eps(x, t, labels)
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return torch.cos(self._angle(t)) * reward(x0_hat, labels)

    def values(self, anchor: Tensor, grid: StepGrid, k: int, x: Tensor, labels: Tensor) -> Tensor:
        t = grid.timesteps[k].to(x.device)
        return anchor + torch.sin(self._angle(t)) * self.value(t.float() / self.num_train_timesteps, x, labels)

    def updates(self, trajectory, policy, reward):
        with torch.no_grad():
            rewards = reward(trajectory.samples, trajectory.labels)
            keep = finite_rewards(rewards)
            if not keep.any():
                return
            rewards, kl = rewards[keep], trajectory.kl[keep]
            latents, labels, old = trajectory.latents[keep], trajectory.labels[keep], trajectory.log_probs[keep]
            grid, n = trajectory.grid, trajectory.num_steps
            anchor = torch.stack([self._anchor(policy, reward, grid, k, latents[:, k], labels) for k in range(n)], 1)
            v = torch.stack([self.values(anchor[:, k], grid, k, latents[:, k], labels) for k in range(n)]
                            + [rewards], 1)  # V at x_0 is the reward itself
            later_kl = kl.flip(1).cumsum(1).flip(1) - kl  # sum over j > k, exact from the rollout
            advantages = self._normalise(v[:, 1:] - v[:, :-1] - self.alpha * later_kl, labels)
            returns = rewards[:, None].expand(-1, n)
        stochastic = [k for k in range(n) if float(grid.sigma[k]) > 0]
        n_steps = max(1, round(self.timestep_fraction * len(stochastic)))
        size = self.minibatch_size or len(rewards)
        for _ in range(self.inner_epochs):
            for idx in torch.randperm(len(rewards), device=rewards.device).split(size):
                steps = sorted(stochastic[i] for i in torch.randperm(len(stochastic))[:n_steps].tolist())
                yield ValueMinibatch(latents[idx], old[idx], advantages[idx], returns[idx], anchor[idx], labels[idx],
                                     rewards[idx], steps, grid)

    def loss(self, batch: ValueMinibatch, policy, reward):
        policy_loss, value_loss, kl_total, clipped = 0.0, 0.0, 0.0, 0.0
        scale = sum(1 for s in batch.grid.sigma.tolist() if s > 0) / len(batch.steps)
        for k in batch.steps:
            s = float(batch.grid.sigma[k])
            x = batch.latents[:, k]
            mean, mean_pre = step_means(policy, x, batch.grid, k, batch.labels)
            ratio = (gaussian_log_prob(batch.latents[:, k + 1], mean, s) - batch.old_log_probs[:, k]).exp()
            adv = batch.advantages[:, k]
            surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
            kl = gaussian_kl(mean, mean_pre, s)
            policy_loss = policy_loss + surrogate.mean() + self.alpha * kl.mean()
            v = self.values(batch.value_anchor[:, k], batch.grid, k, x, batch.labels)
            value_loss = value_loss + (v - batch.returns[:, k]).square().mean()
            kl_total += float(kl.detach().mean())
            clipped += float(((ratio - 1).abs() > self.clip_range).float().mean())
        n = len(batch.steps)
        return {"loss": policy_loss * scale + self.value_coef * value_loss / n, "reward": batch.rewards.mean(),
                "kl": torch.tensor(kl_total * scale), "value_loss": (value_loss / n).detach(),
                "clip_fraction": torch.tensor(clipped / n)}
