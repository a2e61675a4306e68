"""Group-relative policy optimisation (GRPO; Shao et al. 2024, for language models) as text-to-image RL uses it
(Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025): each condition's chains form a group, a chain's
advantage is its return against the rest of its group, divided by the group's spread, no value network.

Here that is :class:`ctrl.algorithms.PPO` with the baseline always per condition (``data.group_size`` chains
per drawn condition, at least 2) and the advantages standardised by default. What stays PPO's, and differs
from Flow-GRPO's script: the KL is ctrl's exact per-step KL to the pretrained chain both in the return (the
KL of the later steps, which this step's action moves) and as a direct term, so the fixed point is the
tilted target ``p_pre(x) exp(r(x) / alpha) / Z``; Flow-GRPO's loss has the direct term only. The baseline
leaves the chain's own return out (Flow-GRPO's group mean includes it, which scales the policy-gradient
part by (1 - 1/G) and not the KL part). Standardising divides the return by the group's std, an effective
alpha that moves with the reward's spread: ``advantages: center`` keeps the closed-form target.
"""

from __future__ import annotations

from typing import Literal

from ctrl.algorithms.ppo import PPO
from ctrl.errors import SettingError


class GRPO(PPO):
    """PPO whose advantages are group-relative: per condition, standardised (module docstring).

    Args:
        alpha: the KL weight. Flow-GRPO's beta weighs a KL averaged over the sample's d dimensions, its step
            variance without the step size dt: the same penalty here is beta * dt / d, with
            ``ratio_per_dimension`` true (configs/sd3/grpo_*.yaml convert it).
        clip_range, inner_epochs, minibatch_size, timestep_fraction, steps_per_call, advantage_clip,
            ratio_per_dimension: as :class:`PPO`.
        advantages: "standardize" (GRPO's: the return minus the rest of the group's mean, over the group's
            std) or "center" (no division: the closed-form target).
    """

    def __init__(
        self,
        alpha: float = 0.04,
        clip_range: float = 0.2,
        inner_epochs: int = 1,
        minibatch_size: int | None = None,
        timestep_fraction: float = 1.0,
        steps_per_call: int = 1,
        advantages: Literal["center", "standardize"] = "standardize",
        advantage_clip: float | None = 5.0,
        ratio_per_dimension: bool = False,
    ):
        super().__init__(
            alpha=alpha,
            clip_range=clip_range,
            inner_epochs=inner_epochs,
            minibatch_size=minibatch_size,
            timestep_fraction=timestep_fraction,
            steps_per_call=steps_per_call,
            advantages=advantages,
            per_condition=True,
            advantage_clip=advantage_clip,
            ratio_per_dimension=ratio_per_dimension,
        )

    def check_data(self, group_size: int | None) -> None:
        if group_size is not None and group_size < 2:
            raise SettingError(
                "data",
                "group_size",
                f"is {group_size}, but GRPO compares each chain with the rest of its condition's group: set "
                "data.group_size to 2 or more (and data.batch_size to a multiple of it).",
            )
