"""Multi-task conditional control: a condition is a tuple of labels, the reward the sum of their log-likelihoods."""

from __future__ import annotations

from torch import Tensor, nn

from ctrl.conditions import split_condition
from ctrl.errors import SettingError
from ctrl.rewards.base import Reward, call_reward


class JointLabels(Reward):
    """``r(x, (y_1, ..., y_k)) = sum_i r_i(x, y_i)``: with each r_i a classifier's log p(y_i | x) this is
    log p(y_1, ..., y_k | x) when the labels are conditionally independent given x (each classifier
    learned from its own data). Condition c numbers the tuples as :func:`ctrl.conditions.split_condition` does, so a
    policy and a datamodule over ``prod(n_i)`` labels condition on all of them at once.

    Args:
        rewards: one label-taking reward per label set, in order.
    """

    def __init__(self, rewards: list[Reward]):
        super().__init__()
        if len(rewards) < 2 or any(r.num_labels is None for r in rewards):
            raise SettingError(
                self, "rewards", "give at least two rewards that each score a label set (e.g. ClassifierLogProb)."
            )
        self.rewards = nn.ModuleList(rewards)
        self.sizes = [r.num_labels for r in rewards]
        self.num_labels = 1
        for n in self.sizes:
            self.num_labels *= n
        self.differentiable = all(r.differentiable for r in rewards)

    def parts(self, x0: Tensor, labels: Tensor, prompts: list[str] | None = None) -> list[Tensor]:
        """Each reward's term ``[B]`` (``prompts`` go on to the rewards that read them)."""
        return [call_reward(r, x0, y, prompts) for r, y in zip(self.rewards, split_condition(labels, self.sizes))]

    def forward(self, x0: Tensor, labels: Tensor, prompts: list[str] | None = None) -> Tensor:
        return sum(self.parts(x0, labels, prompts))
