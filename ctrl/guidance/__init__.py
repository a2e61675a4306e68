"""Inference-time guidance baselines: the same pretrained model and reward as fine-tuning, no training.

One interface (:class:`GuidedSampler`: ``sample(policy, reward, labels, seeds, num_steps) ->
GuidedSamples`` with its cost per image), one file per method.
"""

from ctrl.guidance.base import GuidedSampler, GuidedSamples
from ctrl.guidance.mpgd import MPGD
from ctrl.guidance.reconstruction import ReconstructionGuidance
from ctrl.guidance.smc import SMC
from ctrl.guidance.svdd import SVDD

__all__ = ["GuidedSampler", "GuidedSamples", "MPGD", "ReconstructionGuidance", "SMC", "SVDD"]
