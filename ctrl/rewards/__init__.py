"""Rewards: ``Reward.forward(x0, labels) -> [B]``."""

from ctrl.rewards.base import Reward
from ctrl.rewards.classifier import ClassifierLogProb
from ctrl.rewards.gaussian import GaussianLogLikelihood
from ctrl.rewards.images import AestheticScore, JpegCompressibility
from ctrl.rewards.joint import JointLabels

__all__ = [
    "AestheticScore",
    "ClassifierLogProb",
    "GaussianLogLikelihood",
    "JointLabels",
    "JpegCompressibility",
    "Reward",
]
