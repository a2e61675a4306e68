"""Switching a peft-adapted network's LoRA layers on (the policy) and off (the pretrained model)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class AdapterSwitch:
    """Turns the LoRA layers of ``model`` on or off, touching only those layers and only when the state changes.

    diffusers' ``enable_adapters`` / ``disable_adapters`` walk every module of the network on each call, which
    costs more than a small network's forward pass when a rollout switches twice per step. peft also switches
    the adapters' ``requires_grad`` off while they are disabled; turning them on restores it.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def set(self, on: bool) -> None:
        if self.layers and self.layers[0].disable_adapters == on:
            for layer in self.layers:
                layer.enable_adapters(on)
