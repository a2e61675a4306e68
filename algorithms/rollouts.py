"""What the plugins do with a rollout before their loss: drop non-finite rewards (reported, counted by the
module) and pick random subsets of steps."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ctrl.sampling import Trajectory


def scored_rollout(trajectory: Trajectory, policy, reward) -> tuple[Trajectory, Tensor] | None:
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
        warnings.warn(
            f"the reward returned NaN or Inf for {bad} of {len(rewards)} samples; they are dropped from this step",
            NonFiniteRewardWarning,
            stacklevel=2,
        )
    return finite
