"""Rewards: ``Reward.forward(x0, labels) -> [B]``."""

from ctrl.rewards.base import Reward
from ctrl.rewards.classifier import ClassifierLogProb
from ctrl.rewards.gaussian import GaussianLogLikelihood

__all__ = ["Reward", "ClassifierLogProb", "GaussianLogLikelihood"]
