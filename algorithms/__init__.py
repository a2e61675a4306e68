"""Built-in RL algorithm plugins (installed as ctrl.algorithms); registered by class name in :mod:`ctrl.registry`."""

from ctrl.algorithms.base import Algorithm
from ctrl.algorithms.continuous import ContinuousTimePG
from ctrl.algorithms.direct import DirectBackprop
from ctrl.algorithms.grpo import GRPO
from ctrl.algorithms.ppo import PPO
from ctrl.algorithms.presets import DDPO, AlignProp, DRaFT
from ctrl.algorithms.raft import RAFT

__all__ = ["Algorithm", "AlignProp", "ContinuousTimePG", "DDPO", "DRaFT", "DirectBackprop", "GRPO", "PPO", "RAFT"]
