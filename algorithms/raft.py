"""RAFT: reward-ranked fine-tuning (Dong et al., 2023) — sample, keep the best, fit them.

Each rollout is ranked by reward; the policy is then fitted to what was kept by the usual
denoising objective, written as the KL of each step's mean to the mean that the true noise gives
(the DDPM bound's weighting), plus ``alpha`` times the KL to the pretrained chain at the same states.

``selection="top"`` keeps the best ``keep_fraction`` (per label with ``per_condition``): classic
RAFT. Its fixed point is the pretrained model truncated to high rewards, not the KL-regularised
optimum, so it does not reach the closed-form target of the Gaussian check.
``selection="tilted"`` instead weights every chain by ``exp(r / alpha) * p_pre(path) / q(path)``
(self-normalised over the rollout; the path ratio comes from the stored log-probabilities) and
fits the weighted chains' own transitions by maximum likelihood (a minibatch estimates the rollout's
weighted fit: its weights are scaled, not renormalised). The weighted chains represent
``p_pre(path) exp(r(x0) / alpha)``, so this variant's fixed point is the tilted target, and the KL
is already in the weights (alpha enters only there).

Under DDP the ranking and the normalisation run over the global rollout (every process's chains, gathered), as
on one process; each process then fits all its own chains, zero weights included, so that every process runs as
many minibatches as the others. With ``minibatch_size`` set, "top" thus takes more, smaller steps than on one
process (the same fit in expectation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ctrl.algorithms.minibatch import Minibatch, MinibatchAlgorithm, add_to
from ctrl.algorithms.rollouts import finite_rewards
from ctrl.errors import SettingError
from ctrl.sampling import effective_sample_size, gaussian_kl, gaussian_log_prob


@dataclass
class RAFTMinibatch(Minibatch):
    """Kept chains and their ``weights`` ``[M]``: the rollout's (summing to 1 over the kept chains) times
    kept / M, so that the loss ``sum_i weights_i fit_i`` is an unbiased estimate of the rollout's weighted fit;
    ``ess`` ``[]``: Kish's effective sample size of the rollout's weights within each group (each label with
    ``per_condition``), averaged over the groups. With "top" it is the number kept per group; with "tilted",
    near 1 means one chain carries its group's whole weight, so an update fits that chain alone and the
    self-normalised estimate's variance (and its bias, about 1 / ess) is large. A larger alpha raises it; more
    chains per label barely do when the rewards spread by many nats over alpha (their maximum grows with them)."""

    weights: Tensor
    ess: Tensor


class RAFT(MinibatchAlgorithm):
    """Args:
    alpha: KL weight (> 0 for "tilted", >= 0 for "top").
    selection: "top" (keep the best fraction) or "tilted" (importance weights; see module docstring).
    keep_fraction: fraction kept by "top", in (0, 1].
    per_condition: rank within each label.
    inner_epochs, minibatch_size, timestep_fraction, steps_per_call: as every minibatch algorithm
        (:class:`ctrl.algorithms.minibatch.MinibatchAlgorithm`), over the kept chains.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        selection: Literal["top", "tilted"] = "top",
        keep_fraction: float = 0.25,
        per_condition: bool = True,
        inner_epochs: int = 1,
        minibatch_size: int | None = None,
        timestep_fraction: float = 1.0,
        steps_per_call: int = 1,
    ):
        super().__init__(alpha, inner_epochs, minibatch_size, timestep_fraction, steps_per_call)
        if selection == "tilted" and alpha == 0:
            raise SettingError(self, "alpha", "must be > 0 with selection 'tilted' (its weights are exp(r / alpha)).")
        if not 0 < keep_fraction <= 1:
            raise SettingError(self, "keep_fraction", f"must lie in (0, 1], got {keep_fraction}.")
        self.selection, self.keep_fraction, self.per_condition = selection, keep_fraction, per_condition

    def off_target(self) -> str | None:
        if self.selection == "top":
            return (
                "selection=top fits the best keep_fraction, whose fixed point is the pretrained model truncated to "
                "high rewards; set selection: tilted"
            )
        return None

    def _groups(self, labels: Tensor, finite: Tensor | None = None) -> list[Tensor]:
        """Boolean masks ``[B]`` of the chains ranked or normalised together: one per label with ``per_condition``;
        only chains whose ``finite`` ``[B]`` is true (all by default) belong to any."""
        finite = torch.ones_like(labels, dtype=torch.bool) if finite is None else finite
        if self.per_condition:
            return [(labels == y) & finite for y in labels[finite].unique()]
        return [finite]

    def _weights(self, rewards: Tensor, log_ratios: Tensor, groups: list[Tensor]) -> Tensor:
        """Each chain's weight ``[B]`` from its reward ``[B]`` and path log-ratio ``log p_pre / q`` ``[B]``,
        within each of ``groups`` (:meth:`_groups`' masks), summing to 1 over the rollout; 0 outside them."""
        weights = torch.zeros_like(rewards)
        for g in groups:
            if self.selection == "top":
                idx = g.nonzero().squeeze(1)
                k = max(1, math.ceil(self.keep_fraction * len(idx)))
                weights[idx[rewards[idx].topk(k).indices]] = 1.0 / k
            else:
                weights[g] = torch.softmax(rewards[g] / self.alpha + log_ratios[g], 0)
        return weights / len(groups)

    def _global_weights(self, trajectory, rewards: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, int]:
        """This process's chains' weights ``[b]`` (0 where ``finite`` ``[b]`` is false), the ESS ``[]`` and the
        number of processes W: ranked and normalised over the GLOBAL rollout (every process's chains, gathered),
        as one process holding them all would, so a label's chains spread over processes are one group. The
        weights are scaled by W, since DDP averages the processes' gradients of ``sum_i weights_i fit_i``."""
        tilted = self.selection == "tilted"
        log_ratios = (trajectory.ref_log_probs - trajectory.log_probs).sum(1) if tilted else torch.zeros_like(rewards)
        labels, every_reward, every_ratio, every_finite = (
            self.context.gather(t).flatten(0, 1) for t in (trajectory.labels, rewards, log_ratios, finite)
        )
        groups = self._groups(labels, every_finite)
        weights = self._weights(every_reward, every_ratio, groups)
        ess = torch.stack([effective_sample_size(weights[g]) for g in groups]).mean()
        world, b = len(labels) // len(rewards), len(rewards)
        return weights[self.context.rank * b : (self.context.rank + 1) * b] * world, ess, world

    def updates(self, trajectory, policy, reward):
        with torch.no_grad():
            rewards = policy.score(reward, trajectory.samples, trajectory.labels)
        finite = finite_rewards(rewards)  # a non-finite reward's chain has no weight and is never fitted
        if not finite.any():
            return
        weights, ess, world = self._global_weights(trajectory, rewards, finite)
        # on several processes every finite chain stays (a zero weight fits nothing), so that each process runs as
        # many minibatches as the others, which a process holding none of the global best would not
        kept = ((weights > 0) if world == 1 else finite).nonzero().squeeze(1)
        for idx, steps in self.minibatches(kept, trajectory):
            # The weights are normalised over the rollout: a uniform random subset of the kept chains, scaled
            # by kept / its size, estimates the rollout's weighted fit without bias (renormalising it would
            # not); an epoch's minibatch losses average to it exactly when the minibatch size divides kept.
            yield RAFTMinibatch(
                latents=trajectory.latents[idx],
                labels=trajectory.labels[idx],
                rewards=rewards[idx],
                steps=steps,
                grid=trajectory.grid,
                pre_means=None if trajectory.pre_means is None else trajectory.pre_means[idx],
                weights=weights[idx] * (len(kept) / len(idx)),
                ess=ess,
            )

    def step_terms(self, batch: RAFTMinibatch, policy, reward, stats):
        scale, sums = batch.step_scale, {}
        x0 = batch.latents[:, -1]
        for steps in self.step_groups(batch):
            if self.selection == "tilted":  # maximum likelihood of the weighted chains' own transitions
                means, pres = (m.chunk(len(steps)) for m in self.stored_step_means(policy, batch, steps))
            else:  # denoising: x_t from the kept x0 by the forward process, target mean from the true noise
                noises = [torch.randn_like(x0) for _ in steps]
                x_ts = [batch.grid.add_noise(x0, noise, k) for noise, k in zip(noises, steps)]
                means, pres = (m.chunk(len(steps)) for m in self.step_means(policy, batch, torch.cat(x_ts), steps))
            term = 0.0
            for j, k in enumerate(steps):
                s = float(batch.grid.sigma[k])
                kl = gaussian_kl(means[j], pres[j], s)
                if self.selection == "tilted":
                    fit = -gaussian_log_prob(batch.latents[:, k + 1], means[j], s)
                else:
                    truth = batch.grid.true_prediction(x0, noises[j])
                    target = batch.grid.step_mean(x_ts[j], truth, k, policy.clip_range)
                    fit = gaussian_kl(means[j], target, s) + self.alpha * kl
                term = term + (batch.weights * fit).sum()
                add_to(sums, kl=kl.mean())
            yield term * scale
        stats.update(
            reward=batch.rewards.mean(),
            kl=sums["kl"] * scale,
            kept=(batch.weights > 0).sum().float(),
            ess=batch.ess,
        )
