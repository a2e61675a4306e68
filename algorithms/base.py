"""The plugin contract every RL algorithm follows (docs/design.md, "The plugin contract")."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ctrl.rewards.base import Reward
from ctrl.sampling import GradientPlan, Trajectory


class Algorithm(nn.Module, ABC):
    """An RL fine-tuning algorithm: turns rollouts into a loss.

    The policy is passed to each call and never stored: jsonargparse builds the plugin before the
    module, and storing the policy would register its parameters twice.

    Class attributes:
        requires_grad_through_sampler: rollouts carry gradients through the chain (direct backprop).
        requires_log_prob: the loss needs per-step log-probabilities (eta > 0).
    """

    requires_grad_through_sampler: ClassVar[bool] = False
    requires_log_prob: ClassVar[bool] = False
    #: Sums a tensor over all processes (set by the module under DDP; identity on one process), so that
    #: statistics over a rollout (advantage baselines) are those of the global batch.
    sum_over_ranks: Callable[[Tensor], Tensor] = staticmethod(lambda t: t)
    #: Recompute each re-evaluated step's network call in the backward pass (set by the module from its
    #: ``gradient_checkpointing``): a loss over many stored steps otherwise holds every step's graph.
    gradient_checkpointing: bool = False

    def setup(self, policy, reward: Reward) -> None:
        """Validate the policy and reward before training (raise one clear message)."""

    def check_steps(self, num_stochastic: int) -> None:
        """Validate settings that depend on the training grid (``num_stochastic``: its steps with sigma > 0)."""

    def gradient_plan(self, num_stochastic: int) -> GradientPlan:
        """Which steps of a training rollout carry gradients (drawn anew for each rollout)."""
        return GradientPlan(steps=num_stochastic) if self.requires_grad_through_sampler else GradientPlan()

    def updates(self, trajectory: Trajectory, policy, reward: Reward) -> Iterator[Any]:
        """What one rollout turns into: one item per optimizer step, each passed to :meth:`loss`.

        The default is one step on the whole rollout; PPO yields minibatches over inner epochs.
        """
        yield trajectory

    @abstractmethod
    def loss(self, batch: Any, policy, reward: Reward) -> dict[str, Tensor]:
        """``{"loss": scalar, ...statistics}`` for one item of :meth:`updates`."""

    def param_groups(self) -> list[dict]:
        """Extra trainable parameters (e.g. a value network) as optimizer groups with their own lr."""
        return []


def scored_rollout(trajectory: Trajectory, policy, reward: Reward) -> tuple[Trajectory, Tensor] | None:
    """The rollout's rewards ``[B']`` (no gradient) and the chains they belong to, non-finite ones dropped
    (:func:`finite_rewards`); None when no reward is finite."""
    with torch.no_grad():
        rewards = policy.score(reward, trajectory.samples, trajectory.labels)
    keep = finite_rewards(rewards)
    if not keep.any():
        return None
    return trajectory.select(keep), rewards[keep]


def pick_steps(steps: list[int], fraction: float) -> list[int]:
    """A random ``fraction`` of ``steps`` (at least one), in order (DDPO's timestep_fraction)."""
    n = max(1, round(fraction * len(steps)))
    return sorted(steps[i] for i in torch.randperm(len(steps))[:n].tolist())


class NonFiniteRewardWarning(RuntimeWarning):
    """A reward returned NaN or Inf for some samples of a step (they were dropped)."""


def finite_rewards(rewards: Tensor) -> Tensor:
    """Mask ``[B]`` of finite rewards; NaN or Inf ones are reported with their count (and must be dropped).

    A reward that is NaN for some samples must never be averaged in silently: it would poison the
    whole step.
    """
    finite = torch.isfinite(rewards)
    bad = int((~finite).sum())
    if bad:
        warnings.warn(f"the reward returned NaN or Inf for {bad} of {len(rewards)} samples; they are dropped "
                      "from this step", NonFiniteRewardWarning, stacklevel=2)
    return finite
