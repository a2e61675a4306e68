"""Built-in RL algorithm plugins (installed as ctrl.algorithms); each registers itself by class name."""

from ctrl.algorithms.base import Algorithm
from ctrl.algorithms.direct import DirectBackprop
from ctrl.algorithms.ppo import PPO

__all__ = ["Algorithm", "DirectBackprop", "PPO"]
