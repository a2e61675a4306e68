"""The algorithms that refit stored rollouts (PPO, RAFT): minibatches of chains over several passes, each on a
random subset of the stochastic steps, their loss a sum of per-step parts backpropagated one step at a time."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrl.algorithms.base import Algorithm
from ctrl.algorithms.rollouts import pick_steps
from ctrl.errors import SettingError
from ctrl.rewards.base import Reward
from ctrl.sampling import StepGrid, Trajectory, step_means


def at_steps(values: Tensor, steps: list[int]) -> Tensor:
    """``[M, S, ...]`` per chain and step -> ``[G*M, ...]`` at the G ``steps``, step-major (the blocks that
    :func:`ctrl.sampling.step_means` evaluates in one call)."""
    return values[:, steps].transpose(0, 1).flatten(0, 1)


def add_to(sums: dict[str, Tensor], **values: Tensor) -> None:
    """Add each detached value to its running sum in ``sums`` (an update's statistics, summed over steps)."""
    for key, value in values.items():
        sums[key] = sums[key] + value.detach() if key in sums else value.detach()


@dataclass
class Minibatch:
    """Stored chains for one optimizer step of a :class:`MinibatchAlgorithm`.

    Attributes:
        latents: ``[M, N+1, ...]`` states of M chains.
        labels: ``[M]``.
        rewards: ``[M]`` rewards of the final samples.
        steps: the step indices (stochastic steps only) this update uses.
        grid: the rollout's step coefficients.
        pre_means: ``[M, N, ...]`` the rollout's pretrained means at the stored states (None: not sampled).
    """

    latents: Tensor
    labels: Tensor
    rewards: Tensor
    steps: list[int]
    grid: StepGrid
    pre_means: Tensor | None

    @property
    def step_scale(self) -> float:
        """Stochastic steps / steps used: keeps a sum over a random subset of steps unbiased."""
        return len(self.grid.sigma.nonzero()) / len(self.steps)


class MinibatchAlgorithm(Algorithm):
    """An algorithm that fits stored rollouts in minibatches of chains over several passes, each minibatch
    on a random subset of the stochastic steps (PPO, RAFT).

    Args:
        alpha: the KL weight.
        inner_epochs: passes over each rollout (>= 1).
        minibatch_size: chains per optimizer step (None: all of them).
        timestep_fraction: fraction of the stochastic steps used per update, in (0, 1] (DDPO's
            ``timestep_fraction``); the loss is rescaled to stay unbiased.
        steps_per_call: stored steps re-evaluated in one network call (>= 1), and so backpropagated
            together. The gradient is the same; more costs less time per step (a larger batch) and holds
            that many steps' graphs at once.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        inner_epochs: int = 1,
        minibatch_size: int | None = None,
        timestep_fraction: float = 1.0,
        steps_per_call: int = 1,
    ):
        super().__init__(alpha)
        if steps_per_call < 1:
            raise SettingError(self, "steps_per_call", f"must be >= 1, got {steps_per_call}.")
        self.steps_per_call = steps_per_call
        if inner_epochs < 1:
            raise SettingError(self, "inner_epochs", f"must be >= 1, got {inner_epochs}.")
        if minibatch_size is not None and minibatch_size < 1:
            raise SettingError(
                self, "minibatch_size", f"must be >= 1 or null (the whole rollout), got {minibatch_size}."
            )
        if not 0 < timestep_fraction <= 1:
            raise SettingError(self, "timestep_fraction", f"must lie in (0, 1], got {timestep_fraction}.")
        self.inner_epochs, self.minibatch_size, self.timestep_fraction = (
            inner_epochs,
            minibatch_size,
            timestep_fraction,
        )

    @abstractmethod
    def step_terms(self, batch: Minibatch, policy, reward: Reward, stats: dict[str, Tensor]) -> Iterator[Tensor]:
        """The loss of one minibatch as its parts, one scalar per group of :meth:`step_groups` (scaled so that
        they sum to the minibatch's loss); once the last part is made, ``stats`` holds the update's statistics."""

    def step_groups(self, batch: Minibatch) -> list[list[int]]:
        """``batch.steps`` in groups of ``steps_per_call``: the steps of one network call and one backward."""
        n = self.steps_per_call
        return [batch.steps[i : i + n] for i in range(0, len(batch.steps), n)]

    def loss(self, batch: Minibatch, policy, reward: Reward) -> dict[str, Tensor]:
        stats: dict[str, Tensor] = {}
        total = sum(self.step_terms(batch, policy, reward, stats))
        return {"loss": total, **stats}

    def backward_loss(self, batch: Minibatch, policy, reward: Reward, backward) -> dict[str, Tensor]:
        """One step's graph at a time: each part of :meth:`step_terms` is backpropagated as soon as it is made."""
        stats: dict[str, Tensor] = {}
        total = 0.0
        for term in self.step_terms(batch, policy, reward, stats):
            backward(term)
            total = total + term.detach()
        return {"loss": torch.as_tensor(total), **stats}

    def minibatches(self, chains: Tensor, trajectory: Trajectory) -> Iterator[tuple[Tensor, list[int]]]:
        """``(indices, steps)`` per optimizer step: ``chains`` ``[K]`` (indices into the rollout) in a new random
        order each pass, split by ``minibatch_size``, each with a random subset of the stochastic steps."""
        size = self.minibatch_size or len(chains)
        for _ in range(self.inner_epochs):
            for idx in chains[torch.randperm(len(chains), device=chains.device)].split(size):
                yield idx, pick_steps(trajectory.stochastic_steps, self.timestep_fraction)

    def step_means(self, policy, batch: Minibatch, x: Tensor, k: int | list[int], pretrained: bool = True):
        """The policy's and the pretrained model's means of step k at states ``x`` ``[M, ...]`` of a minibatch's
        chains, or of G steps ``k`` at ``x`` ``[G*M, ...]`` (:func:`at_steps`) in one network call
        (differentiable in the policy; checkpointed as the context says; the pretrained one None when not
        asked for and the policy can skip it)."""
        if isinstance(k, list) and len(k) == 1:  # one step: the call the sampler made for it
            k = k[0]
        labels = batch.labels.repeat(len(k)) if isinstance(k, list) else batch.labels
        checkpointing = self.context.gradient_checkpointing
        return step_means(
            policy, x, batch.grid, k, labels, gradient_checkpointing=checkpointing, pretrained=pretrained
        )

    def stored_step_means(self, policy, batch: Minibatch, steps: list[int]) -> tuple[Tensor, Tensor | None]:
        """G ``steps`` at the stored states, ``[G*M, ...]`` each (:func:`at_steps`): the policy's means (one
        network call) and the rollout's pretrained means, which cannot have changed since the rollout (None
        when the rollout skipped them, at alpha = 0)."""
        mean, mean_pre = self.step_means(policy, batch, at_steps(batch.latents, steps), steps, pretrained=False)
        return mean, (mean_pre if batch.pre_means is None else at_steps(batch.pre_means, steps))

    def kl_penalty_to_go(self, trajectory: Trajectory) -> Tensor | float:
        """``alpha * sum_{j>k} KL_j`` ``[B, N]`` (0 at alpha = 0, where the rollout may have no KL)."""
        return self.alpha * trajectory.kl_to_go() if self.alpha > 0 else 0.0
