"""Direct reward backpropagation through the sampling chain, with the exact KL to the pretrained chain.

Maximises ``E[r(x0, y)] - alpha * KL(policy chain || pretrained chain)`` by differentiating the
sample x0 (and the per-step KL) with respect to the policy's parameters. ``alpha = 1`` with
``r = log p(y|x)`` targets the conditional p(x|y) of the pretrained model (the first paper); a
smaller alpha sharpens the label (the target is p_pre(x) p(y|x)^(1/alpha)).

Truncation covers the related methods: ``backprop_steps=K`` backpropagates through the last K
stochastic steps only (DRaFT-K; ``K=1`` is AlignProp's last-step variant; a deterministic last step
has no control and is not counted), ``random_truncation=True`` draws K uniformly from 1..K each
rollout (AlignProp's randomised truncation). ``ctrl.algorithms.AlignProp`` and ``ctrl.algorithms.DRaFT``
are this class with those papers' defaults.

With ``model.eta`` 0 the chain is deterministic DDIM, the one AlignProp and DRaFT backpropagate through:
the control acts on every step, the last included, and K counts every step. It has no density, so its
KL is undefined: alpha must be 0 there (the module refuses anything else).

What each variant optimises:
  - the whole chain (no truncation): the KL-regularised objective exactly;
  - fixed K: the reward reaches only the last K steps; the steps before them get the direct
    gradient of their own KL (at the detached state), so their control is held to the pretrained
    chain instead of drifting unpenalised. With per-step parameters that is the optimum of the
    family whose early steps are not controlled;
  - random K with ``unbiased_truncation`` (default): the step d-th from the end is inside the
    window with probability P_d = (K - d + 1) / K, and its parameter gradient is weighted by 1 / P_d,
    so the expected gradient is the whole chain's (steps never inside, d > K, are treated as for a
    fixed K). Without it (AlignProp's estimator) each step's gradient is scaled by P_d, which
    reweights the steps of a shared network.
"""

from __future__ import annotations

import torch

from ctrl.algorithms.base import Algorithm
from ctrl.algorithms.rollouts import finite_rewards
from ctrl.errors import SettingError
from ctrl.sampling import GradientPlan


class DirectBackprop(Algorithm):
    """Args:
    alpha: the KL weight (>= 0).
    backprop_steps: steps at the end of the chain that carry gradients (None: all).
    random_truncation: draw the number of steps uniformly from 1..backprop_steps each batch.
    unbiased_truncation: with random truncation, weight each step's parameter gradient by
        1 / P(step inside the window) (module docstring); False is AlignProp's own estimator.
    """

    requires_grad_through_sampler = True

    def __init__(
        self,
        alpha: float = 0.1,
        backprop_steps: int | None = None,
        random_truncation: bool = False,
        unbiased_truncation: bool = True,
    ):
        super().__init__(alpha)
        if backprop_steps is not None and backprop_steps < 1:
            raise SettingError(
                self, "backprop_steps", f"must be >= 1 or null (the whole chain), got {backprop_steps}."
            )
        self.backprop_steps = backprop_steps
        self.random_truncation, self.unbiased_truncation = random_truncation, unbiased_truncation

    def off_target(self) -> str | None:
        k, n = self.backprop_steps, self.context.num_stochastic
        if k is None:
            return None
        if self.random_truncation and not self.unbiased_truncation:
            return (
                "unbiased_truncation=false scales each step's gradient by its chance of being in the window (a "
                "reweighted objective); set unbiased_truncation: true"
            )
        if n is not None and k >= n:
            return None  # every step can be in the window (random K: each step's gradient reweighted by 1 / P_d)
        return (
            f"backprop_steps={k} leaves the steps before the last {k} without the reward's gradient; set "
            "backprop_steps: null (the whole chain)"
        )

    def setup(self, policy, reward, context=None) -> None:
        super().setup(policy, reward, context)
        if not getattr(reward, "differentiable", False):
            raise ValueError(
                f"{type(self).__name__} needs a differentiable reward, but {type(reward).__name__} is not "
                "(its gradient carries no signal); use a score-function algorithm such as PPO, "
                "or a differentiable reward."
            )
        n = self.context.num_stochastic
        if n is not None and self.backprop_steps is not None and self.backprop_steps > n:
            raise SettingError(
                self,
                "backprop_steps",
                f"is {self.backprop_steps}, more than the {n} stochastic steps of a training rollout (num_steps; a "
                "deterministic last step is not counted, and with eta 0 every step is): set it to at most "
                f"{n}, or null for the whole chain.",
                value=self.backprop_steps,
            )

    def _k_max(self, num_stochastic: int) -> int:
        return num_stochastic if self.backprop_steps is None else self.backprop_steps

    def gradient_plan(self, num_stochastic: int) -> GradientPlan:
        k_max = self._k_max(num_stochastic)
        k = int(torch.randint(1, k_max + 1, ()).item()) if self.random_truncation else k_max
        return self.window(k, num_stochastic)

    def window(self, k: int, num_stochastic: int) -> GradientPlan:
        """The plan of a rollout whose window is the last ``k`` of ``num_stochastic`` stochastic steps."""
        k_max = self._k_max(num_stochastic)
        if not (self.random_truncation and self.unbiased_truncation):
            return GradientPlan(steps=k, kl_steps=num_stochastic - k)
        # the d-th stochastic step from the end (d = 1..k_max) is in the window with P = (k_max - d + 1) / k_max
        distance = torch.arange(num_stochastic, 0, -1, dtype=torch.float64)
        weights = (k_max / (k_max - distance + 1).clamp(min=1)).where(distance <= k_max, torch.ones(()))
        return GradientPlan(steps=k, weights=weights.float(), kl_steps=num_stochastic - k_max)

    def loss(self, trajectory, policy, reward):
        rewards = policy.score(reward, trajectory.samples, trajectory.labels)
        finite = finite_rewards(rewards.detach())
        kl = None if trajectory.kl is None else trajectory.kl.sum(1)[finite]  # None: sampled at alpha = 0
        objective = rewards[finite] - (0.0 if kl is None else self.alpha * kl)
        if finite.any():
            loss = -objective.mean()
        else:  # a zero that reaches every trained weight (a backward under DDP still meets the other ranks'
            # reduction), made from the weights: a NaN sample times 0 would be NaN
            loss = sum(p.sum() for group in policy.param_groups() for p in group["params"]) * 0.0
        out = {
            "loss": loss,
            "reward": rewards[finite].mean().detach(),
            "objective": objective.mean().detach(),
            "nonfinite_rewards": (~finite).sum().float(),
        }
        return out if kl is None else {**out, "kl": kl.mean().detach()}
