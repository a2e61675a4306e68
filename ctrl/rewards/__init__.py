"""Rewards: ``Reward.forward(x0, labels) -> [B]``, or ``forward(x0, labels, prompts)`` for a reward that reads
each sample's prompt; callers go through :func:`ctrl.rewards.base.call_reward`."""

from ctrl.rewards.base import Reward, call_reward
from ctrl.rewards.classifier import ClassifierLogProb
from ctrl.rewards.clip import CLIPScore, PickScore
from ctrl.rewards.function import FunctionReward
from ctrl.rewards.gaussian import GaussianLogLikelihood
from ctrl.rewards.images import AestheticScore, JpegCompressibility
from ctrl.rewards.joint import JointLabels

__all__ = [
    "AestheticScore",
    "CLIPScore",
    "ClassifierLogProb",
    "FunctionReward",
    "GaussianLogLikelihood",
    "JointLabels",
    "JpegCompressibility",
    "PickScore",
    "Reward",
    "call_reward",
]
