"""Discrete-time PPO over the denoising chain (DDPO, Black et al. 2024) with the exact per-step KL.

Rollouts run without gradients and store each step's log-probability. The objective is the same
KL-regularised one as every plugin's, ``E[r(x0)] - alpha * sum_k KL_k``, and its gradient has two
parts, both used here:
  - score function: step k's log-probability times its return ``r(x0) - alpha * sum_{j>k} KL_j``
    (the KL of the LATER steps depends on this step's action), minus a baseline, through PPO's
    clipped importance ratio;
  - the direct gradient of ``alpha * KL_k`` with respect to the policy at the stored state x_k.
With both, the optimum is the tilted target ``p_pre(x) exp(r(x) / alpha) / Z``.

Advantages are centred per step (optionally per condition) by a leave-one-out baseline, the mean
return of the OTHER chains of the group: a baseline that includes the chain's own return scales
the score-function part by (1 - 1/n) for a group of n chains but not the direct KL part, so the
fixed point would leave the tilted target. ``standardize`` also divides by their standard deviation
as DDPO does, which rescales the reward part against the KL part and so moves the optimum away from
the closed-form target (an effective alpha): use it for speed, not for the closed-form check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ctrl.algorithms.minibatch import Minibatch, MinibatchAlgorithm, add_to
from ctrl.algorithms.rollouts import scored_rollout
from ctrl.errors import SettingError
from ctrl.sampling import gaussian_kl, gaussian_log_prob


@dataclass
class PPOMinibatch(Minibatch):
    """Stored chains for one optimizer step, with ``old_log_probs`` ``[M, N]`` (under the rollout policy) and
    ``advantages`` ``[M, N]``."""

    old_log_probs: Tensor
    advantages: Tensor


class PPO(MinibatchAlgorithm):
    """Args:
    alpha, inner_epochs, minibatch_size, timestep_fraction, steps_per_call: as every minibatch algorithm
        (:class:`ctrl.algorithms.minibatch.MinibatchAlgorithm`).
    clip_range: PPO's epsilon (> 0): ratios are clipped to [1 - eps, 1 + eps].
    advantages: "center" (subtract the per-step mean of the other chains) or "standardize" (also divide by
        the std).
    per_condition: compute the baselines per label instead of over the whole batch.
    advantage_clip: clip advantages to +-this (None: no clipping).
    ratio_per_dimension: the importance ratio from log-probabilities averaged over the sample's dimensions
        (DDPO's convention, the scale of its clip range 1e-4) instead of summed. The policy-gradient part then
        weighs 1/d against the KL part, which moves the optimum away from the tilted target at alpha > 0:
        for alpha 0, as DDPO.
    """

    requires_log_prob = True
    minibatch_type = PPOMinibatch

    def __init__(
        self,
        alpha: float = 0.1,
        clip_range: float = 0.2,
        inner_epochs: int = 1,
        minibatch_size: int | None = None,
        timestep_fraction: float = 1.0,
        steps_per_call: int = 1,
        advantages: Literal["center", "standardize"] = "center",
        per_condition: bool = False,
        advantage_clip: float | None = None,
        ratio_per_dimension: bool = False,
    ):
        super().__init__(alpha, inner_epochs, minibatch_size, timestep_fraction, steps_per_call)
        if clip_range <= 0:
            raise SettingError(self, "clip_range", f"must be > 0, got {clip_range}.")
        if advantage_clip is not None and advantage_clip <= 0:
            raise SettingError(self, "advantage_clip", f"must be > 0 or null, got {advantage_clip}.")
        self.clip_range, self.advantage_mode = clip_range, advantages
        self.per_condition, self.advantage_clip = per_condition, advantage_clip
        self.ratio_per_dimension = ratio_per_dimension

    def off_target(self) -> str | None:
        if self.advantage_mode == "standardize":
            return (
                "advantages=standardize divides each return by its group's spread, a KL weight that moves with it "
                "(alpha x that spread); set advantages: center"
            )
        if self.advantage_clip is not None:
            return (
                f"advantage_clip={self.advantage_clip:g} caps each advantage, which bounds the reward's pull against "
                "the exact KL's; set advantage_clip: null"
            )
        return None

    def _normalise(self, returns: Tensor, labels: Tensor) -> Tensor:
        """``[B, N]`` returns -> advantages ``[B, N]``: at each step, a chain's return minus the mean return of the
        OTHER chains of its group (its label with ``per_condition``, else the whole batch), over the GLOBAL batch:
        from per-group counts and sums reduced over all processes (float64).

        The baseline must not depend on the chain's own sample, or the score-function gradient is scaled by
        (1 - 1/n) for a group of n. Every other chain is sampled independently, so:
          - a chain alone in its group takes the mean of all other chains of the batch;
          - a chain alone in the whole batch has no other chain, and its baseline is 0 (the advantage is its
            return: unbiased, with the variance of the raw return). A constant derived from its own return, or
            an advantage of 0, would bias the gradient (the latter to the KL part alone).
        ``standardize`` divides by the std of the group (of the batch for a chain alone in its group; 1 when the
        batch is one chain) that the baseline came from.
        """
        group = labels if self.per_condition else torch.zeros_like(labels)
        onehot = torch.nn.functional.one_hot(group, self.context.num_labels + 1).double()  # [B, G]: and the null label
        r = returns.double()
        sums = self.context.sum_over_ranks(
            torch.stack([onehot.T @ torch.ones_like(r), onehot.T @ r, onehot.T @ r.square()])
        )
        count, total, square = sums[:, group]  # [B, N] each: the chain's group
        alone = count < 2
        batch = sums.sum(1, keepdim=True).expand(-1, len(r), -1)  # [3, B, N]: the whole batch
        count, total, square = (torch.where(alone, b, g) for g, b in zip((count, total, square), batch))
        others = count - 1
        adv = torch.where(others > 0, r - (total - r) / others.clamp(min=1), r)
        if self.advantage_mode == "standardize":
            var = (square - total.square() / count) / others.clamp(min=1)
            std = torch.where(others > 0, var.clamp(min=0).sqrt(), torch.ones_like(var))
            adv = adv / (std + 1e-8)
        adv = adv.to(returns.dtype)
        if self.advantage_clip is not None:
            adv = adv.clamp(-self.advantage_clip, self.advantage_clip)
        return adv

    def updates(self, trajectory, policy, reward):
        scored = scored_rollout(trajectory, policy, reward)
        if scored is None:
            return
        trajectory, rewards = scored
        yield from self._minibatches(trajectory, rewards, **self.per_chain(trajectory, rewards, policy, reward))

    def per_chain(self, trajectory, rewards: Tensor, policy, reward) -> dict[str, Tensor]:
        """What the minibatches carry per chain and step, ``[B, N]`` each: here the advantages, the return
        ``r(x0) - alpha * sum_{j>k} KL_j`` centred per step by the other chains' mean (:meth:`_normalise`)."""
        returns = rewards[:, None].expand(-1, trajectory.num_steps) - self.kl_penalty_to_go(trajectory)
        return {"advantages": self._normalise(returns, trajectory.labels)}

    def _minibatches(self, trajectory, rewards: Tensor, **per_chain: Tensor):
        """The minibatches of the inner epochs, each carrying ``per_chain`` values ``[M, N]`` of its chains."""
        chains = torch.arange(len(rewards), device=rewards.device)
        for idx, steps in self.minibatches(chains, trajectory):
            yield self.minibatch_type(
                latents=trajectory.latents[idx],
                old_log_probs=trajectory.log_probs[idx],
                labels=trajectory.labels[idx],
                rewards=rewards[idx],
                grid=trajectory.grid,
                steps=steps,
                pre_means=None if trajectory.pre_means is None else trajectory.pre_means[idx],
                **{name: value[idx] for name, value in per_chain.items()},
            )

    def clipped_steps(self, batch, steps: list[int], policy) -> tuple[Tensor, Tensor | None, Tensor]:
        """G ``steps`` of a stored minibatch in one network call: PPO's clipped surrogate ``[G, M]``, the steps'
        exact KL ``[G, M]`` (both differentiable in the policy; the KL None when the rollout skipped the
        pretrained model) and the importance ratio ``[G, M]``."""
        mean, mean_pre = self.stored_step_means(policy, batch, steps)
        means, pres = mean.chunk(len(steps)), (None if mean_pre is None else mean_pre.chunk(len(steps)))
        log_probs, kls = [], []
        for j, k in enumerate(steps):
            s = float(batch.grid.sigma[k])
            log_probs.append(gaussian_log_prob(batch.latents[:, k + 1], means[j], s))
            if pres is not None:
                kls.append(gaussian_kl(means[j], pres[j], s))
        log_ratio = torch.stack(log_probs) - batch.old_log_probs[:, steps].T
        if self.ratio_per_dimension:
            log_ratio = log_ratio / batch.latents[0, 0].numel()
        ratio = log_ratio.exp()
        adv = batch.advantages[:, steps].T
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
        return surrogate, torch.stack(kls) if kls else None, ratio

    def step_loss(self, batch: PPOMinibatch, steps: list[int], policy, sums: dict[str, Tensor]) -> Tensor:
        """The part of the loss of a group of steps (before the step-subset scale): summed over the steps, the
        clipped surrogate's mean over chains plus ``alpha`` times the step's mean KL; adds the steps'
        statistics (summed over steps) to ``sums``."""
        surrogate, kl, ratio = self.clipped_steps(batch, steps, policy)
        ratio = ratio.detach()
        add_to(sums, clip_fraction=((ratio - 1).abs() > self.clip_range).float().mean(1).sum())
        add_to(sums, approx_policy_kl=(0.5 * ratio.log().square()).mean(1).sum())
        if kl is None:
            return surrogate.mean(1).sum()
        add_to(sums, kl=kl.detach().mean(1).sum())
        return surrogate.mean(1).sum() + self.alpha * kl.mean(1).sum()

    def step_terms(self, batch: PPOMinibatch, policy, reward, stats):
        scale, sums = batch.step_scale, {}
        for steps in self.step_groups(batch):
            yield self.step_loss(batch, steps, policy, sums) * scale
        n = len(batch.steps)
        stats.update(reward=batch.rewards.mean(), advantage_abs=batch.advantages.abs().mean())
        # the KL is a sum over the chain's steps (estimated from the subset); the rest are means per step
        stats.update({key: v * scale if key == "kl" else v / n for key, v in sums.items()})
