"""ctrl: add control to pretrained diffusion models with reinforcement learning."""

from importlib.metadata import version

__version__ = version("ctrl")  # pyproject.toml's, as installed
