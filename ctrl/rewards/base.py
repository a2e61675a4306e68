"""The reward interface, and the one way to call a reward (:func:`call_reward`)."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn


class Reward(nn.Module, ABC):
    """r(x0, y), or r(x0, y, prompt) for a reward that reads the text of the condition; one value per sample.

    A reward implements ``forward(x0, labels)``. One that scores an image against its text (CLIPScore,
    PickScore, FunctionReward) also declares a parameter named ``prompts``, ``forward(x0, labels, prompts)``;
    :func:`call_reward`, which every caller goes through, passes it only to rewards that declare it, so a
    reward written for labels alone needs no change.

    Shapes, as a policy gives them (:meth:`ctrl.policy.DiffusionPolicy.score`):

    - ``x0`` ``[B, C, H, W]``: decoded samples (RGB images in [-1, 1] for Stable Diffusion; ``[B, d]`` for
      the Gaussian policy);
    - ``labels`` ``[B]`` long: the label each sample is scored for (``policy.reward_labels``: the class of a
      (prompt, class) condition);
    - ``prompts``: B strings, the prompt of each sample's condition (``policy.reward_prompts``), or None when
      the policy's conditions have no text (digits labels);
    - returns ``[B]``.

    Attributes:
        differentiable: whether gradients of the reward with respect to x0 are meaningful
            (direct backprop needs them; a JPEG size, say, has none).
        num_labels: the size of the label set the reward scores, or None if it takes no label.
    """

    differentiable: ClassVar[bool] = True
    num_labels: int | None = None

    @abstractmethod
    def forward(self, x0: Tensor, labels: Tensor) -> Tensor:
        """``x0`` ``[B, C, H, W]``, ``labels`` ``[B]`` -> rewards ``[B]`` (add ``prompts`` to read the text)."""


def takes_prompts(reward) -> bool:
    """Whether ``reward`` (a :class:`Reward`, or a plain callable ``r(x0, labels)``) declares ``prompts``."""
    forward = reward.forward if isinstance(reward, nn.Module) else reward
    return "prompts" in inspect.signature(forward).parameters


def call_reward(reward, x0: Tensor, labels: Tensor, prompts: list[str] | None = None) -> Tensor:
    """``reward(x0, labels, prompts=prompts)`` for a reward that declares ``prompts``, else
    ``reward(x0, labels)``: rewards ``[B]`` (shapes as :class:`Reward` says)."""
    if takes_prompts(reward):
        return reward(x0, labels, prompts=prompts)
    return reward(x0, labels)
