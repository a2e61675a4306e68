"""ctrl: add control to pretrained diffusion models with reinforcement learning."""

__version__ = "0.1.0"
