"""Policies: a frozen pretrained diffusion model plus a trainable control, as one nn.Module."""

from ctrl.policy.base import DiffusionPolicy
from ctrl.policy.gaussian import AnalyticGaussian, AnalyticGaussianFlow, GaussianWorld
from ctrl.policy.sd3 import StableDiffusion3Policy
from ctrl.policy.stable_diffusion import StableDiffusionPolicy
from ctrl.policy.unet import ResidualControlHead, UNetPolicy, load_pretrained_unet

__all__ = [
    "AnalyticGaussian",
    "AnalyticGaussianFlow",
    "GaussianWorld",
    "DiffusionPolicy",
    "UNetPolicy",
    "ResidualControlHead",
    "StableDiffusionPolicy",
    "StableDiffusion3Policy",
    "load_pretrained_unet",
]
