"""The plugin contract every RL algorithm follows (DESIGN.md, "Plugin contract")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from ctrl.rewards.base import Reward
from ctrl.sampling import Trajectory


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

    def setup(self, policy, reward: Reward) -> None:
        """Validate the policy and reward before training (raise one clear message)."""

    def grad_steps(self, num_steps: int) -> int:
        """How many of the last sampling steps carry gradients in a training rollout."""
        return num_steps if self.requires_grad_through_sampler else 0

    @abstractmethod
    def loss(self, trajectory: Trajectory, policy, reward: Reward) -> dict[str, Tensor]:
        """``{"loss": scalar, ...statistics}`` for one batch of rollouts."""

    def param_groups(self) -> list[dict]:
        """Extra trainable parameters (e.g. a value network) as optimizer groups with their own lr."""
        return []
