"""Direct reward backpropagation through the sampling chain, with the exact KL to the pretrained chain.

Maximises ``E[r(x0, y)] - alpha * KL(policy chain || pretrained chain)`` by differentiating the
sample x0 (and the per-step KL) with respect to the policy's parameters. ``alpha = 1`` with
``r = log p(y|x)`` targets the conditional p(x|y) of the pretrained model (the first paper); a
smaller alpha sharpens the label (the target is p_pre(x) p(y|x)^(1/alpha)).

Truncation covers the related methods: ``backprop_steps=K`` backpropagates through the last K steps
only (DRaFT-K; ``K=1`` is AlignProp's last-step variant), ``random_truncation=True`` draws K
uniformly from 1..K each step (AlignProp's randomised truncation).
"""

from __future__ import annotations

import torch

from ctrl.algorithms.base import Algorithm, finite_rewards
from ctrl.registry import register_algorithm


@register_algorithm
class DirectBackprop(Algorithm):
    """Args:
        alpha: KL weight (>= 0).
        backprop_steps: steps at the end of the chain that carry gradients (None: all).
        random_truncation: draw the number of steps uniformly from 1..backprop_steps each batch.
    """

    requires_grad_through_sampler = True

    def __init__(self, alpha: float = 0.1, backprop_steps: int | None = None, random_truncation: bool = False):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"DirectBackprop alpha (the KL weight) must be >= 0, got {alpha}.")
        if backprop_steps is not None and backprop_steps < 1:
            raise ValueError(f"DirectBackprop backprop_steps must be >= 1 or null (the whole chain), got {backprop_steps}.")
        self.alpha = alpha
        self.backprop_steps = backprop_steps
        self.random_truncation = random_truncation

    def setup(self, policy, reward) -> None:
        if not getattr(reward, "differentiable", False):
            raise ValueError(f"DirectBackprop needs a differentiable reward, but {type(reward).__name__} is not "
                             "(its gradient carries no signal); use a score-function algorithm such as PPO, "
                             "or a differentiable reward.")

    def grad_steps(self, num_steps: int) -> int:
        k = num_steps if self.backprop_steps is None else min(self.backprop_steps, num_steps)
        if self.random_truncation:
            k = int(torch.randint(1, k + 1, ()).item())
        return k

    def loss(self, trajectory, policy, reward):
        rewards = policy.score(reward, trajectory.samples, trajectory.labels)
        finite = finite_rewards(rewards.detach())
        kl = trajectory.kl.sum(1)[finite]
        objective = rewards[finite] - self.alpha * kl
        # With no finite reward the loss is a zero that still reaches the graph (NaN * 0 would be NaN).
        return {"loss": -objective.mean() if finite.any() else trajectory.kl.sum() * 0.0,
                "reward": rewards[finite].mean().detach(), "kl": kl.mean().detach(),
                "objective": objective.mean().detach(), "nonfinite_rewards": (~finite).sum().float()}
