"""Inference-time guidance baselines: the same pretrained model and reward as fine-tuning, no training
(except classifier-free guidance, whose conditional model is learned from the offline labelled data).

One interface (:class:`GuidedSampler`: ``sample(policy, reward, labels, seeds, num_steps) ->
GuidedSamples`` with its cost per image), one file per method.
"""

from ctrl.guidance.base import GuidedSampler, GuidedSamples
from ctrl.guidance.cfg import ClassifierFreeGuidance
from ctrl.guidance.mpgd import MPGD
from ctrl.guidance.reconstruction import ReconstructionGuidance
from ctrl.guidance.smc import SMC
from ctrl.guidance.svdd import SVDD

__all__ = ["ClassifierFreeGuidance", "GuidedSampler", "GuidedSamples", "MPGD", "ReconstructionGuidance", "SMC", "SVDD"]
