"""A plain function as the reward, named by its import path: how a trl ``reward_fn`` comes to ctrl."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from ctrl.errors import SettingError
from ctrl.rewards.base import Reward


class FunctionReward(Reward):
    """``function(images, prompts, labels) -> rewards [B]``, a plain function, as the reward.

    For a reward written as a function, as trl's DDPO and AlignProp trainers take one (``reward_fn``)::

        model:
          reward:
            class_path: ctrl.rewards.FunctionReward
            init_args: {function: mypkg.rewards.fn, pixel_range: [0, 1]}

    The function is called with

    - ``images`` ``[B, C, H, W]`` float: the decoded samples, mapped linearly from ctrl's [-1, 1] onto
      ``pixel_range`` (trl's pipelines give a reward_fn [0, 1]);
    - ``prompts``: B strings, the prompt of each image's condition, or None when the policy's conditions have
      no text (digits labels);
    - ``labels`` ``[B]`` long: the label each image is scored for (where trl passes prompt metadata);

    and returns the rewards ``[B]``: a tensor, or what ``torch.as_tensor`` takes (a numpy array, a list). A trl
    reward_fn returns ``(rewards, metadata)``: return the rewards alone.

    Args:
        function: ``package.module.name`` (or ``package.module:name``) of a function importable from the
            Python path; from Python, the function itself.
        differentiable: whether the function's output carries gradients to the images (DirectBackprop needs
            them); False for a reward computed on numpy arrays or PIL images, as most trl reward_fns are.
        pixel_range: ``[low, high]``, the range of the images the function gets.
    """

    def __init__(
        self,
        function: str | Callable,
        differentiable: bool = False,
        pixel_range: tuple[float, float] = (-1.0, 1.0),
    ):
        super().__init__()
        self.function = function if callable(function) else self._import(function)
        self.name = function if isinstance(function, str) else getattr(function, "__qualname__", repr(function))
        self._check_arguments()
        low, high = (float(v) for v in pixel_range)
        if not low < high:
            raise SettingError(self, "pixel_range", f"must be [low, high] with low < high, got {list(pixel_range)}.")
        self.low, self.high = low, high
        self.differentiable = differentiable

    def _import(self, path: str) -> Callable:
        module, _, name = path.replace(":", ".").rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise SettingError(
                self,
                "function",
                f"'{path}' does not import ({type(err).__name__}: {err}); give package.module.function of a "
                "function on the Python path (pip install -e your package, or set PYTHONPATH).",
            ) from None
        if not callable(found):
            raise SettingError(
                self, "function", f"'{path}' is not callable ({type(found).__name__}); name a function."
            )
        return found

    def _check_arguments(self) -> None:
        try:
            signature = inspect.signature(self.function)
        except (TypeError, ValueError):  # a builtin without a signature: its first call will tell
            return
        try:
            signature.bind(None, None, None)
        except TypeError:
            raise SettingError(
                self,
                "function",
                f"'{self.name}' takes {signature}, but a reward function takes three arguments (images, prompts, "
                "labels); give it those three (ignore the ones it does not need).",
            ) from None

    def forward(self, x0: Tensor, labels: Tensor, prompts: list[str] | None = None) -> Tensor:
        images = self.low + (x0 + 1) * ((self.high - self.low) / 2)
        raw = self.function(images, prompts, labels)
        try:
            out = torch.as_tensor(raw).to(device=x0.device, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            out = None
        if out is None or out.shape != (len(x0),):
            what = f"a {type(raw).__name__}" if out is None else f"shape {list(out.shape)}"
            raise SettingError(
                self,
                "function",
                f"'{self.name}' returned {what} for {len(x0)} images; it must return one reward per image, shape "
                f"[{len(x0)}] (a trl reward_fn's (rewards, metadata) pair: return the rewards alone).",
            )
        return out
