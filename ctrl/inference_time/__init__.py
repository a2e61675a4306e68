"""Inference-time guidance baselines: the same pretrained model and reward as fine-tuning, no training
(except classifier-free guidance, whose conditional model is learned from the offline labelled data).

One interface (:class:`GuidedSampler`: ``sample(policy, reward, labels, seeds, num_steps) ->
GuidedSamples`` with its cost per image), one file per method.
"""

from ctrl.inference_time.base import GuidedSampler, GuidedSamples
from ctrl.inference_time.cfg import ClassifierFreeGuidance
from ctrl.inference_time.mpgd import MPGD
from ctrl.inference_time.reconstruction import ReconstructionGuidance
from ctrl.inference_time.smc import SMC
from ctrl.inference_time.svdd import SVDD

__all__ = ["ClassifierFreeGuidance", "GuidedSampler", "GuidedSamples", "MPGD", "ReconstructionGuidance", "SMC", "SVDD"]
