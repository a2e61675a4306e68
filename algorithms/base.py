"""The plugin contract every RL algorithm follows (docs/design.md, "The plugin contract"): the KL weight,
the context the module gives a plugin, and the minibatch loop of the algorithms that refit stored rollouts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ctrl.algorithms.rollouts import pick_steps
from ctrl.errors import SettingError
from ctrl.rewards.base import Reward
from ctrl.sampling import GradientPlan, StepGrid, Trajectory, step_means


class ContextError(AttributeError, ValueError):
    """A plugin wrote a setting the context does not have."""


@dataclass
class AlgorithmContext:
    """What the module gives a plugin at setup (the plugin reads it; only the module changes it).

    Attributes:
        num_labels: the policy's labels (a null label comes after them; None: not known yet).
        num_stochastic: the steps with noise (sigma > 0) of a training rollout (None: not known yet).
        sum_over_ranks: sums a tensor over all processes (identity on one process): rollout statistics
            (advantage baselines) of the global batch.
        gradient_checkpointing: recompute each re-evaluated step's network call in the backward pass.
    """

    num_labels: int | None = None
    num_stochastic: int | None = None
    sum_over_ranks: Callable[[Tensor], Tensor] = lambda t: t
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
        requires_grad_through_sampler: rollouts carry gradients through the chain (direct backprop).
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
    """

    def __init__(
        self,
        alpha: float = 0.1,
        inner_epochs: int = 1,
        minibatch_size: int | None = None,
        timestep_fraction: float = 1.0,
    ):
        super().__init__(alpha)
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
        """The loss of one minibatch as its parts, one scalar per step of ``batch.steps`` (scaled so that they
        sum to the minibatch's loss); once the last part is made, ``stats`` holds the update's statistics."""

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

    def step_means(self, policy, batch: Minibatch, x: Tensor, k: int, pretrained: bool = True):
        """The policy's and the pretrained model's means of step k at states ``x`` ``[M, ...]`` of a minibatch's
        chains (differentiable in the policy; checkpointed as the context says; the pretrained one None
        when not asked for and the policy can skip it)."""
        checkpointing = self.context.gradient_checkpointing
        return step_means(
            policy, x, batch.grid, k, batch.labels, gradient_checkpointing=checkpointing, pretrained=pretrained
        )

    def stored_step_means(self, policy, batch: Minibatch, k: int) -> tuple[Tensor, Tensor | None]:
        """Step k at the stored states: the policy's mean (one network call) and the rollout's pretrained mean,
        which cannot have changed since the rollout (None when the rollout skipped it, at alpha = 0)."""
        mean, mean_pre = self.step_means(policy, batch, batch.latents[:, k], k, pretrained=False)
        return mean, (mean_pre if batch.pre_means is None else batch.pre_means[:, k])

    def kl_penalty_to_go(self, trajectory: Trajectory) -> Tensor | float:
        """``alpha * sum_{j>k} KL_j`` ``[B, N]`` (0 at alpha = 0, where the rollout may have no KL)."""
        return self.alpha * trajectory.kl_to_go() if self.alpha > 0 else 0.0
