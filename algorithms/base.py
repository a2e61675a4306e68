"""The plugin contract every RL algorithm follows (docs/design.md, "The plugin contract"): the KL weight and
the context the module gives a plugin (the algorithms that refit stored rollouts build on it in minibatch.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ctrl.errors import SettingError
from ctrl.rewards.base import Reward
from ctrl.sampling import GradientPlan, Trajectory


class ContextError(AttributeError, ValueError):
    """A plugin wrote a setting the context does not have."""


@dataclass
class AlgorithmContext:
    """What the module gives a plugin at setup (the plugin reads it; only the module changes it).

    Attributes:
        num_labels: the policy's labels (a null label comes after them; None: not known yet).
        num_stochastic: the steps of a training rollout that the control acts on (None: not known yet): those
            with noise (sigma > 0), or every step of a deterministic chain (eta = 0).
        sum_over_ranks: sums a tensor over all processes (identity on one process): rollout statistics
            (advantage baselines) of the global batch.
        gather: every process's tensor of the same shape, stacked ``[W, ...]`` in rank order (``[1, ...]`` on
            one process): what a statistic needs that sums cannot give (a rank order, a normaliser's maximum).
        rank: this process's index in ``gather``'s first dimension.
        gradient_checkpointing: recompute each re-evaluated step's network call in the backward pass.
    """

    num_labels: int | None = None
    num_stochastic: int | None = None
    sum_over_ranks: Callable[[Tensor], Tensor] = lambda t: t
    gather: Callable[[Tensor], Tensor] = lambda t: t[None]
    rank: int = 0
    gradient_checkpointing: bool = False

    def __setattr__(self, name: str, value) -> None:
        if name not in self.__dataclass_fields__:
            fields = ", ".join(self.__dataclass_fields__)
            raise ContextError(
                f"AlgorithmContext has no setting '{name}' ({fields}); a plugin keeps its state on itself."
            )
        super().__setattr__(name, value)


class Algorithm(nn.Module, ABC):
    """An RL fine-tuning algorithm: turns rollouts into a loss of the objective ``E[r(x0)] - alpha * KL``.

    The policy is passed to each call and never stored: jsonargparse builds the plugin before the
    module, and storing the policy would register its parameters twice.

    Args:
        alpha: the KL weight (>= 0): the target is ``p_pre(x) exp(r(x) / alpha) / Z``.

    Class attributes:
        requires_grad_through_sampler: rollouts carry gradients through the chain (direct backprop); only such
            an algorithm trains a deterministic chain (eta = 0, at alpha 0: it has no density, no KL).
        requires_log_prob: the loss needs per-step log-probabilities (eta > 0).
    """

    requires_grad_through_sampler: ClassVar[bool] = False
    requires_log_prob: ClassVar[bool] = False

    def __init__(self, alpha: float = 0.1):
        super().__init__()
        if alpha < 0:
            raise SettingError(self, "alpha", f"the KL weight must be >= 0, got {alpha}.")
        self.alpha = alpha
        self.context = AlgorithmContext()  # one process, until the module's setup gives its own

    def setup(self, policy, reward: Reward, context: AlgorithmContext | None = None) -> None:
        """Take the module's context and validate the policy, reward and rollout grid (one clear message).
        Subclasses extend it (calling ``super().setup``); without a context, one process is assumed."""
        self.context = context or AlgorithmContext(num_labels=policy.num_labels)

    def check_data(self, group_size: int | None) -> None:
        """Refuse training batches this algorithm cannot learn from, naming the data's setting (the module calls
        it once the data module is known). ``group_size``: chains per drawn condition (``data.group_size``;
        None: the data does not say). Every grouping is accepted here."""

    def off_target(self) -> str | None:
        """Why this configuration's optimum is not the target ``p_pre(x) exp(r(x) / alpha) / Z`` (the setting, what it
        does, and the value that keeps the target), or None when it is. A benchmark comparing methods at one target
        refuses a row that answers."""
        return None

    @property
    def needs_pretrained(self) -> bool:
        """Whether a rollout must evaluate the pretrained model: its KL enters the objective (alpha > 0). At
        alpha = 0 the rollout skips that network call (the module can still log the KL now and then)."""
        return self.alpha > 0

    def gradient_plan(self, num_stochastic: int) -> GradientPlan:
        """Which steps of a training rollout carry gradients (drawn anew for each rollout)."""
        return GradientPlan(steps=num_stochastic) if self.requires_grad_through_sampler else GradientPlan()

    def updates(self, trajectory: Trajectory, policy, reward: Reward) -> Iterator[Any]:
        """What one rollout turns into: one item per optimizer step, each passed to :meth:`loss`.

        The default is one step on the whole rollout; :class:`MinibatchAlgorithm` yields minibatches.
        """
        yield trajectory

    @abstractmethod
    def loss(self, batch: Any, policy, reward: Reward) -> dict[str, Tensor]:
        """``{"loss": scalar, ...statistics}`` for one item of :meth:`updates`."""

    def backward_loss(
        self, batch: Any, policy, reward: Reward, backward: Callable[[Tensor], None]
    ) -> dict[str, Tensor]:
        """Backpropagate the loss of one item of :meth:`updates` through ``backward`` (the module's
        ``manual_backward``) and return :meth:`loss`'s statistics, the loss detached.

        The default makes the whole loss, then backpropagates it. A plugin whose loss is a sum of parts
        (one per step) overrides it to backpropagate each part as soon as it is made, so that one part's
        graph is alive at a time: the same gradient, a fraction of the memory. Every part must reach every
        trainable parameter (under DDP each backward is reduced over ranks, and a parameter left out of one
        would stall the reduction).
        """
        out = self.loss(batch, policy, reward)
        backward(out["loss"])
        return {**out, "loss": out["loss"].detach()}

    def param_groups(self) -> list[dict]:
        """Extra trainable parameters (e.g. a value network) as optimizer groups with their own lr."""
        return []
