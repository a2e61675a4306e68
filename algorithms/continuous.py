"""Score as action: continuous-time policy gradient with a structured value network (Zhao et al., ICML 2025).

The policy's eps (equivalently its score) is the action of a control problem. Each step's
advantage is a temporal difference of a value function that knows the diffusion's structure:

    V(t, x) = cos(pi t / 2T) * r(x0_hat(t, x)) + sin(pi t / 2T) * NN_phi(t, x, y)

with x0_hat the denoised mean (Tweedie) under the current policy, so that V(0, x) = r(x) and the
network only learns what the one-step prediction misses. The advantage of step k (x_k -> x_{k+1}
in sampling order) is the temporal difference ``V(x_{k+1}) - V(x_k)`` of the terminal reward plus
the running KL reward; the policy follows PPO's clipped surrogate on it plus the direct gradient
of ``alpha * KL_k``, and NN_phi regresses the final reward r(x0) with its own learning rate.

Two departures from the paper's code, both measured on the closed-form check
(benchmarks/RESULTS.md):
  - x0_hat in V's anchor is the PRETRAINED model's Tweedie estimate by default
    (``anchor_model="pretrained"``). With the current policy's (the paper's), the anchor moves
    with the policy; once the policy drifts, r(x0_hat) turns into large noise in the advantages,
    Adam's normalisation then shrinks the KL's restoring gradient, and the chain KL ran away
    (25-350 nats against a target of 0.57). V(0, x) = r(x) holds either way.
  - The running KL reward is known exactly at every step of a rollout, so it enters the
    advantage as its exact sum over the later steps, ``-alpha * sum_{j>k} KL_j``, and V
    estimates the terminal reward only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ctrl.algorithms.minibatch import add_to
from ctrl.algorithms.ppo import PPO, PPOMinibatch
from ctrl.errors import SettingError
from ctrl.sampling import StepGrid


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
                nn.Conv2d(c + 1, width // 2, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
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
class ValueMinibatch(PPOMinibatch):
    """PPO's minibatch plus, per chain and step ``[M, N]``: ``returns`` (what V regresses) and
    ``value_anchor`` (cos(pi t / 2T) r(x0_hat), the fixed part of V)."""

    returns: Tensor
    value_anchor: Tensor


class ContinuousTimePG(PPO):
    """Args (and every setting of :class:`PPO`, passed on to it):
    value_lr: learning rate of NN_phi (> 0).
    value_width: width of NN_phi (built at setup for the policy's sample shape and labels).
    value_coef: weight of the value regression in the loss.
    gae_lambda: mixes the one-step temporal difference (0, the paper's) with the Monte-Carlo
        return (1), as generalised advantage estimation does.
    anchor_model: whose eps gives x0_hat in V's anchor: "pretrained" (default) or "policy" (the
        paper's). See the module docstring for why.
    """

    minibatch_type = ValueMinibatch

    def __init__(
        self,
        value_lr: float = 1e-3,
        value_width: int = 64,
        value_coef: float = 1.0,
        gae_lambda: float = 0.0,
        anchor_model: Literal["pretrained", "policy"] = "pretrained",
        **ppo,
    ):
        super().__init__(**ppo)
        if value_lr <= 0:
            raise SettingError(self, "value_lr", f"must be > 0, got {value_lr}.")
        if not 0 <= gae_lambda <= 1:
            raise SettingError(self, "gae_lambda", f"must lie in [0, 1], got {gae_lambda}.")
        self.gae_lambda, self.anchor_model = gae_lambda, anchor_model
        self.value_lr, self.value_width, self.value_coef = value_lr, value_width, value_coef
        self.value: ValueNetwork | None = None

    def setup(self, policy, reward, context=None) -> None:
        super().setup(policy, reward, context)
        self.value = ValueNetwork(tuple(policy.sample_shape), policy.num_labels, self.value_width)
        self.num_train_timesteps = policy.scheduler.config.num_train_timesteps

    def param_groups(self) -> list[dict]:
        return [dict(name="value", params=list(self.value.parameters()), lr=self.value_lr)]

    def _angle(self, t: Tensor) -> Tensor:
        return math.pi * t.float() / (2 * self.num_train_timesteps)

    @torch.no_grad()
    def _anchor(self, policy, reward, grid: StepGrid, k: int, x: Tensor, labels: Tensor) -> Tensor:
        """cos(pi t / 2T) r(x0_hat(t, x)), ``[B]``, with x0_hat by Tweedie under ``anchor_model``."""
        t = grid.timesteps[k].to(x.device)
        out, out_pre = policy.predict(x, t, labels)
        x0_hat = grid.predict_x0(x, out_pre if self.anchor_model == "pretrained" else out, k)
        return torch.cos(self._angle(t)) * policy.score(reward, x0_hat, labels)

    def values(self, anchor: Tensor, grid: StepGrid, k: int, x: Tensor, labels: Tensor) -> Tensor:
        t = grid.timesteps[k].to(x.device)
        return anchor + torch.sin(self._angle(t)) * self.value(t.float() / self.num_train_timesteps, x, labels)

    def _reward_advantage(self, v: Tensor) -> Tensor:
        """GAE over the value's temporal differences ``[B, N]``: A_k = sum_l lambda^l (V_{k+l+1} - V_{k+l}).

        lambda = 0 is the paper's one-step difference; lambda = 1 is r(x0) - V(x_k), the Monte-Carlo
        return with V as a baseline.
        """
        delta = v[:, 1:] - v[:, :-1]
        adv = torch.zeros_like(delta)
        running = torch.zeros_like(delta[:, 0])
        for k in reversed(range(delta.shape[1])):
            running = delta[:, k] + self.gae_lambda * running
            adv[:, k] = running
        return adv

    @torch.no_grad()
    def per_chain(self, trajectory, rewards: Tensor, policy, reward) -> dict[str, Tensor]:
        """Per chain and step ``[B, N]``: the advantages (the temporal differences of V minus the KL to go, centred
        by PPO's leave-one-out baseline: V(x_{k+1}) depends on step k's action, so a baseline that contained the
        chain's own value would scale its gradient by (1 - 1/n)), what V regresses and V's anchor."""
        latents, labels, grid, n = trajectory.latents, trajectory.labels, trajectory.grid, trajectory.num_steps
        anchor = torch.stack([self._anchor(policy, reward, grid, k, latents[:, k], labels) for k in range(n)], 1)
        v = torch.stack(
            [self.values(anchor[:, k], grid, k, latents[:, k], labels) for k in range(n)] + [rewards], 1
        )  # V at x_0 is the reward itself
        advantages = self._normalise(self._reward_advantage(v) - self.kl_penalty_to_go(trajectory), labels)
        return {"advantages": advantages, "returns": rewards[:, None].expand(-1, n), "value_anchor": anchor}

    def step_terms(self, batch: ValueMinibatch, policy, reward, stats):
        """PPO's parts on the temporal-difference advantages, each plus ``value_coef`` times V's regression of
        r(x0) at the same steps (so that every part reaches both the policy and V)."""
        n, sums = len(batch.steps), {}
        for steps, term in zip(self.step_groups(batch), super().step_terms(batch, policy, reward, stats)):
            value_loss = 0.0
            for k in steps:
                v = self.values(batch.value_anchor[:, k], batch.grid, k, batch.latents[:, k], batch.labels)
                value_loss = value_loss + (v - batch.returns[:, k]).square().mean()
            add_to(sums, value_loss=value_loss)
            yield term + self.value_coef * value_loss / n
        stats["value_loss"] = sums["value_loss"] / n
